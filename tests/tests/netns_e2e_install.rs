//! Privileged end-to-end test of the user's install path on a 2-node lab:
//! bare kubelets register NotReady, `manifests/riptide.yaml` applied
//! through the apiserver installs the CNI (the DaemonSet's init container)
//! into each node's own root and starts the agents, the nodes turn Ready
//! and Services work; a rolling restart of the agents keeps a live
//! connection; `manifests/riptide-uninstall.yaml` leaves nothing behind.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_test_support::privileged;
use riptide_tests::{
    e2e::{self, KeepAlive, Suite, eventually},
    lab::{self, Install, Lab, LabConfig},
};

const NODES: u32 = 2;
const SETTLE: Duration = Duration::from_secs(60);

/// `BPF_CGROUP_INET4_CONNECT`: the attach type of riptide's `connect4`.
const INET4_CONNECT: u32 = 10;

/// `union bpf_attr`'s `query` member (`BPF_PROG_QUERY`).
#[repr(C)]
#[derive(Default)]
struct ProgQuery {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    rest: [u64; 4],
}

/// `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS`: riptide's tc programs on 6.6+.
const TCX: [u32; 2] = [46, 47];

/// Ids of the `connect4` programs attached directly to cgroup `dir`.
fn connect4_programs(dir: &Path) -> Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    prog_query(u32::try_from(f.as_raw_fd())?, INET4_CONNECT).with_context(|| format!("BPF_PROG_QUERY on {}", dir.display()))
}

/// Ids of the programs attached to `target` (a cgroup fd, or an ifindex
/// of the caller's netns) as `attach_type`.
fn prog_query(target: u32, attach_type: u32) -> std::io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut q = ProgQuery {
        target_fd: target,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..ProgQuery::default()
    };
    // SAFETY: BPF_PROG_QUERY (16) reads `q` and writes at most `prog_cnt`
    // ids into `ids`, both alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 16, &raw mut q, std::mem::size_of::<ProgQuery>()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ids[..(q.prog_cnt as usize).min(ids.len())].to_vec())
}

/// Every cgroup of the cgroup v2 hierarchy with the `connect4` programs
/// attached to it (cgroups that vanish meanwhile are skipped).
fn cgroup_attachments() -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    let mut todo = vec![std::path::PathBuf::from(lab::CGROUP2_ROOT)];
    while let Some(dir) = todo.pop() {
        let Ok(ids) = connect4_programs(&dir) else { continue };
        out.extend(ids.into_iter().map(|id| (dir.display().to_string(), id)));
        for e in std::fs::read_dir(&dir).into_iter().flatten().filter_map(std::result::Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Agent pod names, by node.
fn agent_pods(lab: &Lab) -> Result<Vec<(String, String)>> {
    let v = e2e::kubectl_json(lab, &["-n", "riptide-system", "get", "pods", "-l", "app.kubernetes.io/name=riptide-agent", "-o", "json"])?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(), p["metadata"]["name"].as_str().unwrap_or_default().to_owned()))
        .collect())
}

/// What riptide leaves on node `i`: pins, its run dir, the conflist,
/// routes of its protocol, tc filters and XDP on the node's links, and
/// cgroup attachments on the node's cgroup. Empty when nothing is left.
fn leftovers(lab: &Lab, i: u32) -> Result<Vec<String>> {
    let c = lab.config();
    let node = c.node_name(i);
    let mut left = Vec::new();
    for p in [
        Path::new(lab::PIN_ROOT).join(&node),
        Path::new("/run/riptide").join(&node),
        c.node_root(i).join("etc/cni/net.d/10-riptide.conflist"),
    ] {
        if p.exists() {
            left.push(format!("{} exists", p.display()));
        }
    }
    let ns = c.node_netns(i);
    let routes = std::process::Command::new("ip").args(["-n", &ns, "route", "show", "proto", "201"]).output()?;
    let routes = String::from_utf8_lossy(&routes.stdout).trim().to_owned();
    if !routes.is_empty() {
        left.push(format!("routes of proto 201: {routes}"));
    }
    let links = std::process::Command::new("ip").args(["-n", &ns, "-o", "link", "show"]).output()?;
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        let Some(dev) = line.split(": ").nth(1).map(|d| d.split('@').next().unwrap_or(d).to_owned()) else { continue };
        if line.contains(" xdp") || line.contains("prog/xdp") {
            left.push(format!("XDP on {dev}: {line}"));
        }
        // tcx links do not show in `tc filter show`.
        if let Some(ifindex) = line.split(':').next().and_then(|n| n.trim().parse::<u32>().ok()) {
            let tcx = riptide_tests::netns::run_in(&ns, move || TCX.map(|t| prog_query(ifindex, t)))?;
            for (dir, ids) in ["ingress", "egress"].iter().zip(tcx) {
                let ids = ids.with_context(|| format!("querying tcx {dir} on {dev}"))?;
                if !ids.is_empty() {
                    left.push(format!("tcx {dir} programs {ids:?} on {dev}"));
                }
            }
        }
        for dir in ["ingress", "egress"] {
            let f = std::process::Command::new("tc").args(["-n", &ns, "filter", "show", "dev", &dev, dir]).output()?;
            let f = String::from_utf8_lossy(&f.stdout).trim().to_owned();
            if !f.is_empty() {
                left.push(format!("tc {dir} on {dev}: {f}"));
            }
        }
    }
    for id in connect4_programs(&c.node_cgroup(i))? {
        left.push(format!("connect4 program {id} attached to {}", c.node_cgroup(i).display()));
    }
    Ok(left)
}

#[test]
fn netns_e2e_install_from_the_manifest() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(NODES).expect("config")).expect("lab up");
    lab.set_install(Install::Manifest);
    lab.start_control_plane().expect("control plane");
    for i in 1..=NODES {
        lab.start_kubelet(i).expect("kubelet");
    }
    lab.wait_until("nodes registered", Duration::from_secs(60), |lab| lab.summary().is_ok_and(|s| s.nodes == NODES as usize))
        .expect("nodes");
    // Without a CNI config a node is not ready (NetworkReady=false), and
    // nothing of riptide is on it yet.
    let s = lab.summary().expect("summary");
    assert_eq!(s.nodes_ready, 0, "nodes Ready before riptide is installed: {s:?}");
    for i in 1..=NODES {
        let conf = lab.config().node_root(i).join("etc/cni/net.d");
        assert_eq!(std::fs::read_dir(&conf).map(Iterator::count).unwrap_or(0), 0, "{} not empty before the install", conf.display());
    }
    let started = Instant::now();
    lab.apply_riptide_manifest().expect("kubectl apply riptide.yaml");
    lab.wait_for_agents(Duration::from_secs(180)).expect("agents rolled out and nodes Ready");
    eprintln!("ok   nodes NotReady → Ready through the DaemonSet in {:.1}s", started.elapsed().as_secs_f64());
    lab.deploy_demo().expect("demo");
    let mut s = Suite::new(&mut lab);

    s.check("install-cni put riptide-cni and the conflist in every node's own CNI dirs", |lab| {
        for i in 1..=NODES {
            let root = lab.config().node_root(i);
            let plugin = root.join("opt/cni/bin/riptide");
            ensure!(plugin.is_file(), "{} missing", plugin.display());
            let conf = root.join("etc/cni/net.d/10-riptide.conflist");
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&conf).with_context(|| format!("reading {}", conf.display()))?)?;
            ensure!(v["plugins"][0]["nodeName"] == lab.config().node_name(i), "{}: {v}", conf.display());
        }
        Ok(())
    });

    s.check("socket LB attaches to the lab's node cgroups and nowhere else", |lab| {
        let c = lab.config();
        let ours: BTreeSet<String> = (1..=NODES).map(|i| c.node_cgroup(i).display().to_string()).collect();
        let all = cgroup_attachments()?;
        let ids: BTreeSet<u32> = all.iter().filter(|(p, _)| ours.contains(p)).map(|(_, id)| *id).collect();
        for cg in &ours {
            ensure!(all.iter().any(|(p, _)| p == cg), "no connect4 program on {cg}: {all:?}");
        }
        // Other labs' agents attach programs of their own, to their own
        // cgroups; the cgroup root gets none.
        let elsewhere: Vec<_> = all.iter().filter(|(p, id)| (ids.contains(id) && !ours.contains(p)) || p == lab::CGROUP2_ROOT).collect();
        ensure!(elsewhere.is_empty(), "connect4 programs outside the node cgroups: {elsewhere:?} (ours: {ids:?})");
        eprintln!("     connect4 programs {ids:?} on {ours:?} only");
        Ok(())
    });

    s.check("ClusterIP over TCP reaches every endpoint from a pod", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=demo")?;
            ensure!(p.len() == 3 && p.iter().all(|p| p.ready), "pods: {p:?}");
            Ok(p)
        })?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.check("NodePort answers on every node's address from outside", |lab| {
        for i in 1..=NODES {
            let url = format!("http://{}:30080/hostname", lab.config().node_ip(i));
            eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())?;
        }
        Ok(())
    });

    s.check("the riptide CLI reaches every node's agent pod", |lab| {
        for i in 1..=NODES {
            let st = e2e::agent_status(lab, i)?;
            ensure!(st.is_object(), "riptide status on node {i}: {st}");
        }
        Ok(())
    });

    s.check_mut("rollout restart ds/riptide-agent keeps a live ClusterIP connection", |lab| {
        let c = lab.config().clone();
        let netexec = c.bin_dir.join("riptide-netexec");
        let cip = e2e::cluster_ip(lab, "demo")?;
        let client = e2e::pods(lab, "app=demo")?.into_iter().next().context("no demo pod")?;
        let mut cmd = e2e::pod_command(lab, &client.name, &netexec)?;
        cmd.args(["--keepalive-client", &format!("{cip}:80")]);
        let mut k = KeepAlive::open(&format!("{} → {cip}:80", client.name), cmd)?;
        let backend = k.get("/hostname")?;
        let before = agent_pods(lab)?;

        let rollout = |args: &[&str]| lab.kubectl().args(["-n", "riptide-system", "rollout"]).args(args).output();
        let out = rollout(&["restart", "ds/riptide-agent"])?;
        ensure!(out.status.success(), "rollout restart: {}", String::from_utf8_lossy(&out.stderr));
        let mut status = lab
            .kubectl()
            .args(["-n", "riptide-system", "rollout", "status", "ds/riptide-agent", "--timeout=180s"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("kubectl rollout status")?;
        let mut n = 0u32;
        let done = loop {
            n += 1;
            let msg = format!("during-{n}");
            let echo = k.get(&format!("/echo?msg={msg}")).with_context(|| format!("request {n} during the rollout"))?;
            ensure!(echo == msg, "echo {msg} answered {echo}");
            if let Some(st) = status.try_wait()? {
                break st;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(done.success(), "kubectl rollout status ds/riptide-agent failed");
        let after = agent_pods(lab)?;
        ensure!(after.len() == NODES as usize, "agent pods after the rollout: {after:?}");
        ensure!(after.iter().all(|p| !before.contains(p)), "pods not replaced: before {before:?}, after {after:?}");
        // The connection kept its backend through every agent's restart.
        ensure!(k.get("/hostname")? == backend, "the connection moved off {backend}");
        eprintln!("     {n} requests over one connection during the rollout, none failed; agent pods {before:?} → {after:?}");
        lab.wait_for_agents(Duration::from_secs(120))?;
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "new connections after the rollout: {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.check_mut("riptide-uninstall.yaml leaves no pin, program, route or CNI file behind", |lab| {
        // Pods with riptide networking go first (their veths carry riptide's
        // per-pod programs until the CNI DEL).
        e2e::kubectl(lab, &["delete", "deployment", "demo", "--wait=true", "--timeout=60s"])?;
        eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=demo")?;
            ensure!(p.is_empty(), "demo pods left: {p:?}");
            Ok(())
        })?;
        let shipped = riptide_tests::manifests::manifest("riptide.yaml");
        e2e::kubectl(lab, &["delete", "-f", &shipped.display().to_string(), "--wait=true", "--timeout=90s"])?;
        eventually(Duration::from_secs(90), || {
            let left = agent_pods(lab)?;
            ensure!(left.is_empty(), "agent pods left: {left:?}");
            Ok(())
        })?;
        let uninstall = riptide_tests::manifests::manifest("riptide-uninstall.yaml").display().to_string();
        e2e::kubectl(lab, &["apply", "-f", &uninstall])?;
        e2e::kubectl(lab, &["-n", "riptide-uninstall", "rollout", "status", "ds/riptide-uninstall", "--timeout=120s"])?;
        let mut left = Vec::new();
        for i in 1..=NODES {
            left.extend(leftovers(lab, i)?.into_iter().map(|l| format!("{}: {l}", lab.config().node_name(i))));
        }
        e2e::kubectl(lab, &["delete", "-f", &uninstall, "--wait=true", "--timeout=60s"])?;
        if !left.is_empty() {
            bail!("after the uninstall:\n{}", left.join("\n"));
        }
        Ok(())
    });

    s.finish();
}
