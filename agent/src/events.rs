//! Drop/failure events from the datapath (`rt_events_v1`): which flow met
//! which failure, not only a counter.
//!
//! The programs write at most 64 events per CPU per second into a ring
//! buffer (the rest count as `events_suppressed` in `rt_stats_v2`), so
//! reading them can never become per-packet work here. One task waits on
//! the ring buffer's fd (epoll through tokio's `AsyncFd`), drains it, and
//! for each event: logs it (target `riptide::datapath`), counts it in
//! `riptide_agent_datapath_events{reason}`, and keeps it in a bounded
//! in-memory log for `riptide events` (`/v1/events`). The ring buffer is
//! pinned, so events written while the agent restarts are read by the next
//! one.

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Mutex, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use riptide_common::{EV_SRC_FROM_NET, EV_SRC_FROM_POD, EV_SRC_SOCK, EV_SRC_TO_NET, EV_SRC_TO_POD, EV_SRC_XDP_NET, proto};
use riptide_datapath::events::{Event, Events};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::{metrics::Metrics, views::FrontendView};

/// Events kept for `riptide events` (oldest dropped first).
pub const KEEP: usize = 1024;

/// One event as the API and CLI show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    /// Increases by one per event this agent read (`?since=` pages on it).
    pub seq: u64,
    /// Wall-clock time of the event (seconds since the epoch).
    pub time_unix_s: f64,
    pub reason: String,
    /// Which program saw it: `from-pod`, `from-net`, `to-net`, `to-pod`,
    /// `socket-lb`.
    pub program: String,
    pub protocol: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ifindex: u32,
    /// The service port whose frontend the destination is, if any (filled
    /// in when the view is served).
    #[serde(default)]
    pub service: Option<String>,
    /// NetworkPolicy events: `policy-denied` (dropped) or `policy-audit`
    /// (would be dropped; passed in audit mode).
    #[serde(default)]
    pub verdict: Option<String>,
    /// NetworkPolicy events: `ingress` (judged for the destination pod) or
    /// `egress` (for the source pod).
    #[serde(default)]
    pub direction: Option<String>,
    /// The pods (`namespace/name`) the addresses belong to, when known
    /// (filled in when the view is served).
    #[serde(default)]
    pub src_pod: Option<String>,
    #[serde(default)]
    pub dst_pod: Option<String>,
}

impl EventView {
    fn new(seq: u64, e: &Event, mono_now_ns: u64, wall_now: SystemTime) -> Self {
        let age = Duration::from_nanos(mono_now_ns.saturating_sub(e.raw.ts_ns));
        let at = wall_now.checked_sub(age).unwrap_or(wall_now);
        Self {
            seq,
            time_unix_s: at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            reason: e.reason().to_owned(),
            program: program_name(e.raw.source).to_owned(),
            protocol: proto_name(e.raw.proto),
            src: e.src(),
            dst: e.dst(),
            ifindex: e.raw.ifindex,
            service: None,
            verdict: None,
            direction: None,
            src_pod: None,
            dst_pod: None,
        }
        .with_policy_context()
    }

    /// Direction and verdict of a policy reason (`policy_deny_in`, ...).
    fn with_policy_context(mut self) -> Self {
        if let Some(v) = crate::metrics::verdict_of(&self.reason) {
            self.verdict = match v.verdict {
                "deny" => Some("policy-denied".to_owned()),
                "audit" => Some("policy-audit".to_owned()),
                _ => None,
            };
            self.direction = self.verdict.is_some().then(|| v.direction.to_owned());
        }
        self
    }
}

fn program_name(source: u8) -> &'static str {
    match source {
        EV_SRC_FROM_POD => "from-pod",
        EV_SRC_FROM_NET => "from-net",
        EV_SRC_TO_NET => "to-net",
        EV_SRC_SOCK => "socket-lb",
        EV_SRC_TO_POD => "to-pod",
        EV_SRC_XDP_NET => "xdp-net",
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        1 => "ICMP".into(),
        0 => "-".into(),
        n => n.to_string(),
    }
}

/// The bounded log the API serves.
#[derive(Default)]
pub struct EventLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    next_seq: u64,
    recent: VecDeque<EventView>,
}

impl EventLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `events` (read at `mono_now_ns`), logging and counting each.
    pub fn record(&self, events: &[Event], metrics: &Metrics, mono_now_ns: u64) {
        let wall = SystemTime::now();
        let mut log = self.lock();
        for e in events {
            let v = EventView::new(log.next_seq, e, mono_now_ns, wall);
            log.next_seq += 1;
            tracing::info!(
                target: "riptide::datapath",
                reason = %v.reason, program = %v.program, proto = %v.protocol,
                src = %v.src, dst = %v.dst, ifindex = v.ifindex,
                direction = v.direction.as_deref().unwrap_or("-"),
                "{}", v.verdict.as_deref().unwrap_or("datapath event")
            );
            metrics.datapath_events.get_or_create(&crate::metrics::ReasonLabel { reason: e.reason() }).inc();
            if log.recent.len() == KEEP {
                log.recent.pop_front();
            }
            log.recent.push_back(v);
        }
    }

    /// Events with `seq >= since`, oldest first, the destination's service
    /// filled in from `frontends` and the pods of both addresses from
    /// `pods` (address → `namespace/name`).
    pub fn since(&self, since: u64, frontends: &[FrontendView], pods: &HashMap<Ipv4Addr, String>) -> Vec<EventView> {
        let mut out: Vec<EventView> = self.lock().recent.iter().filter(|v| v.seq >= since).cloned().collect();
        for v in &mut out {
            v.service = service_of(v, frontends);
            v.src_pod = pods.get(v.src.ip()).cloned();
            v.dst_pod = pods.get(v.dst.ip()).cloned();
        }
        out
    }
}

/// The service port owning the frontend `v.dst` hits: an exact address
/// match, else a node-wide (0.0.0.0) NodePort/hostPort frontend.
fn service_of(v: &EventView, frontends: &[FrontendView]) -> Option<String> {
    let matches = |f: &&FrontendView, any: bool| {
        f.port == v.dst.port() && f.protocol == v.protocol && (f.ip == *v.dst.ip() || (any && f.ip.is_unspecified()))
    };
    frontends
        .iter()
        .find(|f| matches(f, false))
        .or_else(|| frontends.iter().find(|f| matches(f, true)))
        .and_then(|f| f.service.clone())
}

/// Reads `events` until the log's owner is gone.
pub fn spawn(events: Events, log: Weak<EventLog>, metrics: Metrics) -> std::io::Result<tokio::task::JoinHandle<()>> {
    // SAFETY: `Events` owns the ring buffer's fd (aya's MapData) and always
    // returns that same fd; it is closed only when the AsyncFd drops it.
    let fd = unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
    Ok(tokio::spawn(async move {
        let mut fd = fd;
        loop {
            // Whatever is already there (events from before this agent
            // started included), then wait for more.
            let batch = fd.get_mut().drain();
            if !batch.is_empty() {
                let Some(log) = log.upgrade() else { return };
                log.record(&batch, &metrics, riptide_datapath::clock::monotonic_ns());
            }
            match fd.readable_mut().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!(error = %e, "waiting on the datapath events ring buffer failed; events are no longer read");
                    return;
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use riptide_common::DropEvent;

    use super::*;

    fn ev(reason: u32, dst: (Ipv4Addr, u16), ts_ns: u64) -> Event {
        ev_from(reason, EV_SRC_FROM_POD, dst, ts_ns)
    }

    fn ev_from(reason: u32, source: u8, dst: (Ipv4Addr, u16), ts_ns: u64) -> Event {
        Event {
            raw: DropEvent {
                ts_ns,
                reason,
                ifindex: 7,
                saddr_be: u32::from(Ipv4Addr::new(10, 42, 0, 5)).to_be(),
                daddr_be: u32::from(dst.0).to_be(),
                sport_be: 40000u16.to_be(),
                dport_be: dst.1.to_be(),
                proto: proto::TCP,
                source,
                _pad: 0,
            },
        }
    }

    fn fe(ip: Ipv4Addr, port: u16, service: &str) -> FrontendView {
        FrontendView {
            frontend: format!("{ip}:{port}/TCP"),
            ip,
            port,
            protocol: "TCP".into(),
            scope: "external".into(),
            kind: "ClusterIP".into(),
            flags: Vec::new(),
            revnat_id: 1,
            affinity_timeout: None,
            backends: Vec::new(),
            service: Some(service.into()),
        }
    }

    #[test]
    fn log_is_bounded_ordered_and_names_services() {
        let log = EventLog::default();
        let m = Metrics::new();
        let vip = Ipv4Addr::new(10, 43, 0, 10);
        let node = Ipv4Addr::new(198, 18, 0, 10);
        let batch: Vec<Event> = (0..KEEP as u64 + 10)
            .map(|i| ev(riptide_common::stats::DROP_NO_BACKEND, (vip, 80), 1_000 + i))
            .collect();
        log.record(&batch, &m, 2_000_000_000);
        log.record(&[ev(riptide_common::stats::DROP_NO_BACKEND, (node, 30080), 1_500_000_000)], &m, 2_000_000_000);
        let fes = [fe(vip, 80, "default/web:http"), fe(Ipv4Addr::UNSPECIFIED, 30080, "default/np:http")];
        let all = log.since(0, &fes, &HashMap::new());
        assert_eq!(all.len(), KEEP, "bounded");
        assert_eq!(all[0].seq, 11, "oldest dropped first");
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let last = all.last().unwrap();
        assert_eq!(last.dst, SocketAddrV4::new(node, 30080));
        assert_eq!(last.service.as_deref(), Some("default/np:http"), "NodePort matched on any node address");
        assert_eq!(all[0].service.as_deref(), Some("default/web:http"));
        assert_eq!(all[0].reason, "drop_no_backend");
        assert_eq!(all[0].program, "from-pod");
        // An event 0.5 s older than "now" is stamped ~0.5 s in the past.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!((now - last.time_unix_s - 0.5).abs() < 0.25, "{} vs {now}", last.time_unix_s);
        assert_eq!(log.since(last.seq, &fes, &HashMap::new()).len(), 1);
        assert!(log.since(last.seq + 1, &fes, &HashMap::new()).is_empty());
        assert!(m.encode().contains("riptide_agent_datapath_events_total{reason=\"drop_no_backend\"} 1035"), "{}", m.encode());
    }

    #[test]
    fn policy_events_carry_direction_verdict_and_pods() {
        use riptide_common::stats::{POLICY_AUDIT_OUT, POLICY_DENY_IN};
        let log = EventLog::default();
        let m = Metrics::new();
        let dst = Ipv4Addr::new(10, 42, 0, 7);
        log.record(
            &[ev_from(POLICY_DENY_IN, EV_SRC_TO_POD, (dst, 80), 1_000), ev_from(POLICY_AUDIT_OUT, EV_SRC_FROM_POD, (dst, 81), 2_000)],
            &m,
            3_000,
        );
        let pods = HashMap::from([(Ipv4Addr::new(10, 42, 0, 5), "x/a".to_owned()), (dst, "y/b".to_owned())]);
        let v = log.since(0, &[], &pods);
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].reason.as_str(), v[0].program.as_str()), ("policy_deny_in", "to-pod"));
        assert_eq!((v[0].verdict.as_deref(), v[0].direction.as_deref()), (Some("policy-denied"), Some("ingress")));
        assert_eq!((v[0].src_pod.as_deref(), v[0].dst_pod.as_deref()), (Some("x/a"), Some("y/b")));
        assert_eq!((v[1].verdict.as_deref(), v[1].direction.as_deref()), (Some("policy-audit"), Some("egress")));
        assert_eq!(v[1].dst.port(), 81);
        let other = EventLog::default();
        other.record(&[ev(riptide_common::stats::DROP_NO_BACKEND, (dst, 80), 1)], &m, 2);
        let v = other.since(0, &[], &pods);
        assert_eq!((v[0].verdict.as_deref(), v[0].direction.as_deref()), (None, None), "not a policy event");
        assert_eq!(v[0].dst_pod.as_deref(), Some("y/b"));
    }
}
