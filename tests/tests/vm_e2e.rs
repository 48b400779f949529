//! The end-to-end checks with every lab node a VM (`tests/src/lab_vm.rs`):
//! each node its own 6.1 kernel (QEMU under TCG), kubelet and agent inside
//! it, the control plane on the host. riptide is installed as users do
//! (`manifests/riptide.yaml`: the DaemonSet's agent pod and its CNI init
//! container run in each guest; `RIPTIDE_LAB_INSTALL=hand-wired` for the
//! lab's own agents). ClusterIP from a pod and from a node, pod to pod
//! across nodes, NodePort from the outside namespace, and an agent killed
//! with SIGKILL and restarted (by its kubelet, from the manifest) under a
//! live NodePort connection.
//!
//! The same suite runs twice: on the bridged underlay with native routing
//! (`vm_e2e_services_on_vm_nodes`), and with each VM on its own link behind
//! the lab's router (`LabNet::routed`: no pod routes, pod-sourced packets
//! dropped) and `routing-mode: vxlan` (`vm_e2e_vxlan_on_a_routed_underlay`),
//! where it also checks that each node routes the other's podCIDR through
//! `riptide.vxlan` only and that cross-node pod-to-pod and ClusterIP
//! traffic raises the device's packet counters on both ends.
//!
//! Emulated guests are slow (minutes to boot a cluster), so this runs only
//! with `RIPTIDE_VM_E2E=1`, as root, after `cargo xtask run --vm` (or
//! `cargo xtask test --kernel 6.1`) has installed virtme-ng and unpacked a
//! kernel; `RIPTIDE_VM_KERNEL` picks another image.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_test_support::privileged;
use riptide_tests::{
    e2e::{self, KeepAlive, PodInfo, Suite, eventually},
    lab::{Install, Lab, LabConfig, LabNet},
    lab_vm::{self, VmTools},
    netns,
};

/// Two nodes: enough for every cross-node path, and what two host cores
/// emulate in reasonable time.
const NODES: u32 = 2;
/// Everything takes longer in an emulated guest.
const SETTLE: Duration = Duration::from_secs(180);
/// The agent's VXLAN device (`agent/src/tunnel.rs`).
const VXLAN: &str = "riptide.vxlan";

/// One VM cluster at a time: both tests name their lab after the process,
/// and two emulated clusters on two cores would only time each other out.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// curl from inside node `i`'s VM (in its node cgroup, where socket LB
/// applies): the body, or why it failed.
fn node_curl(lab: &Lab, i: u32, url: &str) -> Result<String> {
    let out = lab_vm::exec(&lab.config().node_dir(i), &["curl", "-sS", "-m", "5", url])?;
    ensure!(out.status == 0, "curl {url} in {}: exit {}: {}", lab.config().node_name(i), out.status, out.text().trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `argv` in node `i`'s VM: its stdout, or why it failed.
fn guest(lab: &Lab, i: u32, argv: &[&str]) -> Result<String> {
    let out = lab_vm::exec(&lab.config().node_dir(i), argv)?;
    ensure!(out.status == 0, "{} in {}: exit {}: {}", argv.join(" "), lab.config().node_name(i), out.status, out.text().trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `riptide -o json status` from node `i`'s agent, inside its VM.
fn agent_status(lab: &Lab, i: u32) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&guest(lab, i, &["riptide", "-o", "json", "status"])?)?)
}

fn agent_ready(lab: &Lab, i: u32) -> bool {
    agent_status(lab, i).is_ok_and(|s| s["ready"] == true)
}

/// Packets node `i`'s VXLAN device has sent and received (the kernel's
/// counters, in its VM).
fn vxlan_packets(lab: &Lab, i: u32) -> Result<(u64, u64)> {
    let dir = format!("/sys/class/net/{VXLAN}/statistics");
    let out = guest(lab, i, &["cat", &format!("{dir}/tx_packets"), &format!("{dir}/rx_packets")])?;
    let n: Vec<u64> = out.split_whitespace().map(str::parse).collect::<Result<_, _>>().context("parsing the counters")?;
    match n[..] {
        [tx, rx] => Ok((tx, rx)),
        _ => bail!("counters of {VXLAN} on node {i}: {out:?}"),
    }
}

/// Runs `f` (traffic from node `from` to node `to`, returning how many
/// TCP connections crossed) and checks that `from`'s VXLAN device sent,
/// and `to`'s received, at least 3 packets per crossing connection
/// meanwhile (SYN, request, FIN at the least): the traffic went through
/// the tunnel.
fn through_tunnel(lab: &Lab, from: u32, to: u32, f: impl FnOnce() -> Result<u64>) -> Result<()> {
    let (tx0, _) = vxlan_packets(lab, from)?;
    let (_, rx0) = vxlan_packets(lab, to)?;
    let crossed = f()?;
    let (tx1, _) = vxlan_packets(lab, from)?;
    let (_, rx1) = vxlan_packets(lab, to)?;
    let (sent, received, want) = (tx1.saturating_sub(tx0), rx1.saturating_sub(rx0), 3 * crossed);
    ensure!(crossed > 0, "no connection crossed from node {from} to node {to}");
    ensure!(
        sent >= want && received >= want,
        "{crossed} connections node {from} → node {to}: {VXLAN} sent {sent} packets on node {from}, received {received} on node {to}; want ≥ {want} each"
    );
    eprintln!("     node {from} → node {to}: {crossed} connections, {VXLAN} tx +{sent} on node {from}, rx +{received} on node {to}");
    Ok(())
}

/// Answers of `url` to `tries` curls from inside `pod`, in order (one
/// per line, failures left out).
fn answers_from_pod(lab: &Lab, pod: &str, url: &str, tries: u32) -> Result<Vec<String>> {
    let script = format!("for i in $(seq {tries}); do curl -sS -m 5 {url}; echo; done");
    let out = e2e::pod_exec(lab, pod, &["sh", "-c", &script])?;
    Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// A demo pod on node `i` and one elsewhere.
fn pod_pair(lab: &Lab, i: u32) -> Result<(PodInfo, PodInfo)> {
    let node = lab.config().node_name(i);
    let pods = e2e::pods(lab, "app=demo")?;
    let here = pods.iter().find(|p| p.node == node).with_context(|| format!("no demo pod on {node}: {pods:?}"))?;
    let there = pods.iter().find(|p| p.node != node).with_context(|| format!("no demo pod off {node}: {pods:?}"))?;
    Ok((here.clone(), there.clone()))
}

#[test]
fn vm_e2e_services_on_vm_nodes() {
    run_suite(LabNet::default());
}

#[test]
fn vm_e2e_vxlan_on_a_routed_underlay() {
    run_suite(LabNet { routed: true, tunnel: Some("vxlan".into()) });
}

fn run_suite(net: LabNet) {
    if std::env::var("RIPTIDE_VM_E2E").as_deref() != Ok("1") {
        eprintln!(
            "skipped: the VM lab e2e boots {NODES} emulated VMs (several minutes); set RIPTIDE_VM_E2E=1 to run it"
        );
        return;
    }
    if !privileged("for network namespaces, tap devices and QEMU") {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    let tools = VmTools::from_cache(std::env::var_os("RIPTIDE_VM_KERNEL").map(PathBuf::from)).expect("virtme-ng and a kernel");
    let install = Install::from_env().expect("RIPTIDE_LAB_INSTALL");
    let tunnel = net.tunnel.is_some();
    let mut lab = Lab::up_with(LabConfig::for_test(NODES).expect("config"), net.clone()).expect("lab up");
    let started = std::time::Instant::now();
    if let Err(e) = lab_vm::start_cluster(&mut lab, &tools, install, Duration::from_secs(900)) {
        panic!("VM cluster ({install:?}, {net:?}): {e:#}");
    }
    eprintln!("     {NODES} VM nodes Ready after {:.0}s ({install:?}, {net:?})", started.elapsed().as_secs_f64());
    lab.deploy_demo().expect("demo");
    let mut s = Suite::new(&mut lab);

    s.check("every node runs its own kernel", |lab| {
        for i in 1..=NODES {
            let out = lab_vm::exec(&lab.config().node_dir(i), &["uname", "-r"])?;
            let release = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let host = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
            ensure!(out.status == 0 && release != host.trim(), "node {i} runs {release:?}, the host {:?}", host.trim());
            eprintln!("     {}: kernel {release}", lab.config().node_name(i));
        }
        Ok(())
    });

    if install == Install::Manifest {
        s.check("the DaemonSet's agent pod runs in every guest, its CNI files in the guest only", |lab| {
            let out = lab.kubectl().args(["-n", "riptide-system", "get", "pods", "-o", "json"]).output()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("kubectl get pods")?;
            let c = lab.config().clone();
            for i in 1..=NODES {
                let node = c.node_name(i);
                let pods: Vec<&serde_json::Value> =
                    v["items"].as_array().into_iter().flatten().filter(|p| p["spec"]["nodeName"] == node.as_str()).collect();
                ensure!(pods.len() == 1 && pods[0]["status"]["phase"] == "Running", "{node}: agent pods {pods:?}");
                let ls = lab_vm::exec(&c.node_dir(i), &["ls", "/var/lib/riptide-vm/root/etc/cni/net.d", "/var/lib/riptide-vm/root/opt/cni/bin"])?;
                let listed = ls.text();
                ensure!(ls.status == 0 && listed.contains("riptide"), "{node}: the guest's CNI dirs: {listed}");
                ensure!(!c.node_root(i).join("etc/cni").exists(), "{node}: install-cni wrote on the host");
                ensure!(agent_ready(lab, i), "{node}: riptide status in the guest");
                eprintln!("     {node}: {} ready, CNI dirs: {}", pods[0]["metadata"]["name"], listed.split_whitespace().collect::<Vec<_>>().join(" "));
            }
            Ok(())
        });
    }

    s.check("demo pods run on both nodes", |lab| {
        let pods = eventually(SETTLE * 2, || {
            let p = e2e::pods(lab, "app=demo")?;
            ensure!(p.len() == 3 && p.iter().all(|p| p.ready), "pods: {p:?}");
            Ok(p)
        })?;
        let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
        ensure!(nodes.len() == NODES as usize, "replicas not spread: {pods:?}");
        Ok(())
    });

    if tunnel {
        s.check("routed underlay: the router knows no pod CIDR, each node the other's through riptide.vxlan only", |lab| {
            let c = lab.config().clone();
            let mut router = netns::command(&c.underlay_netns(), "ip")?;
            let router = router.arg("route").output().context("ip route in the underlay")?;
            let router = String::from_utf8_lossy(&router.stdout);
            ensure!(!router.contains("10.42."), "the router must not know pod CIDRs:\n{router}");
            for i in 1..=NODES {
                let (here, there) = pod_pair(lab, i)?;
                let j = c.node_index(&there.node).context("the other pod's node")?;
                // Native routing's route is refused: the other node is not
                // on-link for this one.
                let native = lab_vm::exec(&c.node_dir(i), &["ip", "route", "add", "10.42.250.0/24", "via", &c.node_ip(j).to_string()])?;
                ensure!(native.status != 0, "node {j} is on-link for node {i}: the underlay is not routed");
                eventually(SETTLE, || {
                    let st = agent_status(lab, i)?;
                    ensure!(st["routing_mode"] == "vxlan", "node {i}: {st}");
                    let peers = st["tunnel_peers"].as_array().context("tunnel_peers")?;
                    ensure!(
                        peers.len() == 1 && peers[0].as_str().is_some_and(|p| p.contains(&format!("dev {VXLAN}"))),
                        "node {i}: tunnel peers {peers:?}"
                    );
                    ensure!(
                        st["attachments"].as_array().is_some_and(|a| a.iter().any(|x| *x == format!("tunnel:{VXLAN}").as_str())),
                        "node {i}: no programs on {VXLAN}: {st}"
                    );
                    let route = guest(lab, i, &["ip", "-o", "route", "get", &there.ip.to_string()])?;
                    ensure!(route.contains(&format!("dev {VXLAN}")), "node {i} → {}: {route}", there.ip);
                    Ok(())
                })?;
                let node = e2e::kubectl_json(lab, &["get", "node", &there.node])?;
                let cidr = node["spec"]["podCIDR"].as_str().with_context(|| format!("{} has no podCIDR", there.node))?;
                let routes = guest(lab, i, &["ip", "-o", "route", "show", "table", "all"])?;
                let to_peer: Vec<&str> = routes.lines().filter(|l| l.starts_with(&format!("{cidr} "))).collect();
                ensure!(
                    !to_peer.is_empty() && to_peer.iter().all(|l| l.contains(&format!("dev {VXLAN}"))),
                    "node {i}: routes to {cidr} ({}) not all through {VXLAN}:\n{routes}",
                    there.node
                );
                let link = e2e::pod_exec(lab, &here.name, &["ip", "-o", "link", "show", "eth0"])?;
                ensure!(link.contains(" mtu 1450 "), "{}: eth0 leaves no room for VXLAN's 50 bytes: {link}", here.name);
                eprintln!("     node {i}: {}", to_peer.join(" | "));
            }
            Ok(())
        });

        s.check("cross-node pod to pod and ClusterIP go through riptide.vxlan", |lab| {
            let c = lab.config().clone();
            let cip = e2e::cluster_ip(lab, "demo")?;
            for i in 1..=NODES {
                let (here, there) = pod_pair(lab, i)?;
                let j = c.node_index(&there.node).context("the other pod's node")?;
                let url = format!("http://{}:8080/hostname", there.ip);
                eventually(SETTLE, || e2e::pod_curl(lab, &here.name, &url, 5)?.ok())?;
                through_tunnel(lab, i, j, || {
                    let got = answers_from_pod(lab, &here.name, &url, 10)?;
                    ensure!(got.len() == 10 && got.iter().all(|h| *h == there.name), "{} → {url}: {got:?}", here.name);
                    Ok(10)
                })
                .with_context(|| format!("pod to pod, {} → {}", here.name, there.name))?;
                let remote: BTreeSet<String> =
                    e2e::pods(lab, "app=demo")?.into_iter().filter(|p| p.node == there.node).map(|p| p.name).collect();
                through_tunnel(lab, i, j, || {
                    let got = answers_from_pod(lab, &here.name, &format!("http://{cip}/hostname"), 20)?;
                    ensure!(got.len() == 20, "{} → {cip}: {got:?}", here.name);
                    Ok(got.iter().filter(|h| remote.contains(*h)).count() as u64)
                })
                .with_context(|| format!("ClusterIP {cip} from {}", here.name))?;
            }
            Ok(())
        });
    }

    s.check("pod to pod across nodes, without NAT", |lab| {
        let pods = e2e::pods(lab, "app=demo")?;
        for a in &pods {
            for b in pods.iter().filter(|b| b.node != a.node) {
                let url = format!("http://{}:8080/clientip", b.ip);
                let seen = eventually(SETTLE, || e2e::pod_curl(lab, &a.name, &url, 5)?.ok())?;
                ensure!(seen.starts_with(&format!("{}:", a.ip)), "{} → {}: backend saw {seen}", a.name, b.name);
            }
        }
        Ok(())
    });

    s.check("ClusterIP from a pod reaches every endpoint", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        let client = pods.first().context("no demo pod")?;
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 20)?;
            ensure!(got == want, "hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.check("ClusterIP from each node (socket LB in the guest's cgroup)", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        for i in 1..=NODES {
            let host = eventually(SETTLE, || node_curl(lab, i, &format!("http://{cip}/hostname")))?;
            eprintln!("     node {i} → {cip}: {host}");
        }
        Ok(())
    });

    s.check("NodePort from outside on every node reaches every endpoint", |lab| {
        let c = lab.config().clone();
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        for i in 1..=NODES {
            let url = format!("http://{}:30080/hostname", c.node_ip(i));
            eventually(SETTLE, || {
                let mut got = BTreeSet::new();
                for _ in 0..20 {
                    got.insert(e2e::outside_curl(lab, &url, 5)?.ok()?);
                }
                ensure!(got == want, "{url}: hostnames {got:?}, want {want:?}");
                Ok(())
            })?;
        }
        Ok(())
    });

    s.check_mut("agent kill -9 and restart under a live NodePort connection", |lab| {
        let c = lab.config().clone();
        let netexec = c.bin_dir.join("riptide-netexec");
        let np = format!("{}:30080", c.node_ip(1));
        // A connection through node 1 to a backend on node 2: DNAT, SNAT
        // and conntrack on node 1 that must outlive its agent.
        let pods = e2e::pods(lab, "app=demo")?;
        let mut found = None;
        for _ in 0..30 {
            let mut cmd = netns::command(&c.outside_netns(), &netexec)?;
            cmd.args(["--keepalive-client", &np]);
            let mut k = KeepAlive::open(&format!("outside → {np}"), cmd)?;
            let host = k.get("/hostname")?;
            if pods.iter().any(|p| p.name == host && p.node != c.node_name(1)) {
                found = Some((k, host));
                break;
            }
        }
        let (mut k, backend) = found.context("30 NodePort connections all stayed on node 1")?;
        let seen = k.get("/clientip")?;
        let mut exchange = |tag: &str| -> Result<()> {
            let echo = k.get(&format!("/echo?msg={tag}"))?;
            ensure!(echo == tag, "echo {tag} answered {echo}");
            let host = k.get("/hostname")?;
            ensure!(host == backend, "the connection now reaches {host}, it started on {backend}");
            Ok(())
        };
        exchange("before")?;
        let vxlan_ifindexes = |lab: &Lab| -> Result<Vec<String>> {
            (1..=NODES).map(|i| guest(lab, i, &["cat", &format!("/sys/class/net/{VXLAN}/ifindex")]).map(|s| s.trim().to_owned())).collect()
        };
        let devices = if tunnel { vxlan_ifindexes(lab)? } else { Vec::new() };
        for i in 1..=NODES {
            lab_vm::kill_agent(&c, i)?;
        }
        eprintln!("     killed every agent (SIGKILL)");
        let dead = exchange("agents-dead").err();
        for i in 1..=NODES {
            lab_vm::start_agent(&c, i)?;
        }
        let t = std::time::Instant::now();
        while !(1..=NODES).all(|i| agent_ready(lab, i)) {
            if let Some((label, st)) = lab.exited().into_iter().next() {
                bail!("{label} exited ({st}) after the restart:\n{}", lab.log_tail(&label, 30));
            }
            ensure!(t.elapsed() < SETTLE, "restarted agents not ready after {SETTLE:?}:\n{}", lab_vm::guest_logs(&c));
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!("     agents ready again after {:.0}s", t.elapsed().as_secs_f64());
        if let Some(e) = dead {
            return Err(e.context("while the agents were dead"));
        }
        exchange("after")?;
        let now = k.get("/clientip")?;
        ensure!(now == seen, "backend saw {seen} before, {now} after");
        if tunnel {
            let after = vxlan_ifindexes(lab)?;
            ensure!(after == devices, "the restarted agents recreated {VXLAN} (ifindex {devices:?} → {after:?})");
        }
        drop(k);
        let cip = e2e::cluster_ip(lab, "demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        let client = pods.first().context("no demo pod")?;
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 20)?;
            ensure!(got == want, "after the restart: hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.finish();
    drop(lab);
}
