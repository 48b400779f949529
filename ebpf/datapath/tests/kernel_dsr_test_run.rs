//! Kernel tests (need root): Direct Server Return through
//! BPF_PROG_TEST_RUN. The entry node's side (`rt_from_net` writes the
//! option, no source NAT; per-flow fallbacks to source NAT) runs in a
//! namespace shaped like a node's uplink (`riptide_test_support::
//! uplink_lab`), because the program asks the FIB about the route and MTU
//! to the backend; the runs name `up0` as the packet's device
//! (`__sk_buff.ifindex`). The backend node's side (`rt_from_net` takes and
//! strips the option and records the reply entry, `rt_from_pod` leaves the
//! reply to `rt_to_net`, which gives it the frontend as source) is fed
//! frames built here byte by byte, not the entry side's output, so a
//! mistake shared by writer and reader cannot pass.
//!
//! The entry node's side at XDP (`rt_xdp_net`, `dsr::push_xdp`) runs in the
//! same lab with the program attached natively to `up0` (which registers
//! the veth's XDP receive queue the run names, `xdp_md.ingress_ifindex`);
//! its output is compared byte for byte with the frame built here.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::{TestRun, TestRunOptions, XdpMode};
use common::*;
use riptide_common::{
    CT_F_DSR, CT_F_NODEPORT, CT_F_REPLY, CT_F_SNAT, Config, CtKey, DSR_OPT_TYPE, names, stats,
};
use riptide_datapath::{
    Datapath,
    service::{LbMode, SourceRanges},
};
use riptide_test_support::{
    netns, privileged,
    uplink_lab::{NODE, NODE2, NODE2_MAC, UP0_MAC, uplink_lab},
};

const CLIENT: &str = "203.0.113.9";
/// A backend on node 2 (the lab routes 10.42.1.0/24 via node 2 on up0).
const REMOTE_BE: &str = "10.42.1.10";
/// A backend behind a route out of another device (the tunnel's place).
const TUNNEL_BE: &str = "10.42.2.10";
const LOCAL_BE: &str = "10.42.0.7";
const TCP_PORT: u16 = 30080;
const UDP_PORT: u16 = 30053;
const TUNNEL_PORT: u16 = 30090;
const LOCAL_PORT: u16 = 30091;
const SNAT_PORT: u16 = 30092;

fn be(addr: &str, port: u16, local: bool) -> Backend {
    Backend {
        addr: SocketAddrV4::new(ip(addr), port),
        state: BackendState::Active,
        local,
    }
}

fn nodeport(port: u16, protocol: Protocol, backend: Backend, lb_mode: LbMode) -> Service {
    Service {
        name: format!("default/dsr-{port}:p"),
        protocol,
        frontends: vec![Frontend {
            kind: FrontendKind::NodePort,
            addr: Ipv4Addr::UNSPECIFIED,
            port,
        }],
        backends: vec![backend],
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        algorithm: Algorithm::Random,
        source_ranges: SourceRanges::Any,
        lb_mode,
    }
}

fn stat(dp: &Datapath, reason: u32) -> u64 {
    dp.stats().unwrap().get(reason)
}

/// One tc run of `name` on `frame` as if it arrived on `ifindex`
/// (`__sk_buff` up to and including `ifindex`; every other field 0).
fn run_on(dp: &mut Datapath, name: &'static str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut skb = [0u8; 44];
    skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp
        .classifier(name)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&skb),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN (tc)");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The IPv4 header length of a frame, in bytes.
fn ihl(f: &[u8]) -> usize {
    usize::from(f[14] & 0x0f) * 4
}

/// How the flow whose forward conntrack entry `pick` finds went: its
/// `CT_F_DSR` / `CT_F_SNAT` flags.
fn how(n: &Node, pick: impl Fn(&CtKey) -> bool) -> u16 {
    let ct = n.dp.conntrack().unwrap();
    let Some((_, e)) = ct.iter().find(|(k, _)| pick(k)) else {
        panic!("no forward entry in {ct:?}");
    };
    e.flags & (CT_F_DSR | CT_F_SNAT)
}

/// The DSR option as the design fixes it: type, length 8, frontend port,
/// frontend address.
fn option(frontend: (Ipv4Addr, u16)) -> [u8; 8] {
    let p = frontend.1.to_be_bytes();
    let a = frontend.0.octets();
    [DSR_OPT_TYPE, 8, p[0], p[1], a[0], a[1], a[2], a[3]]
}

/// `frame` (IHL 5) with `opt` inserted after the IPv4 header: IHL,
/// total length and header checksum fixed, the L4 bytes as they were.
fn with_option(frame: &[u8], opt: [u8; 8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&opt);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x47;
    let tot = u16::from_be_bytes([f[16], f[17]]) + 8;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum16(&f[14..42]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// Runs `f` with node 1 (NodePorts with DSR to a remote, a tunnel-routed
/// and a local backend, and one without DSR) loaded inside an uplink lab
/// namespace where 10.42.2.0/24 leaves through another device (`tun0`).
fn with_entry_node(f: impl FnOnce(&mut Node, u32) + Send + 'static) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ns = uplink_lab(&format!("rtdsr{}-{i}", std::process::id()));
    let n = ns.name().to_owned();
    riptide_test_support::ip(&[
        "-n", &n, "link", "add", "tun0", "type", "veth", "peer", "name", "tun1",
    ]);
    riptide_test_support::ip(&["-n", &n, "link", "set", "tun0", "up"]);
    riptide_test_support::ip(&["-n", &n, "link", "set", "tun1", "up"]);
    riptide_test_support::ip(&["-n", &n, "route", "add", "10.42.2.0/24", "dev", "tun0"]);
    netns::run_in(&n, move || {
        let config = Config {
            node_ip_be: u32::from(ip(NODE)).to_be(),
            snat_port_min: 32768,
            snat_port_max: 60999,
            ..Default::default()
        };
        let mut node = Node::load(&config, []);
        let dsr = LbMode::Dsr;
        for svc in [
            nodeport(TCP_PORT, Protocol::Tcp, be(REMOTE_BE, 8080, false), dsr),
            nodeport(UDP_PORT, Protocol::Udp, be(REMOTE_BE, 5353, false), dsr),
            nodeport(TUNNEL_PORT, Protocol::Tcp, be(TUNNEL_BE, 8080, false), dsr),
            nodeport(LOCAL_PORT, Protocol::Tcp, be(LOCAL_BE, 8080, true), dsr),
            nodeport(
                SNAT_PORT,
                Protocol::Tcp,
                be(REMOTE_BE, 8080, false),
                LbMode::Snat,
            ),
        ] {
            node.svcs.upsert(&svc).unwrap();
        }
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"up0".as_ptr()) };
        assert_ne!(ifindex, 0, "up0 exists");
        f(&mut node, ifindex);
    });
    drop(ns);
}

#[test]
fn entry_node_writes_the_option_and_does_not_snat() {
    if !privileged("to load eBPF programs and create a namespace") {
        return;
    }
    with_entry_node(|n, up0| {
        let client = (ip(CLIENT), 40000);
        let frame = syn(client, (ip(NODE), TCP_PORT));
        let (v, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &frame);
        assert_eq!(v, TC_ACT_REDIRECT, "straight back out up0\n{}", dump(&n.dp));
        assert_eq!(ihl(&out), 28, "IHL 7: one 8-byte option\n{out:02x?}");
        assert_eq!(out.len(), frame.len() + 8);
        assert_eq!(
            out[34..42],
            option((ip(NODE), TCP_PORT)),
            "the frontend (node address, NodePort) right after the header"
        );
        let seen = view(&out);
        assert_eq!((seen.src, seen.sport), client, "client address kept");
        assert_eq!((seen.dst, seen.dport), (ip(REMOTE_BE), 8080), "DNAT");
        assert_checksums(&out);
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1);
        assert!(
            n.dp.nat().unwrap().is_empty(),
            "no SNAT mapping\n{}",
            dump(&n.dp)
        );
        assert_eq!(how(n, |k| k.dport_be == TCP_PORT.to_be()), CT_F_DSR);

        // The egress program leaves the forwarded packet alone (no SNAT).
        let (v, egress) = run_on(&mut n.dp, names::PROG_TO_NET, up0, &out);
        assert_eq!(v, TC_ACT_OK);
        assert_eq!(egress, out, "rt_to_net must not touch a DSR packet");

        // Later TCP packets go without the option.
        let ack = tcp(client, (ip(NODE), TCP_PORT), 0x10, b"hello");
        let (v, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &ack);
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(ihl(&out), 20, "no option after the SYN");
        assert_eq!(view(&out).dst, ip(REMOTE_BE));
        assert_checksums(&out);
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1);

        // UDP: every packet carries the option, payload intact.
        let client = (ip(CLIENT), 41000);
        for i in 1..=2u64 {
            let dgram = udp(client, (ip(NODE), UDP_PORT), b"query", false);
            let (v, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &dgram);
            assert_eq!(v, TC_ACT_REDIRECT, "{}", dump(&n.dp));
            assert_eq!(out[34..42], option((ip(NODE), UDP_PORT)), "packet {i}");
            assert_eq!(out[42 + 8..], dgram[34 + 8..], "UDP payload");
            assert_checksums(&out);
            assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1 + i);
        }
        assert_eq!(stat(&n.dp, stats::SNAT), 0, "{}", dump(&n.dp));
    });
}

#[test]
fn entry_node_falls_back_to_snat_per_flow() {
    if !privileged("to load eBPF programs and create a namespace") {
        return;
    }
    with_entry_node(|n, up0| {
        // up0's MTU is 1500: a datagram of 1492 bytes takes the option,
        // one of 1493 would not fit and goes source-NATed.
        let fits = udp((ip(CLIENT), 42000), (ip(NODE), UDP_PORT), &[7; 1464], false);
        assert_eq!(fits.len() - 14, 1492);
        let (_, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &fits);
        assert_eq!(ihl(&out), 28, "1492 + 8 fits\n{}", dump(&n.dp));
        assert_eq!(out.len() - 14, 1500);
        assert_checksums(&out);

        let big = udp((ip(CLIENT), 42001), (ip(NODE), UDP_PORT), &[7; 1465], false);
        let (_, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &big);
        assert_eq!(ihl(&out), 20, "too big for the option\n{}", dump(&n.dp));
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_MTU), 1);
        let (_, out) = run_on(&mut n.dp, names::PROG_TO_NET, up0, &out);
        assert_eq!(
            view(&out).src,
            ip(NODE),
            "the fallback is source NAT\n{}",
            dump(&n.dp)
        );
        assert_checksums(&out);

        // A backend behind another device (a tunnel): source NAT.
        let (_, out) = run_on(
            &mut n.dp,
            names::PROG_FROM_NET,
            up0,
            &syn((ip(CLIENT), 43000), (ip(NODE), TUNNEL_PORT)),
        );
        assert_eq!(ihl(&out), 20, "{}", dump(&n.dp));
        assert_eq!(view(&out).dst, ip(TUNNEL_BE));
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_ROUTE), 1);
        assert_eq!(how(n, |k| k.dport_be == TUNNEL_PORT.to_be()), CT_F_SNAT);

        // A local backend: nothing to do, nothing counted.
        let (_, out) = run_on(
            &mut n.dp,
            names::PROG_FROM_NET,
            up0,
            &syn((ip(CLIENT), 44000), (ip(NODE), LOCAL_PORT)),
        );
        assert_eq!(ihl(&out), 20);
        assert_eq!(view(&out).src, ip(CLIENT));

        // A service in SNAT mode never gets the option.
        let (_, out) = run_on(
            &mut n.dp,
            names::PROG_FROM_NET,
            up0,
            &syn((ip(CLIENT), 45000), (ip(NODE), SNAT_PORT)),
        );
        assert_eq!(ihl(&out), 20);
        assert_eq!(
            stat(&n.dp, stats::DSR_OPT_SET),
            1,
            "only the datagram that fit"
        );
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_ROUTE), 1);
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_MTU), 1);
    });
}

/// Node 2: the backend pod 10.42.1.10 lives here.
fn backend_node() -> Node {
    let config = Config {
        node_ip_be: u32::from(ip(NODE2)).to_be(),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    };
    Node::load(&config, [(ip(REMOTE_BE), pod_endpoint(100, [1, 10]))])
}

#[test]
fn backend_node_takes_the_option_and_the_reply_leaves_from_the_frontend() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = backend_node();
    let client = (ip(CLIENT), 40000);
    let pod = (ip(REMOTE_BE), 8080);
    let frontend = (ip(NODE), TCP_PORT);
    let plain = tcp(client, pod, 0x02, b"hi there");
    let frame = with_option(&plain, option(frontend));
    assert_checksums(&frame);
    let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(ihl(&out), 20, "option stripped\n{}", dump(&n.dp));
    assert_eq!(
        out[14..],
        {
            // What the sender would have sent without the option, TTL − 1
            // (delivered into the pod as a router would).
            let mut p = plain.clone();
            p[22] -= 1;
            p[24..26].copy_from_slice(&[0, 0]);
            let c = csum16(&p[14..34]);
            p[24..26].copy_from_slice(&c.to_be_bytes());
            p
        }[14..],
        "the packet as the client sent it"
    );
    assert_checksums(&out);
    assert_eq!(stat(&n.dp, stats::DSR_OPT_RECV), 1);
    let ct = n.dp.conntrack().unwrap();
    let (k, e) = ct
        .iter()
        .find(|(_, e)| e.flags & CT_F_DSR != 0)
        .unwrap_or_else(|| panic!("a DSR reply entry\n{ct:?}"));
    assert_eq!(
        (k.saddr_be, k.sport_be, k.daddr_be, k.dport_be),
        (
            u32::from(pod.0).to_be(),
            pod.1.to_be(),
            u32::from(client.0).to_be(),
            client.1.to_be()
        ),
        "keyed by the reply"
    );
    assert_eq!(
        e.flags & (CT_F_REPLY | CT_F_NODEPORT),
        CT_F_REPLY | CT_F_NODEPORT
    );
    assert_eq!(
        (e.vip_be, e.vport_be),
        (u32::from(frontend.0).to_be(), frontend.1.to_be())
    );

    // The pod's SYN-ACK: untouched on the veth, the frontend as source on
    // the uplink's egress, the client as destination.
    let synack = tcp(pod, client, 0x12, b"");
    let (v, out) = run(&mut n.dp, names::PROG_FROM_POD, &synack);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(out, synack, "rt_from_pod leaves the reply to the uplink");
    let (v, out) = run(&mut n.dp, names::PROG_TO_NET, &synack);
    assert_eq!(v, TC_ACT_OK);
    let seen = view(&out);
    assert_eq!(
        (seen.src, seen.sport),
        frontend,
        "reply from the frontend\n{}",
        dump(&n.dp)
    );
    assert_eq!((seen.dst, seen.dport), client);
    assert_checksums(&out);
    assert_eq!(stat(&n.dp, stats::DSR_REVNAT), 1);
    assert!(n.dp.nat().unwrap().is_empty(), "never masqueraded");

    // UDP the same way, checksum included.
    let client = (ip(CLIENT), 41000);
    let pod = (ip(REMOTE_BE), 5353);
    let frontend = (ip(NODE), UDP_PORT);
    let dgram = with_option(&udp(client, pod, b"query", false), option(frontend));
    let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &dgram);
    assert_eq!(ihl(&out), 20);
    assert_checksums(&out);
    let (_, out) = run(
        &mut n.dp,
        names::PROG_TO_NET,
        &udp(pod, client, b"answer", false),
    );
    let seen = view(&out);
    assert_eq!((seen.src, seen.sport), frontend, "{}", dump(&n.dp));
    assert_eq!((seen.dst, seen.dport), client);
    assert_checksums(&out);
    assert_eq!(stat(&n.dp, stats::DSR_OPT_RECV), 2);
}

#[test]
fn backend_node_ignores_other_options_and_other_destinations() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = backend_node();
    let client = (ip(CLIENT), 40000);
    let mut other = option((ip(NODE), TCP_PORT));
    other[0] = 0x9b;
    let frame = with_option(&tcp(client, (ip(REMOTE_BE), 8080), 0x02, b""), other);
    let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(ihl(&out), 28, "another option type stays");
    // Not a pod of this node: forwarded as it is.
    let frame = with_option(
        &tcp(client, (ip("10.42.3.3"), 8080), 0x02, b""),
        option((ip(NODE), TCP_PORT)),
    );
    let (_, out) = run(&mut n.dp, names::PROG_FROM_NET, &frame);
    assert_eq!(ihl(&out), 28, "the option stays for the pod's own node");
    assert_eq!(stat(&n.dp, stats::DSR_OPT_RECV), 0);
    assert!(
        n.dp.conntrack()
            .unwrap()
            .iter()
            .all(|(_, e)| e.flags & CT_F_DSR == 0),
        "{}",
        dump(&n.dp)
    );
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Attaches `rt_xdp_net` natively to `up0` for the XDP runs (see the
/// module docs); detached when the returned link drops.
fn attach_xdp(n: &mut Node) -> aya::programs::xdp::XdpLinkId {
    n.dp.xdp(names::PROG_XDP_NET)
        .unwrap()
        .attach("up0", XdpMode::Driver)
        .expect("attach rt_xdp_net natively to up0")
}

/// `frame` as a router forwards it to node 2: TTL − 1 with the header
/// checksum recomputed over the whole header, node 2's MAC as
/// destination, up0's as source.
fn routed_to_node2(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&NODE2_MAC);
    f[6..12].copy_from_slice(&UP0_MAC);
    f[22] -= 1;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum16(&f[14..14 + ihl(&f)]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn xdp_entry_node_writes_the_option_and_sends_the_flow_itself() {
    if !privileged("to load eBPF programs and create a namespace") {
        return;
    }
    with_entry_node(|n, up0| {
        let _link = attach_xdp(n);
        let client = (ip(CLIENT), 40000);
        let backend = (ip(REMOTE_BE), 8080);
        let (v, out) = xdp(&mut n.dp, up0, &syn(client, (ip(NODE), TCP_PORT)));
        assert_eq!(v, XDP_TX, "the SYN leaves from XDP\n{}", dump(&n.dp));
        // Exactly the client's SYN to the backend, the option after the
        // header, as node 1 routes it to node 2.
        let want = routed_to_node2(&with_option(
            &syn(client, backend),
            option((ip(NODE), TCP_PORT)),
        ));
        assert_eq!(out, want, "got\n{out:02x?}\nwant\n{want:02x?}");
        assert_checksums(&out);
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1);
        assert_eq!(stat(&n.dp, stats::XDP_TX), 1);
        assert!(
            n.dp.nat().unwrap().is_empty(),
            "no SNAT mapping\n{}",
            dump(&n.dp)
        );
        assert_eq!(how(n, |k| k.dport_be == TCP_PORT.to_be()), CT_F_DSR);

        // Later TCP packets: DNAT only, still at XDP.
        let ack = tcp(client, (ip(NODE), TCP_PORT), 0x10, b"hello");
        let (v, out) = xdp(&mut n.dp, up0, &ack);
        assert_eq!(v, XDP_TX, "{}", dump(&n.dp));
        assert_eq!(out, routed_to_node2(&tcp(client, backend, 0x10, b"hello")));
        // The same flow through tc (XDP detached, or a packet XDP left to
        // tc) finds XDP's state: DNAT, no option, no SNAT.
        let (v, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &ack);
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(ihl(&out), 20);
        assert_eq!(
            (view(&out).src, view(&out).dst),
            (ip(CLIENT), ip(REMOTE_BE))
        );
        let (_, egress) = run_on(&mut n.dp, names::PROG_TO_NET, up0, &out);
        assert_eq!(egress, out, "rt_to_net leaves a DSR flow alone");
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1);

        // UDP to the node address: tc starts the flow (the socket table
        // decides first), XDP carries the next datagrams, each with the
        // option; a zero UDP checksum stays zero.
        for (i, zero) in [(0u64, false), (1, true)] {
            let client = (ip(CLIENT), 41000 + i as u16);
            let first = udp(client, (ip(NODE), UDP_PORT), b"query", zero);
            let (v, out) = xdp(&mut n.dp, up0, &first);
            assert_eq!((v, out.as_slice()), (XDP_PASS, first.as_slice()));
            let (v, _) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &first);
            assert_eq!(v, TC_ACT_REDIRECT, "{}", dump(&n.dp));
            let next = udp(client, (ip(NODE), UDP_PORT), b"again", zero);
            let (v, out) = xdp(&mut n.dp, up0, &next);
            assert_eq!(v, XDP_TX, "{}", dump(&n.dp));
            let want = routed_to_node2(&with_option(
                &udp(client, (ip(REMOTE_BE), 5353), b"again", zero),
                option((ip(NODE), UDP_PORT)),
            ));
            assert_eq!(out, want, "zero checksum: {zero}");
            assert_checksums(&out);
        }
        // The SYN, tc's two first datagrams, XDP's two next ones.
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 5);
        assert_eq!(stat(&n.dp, stats::XDP_TX), 4);
        assert_eq!(stat(&n.dp, stats::SNAT), 0, "{}", dump(&n.dp));
    });
}

#[test]
fn xdp_entry_node_falls_back_per_flow_as_tc_does() {
    if !privileged("to load eBPF programs and create a namespace") {
        return;
    }
    with_entry_node(|n, up0| {
        let _link = attach_xdp(n);
        // A SYN of 1493 bytes (data on the SYN) does not fit up0's MTU of
        // 1500 with the option: source NAT, from XDP.
        let big = tcp((ip(CLIENT), 42000), (ip(NODE), TCP_PORT), 0x02, &[7; 1453]);
        assert_eq!(big.len() - 14, 1493);
        let (v, out) = xdp(&mut n.dp, up0, &big);
        assert_eq!(v, XDP_TX, "{}", dump(&n.dp));
        assert_eq!(ihl(&out), 20, "no option");
        let seen = view(&out);
        assert_eq!(
            seen.src,
            ip(NODE),
            "the fallback is source NAT\n{}",
            dump(&n.dp)
        );
        assert_eq!((seen.dst, seen.dport), (ip(REMOTE_BE), 8080));
        assert_checksums(&out);
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_MTU), 1);
        assert_eq!(how(n, |k| k.sport_be == 42000u16.to_be()), CT_F_SNAT);
        // One byte less fits: the option, from XDP.
        let fits = tcp((ip(CLIENT), 42001), (ip(NODE), TCP_PORT), 0x02, &[7; 1452]);
        let (v, out) = xdp(&mut n.dp, up0, &fits);
        assert_eq!(v, XDP_TX);
        assert_eq!((ihl(&out), out.len() - 14), (28, 1500));
        assert_checksums(&out);

        // Left to tc untouched, which decides and counts: a backend
        // behind another device (a tunnel), a local backend, a packet
        // that already has IP options.
        let to_tc = stat(&n.dp, stats::XDP_TO_TC);
        let tunnel = syn((ip(CLIENT), 43000), (ip(NODE), TUNNEL_PORT));
        let mut other = option((ip(NODE), TCP_PORT));
        other[0] = 0x9b;
        let with_opts = with_option(&syn((ip(CLIENT), 43001), (ip(NODE), TCP_PORT)), other);
        let local = syn((ip(CLIENT), 43002), (ip(NODE), LOCAL_PORT));
        for f in [&tunnel, &with_opts, &local] {
            let (v, out) = xdp(&mut n.dp, up0, f);
            assert_eq!((v, out.as_slice()), (XDP_PASS, f.as_slice()), "{}", dump(&n.dp));
        }
        assert_eq!(
            stat(&n.dp, stats::XDP_TO_TC),
            to_tc + 2,
            "the frontends (options pass unparsed)"
        );
        assert_eq!(
            stat(&n.dp, stats::DSR_FALLBACK_ROUTE),
            0,
            "tc counts, not XDP"
        );
        let (_, out) = run_on(&mut n.dp, names::PROG_FROM_NET, up0, &tunnel);
        assert_eq!((ihl(&out), view(&out).dst), (20, ip(TUNNEL_BE)));
        assert_eq!(stat(&n.dp, stats::DSR_FALLBACK_ROUTE), 1);

        // A service in SNAT mode never gets the option.
        let (v, out) = xdp(
            &mut n.dp,
            up0,
            &syn((ip(CLIENT), 44000), (ip(NODE), SNAT_PORT)),
        );
        assert_eq!(v, XDP_TX);
        assert_eq!((ihl(&out), view(&out).src), (20, ip(NODE)));
        assert_eq!(stat(&n.dp, stats::DSR_OPT_SET), 1, "only the SYN that fit");
    });
}
