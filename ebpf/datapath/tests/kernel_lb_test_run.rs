//! Kernel tests (need root): every per-packet LB path of `rt_from_pod`,
//! `rt_from_net` and `rt_to_net` through BPF_PROG_TEST_RUN, with checksums
//! recomputed from scratch on every frame that comes out.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use common::*;
use riptide_common::{CFG_F_MASQUERADE, CFG_F_SOCK_LB, Config, names, stats};
use riptide_test_support::privileged;

const NODE_IP: &str = "198.18.0.1";
const HAIRPIN_IP: &str = "169.254.42.1";
const VIP: &str = "10.43.0.10";
const CLIENT_POD: &str = "10.42.0.5";
const OUTSIDE: &str = "198.18.0.100";

fn node() -> Node {
    let config = Config {
        node_ip_be: u32::from(ip(NODE_IP)).to_be(),
        hairpin_ip_be: u32::from(ip(HAIRPIN_IP)).to_be(),
        cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
        cluster_cidr_len: 16,
        nomasq_cidr_be: u32::from(ip("198.18.0.0")).to_be(),
        nomasq_cidr_len: 24,
        flags: CFG_F_MASQUERADE | CFG_F_SOCK_LB,
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    };
    // The client pod and two local backend pods live on this node.
    let pods = [CLIENT_POD, "10.42.0.20", "10.42.0.21"];
    Node::load(&config, (0u8..).zip(pods).map(|(i, a)| (ip(a), pod_endpoint(100 + u32::from(i), [0, i]))))
}

fn backend(addr: &str, local: bool) -> Backend {
    Backend {
        addr: SocketAddrV4::new(ip(addr), 8080),
        state: BackendState::Active,
        local,
    }
}

fn service(protocol: Protocol, backends: Vec<Backend>) -> Service {
    Service {
        name: "default/web:http".into(),
        protocol,
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
        ],
        backends,
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

fn dump(n: &Node) -> String {
    format!(
        "services: {:?}\nbackends: {:?}\nconntrack: {:?}\nnat: {:?}\nstats: {:?}",
        n.svcs.dump_services(),
        n.svcs.dump_backends(),
        n.dp.conntrack().unwrap(),
        n.dp.nat().unwrap(),
        n.dp.stats()
            .unwrap()
            .named()
            .filter(|(_, v)| *v > 0)
            .collect::<Vec<_>>()
    )
}

#[test]
fn clusterip_from_pod_dnat_to_remote_backend_and_reverse_nat_on_uplink() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    let frame = tcp((ip(CLIENT_POD), 40000), (ip(VIP), 80), 0x02, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!(
        verdict,
        TC_ACT_OK,
        "remote backend: the kernel routes it\n{}",
        dump(&n)
    );
    let v = view(&out);
    assert_eq!(
        (v.dst, v.dport),
        (ip("10.42.1.7"), 8080),
        "DNAT to the backend"
    );
    assert_eq!(
        (v.src, v.sport),
        (ip(CLIENT_POD), 40000),
        "client address kept"
    );
    assert_checksums(&out);
    assert_eq!(n.dp.conntrack().unwrap().len(), 2, "FWD and REV entries");

    // The reply comes back from the other node through the uplink.
    let reply = tcp((ip("10.42.1.7"), 8080), (ip(CLIENT_POD), 40000), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "delivered to the local client pod\n{}",
        dump(&n)
    );
    let v = view(&out);
    assert_eq!(
        (v.src, v.sport),
        (ip(VIP), 80),
        "reply shows the service address"
    );
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 40000));
    assert_eq!(&out[0..6], &[0x0a, 0x58, 0, 0, 0, 0], "client pod's MAC");
    assert_eq!(v.ttl, 63);
    assert_checksums(&out);
}

#[test]
fn tcp_payload_and_udp_checksums_survive_dnat() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Udp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    let frame = udp(
        (ip(CLIENT_POD), 5353),
        (ip(VIP), 80),
        b"hello riptide",
        false,
    );
    let (_, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!((view(&out).dst, view(&out).dport), (ip("10.42.1.7"), 8080));
    assert_checksums(&out);
    assert_eq!(&out[out.len() - 13..], b"hello riptide");

    // Checksum 0 means "none" for UDP and must stay 0.
    let frame = udp((ip(CLIENT_POD), 5354), (ip(VIP), 80), b"x", true);
    let (_, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!(view(&out).dst, ip("10.42.1.7"));
    assert_eq!(&out[40..42], &[0, 0], "UDP checksum stays zero");
    assert_checksums(&out);
}

#[test]
fn local_backend_is_redirected_and_its_reply_reverse_natted_to_local_client() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.0.20", true)]))
        .unwrap();
    let frame = tcp((ip(CLIENT_POD), 40001), (ip(VIP), 80), 0x02, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "local backend: bpf_redirect_peer");
    let v = view(&out);
    assert_eq!((v.dst, v.dport), (ip("10.42.0.20"), 8080));
    assert_eq!(&out[0..6], &[0x0a, 0x58, 0, 0, 0, 1], "backend pod's MAC");
    assert_checksums(&out);

    let reply = tcp((ip("10.42.0.20"), 8080), (ip(CLIENT_POD), 40001), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (ip(VIP), 80));
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 40001));
    assert_checksums(&out);
}

#[test]
fn conntrack_keeps_a_flow_on_its_backend_and_new_flows_spread() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(
            Protocol::Tcp,
            vec![
                backend("10.42.1.7", false),
                backend("10.42.2.7", false),
                backend("10.42.3.7", false),
            ],
        ))
        .unwrap();
    let first = view(
        &run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 41000), (ip(VIP), 80)),
        )
        .1,
    )
    .dst;
    for _ in 0..20 {
        let f = tcp((ip(CLIENT_POD), 41000), (ip(VIP), 80), 0x10, b"data");
        let (_, out) = run(&mut n.dp, names::PROG_FROM_POD, &f);
        assert_eq!(view(&out).dst, first, "same flow, same backend");
        assert_checksums(&out);
    }
    let mut seen = BTreeSet::new();
    for port in 0..60u16 {
        let (_, out) = run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 42000 + port), (ip(VIP), 80)),
        );
        seen.insert(view(&out).dst);
    }
    assert_eq!(seen.len(), 3, "60 new flows reach all 3 backends: {seen:?}");
    assert!(n.dp.stats().unwrap().get(stats::LB_CT_HIT) >= 20);
}

#[test]
fn nodeport_to_remote_backend_is_snatted_on_egress_and_reply_restored() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    // Ingress: client → node:30080 becomes client → backend.
    let frame = syn((ip(OUTSIDE), 5555), (ip(NODE_IP), 30080));
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n));
    let v = view(&out);
    assert_eq!((v.dst, v.dport), (ip("10.42.1.7"), 8080));
    assert_eq!(v.src, ip(OUTSIDE), "SNAT happens on egress, after routing");
    assert_checksums(&out);

    // Egress: the forwarded packet gets the node's address as source.
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &out);
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&out);
    assert_eq!(v.src, ip(NODE_IP), "SNAT to the node\n{}", dump(&n));
    assert_eq!((v.dst, v.dport), (ip("10.42.1.7"), 8080));
    let nat_port = v.sport;
    assert_checksums(&out);

    // The backend's reply to node:nat_port: destination back to the client.
    let reply = tcp((ip("10.42.1.7"), 8080), (ip(NODE_IP), nat_port), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&out);
    assert_eq!(
        (v.dst, v.dport),
        (ip(OUTSIDE), 5555),
        "un-SNAT\n{}",
        dump(&n)
    );
    assert_checksums(&out);

    // …and on its way out the source becomes node:30080.
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &out);
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&out);
    assert_eq!(
        (v.src, v.sport),
        (ip(NODE_IP), 30080),
        "reverse DNAT\n{}",
        dump(&n)
    );
    assert_eq!((v.dst, v.dport), (ip(OUTSIDE), 5555));
    assert_checksums(&out);
}

#[test]
fn nodeport_to_local_backend_keeps_client_ip_and_reply_is_restored_on_egress() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Udp, vec![backend("10.42.0.20", true)]))
        .unwrap();
    let frame = udp((ip(OUTSIDE), 6000), (ip(NODE_IP), 30080), b"q", false);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let v = view(&out);
    assert_eq!(
        (v.src, v.dst, v.dport),
        (ip(OUTSIDE), ip("10.42.0.20"), 8080)
    );
    assert_checksums(&out);
    // Reply leaves the pod: not for a local client, passed on to the kernel…
    let reply = udp((ip("10.42.0.20"), 8080), (ip(OUTSIDE), 6000), b"a", false);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(view(&out).src, ip("10.42.0.20"));
    // …and restored on the uplink's egress.
    let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &out);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (ip(NODE_IP), 30080));
    assert_checksums(&out);
}

#[test]
fn external_traffic_policy_local_uses_only_local_backends_without_snat() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let mut s = service(
        Protocol::Tcp,
        vec![
            backend("10.42.0.20", true),
            backend("10.42.1.7", false),
            backend("10.42.2.7", false),
        ],
    );
    s.external_policy = TrafficPolicy::Local;
    n.svcs.upsert(&s).unwrap();
    for port in 0..30u16 {
        let (verdict, out) = run(
            &mut n.dp,
            names::PROG_FROM_NET,
            &syn((ip(OUTSIDE), 7000 + port), (ip(NODE_IP), 30080)),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let v = view(&out);
        assert_eq!(v.dst, ip("10.42.0.20"), "only the local backend");
        assert_eq!(v.src, ip(OUTSIDE), "client IP preserved");
        assert_checksums(&out);
    }
    assert!(n.dp.nat().unwrap().is_empty(), "no SNAT with eTP=Local");
    // From inside the cluster the same NodePort uses every backend.
    let mut seen = BTreeSet::new();
    for port in 0..60u16 {
        let (_, out) = run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 43000 + port), (ip(NODE_IP), 30080)),
        );
        seen.insert(view(&out).dst);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // No local backend left: outside clients are rejected, not SNATed away.
    s.backends.retain(|b| !b.local);
    n.svcs.upsert(&s).unwrap();
    let (verdict, out) = run(
        &mut n.dp,
        names::PROG_FROM_NET,
        &syn((ip(OUTSIDE), 7999), (ip(NODE_IP), 30080)),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "RST sent back out");
    assert_eq!(out[14 + 20 + 13] & 0x04, 0x04, "RST flag");
}

#[test]
fn no_backend_tcp_is_answered_with_rst_from_the_service_address() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs.upsert(&service(Protocol::Tcp, vec![])).unwrap();
    let frame = tcp((ip(CLIENT_POD), 44000), (ip(VIP), 80), 0x02, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back to the pod");
    assert_eq!(out.len(), 54);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (ip(VIP), 80));
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 44000));
    assert_eq!(&out[0..6], &CLIENT_MAC, "MACs swapped");
    let t = &out[34..];
    assert_eq!(t[13], 0x14, "RST|ACK");
    assert_eq!(&t[4..8], &[0, 0, 0, 0], "seq 0");
    assert_eq!(
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        1001,
        "acks the SYN"
    );
    assert_checksums(&out);
    assert_eq!(n.dp.stats().unwrap().get(stats::REJECT_RST), 1);

    // A RST is never answered.
    let rst = tcp((ip(CLIENT_POD), 44000), (ip(VIP), 80), 0x04, b"");
    assert_eq!(run(&mut n.dp, names::PROG_FROM_POD, &rst).0, TC_ACT_SHOT);
}

#[test]
fn no_backend_udp_is_answered_with_icmp_port_unreachable() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs.upsert(&service(Protocol::Udp, vec![])).unwrap();
    let frame = udp(
        (ip(CLIENT_POD), 5300),
        (ip(VIP), 80),
        b"0123456789abcdef",
        false,
    );
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n));
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "{out:02x?}");
    let v = view(&out);
    assert_eq!(v.proto, 1);
    assert_eq!((v.src, v.dst), (ip(VIP), ip(CLIENT_POD)));
    assert_eq!(
        &out[34..36],
        &[3, 3],
        "destination unreachable / port unreachable"
    );
    assert_eq!(
        &out[42..42 + 28],
        &frame[14..14 + 28],
        "quotes the original header + 8 bytes"
    );
    assert_checksums(&out);
    // From outside, through NodePort: same answer, out of the uplink.
    let frame = udp((ip(OUTSIDE), 5300), (ip(NODE_IP), 30080), b"z", false);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[34..36], &[3, 3]);
    assert_checksums(&out);
}

#[test]
fn client_ip_affinity_pins_a_client_to_one_backend() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let mut s = service(
        Protocol::Tcp,
        vec![
            backend("10.42.1.7", false),
            backend("10.42.2.7", false),
            backend("10.42.3.7", false),
        ],
    );
    s.affinity_timeout_s = Some(10_800);
    n.svcs.upsert(&s).unwrap();
    let first = view(
        &run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 45000), (ip(VIP), 80)),
        )
        .1,
    )
    .dst;
    for port in 1..40u16 {
        let (_, out) = run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 45000 + port), (ip(VIP), 80)),
        );
        assert_eq!(view(&out).dst, first, "new flows of one client stick");
    }
    assert!(n.dp.stats().unwrap().get(stats::AFFINITY_HIT) >= 39);
    // Different clients still spread (from outside through NodePort).
    let mut seen = BTreeSet::new();
    for c in 1..60u8 {
        let f = syn(
            (Ipv4Addr::new(198, 18, 0, 100 + c), 5000),
            (ip(NODE_IP), 30080),
        );
        let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &f);
        seen.insert(view(&out).dst);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn hairpin_flow_is_snatted_to_the_hairpin_address() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend(CLIENT_POD, true)]))
        .unwrap();
    let (verdict, out) = run(
        &mut n.dp,
        names::PROG_FROM_POD,
        &syn((ip(CLIENT_POD), 46000), (ip(VIP), 80)),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "back into the same pod");
    let v = view(&out);
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 8080));
    assert_eq!(
        (v.src, v.sport),
        (ip(HAIRPIN_IP), 46000),
        "not its own address"
    );
    assert_checksums(&out);
    let reply = tcp((ip(CLIENT_POD), 8080), (ip(HAIRPIN_IP), 46000), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let v = view(&out);
    assert_eq!((v.src, v.sport), (ip(VIP), 80));
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 46000));
    assert_checksums(&out);
}

#[test]
fn pod_to_outside_is_masqueraded_and_replies_return_to_the_pod() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let out_ip = ip("203.0.113.10");
    let (verdict, out) = run(
        &mut n.dp,
        names::PROG_TO_NET,
        &syn((ip(CLIENT_POD), 47000), (out_ip, 443)),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let v = view(&out);
    assert_eq!(v.src, ip(NODE_IP), "masqueraded\n{}", dump(&n));
    assert_eq!(v.sport, 47000, "client port kept when free");
    assert_checksums(&out);
    let reply = tcp((out_ip, 443), (ip(NODE_IP), 47000), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "delivered to the pod");
    let v = view(&out);
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 47000));
    assert_checksums(&out);
    // Cluster destinations are never masqueraded.
    let f = syn((ip(CLIENT_POD), 47001), (ip("10.42.3.3"), 80));
    let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &f);
    assert_eq!(out, f);
    let f = syn((ip(CLIENT_POD), 47002), (ip("198.18.0.2"), 80));
    let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &f);
    assert_eq!(out, f, "node underlay is in the no-masquerade range");
}

#[test]
fn masquerade_port_collision_picks_another_port() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let out_ip = ip("203.0.113.10");
    // Two local pods using the same source port to the same destination.
    let (_, a) = run(
        &mut n.dp,
        names::PROG_TO_NET,
        &syn((ip(CLIENT_POD), 48000), (out_ip, 443)),
    );
    let (_, b) = run(
        &mut n.dp,
        names::PROG_TO_NET,
        &syn((ip("10.42.0.20"), 48000), (out_ip, 443)),
    );
    assert_eq!(view(&a).src, ip(NODE_IP));
    assert_eq!(view(&b).src, ip(NODE_IP));
    assert_ne!(view(&a).sport, view(&b).sport, "reply tuples must differ");
    assert_checksums(&b);
}

#[test]
fn non_service_traffic_is_untouched() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    // Other port on the VIP, other protocol, and an outside packet to the node.
    for (prog, f) in [
        (
            names::PROG_FROM_POD,
            syn((ip(CLIENT_POD), 49000), (ip(VIP), 81)),
        ),
        (
            names::PROG_FROM_POD,
            udp((ip(CLIENT_POD), 49000), (ip(VIP), 80), b"", false),
        ),
        (
            names::PROG_FROM_NET,
            syn((ip(OUTSIDE), 49000), (ip(NODE_IP), 22)),
        ),
        (
            names::PROG_TO_NET,
            syn((ip(NODE_IP), 49000), (ip(OUTSIDE), 22)),
        ),
    ] {
        let (verdict, out) = run(&mut n.dp, prog, &f);
        assert_eq!(verdict, TC_ACT_OK, "{prog}");
        assert_eq!(out, f, "{prog} changed a packet it does not own");
    }
}

#[test]
fn icmp_error_about_a_dnated_packet_reaches_the_client_as_from_the_service() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let mut s = service(protocol, vec![backend("10.42.1.7", false)]);
        s.name = format!("icmp-{protocol:?}");
        s.frontends[0].addr = if protocol == Protocol::Tcp {
            ip(VIP)
        } else {
            ip("10.43.0.11")
        };
        s.frontends.truncate(1);
        n.svcs.upsert(&s).unwrap();
        let vip = s.frontends[0].addr;
        let sent = match protocol {
            Protocol::Tcp => syn((ip(CLIENT_POD), 40100), (vip, 80)),
            Protocol::Udp => udp((ip(CLIENT_POD), 40100), (vip, 80), b"payload", false),
        };
        let (_, dnated) = run(&mut n.dp, names::PROG_FROM_POD, &sent);
        // A router on the way answers "fragmentation needed", quoting the
        // packet as it saw it (after DNAT).
        let router = ip("198.18.0.254");
        let err = icmp_error(router, ip(CLIENT_POD), 3, 4, &dnated[14..14 + 28]);
        let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &err);
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "{protocol:?} delivered to the client\n{}",
            dump(&n)
        );
        assert_checksums(&out);
        let q = &out[14 + 20 + 8..];
        // The quote is now exactly what the client sent, checksums included
        // (TTL/ID are ours too since the test's "router" did not change them).
        assert_eq!(
            &q[..28],
            &sent[14..14 + 28],
            "{protocol:?} quote translated back"
        );
        assert_eq!(view(&out).src, router, "a third party's address stays");
    }
    assert_eq!(n.dp.stats().unwrap().get(stats::ICMP_ERR_XLATE), 2);
}

#[test]
fn backend_port_unreachable_is_returned_from_the_service_address() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Udp, vec![backend("10.42.0.20", true)]))
        .unwrap();
    let sent = udp((ip(CLIENT_POD), 40200), (ip(VIP), 80), b"q", false);
    let (_, dnated) = run(&mut n.dp, names::PROG_FROM_POD, &sent);
    // The backend pod has no socket on 8080 and answers port unreachable.
    let err = icmp_error(ip("10.42.0.20"), ip(CLIENT_POD), 3, 3, &dnated[14..14 + 28]);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, &err);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_checksums(&out);
    assert_eq!(
        view(&out).src,
        ip(VIP),
        "the backend's own address is hidden"
    );
    // The quote is what the client sent, but with the TTL the local
    // delivery decremented (and the header checksum that goes with it).
    let mut expected = sent[14..14 + 28].to_vec();
    expected[8] -= 1;
    expected[10..12].copy_from_slice(&[0, 0]);
    let c = csum16(&expected[..20]);
    expected[10..12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(&out[42..42 + 28], &expected[..]);
}

#[test]
fn icmp_error_about_a_nodeport_reply_goes_to_the_local_backend() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.0.20", true)]))
        .unwrap();
    run(
        &mut n.dp,
        names::PROG_FROM_NET,
        &syn((ip(OUTSIDE), 6100), (ip(NODE_IP), 30080)),
    );
    let reply = tcp((ip("10.42.0.20"), 8080), (ip(OUTSIDE), 6100), 0x12, b"");
    let (_, at_pod) = run(&mut n.dp, names::PROG_FROM_POD, &reply);
    let (_, on_wire) = run(&mut n.dp, names::PROG_TO_NET, &at_pod);
    assert_eq!(view(&on_wire).src, ip(NODE_IP));
    // PMTU discovery: a router says the reply was too big.
    let err = icmp_error(ip("198.18.0.254"), ip(NODE_IP), 3, 4, &on_wire[14..14 + 28]);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &err);
    assert_eq!(verdict, TC_ACT_REDIRECT, "to the backend pod\n{}", dump(&n));
    assert_checksums(&out);
    assert_eq!(view(&out).dst, ip("10.42.0.20"));
    assert_eq!(
        &out[42..42 + 28],
        &reply[14..14 + 28],
        "quote is the backend's own packet"
    );
}

#[test]
fn terminating_backend_keeps_its_flows_and_gets_no_new_ones() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let mut s = service(Protocol::Tcp, vec![backend("10.42.1.7", false)]);
    n.svcs.upsert(&s).unwrap();
    let flow = (ip(CLIENT_POD), 40300);
    run(&mut n.dp, names::PROG_FROM_POD, &syn(flow, (ip(VIP), 80)));
    // The pod starts terminating (KEP-1669) and a ready one appears.
    s.backends[0].state = BackendState::Terminating;
    s.backends.push(backend("10.42.2.7", false));
    n.svcs.upsert(&s).unwrap();
    for _ in 0..10 {
        let (_, out) = run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &tcp(flow, (ip(VIP), 80), 0x10, b"more"),
        );
        assert_eq!(view(&out).dst, ip("10.42.1.7"), "established flow not cut");
    }
    for port in 0..20u16 {
        let (_, out) = run(
            &mut n.dp,
            names::PROG_FROM_POD,
            &syn((ip(CLIENT_POD), 40400 + port), (ip(VIP), 80)),
        );
        assert_eq!(
            view(&out).dst,
            ip("10.42.2.7"),
            "new flows only to the ready backend"
        );
    }
    // No ready backend left: serving-terminating ones take new flows.
    s.backends.retain(|b| *b.addr.ip() == ip("10.42.1.7"));
    n.svcs.upsert(&s).unwrap();
    let (_, out) = run(
        &mut n.dp,
        names::PROG_FROM_POD,
        &syn((ip(CLIENT_POD), 40500), (ip(VIP), 80)),
    );
    assert_eq!(view(&out).dst, ip("10.42.1.7"));
    // The endpoint disappears entirely: its flow is balanced anew, not lost.
    // Established packets use the backend cached in the flow's conntrack
    // entry and re-check it once per clock tick (CONFIG_HZ ≥ 100, so ≤ 10
    // ms): let a tick pass.
    s.backends = vec![backend("10.42.3.7", false)];
    n.svcs.upsert(&s).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let (_, out) = run(
        &mut n.dp,
        names::PROG_FROM_POD,
        &tcp(flow, (ip(VIP), 80), 0x10, b"x"),
    );
    assert_eq!(view(&out).dst, ip("10.42.3.7"));
    assert_checksums(&out);
}

#[test]
fn host_port_from_outside_reaches_the_local_pod() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&Service {
            name: "pod/default/web:8443".into(),
            protocol: Protocol::Tcp,
            frontends: vec![Frontend {
                kind: FrontendKind::HostPort,
                addr: Ipv4Addr::UNSPECIFIED,
                port: 8443,
            }],
            backends: vec![Backend {
                addr: SocketAddrV4::new(ip("10.42.0.21"), 443),
                state: BackendState::Active,
                local: true,
            }],
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: riptide_datapath::service::LbMode::Snat,
        })
        .unwrap();
    let (verdict, out) = run(
        &mut n.dp,
        names::PROG_FROM_NET,
        &syn((ip(OUTSIDE), 6200), (ip(NODE_IP), 8443)),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let v = view(&out);
    assert_eq!(
        (v.dst, v.dport, v.src),
        (ip("10.42.0.21"), 443, ip(OUTSIDE))
    );
    assert_checksums(&out);
    // Another node address is not ours: untouched.
    let f = syn((ip(OUTSIDE), 6201), (ip("198.18.0.2"), 8443));
    assert_eq!(run(&mut n.dp, names::PROG_FROM_NET, &f).1, f);
}

#[test]
fn pod_traffic_from_another_node_is_delivered_with_redirect_peer() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let f = syn((ip("10.42.1.9"), 50000), (ip("10.42.0.21"), 8080));
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &[0x0a, 0x58, 0, 0, 0, 2], "pod's MAC");
    assert_eq!(view(&out).ttl, 63);
    assert_checksums(&out);
    // ICMP too (ping between pods).
    let ping = icmp_error(ip("10.42.1.9"), ip("10.42.0.21"), 8, 0, &[0u8; 28]);
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &ping);
    assert_eq!(verdict, TC_ACT_REDIRECT);
}

#[test]
fn backend_port_unreachable_of_a_snatted_nodeport_flow_reaches_the_client() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Udp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    // Client → node:30080 → DNAT (ingress) → SNAT to the node (egress).
    let sent = udp((ip(OUTSIDE), 5555), (ip(NODE_IP), 30080), b"q", false);
    let (_, f) = run(&mut n.dp, names::PROG_FROM_NET, &sent);
    let (_, wire) = run(&mut n.dp, names::PROG_TO_NET, &f);
    assert_eq!(view(&wire).src, ip(NODE_IP));
    // The remote backend has no socket there: "port unreachable" to the node.
    let err = icmp_error(ip("10.42.1.7"), ip(NODE_IP), 3, 3, &wire[14..14 + 28]);
    let (verdict, f) = run(&mut n.dp, names::PROG_FROM_NET, &err);
    assert_eq!(verdict, TC_ACT_OK, "forwarded to the client\n{}", dump(&n));
    assert_checksums(&f);
    // Un-SNATed on ingress, reverse-DNATed on egress: the client gets it
    // from the NodePort, quoting exactly what it sent.
    let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &f);
    assert_checksums(&out);
    let v = view(&out);
    assert_eq!((v.src, v.dst), (ip(NODE_IP), ip(OUTSIDE)), "{}", dump(&n));
    assert_eq!(&out[42..42 + 28], &sent[14..14 + 28]);
    assert_eq!(n.dp.stats().unwrap().get(stats::ICMP_ERR_XLATE), 2);
}

/// TCP close tracking: a FIN or RST marks the direction it went through as
/// closing (conntrack and NAT), so the agent's GC can drop it after a short
/// close timeout; a new SYN on the same tuple (port reuse) clears the mark,
/// and the backend's SYN-ACK clears the reply direction's.
#[test]
fn fin_and_rst_mark_flows_closing_and_a_new_syn_reopens_them() {
    use riptide_common::{CT_F_CLOSING, CT_F_REPLY, NAT_F_CLOSING};
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    n.svcs
        .upsert(&service(Protocol::Tcp, vec![backend("10.42.1.7", false)]))
        .unwrap();
    let client = (ip(CLIENT_POD), 40000);
    let be = (ip("10.42.1.7"), 8080);
    let closing = |n: &Node, reply: bool| -> Vec<bool> {
        n.dp.conntrack()
            .unwrap()
            .iter()
            .filter(|(_, v)| (v.flags & CT_F_REPLY != 0) == reply)
            .map(|(_, v)| v.flags & CT_F_CLOSING != 0)
            .collect()
    };
    // Per-packet ClusterIP flow from a pod: SYN, ACK with data.
    for flags in [0x02, 0x10] {
        let (verdict, _) = run(&mut n.dp, names::PROG_FROM_POD, &tcp(client, (ip(VIP), 80), flags, b""));
        assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n));
    }
    assert_eq!((closing(&n, false), closing(&n, true)), (vec![false], vec![false]), "{}", dump(&n));
    // The client's FIN: its direction is closing, the reply one not yet.
    run(&mut n.dp, names::PROG_FROM_POD, &tcp(client, (ip(VIP), 80), 0x11, b""));
    assert_eq!((closing(&n, false), closing(&n, true)), (vec![true], vec![false]), "{}", dump(&n));
    // The backend's FIN (it comes back on the uplink).
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &tcp(be, client, 0x11, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n));
    assert_eq!(closing(&n, true), vec![true], "{}", dump(&n));
    // The last ACK keeps the marks; a new SYN from the same port reopens
    // the forward direction.
    run(&mut n.dp, names::PROG_FROM_POD, &tcp(client, (ip(VIP), 80), 0x10, b""));
    assert_eq!(closing(&n, false), vec![true]);
    run(&mut n.dp, names::PROG_FROM_POD, &tcp(client, (ip(VIP), 80), 0x02, b""));
    assert_eq!((closing(&n, false), closing(&n, true)), (vec![false], vec![true]), "{}", dump(&n));
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &tcp(be, client, 0x12, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n));
    assert_eq!(closing(&n, true), vec![false], "the SYN-ACK reopens the reply entry: {}", dump(&n));
    // A RST marks too.
    run(&mut n.dp, names::PROG_FROM_POD, &tcp(client, (ip(VIP), 80), 0x04, b""));
    assert_eq!(closing(&n, false), vec![true], "{}", dump(&n));

    // Masqueraded flow (NAT entries): SYN out, RST back.
    let out_ip = ip("203.0.113.10");
    let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &syn((ip(CLIENT_POD), 47000), (out_ip, 443)));
    let port = view(&out).sport;
    let nat_closing = |n: &Node| -> Vec<bool> {
        let mut v: Vec<(u8, bool)> = n.dp.nat().unwrap().iter().map(|(k, v)| (k.dir, v.flags & NAT_F_CLOSING != 0)).collect();
        v.sort();
        v.into_iter().map(|(_, c)| c).collect()
    };
    assert_eq!(nat_closing(&n), vec![false, false], "{}", dump(&n));
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &tcp((out_ip, 443), (ip(NODE_IP), port), 0x14, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(nat_closing(&n).iter().filter(|c| **c).count(), 1, "the RST's direction: {}", dump(&n));
}
