//! Privileged end-to-end test of the user's install path on a 2-node lab:
//! bare kubelets register NotReady, `manifests/riptide.yaml` applied
//! through the apiserver installs the CNI (the DaemonSet's init container)
//! into each node's own root and starts the agents, the nodes turn Ready
//! and Services work; a rolling restart and an image change of the agents
//! break no held connection and fail no new one through ClusterIP and
//! NodePort, and the new agents adopt the pinned maps; a node added later
//! gets its agent and serves pods; `manifests/riptide-uninstall.yaml`
//! leaves nothing behind.

use std::{
    collections::{BTreeMap, BTreeSet},
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

/// `BPF_OBJ_GET`'s attribute (`union bpf_attr`, the `BPF_OBJ_*` member).
#[repr(C)]
#[derive(Default)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Kernel ids of the maps pinned for node `i`, by pin path relative to
/// its pin directory: the same ids after an agent restart mean the new
/// agent adopted the maps (a rebuilt map gets a new id).
fn pinned_map_ids(lab: &Lab, i: u32) -> Result<BTreeMap<String, u32>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let root = Path::new(lab::PIN_ROOT).join(lab.config().node_name(i));
    let mut ids = BTreeMap::new();
    let mut todo = vec![root.clone()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
                continue;
            }
            let path = std::ffi::CString::new(e.path().as_os_str().as_encoded_bytes())?;
            let mut attr = ObjGet { pathname: path.as_ptr() as u64, ..ObjGet::default() };
            // SAFETY: BPF_OBJ_GET (7) reads `attr` and the NUL-terminated
            // path it points at, both alive for the call.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, &raw mut attr, std::mem::size_of::<ObjGet>()) };
            if fd < 0 {
                bail!("BPF_OBJ_GET {}: {}", e.path().display(), std::io::Error::last_os_error());
            }
            // SAFETY: the syscall returned a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) };
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
            // Programs and links pinned beside the maps have no map_id.
            if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
                let rel = e.path().strip_prefix(&root)?.display().to_string();
                ids.insert(rel, id.trim().parse()?);
            }
        }
    }
    Ok(ids)
}

/// Reverse-NAT id of every frontend in node `i`'s maps (`riptide service
/// list`): ids the new agent reuses, or replies of established flows
/// would be translated to another Service's address.
fn revnat_ids(lab: &Lab, i: u32) -> Result<BTreeMap<String, u64>> {
    let v = e2e::agent_services(lab, i)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|f| (format!("{} {}", f["frontend"].as_str().unwrap_or("?"), f["scope"].as_str().unwrap_or("?")), f["revnat_id"].as_u64().unwrap_or(0)))
        .collect())
}

/// Long-lived and new connections held through an agent rollout.
#[derive(Debug, Default)]
struct Traffic {
    /// Requests over the held connections during the rollout.
    requests: u64,
    /// Held connections that failed (none may).
    broken: Vec<String>,
    /// New connections that answered, by path.
    new_ok: BTreeMap<String, u64>,
    /// New connections that failed, with the error.
    new_failed: Vec<String>,
}

/// One client of the live traffic: a demo pod on the node if there is one
/// (its netns and cgroup, as `e2e::pod_command`), else the node itself.
struct Client {
    who: String,
    netns: String,
    cgroup: std::path::PathBuf,
}

impl Client {
    fn on(lab: &Lab, i: u32) -> Result<Self> {
        let c = lab.config();
        let node = c.node_name(i);
        let pods = e2e::kubectl_json(lab, &["get", "pods", "-l", "app=demo", "--field-selector", &format!("spec.nodeName={node}")])?;
        let pod = pods["items"].as_array().into_iter().flatten().find(|p| p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null());
        Ok(match pod.and_then(|p| Some((p["metadata"]["name"].as_str()?, p["metadata"]["uid"].as_str()?))) {
            Some((name, uid)) => Self { who: name.to_owned(), netns: format!("{node}-pod-{uid}"), cgroup: c.node_cgroup(i).join(format!("pod-{uid}")) },
            None => Self { who: node.clone(), netns: c.node_netns(i), cgroup: c.node_cgroup(i) },
        })
    }

    fn command(&self, program: &Path) -> Result<std::process::Command> {
        riptide_tests::netns::command_in_cgroup(&self.netns, &self.cgroup, program)
    }
}

/// Runs `change` (a kubectl command that rolls the agent pods) while, on
/// every node, a keep-alive connection to the `demo` ClusterIP from a pod
/// of the node and one from `outside` to the node's NodePort carry a
/// request every 100 ms, and new connections to the same places open one
/// after another; until `kubectl rollout status` says done and 2 s more.
/// Fails on any broken held connection or failed new one, when an agent
/// pod was not replaced, and when a node's pinned maps or reverse-NAT ids
/// changed (the new agents must adopt, not rebuild).
fn roll_agents_under_traffic(lab: &Lab, change: &[&str]) -> Result<Traffic> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = lab.config().clone();
    let nodes = c.nodes;
    let netexec = c.bin_dir.join("riptide-netexec");
    let cip = e2e::cluster_ip(lab, "demo")?;
    let clients = (1..=nodes).map(|i| Client::on(lab, i)).collect::<Result<Vec<_>>>()?;
    let mut held = Vec::new();
    for (i, client) in (1..=nodes).zip(&clients) {
        let mut cmd = client.command(&netexec)?;
        cmd.args(["--keepalive-client", &format!("{cip}:80")]);
        held.push(KeepAlive::open(&format!("{} → {cip}:80", client.who), cmd)?);
        let np = format!("{}:30080", c.node_ip(i));
        let mut cmd = riptide_tests::netns::command(&c.outside_netns(), &netexec)?;
        cmd.args(["--keepalive-client", &np]);
        held.push(KeepAlive::open(&format!("outside → {np}"), cmd)?);
    }
    let backends = held.iter_mut().map(|k| k.get("/hostname")).collect::<Result<Vec<_>>>()?;
    let maps_before = (1..=nodes).map(|i| pinned_map_ids(lab, i)).collect::<Result<Vec<_>>>()?;
    let revnat_before = (1..=nodes).map(|i| revnat_ids(lab, i)).collect::<Result<Vec<_>>>()?;
    ensure!(maps_before.iter().all(|m| !m.is_empty()), "no pinned maps before the rollout: {maps_before:?}");
    let pods_before = agent_pods(lab)?;

    // Probe commands of one round of new connections: ClusterIP from every
    // node's client, NodePort of every node from outside.
    let round = || -> Result<Vec<(String, std::process::Command)>> {
        let mut cmds = Vec::new();
        for client in &clients {
            let mut cmd = client.command(&netexec)?;
            cmd.args(["--probe", &format!("tcp:{cip}:80"), "--probe-timeout-ms", "3000"]);
            cmds.push((client.who.clone(), cmd));
        }
        let mut cmd = riptide_tests::netns::command(&c.outside_netns(), &netexec)?;
        for i in 1..=nodes {
            cmd.args(["--probe", &format!("tcp:{}:30080", c.node_ip(i))]);
        }
        cmd.args(["--probe-timeout-ms", "3000", "--probe-parallel", &nodes.to_string()]);
        cmds.push(("outside".into(), cmd));
        Ok(cmds)
    };
    let stop = AtomicBool::new(false);
    let mut t = Traffic::default();
    let rolled: Result<()> = std::thread::scope(|scope| {
        let stream = scope.spawn(|| -> Result<(BTreeMap<String, u64>, Vec<String>)> {
            let (mut ok, mut failed) = (BTreeMap::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let started = round()?
                    .into_iter()
                    .map(|(who, mut cmd)| (who, cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()))
                    .collect::<Vec<_>>();
                for (who, child) in started {
                    let out = child.and_then(std::process::Child::wait_with_output);
                    let out = match out {
                        Ok(o) => o,
                        Err(e) => {
                            failed.push(format!("{who}: starting the probe: {e}"));
                            continue;
                        }
                    };
                    let text = String::from_utf8_lossy(&out.stdout);
                    for line in text.lines() {
                        let mut w = line.splitn(3, ' ');
                        match (w.next(), w.next()) {
                            (Some(target), Some("ok")) => *ok.entry(format!("{who} {target}")).or_insert(0) += 1,
                            _ => failed.push(format!("{who}: {line}")),
                        }
                    }
                    if !out.status.success() || text.trim().is_empty() {
                        failed.push(format!("{who}: probe exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok((ok, failed))
        });
        let mut held_traffic = || -> Result<()> {
            let out = lab.kubectl().args(["-n", "riptide-system"]).args(change).output()?;
            ensure!(out.status.success(), "kubectl {}: {}", change.join(" "), String::from_utf8_lossy(&out.stderr));
            let mut status = lab
                .kubectl()
                .args(["-n", "riptide-system", "rollout", "status", "ds/riptide-agent", "--timeout=180s"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("kubectl rollout status")?;
            let mut done_at = None;
            let mut broken = vec![false; held.len()];
            loop {
                t.requests += 1;
                let msg = format!("during-{}", t.requests);
                for (k, b) in held.iter_mut().zip(&mut broken) {
                    if *b {
                        continue;
                    }
                    match k.get(&format!("/echo?msg={msg}")) {
                        Ok(echo) if echo == msg => {}
                        Ok(echo) => {
                            *b = true;
                            t.broken.push(format!("echo {msg} answered {echo}"));
                        }
                        Err(e) => {
                            *b = true;
                            t.broken.push(format!("request {}: {e:#}", t.requests));
                        }
                    }
                }
                if done_at.is_none()
                    && let Some(st) = status.try_wait()?
                {
                    ensure!(st.success(), "kubectl rollout status ds/riptide-agent failed");
                    done_at = Some(Instant::now());
                }
                // New agents report ready before their first resync is
                // long over: keep the traffic on a little after.
                if done_at.is_some_and(|d| d.elapsed() > Duration::from_secs(2)) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let r = held_traffic();
        stop.store(true, Ordering::Relaxed);
        let (ok, failed) = stream.join().map_err(|_| anyhow::anyhow!("the new-connection stream panicked"))??;
        t.new_ok = ok;
        t.new_failed = failed;
        r
    });
    rolled?;
    for (k, before) in held.iter_mut().zip(&backends) {
        if t.broken.is_empty() {
            ensure!(&k.get("/hostname")? == before, "a held connection moved off {before}");
        }
    }
    let pods_after = agent_pods(lab)?;
    ensure!(pods_after.len() == nodes as usize, "agent pods after the rollout: {pods_after:?}");
    ensure!(pods_after.iter().all(|p| !pods_before.contains(p)), "pods not replaced: before {pods_before:?}, after {pods_after:?}");
    for i in 1..=nodes {
        let node = c.node_name(i);
        let maps = pinned_map_ids(lab, i)?;
        let m0 = &maps_before[(i - 1) as usize];
        let rebuilt: Vec<_> = m0.iter().filter(|(p, id)| maps.get(*p) != Some(id)).map(|(p, id)| format!("{p} {id} → {:?}", maps.get(p))).collect();
        ensure!(rebuilt.is_empty(), "{node}: pinned maps replaced, not adopted: {rebuilt:?}");
        let revnat = revnat_ids(lab, i)?;
        let r0 = &revnat_before[(i - 1) as usize];
        let moved: Vec<_> = r0.iter().filter(|(f, id)| revnat.get(*f) != Some(id)).map(|(f, id)| format!("{f} {id} → {:?}", revnat.get(f))).collect();
        ensure!(moved.is_empty(), "{node}: reverse-NAT ids changed: {moved:?}");
        eprintln!("     {node}: {} pinned maps and {} frontends' reverse-NAT ids unchanged", m0.len(), r0.len());
    }
    let new: u64 = t.new_ok.values().sum();
    eprintln!(
        "     {} requests on each of {} held connections, {} broken; {new} new connections ({:?}), {} failed; agent pods {pods_before:?} → {pods_after:?}",
        t.requests,
        held.len(),
        t.broken.len(),
        t.new_ok,
        t.new_failed.len()
    );
    ensure!(t.broken.is_empty(), "held connections broke: {:?}", t.broken);
    ensure!(t.new_failed.is_empty(), "{} of {} new connections failed: {:?}", t.new_failed.len(), new + t.new_failed.len() as u64, t.new_failed);
    ensure!(t.new_ok.len() == 2 * nodes as usize, "new connections reached only {:?}", t.new_ok.keys());
    Ok(t)
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

/// New connections from a demo pod to the `demo` ClusterIP reach every
/// endpoint.
fn every_endpoint_answers(lab: &Lab) -> Result<()> {
    let cip = e2e::cluster_ip(lab, "demo")?;
    let pods = e2e::pods(lab, "app=demo")?;
    let client = pods.first().context("no demo pod")?;
    let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
    eventually(SETTLE, || {
        let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 30)?;
        ensure!(got == want, "new connections: {got:?}, want {want:?}");
        Ok(())
    })
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

    s.check_mut("rollout restart ds/riptide-agent keeps ClusterIP and NodePort traffic", |lab| {
        roll_agents_under_traffic(lab, &["rollout", "restart", "ds/riptide-agent"])?;
        lab.wait_for_agents(Duration::from_secs(120))?;
        every_endpoint_answers(lab)
    });

    s.check_mut("set image ds/riptide-agent to the next build keeps ClusterIP and NodePort traffic", |lab| {
        let images = [format!("install-cni={}", lab::NEXT_IMAGE), format!("agent={}", lab::NEXT_IMAGE)];
        roll_agents_under_traffic(lab, &["set", "image", "ds/riptide-agent", &images[0], &images[1]])?;
        lab.wait_for_agents(Duration::from_secs(120))?;
        let v = e2e::kubectl_json(lab, &["-n", "riptide-system", "get", "pods", "-l", "app.kubernetes.io/name=riptide-agent"])?;
        for p in v["items"].as_array().into_iter().flatten() {
            let images: Vec<&str> = p["spec"]["containers"].as_array().into_iter().flatten().filter_map(|c| c["image"].as_str()).collect();
            ensure!(images == [lab::NEXT_IMAGE], "{} runs {images:?}", p["metadata"]["name"]);
        }
        every_endpoint_answers(lab)
    });

    s.check_mut("agent kill -9 in its pod: the kubelet restarts it, it adopts the pins", |lab| {
        let maps = pinned_map_ids(lab, 1)?;
        let revnat = revnat_ids(lab, 1)?;
        let (_, before) = agent_pods(lab)?.into_iter().find(|(n, _)| *n == lab.config().node_name(1)).context("no agent pod on node 1")?;
        lab.kill_agent(1)?;
        let pid = lab.start_agent(1)?;
        let (_, after) = agent_pods(lab)?.into_iter().find(|(n, _)| *n == lab.config().node_name(1)).context("no agent pod on node 1")?;
        ensure!(before == after, "the pod was replaced ({before} → {after}), not its container restarted");
        eventually(SETTLE, || {
            let st = e2e::agent_status(lab, 1)?;
            ensure!(st["ready"] == true, "{st}");
            Ok(())
        })?;
        ensure!(pinned_map_ids(lab, 1)? == maps, "pinned maps replaced after the crash");
        ensure!(revnat_ids(lab, 1)? == revnat, "reverse-NAT ids changed after the crash");
        // Both runs' logs, in order, from the kubelet's files.
        let log = lab.agent_log_tail(1, 10_000);
        ensure!(log.matches("datapath loaded").count() >= 2, "agent log of both runs:\n{log}");
        eprintln!("     {after}: agent restarted in place as pid {pid}, {} maps adopted", maps.len());
        every_endpoint_answers(lab)
    });

    s.check_mut("a node added later gets its agent pod, turns Ready and its pods are reachable", |lab| {
        let started = Instant::now();
        let i = lab.add_node()?;
        let c = lab.config().clone();
        let node = c.node_name(i);
        lab.wait_for_agents(Duration::from_secs(180))?;
        eprintln!("     {node} joined, got its agent pod and turned Ready in {:.1}s", started.elapsed().as_secs_f64());
        ensure!(agent_pods(lab)?.iter().any(|(n, _)| *n == node), "no agent pod on {node}: {:?}", agent_pods(lab)?);
        let conf = c.node_root(i).join("etc/cni/net.d/10-riptide.conflist");
        ensure!(conf.is_file(), "install-cni wrote no {}", conf.display());
        e2e::apply(lab, &e2e::netexec_pod(lab, "late", &node)?)?;
        let late = eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=late")?;
            ensure!(p.len() == 1 && p[0].ready, "pod late: {p:?}");
            Ok(p[0].clone())
        })?;
        let cidr = e2e::kubectl(lab, &["get", "node", &node, "-o", "jsonpath={.spec.podCIDR}"])?;
        let prefix = cidr.trim().rsplit_once('.').map(|(net, _)| format!("{net}.")).unwrap_or_default();
        ensure!(!prefix.is_empty() && late.ip.to_string().starts_with(&prefix), "pod late has {} outside {node}'s podCIDR {cidr:?}", late.ip);
        // From a pod on every other node, straight to the pod's address.
        for other in e2e::pods(lab, "app=demo")? {
            eventually(SETTLE, || {
                let got = e2e::pod_curl(lab, &other.name, &format!("http://{}:8080/hostname", late.ip), 3)?.ok()?;
                ensure!(got.trim() == "late", "{} on {} → late ({}): {got}", other.name, other.node, late.ip);
                Ok(())
            })?;
        }
        // And the new node serves Services: ClusterIP from its pod, its NodePort from outside.
        let cip = e2e::cluster_ip(lab, "demo")?;
        eventually(SETTLE, || e2e::pod_curl(lab, "late", &format!("http://{cip}/hostname"), 3)?.ok())?;
        eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{}:30080/hostname", c.node_ip(i)), 3)?.ok())?;
        e2e::kubectl(lab, &["delete", "pod", "late", "--wait=true", "--timeout=60s"])?;
        Ok(())
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
        for i in 1..=lab.config().nodes {
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
