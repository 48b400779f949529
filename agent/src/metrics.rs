//! Prometheus metrics (OpenMetrics text on `/metrics`).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::Registry,
};

use crate::map_usage::MapSnapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

/// Cilium's label for per-map metrics (`cilium_bpf_map_pressure{map_name}`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapNameLabel {
    pub map_name: String,
}

/// `riptide_drop_count_total` / `riptide_forward_count_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonDirectionLabel {
    pub reason: &'static str,
    /// `ingress` (towards a pod or the node), `egress` (from a pod or the
    /// node) or `unknown` where the counter does not tell.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `riptide_policy_verdicts_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// `allow`, `deny` or `audit` (would be denied; passed in audit mode).
    pub verdict: &'static str,
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
    /// External frontends (externalIPs, LB ingress IPs) refused because
    /// they name a node or a cluster range (`crate::reserved`).
    pub refused_frontends: Gauge,
    /// Addresses this node answers ARP for (`crate::l2announce`).
    pub l2_announced: Gauge,
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
    /// NetworkPolicy verdicts on new flows, from the datapath counters.
    pub policy_verdicts: Family<VerdictLabel, Counter>,
    /// Identities in use (label sets and ipBlock prefixes).
    pub policy_identities: Gauge,
    /// Entries in `rt_policy4_v1` (allow rules of local endpoints).
    pub policy_rule_entries: Gauge,
    /// Local pods isolated by some policy (entries in `rt_polep4_v1`).
    pub policy_endpoints: Gauge,
    /// Local pods whose policy could not be written: denying all but the
    /// node and themselves until a retry succeeds.
    pub policy_fail_closed_endpoints: Gauge,
    /// Policy sync passes with a failed map write.
    pub policy_sync_errors: Counter,
    /// Entries / max_entries per map (Cilium's `bpf_map_pressure`).
    pub map_pressure: Family<MapNameLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// max_entries per map.
    pub map_capacity: Family<MapNameLabel, Gauge>,
    /// EndpointSlice `last-change-trigger-time` → maps written
    /// (`kubeproxy_network_programming_duration_seconds`).
    pub network_programming_seconds: Histogram,
    /// Unix time of the last sync pass that wrote everything it wanted
    /// (`kubeproxy_sync_proxy_rules_last_timestamp_seconds`).
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Services whose backends were cut to `--max-backends-per-service`.
    pub truncated_services: Gauge,
    /// Backends left out of the maps by that cap, over all Services.
    pub truncated_backends: Gauge,
    /// Services with a service port whose write failed (retried).
    pub failing_services: Gauge,
    /// 1 while the apiserver has been unreachable for longer than
    /// `--stale-after-s` (the maps keep serving the last view).
    pub watch_stale: Gauge,
    /// Datapath drops by reason and direction (`cilium_drop_count_total`).
    pub drops: Family<ReasonDirectionLabel, Counter>,
    /// Packets passed on by reason and direction (`cilium_forward_count_total`).
    pub forwards: Family<ReasonDirectionLabel, Counter>,
    last_stats: Arc<Mutex<Vec<u64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // `riptide_agent_*` for the agent's own workings, `riptide_policy_*`
        // for what NetworkPolicy does (names users alert on).
        let mut root = Registry::with_prefix("riptide");
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
            refused_frontends: Gauge::default(),
            l2_announced: Gauge::default(),
            datapath_packets: Family::default(),
            datapath_events: Family::default(),
            gc_deletions: Family::default(),
            gc_runs: Counter::default(),
            gc_errors: Counter::default(),
            gc_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14)),
            udp_sockets_destroyed: Counter::default(),
            policy_verdicts: Family::default(),
            policy_identities: Gauge::default(),
            policy_rule_entries: Gauge::default(),
            policy_endpoints: Gauge::default(),
            policy_fail_closed_endpoints: Gauge::default(),
            policy_sync_errors: Counter::default(),
            map_pressure: Family::default(),
            map_capacity: Family::default(),
            // 1 ms … ~9 min (kube-proxy's buckets reach 5 min).
            network_programming_seconds: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20)),
            last_sync_timestamp: Gauge::default(),
            truncated_services: Gauge::default(),
            truncated_backends: Gauge::default(),
            failing_services: Gauge::default(),
            watch_stale: Gauge::default(),
            drops: Family::default(),
            forwards: Family::default(),
            last_stats: Arc::new(Mutex::new(Vec::new())),
        };
        root.register(
            "network_programming_duration_seconds",
            "Time from an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) to the maps serving it",
            m.network_programming_seconds.clone(),
        );
        root.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last sync pass that wrote every Service port it wanted",
            m.last_sync_timestamp.clone(),
        );
        root.register("drop_count", "Datapath drops by reason and direction", m.drops.clone());
        root.register("forward_count", "Datapath forwarding decisions by reason and direction", m.forwards.clone());
        root.register(
            "build",
            "riptide-agent build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION")), ("component", "agent")]),
        );
        let bpf = root.sub_registry_with_prefix("bpf");
        bpf.register("map_pressure", "Entries / max_entries of each datapath map (sampled off the request path)", m.map_pressure.clone());
        bpf.register("map_capacity", "max_entries of each datapath map", m.map_capacity.clone());
        let policy = root.sub_registry_with_prefix("policy");
        policy.register("verdicts", "NetworkPolicy verdicts on new flows by direction (audit: would be denied, passed in audit mode)", m.policy_verdicts.clone());
        policy.register("identities", "Security identities in use (label sets and ipBlock prefixes)", m.policy_identities.clone());
        policy.register("rule_entries", "Allow-rule entries of local endpoints in rt_policy4_v1", m.policy_rule_entries.clone());
        policy.register("endpoints", "Local pods isolated or audited by NetworkPolicy", m.policy_endpoints.clone());
        policy.register("fail_closed_endpoints", "Local pods whose policy could not be written (denying all but node and self)", m.policy_fail_closed_endpoints.clone());
        policy.register("sync_errors", "Policy sync passes with a failed map write (retried)", m.policy_sync_errors.clone());
        let r = root.sub_registry_with_prefix("agent");
        r.register("sync_duration_seconds", "Time from a cluster change to the maps being written", m.sync_seconds.clone());
        r.register("syncs", "Reconcile passes that wrote the maps", m.syncs.clone());
        r.register("sync_errors", "Service-port writes that failed (retried)", m.sync_errors.clone());
        r.register("watch_errors", "Watch stream errors by kind", m.watch_errors.clone());
        r.register("map_entries", "Entries in the datapath maps", m.map_entries.clone());
        r.register("service_ports", "Service ports (and hostPorts) written", m.service_ports.clone());
        r.register("conntrack_entries", "Entries in both conntrack maps (per table: map_entries)", m.conntrack_entries.clone());
        r.register("routes", "Routes to other nodes' podCIDRs", m.routes.clone());
        r.register("refused_frontends", "externalIPs and LoadBalancer IPs refused: a node address or a cluster range", m.refused_frontends.clone());
        r.register("l2_announced_addresses", "LoadBalancer and external IPs this node answers ARP for", m.l2_announced.clone());
        r.register("datapath_packets", "Datapath counters by reason (drops included)", m.datapath_packets.clone());
        r.register("datapath_events", "Drop/failure events read from the datapath, by reason", m.datapath_events.clone());
        r.register("gc_deletions", "Flow-state entries deleted by the GC, by map and reason", m.gc_deletions.clone());
        r.register("gc_runs", "GC passes", m.gc_runs.clone());
        r.register("gc_errors", "GC passes that failed (retried next pass)", m.gc_errors.clone());
        r.register("gc_duration_seconds", "Duration of a GC pass", m.gc_seconds.clone());
        r.register("udp_sockets_destroyed", "Connected UDP sockets aborted because their backend went away", m.udp_sockets_destroyed.clone());
        r.register("truncated_services", "Services whose backends were cut to --max-backends-per-service", m.truncated_services.clone());
        r.register("truncated_backends", "Backends left out of the maps by --max-backends-per-service", m.truncated_backends.clone());
        r.register("failing_services", "Services with a port whose map write failed (retried every second)", m.failing_services.clone());
        r.register("watch_stale", "1 while the apiserver has been unreachable for longer than --stale-after-s", m.watch_stale.clone());
        let m = Self {
            registry: Arc::new(root),
            ..m
        };
        m.init_verdicts();
        m
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
            match u32::try_from(i).ok().and_then(classify) {
                Some((Verdict::Drop, direction)) => {
                    self.drops.get_or_create(&ReasonDirectionLabel { reason, direction }).inc_by(delta);
                }
                Some((Verdict::Forward, direction)) => {
                    self.forwards.get_or_create(&ReasonDirectionLabel { reason, direction }).inc_by(delta);
                }
                None => {}
            }
            if let Some(label) = verdict_of(reason) {
                self.policy_verdicts.get_or_create(&label).inc_by(delta);
            }
        }
    }

    /// Publishes a map sample: pressure, capacity and entries per map.
    pub fn observe_maps(&self, snap: &MapSnapshot) {
        for m in &snap.maps {
            let label = MapNameLabel { map_name: m.name.clone() };
            self.map_capacity.get_or_create(&label).set(i64::from(m.max_entries));
            if let Some(p) = m.pressure {
                self.map_pressure.get_or_create(&label).set(p);
            }
            if let (Some(n), Some(map)) = (m.entries, static_map_name(&m.name)) {
                self.map_entries.get_or_create(&MapLabel { map }).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Zero-valued verdict series, so dashboards see the metric before the
    /// first policy verdict.
    fn init_verdicts(&self) {
        for direction in ["ingress", "egress"] {
            for verdict in ["allow", "deny", "audit"] {
                self.policy_verdicts.get_or_create(&VerdictLabel { direction, verdict }).inc_by(0);
            }
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

/// The `'static` name of a known map (labels of `riptide_agent_map_entries`).
fn static_map_name(name: &str) -> Option<&'static str> {
    use riptide_common::names;
    names::ALL_MAPS.into_iter().find(|n| *n == name)
}

/// Whether a datapath counter counts dropped or passed-on packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Forward,
}

/// Drop or forward, and the direction, of the `rt_stats_v2` counter at
/// `index` (a `riptide_common::stats` constant; the label is its name from
/// the shared `stats::NAMES` table); `None` for counters that are neither
/// (translations, NAT bookkeeping, events: their packets are counted as
/// a forward or drop by another reason too). The counters are per
/// reason only: the direction is the one the reason implies (towards a
/// pod or the node = `ingress`, from them = `egress`), `unknown` where the
/// same reason is counted on both paths.
pub fn classify(index: u32) -> Option<(Verdict, &'static str)> {
    use riptide_common::stats as s;
    let (v, dir) = match index {
        s::DROP_MALFORMED | s::DROP_NO_BACKEND | s::DROP_CT_FULL | s::NAT_FAIL | s::REJECT_RST | s::REJECT_ICMP
        | s::SNAT_NO_PORT | s::DROP_STALE_SLOT | s::DROP_UNSUPPORTED | s::DROP_LB_SRC_RANGE => (Verdict::Drop, "unknown"),
        // A local socket's connect/sendmsg; a pod's flow to the outside.
        s::SOCK_NO_BACKEND | s::MASQ_NO_PORT | s::MASQ_LOST_MAPPING | s::POLICY_DENY_OUT => (Verdict::Drop, "egress"),
        s::POLICY_DENY_IN => (Verdict::Drop, "ingress"),
        s::PASS | s::FIB_REDIRECT | s::FIB_FALLBACK => (Verdict::Forward, "unknown"),
        // Delivered into a local pod; an uplink packet sent back out by XDP.
        s::REDIRECT_LOCAL | s::POLICY_ALLOW_IN | s::XDP_TX => (Verdict::Forward, "ingress"),
        s::POLICY_ALLOW_OUT => (Verdict::Forward, "egress"),
        _ => return None,
    };
    Some((v, dir))
}

/// The verdict a `rt_stats_v2` policy reason counts (`policy_deny_in` →
/// ingress/deny), `None` for other reasons.
pub fn verdict_of(reason: &str) -> Option<VerdictLabel> {
    let rest = reason.strip_prefix("policy_")?;
    let (verdict, dir) = rest.split_once('_')?;
    let direction = match dir {
        "in" => "ingress",
        "out" => "egress",
        _ => return None,
    };
    let verdict = match verdict {
        "allow" => "allow",
        "deny" => "deny",
        "audit" => "audit",
        _ => return None,
    };
    Some(VerdictLabel { direction, verdict })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_reasons_become_verdicts_by_direction() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("riptide_policy_verdicts_total{direction=\"egress\",verdict=\"deny\"} 0"), "{text}");
        assert!(text.contains("riptide_agent_syncs_total 0"), "agent metrics keep their names: {text}");
        let names = riptide_common::stats::NAMES;
        let mut counts = vec![0u64; names.len()];
        let at = |r: &str| names.iter().position(|n| *n == r).unwrap();
        counts[at("policy_deny_in")] = 3;
        counts[at("policy_allow_out")] = 5;
        counts[at("policy_audit_in")] = 1;
        counts[at("drop_no_backend")] = 9;
        m.observe_stats(names.iter().copied().zip(counts.iter().copied()));
        counts[at("policy_deny_in")] = 4;
        m.observe_stats(names.iter().copied().zip(counts.iter().copied()));
        let text = m.encode();
        for line in [
            "riptide_policy_verdicts_total{direction=\"ingress\",verdict=\"deny\"} 4",
            "riptide_policy_verdicts_total{direction=\"egress\",verdict=\"allow\"} 5",
            "riptide_policy_verdicts_total{direction=\"ingress\",verdict=\"audit\"} 1",
            "riptide_policy_verdicts_total{direction=\"ingress\",verdict=\"allow\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing: {text}");
        }
        assert_eq!(verdict_of("drop_no_backend"), None);
        assert!(text.contains("riptide_drop_count_total{reason=\"drop_no_backend\",direction=\"unknown\"} 9"), "{text}");
        assert!(text.contains("riptide_drop_count_total{reason=\"policy_deny_in\",direction=\"ingress\"} 4"), "{text}");
        assert!(text.contains("riptide_forward_count_total{reason=\"policy_allow_out\",direction=\"egress\"} 5"), "{text}");
        assert!(!text.contains("reason=\"policy_audit_in\",direction"), "audits are neither: {text}");
        assert_eq!(verdict_of("policy_deny_out"), Some(VerdictLabel { direction: "egress", verdict: "deny" }));
    }

    /// The host-socket NAT counters are scraped under their names, as
    /// bookkeeping (neither drops nor forwards).
    #[test]
    fn host_nat_counters_are_exported_by_name() {
        use riptide_common::stats;
        let m = Metrics::new();
        let mut counts = vec![0u64; stats::NAMES.len()];
        counts[stats::NAT_HOST_NEW as usize] = 7;
        counts[stats::NAT_HOST_REMAP as usize] = 2;
        counts[stats::NAT_HOST_CLASH as usize] = 1;
        m.observe_stats(stats::NAMES.iter().copied().zip(counts.iter().copied()));
        let text = m.encode();
        for line in [
            "riptide_agent_datapath_packets_total{reason=\"nat_host_new\"} 7",
            "riptide_agent_datapath_packets_total{reason=\"nat_host_remap\"} 2",
            "riptide_agent_datapath_packets_total{reason=\"nat_host_clash\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing: {text}");
        }
        assert!(!text.contains("reason=\"nat_host_clash\",direction"), "{text}");
    }
}
