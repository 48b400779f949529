//! Kernel tests (need root): Maglev as a per-service algorithm. Each "node"
//! is its own datapath instance; BPF_PROG_TEST_RUN feeds them the same
//! first packets and the tests compare the backends they pick.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use common::*;
use riptide_common::{ALG_MAGLEV, ALG_RANDOM, Config, SCOPE_EXT, SCOPE_INT, names};
use riptide_datapath::maglev::TableSize;
use riptide_test_support::privileged;

const VIP: &str = "10.43.0.10";
const CLIENT_POD: &str = "10.42.0.5";
/// An externalIP routed to every node (e.g. by an upstream ECMP router).
const EXTERNAL_IP: &str = "192.0.2.10";

fn node(node_ip: &str) -> Node {
    let config = Config {
        node_ip_be: u32::from(ip(node_ip)).to_be(),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    };
    Node::load(&config, [])
}

fn backends(n: u8) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 42, 1, 10 + i), 8080),
            state: BackendState::Active,
            local: false,
        })
        .collect()
}

fn service(algorithm: Algorithm, backends: Vec<Backend>) -> Service {
    Service {
        name: "default/web:http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: ip(VIP),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: Ipv4Addr::UNSPECIFIED,
                port: 30080,
            },
            Frontend {
                kind: FrontendKind::ExternalIp,
                addr: ip(EXTERNAL_IP),
                port: 80,
            },
        ],
        backends,
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

/// The backend `n` picks for a new flow from the client pod's `port`.
fn pick(n: &mut Node, port: u16) -> Ipv4Addr {
    let (_, out) = run(
        &mut n.dp,
        names::PROG_FROM_POD,
        &syn((ip(CLIENT_POD), port), (ip(VIP), 80)),
    );
    view(&out).dst
}

/// A client outside the cluster.
const OUTSIDE: &str = "203.0.113.9";

/// The backend `n` picks for a new flow from outside, from `port`, to the
/// external IP.
fn pick_outside(n: &mut Node, port: u16) -> Ipv4Addr {
    let (_, out) = run(
        &mut n.dp,
        names::PROG_FROM_NET,
        &syn((ip(OUTSIDE), port), (ip(EXTERNAL_IP), 80)),
    );
    view(&out).dst
}

#[test]
fn maglev_nodes_agree_on_the_backend_of_every_flow() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let (mut a, mut b) = (node("198.18.0.1"), node("198.18.0.2"));
    for n in [&mut a, &mut b] {
        n.svcs
            .upsert(&service(Algorithm::Maglev(TableSize::DEFAULT), backends(4)))
            .unwrap();
    }
    let master = a
        .svcs
        .dump_services()
        .into_iter()
        .find(|(k, _)| k.slot == 0 && k.vip_be == u32::from(ip(VIP)).to_be())
        .unwrap()
        .1;
    assert_eq!(master.algorithm, ALG_MAGLEV);
    let fe =
        service(Algorithm::Maglev(TableSize::DEFAULT), Vec::new()).frontends[0].id(Protocol::Tcp);
    assert_eq!(
        a.svcs.maglev_table(&fe, SCOPE_EXT).unwrap().len(),
        TableSize::DEFAULT.get() as usize
    );

    let mut used = BTreeSet::new();
    for port in 40000..40060 {
        let (x, y) = (pick(&mut a, port), pick(&mut b, port));
        assert_eq!(x, y, "flow from port {port}: the nodes disagree");
        used.insert(x);
    }
    assert!(used.len() >= 3, "flows spread over the backends: {used:?}");

    // Traffic from outside to an external IP that reaches either node (an
    // upstream router spreading flows over nodes, or re-routing one after
    // a node failure) goes to the same backend on both.
    for port in 50000..50020 {
        let (x, y) = (pick_outside(&mut a, port), pick_outside(&mut b, port));
        assert_eq!(x, y, "flow from {OUTSIDE}:{port}");
    }

    // A random service on the same two nodes does not agree: the test
    // above would have caught random selection.
    for n in [&mut a, &mut b] {
        n.svcs
            .upsert(&service(Algorithm::Random, backends(4)))
            .unwrap();
    }
    let disagree = (41000..41060)
        .filter(|port| pick(&mut a, *port) != pick(&mut b, *port))
        .count();
    assert!(
        disagree > 0,
        "random selection never disagreed over 60 flows"
    );
}

#[test]
fn maglev_backend_removal_keeps_most_flows_on_their_backends() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let (mut before, mut after) = (node("198.18.0.1"), node("198.18.0.1"));
    let all = backends(5);
    before
        .svcs
        .upsert(&service(Algorithm::Maglev(TableSize::DEFAULT), all.clone()))
        .unwrap();
    after
        .svcs
        .upsert(&service(
            Algorithm::Maglev(TableSize::DEFAULT),
            all[1..].to_vec(),
        ))
        .unwrap();
    let removed = *all[0].addr.ip();
    let (mut kept, mut others) = (0, 0);
    for port in 40000..40200 {
        let x = pick(&mut before, port);
        let y = pick(&mut after, port);
        assert_ne!(y, removed);
        if x != removed {
            others += 1;
            if x == y {
                kept += 1;
            }
        }
    }
    assert!(
        kept * 100 >= others * 90,
        "only {kept} of {others} flows of the remaining backends kept their backend"
    );
}

#[test]
fn maglev_tables_follow_the_service_scopes_and_algorithm() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node("198.18.0.1");
    let mut bs = backends(4);
    bs[0].local = true;
    let mut s = service(Algorithm::Maglev(TableSize::DEFAULT), bs);
    s.external_policy = TrafficPolicy::Local;
    n.svcs.upsert(&s).unwrap();
    let (cip, np) = (s.frontends[0].id(s.protocol), s.frontends[1].id(s.protocol));
    // eTP=Local: the NodePort's external scope hashes over the local
    // backend only, its internal scope and the ClusterIP over all four.
    let ext = n.svcs.maglev_table(&np, SCOPE_EXT).unwrap();
    let ids: BTreeSet<u32> = ext.iter().copied().collect();
    assert_eq!(ids.len(), 1, "EXT table: the local backend only");
    let int = n.svcs.maglev_table(&np, SCOPE_INT).unwrap();
    assert_eq!(int.iter().copied().collect::<BTreeSet<_>>().len(), 4);
    assert_eq!(n.svcs.maglev_table(&cip, SCOPE_EXT).unwrap(), int);

    // Back to random: tables gone, masters say random; and back again.
    s.algorithm = Algorithm::Random;
    n.svcs.upsert(&s).unwrap();
    assert!(n.svcs.maglev_table(&np, SCOPE_EXT).is_none());
    assert!(n.svcs.maglev_table(&np, SCOPE_INT).is_none());
    assert!(n.svcs.maglev_table(&cip, SCOPE_EXT).is_none());
    assert!(
        n.svcs
            .dump_services()
            .iter()
            .all(|(k, v)| k.slot != 0 || v.algorithm == ALG_RANDOM)
    );
    s.algorithm = Algorithm::Maglev(TableSize::DEFAULT);
    n.svcs.upsert(&s).unwrap();
    assert!(n.svcs.maglev_table(&cip, SCOPE_EXT).is_some());

    // No backends: no table, the service rejects as usual.
    s.backends.clear();
    n.svcs.upsert(&s).unwrap();
    assert!(n.svcs.maglev_table(&cip, SCOPE_EXT).is_none());

    // Removing the service leaves no table behind.
    s.backends = backends(2);
    n.svcs.upsert(&s).unwrap();
    // ClusterIP, and the internal scopes of NodePort and externalIP (their
    // eTP=Local external scopes have no local backend now: no table).
    let tables: BTreeSet<(u16, u8)> = n
        .svcs
        .dump_maglev()
        .iter()
        .map(|k| (k.revnat_id, k.scope))
        .collect();
    assert_eq!(tables.len(), 3, "{tables:?}");
    assert_eq!(
        n.svcs.dump_maglev().len(),
        3 * TableSize::DEFAULT.chunks(),
        "every table in full chunks"
    );
    // A smaller table leaves no chunk of the larger one behind.
    s.algorithm = Algorithm::Maglev(TableSize::new(1021).unwrap());
    n.svcs.upsert(&s).unwrap();
    assert_eq!(n.svcs.dump_maglev().len(), 3, "{:?}", n.svcs.dump_maglev());
    assert_eq!(n.svcs.maglev_table(&cip, SCOPE_EXT).unwrap().len(), 1021);
    n.svcs.remove(&s.name).unwrap();
    assert!(n.svcs.dump_maglev().is_empty());
}

/// Synthetic client tuple number `i`: 100k distinct (pod address, port)
/// pairs.
fn tuple(i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(10, 42, (i / 50_000) as u8, (i / 250 % 200) as u8 + 1),
        20_000 + (i % 250) as u16 * 100 + (i % 97) as u16,
    )
}

fn pick_tuple(n: &mut Node, t: (Ipv4Addr, u16)) -> Ipv4Addr {
    let (_, out) = run(&mut n.dp, names::PROG_FROM_POD, &syn(t, (ip(VIP), 80)));
    view(&out).dst
}

#[test]
fn maglev_removing_one_of_n_backends_remaps_at_most_its_share_of_100k_flows() {
    if !privileged("to load eBPF programs") {
        return;
    }
    const FLOWS: u32 = 100_000;
    let distinct: BTreeSet<_> = (0..FLOWS).map(tuple).collect();
    assert_eq!(distinct.len(), FLOWS as usize);
    // Tables of ≥ ~400·N positions. Smaller ones move more than the bound:
    // N=40 at M=4093 (≈ 100·N) remaps ≈ 4.8 %, N=4 at M=251 ≈ 26.6 %.
    for (n_backends, m) in [(10u8, 16381u32), (40, 16381), (100, 65521), (2, 1021)] {
        let m = TableSize::new(m).unwrap();
        let all = backends(n_backends);
        // Node a keeps every backend; node b had them all too and then lost
        // the middle one through the writer's update path (table rewritten in
        // place), so b's picks are those of a node that saw the change.
        let (mut a, mut b) = (node("198.18.0.1"), node("198.18.0.2"));
        a.svcs
            .upsert(&service(Algorithm::Maglev(m), all.clone()))
            .unwrap();
        b.svcs
            .upsert(&service(Algorithm::Maglev(m), all.clone()))
            .unwrap();
        let mut fewer = all.clone();
        let removed = *fewer.remove(usize::from(n_backends) / 2).addr.ip();
        b.svcs
            .upsert(&service(Algorithm::Maglev(m), fewer))
            .unwrap();

        let (mut moved, mut on_removed) = (0u32, 0u32);
        for i in 0..FLOWS {
            let t = tuple(i);
            let (x, y) = (pick_tuple(&mut a, t), pick_tuple(&mut b, t));
            assert_ne!(y, removed, "flow {t:?} still goes to the removed backend");
            on_removed += u32::from(x == removed);
            moved += u32::from(x != y);
        }
        let share = f64::from(moved) / f64::from(FLOWS);
        let bound = 1.0 / f64::from(n_backends) + 0.01;
        println!(
            "N={n_backends} M={m}: {moved} of {FLOWS} flows remapped ({:.2} %, bound {:.2} %), \
             {on_removed} were on the removed backend",
            share * 100.0,
            bound * 100.0
        );
        assert!(
            share <= bound,
            "N={n_backends} M={m}: {moved} of {FLOWS} flows remapped, more than 1/N + 1 %"
        );
        assert!(moved >= on_removed, "the removed backend's flows all moved");
    }
}

#[test]
fn maglev_cluster_default_agrees_on_external_frontends_at_every_table_size() {
    if !privileged("to load eBPF programs") {
        return;
    }
    for m in riptide_common::MAGLEV_SIZES {
        let m = TableSize::new(m).unwrap();
        let (mut a, mut b) = (node("198.18.0.1"), node("198.18.0.2"));
        // Backends listed in a different order on each node: the table
        // depends on the set, not on the order or the node-local ids.
        let mut reversed = backends(6);
        reversed.reverse();
        a.svcs
            .upsert(&service(Algorithm::MaglevExternal(m), backends(6)))
            .unwrap();
        b.svcs
            .upsert(&service(Algorithm::MaglevExternal(m), reversed))
            .unwrap();
        let s = service(Algorithm::MaglevExternal(m), Vec::new());
        let (cip, ext) = (s.frontends[0].id(s.protocol), s.frontends[2].id(s.protocol));
        assert!(
            a.svcs.maglev_table(&cip, SCOPE_EXT).is_none(),
            "ClusterIP stays random"
        );
        assert_eq!(
            a.svcs.maglev_table(&ext, SCOPE_EXT).unwrap().len(),
            m.get() as usize
        );
        let mut used = BTreeSet::new();
        for port in 50000..50200 {
            let (x, y) = (pick_outside(&mut a, port), pick_outside(&mut b, port));
            assert_eq!(x, y, "M={m}: flow from {OUTSIDE}:{port}");
            used.insert(x);
        }
        // Every chunk of the table is reachable: all six backends serve.
        assert_eq!(used.len(), 6, "M={m}: {used:?}");
    }
}
