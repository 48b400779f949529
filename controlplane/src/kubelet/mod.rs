//! A kubelet without a container runtime: a pod is a set of processes in
//! their own network namespace (wired by the CNI plugin through the real
//! CNI exec protocol), in a new UTS namespace (hostname = pod name or
//! spec.hostname), a mount namespace that shows the pod its own
//! `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` ([`etc`]) and a
//! per-pod cgroup under the node's cgroup. Containers get their own mount
//! namespace made from the pod's (unless privileged, with `hostPID` and
//! nothing to mount)
//! ([`mounts`], [`volumes`]); images are labels that `--image-map` maps to
//! binaries on the node ([`image`]); `securityContext` sets the process's
//! user and capabilities ([`security`]), its PID namespace ([`process`],
//! [`pause`]), and what it may write of the node ([`mounts`]: unprivileged
//! containers get a minimal `/dev` of their own; `mountPropagation` works
//! both ways as upstream's). Init
//! containers run to completion, in order, before the app containers. Pods
//! share the node's IPC namespace (`hostIPC: false` is not isolated: not
//! yet, apart from `/dev/shm`).
//!
//! It runs inside the node's network namespace (the lab starts it there
//! with setns, not `ip netns exec`, so /run/netns and /sys stay shared),
//! talks to the API only through kube-rs, and keeps its pods' state under
//! `--root-dir` so a restart adopts running pods.
//!
//! Each container runs in a cgroup of its own below the pod's
//! ([`sandbox`]); one that is not privileged gets runc's default device
//! rules there ([`devices`]: an eBPF cgroup device program), so it cannot
//! open the node's disks or `/dev/mem` through any device node it reaches
//! or makes, and fails to start where the kernel cannot enforce them.

pub mod auth;
pub mod cni;
pub mod devices;
pub mod dns;
pub mod env;
pub mod etc;
pub mod exec;
pub mod hosts;
pub mod image;
pub mod mntns;
pub mod mounts;
pub mod node;
pub mod pause;
pub mod pod;
pub mod probes;
pub mod process;
pub mod sandbox;
pub mod security;
pub mod server;
pub mod state;
pub mod volumes;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Pod, Service, Taint};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{reflector::Store, watcher},
};
use tokio::sync::watch;

use crate::controllers::{
    events::Recorder,
    util::{Wake, next_pass, reflect},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cni: {0}")]
    Cni(String),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("process: {0}")]
    Process(String),
    #[error("kubelet setup: {what}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("api: {0}")]
    Api(#[from] kube::Error),
}

#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub node_ip: String,
    /// The kubelet API's port (advertised as the kubelet endpoint).
    pub port: u16,
    /// The kubelet API's certificate and client CA.
    pub tls: server::ServingTls,
    pub root_dir: PathBuf,
    /// The node's cgroup; pods get `pod-<uid>` under it.
    pub cgroup_root: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// First restart back-off (Kubernetes: 10s), doubled up to 300s.
    pub backoff_base: Duration,
    /// Lease renewal period (status every 4th).
    pub heartbeat: Duration,
    pub node_labels: BTreeMap<String, String>,
    pub register_taints: Vec<Taint>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub max_pods: u32,
    /// `--cluster-dns`: the nameservers of ClusterFirst pods.
    pub cluster_dns: Vec<IpAddr>,
    /// `--cluster-domain`, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// `--resolv-conf`: the node's resolver settings for `Default` pods
    /// (None: the flag was empty).
    pub resolv_conf: Option<PathBuf>,
    /// `--image-map`: what each image runs.
    pub image_map: image::ImageMap,
    /// `--host-path-root`: where `hostPath` volumes live (None: `/`).
    pub host_path_root: Option<PathBuf>,
    /// `--host-path-shared`: prefixes `hostPath` keeps real under a root.
    pub host_path_shared: Vec<PathBuf>,
    /// `--host-path-map`: hostPath prefixes resolved elsewhere (FROM, TO).
    pub host_path_map: Vec<(PathBuf, PathBuf)>,
    /// What pods that are not `privileged` must not see ([`mounts`]): the
    /// root dir, the kubelet's credentials, `--mask-path`.
    pub masked_paths: Vec<PathBuf>,
    /// The cluster CA (PEM) pods get as `ca.crt`, from the kubelet's
    /// kubeconfig.
    pub cluster_ca_pem: Option<Vec<u8>>,
    /// How long the kubelet API reuses TokenReview and SubjectAccessReview answers.
    pub auth_cache: auth::CacheTtls,
}

/// DER certificates as one PEM bundle.
pub fn pem_bundle(ders: &[Vec<u8>]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = String::new();
    for der in ders {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// What the log server needs to know about a pod.
#[derive(Debug, Clone)]
pub struct Registered {
    pub uid: String,
    /// container → (restartCount, pid while running)
    pub containers: BTreeMap<String, (i32, Option<i32>)>,
    /// container → what its processes (and `kubectl exec`) run as.
    pub security: BTreeMap<String, security::Security>,
    pub placement: process::Placement,
}

pub struct Shared {
    pub client: Client,
    pub cfg: Config,
    pub cni: cni::Cni,
    pub services: Store<Service>,
    pub pod_cidr: watch::Receiver<Option<String>>,
    pub registry: Mutex<HashMap<(String, String), Registered>>,
    pub recorder: Recorder,
}

/// A pod worker: its input (latest Pod, None once deleted) and its task.
type WorkerHandle = (watch::Sender<Option<Arc<Pod>>>, tokio::task::JoinHandle<()>);

/// Runs the kubelet until the process ends.
pub async fn run(client: Client, cfg: Config) -> Result<(), Error> {
    for d in [&cfg.root_dir, &cfg.cgroup_root] {
        std::fs::create_dir_all(d).map_err(|source| Error::Setup { what: format!("creating {}", d.display()), source })?;
    }
    mntns::prepare(&cfg.root_dir)?;
    node::register(&client, &cfg).await?;
    node::renew_lease(&client, &cfg).await?;
    tokio::spawn(node::heartbeat(client.clone(), cfg.clone(), cfg.heartbeat));

    // The node's podCIDR, from our own Node object.
    let (cidr_tx, cidr_rx) = watch::channel(None);
    let node_wake = Wake::default();
    let nodes = reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", cfg.node_name)),
        vec![node_wake.clone()],
    )
    .await;
    {
        let nodes = nodes.clone();
        let name = cfg.node_name.clone();
        let mut rx = node_wake.subscribe();
        tokio::spawn(async move {
            loop {
                let cidr = nodes
                    .state()
                    .iter()
                    .find(|n| n.name_any() == name)
                    .and_then(|n| n.spec.as_ref()?.pod_cidr.clone())
                    .filter(|c| !c.is_empty());
                if cidr.is_some() && *cidr_tx.borrow() != cidr {
                    tracing::info!(pod_cidr = ?cidr, "node pod CIDR");
                    cidr_tx.send_replace(cidr);
                }
                next_pass(&mut rx, Duration::from_secs(5)).await;
            }
        });
    }

    let services = reflect(Api::<Service>::all(client.clone()), watcher::Config::default(), vec![]).await;
    let pod_wake = Wake::default();
    let pods = reflect(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name)),
        vec![pod_wake.clone()],
    )
    .await;

    let shared = Arc::new(Shared {
        client: client.clone(),
        cni: cni::Cni { conf_dir: cfg.cni_conf_dir.clone(), bin_dir: cfg.cni_bin_dir.clone() },
        services,
        pod_cidr: cidr_rx,
        registry: Mutex::new(HashMap::new()),
        recorder: Recorder::new(client, "kubelet", Some(cfg.node_name.clone())),
        cfg: cfg.clone(),
    });

    let addr: SocketAddr = format!("{}:{}", cfg.node_ip, cfg.port)
        .parse()
        .map_err(|e| Error::Setup { what: format!("kubelet address {}:{}", cfg.node_ip, cfg.port), source: std::io::Error::other(e) })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Setup { what: format!("binding {addr}"), source })?;
    let router = server::router(shared.clone())
        .merge(crate::exec::router(Arc::new(exec::KubeletExec(shared.clone()))));
    let auth = Arc::new(auth::KubeletAuth::new(shared.client.clone(), cfg.node_name.clone(), cfg.auth_cache).map_err(|_| {
        Error::Setup { what: "kubelet API: drawing the token cache's HMAC key".into(), source: std::io::Error::other("no system randomness") }
    })?);
    server::serve(listener, &cfg.tls, router, auth)
        .map_err(|e| Error::Setup { what: format!("kubelet API TLS on {addr}"), source: std::io::Error::other(e) })?;
    tracing::info!(node = %cfg.node_name, %addr, "kubelet running");

    // Pods of an earlier run of this kubelet.
    let mut adopted: HashMap<String, state::PodState> =
        state::PodState::load_all(&cfg.root_dir).into_iter().map(|s| (s.uid.clone(), s)).collect();
    if !adopted.is_empty() {
        tracing::info!(pods = adopted.len(), "adopting pods from the previous run");
    }
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut rx = pod_wake.subscribe();
    let mut first = true;
    loop {
        let current = pods.state();
        let mut seen = std::collections::HashSet::new();
        for p in &current {
            if p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(cfg.node_name.as_str()) {
                continue;
            }
            let uid = p.uid().unwrap_or_default();
            seen.insert(uid.clone());
            if let Some((tx, _)) = workers.get(&uid) {
                tx.send_replace(Some(p.clone()));
                continue;
            }
            // A finished pod we never ran (e.g. after our restart) needs no
            // worker unless we hold state for it.
            let adopted_state = adopted.remove(&uid);
            let (tx, wrx) = watch::channel(Some(p.clone()));
            let w = pod::Worker::new(shared.clone(), p, adopted_state);
            let h = tokio::spawn(w.run(wrx));
            workers.insert(uid, (tx, h));
        }
        for (uid, (tx, _)) in &workers {
            if !seen.contains(uid) {
                tx.send_replace(None);
            }
        }
        workers.retain(|_, (_, h)| !h.is_finished());
        if first {
            // Pods on disk that no longer exist in the API.
            for (_, st) in adopted.drain() {
                tracing::info!(pod = %format!("{}/{}", st.namespace, st.name), "cleaning up pod that no longer exists");
                tokio::spawn(pod::cleanup_orphan(shared.clone(), st));
            }
            first = false;
        }
        next_pass(&mut rx, Duration::from_secs(2)).await;
    }
}
