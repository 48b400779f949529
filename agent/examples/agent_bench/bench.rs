//! The agent's benchmark (`cargo xtask bench`, or the `agent_bench`
//! example on its own): numbers are reported, never asserted.
//!
//! Setup: our apiserver on 127.0.0.1 (data on tmpfs, so the load phase
//! measures the apiserver, not the disk) loaded with N Services of 5
//! endpoints each, and the real `riptide-agent` binary as a node of its own
//! (pins under `/sys/fs/bpf/riptide/rtab-<pid>/`, `--no-routes`, nothing
//! attached: it only writes maps, so it needs no namespace).
//!
//! The endpoints are Pods, as in a cluster: Services `2k` and `2k + 1`
//! select the same 5 Pods (a pod behind two Services, as a ClusterIP and a
//! headless or metrics Service), so N Services have 2.5 N Pods, 30 per Node
//! (the average of SIG Scalability's 5,000-node / 150,000-pod envelope): the
//! agent's own Node runs the first 30, the rest run on Nodes with a /27
//! podCIDR each. Pods and Nodes carry what a kubelet and a Deployment give
//! them (owner reference, a few labels and annotations, container ports,
//! env, conditions, container statuses; images on Nodes), because the
//! agent watches every Pod and Node of the cluster and decodes all of it.
//!
//! - **full resync**: agent start → ready (all Services listed, every map
//!   entry written), the agent's own initial-sync time, a restart (`kill -9`,
//!   pins kept) → ready; peak RSS (`VmHWM`) and steady RSS (`VmRSS` once
//!   the pass is over).
//! - **baseline agent** (`--baseline-agent PATH`): the same cold start of
//!   another agent binary (an earlier build) against the same loaded
//!   apiserver, before the agent under test, so RSS and start-up compare
//!   within one run.
//! - **programming latency**: one EndpointSlice at a time gets a new
//!   endpoint address (merge patch); from the apiserver's answer (the change
//!   is accepted) to the new backend being visible in the pinned maps,
//!   polled directly (master entry → slots → backend), p50/p90/p99.
//! - **kube-proxy comparison**: `iptables-restore` of the kube-proxy-shaped
//!   ruleset (`riptide_test_support::kubeproxy`, as the network benchmark
//!   uses) for the same
//!   Services in a throwaway namespace: the initial load and the full
//!   re-restore iptables mode does for that same one-endpoint change
//!   (kube-proxy without KEP-3453's partial sync).

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use riptide_common::{BackendKey, BackendValue, SvcKey, SvcValue, names, proto};
use riptide_test_support::{kubeproxy, netns, procfs};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn step<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| Error::Step { what, source: Box::new(e) }
}

/// Sizes and sample counts of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub latency_samples: usize,
    /// Pods per Node (the agent's own Node included).
    pub pods_per_node: usize,
    /// 0: no kube-proxy comparison.
    pub iptables_runs: usize,
    /// An agent binary to cold-start first, as the baseline of this run.
    pub baseline_agent: Option<PathBuf>,
}

impl Options {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self { services: 2_000, endpoints_per_service: 5, latency_samples: 40, pods_per_node: PODS_PER_NODE, iptables_runs: 2, baseline_agent: None }
        } else {
            Self { services: 10_000, endpoints_per_service: 5, latency_samples: 200, pods_per_node: PODS_PER_NODE, iptables_runs: 5, baseline_agent: None }
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub(crate) fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Self { samples: v.len(), p50_ms: pick(0.5), p90_ms: pick(0.9), p99_ms: pick(0.99), max_ms: v.last().copied().unwrap_or(0.0) }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Resync {
    /// Agent process start → ready (includes listing every object).
    pub cold_start_to_ready_ms: f64,
    /// The agent's own time for the first full sync pass (maps written).
    pub initial_sync_ms: Option<f64>,
    /// `kill -9` + start with the pins in place → ready (ids adopted,
    /// nothing rewritten).
    pub restart_to_ready_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct IptablesRestore {
    /// `iptables --version` (nf_tables or legacy backend).
    pub iptables: String,
    pub rules: usize,
    pub bytes: usize,
    /// Empty nat table → the full ruleset.
    pub initial_restore_ms: Percentiles,
    /// The full ruleset again with one endpoint changed (what iptables-mode
    /// kube-proxy does per sync without partial sync).
    pub change_restore_ms: Percentiles,
}

/// One agent binary's cold start → ready and its memory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ColdStart {
    pub agent: String,
    pub start_to_ready_ms: f64,
    pub initial_sync_ms: Option<f64>,
    /// `VmHWM` once ready, MiB.
    pub peak_rss_mib: f64,
    /// `VmRSS` [`SETTLE`] after ready, MiB.
    pub rss_mib: f64,
    /// Of `rss_mib`: anonymous memory (`RssAnon`: heap, stacks), MiB.
    pub rss_anon_mib: f64,
    /// Of `rss_mib`: pages of mapped files (`RssFile`: the executable and
    /// its libraries), MiB.
    pub rss_file_mib: f64,
}

/// How long after ready the steady RSS is read (the first GC pass, map
/// sampling and any post-sync trimming are done by then).
pub const SETTLE: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Default, Serialize)]
pub struct AgentBenchReport {
    pub quick: bool,
    pub services: usize,
    pub endpoints: usize,
    pub pods: usize,
    /// Nodes, the agent's own included.
    pub nodes: usize,
    /// Creating the Services, EndpointSlices, Pods and Nodes in the
    /// apiserver.
    pub apiserver_load_s: f64,
    pub resync: Resync,
    /// EndpointSlice change answered by the apiserver → backend in the maps.
    pub programming_latency: Percentiles,
    /// The same, measured from sending the request.
    pub programming_latency_from_request: Percentiles,
    /// `VmHWM` of the agent after the cold start's full resync, MiB.
    pub agent_peak_rss_after_resync_mib: f64,
    /// `VmRSS` of the agent [`SETTLE`] after the cold start was ready, MiB.
    pub agent_rss_after_resync_mib: f64,
    /// Of that: anonymous memory (`RssAnon`), MiB.
    pub agent_rss_anon_after_resync_mib: f64,
    /// Of that: pages of the executable and its libraries (`RssFile`), MiB.
    pub agent_rss_file_after_resync_mib: f64,
    /// `VmHWM` of the restarted agent at the end (resync + latency samples), MiB.
    pub agent_peak_rss_mib: f64,
    /// `VmRSS` of the restarted agent at the end, MiB.
    pub agent_rss_steady_mib: f64,
    /// The `--baseline-agent` binary's cold start in this run.
    pub baseline: Option<ColdStart>,
    pub kube_proxy_iptables_restore: Option<IptablesRestore>,
    pub notes: Vec<String>,
}

/// The runtime the benchmarks run on, once it is clear they run as root
/// (eBPF pins, network namespaces).
pub(crate) fn root_runtime() -> Result<tokio::runtime::Runtime> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Failed("the agent benchmark needs root (eBPF, network namespaces)".into()));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(step("starting a tokio runtime"))
}

/// Runs the benchmark (needs root); `quick` marks a run under a minute.
pub fn run_with(opts: &Options, quick: bool) -> Result<AgentBenchReport> {
    let rt = root_runtime()?;
    let mut report = AgentBenchReport {
        quick,
        services: opts.services,
        endpoints: opts.services * opts.endpoints_per_service,
        pods: Layout::of(opts).pods,
        nodes: Layout::of(opts).nodes(),
        ..AgentBenchReport::default()
    };
    rt.block_on(agent_part(opts, &mut report))?;
    if opts.iptables_runs == 0 {
        return Ok(report);
    }
    report.kube_proxy_iptables_restore = match iptables_part(opts) {
        Ok(r) => Some(r),
        Err(e) => {
            report.notes.push(format!("kube-proxy comparison skipped: {}", riptide_agent::reconcile::error_chain(&e)));
            None
        }
    };
    Ok(report)
}

/// Binaries next to the running executable (or its parent: examples live in
/// `target/<profile>/examples/`), or from `RIPTIDE_AGENT_BIN` /
/// `RIPTIDE_CONTROLPLANE_BIN`.
pub(crate) fn find_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(step("locating the running executable"))?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Failed(format!(
        "{name} not found next to {} (build it: cargo build --release -p riptide-agent -p riptide-controlplane, or set {env})",
        exe.display()
    )))
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(step(format!("running {}", args.join(" "))))?;
    if !out.status.success() {
        return Err(Error::Failed(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// Everything the agent part created; removed on drop.
pub(crate) struct World {
    pub(crate) node: String,
    pub(crate) data: PathBuf,
    pub(crate) procs: Vec<Child>,
}

impl World {
    /// Node `<node_prefix>-<pid>`, data on tmpfs (the apiserver fsyncs
    /// every write, and the load phase should measure the apiserver, not
    /// the disk).
    pub(crate) fn new(node_prefix: &str, dir_prefix: &str) -> Result<Self> {
        let pid = std::process::id();
        let w = Self {
            node: format!("{node_prefix}-{pid}"),
            data: PathBuf::from(format!("/dev/shm/{dir_prefix}-{pid}")),
            procs: Vec::new(),
        };
        std::fs::create_dir_all(&w.data).map_err(step("creating the bench data dir"))?;
        Ok(w)
    }

    pub(crate) fn sock(&self) -> PathBuf {
        self.data.join("agent.sock")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = riptide_datapath::unpin_node(&self.node);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn vip(i: usize) -> Ipv4Addr {
    // 10.43.64.0 and up (clear of the apiserver's own 10.43.0.1).
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 64, 0)) + u32::try_from(i).unwrap_or(0))
}

/// A fresh address for latency sample `k` (never used by the load).
fn sample_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 46, 0, 0)) + u32::try_from(k).unwrap_or(0))
}

const TARGET_PORT: u16 = 8080;

/// Pods per Node: SIG Scalability's envelope (5,000 Nodes, 150,000 Pods).
pub const PODS_PER_NODE: usize = 30;

/// Services per Pod: Services `2k` and `2k + 1` select the same Pods.
const SERVICES_PER_POD: usize = 2;

/// Where the Pods are: Pod `p` is replica `p % per` of app `p / per`; the
/// agent's Node runs Pods `0..per_node`, remote Node `r` the next
/// `per_node` from its /27 of 10.42.8.0/17 (inside the agent's default
/// --cluster-cidr, so none is refused).
#[derive(Clone, Copy, Debug)]
struct Layout {
    pods: usize,
    per: usize,
    per_node: usize,
}

impl Layout {
    fn of(o: &Options) -> Self {
        let per_node = o.pods_per_node.clamp(1, 30);
        Self { pods: o.services.div_ceil(SERVICES_PER_POD) * o.endpoints_per_service, per: o.endpoints_per_service, per_node }
    }

    /// Remote Nodes.
    fn remote_nodes(self) -> usize {
        self.pods.saturating_sub(self.per_node).div_ceil(self.per_node)
    }

    fn nodes(self) -> usize {
        1 + self.remote_nodes()
    }

    /// Endpoint `j` of Service `i`: its Pod.
    fn pod_of(self, i: usize, j: usize) -> usize {
        (i / SERVICES_PER_POD) * self.per + j
    }

    /// `None`: the agent's own Node; else the remote Node's index.
    fn node_of(self, p: usize) -> Option<usize> {
        p.checked_sub(self.per_node).map(|q| q / self.per_node)
    }

    fn pod_ip(self, p: usize) -> Ipv4Addr {
        let at = |base: Ipv4Addr, off: usize| Ipv4Addr::from(u32::from(base) + u32::try_from(off).unwrap_or(0));
        match self.node_of(p) {
            // The agent's pod range (`POD_CIDR`), from .2.
            None => at(Ipv4Addr::new(10, 42, 7, 2), p),
            Some(r) => at(Ipv4Addr::new(10, 42, 8, 1), r * 32 + (p - self.per_node) % self.per_node),
        }
    }

    fn pod_cidr(r: usize) -> String {
        let base = u32::from(Ipv4Addr::new(10, 42, 8, 0)) + u32::try_from(r * 32).unwrap_or(0);
        format!("{}/27", Ipv4Addr::from(base))
    }

    fn node_name(self, p: usize, own: &str) -> String {
        self.node_of(p).map_or_else(|| own.to_owned(), remote_node_name)
    }
}

fn remote_node_name(r: usize) -> String {
    format!("node-{r:04}.bench.internal")
}

/// Endpoint `(address, node)` list of a slice.
fn slice_endpoints(eps: &[(Ipv4Addr, String)]) -> serde_json::Value {
    serde_json::Value::Array(
        eps.iter()
            .map(|(ip, node)| serde_json::json!({"addresses": [ip.to_string()], "nodeName": node, "conditions": {"ready": true, "serving": true, "terminating": false}}))
            .collect(),
    )
}

/// Pod `p` as a Deployment's ReplicaSet and the scheduler write it, and its
/// status as the kubelet writes it.
fn pod_objects(l: Layout, p: usize, node: &str) -> (serde_json::Value, serde_json::Value) {
    let app = p / l.per;
    let hash = format!("{:010x}", (app as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24);
    let rs = format!("app{app}-{}", &hash[..10]);
    let ip = l.pod_ip(p).to_string();
    let t = "2026-12-07T10:00:00Z";
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{rs}-{:05x}", p), "namespace": "default", "generateName": format!("{rs}-"),
            "labels": {"app": format!("app{app}"), "pod-template-hash": &hash[..10], "app.kubernetes.io/part-of": "bench"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": t, "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": format!("00000000-0000-4000-8000-{app:012}"), "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 30, "schedulerName": "default-scheduler",
            "containers": [{
                "name": "app", "image": "registry.bench.internal/app:1.4.2", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": TARGET_PORT, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "APP", "value": format!("app{app}")}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
            }],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        },
    });
    let cond = |ty: &str| serde_json::json!({"type": ty, "status": "True", "lastTransitionTime": t});
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "198.18.0.1", "startTime": t, "qosClass": "Burstable",
        "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
        "containerStatuses": [{
            "name": "app", "ready": true, "started": true, "restartCount": 0, "image": "registry.bench.internal/app:1.4.2",
            "imageID": "registry.bench.internal/app@sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
            "containerID": format!("containerd://{:064x}", p), "state": {"running": {"startedAt": t}},
        }],
    }});
    (pod, status)
}

/// Remote Node `r` as a kubelet registers it, and its status.
fn node_objects(r: usize) -> (serde_json::Value, serde_json::Value) {
    let name = remote_node_name(r);
    let cidr = Layout::pod_cidr(r);
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + u32::try_from(r).unwrap_or(0)).to_string();
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "node.kubernetes.io/instance-type": "m6i.2xlarge", "topology.kubernetes.io/zone": format!("zone-{}", r % 3)},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"},
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr], "providerID": format!("bench://{name}")},
    });
    let cond = |ty: &str, st: &str| serde_json::json!({"type": ty, "status": st, "lastHeartbeatTime": "2026-12-07T10:00:00Z", "lastTransitionTime": "2026-12-07T09:00:00Z", "reason": format!("Kubelet{ty}"), "message": "kubelet is posting ready status"});
    let images: Vec<serde_json::Value> = (0..20)
        .map(|k| serde_json::json!({"names": [format!("registry.bench.internal/img{k}@sha256:{:064x}", k), format!("registry.bench.internal/img{k}:1.0")], "sizeBytes": 50_000_000 + k}))
        .collect();
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
        "allocatable": {"cpu": "7800m", "memory": "31Gi", "pods": "110", "ephemeral-storage": "95Gi"},
        "conditions": [cond("MemoryPressure", "False"), cond("DiskPressure", "False"), cond("PIDPressure", "False"), cond("Ready", "True")],
        "nodeInfo": {"machineID": format!("{r:032x}"), "systemUUID": format!("{r:032x}"), "bootID": format!("{r:032x}"),
                     "kernelVersion": "6.18.0", "osImage": "Debian GNU/Linux 13", "containerRuntimeVersion": "containerd://2.1.0",
                     "kubeletVersion": "v1.34.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        "images": images,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
    }});
    (node, status)
}

/// The apiserver on 127.0.0.1 with its data in `w.data`: its kubeconfig
/// and a client.
pub(crate) async fn start_apiserver(w: &mut World) -> Result<(PathBuf, kube::Client)> {
    let cp_bin = find_bin("riptide-controlplane", "RIPTIDE_CONTROLPLANE_BIN")?;
    let mut cmd = Command::new(&cp_bin);
    cmd.args(["apiserver", "--listen", "127.0.0.1:0", "--history-revisions", "100000"])
        .arg("--data-dir")
        .arg(w.data.join("cp"))
        .stdout(Stdio::piped())
        .stderr(File::create(w.data.join("apiserver.log")).map_err(step("apiserver log"))?);
    let mut child = cmd.spawn().map_err(step("starting the apiserver"))?;
    let stdout = child.stdout.take();
    w.procs.push(child);
    let kubeconfig = read_kubeconfig_line(stdout)?;

    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).map_err(step("reading the apiserver's kubeconfig"))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(step("kubeconfig"))?;
    let client = kube::Client::try_from(cfg).map_err(step("creating the kube client"))?;

    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node_obj: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": w.node},
        "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]},
    }))
    .map_err(step("node object"))?;
    nodes.create(&PostParams::default(), &node_obj).await.map_err(step("creating the Node"))?;
    Ok((kubeconfig, client))
}

/// The agent's node's pod range.
pub(crate) const POD_CIDR: &str = "10.42.7.0/24";

/// Starts `riptide-agent` as node `w.node`; its pid.
pub(crate) fn start_agent(w: &mut World, kubeconfig: &Path) -> Result<u32> {
    let agent_bin = find_bin("riptide-agent", "RIPTIDE_AGENT_BIN")?;
    start_agent_bin(w, kubeconfig, &agent_bin)
}

fn start_agent_bin(w: &mut World, kubeconfig: &Path, agent_bin: &Path) -> Result<u32> {
    let log = File::options().create(true).append(true).open(w.data.join("agent.log")).map_err(step("agent log"))?;
    let mut cmd = Command::new(agent_bin);
    cmd.arg("--node-name")
        .arg(&w.node)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--api-socket")
        .arg(w.sock())
        .arg("--pod-cidr-file")
        .arg(w.data.join("podcidr"))
        // Nothing attached and no routes: the agent only writes its
        // pinned maps, so it can run in the root namespace.
        .args(["--metrics-addr", "off", "--node-ip", "198.18.77.1", "--no-routes"])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().map_err(step("agent log"))?)
        .stderr(log);
    let child = cmd.spawn().map_err(step("starting riptide-agent"))?;
    let pid = child.id();
    w.procs.push(child);
    Ok(pid)
}

/// The remote Nodes, then every Pod.
async fn load_nodes_and_pods(client: &kube::Client, l: Layout, own: &str) -> Result<()> {
    create_with_status(&Api::<Node>::all(client.clone()), (0..l.remote_nodes()).map(node_objects)).await?;
    let pods = (0..l.pods).map(|p| pod_objects(l, p, &l.node_name(p, own)));
    create_with_status(&Api::<Pod>::namespaced(client.clone(), "default"), pods).await
}

/// Creates each object, then writes its status as its controller would
/// (a subresource: a create drops it), 32 requests in flight.
async fn create_with_status<K>(api: &Api<K>, objects: impl Iterator<Item = (serde_json::Value, serde_json::Value)>) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
{
    futures::stream::iter(objects)
        .map(|(object, status)| async move {
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let object: K = serde_json::from_value(object).map_err(step(format!("{name}: object")))?;
            api.create(&PostParams::default(), &object).await.map_err(step(format!("creating {name}")))?;
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.map_err(step(format!("{name}: status")))?;
            Ok::<(), Error>(())
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn agent_part(opts: &Options, report: &mut AgentBenchReport) -> Result<()> {
    let mut w = World::new("rtab", "riptide-agent-bench")?;
    let (kubeconfig, client) = start_apiserver(&mut w).await?;
    let node = w.node.clone();

    // Load.
    let started = Instant::now();
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let per = opts.endpoints_per_service;
    let layout = Layout::of(opts);
    let endpoints = |i: usize, js: std::ops::Range<usize>| -> Vec<(Ipv4Addr, String)> {
        js.map(|j| layout.pod_of(i, j)).map(|p| (layout.pod_ip(p), layout.node_name(p, &node))).collect()
    };
    load_nodes_and_pods(&client, layout, &node).await?;
    futures::stream::iter(0..opts.services)
        .map(|i| {
            let (svcs, slices, endpoints) = (svcs.clone(), slices.clone(), &endpoints);
            async move {
                let svc: Service = serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("s{i}"), "namespace": "default"},
                    "spec": {"clusterIP": vip(i).to_string(), "ports": [{"name": "p", "port": 80, "targetPort": TARGET_PORT, "protocol": "TCP"}]},
                }))
                .map_err(step("service object"))?;
                svcs.create(&PostParams::default(), &svc).await.map_err(step(format!("creating Service s{i}")))?;
                let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("s{i}-1"), "namespace": "default", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                    "addressType": "IPv4",
                    "ports": [{"name": "p", "port": TARGET_PORT, "protocol": "TCP"}],
                    "endpoints": slice_endpoints(&endpoints(i, 0..per)),
                }))
                .map_err(step("slice object"))?;
                slices.create(&PostParams::default(), &slice).await.map_err(step(format!("creating EndpointSlice s{i}-1")))?;
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    report.apiserver_load_s = started.elapsed().as_secs_f64();

    let sock = w.sock();
    let want = opts.services + 1; // + the apiserver's `kubernetes` Service
    if let Some(bin) = &opts.baseline_agent {
        let (run, ports) = cold_start(&mut w, &kubeconfig, bin).await?;
        if ports < want {
            report.notes.push(format!("baseline agent reported {ports} service ports, expected {want}"));
        }
        report.baseline = Some(run);
        if let Some(mut a) = w.procs.pop() {
            let _ = a.kill();
            let _ = a.wait();
        }
        // The agent under test starts cold too.
        riptide_datapath::unpin_node(&w.node).map_err(step("removing the baseline agent's pins"))?;
    }

    // Cold start → ready.
    let agent_bin = find_bin("riptide-agent", "RIPTIDE_AGENT_BIN")?;
    let (run, ports) = cold_start(&mut w, &kubeconfig, &agent_bin).await?;
    report.resync.cold_start_to_ready_ms = run.start_to_ready_ms;
    report.resync.initial_sync_ms = run.initial_sync_ms;
    report.agent_peak_rss_after_resync_mib = run.peak_rss_mib;
    report.agent_rss_after_resync_mib = run.rss_mib;
    report.agent_rss_anon_after_resync_mib = run.rss_anon_mib;
    report.agent_rss_file_after_resync_mib = run.rss_file_mib;
    if ports < want {
        report.notes.push(format!("agent reported {ports} service ports, expected {want}"));
    }

    // Restart with pins in place.
    if let Some(mut a) = w.procs.pop() {
        let _ = a.kill();
        let _ = a.wait();
    }
    let t0 = Instant::now();
    let agent_pid = start_agent(&mut w, &kubeconfig)?;
    wait_ready(&sock, Duration::from_secs(600)).await?;
    report.resync.restart_to_ready_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Programming latency.
    let dir = riptide_datapath::pin_dir(&w.node).map_err(step("pin dir"))?;
    let probe = Probe::open(&dir)?;
    let mut accepted = Vec::new();
    let mut requested = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for k in 0..opts.latency_samples {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = usize::try_from(rng % opts.services as u64).unwrap_or(0);
        let mut eps = endpoints(i, 1..per);
        let fresh = sample_ip(k);
        eps.insert(0, (fresh, node.clone()));
        let patch = serde_json::json!({"endpoints": slice_endpoints(&eps)});
        let sent = Instant::now();
        slices
            .patch(&format!("s{i}-1"), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(step(format!("patching EndpointSlice s{i}-1")))?;
        let answered = Instant::now();
        let want = SocketAddrV4::new(fresh, TARGET_PORT);
        let seen = probe.wait_for(vip(i), 80, want, Duration::from_secs(10))?;
        let Some(seen) = seen else {
            report.notes.push(format!("sample {k}: backend {want} of s{i} not visible after 10 s"));
            continue;
        };
        accepted.push(seen.saturating_duration_since(answered).as_secs_f64() * 1e3);
        requested.push(seen.saturating_duration_since(sent).as_secs_f64() * 1e3);
        // Independent changes: let the agent's debounce window close.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.programming_latency = Percentiles::of(accepted);
    report.programming_latency_from_request = Percentiles::of(requested);
    report.agent_peak_rss_mib = vm_hwm_mib(agent_pid);
    report.agent_rss_steady_mib = vm_rss_mib(agent_pid);
    drop(w);
    Ok(())
}

/// Starts `bin` with no pins → ready; its numbers and the service ports it
/// reported. The agent keeps running (last in `w.procs`).
async fn cold_start(w: &mut World, kubeconfig: &Path, bin: &Path) -> Result<(ColdStart, usize)> {
    let sock = w.sock();
    let t0 = Instant::now();
    let pid = start_agent_bin(w, kubeconfig, bin)?;
    let mut status = wait_ready(&sock, Duration::from_secs(600)).await?;
    let start_to_ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Readiness flips inside the pass; its duration is recorded right after.
    for _ in 0..200 {
        if status["last_sync_ms"].is_number() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        status = wait_ready(&sock, Duration::from_secs(5)).await?;
    }
    let ports = status["service_ports"].as_u64().unwrap_or(0) as usize;
    tokio::time::sleep(SETTLE).await;
    let run = ColdStart {
        agent: bin.display().to_string(),
        start_to_ready_ms,
        initial_sync_ms: status["last_sync_ms"].as_f64(),
        peak_rss_mib: vm_hwm_mib(pid),
        rss_mib: vm_rss_mib(pid),
        rss_anon_mib: proc_status_mib(pid, "RssAnon"),
        rss_file_mib: proc_status_mib(pid, "RssFile"),
    };
    // Per-mapping detail for profiling: `AGENT_BENCH_SMAPS_DIR=dir` keeps
    // each cold-started agent's `/proc/<pid>/smaps` there.
    if let Some(dir) = std::env::var_os("AGENT_BENCH_SMAPS_DIR") {
        let name = Path::new(&run.agent).file_name().map_or_else(|| "agent".into(), |n| n.to_string_lossy().into_owned());
        if let Err(e) = std::fs::copy(format!("/proc/{pid}/smaps"), Path::new(&dir).join(format!("{name}.smaps"))) {
            eprintln!("AGENT_BENCH_SMAPS_DIR: copying smaps of {pid}: {e}");
        }
    }
    Ok((run, ports))
}

pub(crate) fn read_kubeconfig_line(stdout: Option<std::process::ChildStdout>) -> Result<PathBuf> {
    use std::io::BufRead as _;
    let stdout = stdout.ok_or_else(|| Error::Failed("apiserver stdout not captured".into()))?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.map_err(step("reading the apiserver's output"))?;
        if let Some(p) = line.strip_prefix("kubeconfig ") {
            let p = PathBuf::from(p);
            std::thread::spawn(move || for _ in lines {});
            return Ok(p);
        }
    }
    Err(Error::Failed("the apiserver exited without printing its kubeconfig".into()))
}

/// GET `uri` on the agent's unix-socket API.
pub(crate) fn unix_get(sock: &Path, uri: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {uri} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

pub(crate) async fn wait_ready(sock: &Path, limit: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(body) = unix_get(sock, "/v1/status")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
            && v["ready"] == true
        {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(Error::Failed(format!("agent not ready after {limit:?}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) fn vm_hwm_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM")
}

pub(crate) fn vm_rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmRSS")
}

/// A `kB` field of `/proc/<pid>/status`, in MiB (0 when unreadable).
fn proc_status_mib(pid: u32, field: &str) -> f64 {
    procfs::status_kib(pid, [field]).map_or(0.0, |[kib]| kib as f64 / 1024.0)
}

/// Reads a frontend's backends straight from the pinned maps.
struct Probe {
    svc: BpfHashMap<MapData, SvcKey, SvcValue>,
    be: BpfHashMap<MapData, BackendKey, BackendValue>,
}

impl Probe {
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            Ok(Map::HashMap(MapData::from_pin(dir.join(name)).map_err(step(format!("opening pinned {name}")))?))
        };
        Ok(Self {
            svc: BpfHashMap::try_from(open(names::SVC4)?).map_err(step("rt_svc4_v1"))?,
            be: BpfHashMap::try_from(open(names::BE4)?).map_err(step("rt_be4_v1"))?,
        })
    }

    fn has(&self, vip: Ipv4Addr, port: u16, want: SocketAddrV4) -> bool {
        let mut key = SvcKey { vip_be: u32::from(vip).to_be(), port_be: port.to_be(), proto: proto::TCP, ..SvcKey::default() };
        let Ok(master) = self.svc.get(&key, 0) else { return false };
        (1..=master.count).any(|slot| {
            key.slot = slot;
            self.svc
                .get(&key, 0)
                .and_then(|s| self.be.get(&BackendKey { id: s.backend_id }, 0))
                .is_ok_and(|b| u32::from_be(b.addr_be) == u32::from(*want.ip()) && u16::from_be(b.port_be) == want.port())
        })
    }

    /// Polls until `want` is a backend of `vip:port`; the instant it was
    /// first seen.
    fn wait_for(&self, vip: Ipv4Addr, port: u16, want: SocketAddrV4, limit: Duration) -> Result<Option<Instant>> {
        let deadline = Instant::now() + limit;
        loop {
            if self.has(vip, port, want) {
                return Ok(Some(Instant::now()));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// `iptables-restore` timings in a throwaway namespace.
fn iptables_part(opts: &Options) -> Result<IptablesRestore> {
    let per = opts.endpoints_per_service;
    let layout = Layout::of(opts);
    let services: Vec<kubeproxy::SvcPort> = (0..opts.services)
        .map(|i| kubeproxy::SvcPort {
            name: format!("default/s{i}:p"),
            vip: vip(i),
            proto: kubeproxy::Proto::Tcp,
            port: 80,
            node_port: None,
            endpoints: (0..per).map(|j| (layout.pod_ip(layout.pod_of(i, j)), TARGET_PORT)).collect(),
        })
        .collect();
    let full = kubeproxy::iptables_restore(&services);
    let mut changed_services = services;
    if let Some(s) = changed_services.get_mut(opts.services / 2) {
        s.endpoints[0].0 = sample_ip(0);
    }
    let changed = kubeproxy::iptables_restore(&changed_services);
    let version = Command::new("iptables").arg("--version").output().map_err(step("iptables --version"))?;
    let mut r = IptablesRestore {
        iptables: String::from_utf8_lossy(&version.stdout).trim().to_owned(),
        rules: full.lines().filter(|l| l.starts_with("-A ")).count(),
        bytes: full.len(),
        ..IptablesRestore::default()
    };
    let mut initial = Vec::new();
    let mut change = Vec::new();
    for run in 0..opts.iptables_runs.max(1) {
        let ns = format!("rtipt-{}-{run}", std::process::id());
        sh(&["ip", "netns", "add", &ns])?;
        let res = (|| -> Result<(f64, f64)> {
            let a = restore(&ns, &full)?;
            let b = restore(&ns, &changed)?;
            Ok((a, b))
        })();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let (a, b) = res?;
        initial.push(a);
        change.push(b);
    }
    r.initial_restore_ms = Percentiles::of(initial);
    r.change_restore_ms = Percentiles::of(change);
    Ok(r)
}

/// One `iptables-restore` (flushing the nat table) in `ns`; wall time, ms.
fn restore(ns: &str, rules: &str) -> Result<f64> {
    let mut cmd = netns::try_command(ns, "iptables-restore").map_err(step(format!("opening netns {ns}")))?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(step("starting iptables-restore"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes()).map_err(step("feeding iptables-restore"))?;
    }
    let out = child.wait_with_output().map_err(step("waiting for iptables-restore"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        return Err(Error::Failed(format!("iptables-restore failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(ms)
}
