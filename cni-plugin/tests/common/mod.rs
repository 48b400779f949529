//! Shared scaffolding for the plugin's tests: named network namespaces, a
//! pinned datapath per test node, and running the real `riptide-cni` binary
//! inside the node's namespace with the CNI environment, as a kubelet would.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_riptide-cni");

/// A unique short tag for names in this process.
pub fn tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named netns (`/run/netns/<name>`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.to_owned() };
        ns.exec("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        riptide_test_support::netns::path(&self.name)
    }

    /// A command run inside this namespace (setns in pre_exec; `ip netns
    /// exec` would remount /sys and hide bpffs).
    pub fn command(&self, program: &str) -> Result<Command> {
        riptide_test_support::netns::try_command(&self.name, program)
            .with_context(|| format!("opening netns {}", self.name))
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.command(program)?.args(args).output()?;
        if !out.status.success() {
            bail!(
                "{program} {} in {}: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -j <args>` inside the namespace, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["-j"];
        a.extend_from_slice(args);
        let out = self.exec("ip", &a)?;
        Ok(serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?)
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: affects only this scoped thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread panicked"))?
        })
    }

    pub fn link_names(&self) -> Result<Vec<String>> {
        Ok(self
            .ip_json(&["link", "show"])?
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A test node: its netns (with an address to source pings from), its
/// pinned datapath, its state directory and its pod range.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub state: tempfile::TempDir,
    pub pod_cidr: String,
    pub node_ip: Ipv4Addr,
}

impl Node {
    /// `third` picks the node's /24 (10.42.<third>.0/24).
    pub fn new(third: u8) -> Result<Self> {
        Self::with_cidr(&format!("10.42.{third}.0/24"))
    }

    pub fn with_cidr(pod_cidr: &str) -> Result<Self> {
        let t = tag();
        let name = format!("cnit-{t}");
        let ns = Netns::new(&format!("rtcni-{t}"))?;
        // The node's own address, only inside the test namespace (lab
        // underlay space), so the node has a source address for the pods.
        let node_ip = Ipv4Addr::new(198, 18, 250, 1);
        // (On lo: the dummy module is not available everywhere.)
        ns.exec("ip", &["addr", "add", &format!("{node_ip}/32"), "dev", "lo"])?;
        let node = Self {
            name,
            ns,
            state: tempfile::tempdir()?,
            pod_cidr: pod_cidr.to_owned(),
            node_ip,
        };
        riptide_datapath::Datapath::load(&riptide_datapath::Pinning::Node(node.name.clone()))
            .context("loading the datapath pinned for the test node")?;
        Ok(node)
    }

    /// The conflist entry the runtime would pass on stdin.
    pub fn config(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "riptide",
            "type": "riptide",
            "nodeName": self.name,
            "podCIDR": self.pod_cidr,
            "stateDir": self.state.path(),
            "mtu": 1450,
            "dns": {"nameservers": ["10.43.0.10"], "search": ["default.svc.cluster.local"]},
        })
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.state.path().join("ipam")
    }

    /// Reservation files: name (IP) → content.
    pub fn reservations(&self) -> BTreeMap<String, String> {
        snapshot(&self.ipam_dir())
            .into_iter()
            .filter(|(k, _)| k.parse::<Ipv4Addr>().is_ok())
            .collect()
    }

    pub fn endpoints(&self) -> Vec<(Ipv4Addr, riptide_common::EndpointValue)> {
        riptide_datapath::endpoints::Endpoints::open_pinned(&self.name)
            .map(|e| e.list())
            .unwrap_or_default()
    }

    /// Host-side veths the plugin made (rt + 11 hex).
    pub fn host_veths(&self) -> Vec<String> {
        self.ns
            .link_names()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| riptide_cni::link::is_host_ifname(n))
            .collect()
    }

    /// Runs the plugin inside the node's netns.
    pub fn cni(&self, env: &[(&str, &str)], stdin: &Value) -> Result<CniOut> {
        let child = self.spawn_cni(env, stdin)?;
        CniOut::wait(child)
    }

    pub fn spawn_cni(&self, env: &[(&str, &str)], stdin: &Value) -> Result<Child> {
        let mut cmd = self.ns.command(BIN)?;
        cmd.env_clear()
            .env("CNI_PATH", "/opt/cni/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning riptide-cni")?;
        let data = serde_json::to_vec(stdin)?;
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(&data);
        }
        Ok(child)
    }

    pub fn add(&self, id: &str, pod: &Netns, version: &str) -> Result<CniOut> {
        let netns = pod.path();
        self.cni(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns.to_str().unwrap()),
                ("CNI_IFNAME", "eth0"),
            ],
            &self.config(version),
        )
    }

    pub fn del(&self, id: &str, pod: Option<&Netns>) -> Result<CniOut> {
        let netns = pod.map(|p| p.path().to_str().unwrap().to_owned());
        let mut env = vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", id), ("CNI_IFNAME", "eth0")];
        if let Some(n) = &netns {
            env.push(("CNI_NETNS", n));
        }
        self.cni(&env, &self.config("1.1.0"))
    }

    pub fn gc(&self, valid: &[(&str, &str)]) -> Result<CniOut> {
        let mut conf = self.config("1.1.0");
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        self.cni(&[("CNI_COMMAND", "GC")], &conf)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = riptide_datapath::unpin_node(&self.name);
    }
}

/// What the plugin printed and how it exited.
#[derive(Debug)]
pub struct CniOut {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    pub fn wait(child: Child) -> Result<Self> {
        let out = child.wait_with_output()?;
        Ok(Self {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or(Value::Null)
    }

    /// Asserts success and returns the parsed result (or Null if none).
    pub fn expect_ok(&self, what: &str) -> Value {
        assert!(self.ok, "{what} failed: stdout={} stderr={}", self.stdout, self.stderr);
        self.json()
    }

    /// Asserts failure with `code` and a message containing `needle`.
    pub fn expect_err(&self, code: u64, needle: &str) {
        assert!(!self.ok, "expected error {code}, got success: {}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"].as_u64(), Some(code), "wrong code: {}", self.stdout);
        let msg = v["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
        assert!(v["cniVersion"].is_string(), "error lacks cniVersion: {}", self.stdout);
    }
}

/// Every file under `dir` (relative name → content), for "nothing changed
/// on disk" checks.
pub fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let content = std::fs::read_to_string(e.path()).unwrap_or_else(|_| "<dir>".into());
            out.insert(name, content);
        }
    }
    out
}

/// The pod's IPv4 address from an ADD result.
pub fn result_ip(v: &Value) -> Ipv4Addr {
    v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {v}"))
}

/// One TCP exchange: a listener on `addr` inside `server`, a client in
/// `client`. Returns the client address the server saw.
pub fn tcp_echo(server: &Netns, addr: std::net::SocketAddrV4, client: &Netns) -> Result<std::net::SocketAddr> {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        time::{Duration, Instant},
    };
    let listener = server.run(|| TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let stream = client.run(|| TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3)))?
        .with_context(|| format!("connecting to {addr} from {}", client.name))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut stream = stream;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf)?;
    conn.write_all(b"pong")?;
    stream.read_exact(&mut buf)?;
    if &buf != b"pong" {
        bail!("bad echo {buf:?}");
    }
    Ok(peer)
}
