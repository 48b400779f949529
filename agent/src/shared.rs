//! State shared between the run loop ([`crate::agent`]), the API handlers
//! ([`crate::api`]) and the GC thread ([`crate::gc`]): the datapath handles,
//! the reconciler, and the status and metrics they report into. It lives
//! below all three so each of them imports it, and none imports another.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, atomic::AtomicBool},
};

use ipnetwork::Ipv4Network;
use riptide_datapath::{Datapath, service::Services};
use serde::{Deserialize, Serialize};

use crate::{
    events::EventLog, map_usage::MapSnapshot, metrics::Metrics, policy::Compiled,
    reconcile::Reconciler, slim::SlimPod, store::Store, views::NodeView,
};

/// Mutable status shown by `riptide status`.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub kubernetes: bool,
    pub pin_dir: Option<String>,
    pub syncs: u64,
    pub last_sync_ms: Option<f64>,
    pub routes: BTreeMap<Ipv4Network, Ipv4Addr>,
    pub pod_cidr: Option<Ipv4Network>,
    pub node_ip: Option<Ipv4Addr>,
    pub health_check_ports: Vec<u16>,
    pub attachments: Vec<String>,
    /// Routing mode is `--tunnel vxlan`.
    pub tunnel_mode: bool,
    /// `--tunnel vxlan`: the device once it exists.
    pub tunnel: Option<String>,
    /// Services (`namespace/name`) with a port whose write failed → error.
    pub failing_services: BTreeMap<String, String>,
    /// Services cut to `--max-backends-per-service` → (backends, kept).
    pub truncated: BTreeMap<String, (usize, usize)>,
    /// What is stale while the apiserver is unreachable.
    pub stale: Option<String>,
    /// Why the agent is not ready.
    pub not_ready: Vec<String>,
    /// The run loop's part of `not_ready`.
    pub loop_not_ready: Vec<String>,
    /// Every Node and what this agent did with it (`riptide node list`).
    pub nodes: Vec<NodeView>,
}

/// State shared between the run loop, the API handlers and the GC. Lock
/// order: `reconciler`, then `services`, then `dp`.
pub struct Shared {
    pub node: String,
    pub ready: AtomicBool,
    pub status: Mutex<Status>,
    pub reconciler: Mutex<Reconciler>,
    pub services: Mutex<Services>,
    pub dp: Mutex<Datapath>,
    pub metrics: Metrics,
    pub gc_status: Mutex<GcStatus>,
    /// Drop/failure events read from the datapath (`riptide events`).
    pub events: Arc<EventLog>,
    /// NetworkPolicy as last compiled and written (`riptide policy`).
    pub policy: Mutex<PolicyState>,
    /// The last sample of every map's entries and capacity, taken off the
    /// request path ([`crate::map_usage`]).
    pub maps: Mutex<MapSnapshot>,
    /// Every pod of the cluster (the watch's store, set once the watches
    /// start): names pods in events and `riptide policy check`.
    pub pods: OnceLock<Store<SlimPod>>,
}

impl Shared {
    /// Every pod of the cluster as the store holds it now (none before the
    /// watches start).
    pub fn pods(&self) -> Vec<Arc<SlimPod>> {
        self.pods.get().map(Store::state).unwrap_or_default()
    }
}

/// The NetworkPolicy state the run loop publishes for the API.
#[derive(Clone, Debug, Default)]
pub struct PolicyState {
    /// The last compile, with `PE_F_FAIL_CLOSED` set on the endpoints whose
    /// writes failed (as the maps hold them), so `riptide policy check`
    /// judges as the datapath does.
    pub compiled: Arc<Compiled>,
    /// The first pass wrote everything (until then the agent is not ready).
    pub synced: bool,
    /// Local pods left fail-closed by the last pass.
    pub fail_closed: BTreeSet<Ipv4Addr>,
    /// Failed writes of the last pass (retried).
    pub errors: Vec<String>,
    pub passes: u64,
    pub last_pass_ms: Option<f64>,
    /// `CFG_F_POLICY` as last written to the datapath config.
    pub enforcing: bool,
}

impl PolicyState {
    /// `namespace/name` of the local pod at `ip`.
    pub fn local_pod_name(&self, ip: Ipv4Addr) -> Option<String> {
        self.compiled
            .views
            .get(&ip)
            .map(|v| format!("{}/{}", v.namespace, v.pod))
    }
}

/// Locks `m`, taking over a lock poisoned by a panicked holder: the state
/// behind these locks stays consistent between statements.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the GC's last passes did (`riptide status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GcStatus {
    pub passes: u64,
    pub last_pass_ms: Option<f64>,
    /// Both conntrack tables together.
    pub conntrack_entries: usize,
    /// Entries per conntrack table, by map name.
    #[serde(default)]
    pub conntrack_tables: BTreeMap<String, usize>,
    /// Both NAT tables together.
    pub nat_entries: usize,
    /// Entries per NAT table, by map name.
    #[serde(default)]
    pub nat_tables: BTreeMap<String, usize>,
    pub affinity_entries: usize,
    pub sock_rev_entries: usize,
    pub expired_deleted: u64,
    pub stale_deleted: u64,
    pub udp_sockets_destroyed: u64,
    pub last_error: Option<String>,
}
