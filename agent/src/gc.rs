//! Garbage collection of the flow-state maps, and moving UDP clients off
//! backends that went away.
//!
//! Two kinds of deletion, kept apart on purpose:
//!
//! - **expired** — conntrack (`names::CT4`, `names::CT_ANY4`) and NAT
//!   (`names::NAT4`, `names::NAT_ANY4`) entries idle longer than their
//!   protocol's timeout, affinity entries (`rt_aff4_v1`) idle longer than
//!   their Service's `timeoutSeconds`. The
//!   programs stamp entries with `bpf_ktime_get_coarse_ns()` (=
//!   `CLOCK_MONOTONIC` at tick granularity, see `ebpf/programs/src/clock.rs`),
//!   which is what we age them with ([`GcConfig::clock`]); the clock starts
//!   at boot, so ages saturate and nothing assumes uptime. This
//!   depends on nothing the agent knows, so it runs from the first second —
//!   a restarted agent never cuts a live flow (Cilium's "GC at start deleted
//!   valid entries" bug came from judging entries against a half-built
//!   view of the services).
//! - **stale backend** — UDP conntrack entries and connected UDP sockets
//!   whose backend no longer serves their frontend (deleted, or neither
//!   ready nor serving-terminating). kube-proxy deletes such UDP conntrack
//!   entries too (`pkg/proxy/conntrack/cleanup.go`): without it a UDP client
//!   that keeps its 5-tuple (DNS resolvers do) is stuck on the old backend
//!   forever. This *does* judge against the agent's view, so it only runs
//!   once the first full resync is done, only for UDP, and only deletes
//!   what it positively knows is stale (a frontend it does not know keeps
//!   its flows). TCP flows to removed backends are left alone: the backend
//!   resets them itself, and terminating backends must drain (KEP-1669).
//!
//! Socket LB rewrote a connected UDP socket once, at `connect()`; nothing in
//! the maps can redirect its later sends. The socket-LB reverse map
//! (`rt_sockrev4_v1`: socket cookie + backend → frontend) tells which
//! sockets point at a stale backend, and [`crate::sockdiag`] destroys them
//! in the namespaces of the processes of the socket-LB cgroup; the
//! application gets `ECONNABORTED` and reconnects to a live backend.
//!
//! Passes run on a dedicated thread with their own map handles, every
//! `interval` (both kinds) and shortly after the reconcile loop changed
//! service ports (stale only), so they never stall the reconcile loop.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Weak, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use riptide_common::{AffKey, AffValue, CtKey, CtValue, NatValue, SVC_F_AFFINITY, SockRevKey, SockRevValue, names, proto};
use riptide_datapath::{
    clock::Clock,
    gc::{CT_TABLES, FlowMaps, NAT_TABLES},
    service::{BackendState, Protocol, Service},
};

use crate::{
    metrics::{GcLabel, MapLabel},
    shared::{Shared, lock},
    sockdiag,
};

/// Timeouts and cadence of the GC.
#[derive(Clone, Debug)]
pub struct GcConfig {
    /// Time between full passes.
    pub interval: Duration,
    /// Idle time after which an established TCP conntrack/NAT entry is
    /// deleted: Cilium's established-TCP lifetime (6 h).
    pub tcp_timeout: Duration,
    /// Idle time after which a TCP entry that saw a FIN or RST
    /// (`CT_F_CLOSING` / `NAT_F_CLOSING`) is deleted: Cilium's close
    /// timeout (10 s), long enough for the last ACKs and retransmitted FINs.
    pub tcp_close_timeout: Duration,
    /// Idle time for UDP and everything else (Cilium's non-TCP 60 s).
    pub other_timeout: Duration,
    /// Shortest gap between two change-triggered passes (coalesces churn).
    pub min_gap: Duration,
    /// The socket-LB cgroup: its processes' namespaces are searched for
    /// sockets to destroy. `None`: socket LB is off, nothing to search.
    pub cgroup: Option<PathBuf>,
    /// Where a pass reads "now" to age entries: the kernel's monotonic
    /// clock, or a fixed instant in tests of a freshly booted machine.
    pub clock: Clock,
}

impl Default for GcConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            tcp_timeout: Duration::from_secs(6 * 3600),
            tcp_close_timeout: Duration::from_secs(10),
            other_timeout: Duration::from_secs(60),
            min_gap: Duration::from_millis(200),
            cgroup: None,
            clock: Clock::Monotonic,
        }
    }
}

/// Kubernetes' largest `sessionAffinityConfig.clientIP.timeoutSeconds`:
/// the age at which an affinity entry of an unknown frontend goes.
pub const MAX_AFFINITY_S: u32 = 86_400;

const NS: u64 = 1_000_000_000;

fn dur_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Idle past its protocol's timeout (for TCP, the close timeout once the
/// direction saw a FIN or RST)? Entries stamped in the future (a packet
/// raced our clock read) are never expired.
pub fn flow_expired(protocol: u8, closing: bool, last_seen_ns: u64, now_ns: u64, cfg: &GcConfig) -> bool {
    let limit = match (protocol, closing) {
        (proto::TCP, true) => cfg.tcp_close_timeout,
        (proto::TCP, false) => cfg.tcp_timeout,
        _ => cfg.other_timeout,
    };
    now_ns.saturating_sub(last_seen_ns) > dur_ns(limit)
}

/// Idle past the Service's affinity timeout (`timeouts`: revnat id →
/// seconds, from the master entries carrying `SVC_F_AFFINITY`)?
pub fn affinity_expired(k: &AffKey, v: &AffValue, now_ns: u64, timeouts: &HashMap<u16, u32>) -> bool {
    let limit = timeouts.get(&k.revnat_id).copied().unwrap_or(MAX_AFFINITY_S);
    now_ns.saturating_sub(v.last_used_ns) > u64::from(limit) * NS
}

/// What stale-backend decisions compare flows against: the maps' ids and
/// the agent's serving backends per UDP frontend.
#[derive(Clone, Debug, Default)]
pub struct StaleView {
    /// revnat id → frontend (vip 0.0.0.0 for node-wide ones).
    pub revnat: HashMap<u16, (Ipv4Addr, u16)>,
    /// backend id → address.
    pub backends: HashMap<u32, SocketAddrV4>,
    /// UDP frontend → backends that are ready or serving-terminating.
    pub serving: ServingIndex,
}

/// Serving backends of every UDP frontend the agent wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServingIndex(pub HashMap<(Ipv4Addr, u16), HashSet<SocketAddrV4>>);

impl ServingIndex {
    pub fn from_ports<'a>(ports: impl Iterator<Item = &'a Service>) -> Self {
        let mut m: HashMap<(Ipv4Addr, u16), HashSet<SocketAddrV4>> = HashMap::new();
        for p in ports.filter(|p| p.protocol == Protocol::Udp) {
            let serving: HashSet<SocketAddrV4> = p
                .backends
                .iter()
                .filter(|b| matches!(b.state, BackendState::Active | BackendState::Terminating))
                .map(|b| b.addr)
                .collect();
            for f in &p.frontends {
                m.entry((f.addr, f.port)).or_default().extend(serving.iter().copied());
            }
        }
        Self(m)
    }

    /// `(frontend, backend)` pairs that serve in `self` but not in `new`.
    pub fn removed_in(&self, new: &Self) -> usize {
        self.0
            .iter()
            .map(|(fe, old)| match new.0.get(fe) {
                None => old.len().max(1),
                Some(set) => old.difference(set).count(),
            })
            .sum()
    }
}

impl StaleView {
    /// Does backend `backend_id` no longer serve the frontend `revnat_id`?
    /// Only positive knowledge counts: a frontend id of 0 or a frontend the
    /// agent did not write keeps its flows.
    fn stale(&self, revnat_id: u16, backend: Option<SocketAddrV4>) -> bool {
        if revnat_id == 0 {
            return false;
        }
        // The frontend was deleted: its UDP flows have nowhere to go
        // (kube-proxy clears conntrack of deleted UDP Services too).
        let Some(fe) = self.revnat.get(&revnat_id) else {
            return true;
        };
        let Some(be) = backend else {
            // The backend was deleted from every Service.
            return true;
        };
        self.serving.0.get(fe).is_some_and(|set| !set.contains(&be))
    }

    /// A UDP conntrack entry (either direction) of a stale backend.
    pub fn ct_stale(&self, k: &CtKey, v: &CtValue) -> bool {
        k.proto == proto::UDP && self.stale(v.revnat_id, self.backends.get(&v.backend_id).copied())
    }

    /// A socket-LB reverse entry whose backend went stale (the socket may
    /// be TCP; only UDP sockets are ever destroyed).
    pub fn sock_stale(&self, k: &SockRevKey, v: &SockRevValue) -> bool {
        let be = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.addr_be)), u16::from_be(k.port_be));
        self.stale(v.revnat_id, Some(be))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the flow-state maps of node {node}")]
    Open {
        node: String,
        /// Boxed: the datapath error is large and would bloat every `Result`.
        #[source]
        source: Box<riptide_datapath::Error>,
    },
    #[error("reading or deleting flow state")]
    Maps(#[source] Box<riptide_datapath::Error>),
}

impl From<riptide_datapath::Error> for Error {
    fn from(e: riptide_datapath::Error) -> Self {
        Self::Maps(Box::new(e))
    }
}

/// The GC: its own map handles plus what it remembers between passes.
pub struct Gc {
    maps: FlowMaps,
    cfg: GcConfig,
    shared: Weak<Shared>,
    /// Serving index of the last stale pass: a trigger without removals
    /// since then needs no pass.
    last_serving: Option<ServingIndex>,
    /// Stale socket entries already searched for without finding a UDP
    /// socket (TCP sockets, closed ones): not searched again.
    searched: HashSet<SockRevKey>,
}

/// One pass's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Expiry and (once ready) stale backends.
    Full,
    /// Stale backends only, after service changes.
    Stale,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Conntrack entries deleted, both tables together.
    pub ct_expired: usize,
    pub ct_stale: usize,
    /// The same per conntrack table, in [`CT_TABLES`] order.
    pub ct_expired_by_table: [usize; 2],
    pub ct_stale_by_table: [usize; 2],
    /// NAT mappings deleted, both tables together, and per table in
    /// [`NAT_TABLES`] order.
    pub nat_expired: usize,
    pub nat_expired_by_table: [usize; 2],
    pub aff_expired: usize,
    pub sockets_destroyed: usize,
    pub sock_rev_deleted: usize,
    pub skipped: bool,
}

impl Gc {
    pub fn new(node: &str, cfg: GcConfig, shared: Weak<Shared>) -> Result<Self, Error> {
        let maps = FlowMaps::open_pinned(node).map_err(|source| Error::Open { node: node.to_owned(), source: Box::new(source) })?;
        Ok(Self { maps, cfg, shared, last_serving: None, searched: HashSet::new() })
    }

    /// Starts the GC thread. Send `()` on the returned channel after service
    /// changes; dropping it stops the thread.
    pub fn spawn(self) -> std::io::Result<mpsc::Sender<()>> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("riptide-gc".into()).spawn(move || self.run(&rx))?;
        Ok(tx)
    }

    fn run(mut self, rx: &mpsc::Receiver<()>) {
        // First pass right away: expiry only until the agent is ready, so it
        // is safe at start.
        let mut next_full = Instant::now();
        loop {
            let wait = next_full.saturating_duration_since(Instant::now());
            let kind = match rx.recv_timeout(wait) {
                Ok(()) => {
                    // Coalesce a burst of changes.
                    std::thread::sleep(self.cfg.min_gap);
                    while rx.try_recv().is_ok() {}
                    Pass::Stale
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    next_full = Instant::now() + self.cfg.interval;
                    Pass::Full
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if self.shared.upgrade().is_none() {
                return;
            }
            self.pass_and_record(kind);
        }
    }

    /// Runs one pass and records it in metrics and status.
    pub fn pass_and_record(&mut self, kind: Pass) -> Option<PassReport> {
        let shared = self.shared.upgrade()?;
        let started = Instant::now();
        let result = self.pass(kind, &shared);
        let m = &shared.metrics;
        let mut st = lock(&shared.gc_status);
        match result {
            Ok(r) => {
                if r.skipped {
                    return Some(r);
                }
                let el = started.elapsed();
                m.gc_runs.inc();
                m.gc_seconds.observe(el.as_secs_f64());
                let count = |map: &'static str, reason: &'static str, n: usize| {
                    if n > 0 {
                        m.gc_deletions.get_or_create(&GcLabel { map, reason }).inc_by(n as u64);
                    }
                };
                for (i, table) in CT_TABLES.into_iter().enumerate() {
                    count(table, "expired", r.ct_expired_by_table[i]);
                    count(table, "stale_backend", r.ct_stale_by_table[i]);
                }
                for (i, table) in NAT_TABLES.into_iter().enumerate() {
                    count(table, "expired", r.nat_expired_by_table[i]);
                }
                count(names::AFF4, "expired", r.aff_expired);
                count(names::SOCKREV4, "stale_backend", r.sock_rev_deleted);
                m.udp_sockets_destroyed.inc_by(r.sockets_destroyed as u64);
                st.passes += 1;
                st.last_pass_ms = Some(el.as_secs_f64() * 1e3);
                st.expired_deleted += (r.ct_expired + r.nat_expired + r.aff_expired) as u64;
                st.stale_deleted += (r.ct_stale + r.sock_rev_deleted) as u64;
                st.udp_sockets_destroyed += r.sockets_destroyed as u64;
                st.last_error = None;
                if r.ct_stale + r.sockets_destroyed > 0 {
                    tracing::info!(
                        conntrack = r.ct_stale,
                        sockets = r.sockets_destroyed,
                        "moved UDP flows off backends that no longer serve"
                    );
                }
                if r.ct_expired + r.nat_expired + r.aff_expired > 0 {
                    tracing::debug!(ct = r.ct_expired, nat = r.nat_expired, affinity = r.aff_expired, "expired entries deleted");
                }
                Some(r)
            }
            Err(e) => {
                m.gc_errors.inc();
                let msg = crate::reconcile::error_chain(&e);
                tracing::warn!(error = %msg, "GC pass failed; retrying next pass");
                st.last_error = Some(msg);
                None
            }
        }
    }

    fn serving_now(shared: &Shared) -> ServingIndex {
        ServingIndex::from_ports(lock(&shared.reconciler).applied().values().map(AsRef::as_ref))
    }

    /// One pass. Map contents are always read *before* the agent's serving
    /// index: a flow to a backend that appeared meanwhile was written by an
    /// apply that finished before the index is read, so it is never judged
    /// against an older index.
    pub fn pass(&mut self, kind: Pass, shared: &Shared) -> Result<PassReport, Error> {
        let mut r = PassReport::default();
        let ready = shared.ready.load(Ordering::Acquire);
        if kind == Pass::Stale {
            if !ready {
                r.skipped = true;
                return Ok(r);
            }
            // Nothing stopped serving since the last look: no work.
            let now = Self::serving_now(shared);
            if let Some(last) = &self.last_serving
                && last.removed_in(&now) == 0
            {
                self.last_serving = Some(now);
                r.skipped = true;
                return Ok(r);
            }
        }
        let now = self.cfg.clock.now_ns();
        let [ct_tcp, ct_any] = self.maps.conntrack_by_table()?;
        let ct_len = [ct_tcp.len(), ct_any.len()];
        let ct: Vec<(CtKey, CtValue)> = ct_tcp.into_iter().chain(ct_any).collect();
        let sockrev = if ready && self.cfg.cgroup.is_some() { self.maps.sock_rev()? } else { Vec::new() };
        let mut gone: HashSet<CtKey> = HashSet::new();
        if kind == Pass::Full {
            let expired: Vec<(CtKey, Option<u64>)> = ct
                .iter()
                .filter(|(k, v)| flow_expired(k.proto, v.flags & riptide_common::CT_F_CLOSING != 0, v.last_seen_ns, now, &self.cfg))
                .map(|(k, v)| (*k, Some(v.last_seen_ns)))
                .collect();
            gone.extend(expired.iter().map(|(k, _)| *k));
            r.ct_expired_by_table = self.maps.delete_conntrack(&expired)?;
            r.ct_expired = r.ct_expired_by_table.iter().sum();
        }
        if ready {
            let view = self.stale_view(shared)?;
            let stale: Vec<(CtKey, Option<u64>)> = ct
                .iter()
                .filter(|(k, v)| !gone.contains(k) && view.ct_stale(k, v))
                .map(|(k, _)| (*k, None))
                .collect();
            r.ct_stale_by_table = self.maps.delete_conntrack(&stale)?;
            r.ct_stale = r.ct_stale_by_table.iter().sum();
            if let Some(cg) = self.cfg.cgroup.clone() {
                let (destroyed, deleted) = self.destroy_stale_sockets(&cg, &sockrev, &view)?;
                r.sockets_destroyed = destroyed;
                r.sock_rev_deleted = deleted;
            }
            self.last_serving = Some(view.serving);
        }
        let left: [usize; 2] =
            std::array::from_fn(|i| ct_len[i].saturating_sub(r.ct_expired_by_table[i] + r.ct_stale_by_table[i]));
        for (i, table) in CT_TABLES.into_iter().enumerate() {
            shared.metrics.map_entries.get_or_create(&MapLabel { map: table }).set(i64::try_from(left[i]).unwrap_or(i64::MAX));
        }
        let ct_left = left.iter().sum::<usize>();
        shared.metrics.conntrack_entries.set(i64::try_from(ct_left).unwrap_or(i64::MAX));
        let mut st = lock(&shared.gc_status);
        st.conntrack_entries = ct_left;
        st.conntrack_tables = CT_TABLES.into_iter().zip(left).map(|(t, n)| (t.to_owned(), n)).collect();
        drop(st);
        if kind == Pass::Full {
            let nat = self.maps.nat_by_table()?;
            let expired: Vec<(CtKey, Option<u64>)> = nat
                .iter()
                .flatten()
                .filter(|(k, v): &&(CtKey, NatValue)| {
                    flow_expired(k.proto, v.flags & riptide_common::NAT_F_CLOSING != 0, v.last_seen_ns, now, &self.cfg)
                })
                .map(|(k, v)| (*k, Some(v.last_seen_ns)))
                .collect();
            r.nat_expired_by_table = self.maps.delete_nat(&expired)?;
            r.nat_expired = r.nat_expired_by_table.iter().sum();
            let aff = self.maps.affinity()?;
            if !aff.is_empty() {
                let timeouts = self.affinity_timeouts()?;
                let expired: Vec<(AffKey, Option<u64>)> = aff
                    .iter()
                    .filter(|(k, v)| affinity_expired(k, v, now, &timeouts))
                    .map(|(k, v)| (*k, Some(v.last_used_ns)))
                    .collect();
                r.aff_expired = self.maps.delete_affinity(&expired)?;
            }
            let set = |map: &'static str, n: usize| {
                shared.metrics.map_entries.get_or_create(&MapLabel { map }).set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            let nat_left: [usize; 2] = std::array::from_fn(|i| nat[i].len().saturating_sub(r.nat_expired_by_table[i]));
            for (i, table) in NAT_TABLES.into_iter().enumerate() {
                set(table, nat_left[i]);
            }
            set(names::AFF4, aff.len().saturating_sub(r.aff_expired));
            let mut st = lock(&shared.gc_status);
            st.nat_entries = nat_left.iter().sum();
            st.nat_tables = NAT_TABLES.into_iter().zip(nat_left).map(|(t, n)| (t.to_owned(), n)).collect();
            st.affinity_entries = aff.len().saturating_sub(r.aff_expired);
            st.sock_rev_entries = sockrev.len().saturating_sub(r.sock_rev_deleted);
        }
        Ok(r)
    }

    fn stale_view(&self, shared: &Shared) -> Result<StaleView, Error> {
        let revnat = self
            .maps
            .revnat()
            ?
            .into_iter()
            .map(|(k, v)| (k.id, (Ipv4Addr::from(u32::from_be(v.vip_be)), u16::from_be(v.port_be))))
            .collect();
        let backends = self
            .maps
            .backends()
            ?
            .into_iter()
            .map(|(k, v)| (k.id, SocketAddrV4::new(Ipv4Addr::from(u32::from_be(v.addr_be)), u16::from_be(v.port_be))))
            .collect();
        // Read after the maps (see `pass`).
        let serving = Self::serving_now(shared);
        Ok(StaleView { revnat, backends, serving })
    }

    fn affinity_timeouts(&self) -> Result<HashMap<u16, u32>, Error> {
        Ok(self
            .maps
            .services()
            ?
            .into_iter()
            .filter(|(k, v)| k.slot == 0 && v.flags & SVC_F_AFFINITY != 0)
            .map(|(_, v)| (v.revnat_id, v.affinity_timeout_s))
            .collect())
    }

    /// Destroys connected UDP sockets of the cgroup's processes whose socket
    /// LB entry names a stale backend. Returns (sockets destroyed, reverse
    /// entries deleted).
    fn destroy_stale_sockets(
        &mut self,
        cgroup: &std::path::Path,
        sockrev: &[(SockRevKey, SockRevValue)],
        view: &StaleView,
    ) -> Result<(usize, usize), Error> {
        let candidates: HashMap<u64, Vec<SockRevKey>> = sockrev.iter().filter(|(k, v)| view.sock_stale(k, v)).fold(
            HashMap::new(),
            |mut m, (k, _)| {
                m.entry(k.cookie).or_default().push(*k);
                m
            },
        );
        let all: HashSet<SockRevKey> = candidates.values().flatten().copied().collect();
        self.searched.retain(|k| all.contains(k));
        if all.iter().all(|k| self.searched.contains(k)) {
            return Ok((0, 0));
        }
        let wanted: HashMap<u64, HashSet<SocketAddrV4>> = candidates
            .iter()
            .map(|(c, ks)| {
                let set = ks
                    .iter()
                    .map(|k| SocketAddrV4::new(Ipv4Addr::from(u32::from_be(k.addr_be)), u16::from_be(k.port_be)))
                    .collect();
                (*c, set)
            })
            .collect();
        let wanted = Arc::new(wanted);
        let mut destroyed_cookies: HashSet<u64> = HashSet::new();
        for (ns_id, ns) in sockdiag::netns_of_cgroup(cgroup) {
            let wanted = wanted.clone();
            let res = sockdiag::in_netns(ns, move || -> std::io::Result<Vec<u64>> {
                let mut done = Vec::new();
                for s in sockdiag::connected_udp4()? {
                    if wanted.get(&s.cookie).is_some_and(|b| b.contains(&s.remote)) && sockdiag::destroy_udp4(&s)? {
                        tracing::info!(cookie = s.cookie, local = %s.local, backend = %s.remote, "connected UDP socket aborted: its backend no longer serves");
                        done.push(s.cookie);
                    }
                }
                Ok(done)
            });
            match res {
                Ok(Ok(c)) => destroyed_cookies.extend(c),
                // A namespace that vanished, or a kernel without
                // INET_DIAG_DESTROY: log, keep going with the others.
                Ok(Err(e)) | Err(e) => tracing::warn!(netns = ?ns_id, error = %e, "cannot search or destroy UDP sockets in a namespace"),
            }
        }
        let keys: Vec<SockRevKey> = all.iter().filter(|k| destroyed_cookies.contains(&k.cookie)).copied().collect();
        let deleted = self.maps.delete_sock_rev(&keys)?;
        self.searched = all.into_iter().filter(|k| !destroyed_cookies.contains(&k.cookie)).collect();
        Ok((destroyed_cookies.len(), deleted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use riptide_datapath::service::{Algorithm, Backend, Frontend, FrontendKind, TrafficPolicy};

    fn cfg() -> GcConfig {
        GcConfig { tcp_timeout: Duration::from_secs(100), other_timeout: Duration::from_secs(10), ..GcConfig::default() }
    }

    #[test]
    fn expiry_uses_the_protocol_timeout_and_never_expires_future_stamps() {
        let c = cfg();
        let now = 1_000 * NS;
        assert!(!flow_expired(proto::TCP, false, now - 99 * NS, now, &c));
        assert!(flow_expired(proto::TCP, false, now - 101 * NS, now, &c));
        // A closing TCP direction: the close timeout (default 10 s).
        assert!(!flow_expired(proto::TCP, true, now - 9 * NS, now, &c));
        assert!(flow_expired(proto::TCP, true, now - 11 * NS, now, &c));
        assert!(!flow_expired(proto::UDP, false, now - 9 * NS, now, &c));
        assert!(flow_expired(proto::UDP, false, now - 11 * NS, now, &c));
        assert!(flow_expired(proto::ICMP, false, now - 11 * NS, now, &c));
        // The flag means nothing for other protocols.
        assert!(!flow_expired(proto::UDP, true, now - 9 * NS, now, &c));
        // A packet stamped after we read the clock.
        assert!(!flow_expired(proto::UDP, false, now + 5 * NS, now, &c));
        assert!(!flow_expired(proto::TCP, true, now + 5 * NS, now, &c));
    }

    #[test]
    fn affinity_uses_the_service_timeout_else_the_kubernetes_maximum() {
        let now = 200_000 * NS;
        let k = |revnat_id| AffKey { revnat_id, ..AffKey::default() };
        let v = |age_s: u64| AffValue { last_used_ns: now - age_s * NS, ..AffValue::default() };
        let t = HashMap::from([(7u16, 30u32)]);
        assert!(!affinity_expired(&k(7), &v(29), now, &t));
        assert!(affinity_expired(&k(7), &v(31), now, &t));
        assert!(!affinity_expired(&k(8), &v(86_000), now, &t));
        assert!(affinity_expired(&k(8), &v(86_401), now, &t));
    }

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn udp_port(backends: &[(&str, BackendState)]) -> Service {
        Service {
            name: "default/dns:dns".into(),
            protocol: Protocol::Udp,
            frontends: vec![
                Frontend { kind: FrontendKind::ClusterIp, addr: Ipv4Addr::new(10, 43, 0, 10), port: 53 },
                Frontend { kind: FrontendKind::NodePort, addr: Ipv4Addr::UNSPECIFIED, port: 30053 },
            ],
            backends: backends.iter().map(|(a, s)| Backend { addr: sa(a), state: *s, local: true }).collect(),
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: riptide_datapath::service::LbMode::Snat,
        }
    }

    fn view(ports: &[Service]) -> StaleView {
        StaleView {
            revnat: HashMap::from([(1, (Ipv4Addr::new(10, 43, 0, 10), 53)), (2, (Ipv4Addr::UNSPECIFIED, 30053)), (3, (Ipv4Addr::new(10, 43, 0, 11), 80))]),
            backends: HashMap::from([(10, sa("10.42.0.5:53")), (11, sa("10.42.0.6:53")), (12, sa("10.42.0.7:53")), (13, sa("10.42.0.8:8080"))]),
            serving: ServingIndex::from_ports(ports.iter()),
        }
    }

    fn ct(proto: u8, revnat_id: u16, backend_id: u32) -> (CtKey, CtValue) {
        (CtKey { proto, ..CtKey::default() }, CtValue { revnat_id, backend_id, ..CtValue::default() })
    }

    #[test]
    fn udp_flows_to_backends_that_stopped_serving_are_stale() {
        let p = udp_port(&[("10.42.0.5:53", BackendState::Active), ("10.42.0.6:53", BackendState::Terminating), ("10.42.0.7:53", BackendState::Quarantined)]);
        let v = view(&[p]);
        let stale = |(k, e): (CtKey, CtValue)| v.ct_stale(&k, &e);
        assert!(!stale(ct(proto::UDP, 1, 10)), "ready backend");
        assert!(!stale(ct(proto::UDP, 1, 11)), "serving-terminating backend drains (KEP-1669)");
        assert!(stale(ct(proto::UDP, 1, 12)), "not serving");
        assert!(stale(ct(proto::UDP, 2, 12)), "same through the NodePort frontend");
        assert!(stale(ct(proto::UDP, 1, 99)), "backend deleted from the map");
        assert!(stale(ct(proto::UDP, 42, 10)), "frontend deleted");
        assert!(!stale(ct(proto::UDP, 0, 12)), "no frontend id: not ours to judge");
        assert!(!stale(ct(proto::UDP, 3, 13)), "frontend the agent has no UDP port for: kept");
        assert!(!stale(ct(proto::TCP, 1, 12)), "TCP is never cut");
    }

    #[test]
    fn socket_entries_are_judged_by_their_backend_address() {
        let p = udp_port(&[("10.42.0.5:53", BackendState::Active)]);
        let v = view(&[p]);
        let k = |addr: &str| {
            let a = sa(addr);
            SockRevKey { cookie: 1, addr_be: u32::from(*a.ip()).to_be(), port_be: a.port().to_be(), _pad: 0 }
        };
        let val = SockRevValue { vip_be: 0, port_be: 0, revnat_id: 1 };
        assert!(!v.sock_stale(&k("10.42.0.5:53"), &val));
        assert!(v.sock_stale(&k("10.42.0.6:53"), &val));
    }

    #[test]
    fn removed_pairs_are_counted() {
        let a = ServingIndex::from_ports([udp_port(&[("10.42.0.5:53", BackendState::Active), ("10.42.0.6:53", BackendState::Active)])].iter());
        let b = ServingIndex::from_ports([udp_port(&[("10.42.0.5:53", BackendState::Active), ("10.42.0.7:53", BackendState::Active)])].iter());
        assert_eq!(a.removed_in(&a), 0);
        // 10.42.0.6 left both frontends (ClusterIP and NodePort).
        assert_eq!(a.removed_in(&b), 2);
        assert_eq!(b.removed_in(&ServingIndex::default()), 4);
        assert_eq!(ServingIndex::default().removed_in(&b), 0, "additions need no pass");
    }
}
