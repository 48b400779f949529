//! What the kubelet knows about a pod, on disk under
//! `<root-dir>/pods/<uid>/state.json` (write-then-rename), so a restarted
//! kubelet adopts running pods: same netns, cgroup, IP and processes
//! (recognised by pid + start time), no restart.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Term {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Time>,
    pub finished_at: Option<Time>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerState {
    /// Main process while running.
    pub pid: Option<i32>,
    pub ticks: u64,
    pub started_at: Option<Time>,
    /// Starts so far minus one (Kubernetes' restartCount).
    pub restart_count: i32,
    /// Ever started (the first start does not count as a restart).
    pub ever_started: bool,
    /// Last termination.
    pub last: Option<Term>,
    /// Finished for good (restartPolicy says no restart).
    pub done: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodState {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    /// Pod netns name under /run/netns (None for hostNetwork).
    pub netns: Option<String>,
    /// The pinned mount namespace with the pod's /etc files (None: the
    /// node's).
    pub mntns: Option<PathBuf>,
    /// UTS hostname (None: the node's).
    pub hostname: Option<String>,
    pub cgroup: PathBuf,
    /// The pause process (pid, start ticks) of a `shareProcessNamespace`
    /// pod: PID 1 of the pod's PID namespace.
    pub pause: Option<(i32, u64)>,
    pub ip: Option<String>,
    pub cni_result: Option<serde_json::Value>,
    pub sandbox_ready: bool,
    /// Network torn down after the pod finished.
    pub network_released: bool,
    pub start_time: Option<Time>,
    pub containers: BTreeMap<String, ContainerState>,
}

pub fn pods_dir(root: &Path) -> PathBuf {
    root.join("pods")
}

pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    pods_dir(root).join(uid)
}

/// `<pod dir>/<container>/<restart>.log`.
pub fn log_path(root: &Path, uid: &str, container: &str, restart: i32) -> PathBuf {
    pod_dir(root, uid).join(container).join(format!("{restart}.log"))
}

impl PodState {
    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        let dir = pod_dir(root, &self.uid);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, dir.join("state.json"))
    }

    pub fn load_all(root: &Path) -> Vec<Self> {
        let Ok(rd) = std::fs::read_dir(pods_dir(root)) else { return Vec::new() };
        rd.filter_map(Result::ok)
            .filter_map(|e| std::fs::read(e.path().join("state.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }
}
