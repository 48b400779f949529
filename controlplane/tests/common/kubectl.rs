//! kubectl, log tails, polling and pod cleanup for the synchronous suites
//! that run the control plane as processes (`kubelet_pods`,
//! `netns_workloads`).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// kubectl with one kubeconfig and cache dir, run inside `netns` if set
/// (where the apiserver's address is reachable).
pub struct Kubectl {
    pub kubeconfig: PathBuf,
    pub cache_dir: PathBuf,
    pub netns: Option<String>,
}

impl Kubectl {
    /// Runs kubectl; (success, stdout + stderr).
    pub fn raw(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        let mut cmd = match &self.netns {
            Some(ns) => riptide_test_support::netns::command(ns, "kubectl"),
            None => Command::new("kubectl"),
        };
        let mut c = cmd
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl must be installed");
        if let Some(s) = stdin {
            c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// `kubectl <args> -o json`, or Null when kubectl fails.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let (ok, out) = self.raw(&a, None);
        if !ok {
            return Value::Null;
        }
        serde_json::from_str(&out).unwrap_or(Value::Null)
    }
}

/// The last 40 lines of a log file ("" when there is none yet).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Polls `f` every 300 ms until it returns Some; after `secs`, fails
/// with `what` and `diagnostics()` (what the test saw).
pub fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>, diagnostics: impl FnOnce() -> String) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", diagnostics());
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Kills every pod cgroup under a node's cgroup (`cgroup.kill`) and
/// removes it, its containers' cgroups first, once its processes are gone,
/// so a test leaves nothing behind even when its kubelet died first.
pub fn kill_pod_cgroups(node_cgroup: &Path) {
    let Ok(rd) = std::fs::read_dir(node_cgroup) else { return };
    for e in rd.flatten().filter(|e| e.path().is_dir()) {
        let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
        if let Err(e) = riptide_test_support::cgroup::remove_tree(&e.path()) {
            eprintln!("cleanup: {e}");
        }
    }
}

