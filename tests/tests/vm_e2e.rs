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
//! Emulated guests are slow (minutes to boot a cluster), so this runs only
//! with `RIPTIDE_VM_E2E=1`, as root, after `cargo xtask run --vm` (or
//! `cargo xtask test --kernel 6.1`) has installed virtme-ng and unpacked a
//! kernel; `RIPTIDE_VM_KERNEL` picks another image.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_test_support::privileged;
use riptide_tests::{
    e2e::{self, KeepAlive, Suite, eventually},
    lab::{Install, Lab, LabConfig},
    lab_vm::{self, VmTools},
    netns,
};

/// Two nodes: enough for every cross-node path, and what two host cores
/// emulate in reasonable time.
const NODES: u32 = 2;
/// Everything takes longer in an emulated guest.
const SETTLE: Duration = Duration::from_secs(180);

/// curl from inside node `i`'s VM (in its node cgroup, where socket LB
/// applies): the body, or why it failed.
fn node_curl(lab: &Lab, i: u32, url: &str) -> Result<String> {
    let out = lab_vm::exec(&lab.config().node_dir(i), &["curl", "-sS", "-m", "5", url])?;
    ensure!(out.status == 0, "curl {url} in {}: exit {}: {}", lab.config().node_name(i), out.status, out.text().trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `riptide -o json status` from node `i`'s agent, inside its VM.
fn agent_ready(lab: &Lab, i: u32) -> bool {
    lab_vm::exec(&lab.config().node_dir(i), &["riptide", "-o", "json", "status"])
        .ok()
        .filter(|o| o.status == 0)
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|s| s["ready"] == true)
}

#[test]
fn vm_e2e_services_on_vm_nodes() {
    if std::env::var("RIPTIDE_VM_E2E").as_deref() != Ok("1") {
        eprintln!(
            "skipped: the VM lab e2e boots {NODES} emulated VMs (several minutes); set RIPTIDE_VM_E2E=1 to run it"
        );
        return;
    }
    if !privileged("for network namespaces, tap devices and QEMU") {
        return;
    }
    let tools = VmTools::from_cache(std::env::var_os("RIPTIDE_VM_KERNEL").map(PathBuf::from)).expect("virtme-ng and a kernel");
    let install = Install::from_env().expect("RIPTIDE_LAB_INSTALL");
    let mut lab = Lab::up(LabConfig::for_test(NODES).expect("config")).expect("lab up");
    let started = std::time::Instant::now();
    if let Err(e) = lab_vm::start_cluster(&mut lab, &tools, install, Duration::from_secs(900)) {
        panic!("VM cluster ({install:?}): {e:#}");
    }
    eprintln!("     {NODES} VM nodes Ready after {:.0}s ({install:?})", started.elapsed().as_secs_f64());
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
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &format!("http://{cip}/hostname"), 20)?;
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
        drop(k);
        let cip = e2e::cluster_ip(lab, "demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &format!("http://{cip}/hostname"), 20)?;
            ensure!(got == want, "after the restart: hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.finish();
    drop(lab);
}
