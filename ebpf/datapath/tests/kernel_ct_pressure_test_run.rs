//! Kernel tests (need root): conntrack and NAT under pressure, with
//! deliberately tiny maps. TCP connections live in their own conntrack
//! table (`rt_ct4_v3`) and their source NAT mappings in their own NAT table
//! (`rt_nat4_v2`), so a flood of anything else (UDP flows, inbound markers
//! of new flows into a pod, new masqueraded UDP flows) cannot evict them;
//! inbound flows that need no state create none; a full table evicts and
//! the lost TCP flow is counted; masquerade without a free port or without
//! its mapping drops and counts instead of leaking the pod's address.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use riptide_common::{CFG_F_MASQUERADE, CT_F_INBOUND, Config, names, stats};
use riptide_test_support::privileged;

const NODE_IP: &str = "198.18.0.1";
const VIP: &str = "10.43.0.10";
const CLIENT_POD: &str = "10.42.0.5";
const SERVER_POD: &str = "10.42.0.6";
/// A backend on another node: `rt_from_pod` translates and the kernel routes.
const REMOTE_BACKEND: &str = "10.42.1.20";

fn config(flags: u32) -> Config {
    Config {
        node_ip_be: u32::from(ip(NODE_IP)).to_be(),
        hairpin_ip_be: u32::from(ip("169.254.42.1")).to_be(),
        cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
        cluster_cidr_len: 16,
        nomasq_cidr_be: u32::from(ip(NODE_IP)).to_be(),
        nomasq_cidr_len: 32,
        flags,
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    }
}

fn node_with(cfg: &Config, sizes: &MapSizes) -> Node {
    let pods = [CLIENT_POD, SERVER_POD];
    let mut n = Node::load_sized(
        cfg,
        (0u8..).zip(pods).map(|(i, a)| (ip(a), pod_endpoint(100 + u32::from(i), [0, i]))),
        sizes,
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        n.svcs
            .upsert(&Service {
                name: format!("default/web:{protocol:?}"),
                protocol,
                frontends: vec![Frontend {
                    kind: FrontendKind::ClusterIp,
                    addr: ip(VIP),
                    port: 80,
                }],
                backends: vec![Backend {
                    addr: SocketAddrV4::new(ip(REMOTE_BACKEND), 8080),
                    state: BackendState::Active,
                    local: false,
                }],
                affinity_timeout_s: None,
                external_policy: TrafficPolicy::Cluster,
                internal_policy: TrafficPolicy::Cluster,
                source_ranges: Default::default(),
                algorithm: Algorithm::Random,
                lb_mode: riptide_datapath::service::LbMode::Snat,
            })
            .unwrap();
    }
    n
}

fn sizes(pairs: &[(&str, u32)]) -> MapSizes {
    let mut s = MapSizes::default();
    for (name, n) in pairs {
        s.set(name, *n).unwrap();
    }
    s
}

fn stat(n: &Node, reason: u32) -> u64 {
    n.dp.stats().unwrap().get(reason)
}

fn table_len(n: &Node, name: &'static str) -> usize {
    n.dp.conntrack_table(name).unwrap().len()
}

fn nat_len(n: &Node, name: &'static str) -> usize {
    n.dp.nat_table(name).unwrap().len()
}

/// An outside address per flow number (203.0.113.0/24 and beyond, all
/// outside the cluster: masquerade applies to them).
fn outside(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip("203.0.113.0")) + i / 50_000)
}

/// Opens `count` TCP connections client pod → ClusterIP through
/// `rt_from_pod`; returns their client ports.
fn open_tcp(n: &mut Node, count: u16) -> Vec<u16> {
    let ports: Vec<u16> = (0..count).map(|i| 20_000 + i).collect();
    for &port in &ports {
        let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &syn((ip(CLIENT_POD), port), (ip(VIP), 80)));
        assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n.dp));
        assert_eq!((view(&out).dst, view(&out).dport), (ip(REMOTE_BACKEND), 8080));
    }
    ports
}

/// Sends an established-flow ACK of each connection: translated to the
/// backend, from conntrack.
fn ack_all(n: &mut Node, ports: &[u16]) {
    for &port in ports {
        let ack = tcp((ip(CLIENT_POD), port), (ip(VIP), 80), 0x10, b"ping");
        let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &ack);
        assert_eq!(verdict, TC_ACT_OK);
        let v = view(&out);
        assert_eq!((v.dst, v.dport), (ip(REMOTE_BACKEND), 8080), "port {port}\n{}", dump(&n.dp));
        assert_checksums(&out);
    }
}

#[test]
fn tcp_connections_survive_udp_and_inbound_floods_filling_the_other_table() {
    if !privileged("to load eBPF programs") {
        return;
    }
    const OTHER: u32 = 512;
    let mut n = node_with(&config(CFG_F_MASQUERADE), &sizes(&[(names::CT_ANY4, OTHER)]));
    let ports = open_tcp(&mut n, 100);
    assert_eq!(table_len(&n, names::CT4), 200, "forward and reply entry per connection");

    // UDP flows through the ClusterIP, new UDP and TCP flows from outside
    // into a pod: 20 times what the other table holds.
    let flood = OTHER * 20;
    for i in 0..flood {
        let src = (outside(i), 1024 + (i % 50_000) as u16);
        let frame = match i % 3 {
            0 => udp((ip(CLIENT_POD), 1024 + (i % 60_000) as u16), (ip(VIP), 80), b"q", false),
            1 => udp(src, (ip(SERVER_POD), 53), b"q", false),
            _ => syn(src, (ip(SERVER_POD), 8080)),
        };
        let prog = if i % 3 == 0 { names::PROG_FROM_POD } else { names::PROG_FROM_NET };
        run(&mut n.dp, prog, &frame);
    }
    assert!(
        stat(&n, stats::INBOUND_NEW) >= u64::from(flood / 3 * 2),
        "every inbound flow marked\n{}",
        dump(&n.dp)
    );
    assert!(table_len(&n, names::CT_ANY4) <= OTHER as usize, "{}", dump(&n.dp));
    assert_eq!(table_len(&n, names::CT4), 200, "no TCP entry evicted\n{}", dump(&n.dp));

    let hits = stat(&n, stats::LB_CT_HIT);
    ack_all(&mut n, &ports);
    assert_eq!(stat(&n, stats::LB_CT_HIT) - hits, ports.len() as u64, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::CT_LOST_TCP), 0, "{}", dump(&n.dp));

    // The newest inbound TCP flow's marker keeps masquerade off its reply.
    let last = flood - 1;
    let last = if last % 3 == 2 { last } else { last - (last % 3) - 1 };
    let (peer, peer_port) = (outside(last), 1024 + (last % 50_000) as u16);
    let syn_ack = tcp((ip(SERVER_POD), 8080), (peer, peer_port), 0x12, b"");
    let ack = tcp((ip(SERVER_POD), 8080), (peer, peer_port), 0x10, b"data");
    for f in [syn_ack, ack] {
        let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &f);
        assert_eq!((verdict, out), (TC_ACT_OK, f), "{}", dump(&n.dp));
    }
}

#[test]
fn inbound_flows_that_need_no_state_create_no_entry() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // Without masquerade nothing would rewrite the replies: no entry at all.
    let mut n = node_with(&config(0), &MapSizes::default());
    for i in 0..300u32 {
        let src = (outside(i), 2000 + i as u16);
        let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &syn(src, (ip(SERVER_POD), 8080)));
        assert_eq!(verdict, TC_ACT_REDIRECT, "delivered into the pod");
        run(&mut n.dp, names::PROG_FROM_NET, &udp(src, (ip(SERVER_POD), 53), b"q", false));
    }
    assert!(n.dp.conntrack().unwrap().is_empty(), "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::INBOUND_NEW), 0);

    // With masquerade: a marker per flow, never in the TCP table; pod-to-pod
    // flows from other nodes need none.
    let mut n = node_with(&config(CFG_F_MASQUERADE), &MapSizes::default());
    for i in 0..300u32 {
        let src = (outside(i), 2000 + i as u16);
        run(&mut n.dp, names::PROG_FROM_NET, &syn(src, (ip(SERVER_POD), 8080)));
        run(&mut n.dp, names::PROG_FROM_NET, &udp(src, (ip(SERVER_POD), 53), b"q", false));
        run(&mut n.dp, names::PROG_FROM_NET, &syn((ip("10.42.1.5"), 3000 + i as u16), (ip(SERVER_POD), 8080)));
    }
    assert_eq!(table_len(&n, names::CT4), 0, "{}", dump(&n.dp));
    let other = n.dp.conntrack_table(names::CT_ANY4).unwrap();
    assert_eq!(other.len(), 600, "{}", dump(&n.dp));
    assert!(other.iter().all(|(_, v)| v.flags == CT_F_INBOUND));
}

#[test]
fn a_full_tcp_table_evicts_and_the_lost_connection_is_counted_and_rebalanced() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let cpus = MapSizes::min_entries(riptide_datapath::map_sizes::MapKind::Lru).max(16);
    let mut n = node_with(&config(CFG_F_MASQUERADE), &sizes(&[(names::CT4, cpus)]));
    let ports = open_tcp(&mut n, 200);
    assert!(table_len(&n, names::CT4) <= cpus as usize, "{}", dump(&n.dp));
    // The oldest connections lost their entries: their next packet is a
    // new flow again (same single backend here) and is counted.
    let lb_new = stat(&n, stats::LB_NEW);
    ack_all(&mut n, &ports[..20]);
    let lost = stat(&n, stats::CT_LOST_TCP);
    assert!(lost >= 10, "evicted connections counted ({lost})\n{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::LB_NEW) - lb_new, lost, "each balanced anew");
}

#[test]
fn masquerade_without_a_free_port_drops_and_counts() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut cfg = config(CFG_F_MASQUERADE);
    (cfg.snat_port_min, cfg.snat_port_max) = (40_000, 40_001);
    let mut n = node_with(&cfg, &MapSizes::default());
    let dst = (ip("203.0.113.9"), 443);
    // TCP and UDP have a port space each.
    type Frame = fn((Ipv4Addr, u16), (Ipv4Addr, u16)) -> Vec<u8>;
    let frames: [Frame; 2] = [syn, |s, d| udp(s, d, b"x", false)];
    for (i, frame) in frames.into_iter().enumerate() {
        // Two pod flows to the same peer take the two ports.
        for (pod, port) in [(CLIENT_POD, 40_000), (SERVER_POD, 40_001)] {
            let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &frame((ip(pod), port), dst));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!((view(&out).src, view(&out).sport), (ip(NODE_IP), port));
        }
        // A third has none left: dropped, never sent from the pod's address.
        let (verdict, _) = run(&mut n.dp, names::PROG_TO_NET, &frame((ip(CLIENT_POD), 50_000), dst));
        assert_eq!(verdict, TC_ACT_SHOT, "{}", dump(&n.dp));
        assert_eq!(stat(&n, stats::MASQ_NO_PORT), i as u64 + 1, "{}", dump(&n.dp));
        assert_eq!(n.dp.nat().unwrap().len(), 4 * (i + 1), "two mappings, both halves");
    }
    // Each protocol's mappings in its own table.
    assert_eq!((nat_len(&n, names::NAT4), nat_len(&n, names::NAT_ANY4)), (4, 4), "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::SNAT), 4, "nothing else translated");
}

/// A client opening more connections to one peer than the port range
/// holds (faster than the agent's GC removes closed mappings): once no
/// port is free, a new SYN takes the port of a connection that is over
/// (a FIN each way, idle 1 s), never one that lives or just closed.
#[test]
fn a_new_syn_takes_the_port_of_a_finished_connection_when_none_is_free() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut cfg = config(CFG_F_MASQUERADE);
    (cfg.snat_port_min, cfg.snat_port_max) = (40_000, 40_000);
    let mut n = node_with(&cfg, &MapSizes::default());
    let node = ip(NODE_IP);
    let peer = (ip("203.0.113.9"), 443);
    let first = (ip(CLIENT_POD), 40_000);
    let second = (ip(SERVER_POD), 50_000);
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &syn(first, peer));
    assert_eq!((verdict, view(&out).src, view(&out).sport), (TC_ACT_OK, node, 40_000));

    // While the first connection lives, the second finds no port.
    let (verdict, _) = run(&mut n.dp, names::PROG_TO_NET, &syn(second, peer));
    assert_eq!(verdict, TC_ACT_SHOT, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_NO_PORT), 1);

    // The first closes: a FIN each way.
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &tcp(first, peer, 0x11, b""));
    assert_eq!((verdict, view(&out).sport), (TC_ACT_OK, 40_000), "{}", dump(&n.dp));
    let reply = tcp(peer, (node, 40_000), 0x11, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n.dp));
    assert_eq!((view(&out).dst, view(&out).dport), first);

    // Just closed: its last ACK may still come, the port stays its own.
    let (verdict, _) = run(&mut n.dp, names::PROG_TO_NET, &syn(second, peer));
    assert_eq!(verdict, TC_ACT_SHOT, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_NO_PORT), 2);

    // Idle past the last ACK: the second connection gets its port.
    std::thread::sleep(std::time::Duration::from_millis(1_300));
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &syn(second, peer));
    let got = (verdict, view(&out).src, view(&out).sport);
    assert_eq!(got, (TC_ACT_OK, node, 40_000), "{}", dump(&n.dp));
    assert_checksums(&out);
    assert_eq!(stat(&n, stats::MASQ_NO_PORT), 2, "{}", dump(&n.dp));
    // Replies reach the new connection; the old mapping is gone whole.
    let reply = tcp(peer, (node, 40_000), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n.dp));
    assert_eq!((view(&out).dst, view(&out).dport), second, "{}", dump(&n.dp));
    assert_eq!(nat_len(&n, names::NAT4), 2, "one pair\n{}", dump(&n.dp));

    // A live connection's port is never taken, however idle.
    std::thread::sleep(std::time::Duration::from_millis(1_300));
    let (verdict, _) = run(&mut n.dp, names::PROG_TO_NET, &syn((ip(CLIENT_POD), 50_001), peer));
    assert_eq!(verdict, TC_ACT_SHOT, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_NO_PORT), 3);
    assert_eq!(nat_len(&n, names::NAT4), 2, "{}", dump(&n.dp));
}

#[test]
fn masqueraded_tcp_connections_survive_a_udp_flood_filling_the_other_nat_table() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // 256 UDP mappings (two entries each) fit in the other table.
    const OTHER: u32 = 512;
    let mut n = node_with(&config(CFG_F_MASQUERADE), &sizes(&[(names::NAT_ANY4, OTHER)]));
    let peer = (ip("203.0.113.9"), 443);
    // 100 TCP connections from a pod to an outside server, masqueraded.
    let mut conns = Vec::new();
    for i in 0..100u16 {
        let pod = (ip(CLIENT_POD), 20_000 + i);
        let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &syn(pod, peer));
        assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n.dp));
        let v = view(&out);
        assert_eq!(v.src, ip(NODE_IP), "masqueraded\n{}", dump(&n.dp));
        conns.push((pod, v.sport));
    }
    assert_eq!(nat_len(&n, names::NAT4), 200, "egress and ingress entry per connection");

    // New UDP flows from both pods to outside resolvers: 20 times what the
    // other table holds. Every one is translated (a full LRU table evicts,
    // it never refuses), none leaves with a pod address.
    let flood = OTHER * 20;
    let udp_flow = |i: u32| {
        let pod = if i % 2 == 0 { CLIENT_POD } else { SERVER_POD };
        // A resolver address per flow, so no later flow shares flow 0's
        // reply tuple.
        ((ip(pod), 1024 + (i % 60_000) as u16), (Ipv4Addr::from(u32::from(ip("198.51.100.0")) + i), 53))
    };
    let mut first_port = 0;
    for i in 0..flood {
        let (src, dst) = udp_flow(i);
        let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &udp(src, dst, b"q", false));
        assert_eq!(verdict, TC_ACT_OK, "flow {i}\n{}", dump(&n.dp));
        assert_eq!(view(&out).src, ip(NODE_IP), "flow {i}\n{}", dump(&n.dp));
        if i == 0 {
            first_port = view(&out).sport;
        }
    }
    assert_eq!(stat(&n, stats::SNAT), 100 + u64::from(flood), "{}", dump(&n.dp));
    assert!(nat_len(&n, names::NAT_ANY4) <= OTHER as usize, "{}", dump(&n.dp));
    assert_eq!(nat_len(&n, names::NAT4), 200, "no TCP mapping evicted\n{}", dump(&n.dp));
    // The flood did evict: the first UDP flow's answer finds no mapping and
    // stays addressed to the node.
    let (_, resolver) = udp_flow(0);
    let answer = udp(resolver, (ip(NODE_IP), first_port), b"a", false);
    let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &answer);
    assert_eq!((view(&out).dst, view(&out).dport), (ip(NODE_IP), first_port), "{}", dump(&n.dp));

    // Every connection goes on: its next segment leaves on its port and the
    // peer's answer is translated back to the pod.
    for &(pod, port) in &conns {
        let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &tcp(pod, peer, 0x10, b"ping"));
        assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n.dp));
        assert_eq!((view(&out).src, view(&out).sport), (ip(NODE_IP), port), "{}", dump(&n.dp));
        let (_, back) = run(&mut n.dp, names::PROG_FROM_NET, &tcp(peer, (ip(NODE_IP), port), 0x10, b"pong"));
        let v = view(&back);
        assert_eq!((v.dst, v.dport), pod, "reply un-masqueraded\n{}", dump(&n.dp));
        assert_checksums(&back);
    }
    assert_eq!(stat(&n, stats::MASQ_LOST_MAPPING), 0, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_NO_PORT), 0, "{}", dump(&n.dp));
    // A new connection still gets a mapping while the other table is full.
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &syn((ip(SERVER_POD), 30_000), peer));
    assert_eq!((verdict, view(&out).src), (TC_ACT_OK, ip(NODE_IP)), "{}", dump(&n.dp));
    assert_eq!(nat_len(&n, names::NAT4), 202, "{}", dump(&n.dp));
}
