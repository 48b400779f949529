//! The processes under test: the apiserver (`riptide-controlplane
//! apiserver`, found by [`find_server_bin`]) and etcd, each a child on
//! loopback with a temporary data directory, and their resident memory
//! from /proc.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use riptide_test_support::procfs;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    process::{Child, Command},
};

use crate::error::{BenchError, Result, io, kerr};

/// Looks for `riptide-controlplane`: `$RIPTIDE_CONTROLPLANE_BIN`, else next
/// to the running executable (or one directory up, for test and example
/// binaries in `target/<profile>/{deps,examples}`).
pub fn find_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RIPTIDE_CONTROLPLANE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io("locating the running executable"))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for d in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
        let p = d.join("riptide-controlplane");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(BenchError::Failed(format!(
        "riptide-controlplane not found next to {} (build it with `cargo build --bins`, or set RIPTIDE_CONTROLPLANE_BIN)",
        exe.display()
    )))
}

/// A process's peak and current resident memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rss {
    pub peak_kib: u64,
    pub current_kib: u64,
}

/// VmHWM and VmRSS of `pid` in KiB (both 0 when unreadable).
pub fn rss(pid: u32) -> Rss {
    let [peak_kib, current_kib] = procfs::status_kib(pid, ["VmHWM", "VmRSS"]).unwrap_or_default();
    Rss { peak_kib, current_kib }
}

/// `riptide-controlplane apiserver` on 127.0.0.1 with a temp data dir.
pub struct Server {
    child: Child,
    pub pid: u32,
    pub client: kube::Client,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(bin: &Path, etcd: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("riptide-apibench").tempdir().map_err(io("creating a data dir"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("apiserver").arg("--data-dir").arg(dir.path()).args(["--listen", "127.0.0.1:0"]);
        if let Some(e) = etcd {
            cmd.args(["--etcd", e, "--etcd-prefix", "/bench"]);
        }
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        let pid = child.id().unwrap_or(0);
        let out = child.stdout.take().ok_or_else(|| BenchError::Failed("no stdout".into()))?;
        let mut lines = BufReader::new(out).lines();
        let kubeconfig = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(p) = l.strip_prefix("kubeconfig ") {
                    return Some(PathBuf::from(p));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BenchError::Failed(format!("{} did not start (no kubeconfig line)", bin.display())))?;
        // Keep draining stdout so the server never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)
            .map_err(|e| BenchError::Failed(format!("reading {}: {e}", kubeconfig.display())))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| BenchError::Failed(format!("kubeconfig {}: {e}", kubeconfig.display())))?;
        let client = kube::Client::try_from(cfg).map_err(kerr("building the client"))?;
        Ok(Self { child, pid, client, _dir: dir })
    }

    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// An etcd on loopback ports with a temp data dir; killed on drop.
pub struct Etcd {
    child: Child,
    pub pid: u32,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("picking a port"))?;
    Ok(l.local_addr().map_err(io("picking a port"))?.port())
}

impl Etcd {
    pub async fn start(bin: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("riptide-apibench-etcd").tempdir().map_err(io("creating etcd's data dir"))?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let name = format!("bench{}", std::process::id());
        let child = Command::new(bin)
            .arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .arg("--initial-cluster")
            .arg(format!("{name}={peer_url}"))
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("starting {} (Debian etcd-server)", bin.display())))?;
        let pid = child.id().unwrap_or(0);
        let etcd = Self { child, pid, endpoint, _dir: dir };
        // Healthy = has a leader and serves requests.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if health(client).await {
                return Ok(etcd);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BenchError::Failed(format!("etcd on {} did not become healthy", etcd.endpoint)))
    }
}

async fn health(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf)).await;
    buf.contains("\"health\":\"true\"")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
