//! Test harness: a real apiserver on 127.0.0.1 (random port, temp data
//! dir), real kubectl with a per-test cache dir, and an etcd on loopback.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use riptide_controlplane::apiserver::{Config, Server, ServerHandle, StorageConfig};

pub mod kubectl;
pub mod kubelet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Etcd,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An etcd on loopback with a temp data dir, killed on drop.
pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Etcd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let client = free_port();
        let peer = free_port();
        let endpoint = format!("http://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args([
                "--name", &format!("t{}", std::process::id()),
                "--data-dir", dir.path().join("etcd").to_str().unwrap(),
                "--listen-client-urls", &endpoint,
                "--advertise-client-urls", &endpoint,
                "--listen-peer-urls", &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster", &format!("t{}=http://127.0.0.1:{peer}", std::process::id()),
                "--log-level", "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian etcd-server) must be installed");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, _dir: dir, endpoint }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    pub etcd: Option<Etcd>,
    pub backend: Backend,
}

pub fn config(dir: &Path, backend: Backend, etcd: Option<&Etcd>) -> Config {
    let mut cfg = Config::new(dir, "127.0.0.1:0".parse().unwrap());
    cfg.bookmark_interval = Duration::from_secs(1);
    if backend == Backend::Etcd {
        cfg.storage = StorageConfig::Etcd { endpoints: vec![etcd.unwrap().endpoint.clone()], prefix: "/riptide".into() };
    }
    cfg
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let etcd = (backend == Backend::Etcd).then(Etcd::start);
        let mut cfg = config(dir.path(), backend, etcd.as_ref());
        tweak(&mut cfg);
        let handle = Server::start(cfg).await.unwrap();
        Self { handle: Some(handle), dir, cache: tempfile::tempdir().unwrap(), etcd, backend }
    }

    pub fn h(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.h().kubeconfig.clone()
    }

    /// Restart on the same data dir / etcd (kubeconfig may change port).
    pub async fn restart(&mut self, tweak: impl FnOnce(&mut Config)) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
        let mut cfg = config(self.dir.path(), self.backend, self.etcd.as_ref());
        tweak(&mut cfg);
        // In-process restart: connection and watch tasks of the old server
        // may still hold the embedded database for a moment after shutdown
        // (a real restart is a new process, which the lock never outlives),
        // so wait for redb's lock instead of failing on it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            match Server::start(cfg.clone()).await {
                Ok(h) => {
                    self.handle = Some(h);
                    return;
                }
                Err(e) if e.to_string().contains("already open") || format!("{e:?}").contains("already open") => {
                    assert!(std::time::Instant::now() < deadline, "database still locked after 15 s: {e:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restarting the apiserver: {e:?}"),
            }
        }
    }

    /// Run kubectl; returns (success, stdout, stderr).
    pub async fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        self.kubectl_stdin(args, None).await
    }

    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        self.kubectl_with(&self.kubeconfig(), args, stdin).await
    }

    /// Run kubectl with another identity's `kubeconfig`.
    pub async fn kubectl_with(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.args(args)
            .arg("--cache-dir")
            .arg(self.cache.path())
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", self.cache.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("kubectl must be installed");
        if let Some(s) = stdin {
            let mut si = child.stdin.take().unwrap();
            si.write_all(s.as_bytes()).await.unwrap();
        }
        drop(child.stdin.take());
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("kubectl timed out").unwrap();
        let r = (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
        eprintln!("$ kubectl {}\n{}{}", args.join(" "), r.1, r.2);
        r
    }

    pub async fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.kubectl(args).await;
        assert!(ok, "kubectl {args:?} failed: {out}{err}");
        out
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
        kube::Client::try_from(cfg).unwrap()
    }

    /// The controller manager in this process, with its own identity (the
    /// certificate `control-plane` gives it), until the handle is aborted
    /// or the test ends.
    pub async fn start_controllers(&self) -> tokio::task::JoinHandle<()> {
        let path = self.dir.path().join("controller-manager.kubeconfig");
        let pki = self.h().pki.as_ref().expect("controllers need the TLS apiserver's CA");
        riptide_controlplane::credentials::write_kubeconfig(pki, &self.h().url, riptide_controlplane::credentials::CONTROLLER_MANAGER_USER, &[], &path)
            .unwrap();
        let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        tokio::spawn(async move {
            if let Err(e) = riptide_controlplane::controllers::run(client, riptide_controlplane::controllers::Config::default()).await {
                eprintln!("controllers ended: {e}");
            }
        })
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// Poll `f` until it returns true (up to `secs`).
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Generate `embedded` and `etcd` variants of an async test body.
#[macro_export]
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name($crate::common::Backend::Embedded).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name($crate::common::Backend::Etcd).await;
            }
        }
    };
}
