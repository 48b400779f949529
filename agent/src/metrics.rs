//! Prometheus metrics (OpenMetrics text on `/metrics`).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcLabel {
    pub map: &'static str,
    /// `expired` (idle past its timeout) or `stale_backend` (UDP flow or
    /// socket whose backend no longer serves its frontend).
    pub reason: &'static str,
}

/// Every metric the agent exports; cheap to clone (all handles are Arcs).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Time from the first change of a batch to its maps being written.
    pub sync_seconds: Histogram,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub watch_errors: Family<KindLabel, Counter>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub service_ports: Gauge,
    pub conntrack_entries: Gauge,
    pub routes: Gauge,
    /// Datapath counters by reason (`rt_stats_v2`), drops included.
    pub datapath_packets: Family<ReasonLabel, Counter>,
    /// Drop/failure events read from `rt_events_v1`, by reason (rate
    /// limited in the kernel; `datapath_packets` counts every occurrence).
    pub datapath_events: Family<ReasonLabel, Counter>,
    /// Entries the GC deleted, by map and reason.
    pub gc_deletions: Family<GcLabel, Counter>,
    pub gc_runs: Counter,
    pub gc_errors: Counter,
    pub gc_seconds: Histogram,
    /// Connected UDP sockets aborted because their backend went away.
    pub udp_sockets_destroyed: Counter,
    last_stats: Arc<Mutex<Vec<u64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("riptide_agent");
        // 0.5 ms … ~4 s.
        let sync_seconds = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14));
        let m = Self {
            registry: Arc::new(Registry::default()),
            sync_seconds,
            syncs: Counter::default(),
            sync_errors: Counter::default(),
            watch_errors: Family::default(),
            map_entries: Family::default(),
            service_ports: Gauge::default(),
            conntrack_entries: Gauge::default(),
            routes: Gauge::default(),
            datapath_packets: Family::default(),
            datapath_events: Family::default(),
            gc_deletions: Family::default(),
            gc_runs: Counter::default(),
            gc_errors: Counter::default(),
            gc_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14)),
            udp_sockets_destroyed: Counter::default(),
            last_stats: Arc::new(Mutex::new(Vec::new())),
        };
        r.register("sync_duration_seconds", "Time from a cluster change to the maps being written", m.sync_seconds.clone());
        r.register("syncs", "Reconcile passes that wrote the maps", m.syncs.clone());
        r.register("sync_errors", "Service-port writes that failed (retried)", m.sync_errors.clone());
        r.register("watch_errors", "Watch stream errors by kind", m.watch_errors.clone());
        r.register("map_entries", "Entries in the datapath maps", m.map_entries.clone());
        r.register("service_ports", "Service ports (and hostPorts) written", m.service_ports.clone());
        r.register("conntrack_entries", "Entries in the conntrack map", m.conntrack_entries.clone());
        r.register("routes", "Routes to other nodes' podCIDRs", m.routes.clone());
        r.register("datapath_packets", "Datapath counters by reason (drops included)", m.datapath_packets.clone());
        r.register("datapath_events", "Drop/failure events read from the datapath, by reason", m.datapath_events.clone());
        r.register("gc_deletions", "Flow-state entries deleted by the GC, by map and reason", m.gc_deletions.clone());
        r.register("gc_runs", "GC passes", m.gc_runs.clone());
        r.register("gc_errors", "GC passes that failed (retried next pass)", m.gc_errors.clone());
        r.register("gc_duration_seconds", "Duration of a GC pass", m.gc_seconds.clone());
        r.register("udp_sockets_destroyed", "Connected UDP sockets aborted because their backend went away", m.udp_sockets_destroyed.clone());
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// Folds a fresh read of the per-reason counters into the exported
    /// counters (the kernel's are monotonic; a reload resets them).
    pub fn observe_stats(&self, named: impl Iterator<Item = (&'static str, u64)>) {
        let mut last = self.last_stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, (reason, v)) in named.enumerate() {
            if last.len() <= i {
                last.resize(i + 1, 0);
            }
            let delta = if v >= last[i] { v - last[i] } else { v };
            last[i] = v;
            self.datapath_packets.get_or_create(&ReasonLabel { reason }).inc_by(delta);
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
