//! Netns test (needs root): NodePort traffic from outside to a pod on
//! another node is forwarded by `rt_xdp_net` with `XDP_TX` over veth
//! uplinks, both ways, and delivered. The wiring is `pps_bench`'s
//! (`examples/pps_bench/topo.rs`: outside client, node 1, node 2 on a
//! bridge, the pod behind node 2); node 1 runs riptide's uplink programs
//! with `rt_xdp_net` attached natively, as the agent's `xdp: native` does,
//! and the bridge side of node 1's veth runs an `XDP_PASS` program: a veth
//! takes `XDP_TX` frames only then (GRO on the peer is not enough, see
//! `topo.rs`), and the sockets' namespaces send full checksums (with
//! CHECKSUM_PARTIAL packets every datagram XDP forwarded arrived with a bad
//! checksum, `Topo::full_checksums`). Real sockets at both ends: a UDP echo
//! and a TCP echo in the pod, clients in the outside namespace.
//!
//! With Direct Server Return node 2 runs riptide's uplink programs too
//! (`examples/pps_bench/node2.rs`): node 1's XDP forwards the client's
//! packets with the DSR option, node 2 takes it and delivers into the pod,
//! and the pod's replies leave node 2 straight to the client with node 1's
//! NodePort as source; the pod sees the client's own address.
#![allow(clippy::unwrap_used)]

#[path = "../examples/pps_bench/node1.rs"]
#[allow(dead_code)]
mod node1;
#[path = "../examples/pps_bench/node2.rs"]
#[allow(dead_code)]
mod node2;
#[path = "../examples/pps_bench/topo.rs"]
#[allow(dead_code)]
mod topo;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use riptide_common::stats;
use riptide_datapath::service::{
    Algorithm, Backend, BackendState, Frontend, FrontendKind, LbMode, Protocol, Service,
    TrafficPolicy,
};
use riptide_test_support::{netns, privileged};
use topo::{NODE1_IP, OUTSIDE_IP, POD_IP, Topo};

const UDP_NODEPORT: u16 = 30_000;
const TCP_NODEPORT: u16 = 30_001;
const BACKEND_PORT: u16 = 8080;
const DATAGRAMS: u32 = 200;
const TIMEOUT: Duration = Duration::from_secs(1);

fn nodeport(protocol: Protocol, port: u16, lb_mode: LbMode) -> Service {
    Service {
        name: format!("default/echo:{port}"),
        protocol,
        frontends: vec![Frontend {
            kind: FrontendKind::NodePort,
            addr: Ipv4Addr::UNSPECIFIED,
            port,
        }],
        backends: vec![Backend {
            addr: SocketAddrV4::new(POD_IP, BACKEND_PORT),
            state: BackendState::Active,
            local: false,
        }],
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode,
    }
}

/// UDP and TCP echo servers in the pod on [`BACKEND_PORT`]; the sources
/// they saw come back on the channel.
fn echo_servers(pod: &str) -> mpsc::Receiver<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let udp_tx = tx.clone();
    let udp_ready = ready_tx.clone();
    netns::spawn_in(pod, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        udp_ready.send(()).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = udp_tx.send(from);
            let _ = s.send_to(&buf[..n], from);
        }
    });
    netns::spawn_in(pod, move || {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).unwrap();
        ready_tx.send(()).unwrap();
        if let Ok((mut c, from)) = l.accept() {
            let _ = tx.send(from);
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut buf = [0u8; 1024];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    for _ in 0..2 {
        ready_rx.recv_timeout(TIMEOUT).unwrap();
    }
    rx
}

#[test]
fn netns_xdp_nodeport_to_a_remote_backend_delivers_both_ways() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let t = Topo::new(&format!("rtxnp{}", std::process::id()));
    let _peer = t
        .xdp_pass_on_peer()
        .expect("XDP_PASS on node 1's uplink peer");
    t.full_checksums();
    let n1 = t.node1.name().to_owned();
    let mut rt = netns::run_in(&n1, node1::Riptide::load).unwrap();
    rt.svcs
        .upsert(&nodeport(Protocol::Udp, UDP_NODEPORT, LbMode::Snat))
        .unwrap();
    rt.svcs
        .upsert(&nodeport(Protocol::Tcp, TCP_NODEPORT, LbMode::Snat))
        .unwrap();
    let rt = rt.set(&n1, true, true).unwrap();
    let seen = echo_servers(t.pod.name());

    // UDP: request/response datagrams through the NodePort.
    let udp = udp_echoes(t.outside.name(), UDP_NODEPORT);
    let udp_source = seen.recv_timeout(TIMEOUT).ok();
    let after_udp = rt.dp.stats().unwrap();
    let counters = t.counters();
    assert_eq!(
        udp,
        DATAGRAMS,
        "UDP echoes through NodePort {UDP_NODEPORT} (XDP_TX {}, xdp_to_tc {})\n{counters}",
        after_udp.get(stats::XDP_TX),
        after_udp.get(stats::XDP_TO_TC)
    );
    // The first datagram is tc's (the socket table decides whether a host
    // socket owns a new UDP flow to a node address); every later one and
    // every reply is XDP's.
    assert!(
        after_udp.get(stats::XDP_TX) >= u64::from(2 * (DATAGRAMS - 1)),
        "XDP_TX {} for {DATAGRAMS} datagrams and their replies",
        after_udp.get(stats::XDP_TX)
    );
    assert_eq!(
        udp_source.map(|s| s.ip()),
        Some(NODE1_IP.into()),
        "the backend sees node 1's address (SNAT)"
    );

    // TCP: a connection (its SYN and everything after through XDP) that
    // echoes.
    let tcp = tcp_echoes(t.outside.name(), TCP_NODEPORT);
    let after_tcp = rt.dp.stats().unwrap();
    assert_eq!(
        tcp.as_ref().map(Vec::len).ok(),
        Some(600 * 20),
        "TCP echo through NodePort {TCP_NODEPORT}: {tcp:?}\n{}",
        t.counters()
    );
    assert_eq!(
        seen.recv_timeout(TIMEOUT).ok().map(|s| s.ip()),
        Some(NODE1_IP.into()),
        "the TCP backend sees node 1's address"
    );
    // At least the SYN, SYN-ACK and 20 requests and 20 replies.
    let tcp_xdp = after_tcp.get(stats::XDP_TX) - after_udp.get(stats::XDP_TX);
    assert!(tcp_xdp >= 42, "XDP_TX {tcp_xdp} for the TCP connection");
    drop(rt.set(&n1, false, false).unwrap());
}

/// `DATAGRAMS` request/response datagrams from the outside namespace to
/// node 1's `port` (a connected socket: it takes answers from that
/// address and port only); how many came back.
fn udp_echoes(outside: &str, port: u16) -> u32 {
    netns::run_in(outside, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        s.connect((NODE1_IP, port)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let (mut echoed, mut lost) = (0, 0);
        for i in 0..DATAGRAMS {
            let msg = format!("datagram {i}");
            s.send(msg.as_bytes()).unwrap();
            let mut buf = [0u8; 64];
            match s.recv(&mut buf) {
                Ok(n) if &buf[..n] == msg.as_bytes() => echoed += 1,
                _ => lost += 1,
            }
            // A broken path fails in seconds, not DATAGRAMS timeouts.
            if lost >= 3 {
                break;
            }
        }
        echoed
    })
}

/// One TCP connection from the outside namespace to node 1's `port`, 20
/// requests of 600 bytes; what came back.
fn tcp_echoes(outside: &str, port: u16) -> std::io::Result<Vec<u8>> {
    netns::run_in(outside, move || -> std::io::Result<Vec<u8>> {
        let mut c = TcpStream::connect_timeout(&(NODE1_IP, port).into(), TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT))?;
        let msg = vec![b'x'; 600];
        let mut got = Vec::new();
        for _ in 0..20 {
            c.write_all(&msg)?;
            let mut buf = vec![0u8; msg.len()];
            c.read_exact(&mut buf)?;
            got.extend_from_slice(&buf);
        }
        Ok(got)
    })
}

#[test]
fn netns_xdp_dsr_nodeport_keeps_the_client_address_and_replies_bypass_node1() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let t = Topo::new(&format!("rtxds{}", std::process::id()));
    let _peer = t
        .xdp_pass_on_peer()
        .expect("XDP_PASS on node 1's uplink peer");
    t.full_checksums();
    let (n1, n2) = (t.node1.name().to_owned(), t.node2.name().to_owned());
    let mut rt = netns::run_in(&n1, node1::Riptide::load).unwrap();
    rt.svcs
        .upsert(&nodeport(Protocol::Udp, UDP_NODEPORT, LbMode::Dsr))
        .unwrap();
    rt.svcs
        .upsert(&nodeport(Protocol::Tcp, TCP_NODEPORT, LbMode::Dsr))
        .unwrap();
    let rt = rt.set(&n1, true, true).unwrap();
    let rt2 = node2::Riptide::load(&n2).unwrap().set(&n2, true).unwrap();
    let seen = echo_servers(t.pod.name());
    let report = |what: &str| {
        let named = |dp: &riptide_datapath::Datapath| {
            dp.stats()
                .unwrap()
                .named()
                .filter(|(_, v)| *v > 0)
                .collect::<Vec<_>>()
        };
        format!(
            "{what}\nnode 1: {:?}\nnode 2: {:?}\n{}",
            named(&rt.dp),
            named(&rt2.dp),
            t.counters()
        )
    };

    // UDP: the connected client socket takes only answers from node 1's
    // NodePort, which node 2 sends.
    let echoed = udp_echoes(t.outside.name(), UDP_NODEPORT);
    let (s1, s2) = (rt.dp.stats().unwrap(), rt2.dp.stats().unwrap());
    assert_eq!(
        echoed,
        DATAGRAMS,
        "{}",
        report("UDP echoes through the DSR NodePort")
    );
    assert_eq!(
        seen.recv_timeout(TIMEOUT).ok().map(|s| s.ip()),
        Some(OUTSIDE_IP.into()),
        "the backend sees the client's address"
    );
    // Every datagram carried the option (the first from tc, which asks
    // the socket table about a new flow to a node address; the rest
    // from XDP); node 2 took each and answered from the frontend; no
    // answer crossed node 1.
    let d = u64::from(DATAGRAMS);
    assert!(s1.get(stats::DSR_OPT_SET) >= d, "{}", report("options"));
    assert!(s1.get(stats::XDP_TX) >= d - 1, "{}", report("XDP_TX"));
    assert!(s2.get(stats::DSR_OPT_RECV) >= d, "{}", report("taken"));
    assert!(s2.get(stats::DSR_REVNAT) >= d, "{}", report("answers"));
    assert_eq!(
        (
            s1.get(stats::REVNAT),
            s1.get(stats::UNSNAT),
            s1.get(stats::SNAT)
        ),
        (0, 0, 0),
        "{}",
        report("nothing went back through node 1")
    );

    // TCP: the SYN with the option, every later segment DNATed at XDP.
    let tcp = tcp_echoes(t.outside.name(), TCP_NODEPORT);
    let (t1, t2) = (rt.dp.stats().unwrap(), rt2.dp.stats().unwrap());
    assert_eq!(
        tcp.as_ref().map(Vec::len).ok(),
        Some(600 * 20),
        "{}",
        report(&format!("TCP echo through the DSR NodePort: {tcp:?}"))
    );
    assert_eq!(
        seen.recv_timeout(TIMEOUT).ok().map(|s| s.ip()),
        Some(OUTSIDE_IP.into()),
        "the TCP backend sees the client's address"
    );
    let sent = t1.get(stats::XDP_TX) - s1.get(stats::XDP_TX);
    assert!(
        sent >= 21,
        "{}",
        report(&format!("XDP_TX {sent} for the SYN and 20 requests"))
    );
    assert_eq!(
        t1.get(stats::DSR_OPT_SET) - s1.get(stats::DSR_OPT_SET),
        1,
        "the SYN only"
    );
    assert!(
        t2.get(stats::DSR_REVNAT) - s2.get(stats::DSR_REVNAT) >= 21,
        "{}",
        report("the SYN-ACK and 20 replies from node 2")
    );
    assert_eq!(
        (
            t1.get(stats::REVNAT),
            t1.get(stats::UNSNAT),
            t1.get(stats::SNAT)
        ),
        (0, 0, 0),
        "{}",
        report("no reply through node 1")
    );
    eprintln!(
        "node 1: xdp_tx {} dsr_opt_set {} xdp_to_tc {}; node 2: dsr_opt_recv {} dsr_revnat {}",
        t1.get(stats::XDP_TX),
        t1.get(stats::DSR_OPT_SET),
        t1.get(stats::XDP_TO_TC),
        t2.get(stats::DSR_OPT_RECV),
        t2.get(stats::DSR_REVNAT)
    );
    drop(rt2.set(&n2, false).unwrap());
    drop(rt.set(&n1, false, false).unwrap());
}
