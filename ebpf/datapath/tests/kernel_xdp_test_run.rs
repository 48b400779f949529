//! Kernel tests (need root): `rt_xdp_net` through BPF_PROG_TEST_RUN, one
//! verdict at a time, and its state shared with the tc programs.
//!
//! The program asks the FIB about the next hop, so the runs happen in a
//! namespace shaped like a node's uplink (`riptide_test_support::
//! uplink_lab`: veth `up0` = the node 198.18.0.1, the backends' pod CIDR
//! via node 2, the clients via a router, permanent neighbours). The runs
//! name `up0` as the ingress device
//! (`xdp_md.ingress_ifindex`), which the kernel only accepts for a device
//! whose XDP receive queue is registered: a veth has one while an XDP
//! program is attached in native mode, so the test attaches `rt_xdp_net`
//! as the agent does.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::XdpMode;
use common::*;
use riptide_common::{CFG_F_DROP_NO_BACKEND, Config, names, stats};
use riptide_datapath::{
    Datapath,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, TrafficPolicy,
    },
};
use riptide_test_support::{
    netns, privileged,
    uplink_lab::{NODE, NODE2, NODE2_MAC, ROUTER_MAC, UP0_MAC, uplink_lab},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT: &str = "203.0.113.9";
const REMOTE_BE: &str = "10.42.1.10";
const LOCAL_BE: &str = "10.42.0.7";
const NODEPORT: u16 = 30080;
const LOCAL_NODEPORT: u16 = 30081;
const EMPTY_NODEPORT: u16 = 30082;
/// A load-balancer IP of the Service without backends.
const LB_IP: &str = "198.51.100.80";

fn be(addr: &str, port: u16, local: bool) -> Backend {
    Backend {
        addr: SocketAddrV4::new(ip(addr), port),
        state: BackendState::Active,
        local,
    }
}

fn nodeport(name: &str, port: u16, backends: Vec<Backend>, algorithm: Algorithm) -> Service {
    Service {
        name: format!("default/{name}:http"),
        protocol: Protocol::Tcp,
        frontends: vec![Frontend {
            kind: FrontendKind::NodePort,
            addr: Ipv4Addr::UNSPECIFIED,
            port,
        }],
        backends,
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

fn stat(dp: &Datapath, reason: u32) -> u64 {
    dp.stats().unwrap().get(reason)
}

/// Runs `f` with a datapath of node 1 (NodePorts to a remote backend, a
/// local backend and none) loaded and attached inside the lab namespace.
fn with_node(drop_no_backend: bool, f: impl FnOnce(&mut Node, u32) + Send + 'static) {
    // The tests of this file run in parallel: one namespace each.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = uplink_lab(&format!("rtxdp{}-{n}", std::process::id()));
    netns::run_in(ns.name(), move || {
        let config = Config {
            node_ip_be: u32::from(ip(NODE)).to_be(),
            snat_port_min: 32768,
            snat_port_max: 60999,
            flags: if drop_no_backend {
                CFG_F_DROP_NO_BACKEND
            } else {
                0
            },
            ..Default::default()
        };
        let mut n = Node::load(&config, []);
        let m = Algorithm::Random;
        n.svcs
            .upsert(&nodeport(
                "remote",
                NODEPORT,
                vec![be(REMOTE_BE, 8080, false)],
                m,
            ))
            .unwrap();
        n.svcs
            .upsert(&nodeport(
                "local",
                LOCAL_NODEPORT,
                vec![be(LOCAL_BE, 8080, true)],
                m,
            ))
            .unwrap();
        n.svcs
            .upsert(&nodeport("empty", EMPTY_NODEPORT, Vec::new(), m))
            .unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"up0".as_ptr()) };
        assert_ne!(ifindex, 0, "up0 exists");
        // Native mode: registers up0's XDP receive queue (see module docs).
        let _link =
            n.dp.xdp(names::PROG_XDP_NET)
                .unwrap()
                .attach("up0", XdpMode::Driver)
                .expect("attach rt_xdp_net natively to a veth");
        f(&mut n, ifindex);
    });
    drop(ns);
}

fn macs(f: &[u8]) -> ([u8; 6], [u8; 6]) {
    (f[0..6].try_into().unwrap(), f[6..12].try_into().unwrap())
}

#[test]
fn xdp_nodeport_to_a_remote_backend_is_translated_and_sent_back_out() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    with_node(false, |n, ifindex| {
        let client = (ip(CLIENT), 40000);
        let (v, out) = xdp(&mut n.dp, ifindex, &syn(client, (ip(NODE), NODEPORT)));
        assert_eq!(v, XDP_TX, "SYN to the NodePort: XDP_TX");
        let o = view(&out);
        assert_eq!(
            (o.dst, o.dport),
            (ip(REMOTE_BE), 8080),
            "DNAT to the backend"
        );
        assert_eq!(o.src, ip(NODE), "SNAT to the node address");
        assert!((32768..=60999).contains(&o.sport), "SNAT port {}", o.sport);
        assert_eq!(o.ttl, 63, "TTL decremented");
        assert_eq!(
            macs(&out),
            (NODE2_MAC, UP0_MAC),
            "to node 2's MAC from up0's"
        );
        assert_checksums(&out);
        let snat_port = o.sport;

        // The backend's reply (through node 2) to node:snat_port: un-SNAT
        // and reverse DNAT at once, out to the client's router.
        let reply = tcp((ip(REMOTE_BE), 8080), (ip(NODE), snat_port), 0x12, b"");
        let (v, out) = xdp(&mut n.dp, ifindex, &reply);
        assert_eq!(v, XDP_TX, "reply: XDP_TX");
        let o = view(&out);
        assert_eq!(
            (o.src, o.sport),
            (ip(NODE), NODEPORT),
            "the frontend as source"
        );
        assert_eq!((o.dst, o.dport), client, "the client as destination");
        assert_eq!(macs(&out), (ROUTER_MAC, UP0_MAC));
        assert_checksums(&out);

        // The client's next packet: conntrack hit, same backend, same port.
        let ack = tcp(client, (ip(NODE), NODEPORT), 0x10, b"hello");
        let (v, out) = xdp(&mut n.dp, ifindex, &ack);
        assert_eq!(v, XDP_TX);
        let o = view(&out);
        assert_eq!(
            (o.src, o.sport, o.dst, o.dport),
            (ip(NODE), snat_port, ip(REMOTE_BE), 8080)
        );
        assert_checksums(&out);

        // The same flow's packets through tc (XDP detached, or a packet
        // XDP left to tc) find the state XDP wrote: rt_from_net DNATs to
        // the same backend and rt_to_net applies the same source port.
        let (_, mid) = run(&mut n.dp, names::PROG_FROM_NET, &ack);
        assert_eq!((view(&mid).dst, view(&mid).dport), (ip(REMOTE_BE), 8080));
        let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &mid);
        assert_eq!((view(&out).src, view(&out).sport), (ip(NODE), snat_port));
        assert_checksums(&out);

        assert_eq!(stat(&n.dp, stats::XDP_TX), 3);

        // UDP to a NodePort (a node address): its first packet is tc's
        // (the socket table decides whether a host socket owns it).
        let mut dns = nodeport(
            "dns",
            NODEPORT,
            vec![be(REMOTE_BE, 53, false)],
            Algorithm::Random,
        );
        dns.protocol = Protocol::Udp;
        n.svcs.upsert(&dns).unwrap();
        let st = stat(&n.dp, stats::XDP_TO_TC);
        let u = udp((ip(CLIENT), 5353), (ip(NODE), NODEPORT), b"q", false);
        let (v, out) = xdp(&mut n.dp, ifindex, &u);
        assert_eq!((v, out.as_slice()), (XDP_PASS, u.as_slice()), "untouched");
        assert_eq!(stat(&n.dp, stats::XDP_TO_TC), st + 1);
    });
}

/// A client opening connections to one backend faster than closed
/// mappings are removed (pps_bench's TCP_CRR: 24 000 in 6 s, the range
/// holds 28 232): once no port is free, a SYN takes over the port of a
/// finished connection, and the old flow's state goes with its mapping.
#[test]
fn xdp_nodeport_syn_takes_the_port_of_a_finished_connection_when_none_is_free() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    with_node(false, |n, ifindex| {
        n.dp.set_config(&Config {
            node_ip_be: u32::from(ip(NODE)).to_be(),
            snat_port_min: 40_000,
            snat_port_max: 40_000,
            ..Default::default()
        })
        .unwrap();
        let frontend = (ip(NODE), NODEPORT);
        let backend = (ip(REMOTE_BE), 8080);
        let (old, new) = ((ip(CLIENT), 50_000), (ip(CLIENT), 50_001));
        let (v, out) = xdp(&mut n.dp, ifindex, &syn(old, frontend));
        assert_eq!((v, view(&out).sport), (XDP_TX, 40_000));
        let (v, _) = xdp(&mut n.dp, ifindex, &syn(new, frontend));
        assert_eq!(v, XDP_DROP, "no free port\n{}", dump(&n.dp));
        assert_eq!(stat(&n.dp, stats::SNAT_NO_PORT), 1);

        // The first connection closes: a FIN each way, then quiet.
        let (v, _) = xdp(&mut n.dp, ifindex, &tcp(old, frontend, 0x11, b""));
        assert_eq!(v, XDP_TX);
        let (v, out) = xdp(&mut n.dp, ifindex, &tcp(backend, (ip(NODE), 40_000), 0x11, b""));
        assert_eq!((v, view(&out).dport), (XDP_TX, old.1));
        std::thread::sleep(std::time::Duration::from_millis(1_300));

        let (v, out) = xdp(&mut n.dp, ifindex, &syn(new, frontend));
        assert_eq!((v, view(&out).sport), (XDP_TX, 40_000), "{}", dump(&n.dp));
        assert_checksums(&out);
        let reply = tcp(backend, (ip(NODE), 40_000), 0x12, b"");
        let (v, out) = xdp(&mut n.dp, ifindex, &reply);
        assert_eq!((v, view(&out).dst, view(&out).dport), (XDP_TX, new.0, new.1));
        assert_eq!(stat(&n.dp, stats::SNAT_NO_PORT), 1, "{}", dump(&n.dp));

        // The old client's tuple is a new flow again (its conntrack entry
        // went with the mapping): no port while the new connection lives.
        let (v, _) = xdp(&mut n.dp, ifindex, &syn(old, frontend));
        assert_eq!(v, XDP_DROP, "{}", dump(&n.dp));
        assert_eq!(stat(&n.dp, stats::SNAT_NO_PORT), 2);
    });
}

#[test]
fn xdp_leaves_flows_started_by_tc_consistent_and_passes_the_rest() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    with_node(false, |n, ifindex| {
        // A flow tc started (XDP was off): rt_from_net DNATs, rt_to_net
        // SNATs; XDP then carries its later packets with the same state.
        let client = (ip(CLIENT), 41000);
        let (_, mid) = run(
            &mut n.dp,
            names::PROG_FROM_NET,
            &syn(client, (ip(NODE), NODEPORT)),
        );
        let (_, out) = run(&mut n.dp, names::PROG_TO_NET, &mid);
        let snat = (view(&out).src, view(&out).sport);
        assert_eq!(snat.0, ip(NODE));
        let ack = tcp(client, (ip(NODE), NODEPORT), 0x10, b"x");
        let (v, out) = xdp(&mut n.dp, ifindex, &ack);
        assert_eq!(v, XDP_TX);
        assert_eq!((view(&out).src, view(&out).sport), snat, "tc's SNAT port");
        assert_eq!(view(&out).dst, ip(REMOTE_BE));
        assert_checksums(&out);

        // A local backend: tc delivers it (bpf_redirect_peer); XDP passes
        // the packet untouched and creates nothing.
        let to_tc = stat(&n.dp, stats::XDP_TO_TC);
        let f = syn((ip(CLIENT), 42000), (ip(NODE), LOCAL_NODEPORT));
        let (v, out) = xdp(&mut n.dp, ifindex, &f);
        assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()));
        // A new TCP flow that is not a SYN: tc asks the socket table.
        let f = tcp((ip(CLIENT), 42001), (ip(NODE), NODEPORT), 0x10, b"");
        let (v, out) = xdp(&mut n.dp, ifindex, &f);
        assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()));
        // TTL 1: the kernel answers time exceeded.
        let mut f = syn((ip(CLIENT), 42002), (ip(NODE), NODEPORT));
        f[22] = 1;
        let c = csum16(&{
            let mut h = f[14..34].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        f[24..26].copy_from_slice(&c.to_be_bytes());
        let (v, out) = xdp(&mut n.dp, ifindex, &f);
        assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()));
        // Without backends and without CFG_F_DROP_NO_BACKEND: XDP sends
        // back the RST tc's reject would send, byte for byte (a SYN with
        // data, so the frame is cut too); UDP: see
        // `xdp_answers_udp_without_backends_with_tcs_port_unreachable`.
        let f = tcp(
            (ip(CLIENT), 42003),
            (ip(NODE), EMPTY_NODEPORT),
            0x02,
            b"early data",
        );
        let (v, out) = xdp(&mut n.dp, ifindex, &f);
        assert_eq!(v, XDP_TX, "RST from XDP");
        let (tc_v, tc_out) = run(&mut n.dp, names::PROG_FROM_NET, &f);
        assert_eq!(tc_v, TC_ACT_REDIRECT, "tc's reject");
        assert_eq!(out, tc_out, "the RST tc would send");
        assert_eq!(out.len(), 54);
        let o = view(&out);
        assert_eq!(
            (o.src, o.sport, o.dst, o.dport),
            (ip(NODE), EMPTY_NODEPORT, ip(CLIENT), 42003)
        );
        assert_eq!(out[47], 0x14, "RST|ACK");
        assert_eq!(
            u32::from_be_bytes(out[42..46].try_into().unwrap()),
            1000 + 1 + 10,
            "acks the SYN and its data"
        );
        assert_eq!(macs(&out), (macs(&f).1, macs(&f).0), "back to the sender");
        assert_checksums(&out);
        assert_eq!(stat(&n.dp, stats::REJECT_RST), 2, "XDP's and tc's");
        assert_eq!(stat(&n.dp, stats::XDP_TO_TC), to_tc + 3);

        // Not a frontend: untouched and not counted.
        let tx = stat(&n.dp, stats::XDP_TX);
        for f in [
            syn((ip(CLIENT), 43000), (ip(NODE), 22)),
            syn((ip(CLIENT), 43001), (ip("10.42.0.9"), 80)),
            udp((ip(NODE2), 4789), (ip(NODE), 4789), b"vxlan", false),
        ] {
            let (v, out) = xdp(&mut n.dp, ifindex, &f);
            assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()));
        }
        let mut arp = syn((ip(CLIENT), 1), (ip(NODE), 1));
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(xdp(&mut n.dp, ifindex, &arp).0, XDP_PASS);
        assert_eq!(stat(&n.dp, stats::XDP_TO_TC), to_tc + 3);
        assert_eq!(stat(&n.dp, stats::XDP_TX), tx);
    });
}

/// `udp` with `opts` (a multiple of 4 bytes) as IPv4 options.
fn with_ip_options(f: &[u8], opts: &[u8]) -> Vec<u8> {
    let mut o = f[..34].to_vec();
    o.extend_from_slice(opts);
    o.extend_from_slice(&f[34..]);
    o[14] = 0x45 + (opts.len() / 4) as u8;
    let tot = u16::from_be_bytes([o[16], o[17]]) + opts.len() as u16;
    o[16..18].copy_from_slice(&tot.to_be_bytes());
    o[24..26].copy_from_slice(&[0, 0]);
    let c = csum16(&o[14..34 + opts.len()]);
    o[24..26].copy_from_slice(&c.to_be_bytes());
    o
}

#[test]
fn xdp_answers_udp_without_backends_with_tcs_port_unreachable() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    with_node(false, |n, ifindex| {
        // A new UDP flow to a node address (the NodePort) is tc's: the
        // kernel's socket table may own it (`local_sock`), so XDP answers
        // for the load-balancer IP.
        let mut empty = nodeport("empty-udp", EMPTY_NODEPORT, Vec::new(), Algorithm::Random);
        empty.protocol = Protocol::Udp;
        empty.frontends.push(Frontend {
            kind: FrontendKind::LoadBalancer,
            addr: ip(LB_IP),
            port: 53,
        });
        n.svcs.upsert(&empty).unwrap();
        let mut ev = n.dp.events().unwrap();
        let _ = ev.drain();
        let to = (ip(LB_IP), 53);
        // A datagram with a payload (the frame is cut after the quote), one
        // padded to Ethernet's 60-byte minimum, one without a checksum.
        let mut padded = udp((ip(CLIENT), 42011), to, b"", false);
        padded.resize(60, 0);
        let cases = [
            udp((ip(CLIENT), 42010), to, &[0x5a; 300], false),
            padded,
            udp((ip(CLIENT), 42012), to, b"q", true),
        ];
        for (i, f) in cases.iter().enumerate() {
            let before = (
                stat(&n.dp, stats::REJECT_ICMP),
                stat(&n.dp, stats::DROP_NO_BACKEND),
                stat(&n.dp, stats::XDP_TO_TC),
            );
            let (v, out) = xdp(&mut n.dp, ifindex, f);
            assert_eq!(v, XDP_TX, "case {i}: ICMP from XDP");
            assert_eq!(
                (
                    stat(&n.dp, stats::REJECT_ICMP),
                    stat(&n.dp, stats::DROP_NO_BACKEND),
                    stat(&n.dp, stats::XDP_TO_TC)
                ),
                (before.0 + 1, before.1 + 1, before.2),
                "case {i}: counted once as reject_icmp and drop_no_backend, not to tc"
            );
            let (tc_v, tc_out) = run(&mut n.dp, names::PROG_FROM_NET, f);
            assert_eq!(tc_v, TC_ACT_REDIRECT, "case {i}: tc's reject");
            assert_eq!(out, tc_out, "case {i}: the frame tc would send");
            // What both send, from the bytes: Ethernet back to the sender,
            // IPv4 frontend → client (ICMP, TOS 0xc0, TTL 64, DF), type 3
            // code 3, the first 28 bytes of the datagram quoted as they came.
            assert_eq!(out.len(), 14 + 20 + 8 + 28, "case {i}");
            assert_eq!(
                macs(&out),
                (macs(f).1, macs(f).0),
                "case {i}: to the sender"
            );
            let o = view(&out);
            assert_eq!(
                (o.src, o.dst, o.proto, o.ttl, out[15]),
                (ip(LB_IP), ip(CLIENT), 1, 64, 0xc0),
                "case {i}"
            );
            assert_eq!(&out[20..22], &[0x40, 0], "case {i}: DF");
            assert_eq!(&out[34..36], &[3, 3], "case {i}: port unreachable");
            assert_eq!(&out[42..70], &f[14..42], "case {i}: the quote");
            assert_checksums(&out);
        }
        assert_eq!(stat(&n.dp, stats::REJECT_ICMP), 6, "3 from XDP, 3 from tc");
        let events = ev.drain();
        let xdp_events: Vec<_> = events
            .iter()
            .filter(|e| e.raw.source == riptide_common::EV_SRC_XDP_NET)
            .collect();
        assert_eq!(xdp_events.len(), 3, "one event per XDP answer: {events:?}");
        for (e, port) in xdp_events.iter().zip([42010u16, 42011, 42012]) {
            assert_eq!(e.raw.reason, stats::DROP_NO_BACKEND);
            assert_eq!(
                (
                    e.raw.saddr_be,
                    u16::from_be(e.raw.sport_be),
                    u16::from_be(e.raw.dport_be),
                    e.raw.proto
                ),
                (u32::from(ip(CLIENT)).to_be(), port, 53, 17),
                "the datagram's tuple, not the answer's"
            );
        }
        // The names the agent exports these counters under.
        assert_eq!(stats::NAMES[stats::REJECT_ICMP as usize], "reject_icmp");
        assert_eq!(
            stats::NAMES[stats::DROP_NO_BACKEND as usize],
            "drop_no_backend"
        );

        // What XDP leaves to tc untouched and uncounted (tc answers or
        // drops): a frame shorter than the quote (the ports are all the
        // parser needs), IP options (tc drops: it does not quote them),
        // a first fragment, the NodePort (see above).
        let full = udp((ip(CLIENT), 42013), to, b"", false);
        let mut short = full[..38].to_vec();
        short[16..18].copy_from_slice(&24u16.to_be_bytes());
        short[24..26].copy_from_slice(&[0, 0]);
        let c = csum16(&short[14..34]);
        short[24..26].copy_from_slice(&c.to_be_bytes());
        let opts = with_ip_options(&udp((ip(CLIENT), 42014), to, b"q", false), &[1, 1, 1, 0]);
        let mut frag = udp((ip(CLIENT), 42015), to, b"q", false);
        frag[20] = 0x20; // MF
        frag[24..26].copy_from_slice(&[0, 0]);
        let c = csum16(&frag[14..34]);
        frag[24..26].copy_from_slice(&c.to_be_bytes());
        let nodeport = udp((ip(CLIENT), 42016), (ip(NODE), EMPTY_NODEPORT), b"q", false);
        let icmp = stat(&n.dp, stats::REJECT_ICMP);
        let dropped = stat(&n.dp, stats::DROP_NO_BACKEND);
        let to_tc = stat(&n.dp, stats::XDP_TO_TC);
        for (what, f) in [
            ("short", &short),
            ("options", &opts),
            ("fragment", &frag),
            ("nodeport", &nodeport),
        ] {
            let (v, out) = xdp(&mut n.dp, ifindex, f);
            assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()), "{what}");
        }
        assert_eq!(
            (
                stat(&n.dp, stats::REJECT_ICMP),
                stat(&n.dp, stats::DROP_NO_BACKEND)
            ),
            (icmp, dropped),
            "nothing counted by XDP for what it leaves to tc"
        );
        assert_eq!(
            stat(&n.dp, stats::XDP_TO_TC),
            to_tc + 2,
            "the short frame and the NodePort reached the service lookup"
        );
        let (v, out) = run(&mut n.dp, names::PROG_FROM_NET, &nodeport);
        assert_eq!(v, TC_ACT_REDIRECT, "tc answers the NodePort");
        assert_eq!(&out[34..36], &[3, 3]);
        assert_eq!(
            run(&mut n.dp, names::PROG_FROM_NET, &opts).0,
            TC_ACT_SHOT,
            "tc drops a datagram with IP options to a service without backends"
        );
        assert!(
            ev.drain()
                .iter()
                .all(|e| e.raw.source != riptide_common::EV_SRC_XDP_NET),
            "no event from XDP for what it leaves to tc"
        );
    });
}

#[test]
fn xdp_drops_malformed_packets_and_services_without_backends_early() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    with_node(true, |n, ifindex| {
        let mut f = syn((ip(CLIENT), 44000), (ip(NODE), NODEPORT));
        f[14] = 0x65; // IP version 6 behind the IPv4 ethertype
        assert_eq!(xdp(&mut n.dp, ifindex, &f).0, XDP_DROP);
        let mut f = syn((ip(CLIENT), 44001), (ip(NODE), NODEPORT));
        f[14] = 0x43; // IHL 3
        assert_eq!(xdp(&mut n.dp, ifindex, &f).0, XDP_DROP);
        assert_eq!(stat(&n.dp, stats::DROP_MALFORMED), 2);

        // CFG_F_DROP_NO_BACKEND: no reject to build, so XDP drops it.
        let f = syn((ip(CLIENT), 44002), (ip(NODE), EMPTY_NODEPORT));
        assert_eq!(xdp(&mut n.dp, ifindex, &f).0, XDP_DROP);
        assert_eq!(stat(&n.dp, stats::DROP_NO_BACKEND), 1);
        let events = n.dp.events().unwrap().drain();
        assert!(
            events.iter().any(|e| e.raw.reason == stats::DROP_NO_BACKEND
                && e.raw.source == riptide_common::EV_SRC_XDP_NET),
            "a drop event names rt_xdp_net: {events:?}"
        );
    });
}

/// Removes the test node's pins on drop (also when the test fails).
struct Unpin(String);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = riptide_datapath::unpin_node(&self.0);
    }
}

/// `ip -d link show up0` in namespace `ns`.
fn link(ns: &str) -> String {
    riptide_test_support::ip(&["-n", ns, "-d", "link", "show", "up0"])
}

#[test]
fn xdp_attaches_natively_survives_restarts_and_switches_live() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    use riptide_datapath::{
        Pinning,
        xdp::{XdpSetting, attach_pinned_xdp},
    };
    let pinned = Unpin(format!("xdp-test-{}", std::process::id()));
    let ns = uplink_lab(&format!("rtxdpa{}", std::process::id()));
    let name = ns.name().to_owned();
    let node = pinned.0.clone();
    let (pin_dir, links) = netns::run_in(&name, move || {
        let mut dp = Datapath::load(&Pinning::Node(node.clone())).expect("load pinned");
        let pin_dir = dp.pin_dir().unwrap().to_owned();
        let links = pin_dir.join("links");
        let a = dp
            .attach_xdp("up0", XdpSetting::Native, &links)
            .unwrap()
            .unwrap();
        assert_eq!((a.mode, a.fell_back.as_deref()), (XdpSetting::Native, None));
        assert!(links.join("xdp_native").exists());
        drop(dp);
        // A restarted agent: same mode, the new program into the pinned
        // link.
        let mut again = Datapath::load(&Pinning::Node(node)).expect("reload");
        let a = again
            .attach_xdp("up0", XdpSetting::Native, &links)
            .unwrap()
            .unwrap();
        assert_eq!(a.mode, XdpSetting::Native);
        (pin_dir, links)
    });
    let l = link(&name);
    assert!(
        l.contains(" xdp ") && !l.contains("xdpgeneric"),
        "native after the processes exited: {l}"
    );

    // Live switches from the pinned program (the agent's ConfigMap
    // watcher): generic, then off.
    let (p, k) = (pin_dir.clone(), links.clone());
    let g = netns::run_in(&name, move || {
        attach_pinned_xdp(&p, "up0", XdpSetting::Generic, &k)
    })
    .unwrap()
    .unwrap();
    assert_eq!(g.mode, XdpSetting::Generic);
    assert!(!links.join("xdp_native").exists() && links.join("xdp_generic").exists());
    let l = link(&name);
    assert!(
        l.contains(" xdpgeneric ") && !l.contains(" xdp "),
        "generic: {l}"
    );
    let (p, k) = (pin_dir.clone(), links.clone());
    let off = netns::run_in(&name, move || {
        attach_pinned_xdp(&p, "up0", XdpSetting::Disabled, &k)
    })
    .unwrap();
    assert!(off.is_none());
    assert!(!links.join("xdp_generic").exists());
    // The kernel releases an unpinned link from a work queue.
    let mut l = link(&name);
    for _ in 0..40 {
        if !l.contains(" xdp ") && !l.contains("xdpgeneric") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        l = link(&name);
    }
    assert!(
        !l.contains(" xdp ") && !l.contains("xdpgeneric"),
        "detached: {l}"
    );
    drop(ns);
}
