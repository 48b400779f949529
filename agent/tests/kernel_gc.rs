//! The GC against real pinned maps (needs root to load eBPF), and
//! `sock_diag` destroying a real connected UDP socket in a namespace this
//! test creates.
//!
//! Flow entries are written into the pinned maps with `last_seen` stamps
//! chosen by the test, exactly what the programs would have left (they
//! stamp with `CLOCK_MONOTONIC`); the end-to-end tests in
//! `privileged_gc_restart.rs` create them through real traffic. The GC
//! reads "now" from a [`Clock::Fixed`] instant, so the same test ages
//! entries identically on a machine booted a minute ago and on one up for
//! weeks, and can play a machine up for 5 s with stamps near 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, atomic::AtomicBool, atomic::Ordering},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use riptide_agent::{
    gc::{Gc, GcConfig, Pass},
    metrics::Metrics,
    model::{Desired, Owner},
    reconcile::Reconciler,
    shared::{GcStatus, Shared, Status},
    sockdiag,
};
use riptide_common::{AffKey, AffValue, CT_DIR_ANY, CT_F_REPLY, CtKey, CtValue, NatValue, names, proto};
use riptide_datapath::{
    Datapath, Pinning,
    clock::Clock,
    service::{Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, TrafficPolicy},
};
use riptide_test_support::{netns::Netns, privileged};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

/// Pins of a test node, removed on drop.
struct Node(String);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = riptide_datapath::unpin_node(&self.0);
    }
}

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

/// The Service `default/<name>` with one port, and its owner.
fn port(name: &str, protocol: Protocol, vip: &str, p: u16, backends: &[(&str, BackendState)], affinity: Option<u32>) -> (Owner, Service) {
    let owner = Owner::service("default", name);
    let port = Service {
        name: format!("{owner}:p"),
        protocol,
        frontends: vec![Frontend { kind: FrontendKind::ClusterIp, addr: vip.parse().unwrap(), port: p }],
        backends: backends.iter().map(|(a, s)| Backend { addr: sa(a), state: *s, local: true }).collect(),
        affinity_timeout_s: affinity,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    };
    (owner, port)
}

fn lru<K: aya::Pod, V: aya::Pod>(node: &str, name: &str) -> HashMap<MapData, K, V> {
    let path = riptide_datapath::pin_dir(node).unwrap().join(name);
    HashMap::try_from(Map::LruHashMap(MapData::from_pin(path).unwrap())).unwrap()
}

/// The backend every test flow went to: the source of its reply tuple.
const BACKEND: &str = "10.42.2.2:5353";

/// The tuple `client` → 10.43.0.10:53 under key direction `dir`.
fn ct_key(client: &str, proto: u8, dir: u8) -> CtKey {
    let c = sa(client);
    CtKey {
        saddr_be: u32::from(*c.ip()).to_be(),
        daddr_be: u32::from(Ipv4Addr::new(10, 43, 0, 10)).to_be(),
        sport_be: c.port().to_be(),
        dport_be: 53u16.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

/// The reply tuple of the flow from `client`: [`BACKEND`] → `client`.
fn reply_key(client: &str, proto: u8) -> CtKey {
    let (c, b) = (sa(client), sa(BACKEND));
    CtKey {
        saddr_be: u32::from(*b.ip()).to_be(),
        daddr_be: u32::from(*c.ip()).to_be(),
        sport_be: b.port().to_be(),
        dport_be: c.port().to_be(),
        proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    }
}

/// Ids the maps gave the services of [`start`].
struct Ids {
    ready_be: u32,
    quarantined_be: u32,
    web_be: u32,
    dns_rev: u16,
    web_rev: u16,
}

/// Loads a node's datapath with what a previous agent wrote — a UDP
/// service with one ready and one not-serving backend, a TCP service with
/// `affinity_s` seconds of ClientIP affinity — and returns the state of an
/// agent that has just started: not synced (not ready), its reconciler
/// knowing the ports.
fn start(node: &Node, affinity_s: u32) -> (Arc<Shared>, Ids) {
    let mut dp = Datapath::load(&Pinning::Node(node.0.clone())).unwrap();
    let mut services = dp.services().unwrap();
    let mut rec = Reconciler::new();
    let dns = port("dns", Protocol::Udp, "10.43.0.10", 53, &[("10.42.0.5:53", BackendState::Active), ("10.42.0.6:53", BackendState::Quarantined)], None);
    let web = port("web", Protocol::Tcp, "10.43.0.11", 80, &[("10.42.0.7:8080", BackendState::Active)], Some(affinity_s));
    for (owner, p) in [dns, web] {
        rec.set(&owner, Desired { ports: vec![p], ..Desired::default() });
    }
    let report = rec.apply(&mut services);
    assert!(report.failed.is_empty(), "{report:?}");
    let be_id = |addr: &str| {
        let a = sa(addr);
        services
            .dump_backends()
            .into_iter()
            .find(|(_, v)| u32::from_be(v.addr_be) == u32::from(*a.ip()) && u16::from_be(v.port_be) == a.port())
            .map(|(k, _)| k.id)
            .unwrap()
    };
    let revnat_of = |vip: &str| {
        let v: Ipv4Addr = vip.parse().unwrap();
        services
            .dump_revnat()
            .into_iter()
            .find(|(_, r)| u32::from_be(r.vip_be) == u32::from(v))
            .map(|(k, _)| k.id)
            .unwrap()
    };
    let ids = Ids {
        ready_be: be_id("10.42.0.5:53"),
        quarantined_be: be_id("10.42.0.6:53"),
        web_be: be_id("10.42.0.7:8080"),
        dns_rev: revnat_of("10.43.0.10"),
        web_rev: revnat_of("10.43.0.11"),
    };
    let shared = Arc::new(Shared {
        node: node.0.clone(),
        ready: AtomicBool::new(false),
        status: Mutex::new(Status::default()),
        reconciler: Mutex::new(rec),
        services: Mutex::new(services),
        dp: Mutex::new(dp),
        metrics: Metrics::new(),
        gc_status: Mutex::new(GcStatus::default()),
        events: Arc::default(),
        policy: Mutex::default(),
        maps: Mutex::default(),
        pods: std::sync::OnceLock::new(),
    });
    (shared, ids)
}

/// The node's flow-state maps, written the way the programs write them.
struct Flows {
    /// TCP, then everything else (`names::CT4`, `names::CT_ANY4`).
    ct: [HashMap<MapData, CtKey, CtValue>; 2],
    /// TCP, then everything else (`names::NAT4`, `names::NAT_ANY4`).
    nat: [HashMap<MapData, CtKey, NatValue>; 2],
    aff: HashMap<MapData, AffKey, AffValue>,
}

impl Flows {
    fn open(node: &Node) -> Self {
        Self { ct: [lru(&node.0, names::CT4), lru(&node.0, names::CT_ANY4)], nat: [lru(&node.0, names::NAT4), lru(&node.0, names::NAT_ANY4)], aff: lru(&node.0, names::AFF4) }
    }

    /// A translated flow as the programs' `ct::create` leaves it, last
    /// seen at `stamp_ns`, in the table of its protocol: the forward entry
    /// under the client's tuple, the reply entry ([`CT_F_REPLY`], the same
    /// frontend and backend) under the backend's answer.
    fn ct(&mut self, client: &str, p: u8, stamp_ns: u64, revnat_id: u16, backend_id: u32, flags: u16) {
        let table = &mut self.ct[usize::from(p != proto::TCP)];
        let v = CtValue { last_seen_ns: stamp_ns, backend_id, revnat_id, flags, ..CtValue::default() };
        table.insert(ct_key(client, p, CT_DIR_ANY), v, 0).unwrap();
        table.insert(reply_key(client, p), CtValue { flags: flags | CT_F_REPLY, ..v }, 0).unwrap();
    }

    /// A mapping in the NAT table of its protocol.
    fn nat(&mut self, client: &str, p: u8, stamp_ns: u64, flags: u16) {
        let v = NatValue { last_seen_ns: stamp_ns, flags, ..NatValue::default() };
        self.nat[usize::from(p != proto::TCP)].insert(ct_key(client, p, riptide_common::NAT_DIR_EGRESS), v, 0).unwrap();
    }

    fn aff(&mut self, client: u64, revnat_id: u16, stamp_ns: u64, backend_id: u32) {
        let k = AffKey { client, revnat_id, kind: riptide_common::AFF_CLIENT_IP, _pad: [0; 5] };
        self.aff.insert(k, AffValue { last_used_ns: stamp_ns, backend_id, _pad: 0 }, 0).unwrap();
    }

    /// Client ports of the flows left in conntrack (a reply entry's
    /// client is its destination). Every flow left must still have both
    /// entries: the GC never keeps one direction of a flow without the
    /// other when both carry the same stamp.
    fn ct_clients(&self) -> BTreeSet<u16> {
        let mut flows: BTreeMap<u16, [bool; 2]> = BTreeMap::new();
        for entry in self.ct.iter().flat_map(HashMap::iter) {
            let (k, v) = entry.unwrap();
            let reply = v.flags & CT_F_REPLY != 0;
            let client = u16::from_be(if reply { k.dport_be } else { k.sport_be });
            flows.entry(client).or_default()[usize::from(reply)] = true;
        }
        for (client, entries) in &flows {
            assert_eq!(*entries, [true, true], "client port {client}: [forward, reply] entries left");
        }
        flows.into_keys().collect()
    }

    fn nat_clients(&self) -> BTreeSet<u16> {
        self.nat.iter().flat_map(HashMap::keys).map(|k| u16::from_be(k.unwrap().sport_be)).collect()
    }

    fn aff_clients(&self) -> BTreeSet<u64> {
        self.aff.keys().map(|k| k.unwrap().client).collect()
    }
}

#[test]
fn kernel_gc_deletes_only_expired_entries_before_the_first_sync_then_stale_udp_flows() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let node = Node(format!("rtgc-{}", std::process::id()));
    let (shared, id) = start(&node, 30);

    // Flows, aged from a fixed "now" (an uptime of 10,000 s, more than the
    // oldest age). Timeouts below: TCP 100 s, UDP 10 s.
    let now = 10_000 * S;
    let ago = |s: u64| now - s * S;
    let mut f = Flows::open(&node);
    let flows = [
        // (client, proto, age s, revnat, backend)
        ("10.42.1.1:1001", proto::UDP, 1, id.dns_rev, id.ready_be),      // live, ready backend
        ("10.42.1.1:1002", proto::UDP, 1, id.dns_rev, id.quarantined_be), // live, backend stopped serving
        ("10.42.1.1:1003", proto::UDP, 20, id.dns_rev, id.ready_be),     // idle past the UDP timeout
        ("10.42.1.1:1004", proto::TCP, 50, id.web_rev, id.web_be),       // idle, within the TCP timeout
        ("10.42.1.1:1005", proto::TCP, 200, id.web_rev, id.web_be),      // idle past the TCP timeout
        ("10.42.1.1:1006", proto::UDP, 1, 4242, id.ready_be),            // live, frontend deleted since
        ("10.42.1.1:1007", proto::TCP, 1, id.web_rev, id.quarantined_be), // live TCP: never cut
    ];
    for (client, p, age, revnat_id, backend_id) in flows {
        f.ct(client, p, ago(age), revnat_id, backend_id, 0);
    }
    // TCP flows that saw a FIN/RST: close timeout 10 s.
    for (client, age) in [("10.42.1.1:1008", 20), ("10.42.1.1:1009", 5)] {
        f.ct(client, proto::TCP, ago(age), id.web_rev, id.web_be, riptide_common::CT_F_CLOSING);
    }
    for (client, p, age, flags) in [
        ("10.42.1.2:2001", proto::UDP, 1, 0),
        ("10.42.1.2:2002", proto::UDP, 20, 0),
        ("10.42.1.2:2003", proto::TCP, 50, 0),
        ("10.42.1.2:2004", proto::TCP, 200, 0),
        ("10.42.1.2:2005", proto::TCP, 20, riptide_common::NAT_F_CLOSING),
    ] {
        f.nat(client, p, ago(age), flags);
    }
    f.aff(1, id.web_rev, ago(20), id.web_be);
    f.aff(2, id.web_rev, ago(40), id.web_be);
    // A frontend without affinity data: kept up to Kubernetes' maximum.
    f.aff(3, 4242, ago(1000), id.web_be);

    // Before the first sync the GC must not judge anything but idle time.
    let cfg = GcConfig { tcp_timeout: Duration::from_secs(100), other_timeout: Duration::from_secs(10), clock: Clock::Fixed(now), ..GcConfig::default() };
    let mut gc = Gc::new(&node.0, cfg, Arc::downgrade(&shared)).unwrap();
    let r = gc.pass_and_record(Pass::Full).unwrap();
    assert_eq!(r.ct_expired, 6, "{r:?}");
    assert_eq!(r.ct_expired_by_table, [4, 2], "TCP 1005 and 1008, UDP 1003: {r:?}");
    assert_eq!(r.ct_stale, 0, "nothing is judged stale before the first sync: {r:?}");
    assert_eq!(f.ct_clients(), BTreeSet::from([1001, 1002, 1004, 1006, 1007, 1009]));
    assert_eq!(r.nat_expired, 3, "{r:?}");
    assert_eq!(r.nat_expired_by_table, [2, 1], "TCP 2004 and 2005, UDP 2002: {r:?}");
    assert_eq!(f.nat_clients(), BTreeSet::from([2001, 2003]));
    assert_eq!(r.aff_expired, 1, "{r:?}");
    assert_eq!(f.aff_clients(), BTreeSet::from([1, 3]));

    // A change-triggered pass before the first sync does nothing at all.
    let r = gc.pass_and_record(Pass::Stale).unwrap();
    assert!(r.skipped, "{r:?}");

    // First sync done: UDP flows to the backend that stopped serving and to
    // the deleted frontend go (both directions); live ones and TCP stay.
    shared.ready.store(true, Ordering::Release);
    let r = gc.pass_and_record(Pass::Stale).unwrap();
    assert_eq!(r.ct_stale, 4, "{r:?}");
    assert_eq!(f.ct_clients(), BTreeSet::from([1001, 1004, 1007, 1009]));
    // Nothing changed since: the next triggered pass is skipped.
    assert!(gc.pass_and_record(Pass::Stale).unwrap().skipped);

    // Each conntrack table under its own name: TCP flows 1005 and 1008
    // expired in rt_ct4_v3, UDP 1003 expired and 1002/1006 went stale in
    // rt_ctany4_v3 (two entries per flow).
    assert_eq!(r.ct_stale_by_table, [0, 4], "{r:?}");
    let metrics = shared.metrics.encode();
    for (map, reason, n) in [
        (names::CT4, "expired", 4),
        (names::CT_ANY4, "expired", 2),
        (names::CT_ANY4, "stale_backend", 4),
        (names::NAT4, "expired", 2),
        (names::NAT_ANY4, "expired", 1),
        (names::AFF4, "expired", 1),
    ] {
        let line = format!(r#"riptide_agent_gc_deletions_total{{map="{map}",reason="{reason}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains(&format!(r#"{{map="{}",reason="stale_backend"}}"#, names::CT4)), "no TCP flow went stale:\n{metrics}");
    // Entries left: TCP 1004, 1007, 1009; UDP 1001; NAT: TCP 2003, UDP 2001.
    for (map, n) in [(names::CT4, 6), (names::CT_ANY4, 2), (names::NAT4, 1), (names::NAT_ANY4, 1)] {
        let line = format!(r#"riptide_agent_map_entries{{map="{map}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("riptide_agent_conntrack_entries 8"), "{metrics}");
    let st = shared.gc_status.lock().unwrap().clone();
    assert_eq!(st.expired_deleted, 10);
    assert_eq!(st.stale_deleted, 4);
    assert_eq!(st.conntrack_entries, 8);
    assert_eq!(st.conntrack_tables, [(names::CT4.to_owned(), 6), (names::CT_ANY4.to_owned(), 2)].into());
    assert_eq!(st.nat_entries, 2);
    assert_eq!(st.nat_tables, [(names::NAT4.to_owned(), 1), (names::NAT_ANY4.to_owned(), 1)].into());
}

/// The GC of a machine booted 5 s ago: entries carry stamps between 0 (the
/// boot) and a little after "now" (a packet stamped between the GC's clock
/// read and its map dump), and every age is computed from a `now` smaller
/// than the timeouts and than the ages a warm machine sees.
///
/// The kernel's clock cannot be set back for this: time namespaces offset
/// `clock_gettime()` for the processes inside but not `bpf_ktime_get_ns()`,
/// so programs would keep stamping with the real uptime. Instead the GC
/// reads a [`Clock::Fixed`] 5 s and the test writes the stamps a young
/// machine's programs would have written, into the node's real maps.
#[test]
fn kernel_gc_on_a_machine_up_for_5_s_ages_stamps_near_boot() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let node = Node(format!("rtgc5-{}", std::process::id()));
    let (shared, id) = start(&node, 3);
    let now = 5 * S;
    let mut f = Flows::open(&node);
    // (client, proto, stamp, flags): idle = 5 s - stamp.
    for (client, p, stamp, flags) in [
        ("10.42.1.1:1001", proto::UDP, 0, 0),                                // booted with it: idle 5 s > 2 s
        ("10.42.1.1:1002", proto::UDP, 3_500 * MS, 0),                       // idle 1.5 s
        ("10.42.1.1:1003", proto::UDP, now + 300 * MS, 0),                   // stamped after our clock read
        ("10.42.1.1:1004", proto::TCP, 500 * MS, 0),                         // idle 4.5 s > 4 s
        ("10.42.1.1:1005", proto::TCP, 2 * S, 0),                            // idle 3 s
        ("10.42.1.1:1006", proto::TCP, 3 * S, riptide_common::CT_F_CLOSING), // closing, idle 2 s > 1 s
        ("10.42.1.1:1007", proto::TCP, now, riptide_common::CT_F_CLOSING),   // closing, just seen
    ] {
        f.ct(client, p, stamp, id.dns_rev, id.ready_be, flags);
    }
    for (client, p, stamp) in [("10.42.1.2:2001", proto::UDP, 0), ("10.42.1.2:2002", proto::TCP, 2 * S), ("10.42.1.2:2003", proto::UDP, now + 2 * S)] {
        f.nat(client, p, stamp, 0);
    }
    // Affinity for 3 s: used at 1 s (idle 4 s) goes, at 2.5 s stays; an
    // unknown frontend's entry from the boot is far from the 86,400 s max.
    f.aff(1, id.web_rev, S, id.web_be);
    f.aff(2, id.web_rev, 2_500 * MS, id.web_be);
    f.aff(3, 4242, 0, id.web_be);

    let cfg = GcConfig {
        tcp_timeout: Duration::from_secs(4),
        tcp_close_timeout: Duration::from_secs(1),
        other_timeout: Duration::from_secs(2),
        clock: Clock::Fixed(now),
        ..GcConfig::default()
    };
    let mut gc = Gc::new(&node.0, cfg, Arc::downgrade(&shared)).unwrap();
    let r = gc.pass_and_record(Pass::Full).unwrap();
    assert_eq!(f.ct_clients(), BTreeSet::from([1002, 1003, 1005, 1007]), "{r:?}");
    assert_eq!(r.ct_expired, 6, "both directions of 3 flows: {r:?}");
    assert_eq!(f.nat_clients(), BTreeSet::from([2002, 2003]), "{r:?}");
    assert_eq!(r.nat_expired, 1, "{r:?}");
    assert_eq!(f.aff_clients(), BTreeSet::from([2, 3]), "{r:?}");
    assert_eq!(r.aff_expired, 1, "{r:?}");
    // A second pass a moment later finds nothing new to delete.
    let r = gc.pass_and_record(Pass::Full).unwrap();
    assert_eq!((r.ct_expired, r.nat_expired, r.aff_expired), (0, 0, 0), "{r:?}");
}

/// A node that served a burst of short connections (netperf TCP_CRR, a
/// NetworkPolicy-allowed client: one closed entry per connection, two per
/// translated one): a pass deletes tens of thousands of closed entries, and
/// does it with a few batch syscalls, not a lookup and a delete per entry
/// (~10 µs of agent CPU per connection on a busy 2-CPU machine before).
/// Entries closed more recently than the close timeout, established ones
/// and NAT mappings alike stay.
#[test]
fn kernel_gc_deletes_thousands_of_closed_connections_in_one_pass() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let node = Node(format!("rtgcb-{}", std::process::id()));
    let (shared, id) = start(&node, 30);
    let now = 10_000 * S;
    let ago = |s: u64| now - s * S;
    let mut f = Flows::open(&node);
    let closing = riptide_common::CT_F_CLOSING;
    let (old, recent, open) = (10_000..30_000u16, 40_000..40_500u16, 50_000..50_010u16);
    for port in old.clone() {
        f.ct(&format!("10.42.1.1:{port}"), proto::TCP, ago(20), id.web_rev, id.web_be, closing);
    }
    for port in recent.clone() {
        f.ct(&format!("10.42.1.1:{port}"), proto::TCP, ago(5), id.web_rev, id.web_be, closing);
    }
    for port in open.clone() {
        f.ct(&format!("10.42.1.1:{port}"), proto::TCP, ago(50), id.web_rev, id.web_be, 0);
    }
    for port in old.clone().take(200) {
        f.nat(&format!("10.42.1.2:{port}"), proto::TCP, ago(20), riptide_common::NAT_F_CLOSING);
    }
    for port in recent.clone() {
        f.nat(&format!("10.42.1.2:{port}"), proto::TCP, ago(5), riptide_common::NAT_F_CLOSING);
    }
    let cfg = GcConfig { tcp_timeout: Duration::from_secs(100), clock: Clock::Fixed(now), ..GcConfig::default() };
    let mut gc = Gc::new(&node.0, cfg, Arc::downgrade(&shared)).unwrap();
    let started = std::time::Instant::now();
    let r = gc.pass_and_record(Pass::Full).unwrap();
    let took = started.elapsed();
    eprintln!("GC pass over {} entries deleted {} in {took:?}", 2 * (old.len() + recent.len() + open.len()), r.ct_expired + r.nat_expired);
    assert_eq!(r.ct_expired_by_table, [2 * old.len(), 0], "{r:?}");
    assert_eq!(f.ct_clients(), recent.clone().chain(open).collect::<BTreeSet<u16>>());
    assert_eq!(r.nat_expired_by_table, [200, 0], "{r:?}");
    assert_eq!(f.nat_clients(), recent.collect::<BTreeSet<u16>>());
}

/// Batched deletion keeps the per-entry guarantee: an entry whose stamp
/// moved since the caller read it (a packet refreshed it) stays.
#[test]
fn kernel_gc_batch_deletion_keeps_entries_refreshed_since_they_were_read() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let node = Node(format!("rtgcr-{}", std::process::id()));
    let (_shared, id) = start(&node, 30);
    let mut f = Flows::open(&node);
    let (stamp, refreshed) = (1_000 * S, 1_001 * S);
    let ports = 20_000..20_200u16;
    for port in ports.clone() {
        let when = if port % 2 == 0 { stamp } else { refreshed };
        f.ct(&format!("10.42.1.1:{port}"), proto::TCP, when, id.web_rev, id.web_be, riptide_common::CT_F_CLOSING);
    }
    // The caller judged every entry at `stamp`; the odd ports saw a packet
    // since. Plus keys that are not there at all.
    let mut keys: Vec<(CtKey, Option<u64>)> = ports
        .clone()
        .flat_map(|port| {
            let client = format!("10.42.1.1:{port}");
            [ct_key(&client, proto::TCP, CT_DIR_ANY), reply_key(&client, proto::TCP)].map(|k| (k, Some(stamp)))
        })
        .collect();
    keys.extend((30_000..30_010u16).map(|port| (ct_key(&format!("10.42.1.1:{port}"), proto::TCP, CT_DIR_ANY), None)));
    let mut maps = riptide_datapath::gc::FlowMaps::open_pinned(&node.0).unwrap();
    assert_eq!(maps.delete_conntrack(&keys).unwrap(), [200, 0]);
    assert_eq!(f.ct_clients(), ports.filter(|p| p % 2 == 1).collect::<BTreeSet<u16>>());
}

fn so_cookie(s: &UdpSocket) -> u64 {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into our variable.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &raw mut len) };
    assert_eq!(rc, 0);
    cookie
}

#[test]
fn netns_sock_destroy_aborts_only_the_targeted_connected_udp_socket() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let ns = Netns::new(format!("rtsd-{}", std::process::id()));
    let open_ns = || std::fs::File::open(format!("/run/netns/{}", ns.0)).unwrap();
    // Sockets created in the namespace stay there; the thread ends.
    let (server, victim, bystander) = sockdiag::in_netns(open_ns(), || {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let victim = UdpSocket::bind("127.0.0.1:0").unwrap();
        victim.connect(server.local_addr().unwrap()).unwrap();
        let bystander = UdpSocket::bind("127.0.0.1:0").unwrap();
        bystander.connect(server.local_addr().unwrap()).unwrap();
        (server, victim, bystander)
    })
    .unwrap();
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (vc, bc) = (so_cookie(&victim), so_cookie(&bystander));

    // Our own namespace does not see them.
    assert!(!sockdiag::connected_udp4().unwrap().iter().any(|s| s.cookie == vc));
    let found = sockdiag::in_netns(open_ns(), sockdiag::connected_udp4).unwrap().unwrap();
    let v = found.iter().find(|s| s.cookie == vc).expect("victim listed");
    assert_eq!(std::net::SocketAddr::V4(v.remote), server.local_addr().unwrap());
    assert_eq!(std::net::SocketAddr::V4(v.local), victim.local_addr().unwrap());
    assert!(found.iter().any(|s| s.cookie == bc));

    let v = *v;
    assert!(sockdiag::in_netns(open_ns(), move || sockdiag::destroy_udp4(&v)).unwrap().unwrap());
    // udp_abort(): the socket is disconnected (send() without an address
    // fails with EDESTADDRREQ) and ECONNABORTED is pending for the next
    // receive, until the application connects again.
    let e = victim.send(b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EDESTADDRREQ), "{e}");
    victim.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let e = victim.recv(&mut [0u8; 4]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    victim.connect(server.local_addr().unwrap()).unwrap();
    victim.send(b"again").unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"again");
    // The other socket was not touched.
    bystander.send(b"still").unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still");
    // A socket that is closed is gone already.
    let b = *found.iter().find(|s| s.cookie == bc).unwrap();
    drop(bystander);
    assert!(!sockdiag::in_netns(open_ns(), move || sockdiag::destroy_udp4(&b)).unwrap().unwrap());
}
