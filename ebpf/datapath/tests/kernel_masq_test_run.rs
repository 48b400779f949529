//! Kernel tests (need root): pod → outside masquerade only rewrites flows
//! the pod originated. Replies of flows that came into a pod from another
//! node or from outside keep the pod's address (the regression found in the
//! lab: a node curling a remote pod got the pod's SYN-ACK from the other
//! node's address and reset it).
//!
//! The node here is configured like the agent configures it: masquerade on,
//! cluster CIDR 10.42.0.0/16 and only the node's own /32 exempt, so other
//! nodes' addresses are masqueraded destinations.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use riptide_common::{CFG_F_MASQUERADE, CT_F_INBOUND, Config, names, stats};
use riptide_test_support::privileged;

/// This node (n2) and another node (n1) of the same underlay.
const N1: &str = "198.18.0.11";
const N2: &str = "198.18.0.12";
const SERVER_POD: &str = "10.42.2.10";
const CLIENT_POD: &str = "10.42.2.11";
const OUTSIDE: &str = "203.0.113.7";

/// A node at `node_ip` with pod CIDR `10.42.<pod_net>.0/24` and two local
/// pods `.10`/`.11`.
fn node_at(node_ip: &str, pod_net: u8) -> Node {
    let config = Config {
        node_ip_be: u32::from(ip(node_ip)).to_be(),
        hairpin_ip_be: u32::from(ip("169.254.42.1")).to_be(),
        cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
        cluster_cidr_len: 16,
        nomasq_cidr_be: u32::from(ip(node_ip)).to_be(),
        nomasq_cidr_len: 32,
        flags: CFG_F_MASQUERADE,
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    };
    let pods = [(200, 10u8), (201, 11)];
    Node::load(
        &config,
        pods.map(|(ifindex, last)| {
            (
                Ipv4Addr::new(10, 42, pod_net, last),
                pod_endpoint(ifindex, [pod_net, last]),
            )
        }),
    )
}

fn node() -> Node {
    node_at(N2, 2)
}

fn stat(n: &Node, reason: u32) -> u64 {
    n.dp.stats().unwrap().get(reason)
}

/// The packet leaves the pod (`rt_from_pod`, routed by the kernel since the
/// peer is not local) and then the node (`rt_to_net`); returns what goes on
/// the wire.
fn pod_to_wire(n: &mut Node, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_POD, frame);
    assert_eq!(verdict, TC_ACT_OK, "routed by the kernel\n{}", dump(&n.dp));
    let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, &out);
    assert_eq!(verdict, TC_ACT_OK);
    out
}

#[test]
fn reply_of_an_inbound_tcp_flow_is_not_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    // n1 (a node, hostNetwork) opens a connection to a pod on this node.
    let syn_in = syn((ip(N1), 40000), (ip(SERVER_POD), 8080));
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &syn_in);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "delivered into the pod\n{}",
        dump(&n.dp)
    );
    let v = view(&out);
    assert_eq!((v.src, v.dst), (ip(N1), ip(SERVER_POD)));
    assert!(
        n.dp.conntrack()
            .unwrap()
            .iter()
            .any(|(k, v)| v.flags == CT_F_INBOUND
                && k.saddr_be == u32::from(ip(SERVER_POD)).to_be()
                && k.daddr_be == u32::from(ip(N1)).to_be()),
        "inbound flow recorded\n{}",
        dump(&n.dp)
    );

    // The pod's SYN-ACK leaves with the pod's own address.
    let syn_ack = tcp((ip(SERVER_POD), 8080), (ip(N1), 40000), 0x12, b"");
    let wire = pod_to_wire(&mut n, &syn_ack);
    assert_eq!(wire, syn_ack, "reply left untouched\n{}", dump(&n.dp));
    // …and so does the rest of the flow.
    let data = tcp(
        (ip(SERVER_POD), 8080),
        (ip(N1), 40000),
        0x18,
        b"HTTP/1.1 200 OK\r\n",
    );
    assert_eq!(pod_to_wire(&mut n, &data), data);
    assert_eq!(
        stat(&n, stats::SNAT),
        0,
        "nothing masqueraded\n{}",
        dump(&n.dp)
    );
    assert!(
        n.dp.nat().unwrap().is_empty(),
        "no mapping\n{}",
        dump(&n.dp)
    );
    assert_eq!(
        stat(&n, stats::MASQ_SKIP_INBOUND),
        2,
        "both answered as inbound\n{}",
        dump(&n.dp)
    );

    // Pod-to-pod traffic from another node is never masqueraded anyway:
    // it creates no inbound entries.
    let before = n.dp.conntrack().unwrap().len();
    let from_pod = syn((ip("10.42.1.5"), 41000), (ip(SERVER_POD), 8080));
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &from_pod);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(n.dp.conntrack().unwrap().len(), before);
}

#[test]
fn reply_of_an_inbound_udp_flow_is_not_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let query = udp((ip(N1), 5353), (ip(SERVER_POD), 53), b"query", false);
    let (verdict, _) = run(&mut n.dp, names::PROG_FROM_NET, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(stat(&n, stats::INBOUND_NEW), 1, "{}", dump(&n.dp));
    let answer = udp((ip(SERVER_POD), 53), (ip(N1), 5353), b"answer", false);
    for _ in 0..3 {
        assert_eq!(pod_to_wire(&mut n, &answer), answer, "{}", dump(&n.dp));
    }
    assert_eq!(stat(&n, stats::MASQ_SKIP_INBOUND), 3);
    assert_eq!(stat(&n, stats::SNAT), 0, "{}", dump(&n.dp));
    // A second query of the same flow refreshes, not duplicates, the entry.
    run(&mut n.dp, names::PROG_FROM_NET, &query);
    assert_eq!(stat(&n, stats::INBOUND_NEW), 1);

    // Masquerade is still on for flows the pod starts itself.
    let own = udp((ip(SERVER_POD), 5000), (ip(N1), 5353), b"own", false);
    let wire = pod_to_wire(&mut n, &own);
    let v = view(&wire);
    assert_eq!(
        v.src,
        ip(N2),
        "pod-originated UDP is masqueraded\n{}",
        dump(&n.dp)
    );
    assert_checksums(&wire);
}

#[test]
fn pod_originated_syn_to_outside_is_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    for dst in [ip(OUTSIDE), ip(N1)] {
        let f = syn((ip(CLIENT_POD), 45000), (dst, 443));
        let wire = pod_to_wire(&mut n, &f);
        let v = view(&wire);
        assert_eq!(
            (v.src, v.dst, v.dport),
            (ip(N2), dst, 443),
            "SYN to {dst} masqueraded to the node\n{}",
            dump(&n.dp)
        );
        assert_checksums(&wire);
    }
    assert_eq!(stat(&n, stats::SNAT), 2);
    // The node's own address is exempt (agent: node_ip/32): the kernel
    // delivers such packets locally anyway.
    let f = syn((ip(CLIENT_POD), 45001), (ip(N2), 10250));
    assert_eq!(pod_to_wire(&mut n, &f), f);
}

#[test]
fn replies_of_a_pod_originated_flow_are_unsnatted_and_the_flow_stays_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let wire = pod_to_wire(&mut n, &syn((ip(CLIENT_POD), 46000), (ip(N1), 80)));
    let v = view(&wire);
    assert_eq!(v.src, ip(N2));
    let nat_port = v.sport;

    // n1 answers the node address; the reply goes into the client pod.
    let syn_ack = tcp((ip(N1), 80), (ip(N2), nat_port), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &syn_ack);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n.dp));
    let v = view(&out);
    assert_eq!((v.src, v.sport), (ip(N1), 80));
    assert_eq!((v.dst, v.dport), (ip(CLIENT_POD), 46000), "un-SNAT");
    assert_eq!(&out[0..6], &[0x0a, 0x58, 0, 0, 2, 11], "client pod's MAC");
    assert_checksums(&out);
    assert_eq!(stat(&n, stats::UNSNAT), 1);
    // A reply to a masqueraded flow is not an inbound flow.
    assert_eq!(stat(&n, stats::INBOUND_NEW), 0, "{}", dump(&n.dp));

    // The pod's ACK (not a SYN) uses the existing mapping.
    let ack = tcp((ip(CLIENT_POD), 46000), (ip(N1), 80), 0x10, b"GET /");
    let wire = pod_to_wire(&mut n, &ack);
    let v = view(&wire);
    assert_eq!((v.src, v.sport), (ip(N2), nat_port), "{}", dump(&n.dp));
    assert_checksums(&wire);
    assert_eq!(stat(&n, stats::SNAT), 2);
}

#[test]
fn tcp_packets_without_a_mapping_other_than_a_syn_are_never_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    // No inbound entry either (the flow's mapping was evicted or expired,
    // or the flow began before the programs were loaded). A SYN-ACK only
    // ever answers a connection into the pod: it passes as it is.
    let syn_ack = tcp((ip(SERVER_POD), 8080), (ip(OUTSIDE), 40000), 0x12, b"");
    assert_eq!(pod_to_wire(&mut n, &syn_ack), syn_ack, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_SKIP_NOT_SYN), 1);
    // ACK, RST, RST-ACK, FIN: dropped and counted, never sent with the
    // pod's address and never given a mapping.
    for flags in [0x10u8, 0x04, 0x14, 0x11] {
        let f = tcp(
            (ip(SERVER_POD), 8080),
            (ip(OUTSIDE), 40000 + u16::from(flags)),
            flags,
            b"",
        );
        let (verdict, _) = run(&mut n.dp, names::PROG_FROM_POD, &f);
        assert_eq!(verdict, TC_ACT_OK, "routed by the kernel\n{}", dump(&n.dp));
        let (verdict, _) = run(&mut n.dp, names::PROG_TO_NET, &f);
        assert_eq!(verdict, TC_ACT_SHOT, "flags {flags:#x}\n{}", dump(&n.dp));
    }
    assert!(n.dp.nat().unwrap().is_empty(), "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::MASQ_LOST_MAPPING), 4, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::SNAT), 0);
}

/// NodePort on n1 to a backend pod on n2, n2 masquerading: the backend's
/// reply to n1's SNAT address must leave n2 with the pod's address, or n1
/// cannot match it to the flow.
#[test]
fn nodeport_reply_of_a_backend_behind_a_masquerading_node_is_not_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n1 = node_at(N1, 1);
    let mut n2 = node();
    let backend = |local| Backend {
        addr: SocketAddrV4::new(ip(SERVER_POD), 8080),
        state: BackendState::Active,
        local,
    };
    let svc = |local| Service {
        name: "default/web:http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![Frontend {
            kind: FrontendKind::NodePort,
            addr: Ipv4Addr::UNSPECIFIED,
            port: 30080,
        }],
        backends: vec![backend(local)],
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    };
    n1.svcs.upsert(&svc(false)).unwrap();
    n2.svcs.upsert(&svc(true)).unwrap();

    // Client → n1:30080: DNAT on ingress, SNAT to n1 on egress.
    let (_, f) = run(
        &mut n1.dp,
        names::PROG_FROM_NET,
        &syn((ip(OUTSIDE), 5555), (ip(N1), 30080)),
    );
    let (_, f) = run(&mut n1.dp, names::PROG_TO_NET, &f);
    let v = view(&f);
    assert_eq!(
        (v.src, v.dst, v.dport),
        (ip(N1), ip(SERVER_POD), 8080),
        "{}",
        dump(&n1.dp)
    );
    let snat_port = v.sport;

    // n2 delivers it into the backend pod.
    let (verdict, _) = run(&mut n2.dp, names::PROG_FROM_NET, &f);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n2.dp));

    // The backend's SYN-ACK leaves n2 unchanged…
    let syn_ack = tcp((ip(SERVER_POD), 8080), (ip(N1), snat_port), 0x12, b"");
    let wire = pod_to_wire(&mut n2, &syn_ack);
    assert_eq!(wire, syn_ack, "not masqueraded by n2\n{}", dump(&n2.dp));

    // …so n1 un-SNATs it and answers the client from the NodePort.
    let (_, f) = run(&mut n1.dp, names::PROG_FROM_NET, &wire);
    let (_, f) = run(&mut n1.dp, names::PROG_TO_NET, &f);
    let v = view(&f);
    assert_eq!((v.src, v.sport), (ip(N1), 30080), "{}", dump(&n1.dp));
    assert_eq!((v.dst, v.dport), (ip(OUTSIDE), 5555));
    assert_checksums(&f);
}

/// The quoted packet of an ICMP error frame (IP header + 8 bytes).
fn quote(f: &[u8]) -> &[u8] {
    &f[14 + 20 + 8..14 + 20 + 8 + 28]
}

#[test]
fn icmp_errors_about_masqueraded_packets_reach_the_pod_translated_back() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let router = ip("203.0.113.1");
    // TCP: a router on the way cannot forward the pod's big segment
    // ("fragmentation needed"); PMTU discovery needs the pod to see it.
    let sent = tcp(
        (ip(CLIENT_POD), 46100),
        (ip(OUTSIDE), 443),
        0x02,
        &[0u8; 1200],
    );
    let wire = pod_to_wire(&mut n, &sent);
    assert_eq!(view(&wire).src, ip(N2));
    let err = icmp_error(router, ip(N2), 3, 4, &wire[14..14 + 28]);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &err);
    assert_eq!(
        verdict,
        TC_ACT_REDIRECT,
        "delivered to the pod\n{}",
        dump(&n.dp)
    );
    assert_checksums(&out);
    let v = view(&out);
    assert_eq!(
        (v.src, v.dst),
        (router, ip(CLIENT_POD)),
        "a router's address stays"
    );
    assert_eq!(
        quote(&out),
        &sent[14..14 + 28],
        "the quote is what the pod sent"
    );

    // UDP: the destination itself answers "port unreachable"; the quoted
    // UDP checksum (inside the 8 quoted bytes) is restored too.
    let sent = udp((ip(CLIENT_POD), 46200), (ip(OUTSIDE), 53), b"query", false);
    let wire = pod_to_wire(&mut n, &sent);
    let err = icmp_error(ip(OUTSIDE), ip(N2), 3, 3, &wire[14..14 + 28]);
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &err);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n.dp));
    assert_checksums(&out);
    assert_eq!(
        (view(&out).src, view(&out).dst),
        (ip(OUTSIDE), ip(CLIENT_POD))
    );
    assert_eq!(quote(&out), &sent[14..14 + 28]);
    assert_eq!(stat(&n, stats::ICMP_ERR_XLATE), 2);
}

#[test]
fn a_pods_icmp_error_about_an_unsnatted_reply_is_masqueraded() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let sent = udp((ip(CLIENT_POD), 46300), (ip(OUTSIDE), 53), b"query", false);
    let wire = pod_to_wire(&mut n, &sent);
    let nat_port = view(&wire).sport;
    // The answer comes back to the node and is un-SNATed into the pod…
    let answer = udp((ip(OUTSIDE), 53), (ip(N2), nat_port), b"answer", false);
    let (verdict, delivered) = run(&mut n.dp, names::PROG_FROM_NET, &answer);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // …whose socket is gone: the pod answers "port unreachable". Leaving
    // the node it must carry the node's address, outside and quoted.
    let err = icmp_error(ip(CLIENT_POD), ip(OUTSIDE), 3, 3, &delivered[14..14 + 28]);
    let wire = pod_to_wire(&mut n, &err);
    assert_checksums(&wire);
    assert_eq!(
        (view(&wire).src, view(&wire).dst),
        (ip(N2), ip(OUTSIDE)),
        "{}",
        dump(&n.dp)
    );
    let q = quote(&wire);
    assert_eq!(
        &q[12..20],
        &answer[26..34],
        "quoted addresses as on the wire"
    );
    assert_eq!(
        &q[20..28],
        &answer[34..42],
        "quoted ports and UDP checksum as on the wire"
    );
    assert_eq!(csum16(&q[..20]), 0, "quoted IPv4 header checksum");
}

/// Host flows in the SNAT range reserve their tuple (`nat::track_host`):
/// a connection the node opened before the programs were attached is
/// recorded from its next segment, masquerade then gives the pod another
/// port, the host's replies stay the host's; FIN, RST and ports outside
/// the range record nothing; a tuple a pod's mapping took first moves a
/// host SYN to a free port and leaves a later host segment alone
/// (`nat_host_clash`).
#[test]
fn host_flows_reserve_their_tuple_and_move_off_a_taken_one() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = node();
    let (node_ip, outside) = (ip(N2), ip(OUTSIDE));
    let to_wire = |n: &mut Node, f: &[u8]| {
        let (verdict, out) = run(&mut n.dp, names::PROG_TO_NET, f);
        assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n.dp));
        out
    };

    // An established host connection (no SYN seen): left as it is, and
    // its tuple recorded once.
    let ack = tcp((node_ip, 40000), (outside, 443), 0x10, b"GET /watch");
    assert_eq!(to_wire(&mut n, &ack), ack, "{}", dump(&n.dp));
    assert_eq!(to_wire(&mut n, &ack), ack);
    assert_eq!(stat(&n, stats::NAT_HOST_NEW), 1, "{}", dump(&n.dp));
    assert_eq!(
        n.dp.nat().unwrap().len(),
        2,
        "identity pair\n{}",
        dump(&n.dp)
    );

    // A pod's SYN from the same port to the same peer gets another port.
    let pod_syn = syn((ip(CLIENT_POD), 40000), (outside, 443));
    let v = view(&pod_to_wire(&mut n, &pod_syn));
    assert_eq!(v.src, node_ip);
    assert_ne!(v.sport, 40000, "the host's tuple\n{}", dump(&n.dp));
    let pod_port = v.sport;

    // Replies: the host's reach the host untouched, the pod's the pod.
    let reply = tcp((outside, 443), (node_ip, 40000), 0x10, b"event");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!((verdict, out), (TC_ACT_OK, reply), "{}", dump(&n.dp));
    let reply = tcp((outside, 443), (node_ip, pod_port), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "{}", dump(&n.dp));
    assert_eq!((view(&out).dst, view(&out).dport), (ip(CLIENT_POD), 40000));

    // FIN, RST and ports outside the range record nothing.
    let before = n.dp.nat().unwrap().len();
    for f in [
        tcp((node_ip, 40001), (outside, 443), 0x11, b""),
        tcp((node_ip, 40002), (outside, 443), 0x04, b""),
        tcp((node_ip, 22), (outside, 50000), 0x10, b"ssh"),
        udp((node_ip, 123), (outside, 123), b"ntp", false),
    ] {
        assert_eq!(to_wire(&mut n, &f), f);
    }
    assert_eq!(n.dp.nat().unwrap().len(), before, "{}", dump(&n.dp));

    // A pod's mapping holds node:41000 → outside:443 first (its own port).
    let pod_syn = syn((ip(SERVER_POD), 41000), (outside, 443));
    assert_eq!(view(&pod_to_wire(&mut n, &pod_syn)).sport, 41000);
    // A host segment of a connection already open on that tuple cannot
    // be moved: sent as it is, counted.
    let ack = tcp((node_ip, 41000), (outside, 443), 0x10, b"");
    assert_eq!(to_wire(&mut n, &ack), ack);
    assert_eq!(stat(&n, stats::NAT_HOST_CLASH), 1, "{}", dump(&n.dp));
    // A new host connection on it is moved to a free port, and its
    // replies come back to the host's own port.
    let host_syn = syn((node_ip, 41000), (outside, 443));
    let v = view(&to_wire(&mut n, &host_syn));
    assert_eq!(v.src, node_ip);
    assert_ne!(v.sport, 41000, "{}", dump(&n.dp));
    assert_eq!(stat(&n, stats::NAT_HOST_REMAP), 1);
    let syn_ack = tcp((outside, 443), (node_ip, v.sport), 0x12, b"");
    let (verdict, out) = run(&mut n.dp, names::PROG_FROM_NET, &syn_ack);
    assert_eq!(verdict, TC_ACT_OK, "{}", dump(&n.dp));
    assert_eq!((view(&out).dst, view(&out).dport), (node_ip, 41000));
    assert_checksums(&out);
    // Its later segments keep the new port.
    let ack = tcp((node_ip, 41000), (outside, 443), 0x10, b"x");
    assert_eq!(view(&to_wire(&mut n, &ack)).sport, v.sport);
    assert_eq!(stat(&n, stats::NAT_HOST_CLASH), 1);
}
