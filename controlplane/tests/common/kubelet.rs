//! A node for the suites that run pods under a real kubelet
//! (`kubelet_pods`, `kubelet_mounts`): a real apiserver process and a real
//! kubelet process on loopback (node address 127.0.0.1), each with its own
//! node name, kubelet root, node root and cgroup, all removed on drop (also
//! on panic).

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use riptide_test_support::privileged;
use serde_json::Value;

use super::{
    free_port,
    kubectl::{Kubectl, kill_pod_cgroups, log_tail, wait_for},
};

/// The control plane binary. riptide-dns's tests include this harness too and
/// cargo defines no such variable for them; they never start a node, so a
/// bare name (resolved on PATH) is only a placeholder there.
pub const BIN: &str = match option_env!("CARGO_BIN_EXE_riptide-controlplane") {
    Some(bin) => bin,
    None => "riptide-controlplane",
};

pub struct Node {
    pub dir: tempfile::TempDir,
    pub node: String,
    pub apiserver: Child,
    pub kubelet: Option<Child>,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub cgroup: PathBuf,
    pub kubelet_port: u16,
}

impl Node {
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }
    /// The node's own `/` for hostPath volumes.
    pub fn node_root(&self) -> PathBuf {
        self.dir.path().join("node-root")
    }
    pub fn cni_conf(&self) -> PathBuf {
        self.dir.path().join("cni-conf")
    }
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.path().join("cni-bin")
    }
    /// A directory standing for image `riptide.test/tools:1`.
    pub fn image_dir(&self) -> PathBuf {
        self.dir.path().join("image-tools")
    }

    /// apiserver + kubelet; `network` writes a CNI config first.
    pub fn up(tag: &str, network: bool) -> Self {
        Self::up_with(tag, network, &[])
    }

    /// `up` with extra kubelet flags. The apiserver logs every request
    /// (`apiserver.log`), so tests can count what reached it.
    pub fn up_with(tag: &str, network: bool, kubelet_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let node = format!("rtk{}{tag}", std::process::id() % 100_000);
        let data = dir.path().join("cp");
        let log = File::create(dir.path().join("apiserver.log")).unwrap();
        let mut apiserver = Command::new(BIN)
            .args(["apiserver", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,riptide_controlplane::apiserver::handlers=debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(apiserver.stdout.take().unwrap()).lines();
        let (mut kubeconfig, mut server) = (PathBuf::new(), String::new());
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(a) = line.strip_prefix("listening ") {
                server = format!("https://{a}");
            }
            if let Some(p) = line.strip_prefix("kubeconfig ") {
                kubeconfig = PathBuf::from(p);
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let cgroup = PathBuf::from("/sys/fs/cgroup/unified").join(&node);
        let mut n = Node { dir, node, apiserver, kubelet: None, kubeconfig, server, cgroup, kubelet_port: free_port() };
        assert!(n.kubeconfig.exists(), "apiserver wrote no kubeconfig:\n{}", n.log("apiserver"));
        std::fs::create_dir_all(n.cni_conf()).unwrap();
        std::fs::create_dir_all(n.cni_bin()).unwrap();
        std::fs::create_dir_all(n.node_root()).unwrap();
        std::fs::create_dir_all(n.image_dir()).unwrap();
        let tool = n.image_dir().join("hello-tool");
        std::fs::write(&tool, "#!/bin/sh\necho \"hello from the image, args: $*\"\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A CNI plugin that only answers: the pod gets its own netns and an
        // address, nothing is wired.
        let plugin = n.cni_bin().join("fake");
        std::fs::write(&plugin, "#!/bin/sh\ncat >/dev/null\ncase \"$CNI_COMMAND\" in\nADD) echo '{\"cniVersion\":\"1.0.0\",\"ips\":[{\"address\":\"10.250.0.9/24\"}]}';;\nVERSION) echo '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}';;\nesac\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        if network {
            n.write_conflist();
        }
        n.start_kubelet(kubelet_args);
        n.wait("node registered", 30, |n| (!n.json(&["get", "node", &n.node]).is_null()).then_some(()));
        n
    }

    pub fn write_conflist(&self) {
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "fake", "plugins": [{"type": "fake"}]});
        std::fs::write(self.cni_conf().join("10-fake.conflist"), conf.to_string()).unwrap();
    }

    pub fn start_kubelet(&mut self, extra: &[&str]) {
        let pki = riptide_controlplane::apiserver::tls::Pki::load(&self.dir.path().join("cp").join("pki")).unwrap();
        let creds = riptide_controlplane::credentials::write_kubelet(&pki, &self.server, &self.node, "127.0.0.1", &self.dir.path().join("creds")).unwrap();
        let map = self.dir.path().join("image-map");
        std::fs::write(
            &map,
            format!(
                "registry.k8s.io/pause:* = pause\nriptide.test/host:* = host\nriptide.test/tools:1 = {}\n",
                self.image_dir().display()
            ),
        )
        .unwrap();
        let resolv = self.dir.path().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.0.2.53\n").unwrap();
        let log = File::options().create(true).append(true).open(self.dir.path().join("kubelet.log")).unwrap();
        let child = Command::new(BIN)
            .args(["kubelet", "--node-name", &self.node, "--node-ip", "127.0.0.1", "--port", &self.kubelet_port.to_string()])
            .args(extra)
            .arg("--kubeconfig")
            .arg(&creds.kubeconfig)
            .arg("--tls-cert-file")
            .arg(&creds.cert)
            .arg("--tls-private-key-file")
            .arg(&creds.key)
            .arg("--client-ca-file")
            .arg(&creds.ca)
            .arg("--cni-conf-dir")
            .arg(self.cni_conf())
            .arg("--cni-bin-dir")
            .arg(self.cni_bin())
            .arg("--cgroup-root")
            .arg(&self.cgroup)
            .arg("--root-dir")
            .arg(self.root())
            .arg("--image-map")
            .arg(&map)
            .arg("--host-path-root")
            .arg(self.node_root())
            .arg("--resolv-conf")
            .arg(&resolv)
            // The control plane's data (CA key, tokens, admin kubeconfig),
            // as a lab node hides it from pods.
            .arg("--mask-path")
            .arg(self.dir.path().join("cp"))
            .args(["--restart-backoff", "1s", "--heartbeat-interval", "1s"])
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.kubelet = Some(child);
    }

    pub fn log(&self, name: &str) -> String {
        log_tail(&self.dir.path().join(format!("{name}.log")))
    }

    pub fn kubectl(&self) -> Kubectl {
        Kubectl { kubeconfig: self.kubeconfig.clone(), cache_dir: self.dir.path().join("kcache"), netns: None }
    }

    pub fn kubectl_raw(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        self.kubectl().raw(args, stdin)
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "--- pods\n{}\n--- events\n{}\n--- kubelet\n{}\n--- apiserver\n{}",
            self.kubectl_raw(&["get", "pods", "-A", "-o", "yaml"], None).1,
            self.kubectl_raw(&["get", "events", "-A"], None).1,
            self.log("kubelet"),
            self.log("apiserver")
        )
    }

    pub fn apply(&self, yaml: &str) {
        let (ok, out) = self.kubectl_raw(&["apply", "-f", "-"], Some(yaml));
        assert!(ok, "kubectl apply: {out}\n{}", self.diagnostics());
    }

    pub fn json(&self, args: &[&str]) -> Value {
        self.kubectl().json(args)
    }

    pub fn wait<T>(&self, what: &str, secs: u64, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        wait_for(what, secs, || f(self), || self.diagnostics())
    }

    /// The container's log once it contains `marker`.
    pub fn logs_with(&self, pod: &str, container: &str, marker: &str) -> String {
        self.wait(&format!("{pod}/{container} to log {marker:?}"), 60, |n| {
            let (ok, out) = n.kubectl_raw(&["logs", pod, "-c", container], None);
            (ok && out.contains(marker)).then_some(out)
        })
    }

    pub fn pod(&self, name: &str) -> Value {
        self.json(&["get", "pod", name])
    }

    /// A node for a test that needs root (None, having said why, without).
    pub fn start(tag: &str, network: bool, needs: &str) -> Option<Self> {
        privileged(needs).then(|| Self::up(tag, network))
    }

    /// A pod manifest on this node.
    pub fn pod_yaml(&self, name: &str) -> PodYaml {
        PodYaml { metadata: format!("name: {name}"), node: self.node.clone(), host_network: true }
    }
}

/// The head every pod of these tests shares: its name, this node, host
/// network unless [`PodYaml::pod_network`].
pub struct PodYaml {
    metadata: String,
    node: String,
    host_network: bool,
}

impl PodYaml {
    /// More `metadata` fields, e.g. `labels: {app: x}`.
    pub fn meta(mut self, fields: &str) -> Self {
        self.metadata = format!("{}, {fields}", self.metadata);
        self
    }

    pub fn pod_network(mut self) -> Self {
        self.host_network = false;
        self
    }

    /// The manifest with the rest of the spec (`spec`'s fields, YAML
    /// indented two spaces).
    pub fn spec(&self, rest: &str) -> String {
        let net = if self.host_network { "  hostNetwork: true\n" } else { "" };
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{{}}}\nspec:\n  nodeName: {}\n{net}{rest}", self.metadata, self.node)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = riptide_controlplane::kubelet::mntns::release_all(&self.root());
        kill_pod_cgroups(&self.cgroup);
        let _ = std::fs::remove_dir(&self.cgroup);
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            let prefix = format!("{}-pod-", self.node);
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
    }
}
