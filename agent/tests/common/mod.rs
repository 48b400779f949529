//! Harness shared by the agent's privileged end-to-end tests: a node
//! network namespace holding the apiserver, the agent and kubectl; pods
//! created by the real CNI plugin; a socket-LB cgroup; helper processes
//! (this test binary re-executed) for servers and clients. Everything is
//! removed on drop, also when a test fails.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `cmd` between fork and exec inside the namespace of `ns_file`.
fn enter(cmd: &mut Command, ns_file: File) {
    // SAFETY: setns is async-signal-safe; `ns_file` lives in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A node: a netns removed on drop, with every process started in it killed,
/// its pods' namespaces deleted and its pins removed.
pub struct Netns {
    pub name: String,
    pub procs: Vec<Child>,
    pub node: String,
    pub dir: tempfile::TempDir,
    pub pods: Vec<String>,
    /// Helper processes (servers, clients); killed first.
    pub helpers: Vec<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("rtag-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Self {
            node: name.clone(),
            name,
            procs: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            pods: Vec::new(),
            helpers: Vec::new(),
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, File::open(format!("/run/netns/{}", self.name)).unwrap());
        cmd
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The node's underlay: `198.18.77.1/24` on a veth (routes via peers
    /// need it on-link).
    pub fn underlay(&self) {
        ip(&["-n", &self.name, "link", "add", "under0", "type", "veth", "peer", "name", "under1"]);
        ip(&["-n", &self.name, "addr", "add", "198.18.77.1/24", "dev", "under0"]);
        ip(&["-n", &self.name, "link", "set", "under0", "up"]);
        ip(&["-n", &self.name, "link", "set", "under1", "up"]);
    }

    /// A pod: a fresh netns wired by the real CNI plugin (run from the node
    /// namespace, as the kubelet does). Returns its address.
    pub fn add_pod(&mut self, pod: &str) -> Ipv4Addr {
        let ns = format!("{}-{pod}", self.name);
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "riptide",
            "type": "riptide",
            "nodeName": self.node,
            "podCIDRFile": self.path("podcidr"),
            "stateDir": self.path("cni-state"),
        });
        let mut child = self
            .cmd(cni_bin())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &ns)
            .env("CNI_NETNS", format!("/run/netns/{ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "CNI ADD {pod}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let res: Value = serde_json::from_slice(&out.stdout).unwrap();
        let addr = res["ips"][0]["address"].as_str().unwrap();
        addr.split('/').next().unwrap().parse().unwrap()
    }

    /// A command running inside pod `pod`'s namespace.
    pub fn pod_cmd(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        enter(&mut cmd, File::open(format!("/run/netns/{}-{pod}", self.name)).unwrap());
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for p in self.helpers.iter_mut().chain(&mut self.procs) {
            let _ = p.kill();
            let _ = p.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", pod]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = riptide_datapath::unpin_node(&self.node);
    }
}

/// A cgroup v2 directory under /sys/fs/cgroup/unified, removed on drop
/// (after the processes in it were killed: declare it before the `Netns`
/// so it drops after).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from("/sys/fs/cgroup/unified").join(format!("riptide-agent-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            // Leftover processes (a helper that outlived its Child handle).
            if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: plain kill(2) of a process in our test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("WARNING: could not remove {}", self.path.display());
    }
}

pub fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_riptide-agent")).parent().unwrap().to_path_buf()
}

/// A workspace binary next to ours, built on first use (same target dir).
fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    riptide_test_support::workspace_bin(&bin_dir(), package, bin)
}

pub fn controlplane_bin() -> PathBuf {
    workspace_bin("riptide-controlplane", "riptide-controlplane")
}

pub fn cni_bin() -> PathBuf {
    workspace_bin("riptide-cni", "riptide-cni")
}

/// Starts the apiserver in the netns; returns the kubeconfig path.
pub fn start_apiserver(ns: &mut Netns) -> PathBuf {
    start_apiserver_on(ns, "127.0.0.1:0")
}

/// Starts the apiserver on `listen` with the node's data dir (a restart
/// keeps its objects and, on the same address, its kubeconfig); the
/// process is last in `ns.procs`.
pub fn start_apiserver_on(ns: &mut Netns, listen: &str) -> PathBuf {
    let data = ns.path("cp");
    let mut child = ns
        .cmd(controlplane_bin())
        .args(["apiserver", "--data-dir", data.to_str().unwrap(), "--listen", listen])
        .stdout(Stdio::piped())
        .stderr(File::options().create(true).append(true).open(ns.path("apiserver.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    ns.procs.push(child);
    let mut kubeconfig = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("kubeconfig ") {
            kubeconfig = Some(PathBuf::from(p));
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    kubeconfig.expect("apiserver printed no kubeconfig line")
}

/// Starts the agent (logging to `agent.log`); returns its index in `procs`.
pub fn start_agent(ns: &mut Netns, kubeconfig: &Path, extra: &[&str]) -> usize {
    let log = File::options().create(true).append(true).open(ns.path("agent.log")).unwrap();
    let child = ns
        .cmd(env!("CARGO_BIN_EXE_riptide-agent"))
        .args([
            "--node-name", &ns.node,
            "--kubeconfig", kubeconfig.to_str().unwrap(),
            "--api-socket", ns.path("agent.sock").to_str().unwrap(),
            "--pod-cidr-file", ns.path("podcidr").to_str().unwrap(),
            "--metrics-addr", "127.0.0.1:9962",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    ns.procs.push(child);
    ns.procs.len() - 1
}

/// `kill -9` of the agent started as `procs[i]`.
pub fn kill_agent(ns: &mut Netns, i: usize) {
    // Child::kill is SIGKILL.
    ns.procs[i].kill().unwrap();
    ns.procs[i].wait().unwrap();
}

pub fn kubectl(ns: &Netns, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut c = ns
        .cmd("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(ns.path("kcache"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn apply(ns: &Netns, kc: &Path, yaml: &str) {
    kubectl(ns, kc, &["apply", "-f", "-"], Some(yaml));
}

pub fn riptide(ns: &Netns, args: &[&str]) -> Option<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(ns.path("agent.sock"))
        .args(args)
        .args(["-o", "json"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

pub fn agent_log_tail(ns: &Netns, n: usize) -> String {
    let log = std::fs::read_to_string(ns.path("agent.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(n).collect::<Vec<_>>().into_iter().rev().collect();
    tail.join("\n")
}

/// Polls until `check` holds, else fails with the map dump and agent log.
pub fn eventually(ns: &Netns, what: &str, check: impl FnMut() -> bool) {
    eventually_for(ns, what, Duration::from_secs(20), check);
}

pub fn eventually_for(ns: &Netns, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dump = riptide(ns, &["service", "list"]).map(|v| serde_json::to_string_pretty(&v).unwrap());
    let ct = riptide(ns, &["ct", "list"]).map(|v| serde_json::to_string(&v).unwrap());
    panic!("timed out waiting for: {what}\nmaps: {dump:?}\nconntrack: {ct:?}\nagent log:\n{}", agent_log_tail(ns, 40));
}

/// Node object with a podCIDR and an InternalIP.
pub fn add_node(ns: &Netns, kc: &Path, name: &str, pod_cidr: &str, node_ip: &str) {
    apply(
        ns,
        kc,
        &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {pod_cidr}, podCIDRs: [{pod_cidr}]}}\n"),
    );
    set_node_ip(ns, kc, name, node_ip);
}

/// Node status (addresses) goes through the status subresource.
pub fn set_node_ip(ns: &Netns, kc: &Path, node: &str, ip: &str) {
    let patch = format!(r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#);
    kubectl(ns, kc, &["patch", "node", node, "--subresource=status", "--type=merge", "-p", &patch], None);
}

/// One output line of a helper process (`OUT <s>`, collected by [`Helper`]).
pub fn helper_out(s: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "OUT {s}");
    let _ = o.flush();
}

/// Helper role `tcp-echo <port>`: answers every line with `echo <line>`,
/// a thread per connection, forever.
pub fn tcp_echo_server(port: &str) {
    let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port.parse::<u16>().unwrap())).unwrap();
    helper_out("listening".into());
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            let mut w = s.try_clone().unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                if writeln!(w, "echo {line}").is_err() {
                    break;
                }
            }
        });
    }
}

/// Environment variable naming the helper role of a re-executed test binary.
pub const HELPER_ENV: &str = "RIPTIDE_AGENT_TEST_HELPER";

/// A helper process: this test binary re-executed running `helper_fn`
/// (an ignored test) with `spec` in [`HELPER_ENV`], in pod `pod`'s netns and
/// optionally moved into `cgroup` before exec. Its `OUT ` lines are
/// collected.
pub struct Helper {
    pub lines: Arc<Mutex<Vec<String>>>,
    pub stdin: Option<ChildStdin>,
    pub index: usize,
}

pub fn spawn_helper(ns: &mut Netns, pod: &str, cgroup: Option<&Cgroup>, helper_fn: &str, spec: &str) -> Helper {
    let mut cmd = ns.pod_cmd(pod, std::env::current_exe().unwrap());
    cmd.args(["--exact", helper_fn, "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(cg) = cgroup {
        let procs = std::fs::OpenOptions::new().write(true).open(cg.path.join("cgroup.procs")).unwrap();
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            // The harness prints "test x ... " without a newline before
            // the first output line: look for the marker anywhere.
            if let Some(i) = l.find("OUT ") {
                sink.lock().unwrap().push(l[i + 4..].to_owned());
            }
        }
    });
    ns.helpers.push(child);
    Helper { lines, stdin, index: ns.helpers.len() - 1 }
}

impl Helper {
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a new line starting with `prefix` (after `skip` lines).
    pub fn wait_line(&self, skip: usize, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(l) = self.snapshot().into_iter().skip(skip).find(|l| l.starts_with(prefix)) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn send(&mut self, line: &str) {
        let s = self.stdin.as_mut().unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        s.flush().unwrap();
    }
}
