//! The GC against real pinned maps (needs root to load eBPF), and
//! `sock_diag` destroying a real connected UDP socket in a namespace this
//! test creates.
//!
//! Flow entries are written into the pinned maps with `last_seen` stamps
//! taken from `CLOCK_MONOTONIC` minus an age, exactly what the programs
//! would have left after that much idle time (`bpf_ktime_get_ns()` is the
//! same clock); the end-to-end tests in `privileged_gc_restart.rs` create
//! them through real traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
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
use riptide_common::{AffKey, AffValue, CT_DIR_FWD, CT_DIR_REV, CtKey, CtValue, NatValue, names, proto};
use riptide_datapath::{
    Datapath, Pinning,
    gc::monotonic_ns,
    service::{Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, TrafficPolicy},
};

fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("RIPTIDE_REQUIRE_PRIVILEGED").is_none(), "privileged test run without root");
    eprintln!("SKIP: needs root to load eBPF programs and create network namespaces");
    false
}

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
        algorithm: Algorithm::Random,
    };
    (owner, port)
}

fn lru<K: aya::Pod, V: aya::Pod>(node: &str, name: &str) -> HashMap<MapData, K, V> {
    let path = riptide_datapath::pin_dir(node).unwrap().join(name);
    HashMap::try_from(Map::LruHashMap(MapData::from_pin(path).unwrap())).unwrap()
}

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

#[test]
fn kernel_gc_deletes_only_expired_entries_before_the_first_sync_then_stale_udp_flows() {
    if !privileged() {
        return;
    }
    let node = Node(format!("rtgc-{}", std::process::id()));
    let mut dp = Datapath::load(&Pinning::Node(node.0.clone())).unwrap();
    let mut services = dp.services().unwrap();

    // What a previous agent wrote: a UDP service with one ready and one
    // not-serving backend, a TCP service with affinity (30 s).
    let mut rec = Reconciler::new();
    let dns = port("dns", Protocol::Udp, "10.43.0.10", 53, &[("10.42.0.5:53", BackendState::Active), ("10.42.0.6:53", BackendState::Quarantined)], None);
    let web = port("web", Protocol::Tcp, "10.43.0.11", 80, &[("10.42.0.7:8080", BackendState::Active)], Some(30));
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
    let (ready_be, quarantined_be, web_be) = (be_id("10.42.0.5:53"), be_id("10.42.0.6:53"), be_id("10.42.0.7:8080"));
    let revnat_of = |vip: &str| {
        let v: Ipv4Addr = vip.parse().unwrap();
        services
            .dump_revnat()
            .into_iter()
            .find(|(_, r)| u32::from_be(r.vip_be) == u32::from(v))
            .map(|(k, _)| k.id)
            .unwrap()
    };
    let (dns_rev, web_rev) = (revnat_of("10.43.0.10"), revnat_of("10.43.0.11"));

    // Flows, aged. Timeouts below: TCP 100 s, UDP 10 s.
    let now = monotonic_ns();
    let ago = |s: u64| now - s * 1_000_000_000;
    let mut ct: HashMap<MapData, CtKey, CtValue> = lru(&node.0, names::CT4);
    let flows = [
        // (client, proto, age s, revnat, backend)
        ("10.42.1.1:1001", proto::UDP, 1, dns_rev, ready_be),      // live, ready backend
        ("10.42.1.1:1002", proto::UDP, 1, dns_rev, quarantined_be), // live, backend stopped serving
        ("10.42.1.1:1003", proto::UDP, 20, dns_rev, ready_be),     // idle past the UDP timeout
        ("10.42.1.1:1004", proto::TCP, 50, web_rev, web_be),       // idle, within the TCP timeout
        ("10.42.1.1:1005", proto::TCP, 200, web_rev, web_be),      // idle past the TCP timeout
        ("10.42.1.1:1006", proto::UDP, 1, 4242, ready_be),         // live, frontend deleted since
        ("10.42.1.1:1007", proto::TCP, 1, web_rev, quarantined_be), // live TCP: never cut
    ];
    // (client, age s) of TCP flows that saw a FIN/RST: close timeout 10 s.
    let closing = [("10.42.1.1:1008", 20), ("10.42.1.1:1009", 5)];
    let flows = flows.into_iter().map(|f| (f, 0)).chain(closing.map(|(c, age)| ((c, proto::TCP, age, web_rev, web_be), riptide_common::CT_F_CLOSING)));
    for ((client, p, age, revnat_id, backend_id), flags) in flows {
        for dir in [CT_DIR_FWD, CT_DIR_REV] {
            let v = CtValue { last_seen_ns: ago(age), backend_id, revnat_id, flags, ..CtValue::default() };
            ct.insert(ct_key(client, p, dir), v, 0).unwrap();
        }
    }
    let mut nat: HashMap<MapData, CtKey, NatValue> = lru(&node.0, names::NAT4);
    for (client, p, age, flags) in [
        ("10.42.1.2:2001", proto::UDP, 1, 0),
        ("10.42.1.2:2002", proto::UDP, 20, 0),
        ("10.42.1.2:2003", proto::TCP, 50, 0),
        ("10.42.1.2:2004", proto::TCP, 200, 0),
        ("10.42.1.2:2005", proto::TCP, 20, riptide_common::NAT_F_CLOSING),
    ] {
        nat.insert(ct_key(client, p, riptide_common::NAT_DIR_EGRESS), NatValue { last_seen_ns: ago(age), flags, ..NatValue::default() }, 0).unwrap();
    }
    let mut aff: HashMap<MapData, AffKey, AffValue> = lru(&node.0, names::AFF4);
    let aff_key = |client: u64, revnat_id| AffKey { client, revnat_id, kind: riptide_common::AFF_CLIENT_IP, _pad: [0; 5] };
    aff.insert(aff_key(1, web_rev), AffValue { last_used_ns: ago(20), backend_id: web_be, _pad: 0 }, 0).unwrap();
    aff.insert(aff_key(2, web_rev), AffValue { last_used_ns: ago(40), backend_id: web_be, _pad: 0 }, 0).unwrap();
    // A frontend without affinity data: kept up to Kubernetes' maximum.
    aff.insert(aff_key(3, 4242), AffValue { last_used_ns: ago(1000), backend_id: web_be, _pad: 0 }, 0).unwrap();

    // The agent has just started: it has not synced (not ready), its
    // reconciler knows the ports (they were applied above) but the GC must
    // not judge anything but idle time yet.
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
    });
    let cfg = GcConfig { tcp_timeout: Duration::from_secs(100), other_timeout: Duration::from_secs(10), ..GcConfig::default() };
    let mut gc = Gc::new(&node.0, cfg, Arc::downgrade(&shared)).unwrap();

    let ct_clients = |ct: &HashMap<MapData, CtKey, CtValue>| -> BTreeSet<u16> {
        ct.keys().map(|k| u16::from_be(k.unwrap().sport_be)).collect()
    };
    let r = gc.pass_and_record(Pass::Full).unwrap();
    assert_eq!(r.ct_expired, 6, "{r:?}");
    assert_eq!(r.ct_stale, 0, "nothing is judged stale before the first sync: {r:?}");
    assert_eq!(ct_clients(&ct), BTreeSet::from([1001, 1002, 1004, 1006, 1007, 1009]));
    assert_eq!(r.nat_expired, 3, "{r:?}");
    let nat_left: BTreeSet<u16> = nat.keys().map(|k| u16::from_be(k.unwrap().sport_be)).collect();
    assert_eq!(nat_left, BTreeSet::from([2001, 2003]));
    assert_eq!(r.aff_expired, 1, "{r:?}");
    let aff_left: BTreeSet<u64> = aff.keys().map(|k| k.unwrap().client).collect();
    assert_eq!(aff_left, BTreeSet::from([1, 3]));

    // A change-triggered pass before the first sync does nothing at all.
    let r = gc.pass_and_record(Pass::Stale).unwrap();
    assert!(r.skipped, "{r:?}");

    // First sync done: UDP flows to the backend that stopped serving and to
    // the deleted frontend go (both directions); live ones and TCP stay.
    shared.ready.store(true, Ordering::Release);
    let r = gc.pass_and_record(Pass::Stale).unwrap();
    assert_eq!(r.ct_stale, 4, "{r:?}");
    assert_eq!(ct_clients(&ct), BTreeSet::from([1001, 1004, 1007, 1009]));
    // Nothing changed since: the next triggered pass is skipped.
    assert!(gc.pass_and_record(Pass::Stale).unwrap().skipped);

    let metrics = shared.metrics.encode();
    for (map, reason, n) in [(names::CT4, "expired", 6), (names::CT4, "stale_backend", 4), (names::NAT4, "expired", 3), (names::AFF4, "expired", 1)] {
        let line = format!(r#"riptide_agent_gc_deletions_total{{map="{map}",reason="{reason}"}} {n}"#);
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    let st = shared.gc_status.lock().unwrap().clone();
    assert_eq!(st.expired_deleted, 10);
    assert_eq!(st.stale_deleted, 4);
    assert_eq!(st.conntrack_entries, 8);
}

/// A named netns, deleted on drop.
struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
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
    if !privileged() {
        return;
    }
    let ns = Ns(format!("rtsd-{}", std::process::id()));
    assert!(Command::new("ip").args(["netns", "add", &ns.0]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]).status().unwrap().success());
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
