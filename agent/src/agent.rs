//! The agent's run loop: load the datapath, watch the cluster, and keep the
//! maps, routes, podCIDR file and health checks in step with it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;
use riptide_common::{CFG_F_MASQUERADE, CFG_F_POLICY, CFG_F_SOCK_LB, Config as DpConfig, PE_F_FAIL_CLOSED};
use riptide_datapath::{Datapath, NodeLock, Pinning, policy::PolicyMaps};
use tokio::sync::mpsc;

use crate::{
    api,
    gc::{Gc, GcConfig},
    health::{HealthServers, NodeHealth},
    metrics::Metrics,
    model::{self, Desired, NodeContext, Owner},
    policy::{Compiler, Inputs},
    policy_sync::{MapState, PolicySync, inputs_fingerprint},
    reconcile::{Reconciler, ServiceWriter as _},
    routes::{self, Routes},
    shared::{GcStatus, PolicyState, Shared, Status, lock},
    slim::{SlimPod, SlimSlice},
    store::{ObjKey, get_in, get_mut_in, remove_in},
    tunnel::{self, Tunnel},
    watch::{self, Change, Kind, Stores},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("datapath of node {node}: {action}")]
    Datapath {
        node: String,
        action: &'static str,
        #[source]
        source: riptide_datapath::Error,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("node routing")]
    Routes(#[source] routes::Error),
    #[error("vxlan tunnel")]
    Tunnel(#[source] tunnel::Error),
    #[error("conntrack GC")]
    Gc(#[source] Box<crate::gc::Error>),
    #[error("L2 announcements")]
    L2(#[source] crate::l2announce::Error),
}

/// Everything the agent is told on its command line.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// `None`: `KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the Node's InternalIP as the node address.
    pub node_ip: Option<Ipv4Addr>,
    pub cluster_cidr: Ipv4Network,
    /// The Service range: never an externalIP or LoadBalancer frontend.
    pub service_cidr: Ipv4Network,
    /// Answer ARP for LoadBalancer and external IPs (`None`: off).
    pub l2_announce: Option<crate::l2announce::Config>,
    pub api_socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub pod_cidr_file: PathBuf,
    pub proxy_name: Option<String>,
    /// `--lb-algorithm`, `--maglev-table-size`.
    pub lb: crate::lb_algorithm::Defaults,
    /// `--xdp` on the uplink.
    pub xdp: riptide_datapath::xdp::XdpSetting,
    /// The ConfigMap file of the `xdp` key, watched for live switches.
    pub xdp_watch: Option<PathBuf>,
    /// cgroup v2 directory to attach socket LB to.
    pub cgroup: Option<PathBuf>,
    /// Uplink device for the NodePort/SNAT tc programs.
    pub uplink: Option<String>,
    pub routes: bool,
    /// `--tunnel vxlan`: reach other nodes' pods through `riptide.vxlan`
    /// (see [`crate::tunnel`]) instead of routes via their addresses. Needs
    /// `uplink` and `routes`.
    pub tunnel: Option<tunnel::VxlanConfig>,
    pub masquerade: bool,
    pub hairpin_ip: Ipv4Addr,
    pub health_bind: Option<Ipv4Addr>,
    /// Quiet period that closes a batch of changes.
    pub debounce: Duration,
    /// Longest a batch may keep collecting under constant churn.
    pub max_batch: Duration,
    /// Claim a podCIDR on the own Node when cluster IPAM has not assigned
    /// one for this long (`None`: never). See [`crate::podcidr`].
    pub pod_cidr_fallback_after: Option<Duration>,
    /// Conntrack/NAT/affinity GC and stale-UDP cleanup (`cgroup` is filled
    /// in from [`Config::cgroup`]).
    pub gc: GcConfig,
    /// Most backends written per Service port (`None`: all). A Service
    /// with more is cut (ready ones first), gets a `BackendsTruncated`
    /// Event and shows in `riptide status` and the metrics.
    pub max_backends_per_service: Option<usize>,
    /// The apiserver unreachable this long makes the watch stale: not
    /// ready, named in `riptide status`; the maps keep serving.
    pub stale_after: Duration,
    /// kube-proxy's node health server (`:10256`, `/healthz`, `/livez`).
    pub healthz_addr: Option<SocketAddr>,
    /// A change waiting longer than this for a sync makes `/healthz` 503.
    pub health_timeout: Duration,
    /// How often the map sampler counts every map's entries.
    pub map_sample_interval: Duration,
    /// `max_entries` of the maps this start creates (pinned maps keep
    /// theirs).
    pub map_sizes: riptide_datapath::MapSizes,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let node = cfg.node_name.clone();
    // Before anything touches the pins: a second agent for this node would
    // share the maps and allocate ids of its own.
    let node_lock = NodeLock::acquire(&node).map_err(dp_err(&node, "taking the node lock"))?;
    tracing::info!(node = %node, lock = %node_lock.path().display(), "node lock held");
    let mut dp = Datapath::load_sized(&Pinning::Node(node.clone()), &cfg.map_sizes).map_err(dp_err(&node, "loading"))?;
    // SAFETY: the object is `include_bytes` data in the executable's
    // `.rodata`, never written. Loading parsed all of it; a device attach
    // that reads it again faults the pages back in.
    unsafe { crate::memory::release_file_pages(riptide_datapath::EBPF_OBJECT) };
    let pin_dir = dp.pin_dir().map(Path::to_path_buf);
    if let Some(dir) = &pin_dir {
        warn_pinned_sizes(dir, &cfg.map_sizes);
    }
    tracing::info!(node = %node, pins = ?pin_dir, "datapath loaded");
    let up = dp.upgrade();
    if !up.retired.is_empty() {
        tracing::info!(conntrack = up.ct_moved, nat = up.nat_moved, retired = ?up.retired, "took over the pins of an earlier version");
    }
    let services = dp.services().map_err(dp_err(&node, "opening the service maps"))?;
    let events = dp.events().map_err(dp_err(&node, "opening the events ring buffer"))?;
    let attachments = match &pin_dir {
        Some(dir) => attach(&mut dp, &cfg, dir)?,
        None => Vec::new(),
    };
    if let Some(dir) = &pin_dir {
        attach_to_pod(&mut dp, dir);
        if let (Some(file), Some(dev)) = (&cfg.xdp_watch, &cfg.uplink) {
            crate::xdp::watch(file.clone(), dir.clone(), dir.join("links"), dev.clone(), cfg.xdp);
        }
    }
    let shared = Arc::new(Shared {
        node: node.clone(),
        ready: AtomicBool::new(false),
        status: Mutex::new(Status {
            pin_dir: pin_dir.as_ref().map(|p| p.display().to_string()),
            attachments,
            tunnel_mode: cfg.tunnel.is_some(),
            ..Status::default()
        }),
        reconciler: Mutex::new(Reconciler::new()),
        services: Mutex::new(services),
        dp: Mutex::new(dp),
        metrics: Metrics::new(),
        gc_status: Mutex::new(GcStatus::default()),
        events: Arc::default(),
        policy: Mutex::new(PolicyState::default()),
        maps: Mutex::default(),
        pods: OnceLock::new(),
    });
    if let Some(dir) = &pin_dir {
        let weak = Arc::downgrade(&shared);
        let publish = move |snap: crate::map_usage::MapSnapshot, stats: Option<riptide_datapath::node_maps::Stats>| {
            let Some(shared) = weak.upgrade() else { return false };
            shared.metrics.observe_maps(&snap);
            if let Some(stats) = stats {
                shared.metrics.observe_stats(stats.named());
            }
            *lock(&shared.maps) = snap;
            true
        };
        crate::map_usage::spawn_sampler(dir.clone(), cfg.map_sample_interval, publish).map_err(|source| Error::Io {
            action: "starting the map sampler for",
            path: dir.clone(),
            source,
        })?;
    }
    let node_health = Arc::new(NodeHealth::new(cfg.health_timeout));
    if let Some(addr) = cfg.healthz_addr {
        match crate::health::serve_node_health(addr, node_health.clone()).await {
            Ok(_) => tracing::info!(%addr, "node health (kube-proxy /healthz, /livez) listening"),
            // Not fatal, as for metrics: the datapath matters more.
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve node health"),
        }
    }
    crate::events::spawn(events, Arc::downgrade(&shared.events), shared.metrics.clone()).map_err(|source| Error::Io {
        action: "reading datapath events of",
        path: PathBuf::from(&node),
        source,
    })?;
    // GC works on the pinned maps through its own handles (a private,
    // unpinned datapath has nothing worth collecting across restarts).
    let gc_tx = match &pin_dir {
        Some(_) => Some(start_gc(&cfg, &shared)?),
        None => None,
    };
    let _api = serve(&cfg, &shared).await?;

    let Some(client) = connect(&cfg).await? else {
        // Nothing to sync from: the pinned datapath is as up to date as it
        // gets.
        node_health.updated(true);
        shutdown.await;
        let _ = std::fs::remove_file(&cfg.api_socket);
        return Ok(());
    };
    lock(&shared.status).kubernetes = true;
    let (tx, rx) = mpsc::unbounded_channel();
    let stores = watch::start(&client, &node, &tx, &shared.metrics);
    // The watches start once per run, so the cell is still empty.
    let _ = shared.pods.set(stores.pods.clone());
    let node_ctx = NodeContext {
        node_name: node.clone(),
        proxy_name: cfg.proxy_name.clone(),
        lb: cfg.lb,
        reserved: crate::reserved::Reserved::new(cfg.cluster_cidr, cfg.service_cidr),
        node_ip: cfg.node_ip,
    };
    if let Some(l2) = cfg.l2_announce.clone() {
        let inputs = crate::l2announce::Inputs { services: stores.services.clone(), slices: stores.slices.clone(), nodes: stores.nodes.clone() };
        crate::l2announce::spawn(l2, client.clone(), inputs, node_ctx.clone(), cfg.node_ip, shared.metrics.clone()).map_err(Error::L2)?;
    }
    tokio::spawn(watch_apiserver(client.clone(), Arc::downgrade(&shared), cfg.stale_after));
    if let Some(after) = cfg.pod_cidr_fallback_after {
        let fb = crate::podcidr::Fallback { after, cluster: cfg.cluster_cidr, prefix: crate::podcidr::PREFIX };
        crate::podcidr::spawn(client.clone(), stores.nodes.clone(), node.clone(), fb);
    }
    let routes = if cfg.routes {
        Some(Routes::new(cfg.cluster_cidr).map_err(Error::Routes)?)
    } else {
        None
    };
    let tunnel = match cfg.tunnel {
        Some(t) => Some(Tunnel::new(t).map_err(Error::Tunnel)?),
        None => {
            if cfg.routes {
                remove_stale_tunnel(pin_dir.as_deref()).await;
            }
            None
        }
    };
    // The policy maps on their own descriptors. Pinned endpoint entries of
    // an earlier run mean policy is enforced now: the first config write
    // keeps CFG_F_POLICY, so a restart never opens isolated pods.
    let policy_maps = lock(&shared.dp).policy();
    let (policy, policy_on) = match policy_maps {
        Ok(maps) => {
            let on = maps.list_endpoints().is_ok_and(|e| !e.is_empty());
            (Some(PolicySync::new(maps)), on)
        }
        Err(e) => {
            // Never ready without enforcement (see `update_ready`).
            tracing::error!(error = %crate::reconcile::error_chain(&e), "cannot open the NetworkPolicy maps; NetworkPolicy is not enforced");
            (None, false)
        }
    };
    let mut lp = Loop {
        cfg: cfg.clone(),
        shared: shared.clone(),
        stores,
        ctx: node_ctx.clone(),
        refused: BTreeMap::new(),
        invalid_ranges: BTreeMap::new(),
        slice_index: HashMap::new(),
        slice_owner: HashMap::new(),
        synced: BTreeSet::new(),
        first_done: false,
        routes,
        tunnel,
        tunnel_attached: None,
        health: HealthServers::new(cfg.health_bind),
        written_config: None,
        gc_tx,
        gc_after_ready: false,
        compiler: Compiler::new(),
        policy,
        policy_on,
        policy_retry: false,
        policy_ok: false,
        policy_warnings: Vec::new(),
        policy_errors: Vec::new(),
        policy_inputs: None,
        policy_adopted: false,
        client: client.clone(),
        node_health,
        truncated: BTreeMap::new(),
        triggers: HashMap::new(),
        unclaimed_left: true,
    };
    tokio::select! {
        () = lp.run(rx) => {}
        () = shutdown => {}
    }
    // Pins stay: a restarted agent reuses the maps and flows keep working.
    tracing::info!("stopping; pinned maps and links stay for the next start");
    let _ = std::fs::remove_file(&cfg.api_socket);
    drop(node_lock);
    Ok(())
}

/// A map reused from its pin keeps the size it was created with: say so
/// when the configured size differs, so a ConfigMap change that did not
/// apply is not a mystery.
fn warn_pinned_sizes(dir: &Path, sizes: &riptide_datapath::MapSizes) {
    for (name, want) in sizes.iter() {
        if let Ok(info) = aya::maps::MapInfo::from_pin(dir.join(name))
            && info.max_entries() != want
        {
            tracing::warn!(
                map = name, configured = want, pinned = info.max_entries(),
                "map reused from its pin keeps its size; `riptide-agent uninstall` (drops its entries) and restart to resize"
            );
        }
    }
}

/// `map_err` for the datapath step `action` of `node`.
fn dp_err(node: &str, action: &'static str) -> impl FnOnce(riptide_datapath::Error) -> Error {
    move |source| Error::Datapath { node: node.to_owned(), action, source }
}

/// Attaches socket LB (to `--cgroup`) and the uplink programs (to
/// `--uplink`) and pins their links under `dir`: pinned links outlive the
/// agent, so the datapath keeps working while it restarts. Returns what was
/// attached, for `riptide status`.
fn attach(dp: &mut Datapath, cfg: &Config, dir: &Path) -> Result<Vec<String>, Error> {
    let links = dir.join("links");
    let mut attachments = Vec::new();
    if let Some(cg) = &cfg.cgroup {
        let att = dp.attach_sock_lb(cg).map_err(dp_err(&cfg.node_name, "attaching socket LB"))?;
        attachments.push(format!("socket-lb:{}", att.target()));
        att.pin(&links, "sock").map_err(dp_err(&cfg.node_name, "pinning socket-LB links"))?;
    }
    if let Some(dev) = &cfg.uplink {
        let att = dp.attach_uplink(dev).map_err(dp_err(&cfg.node_name, "attaching uplink programs"))?;
        // "uplink:eth0 (tcx)", or "(tc-netlink)" on kernels before 6.6.
        let mode = att.mode().map_or_else(String::new, |m| format!(" ({m})"));
        attachments.push(format!("uplink:{}{mode}", att.target()));
        att.pin(&links, "uplink").map_err(dp_err(&cfg.node_name, "pinning uplink links"))?;
        // Not fatal: NodePort & co work through tc without it.
        match crate::xdp::attach(dp, dev, cfg.xdp, &links) {
            Ok(line) => attachments.push(line),
            Err(e) => {
                tracing::error!(uplink = %dev, error = %e, "attaching the XDP program; NodePort stays on tc");
                attachments.push(format!("xdp:{dev} (failed)"));
            }
        }
    }
    Ok(attachments)
}

/// Ingress policy on veths of pods an older CNI created (see
/// [`crate::to_pod`]). Not fatal: those pods keep every other check.
fn attach_to_pod(dp: &mut Datapath, dir: &Path) {
    let endpoints = match dp.endpoints() {
        Ok(eps) => eps.list(),
        Err(e) => {
            tracing::warn!(error = %crate::reconcile::error_chain(&e), "cannot list endpoints to attach rt_to_pod");
            return;
        }
    };
    let rep = crate::to_pod::attach_missing(dir, &endpoints);
    if !rep.attached.is_empty() {
        tracing::info!(veths = ?rep.attached, "attached rt_to_pod to host veths of pods created by an older CNI");
    }
    if !rep.failed.is_empty() {
        tracing::warn!(failed = ?rep.failed, "cannot attach rt_to_pod: ingress NetworkPolicy misses traffic the kernel routes into these pods");
    }
}

/// Starts the GC thread on the node's pinned maps; returns its trigger.
fn start_gc(cfg: &Config, shared: &Arc<Shared>) -> Result<std::sync::mpsc::Sender<()>, Error> {
    let gc_cfg = GcConfig { cgroup: cfg.cgroup.clone(), ..cfg.gc.clone() };
    let gc = Gc::new(&cfg.node_name, gc_cfg, Arc::downgrade(shared)).map_err(|e| Error::Gc(Box::new(e)))?;
    gc.spawn().map_err(|source| Error::Io {
        action: "starting the GC thread for",
        path: PathBuf::from(&cfg.node_name),
        source,
    })
}

/// Serves the local API on the unix socket and, if asked, metrics on TCP.
async fn serve(cfg: &Config, shared: &Arc<Shared>) -> Result<tokio::task::JoinHandle<()>, Error> {
    let api = api::serve_unix(&cfg.api_socket, shared.clone()).map_err(|source| Error::Io {
        action: "serving the local API on",
        path: cfg.api_socket.clone(),
        source,
    })?;
    tracing::info!(socket = %cfg.api_socket.display(), "local API listening");
    if let Some(addr) = cfg.metrics_addr {
        match api::serve_metrics(addr, shared.clone()).await {
            Ok(_) => tracing::info!(%addr, "metrics listening"),
            // Not fatal: the datapath matters more than its metrics.
            Err(e) => tracing::warn!(%addr, error = %e, "cannot serve metrics"),
        }
    }
    Ok(api)
}

/// The Kubernetes client, or `None` when no API is configured at all (no
/// `--kubeconfig` and nothing to infer): the agent then runs the datapath
/// only. A kubeconfig that was given but fails is an error.
async fn connect(cfg: &Config) -> Result<Option<kube::Client>, Error> {
    match client(cfg).await {
        Ok(c) => Ok(Some(c)),
        Err(e) if cfg.kubeconfig.is_none() => {
            tracing::warn!(error = %crate::reconcile::error_chain(&e), "no Kubernetes API configured; running the datapath only");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Native routing after a run with `--tunnel vxlan`: the device and its
/// return-path rule would still catch pod → node traffic, so they go, and
/// with them the pins of the links that died with the device.
async fn remove_stale_tunnel(pin_dir: Option<&Path>) {
    let removed = match Tunnel::new(tunnel::VxlanConfig::default()) {
        Ok(mut t) => t.remove_device().await,
        Err(e) => Err(e),
    };
    match removed {
        Ok(true) => {
            tracing::info!(device = tunnel::DEVICE, "native routing: removed the vxlan device of an earlier run");
            if let Some(dir) = pin_dir {
                remove_link_pins(&dir.join("links"), "tunnel_");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "cannot remove a stale vxlan device"),
    }
}

/// Removes the link pins in `links` whose name starts with `prefix`; a pin
/// that cannot be read or removed only misleads, so errors are ignored.
fn remove_link_pins(links: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(links) else { return };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

async fn client(cfg: &Config) -> Result<kube::Client, Error> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?
        }
        None => kube::Config::infer().await.map_err(|e| Error::Client(kube::Error::InferConfig(e)))?,
    };
    kube::Client::try_from(config).map_err(Error::Client)
}

struct Loop {
    cfg: Config,
    shared: Arc<Shared>,
    stores: Stores,
    ctx: NodeContext,
    /// (namespace, service) → slice names. A vector: a Service has one
    /// slice or a few, and a `BTreeSet` would allocate a node of eleven.
    /// Keys and names are the slice store's own strings.
    slice_index: HashMap<ObjKey, Vec<Arc<str>>>,
    /// (namespace, slice) → service.
    slice_owner: HashMap<ObjKey, Arc<str>>,
    synced: BTreeSet<Kind>,
    first_done: bool,
    routes: Option<Routes>,
    tunnel: Option<Tunnel>,
    /// ifindex of the vxlan device the tc programs were attached to by this
    /// process (a recreated device needs them again).
    tunnel_attached: Option<u32>,
    health: HealthServers,
    written_config: Option<DpConfig>,
    /// Wakes the GC after service ports changed (stale UDP flows).
    gc_tx: Option<std::sync::mpsc::Sender<()>>,
    gc_after_ready: bool,
    compiler: Compiler,
    /// `None`: the policy maps could not be opened (never ready).
    policy: Option<PolicySync<PolicyMaps>>,
    /// `CFG_F_POLICY` wanted in the datapath config.
    policy_on: bool,
    /// The last policy pass failed somewhere: run again after a second.
    policy_retry: bool,
    /// The last policy pass wrote everything.
    policy_ok: bool,
    /// The compiler's warnings as last logged.
    policy_warnings: Vec<String>,
    /// The failed writes as last logged.
    policy_errors: Vec<String>,
    /// Fingerprint of the inputs of the last fully written compile.
    policy_inputs: Option<u64>,
    /// The compiler was offered the pinned maps' numbering.
    policy_adopted: bool,
    /// External frontends refused per owner ([`crate::reserved`]).
    refused: BTreeMap<Owner, usize>,
    /// `loadBalancerSourceRanges` entries that did not parse, per Service,
    /// as last reported in an Event.
    invalid_ranges: BTreeMap<Owner, Vec<String>>,
    /// For Events about Services.
    client: kube::Client,
    node_health: Arc<NodeHealth>,
    /// Services cut to the backend cap → (backends, kept), as last reported.
    truncated: BTreeMap<Owner, (usize, usize)>,
    /// EndpointSlice → its `last-change-trigger-time` as last observed in
    /// `riptide_network_programming_duration_seconds`.
    triggers: HashMap<(String, String), String>,
    /// Leftovers of an earlier run may still be in the maps: the first pass
    /// kept those of failing Services.
    unclaimed_left: bool,
}

#[derive(Default)]
struct Batch {
    owners: BTreeSet<Owner>,
    nodes: bool,
    /// Pods, Namespaces, NetworkPolicies or Nodes changed: recompile policy.
    policy: bool,
    full: bool,
}

impl Loop {
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Change>) {
        let retry = Duration::from_secs(1);
        loop {
            let pending = lock(&self.shared.reconciler).is_dirty() || self.policy_retry;
            let first = if pending {
                match tokio::time::timeout(retry, rx.recv()).await {
                    Ok(Some(c)) => Some(c),
                    Ok(None) => return,
                    Err(_) => None,
                }
            } else {
                match rx.recv().await {
                    Some(c) => Some(c),
                    None => return,
                }
            };
            let started = Instant::now();
            let mut batch = Batch::default();
            if first.is_some() {
                self.node_health.queued();
            }
            if let Some(c) = first {
                self.note(c, &mut batch);
                // Coalesce a burst: keep collecting until it goes quiet.
                while started.elapsed() < self.cfg.max_batch {
                    match tokio::time::timeout(self.cfg.debounce, rx.recv()).await {
                        Ok(Some(c)) => self.note(c, &mut batch),
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
            }
            if self.synced.len() < Kind::ALL.len() {
                continue;
            }
            if !self.first_done {
                batch.full = true;
                batch.nodes = true;
            }
            if batch.nodes {
                self.sync_nodes().await;
                if self.update_reserved() {
                    // A node address came or went: refusals may change anywhere.
                    batch.full = true;
                }
            }
            self.sync_services(&batch);
            if batch.policy || batch.full || self.policy_retry {
                self.sync_policy();
            }
            self.update_ready();
            self.node_health.updated(self.first_done);
            let elapsed = started.elapsed();
            self.shared.metrics.sync_seconds.observe(elapsed.as_secs_f64());
            {
                let mut st = lock(&self.shared.status);
                st.syncs += 1;
                st.last_sync_ms = Some(elapsed.as_secs_f64() * 1e3);
            }
            let checks = lock(&self.shared.reconciler).health_checks().clone();
            self.health.update(&checks).await;
            lock(&self.shared.status).health_check_ports = self.health.ports();
            if batch.full {
                crate::memory::release_freed();
            }
        }
    }

    fn note(&mut self, c: Change, b: &mut Batch) {
        match c {
            Change::Service { namespace, name } => {
                b.owners.insert(Owner::service(namespace, name));
            }
            Change::Slice { namespace, name, service, deleted } => {
                if let Some(old) = remove_in(&mut self.slice_owner, &namespace, &name) {
                    if let Some(set) = get_mut_in(&mut self.slice_index, &namespace, &old) {
                        set.retain(|s| **s != *name);
                    }
                    b.owners.insert(Owner::service(namespace.as_str(), old));
                }
                if let (false, Some(svc)) = (deleted, service) {
                    // The store's strings when it has the slice (it does
                    // unless a later event removed it again).
                    match self.stores.slices.get(&namespace, &name).filter(|s| s.service_name.as_deref() == Some(&*svc)) {
                        Some(s) => self.index_slice(&s),
                        None => self.index_slice(&SlimSlice { key: ObjKey::new(namespace.as_str(), name), service_name: Some(svc.as_str().into()), ..SlimSlice::default() }),
                    }
                    b.owners.insert(Owner::service(namespace, svc));
                }
            }
            Change::Node { .. } => {
                b.nodes = true;
                b.policy = true;
            }
            Change::Pod { namespace, name, local } => {
                // Only local pods own hostPorts; a pod never changes node.
                if local {
                    b.owners.insert(Owner::pod(namespace, name));
                }
                b.policy = true;
            }
            Change::Namespace { .. } | Change::NetworkPolicy { .. } => b.policy = true,
            Change::Resynced(kind) => {
                tracing::debug!(kind = kind.as_str(), "store synced");
                self.synced.insert(kind);
                b.full = true;
                if kind == Kind::Node {
                    b.nodes = true;
                }
            }
        }
    }

    fn rebuild_slice_index(&mut self) {
        self.slice_index.clear();
        self.slice_owner.clear();
        for s in self.stores.slices.state() {
            self.index_slice(&s);
        }
    }

    /// Adds slice `s` to its Service's entry of the slice index.
    fn index_slice(&mut self, s: &SlimSlice) {
        let Some(svc) = &s.service_name else { return };
        let names = self
            .slice_index
            .entry(ObjKey::new(Arc::clone(&s.key.namespace), Arc::clone(svc)))
            .or_insert_with(|| Vec::with_capacity(1));
        if !names.contains(&s.key.name) {
            names.push(Arc::clone(&s.key.name));
        }
        self.slice_owner.insert(s.key.clone(), Arc::clone(svc));
    }

    fn desired(&self, owner: &Owner) -> Desired {
        match owner {
            Owner::Service { namespace, name } => {
                let Some(svc) = self.stores.services.get(namespace, name) else {
                    return Desired::default();
                };
                let slices: Vec<_> = get_in(&self.slice_index, namespace, name)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| self.stores.slices.get(namespace, s))
                    .collect();
                let refs: Vec<_> = slices.iter().map(AsRef::as_ref).collect();
                model::service_desired(&svc, &refs, &self.ctx)
            }
            Owner::Pod { namespace, name } => match self.stores.pods.get(namespace, name) {
                Some(p) => model::pod_desired(&p, &self.ctx),
                None => Desired::default(),
            },
        }
    }

    fn sync_services(&mut self, batch: &Batch) {
        let shared = self.shared.clone();
        // A full pass walks the stores in chunks rather than listing every
        // owner (and computing every Desired) first: the pass's working
        // set is a chunk's, not the cluster's.
        let owners: Box<dyn Iterator<Item = Owner>> = if batch.full {
            self.rebuild_slice_index();
            let node = self.ctx.node_name.clone();
            let local = move |p: &SlimPod| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            };
            let (services, pods) = (self.stores.services.clone(), self.stores.pods.clone());
            lock(&shared.reconciler).retain_owners(|o| match o {
                Owner::Service { namespace, name } => services.get(namespace, name).is_some(),
                Owner::Pod { namespace, name } => {
                    pods.get(namespace, name).is_some_and(|p| local(&p))
                }
            });
            let services = services
                .state()
                .into_iter()
                .map(|s| Owner::service(Arc::clone(&s.key.namespace), Arc::clone(&s.key.name)));
            let pods = pods
                .state()
                .into_iter()
                .filter(move |p| local(p))
                .map(|p| Owner::pod(Arc::clone(&p.key.namespace), Arc::clone(&p.key.name)));
            Box::new(services.chain(pods))
        } else {
            Box::new(batch.owners.clone().into_iter())
        };
        if batch.full {
            self.refused.clear();
        }
        let mut truncations = Vec::new();
        let mut triggers = Vec::new();
        let mut owners = owners.peekable();
        while owners.peek().is_some() {
            let computed: Vec<(Owner, Desired)> = owners
                .by_ref()
                .take(PASS_CHUNK)
                .map(|o| {
                    let mut d = self.desired(&o);
                    if let (Some(cap), Owner::Service { .. }) =
                        (self.cfg.max_backends_per_service, &o)
                    {
                        truncations.push((o.clone(), crate::reconcile::cap_backends(&mut d, cap)));
                    }
                    if let Owner::Service { namespace, name } = &o {
                        triggers
                            .extend(self.slice_triggers(namespace, name).map(|t| (o.clone(), t)));
                    }
                    (o, d)
                })
                .collect();
            for (o, d) in &computed {
                if d.refused.is_empty() {
                    self.refused.remove(o);
                } else {
                    self.refused.insert(o.clone(), d.refused.len());
                }
                self.publish_invalid_ranges(o, &d.invalid_source_ranges);
            }
            let mut rec = lock(&shared.reconciler);
            for (o, d) in computed {
                rec.set(&o, d);
            }
        }
        shared
            .metrics
            .refused_frontends
            .set(i64::try_from(self.refused.values().sum::<usize>()).unwrap_or(i64::MAX));
        let mut rec = lock(&shared.reconciler);
        let mut svc = lock(&shared.services);
        let report = rec.apply(&mut *svc);
        shared.metrics.sync_errors.inc_by(report.failed.len() as u64);
        if report.upserted + report.removed > 0 {
            shared.metrics.syncs.inc();
        }
        let changed = report.upserted + report.removed > 0;
        let failing = rec.failing();
        // Leftovers of an earlier run go after the first full pass, except
        // the frontends of Services being retried (their old entries serve
        // meanwhile); those go once nothing fails any more.
        if !self.first_done || (self.unclaimed_left && failing.is_empty()) {
            let keep = rec.failing_frontends();
            match svc.finish_resync(&keep) {
                Ok(n) => {
                    if !self.first_done {
                        tracing::info!(ports = rec.applied().len(), stale_frontends = n, failing = failing.len(), "initial service sync done");
                    } else if n > 0 {
                        tracing::info!(stale_frontends = n, "removed the remaining leftovers of an earlier run");
                    }
                    self.first_done = true;
                    self.unclaimed_left = !keep.is_empty();
                }
                Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "removing stale entries failed; will retry"),
            }
        }
        let n_ports = rec.applied().len();
        drop(svc);
        drop(rec);
        let m = &shared.metrics;
        m.service_ports.set(i64::try_from(n_ports).unwrap_or(i64::MAX));
        m.failing_services.set(i64::try_from(failing.len()).unwrap_or(i64::MAX));
        if report.failed.is_empty() {
            m.last_sync_timestamp.set(unix_now());
        }
        self.observe_programming(triggers, &failing, batch.full);
        self.publish_truncations(truncations, batch.full);
        lock(&shared.status).failing_services = failing;
        // After the first full sync too: flows to backends removed while the
        // agent was down are only judged now that the view is complete.
        if (changed || self.first_done && !self.gc_after_ready)
            && let Some(tx) = &self.gc_tx
        {
            self.gc_after_ready = self.first_done;
            let _ = tx.send(());
        }
    }

    /// The `endpoints.kubernetes.io/last-change-trigger-time` of each
    /// EndpointSlice of Service `namespace/name`.
    fn slice_triggers(&self, namespace: &str, name: &str) -> impl Iterator<Item = ((String, String), String)> + '_ {
        let namespace = namespace.to_owned();
        get_in(&self.slice_index, &namespace, name).into_iter().flatten().filter_map(move |slice| {
            let obj = self.stores.slices.get(&namespace, slice)?;
            let t = obj.trigger_time.clone()?;
            Some(((namespace.clone(), slice.to_string()), t))
        })
    }

    /// `riptide_network_programming_duration_seconds`: for each slice whose
    /// trigger time is new since the last pass and whose Service was written
    /// now, the time from that trigger to now (kube-proxy's
    /// `NetworkProgrammingLatency`). A full pass (start, relist) only
    /// records the times as seen: they may be hours old.
    fn observe_programming(&mut self, triggers: Vec<(Owner, SliceTrigger)>, failing: &BTreeMap<String, String>, seed_only: bool) {
        let now = k8s_openapi::jiff::Timestamp::now();
        for (owner, (slice, t)) in triggers {
            if failing.contains_key(&owner.to_string()) || self.triggers.get(&slice) == Some(&t) {
                continue;
            }
            if !seed_only
                && let Ok(at) = t.parse::<k8s_openapi::jiff::Timestamp>()
            {
                let secs = now.duration_since(at).as_secs_f64();
                // A trigger from a clock ahead of ours is not a latency.
                if secs >= 0.0 {
                    self.shared.metrics.network_programming_seconds.observe(secs);
                }
            }
            self.triggers.insert(slice, t);
        }
        if seed_only {
            // Forget slices that are gone.
            let live = &self.slice_owner;
            self.triggers.retain(|(namespace, slice), _| get_in(live, namespace, slice).is_some());
        }
    }

    /// A Warning Event on a Service whose `loadBalancerSourceRanges` has
    /// entries that do not parse, once per change of that set.
    fn publish_invalid_ranges(&mut self, owner: &Owner, invalid: &[String]) {
        if self.invalid_ranges.get(owner).map_or(invalid.is_empty(), |v| v == invalid) {
            return;
        }
        if invalid.is_empty() {
            self.invalid_ranges.remove(owner);
            return;
        }
        self.invalid_ranges.insert(owner.clone(), invalid.to_vec());
        let Owner::Service { namespace, name } = owner else { return };
        let msg = format!(
            "loadBalancerSourceRanges entries {invalid:?} are not CIDRs and were skipped on node {}; the other ranges apply (none left: no source is allowed)",
            self.ctx.node_name
        );
        tracing::warn!(service = %owner, ?invalid, "invalid loadBalancerSourceRanges skipped");
        if let Some(svc) = self.stores.services.get(namespace, name) {
            crate::kube_events::publish(&self.client, &svc, &self.ctx.node_name, crate::kube_events::Kind::Warning, "InvalidLoadBalancerSourceRanges", &msg);
        }
    }

    /// Truncation changes: an Event on the Service (Warning
    /// `BackendsTruncated`, or Normal `BackendsRestored` once it fits),
    /// the metrics and `riptide status`. `all`: `results` covers every
    /// Service, so ones missing from it are no longer truncated.
    fn publish_truncations(&mut self, results: Vec<(Owner, Option<(usize, usize)>)>, all: bool) {
        if all {
            let seen: BTreeSet<&Owner> = results.iter().map(|(o, _)| o).collect();
            self.truncated.retain(|o, _| seen.contains(o));
        }
        for (owner, cut) in results {
            let Owner::Service { namespace, name } = &owner else { continue };
            let before = self.truncated.get(&owner).copied();
            if before == cut {
                continue;
            }
            let svc = self.stores.services.get(namespace, name);
            match cut {
                Some((all, kept)) => {
                    let msg = format!(
                        "{all} backends, only {kept} written on node {} (--max-backends-per-service); new connections use those {kept}",
                        self.ctx.node_name
                    );
                    tracing::warn!(service = %owner, backends = all, kept, "Service truncated to the backend cap");
                    if let Some(svc) = svc {
                        crate::kube_events::publish(&self.client, &svc, &self.ctx.node_name, crate::kube_events::Kind::Warning, "BackendsTruncated", &msg);
                    }
                    self.truncated.insert(owner, (all, kept));
                }
                None => {
                    tracing::info!(service = %owner, "Service fits the backend cap again");
                    if let Some(svc) = svc {
                        let msg = format!("every backend written on node {} again", self.ctx.node_name);
                        crate::kube_events::publish(&self.client, &svc, &self.ctx.node_name, crate::kube_events::Kind::Normal, "BackendsRestored", &msg);
                    }
                    self.truncated.remove(&owner);
                }
            }
        }
        let m = &self.shared.metrics;
        m.truncated_services.set(i64::try_from(self.truncated.len()).unwrap_or(i64::MAX));
        let dropped: usize = self.truncated.values().map(|(all, kept)| all - kept).sum();
        m.truncated_backends.set(i64::try_from(dropped).unwrap_or(i64::MAX));
        lock(&self.shared.status).truncated = self.truncated.iter().map(|(o, v)| (o.to_string(), *v)).collect();
    }

    /// Own node: podCIDR file for the CNI and the datapath config. Other
    /// nodes: routes and the remote-podCIDR map.
    async fn sync_nodes(&mut self) {
        let nodes = self.stores.nodes.state();
        let me = nodes.iter().find(|n| n.name() == self.ctx.node_name);
        let pod_cidr = me.and_then(|n| crate::node::pod_cidr(n));
        let node_ip = self.cfg.node_ip.or_else(|| me.and_then(|n| crate::node::internal_ip(n)));
        if let Some(cidr) = pod_cidr {
            if let Err(e) = write_atomic(&self.cfg.pod_cidr_file, &format!("{cidr}\n")) {
                tracing::warn!(path = %self.cfg.pod_cidr_file.display(), error = %e, "cannot write the podCIDR file");
            } else if lock(&self.shared.status).pod_cidr != Some(cidr) {
                tracing::info!(cidr = %cidr, path = %self.cfg.pod_cidr_file.display(), "podCIDR handed to the CNI");
            }
        }
        if let Some(ip) = node_ip {
            self.write_config(ip);
        }
        let (desired, refused) = routes::desired_routes(&self.ctx.node_name, self.cfg.cluster_cidr, nodes.iter().map(AsRef::as_ref));
        for (name, cidr) in &refused {
            tracing::warn!(node = %name, cidr = %cidr, cluster = %self.cfg.cluster_cidr, "refusing a podCIDR outside the cluster range: no route, node-map entry or tunnel peer for it");
        }
        // KEP-3836: a Node being deleted or drained by the autoscaler
        // fails the node health check, so load balancers move away first.
        self.node_health.set_eligible(me.is_none_or(|n| {
            !n.deleting
                && !n.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| t.iter().any(|t| t.key == "ToBeDeletedByClusterAutoscaler"))
        }));
        let node_views = nodes
            .iter()
            .map(|n| {
                let name = n.name().to_owned();
                let cidr = crate::node::pod_cidr(n);
                let ip = crate::node::internal_ip(n);
                let state = if name == self.ctx.node_name {
                    "local"
                } else if refused.iter().any(|(r, _)| *r == name) {
                    "refused"
                } else if cidr.is_some_and(|c| desired.contains_key(&c)) {
                    "routed"
                } else {
                    "incomplete"
                };
                crate::views::NodeView { name, internal_ip: ip, pod_cidr: cidr.map(|c| c.to_string()), state: state.to_owned() }
            })
            .collect();
        lock(&self.shared.status).nodes = node_views;
        {
            let mut dp = lock(&self.shared.dp);
            let old = lock(&self.shared.status).routes.clone();
            for (cidr, via) in &desired {
                if old.get(cidr) != Some(via)
                    && let Err(e) = dp.upsert_node(cidr.network(), cidr.prefix(), *via)
                {
                    tracing::warn!(cidr = %cidr, error = %crate::reconcile::error_chain(&e), "writing the node map failed");
                }
            }
            for cidr in old.keys().filter(|c| !desired.contains_key(c)) {
                let _ = dp.remove_node(cidr.network(), cidr.prefix());
            }
        }
        // Tunnel mode: the device first (it needs this node's address and
        // podCIDR), then its ARP/FDB entries, then routes through it. Until
        // the device exists no route is touched.
        let mut route_desired = Some(desired.clone());
        if self.tunnel.is_some() {
            route_desired = self.sync_tunnel(node_ip, pod_cidr, &desired).await;
        }
        if let (Some(r), Some(route_desired)) = (&self.routes, route_desired) {
            match r.sync(&route_desired).await {
                Ok(rep) => {
                    for (cidr, e) in &rep.failed {
                        tracing::warn!(cidr = %cidr, error = %e, "route not written; will retry on the next node change");
                    }
                }
                Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "route sync failed"),
            }
        }
        self.shared.metrics.routes.set(i64::try_from(desired.len()).unwrap_or(i64::MAX));
        let mut st = lock(&self.shared.status);
        st.routes = desired;
        st.pod_cidr = pod_cidr;
        st.node_ip = node_ip;
    }

    /// Ensures the vxlan device (attaching the uplink programs to it when it
    /// is new to this process) and its peers; returns the routes to program
    /// (remote podCIDR → its `.0` on the device), or `None` when the device
    /// is not there yet.
    async fn sync_tunnel(
        &mut self,
        node_ip: Option<Ipv4Addr>,
        pod_cidr: Option<Ipv4Network>,
        desired: &BTreeMap<Ipv4Network, Ipv4Addr>,
    ) -> Option<BTreeMap<Ipv4Network, Ipv4Addr>> {
        let (Some(t), Some(uplink)) = (self.tunnel.as_mut(), self.cfg.uplink.as_deref()) else { return None };
        let (Some(ip), Some(cidr)) = (node_ip, pod_cidr) else {
            tracing::info!("vxlan device waits for this node's address and podCIDR");
            return None;
        };
        let index = match t.ensure_device(ip, uplink, cidr).await {
            Ok((index, _)) => index,
            Err(e) => {
                tracing::warn!(error = %crate::reconcile::error_chain(&e), "vxlan device not ready; retried on the next node change");
                return None;
            }
        };
        if self.tunnel_attached != Some(index) {
            // NodePort/externalIP flows to remote backends leave through the
            // device (their SNAT must see the inner packet) and replies come
            // back through it: the uplink programs run on it too.
            let pins = lock(&self.shared.status).pin_dir.clone();
            let attached = {
                let mut dp = lock(&self.shared.dp);
                match &pins {
                    // Pinned like the uplink's links: they outlive the agent.
                    Some(dir) => dp
                        .attach_uplink(tunnel::DEVICE)
                        .and_then(|att| att.pin(&Path::new(dir).join("links"), "tunnel").map(|_| ())),
                    None => {
                        tracing::warn!("unpinned datapath: no programs on the vxlan device");
                        Ok(())
                    }
                }
            };
            match attached {
                Ok(()) => {
                    self.tunnel_attached = Some(index);
                    let mut st = lock(&self.shared.status);
                    let name = format!("tunnel:{}", tunnel::DEVICE);
                    if !st.attachments.contains(&name) {
                        st.attachments.push(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::reconcile::error_chain(&e), "attaching programs to the vxlan device failed; retried on the next node change");
                    return None;
                }
            }
        }
        if let Some(vx) = self.cfg.tunnel {
            lock(&self.shared.status).tunnel = Some(format!(
                "{} (ifindex {index}) vni {} port {} local {ip} dev {uplink}, address {}",
                tunnel::DEVICE,
                vx.vni,
                vx.port,
                tunnel::gateway_of(cidr)
            ));
        }
        match t.sync_peers(desired).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "tunnel peer sync failed"),
        }
        if let Some(r) = self.routes.as_mut() {
            r.set_device(Some(index));
        }
        Some(desired.keys().map(|c| (*c, tunnel::gateway_of(*c))).collect())
    }

    /// Every node's addresses into the frontend guard; whether they changed.
    fn update_reserved(&mut self) -> bool {
        let own = lock(&self.shared.status).node_ip;
        let nodes = self.stores.nodes.state();
        self.ctx.reserved.set_nodes(nodes.iter().map(AsRef::as_ref), own.into_iter().chain([self.cfg.hairpin_ip]))
    }

    /// Writes the datapath config for `node_ip` if it changed.
    fn write_config(&mut self, ip: Ipv4Addr) {
        let cfg = self.datapath_config(ip);
        if self.written_config != Some(cfg) {
            match lock(&self.shared.dp).set_config(&cfg) {
                Ok(()) => {
                    tracing::info!(node_ip = %ip, policy = cfg.flags & CFG_F_POLICY != 0, "datapath configured");
                    self.written_config = Some(cfg);
                }
                Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "writing the datapath config failed"),
            }
        }
    }

    /// Ready once services and policy are fully written; an endpoint left
    /// fail-closed (or a policy write pending retry) makes it not ready, so
    /// probes and `riptide status` show what users cannot see in traffic.
    fn update_ready(&self) {
        let mut why = Vec::new();
        if !self.first_done {
            why.push("services not synced yet".to_owned());
        }
        if !self.policy_ok {
            why.push("NetworkPolicy not fully written".to_owned());
        }
        publish_ready(&self.shared, why);
    }

    /// Compiles NetworkPolicy from the stores and writes the difference to
    /// the policy maps ([`crate::policy_sync`]), then publishes the result
    /// for the API and sets `CFG_F_POLICY` as the maps require.
    fn sync_policy(&mut self) {
        let Some(sync) = self.policy.as_mut() else {
            self.policy_ok = false;
            return;
        };
        let started = Instant::now();
        let (pods, namespaces, policies, nodes) =
            (self.stores.pods.state(), self.stores.namespaces.state(), self.stores.policies.state(), self.stores.nodes.state());
        let host_addrs = {
            let st = lock(&self.shared.status);
            let mut a: Vec<Ipv4Addr> = st.node_ip.into_iter().chain([self.cfg.hairpin_ip]).collect();
            // Tunnel mode: the device's address is a source of node traffic
            // into pods too.
            if let (true, Some(cidr)) = (self.cfg.tunnel.is_some(), st.pod_cidr) {
                a.push(tunnel::gateway_of(cidr));
            }
            a
        };
        let inputs = Inputs {
            pods: &pods,
            namespaces: &namespaces,
            policies: &policies,
            nodes: &nodes,
            node_name: &self.ctx.node_name,
            host_addrs: &host_addrs,
        };
        let fingerprint = inputs_fingerprint(&inputs);
        if self.policy_inputs == Some(fingerprint) && !self.policy_retry {
            return;
        }
        if !self.policy_adopted {
            // A restart: keep the identities and endpoint ids the pinned
            // maps use, so the first pass rewrites only what changed.
            match sync.read_back() {
                Ok(pinned) => {
                    self.policy_adopted = true;
                    let adopted = self.compiler.adopt(pinned.all_ipcache(), &pinned.endpoints, pinned.all_rules());
                    tracing::info!(adopted, endpoints = pinned.endpoints.len(), rules = pinned.rule_count(), "pinned NetworkPolicy maps read");
                }
                Err(e) => tracing::warn!(error = %crate::reconcile::error_chain(&e), "cannot read the pinned NetworkPolicy maps; retrying"),
            }
        }
        let mut compiled = self.compiler.compile(&inputs);
        let rep = sync.sync(&compiled);
        self.policy_inputs = rep.ok().then_some(fingerprint);
        let on = sync.known().map_or(self.policy_on || !compiled.endpoints.is_empty(), |k| !k.endpoints.is_empty());
        let rules = sync.known().map_or(compiled.rules.len(), MapState::rule_count);
        let m = &self.shared.metrics;
        if !rep.ok() {
            m.policy_sync_errors.inc();
            // Retried every second: said again only when it changes.
            if rep.errors != self.policy_errors {
                let first: Vec<&str> = rep.errors.iter().take(5).map(String::as_str).collect();
                tracing::warn!(
                    failed = rep.errors.len(), fail_closed = rep.fail_closed.len(), errors = ?first,
                    "NetworkPolicy map writes failed; affected pods fail closed, retrying"
                );
            }
        } else if rep.changed() || rep.read_back {
            tracing::info!(
                endpoints = compiled.endpoints.len(), rules, identities = compiled.identities.len(),
                ipcache = compiled.ipcache.len(), read_back = rep.read_back, renumbered = rep.renumbered,
                "NetworkPolicy written"
            );
        }
        if compiled.warnings != self.policy_warnings {
            for w in &compiled.warnings {
                tracing::warn!(warning = %w, "NetworkPolicy not compiled as written");
            }
            self.policy_warnings.clone_from(&compiled.warnings);
        }
        for addr in &rep.fail_closed {
            if let Some(ep) = compiled.endpoints.get_mut(addr) {
                ep.flags |= PE_F_FAIL_CLOSED;
            }
        }
        let set = |g: &prometheus_client::metrics::gauge::Gauge, n: usize| g.set(i64::try_from(n).unwrap_or(i64::MAX));
        set(&m.policy_identities, compiled.identities.len());
        set(&m.policy_rule_entries, rules);
        set(&m.policy_endpoints, compiled.endpoints.len());
        set(&m.policy_fail_closed_endpoints, rep.fail_closed.len());
        for (map, n) in [
            (riptide_common::names::POLICY4, rules),
            (riptide_common::names::POLEP4, compiled.endpoints.len()),
            (riptide_common::names::IPCACHE4, compiled.ipcache.len()),
        ] {
            set(&m.map_entries.get_or_create(&crate::metrics::MapLabel { map }), n);
        }
        self.policy_errors.clone_from(&rep.errors);
        self.policy_ok = rep.ok();
        self.policy_retry = !rep.ok();
        if on != self.policy_on {
            self.policy_on = on;
            let ip = lock(&self.shared.status).node_ip;
            if let Some(ip) = ip {
                self.write_config(ip);
            }
        }
        let elapsed = started.elapsed();
        let mut st = lock(&self.shared.policy);
        st.passes += 1;
        st.last_pass_ms = Some(elapsed.as_secs_f64() * 1e3);
        st.synced |= rep.ok();
        st.fail_closed = rep.fail_closed;
        st.errors = rep.errors;
        st.enforcing = self.written_config.is_some_and(|c| c.flags & CFG_F_POLICY != 0);
        st.compiled = Arc::new(compiled);
    }

    fn datapath_config(&self, node_ip: Ipv4Addr) -> DpConfig {
        let mut flags = 0;
        if self.cfg.cgroup.is_some() {
            flags |= CFG_F_SOCK_LB;
        }
        if self.cfg.masquerade {
            flags |= CFG_F_MASQUERADE;
        }
        if self.policy_on {
            flags |= CFG_F_POLICY;
        }
        DpConfig {
            node_ip_be: u32::from(node_ip).to_be(),
            hairpin_ip_be: u32::from(self.cfg.hairpin_ip).to_be(),
            cluster_cidr_be: u32::from(self.cfg.cluster_cidr.network()).to_be(),
            cluster_cidr_len: self.cfg.cluster_cidr.prefix(),
            // The node's own /32 at least; the underlay is routed, not NATed.
            nomasq_cidr_be: u32::from(node_ip).to_be(),
            nomasq_cidr_len: 32,
            flags,
            snat_port_min: 32_768,
            snat_port_max: 60_999,
            ..DpConfig::default()
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An EndpointSlice (namespace, name) and its trigger-time annotation.
type SliceTrigger = ((String, String), String);

/// Sets readiness from the run loop's reasons (`loop_why`; `None` keeps
/// the last ones) and the stale watch; logs transitions.
fn publish_ready(shared: &Shared, loop_why: Vec<String>) {
    let mut st = lock(&shared.status);
    st.loop_not_ready = loop_why;
    let mut why = st.loop_not_ready.clone();
    if let Some(stale) = &st.stale {
        why.push(stale.clone());
    }
    let ready = why.is_empty();
    let was = shared.ready.swap(ready, Ordering::AcqRel);
    if ready && !was {
        tracing::info!("ready");
    } else if was && !ready {
        tracing::warn!(reasons = ?why, "not ready (see riptide status)");
    }
    st.not_ready = why;
}

/// Probes the apiserver (`GET /version`) every second; unreachable for
/// longer than `stale_after` makes the watch stale: not ready, named in
/// `riptide status` and `riptide_agent_watch_stale`. The watches retry on
/// their own (backoff) and relist when it is back, so the maps converge;
/// meanwhile they keep serving the last view.
async fn watch_apiserver(client: kube::Client, shared: std::sync::Weak<Shared>, stale_after: Duration) {
    let every = Duration::from_secs(1);
    let mut last_ok = Instant::now();
    let mut last_ok_unix = unix_now();
    loop {
        let ok = tokio::time::timeout(every * 5, client.apiserver_version()).await.is_ok_and(|r| r.is_ok());
        let Some(shared) = shared.upgrade() else { return };
        if ok {
            last_ok = Instant::now();
            last_ok_unix = unix_now();
        }
        let down = last_ok.elapsed();
        let stale = (down > stale_after).then(|| {
            let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            format!(
                "stale watch: apiserver unreachable for {}s (last answer at unix {last_ok_unix:.0}); {} not updating; the maps serve the last view",
                down.as_secs(),
                kinds.join(", ")
            )
        });
        let changed = {
            let mut st = lock(&shared.status);
            let changed = st.stale.is_some() != stale.is_some();
            st.stale = stale;
            changed
        };
        if changed {
            if ok {
                tracing::info!("apiserver reachable again; watches relist and the maps converge");
            } else {
                tracing::warn!(unreachable_s = down.as_secs(), "apiserver unreachable: watch stale, serving the last view");
            }
            shared.metrics.watch_stale.set(i64::from(!ok));
            let why = lock(&shared.status).loop_not_ready.clone();
            publish_ready(&shared, why);
        } else if lock(&shared.status).stale.is_some() {
            // Keep the duration in the message current.
            let why = lock(&shared.status).loop_not_ready.clone();
            publish_ready(&shared, why);
        }
        drop(shared);
        tokio::time::sleep(every).await;
    }
}

/// Owners whose desired state a pass computes before handing it to the
/// reconciler (under its lock) at once.
const PASS_CHUNK: usize = 256;

/// Write-then-rename so the CNI never reads half a file.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
