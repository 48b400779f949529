//! End to end, real processes in real namespaces: the control plane
//! (`riptide-controlplane control-plane`: apiserver + controllers +
//! scheduler) in its own netns that also holds the underlay bridge, three
//! kubelets each in a node netns on that underlay, riptide-cni as the CNI
//! with each node's datapath pinned, and real kubectl. Nothing touches the
//! root network namespace; everything is removed on drop (also on panic).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

mod common;

use common::kubectl::{Kubectl, kill_pod_cgroups, log_tail, wait_for};
use riptide_test_support::cgroup::tree_pids;
use serde_json::Value;
use riptide_test_support::{
    ip,
    netns::{command as cmd_in, run_in as in_netns},
    privileged,
};

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_riptide-controlplane")).parent().unwrap().to_path_buf()
}

/// A workspace binary next to ours, built on demand (same target dir).
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    riptide_test_support::workspace_bin(&bin_dir(), package, bin)
}

fn http_get(netns: &str, ip: &str, port: u16, path: &str) -> Option<String> {
    let (ip, path) = (ip.to_string(), path.to_string());
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&format!("{ip}:{port}").parse().ok()?, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    })
}

struct Cluster {
    prefix: String,
    subnet: u8,
    dir: tempfile::TempDir,
    cp: Child,
    kubelets: Vec<Option<Child>>,
    kubeconfig: PathBuf,
    nodes: Vec<String>,
    cgroup: PathBuf,
}

impl Cluster {
    fn cp_ns(&self) -> String {
        format!("{}-cp", self.prefix)
    }
    fn node_ip(&self, i: usize) -> String {
        format!("198.18.{}.{}", self.subnet, 11 + i)
    }
    fn node_cgroup(&self, i: usize) -> PathBuf {
        self.cgroup.join(&self.nodes[i])
    }
    fn root_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("kubelet-{}", self.nodes[i]))
    }
    fn cni_state(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("cni-state-{}", self.nodes[i]))
    }
    /// The node resolver configuration kubelets get (`--resolv-conf`).
    fn node_resolv_conf(&self) -> PathBuf {
        self.dir.path().join("node-resolv.conf")
    }

    fn up() -> Self {
        Self::up_tagged("")
    }

    /// A cluster whose names carry `tag` too, so two tests of this binary
    /// can run at once.
    fn up_tagged(tag: &str) -> Self {
        let pid = std::process::id();
        let prefix = format!("rtw{}{tag}", pid % 100_000);
        let subnet = 128 + (pid % 100) as u8;
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<String> = (1..=3).map(|i| format!("{prefix}-n{i}")).collect();
        let cgroup = PathBuf::from("/sys/fs/cgroup/unified").join(&prefix);
        let cp_ns = format!("{prefix}-cp");
        // Leftovers of a crashed run with the same pid.
        let _ = Command::new("ip").args(["netns", "del", &cp_ns]).stderr(Stdio::null()).status();
        for n in &nodes {
            let _ = Command::new("ip").args(["netns", "del", n]).stderr(Stdio::null()).status();
        }
        ip(&["netns", "add", &cp_ns]);
        let mut c = Cluster {
            prefix,
            subnet,
            dir,
            cp: Command::new("true").spawn().unwrap(),
            kubelets: Vec::new(),
            kubeconfig: PathBuf::new(),
            nodes,
            cgroup,
        };
        ip(&["-n", &cp_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &cp_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &cp_ns, "addr", "add", &format!("198.18.{subnet}.1/24"), "dev", "br0"]);
        ip(&["-n", &cp_ns, "link", "set", "br0", "up"]);
        for (i, n) in c.nodes.clone().iter().enumerate() {
            ip(&["netns", "add", n]);
            ip(&["link", "add", "eth0", "netns", n, "type", "veth", "peer", "name", &format!("p{i}"), "netns", &cp_ns]);
            ip(&["-n", &cp_ns, "link", "set", &format!("p{i}"), "master", "br0", "up"]);
            ip(&["-n", n, "addr", "add", &format!("{}/24", c.node_ip(i)), "dev", "eth0"]);
            ip(&["-n", n, "link", "set", "eth0", "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
            let st = cmd_in(n, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]).status().unwrap();
            assert!(st.success());
            std::fs::create_dir_all(c.node_cgroup(i)).unwrap();
            riptide_datapath::Datapath::load(&riptide_datapath::Pinning::Node(n.clone())).expect("loading node datapath");
        }
        c.start_control_plane();
        c
    }

    fn start_control_plane(&mut self) {
        let data = self.dir.path().join("cp");
        let log = File::create(self.dir.path().join("control-plane.log")).unwrap();
        let mut child = cmd_in(&self.cp_ns(), env!("CARGO_BIN_EXE_riptide-controlplane"))
            .args([
                "control-plane",
                "--data-dir", data.to_str().unwrap(),
                "--listen", &format!("198.18.{}.1:0", self.subnet),
                "--tls-san", &format!("198.18.{}.1", self.subnet),
                "--node-monitor-grace-period", "8s",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        self.cp = child;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(p) = line.strip_prefix("kubeconfig ") {
                self.kubeconfig = PathBuf::from(p);
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        assert!(self.kubeconfig.exists(), "control plane wrote no kubeconfig:\n{}", self.log("control-plane"));
    }

    fn start_kubelet(&mut self, i: usize) {
        let n = self.nodes[i].clone();
        let cni_bin = self.dir.path().join("cni-bin");
        if !cni_bin.exists() {
            std::fs::create_dir_all(&cni_bin).unwrap();
            std::os::unix::fs::symlink(workspace_bin("riptide-cni", "riptide-cni"), cni_bin.join("riptide")).unwrap();
        }
        let conf_dir = self.dir.path().join(format!("cni-conf-{n}"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.1.0", "name": "riptide",
            "plugins": [{"type": "riptide", "nodeName": n,
                          "podCIDRFile": self.dir.path().join(format!("podcidr-{n}")),
                          "stateDir": self.cni_state(i)}]
        });
        std::fs::write(conf_dir.join("10-riptide.conflist"), conflist.to_string()).unwrap();
        std::fs::write(self.node_resolv_conf(), NODE_RESOLV_CONF).unwrap();
        let log = File::options().create(true).append(true).open(self.dir.path().join(format!("kubelet-{n}.log"))).unwrap();
        // The node's own identity (system:node:<n>) and its API's serving
        // certificate, from the control plane's CA.
        let pki = riptide_controlplane::apiserver::tls::Pki::load(&self.dir.path().join("cp").join("pki")).unwrap();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let server = kc.clusters[0].cluster.as_ref().and_then(|c| c.server.clone()).unwrap();
        let creds = riptide_controlplane::credentials::write_kubelet(&pki, &server, &n, &self.node_ip(i), &self.dir.path().join(format!("creds-{n}"))).unwrap();
        let child = cmd_in(&n, env!("CARGO_BIN_EXE_riptide-controlplane"))
            .args([
                "kubelet",
                "--node-name", &n,
                "--node-ip", &self.node_ip(i),
                "--kubeconfig", creds.kubeconfig.to_str().unwrap(),
                "--tls-cert-file", creds.cert.to_str().unwrap(),
                "--tls-private-key-file", creds.key.to_str().unwrap(),
                "--client-ca-file", creds.ca.to_str().unwrap(),
                "--cni-conf-dir", conf_dir.to_str().unwrap(),
                "--cni-bin-dir", cni_bin.to_str().unwrap(),
                "--cgroup-root", self.node_cgroup(i).to_str().unwrap(),
                "--root-dir", self.root_dir(i).to_str().unwrap(),
                "--restart-backoff", "1s",
                "--heartbeat-interval", "2s",
                "--cpu", "2",
                "--memory", "4Gi",
                "--cluster-dns", "10.43.0.10",
                "--cluster-domain", "cluster.local",
                "--resolv-conf", self.node_resolv_conf().to_str().unwrap(),
            ])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        if self.kubelets.len() <= i {
            self.kubelets.resize_with(i + 1, || None);
        }
        self.kubelets[i] = Some(child);
    }

    fn stop_kubelet(&mut self, i: usize, sig: i32) {
        if let Some(mut k) = self.kubelets[i].take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(k.id() as i32, sig) };
            let _ = k.wait();
        }
    }

    fn log(&self, name: &str) -> String {
        log_tail(&self.dir.path().join(format!("{name}.log")))
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        s += &format!("--- pods\n{}\n", self.kubectl_raw(&["get", "pods", "-A", "-o", "wide"], None).1);
        s += &format!("--- nodes\n{}\n", self.kubectl_raw(&["get", "nodes", "-o", "wide"], None).1);
        s += &format!("--- events\n{}\n", self.kubectl_raw(&["get", "events", "-A"], None).1);
        s += &format!("--- control plane\n{}\n", self.log("control-plane"));
        for n in &self.nodes {
            s += &format!("--- kubelet {n}\n{}\n", self.log(&format!("kubelet-{n}")));
        }
        s
    }

    fn kubectl_raw(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        Kubectl { kubeconfig: self.kubeconfig.clone(), cache_dir: self.dir.path().join("kcache"), netns: Some(self.cp_ns()) }.raw(args, stdin)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let (ok, out) = self.kubectl_raw(args, None);
        assert!(ok, "kubectl {}: {out}\n{}", args.join(" "), self.diagnostics());
        out
    }

    fn apply(&self, yaml: &str) {
        let (ok, out) = self.kubectl_raw(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "kubectl apply: {out}\n{}", self.diagnostics());
    }

    fn json(&self, args: &[&str]) -> Value {
        Kubectl { kubeconfig: self.kubeconfig.clone(), cache_dir: self.dir.path().join("kcache"), netns: Some(self.cp_ns()) }.json(args)
    }

    /// Polls `f` until it returns Some, or fails with what it saw.
    fn wait<T>(&self, what: &str, secs: u64, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        wait_for(what, secs, || f(self), || self.diagnostics())
    }

    /// Pods with label `sel`, not terminating.
    fn pods(&self, sel: &str) -> Vec<Value> {
        let v = self.json(&["get", "pods", "-l", sel]);
        v["items"].as_array().cloned().unwrap_or_default().into_iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).collect()
    }

    fn node_cidr(&self, node: &str) -> String {
        self.json(&["get", "node", node])["spec"]["podCIDR"].as_str().unwrap_or_default().to_string()
    }

    fn node_index(&self, node: &str) -> usize {
        self.nodes.iter().position(|n| n == node).unwrap()
    }

    fn pod_cgroup(&self, p: &Value) -> PathBuf {
        let node = p["spec"]["nodeName"].as_str().unwrap();
        self.node_cgroup(self.node_index(node)).join(format!("pod-{}", p["metadata"]["uid"].as_str().unwrap()))
    }

    /// Process pids of a pod, from its cgroup and its containers'.
    fn pod_pids(&self, p: &Value) -> Vec<u32> {
        tree_pids(&self.pod_cgroup(p))
    }

    /// Nothing of a deleted pod is left: process, netns, cgroup, IP.
    fn assert_pod_gone(&self, p: &Value, pids: &[u32]) {
        let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
        let node = self.node_index(p["spec"]["nodeName"].as_str().unwrap());
        let state = self.cni_state(node);
        self.wait(&format!("pod {uid} to leave nothing behind"), 30, |c| {
            let netns = Path::new("/run/netns").join(format!("{}-pod-{uid}", c.nodes[node])).exists();
            let cg = c.pod_cgroup(p).exists();
            let procs = pids.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists() && !zombie(*pid));
            let ip_reserved = walk(&state).iter().any(|f| std::fs::read_to_string(f).unwrap_or_default().contains(&uid));
            (!netns && !cg && !procs && !ip_reserved).then_some(())
        });
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))).unwrap_or(true)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.kubelets.len() {
            self.stop_kubelet(i, libc::SIGKILL);
        }
        // Pods' pinned mount namespaces, so the temporary directory can go.
        for i in 0..self.nodes.len() {
            let _ = riptide_controlplane::kubelet::mntns::release_all(&self.root_dir(i));
        }
        let _ = self.cp.kill();
        let _ = self.cp.wait();
        // Pod processes and their cgroups, pod netns (named by the uids the
        // kubelets recorded), nodes, underlay, pins.
        for i in 0..self.nodes.len() {
            // Pod netns are named `<node>-pod-<uid>`.
            if let Ok(rd) = std::fs::read_dir("/run/netns") {
                let prefix = format!("{}-pod-", self.nodes[i]);
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix) {
                        let _ = Command::new("ip").args(["netns", "del", &name]).status();
                    }
                }
            }
            kill_pod_cgroups(&self.node_cgroup(i));
            let _ = std::fs::remove_dir(self.node_cgroup(i));
            let _ = Command::new("ip").args(["netns", "del", &self.nodes[i]]).status();
            let _ = riptide_datapath::unpin_node(&self.nodes[i]);
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = Command::new("ip").args(["netns", "del", &self.cp_ns()]).status();
    }
}

fn ready_pods_on_distinct_nodes(c: &Cluster, sel: &str, n: usize) -> Option<Vec<Value>> {
    let pods = c.pods(sel);
    let ready = |p: &Value| {
        p["status"]["phase"] == "Running"
            && p["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|x| x["type"] == "Ready" && x["status"] == "True"))
    };
    if pods.len() != n || !pods.iter().all(ready) {
        return None;
    }
    let mut nodes: Vec<&str> = pods.iter().filter_map(|p| p["spec"]["nodeName"].as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    (nodes.len() == n).then_some(pods)
}

/// Endpoint IPs of a Service's slices that are ready.
fn ready_endpoints(c: &Cluster, svc: &str) -> Vec<String> {
    let v = c.json(&["get", "endpointslices", "-l", &format!("kubernetes.io/service-name={svc}")]);
    let mut out: Vec<String> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true)
        .filter_map(|e| e["addresses"][0].as_str().map(String::from))
        .collect();
    out.sort();
    out
}

fn pod_ips(pods: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = pods.iter().filter_map(|p| p["status"]["podIP"].as_str().map(String::from)).collect();
    v.sort();
    v
}

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (ip, net): (Ipv4Addr, Ipv4Addr) = (ip.parse().unwrap(), net.parse().unwrap());
    let mask = u32::MAX << (32 - len.parse::<u32>().unwrap());
    u32::from(ip) & mask == u32::from(net) & mask
}

#[test]
fn netns_deployment_service_scheduler_kubelet_end_to_end() {
    if !privileged("for network namespaces, cgroups and eBPF") {
        return;
    }
    let netexec = workspace_bin("riptide-tests", "riptide-netexec");
    let mut c = Cluster::up();
    for i in 0..3 {
        c.start_kubelet(i);
    }

    // Nodes register, get Ready and one /24 each.
    let cidrs = c.wait("3 Ready nodes with pod CIDRs", 60, |c| {
        let v = c.json(&["get", "nodes"]);
        let items = v["items"].as_array()?.clone();
        let ready = items.iter().filter(|n| {
            n["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|x| x["type"] == "Ready" && x["status"] == "True"))
                && n["spec"]["podCIDR"].as_str().is_some()
        });
        let mut cidrs: Vec<String> = ready.map(|n| n["spec"]["podCIDR"].as_str().unwrap().to_string()).collect();
        cidrs.sort();
        cidrs.dedup();
        (cidrs.len() == 3).then_some(cidrs)
    });
    assert!(cidrs.iter().all(|c| c.starts_with("10.42.") && c.ends_with(".0/24")), "{cidrs:?}");

    // kubectl create deployment + expose.
    c.kubectl(&[
        "create", "deployment", "web", "--image=riptide/netexec", "--replicas=3", "--",
        netexec.to_str().unwrap(), "--http-port=8080", "--udp-port=0",
    ]);
    let pods = c.wait("3 web pods Ready on 3 nodes", 90, |c| ready_pods_on_distinct_nodes(c, "app=web", 3));
    for p in &pods {
        let node = p["spec"]["nodeName"].as_str().unwrap();
        let pip = p["status"]["podIP"].as_str().unwrap();
        assert!(in_cidr(pip, &c.node_cidr(node)), "pod IP {pip} outside {node}'s {}", c.node_cidr(node));
        // The process answers on the pod IP from its node, with the pod
        // name as hostname (own UTS namespace).
        let name = p["metadata"]["name"].as_str().unwrap();
        let host = c.wait(&format!("{name} to answer /hostname"), 20, |_| http_get(node, pip, 8080, "/hostname"));
        assert_eq!(host.trim(), name);
        assert!(!c.pod_pids(p).is_empty(), "pod {name} has no process in its cgroup");
    }
    c.kubectl(&["expose", "deployment", "web", "--port=80", "--target-port=8080"]);
    let want = pod_ips(&pods);
    c.wait("EndpointSlice with the 3 ready pods", 30, |c| (ready_endpoints(c, "web") == want).then_some(()));
    let slice = &c.json(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web"])["items"][0];
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"], "endpointslice-controller.k8s.io");
    assert_eq!(slice["ports"][0]["port"], 8080);
    for e in slice["endpoints"].as_array().unwrap() {
        assert!(e["nodeName"].as_str().is_some_and(|n| c.nodes.iter().any(|x| x == n)), "{e}");
        assert_eq!(e["targetRef"]["kind"], "Pod");
        assert_eq!(e["conditions"]["serving"], true);
        assert_eq!(e["conditions"]["terminating"], false);
    }
    let ep = c.json(&["get", "endpoints", "web"]);
    assert_eq!(ep["subsets"][0]["addresses"].as_array().map(Vec::len), Some(3), "{ep}");

    // Scale to 1 and back to 3.
    c.kubectl(&["scale", "deployment", "web", "--replicas=1"]);
    let one = c.wait("1 web pod and 1 endpoint", 60, |c| {
        let p = c.pods("app=web");
        (p.len() == 1 && ready_endpoints(c, "web").len() == 1).then_some(p)
    });
    for p in pods.iter().filter(|p| p["metadata"]["uid"] != one[0]["metadata"]["uid"]) {
        c.assert_pod_gone(p, &[]);
    }
    c.kubectl(&["scale", "deployment", "web", "--replicas=3"]);
    let pods = c.wait("3 web pods again, spread", 90, |c| ready_pods_on_distinct_nodes(c, "app=web", 3));
    c.wait("3 endpoints again", 30, |c| (ready_endpoints(c, "web") == pod_ips(&pods)).then_some(()));

    // A deleted pod is replaced, and leaves nothing behind.
    let victim = pods[0].clone();
    let pids = c.pod_pids(&victim);
    c.kubectl(&["delete", "pod", victim["metadata"]["name"].as_str().unwrap(), "--wait=true", "--timeout=60s"]);
    c.assert_pod_gone(&victim, &pids);
    let pods = c.wait("replacement pod", 90, |c| {
        ready_pods_on_distinct_nodes(c, "app=web", 3).filter(|ps| ps.iter().all(|p| p["metadata"]["uid"] != victim["metadata"]["uid"]))
    });

    // A killed container is restarted in place (restartPolicy Always).
    let p = &pods[1];
    let name = p["metadata"]["name"].as_str().unwrap().to_string();
    let pids = c.pod_pids(p);
    for pid in &pids {
        // SAFETY: kill(2) on a process of a pod this test created.
        unsafe { libc::kill(i32::try_from(*pid).unwrap(), libc::SIGKILL) };
    }
    c.wait("restartCount 1 and Ready again", 60, |c| {
        let v = c.json(&["get", "pod", &name]);
        let cs = &v["status"]["containerStatuses"][0];
        (cs["restartCount"].as_i64() >= Some(1) && cs["ready"] == true && cs["lastState"]["terminated"]["exitCode"] == 137).then_some(())
    });
    assert_ne!(c.pod_pids(p), pids, "same process after a kill");

    // Rolling update, then undo.
    c.kubectl(&["set", "env", "deployment/web", "ROLL=2"]);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    let rs = c.json(&["get", "rs", "-l", "app=web"]);
    let revs: Vec<(String, i64, i64)> = rs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metadata"]["name"].as_str().unwrap().to_string(),
                r["metadata"]["annotations"]["deployment.kubernetes.io/revision"].as_str().unwrap().parse().unwrap(),
                r["spec"]["replicas"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(revs.len(), 2, "{revs:?}");
    let first_rs = revs.iter().find(|r| r.1 == 1).expect("revision 1").0.clone();
    assert!(revs.iter().any(|r| r.1 == 2 && r.2 == 3) && revs.iter().any(|r| r.1 == 1 && r.2 == 0), "{revs:?}");
    c.wait("3 pods of revision 2", 60, |c| {
        let ps = ready_pods_on_distinct_nodes(c, "app=web", 3)?;
        ps.iter().all(|p| p["spec"]["containers"][0]["env"][0]["name"] == "ROLL").then_some(())
    });
    let history = c.kubectl(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    c.kubectl(&["rollout", "undo", "deployment/web"]);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    let back = c.json(&["get", "rs", &first_rs]);
    assert_eq!(back["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3", "{back}");
    assert_eq!(back["spec"]["replicas"], 3);
    let dep = c.json(&["get", "deployment", "web"]);
    assert_eq!(dep["status"]["updatedReplicas"], 3, "{dep}");
    assert_eq!(dep["status"]["availableReplicas"], 3, "{dep}");
    c.wait("endpoints follow the rollback", 60, |c| {
        let ps = ready_pods_on_distinct_nodes(c, "app=web", 3)?;
        (ps.iter().all(|p| p["spec"]["containers"][0]["env"].is_null()) && ready_endpoints(c, "web") == pod_ips(&ps)).then_some(())
    });

    // Readiness probe failure removes the endpoint; recovery adds it back.
    // Outside /tmp: a pod's /tmp is its own.
    let flag_dir = tempfile::Builder::new().prefix("riptide-flags").tempdir_in("/run").unwrap();
    let flag = flag_dir.path().join("ready");
    std::fs::write(&flag, "").unwrap();
    c.apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: probed}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: probed}}}}
  template:
    metadata: {{labels: {{app: probed}}}}
    spec:
      containers:
      - name: server
        image: riptide/netexec
        command: ["{netexec}", "--http-port=9000", "--udp-port=0"]
        ports: [{{name: web, containerPort: 9000}}]
        readinessProbe:
          exec: {{command: ["test", "-e", "{flag}"]}}
          periodSeconds: 1
          failureThreshold: 1
        livenessProbe:
          httpGet: {{path: /hostname, port: web}}
          periodSeconds: 2
        startupProbe:
          tcpSocket: {{port: 9000}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: probed}}
spec:
  selector: {{app: probed}}
  ports: [{{name: http, port: 80, targetPort: web}}]
"#,
        netexec = netexec.display(),
        flag = flag.display()
    ));
    let probed = c.wait("probed pod ready with its endpoint (named port)", 60, |c| {
        let ps = c.pods("app=probed");
        let ips = pod_ips(&ps);
        (ips.len() == 1 && ready_endpoints(c, "probed") == ips).then(|| ps[0].clone())
    });
    let slice = &c.json(&["get", "endpointslices", "-l", "kubernetes.io/service-name=probed"])["items"][0];
    assert_eq!(slice["ports"][0]["port"], 9000, "named targetPort resolved: {slice}");
    std::fs::remove_file(&flag).unwrap();
    c.wait("endpoint not ready after the readiness probe fails", 30, |c| {
        let v = c.json(&["get", "endpointslices", "-l", "kubernetes.io/service-name=probed"]);
        let e = &v["items"][0]["endpoints"][0];
        (e["conditions"]["ready"] == false && e["conditions"]["terminating"] == false).then_some(())
    });
    let ep = c.json(&["get", "endpoints", "probed"]);
    assert!(ep["subsets"][0]["addresses"].is_null() && ep["subsets"][0]["notReadyAddresses"].as_array().map(Vec::len) == Some(1), "{ep}");
    std::fs::write(&flag, "").unwrap();
    c.wait("endpoint ready again", 30, |c| (ready_endpoints(c, "probed") == pod_ips(std::slice::from_ref(&probed))).then_some(()));
    let v = c.json(&["get", "pod", probed["metadata"]["name"].as_str().unwrap()]);
    assert_eq!(v["status"]["containerStatuses"][0]["restartCount"], 0, "liveness probe must pass: {v}");

    // Scheduler: nodeSelector, required affinity, untolerated taint.
    let target = c.nodes[1].clone();
    let pod = |name: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{role: sched}}}}\nspec:\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n  - name: main\n    image: busybox\n    command: [\"sh\", \"-c\", \"echo hello from $(hostname) svc=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT web=$WEB_SERVICE_HOST; exec sleep 1000\"]\n"
        )
    };
    c.apply(&pod("by-selector", &format!("  nodeSelector: {{kubernetes.io/hostname: {target}}}\n")));
    let third = c.nodes[2].clone();
    c.apply(&pod(
        "by-affinity",
        &format!("  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{third}]}}]\n"),
    ));
    let running_on = |c: &Cluster, name: &str| {
        let v = c.json(&["get", "pod", name]);
        (v["status"]["phase"] == "Running").then(|| v["spec"]["nodeName"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(c.wait("by-selector running", 60, |c| running_on(c, "by-selector")), target);
    assert_eq!(c.wait("by-affinity running", 60, |c| running_on(c, "by-affinity")), third);
    // Logs: hostname = pod name, service variables set.
    let logs = c.wait("by-selector logs", 20, |c| {
        let (ok, out) = c.kubectl_raw(&["logs", "by-selector"], None);
        (ok && out.contains("hello")).then_some(out)
    });
    assert!(logs.contains("hello from by-selector svc=10.43.0.1:443 web=10."), "{logs}");
    // kubectl exec runs inside the container's namespaces.
    let out = c.kubectl(&["exec", "by-selector", "--", "sh", "-c", "hostname; ip -4 -o addr show eth0"]);
    let pod_ip = c.json(&["get", "pod", "by-selector"])["status"]["podIP"].as_str().unwrap().to_string();
    assert!(out.starts_with("by-selector\n") && out.contains(&pod_ip), "{out}");
    // ... with the container's environment, as runc exec gives it.
    let out = c.kubectl(&["exec", "by-selector", "--", "sh", "-c", "echo $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT $HOSTNAME"]);
    assert_eq!(out.trim(), "10.43.0.1:443 by-selector", "{out}");
    let (ok, out) = c.kubectl_raw(&["exec", "by-selector", "--", "sh", "-c", "exit 3"], None);
    assert!(!ok && out.contains("exit code 3"), "{out}");
    // Those went through the apiserver's client certificate. The kubelet
    // API itself, over HTTPS from the control plane's netns (curl checks
    // its certificate against the cluster CA for the node's address):
    // nobody without credentials, and not a pod's own token either.
    let (_, _) = c.kubectl_raw(&["create", "serviceaccount", "default"], None);
    let pod_token = c.kubectl(&["create", "token", "default", "--bound-object-kind", "Pod", "--bound-object-name", "by-selector"]);
    let ca = c.dir.path().join("cp").join("pki").join("ca.crt");
    let kubelet = |path: &str, token: Option<&str>, upgrade: bool| {
        let mut cmd = cmd_in(&c.cp_ns(), "curl");
        // HTTP/1.1: over h2, curl would drop the upgrade headers.
        cmd.args(["-sS", "--http1.1", "--max-time", "10", "-w", "\n%{http_code}", "--cacert"]).arg(&ca);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {}", t.trim())]);
        }
        if upgrade {
            for h in ["Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol: v5.channel.k8s.io"] {
                cmd.args(["-H", h]);
            }
        }
        let out = cmd.arg(format!("https://{}:10250{path}", c.node_ip(1))).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "curl {path}: {text}{}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let logs_path = "/containerLogs/default/by-selector/main";
    let exec_path = "/exec/default/by-selector/main?command=id&stdout=true";
    assert_eq!(kubelet(logs_path, None, false), "Unauthorized\n401");
    assert_eq!(kubelet(exec_path, None, true), "Unauthorized\n401");
    let sa = "system:serviceaccount:default:default";
    assert_eq!(kubelet(logs_path, Some(&pod_token), false), format!("Forbidden (user={sa}, verb=get, resource=nodes, subresource=proxy)\n403"));
    assert_eq!(kubelet(exec_path, Some(&pod_token), true), format!("Forbidden (user={sa}, verb=create, resource=nodes, subresource=proxy)\n403"));

    c.kubectl(&["taint", "nodes", "--all", "dedicated=gpu:NoSchedule"]);
    c.apply(&pod("tainted", ""));
    let msg = c.wait("tainted pod Unschedulable", 30, |c| {
        let v = c.json(&["get", "pod", "tainted"]);
        let cond = v["status"]["conditions"].as_array()?.iter().find(|x| x["type"] == "PodScheduled")?.clone();
        (cond["status"] == "False" && cond["reason"] == "Unschedulable").then(|| cond["message"].as_str().unwrap_or_default().to_string())
    });
    assert_eq!(msg, "0/3 nodes are available: 3 node(s) had untolerated taint {dedicated: gpu}.");
    let events = c.kubectl(&["get", "events", "--field-selector", "reason=FailedScheduling"]);
    assert!(events.contains("untolerated taint"), "{events}");
    c.kubectl(&["taint", "nodes", "--all", "dedicated=gpu:NoSchedule-"]);
    c.wait("tainted pod scheduled after the taint is gone", 60, |c| running_on(c, "tainted"));

    // Kubelet restart adopts its pods: same processes, no restart.
    let on_target = c.json(&["get", "pod", "by-selector"]);
    let before = c.pod_pids(&on_target);
    assert!(!before.is_empty());
    c.stop_kubelet(1, libc::SIGKILL);
    c.start_kubelet(1);
    std::thread::sleep(Duration::from_secs(4));
    c.wait("by-selector still Running after kubelet restart", 30, |c| running_on(c, "by-selector"));
    assert_eq!(c.pod_pids(&on_target), before, "kubelet restart must not restart containers");
    let v = c.json(&["get", "pod", "by-selector"]);
    assert_eq!(v["status"]["containerStatuses"][0]["restartCount"], 0, "{v}");

    // Node lifecycle: a silent kubelet makes its node Unknown and tainted,
    // its owned pods are evicted and replaced elsewhere; when it comes back
    // the taints go and it cleans up the evicted pods.
    let n0 = c.nodes[0].clone();
    let on_n0: Vec<Value> = c.pods("app=web").into_iter().filter(|p| p["spec"]["nodeName"] == n0.as_str()).collect();
    assert_eq!(on_n0.len(), 1, "one web pod per node expected");
    let evicted_pids = c.pod_pids(&on_n0[0]);
    c.stop_kubelet(0, libc::SIGKILL);
    c.wait("node Unknown with the unreachable NoExecute taint", 60, |c| {
        let v = c.json(&["get", "node", &n0]);
        let unknown = v["status"]["conditions"].as_array()?.iter().any(|x| x["type"] == "Ready" && x["status"] == "Unknown");
        let tainted = v["spec"]["taints"].as_array()?.iter().any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute");
        (unknown && tainted).then_some(())
    });
    c.wait("web pods replaced away from the silent node", 60, |c| {
        let ps = c.pods("app=web");
        let ready = ps.iter().filter(|p| p["spec"]["nodeName"] != n0.as_str() && p["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|x| x["type"] == "Ready" && x["status"] == "True"))).count();
        (ready == 3).then_some(())
    });
    c.start_kubelet(0);
    c.wait("node Ready again without taints", 60, |c| {
        let v = c.json(&["get", "node", &n0]);
        let ready = v["status"]["conditions"].as_array()?.iter().any(|x| x["type"] == "Ready" && x["status"] == "True");
        (ready && v["spec"]["taints"].as_array().is_none_or(Vec::is_empty)).then_some(())
    });
    c.assert_pod_gone(&on_n0[0], &evicted_pids);

    // Everything goes: no process, netns, cgroup or IP reservation left.
    let all = c.json(&["get", "pods"])["items"].as_array().cloned().unwrap_or_default();
    let pids: Vec<(Value, Vec<u32>)> = all.iter().map(|p| (p.clone(), c.pod_pids(p))).collect();
    c.kubectl(&["delete", "deployment", "web", "probed"]);
    c.kubectl(&["delete", "pod", "-l", "role=sched", "--wait=true", "--timeout=60s"]);
    for (p, pids) in &pids {
        c.assert_pod_gone(p, pids);
    }
    c.wait("no pods left", 60, |c| c.json(&["get", "pods"])["items"].as_array().is_some_and(Vec::is_empty).then_some(()));
}

/// What the test kubelets read as the node's resolver (`--resolv-conf`).
const NODE_RESOLV_CONF: &str = "nameserver 192.0.2.53\nsearch node.example\noptions timeout:1\n";

fn host_etc() -> (String, String, String, String) {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
    let out = Command::new("hostname").output().unwrap();
    (read("/etc/resolv.conf"), read("/etc/hosts"), read("/etc/hostname"), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Each pod sees its own /etc/resolv.conf, /etc/hosts and /etc/hostname
/// (its container and `kubectl exec` alike, also after a kubelet restart),
/// the node's files stay as they were, and nothing is left once the pods
/// are gone.
#[test]
fn netns_pod_etc_files_and_exec() {
    if !privileged("for network namespaces, cgroups and eBPF") {
        return;
    }
    let host_before = host_etc();
    let mut c = Cluster::up_tagged("e");
    c.start_kubelet(0);
    let node = c.nodes[0].clone();
    c.wait("a Ready node with a pod CIDR", 60, |c| (!c.node_cidr(&node).is_empty()).then_some(()));
    let show = "cat /etc/resolv.conf; echo ---; cat /etc/hosts; echo ---; cat /etc/hostname; hostname; echo ---";
    c.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: files, labels: {{role: etc}}}}
spec:
  terminationGracePeriodSeconds: 1
  hostname: db
  subdomain: nodes
  hostAliases: [{{ip: 203.0.113.7, hostnames: [alias.example, alias2.example]}}]
  dnsConfig:
    searches: [extra.example]
    options: [{{name: edns0}}, {{name: ndots, value: "2"}}]
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "{show}; exec sleep 1000"]
---
apiVersion: v1
kind: Pod
metadata: {{name: custom, labels: {{role: etc}}}}
spec:
  terminationGracePeriodSeconds: 1
  dnsPolicy: None
  dnsConfig: {{nameservers: [192.0.2.1], searches: [a.example]}}
  containers:
  - name: main
    image: busybox
    command: ["sleep", "1000"]
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, labels: {{role: etc}}}}
spec:
  terminationGracePeriodSeconds: 1
  hostNetwork: true
  containers:
  - name: main
    image: busybox
    command: ["sleep", "1000"]
"#
    ));
    let running = |c: &Cluster, name: &str| (c.json(&["get", "pod", name])["status"]["phase"] == "Running").then_some(());
    for p in ["files", "custom", "hostnet"] {
        c.wait(&format!("{p} Running"), 60, |c| running(c, p));
    }
    let pod_ip = c.json(&["get", "pod", "files"])["status"]["podIP"].as_str().unwrap().to_string();
    let want_resolv = "search default.svc.cluster.local svc.cluster.local cluster.local node.example extra.example\n\
                       nameserver 10.43.0.10\noptions ndots:2 edns0\n";
    let want_hosts = format!(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n\
         {pod_ip}\tdb.nodes.default.svc.cluster.local\tdb\n\n# Entries added by HostAliases.\n\
         203.0.113.7\talias.example\talias2.example\n"
    );
    let want = format!("{want_resolv}---\n{want_hosts}---\ndb\ndb\n---\n");
    // The container itself...
    let logs = c.wait("files logs", 20, |c| {
        let (ok, out) = c.kubectl_raw(&["logs", "files"], None);
        (ok && out.ends_with("---\n") && out.matches("---").count() == 3).then_some(out)
    });
    assert_eq!(logs, want, "what the container saw");
    // ... and kubectl exec, in the same mount namespace; libc resolves
    // through the pod's files.
    let exec = c.kubectl(&["exec", "files", "--", "sh", "-c", show]);
    assert_eq!(exec, want, "what kubectl exec saw");
    let pid = c.pod_pids(&c.json(&["get", "pod", "files"]))[0];
    let container_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    let exec_ns = c.kubectl(&["exec", "files", "--", "readlink", "/proc/self/ns/mnt"]);
    assert_eq!(exec_ns.trim(), container_ns.to_str().unwrap(), "exec joins the container's mount namespace");
    assert_ne!(container_ns, std::fs::read_link("/proc/self/ns/mnt").unwrap(), "the pod has its own mount namespace");
    let out = c.kubectl(&["exec", "files", "--", "getent", "hosts", "alias2.example", "db.nodes.default.svc.cluster.local"]);
    assert!(out.contains("203.0.113.7") && out.contains(&pod_ip), "getent through the pod's /etc/hosts: {out}");
    let out = c.kubectl(&["exec", "custom", "--", "cat", "/etc/resolv.conf", "/etc/hostname"]);
    assert_eq!(out, "search a.example\nnameserver 192.0.2.1\ncustom\n", "dnsPolicy None");
    // hostNetwork with ClusterFirst: the node's own files and hostname.
    let out = c.kubectl(&["exec", "hostnet", "--", "sh", "-c", "cat /etc/resolv.conf /etc/hosts; hostname"]);
    assert_eq!(out, format!("{}{}{}", host_before.0, host_before.1, host_before.3), "hostNetwork pod");
    assert_eq!(host_etc(), host_before, "the node's files must not change");

    // A restarted kubelet adopts the pods with their namespaces.
    c.stop_kubelet(0, libc::SIGKILL);
    c.start_kubelet(0);
    std::thread::sleep(Duration::from_secs(3));
    let exec = c.wait("exec after the kubelet restart", 30, |c| {
        let (ok, out) = c.kubectl_raw(&["exec", "files", "--", "sh", "-c", show], None);
        ok.then_some(out)
    });
    assert_eq!(exec, want, "after the kubelet restart");

    let pods: Vec<Value> = c.pods("role=etc");
    let mntns_dir = c.root_dir(0).join("mntns");
    let pins = |uid: &str| mntns_dir.join(uid).exists() || c.root_dir(0).join("pods").join(uid).exists();
    assert!(pods.iter().filter(|p| p["spec"]["hostNetwork"] != true).all(|p| pins(p["metadata"]["uid"].as_str().unwrap())));
    c.kubectl(&["delete", "pod", "-l", "role=etc", "--wait=true", "--timeout=60s"]);
    for p in &pods {
        let uid = p["metadata"]["uid"].as_str().unwrap().to_string();
        c.wait(&format!("pod {uid}'s namespace pin and files removed"), 30, |_| (!pins(&uid)).then_some(()));
    }
    assert_eq!(host_etc(), host_before, "the node's files must not change");
}

/// The container's status of pod `name`: (ready, restartCount).
fn ready_and_restarts(c: &Cluster, name: &str) -> Option<(bool, i64)> {
    let v = c.json(&["get", "pod", name]);
    let cs = &v["status"]["containerStatuses"][0];
    Some((cs["ready"].as_bool()?, cs["restartCount"].as_i64()?))
}

/// Messages of the pod's events with `reason`.
fn event_messages(c: &Cluster, pod: &str, reason: &str) -> Vec<String> {
    let v = c.json(&["get", "events"]);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == pod && e["reason"] == reason)
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect()
}

/// gRPC probes against a real grpc.health.v1 server in the pod: NOT_SERVING
/// takes a readiness-probed pod out of Ready and back in on SERVING, and
/// makes a liveness-probed container restart, each with kubelet's events.
#[test]
fn netns_grpc_probes_gate_readiness_and_restart_on_not_serving() {
    if !privileged("for network namespaces, cgroups and eBPF") {
        return;
    }
    let server = workspace_bin("riptide-tests", "riptide-grpc-health");
    let mut c = Cluster::up_tagged("g");
    c.start_kubelet(0);
    c.wait("node Ready with a pod CIDR", 60, |c| {
        let v = c.json(&["get", "node", &c.nodes[0]]);
        let ready = v["status"]["conditions"].as_array()?.iter().any(|x| x["type"] == "Ready" && x["status"] == "True");
        (ready && v["spec"]["podCIDR"].is_string()).then_some(())
    });
    let pod = |name: &str, probe: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: server\n    image: riptide/agnhost\n    command: [\"{server}\", \"--port=5000\", \"--http-port=8080\", \"--service=app\"]\n    {probe}:\n      grpc: {{port: 5000, service: app}}\n      periodSeconds: 1\n      timeoutSeconds: 1\n      failureThreshold: 2\n",
            server = server.display()
        )
    };
    c.apply(&pod("grpc-ready", "readinessProbe"));
    c.apply(&pod("grpc-live", "livenessProbe"));
    let node = c.nodes[0].clone();
    let pod_ip = |c: &Cluster, name: &str| c.json(&["get", "pod", name])["status"]["podIP"].as_str().map(String::from);
    let flip = |c: &Cluster, name: &str, path: &str| {
        let ip = pod_ip(c, name).unwrap();
        c.wait(&format!("{name} to take {path}"), 20, |_| http_get(&node, &ip, 8080, path));
    };

    // Readiness: SERVING → Ready; NOT_SERVING → not Ready, still running;
    // SERVING again → Ready, and never a restart.
    c.wait("grpc-ready Ready", 60, |c| (ready_and_restarts(c, "grpc-ready")? == (true, 0)).then_some(()));
    flip(&c, "grpc-ready", "/make-not-serving");
    c.wait("grpc-ready not Ready after NOT_SERVING", 30, |c| (ready_and_restarts(c, "grpc-ready")? == (false, 0)).then_some(()));
    let msgs = c.wait("the readiness Unhealthy event", 20, |c| Some(event_messages(c, "grpc-ready", "Unhealthy")).filter(|m| !m.is_empty()));
    assert!(msgs.iter().any(|m| m == "Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")"), "{msgs:?}");
    flip(&c, "grpc-ready", "/make-serving");
    c.wait("grpc-ready Ready again after SERVING", 30, |c| (ready_and_restarts(c, "grpc-ready")? == (true, 0)).then_some(()));

    // Liveness: NOT_SERVING twice in a row → the container is killed and
    // restarted; the new process serves, and the restart count stays.
    c.wait("grpc-live running", 60, |c| (ready_and_restarts(c, "grpc-live")? == (true, 0)).then_some(()));
    flip(&c, "grpc-live", "/make-not-serving");
    c.wait("grpc-live restarted", 60, |c| {
        let v = c.json(&["get", "pod", "grpc-live"]);
        let cs = &v["status"]["containerStatuses"][0];
        (cs["restartCount"].as_i64() == Some(1) && cs["ready"] == true && cs["lastState"]["terminated"].is_object()).then_some(())
    });
    let msgs = event_messages(&c, "grpc-live", "Unhealthy");
    assert!(msgs.iter().any(|m| m == "Liveness probe failed: service unhealthy (responded with \"NOT_SERVING\")"), "{msgs:?}");
    let killing = event_messages(&c, "grpc-live", "Killing");
    assert!(killing.iter().any(|m| m == "Container server failed liveness probe, will be restarted"), "{killing:?}");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(ready_and_restarts(&c, "grpc-live"), Some((true, 1)), "the restarted container serves\n{}", c.diagnostics());
    c.kubectl(&["delete", "pod", "grpc-ready", "grpc-live", "--wait=true", "--timeout=60s"]);
}
