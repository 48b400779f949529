//! Netns test (needs root): two nodes with masquerade on, pods on each,
//! real sockets. Node → remote pod TCP and UDP work (the pod's replies are
//! not masqueraded), and every pod/node combination Kubernetes expects to
//! work does: pod → other node (masqueraded), pod → own node, node → local
//! pod (node source address kept), pod → remote pod (pod address kept).
//!
//! Topology, all inside namespaces this test creates (named with the pid):
//!
//! ```text
//!  p1 (10.42.1.10) ─veth─ n1 (198.18.0.11) ══eth0══ n2 (198.18.0.12) ─veth─ p2 (10.42.2.10)
//! ```
//!
//! Each node runs its own datapath instance: `rt_from_net`/`rt_to_net` on
//! `eth0`, `rt_from_pod` on the pod's host veth, the pod in `rt_ep4_v1`,
//! the other node's pod CIDR in `rt_node4_v1` and a kernel route to it, as
//! the agent and the CNI set them up.
//!
//! The NodePort fast-path test puts both `eth0`s and an outside client on a
//! bridge instead (`lab_outside`): client, node 1 and node 2 on one
//! segment, so node 1 sends NodePort traffic for node 2's pod back out the
//! uplink it came in on. The same lab checks that a connection node 1
//! itself opens from a NodePort-numbered local port is left to the kernel.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use common::ip;
use riptide_common::{CFG_F_MASQUERADE, Config, EndpointValue, stats};
use riptide_datapath::{
    Attachment, Datapath, Pinning,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, Services,
        TrafficPolicy,
    },
};
use riptide_test_support::{
    netns::{Netns, spawn_in},
    privileged, run,
};

const TIMEOUT: Duration = Duration::from_secs(3);

struct NodeDp {
    svcs: Services,
    dp: Datapath,
    _uplink: Attachment,
}

/// One node: namespace `node` with `eth0` at `node_ip`, one pod `pod` at
/// `10.42.<idx>.10` behind host veth `vp<idx>`, the datapath attached.
fn setup_node(
    node: &str,
    pod: &str,
    idx: u8,
    node_ip: Ipv4Addr,
    peer: (Ipv4Addr, Ipv4Addr),
) -> NodeDp {
    let pod_ip = Ipv4Addr::new(10, 42, idx, 10);
    let host_if = format!("vp{idx}");
    let host_mac = [0x0e, 0xee, 0, 0, idx, 10];
    let pod_mac = [0x0a, 0x58, 10, 42, idx, 10];
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let n = |args: &[&str]| {
        let mut v = vec!["ip", "-n", node];
        v.extend_from_slice(args);
        run(&v);
    };
    let p = |args: &[&str]| {
        let mut v = vec!["ip", "-n", pod];
        v.extend_from_slice(args);
        run(&v);
    };
    n(&["link", "set", "lo", "up"]);
    n(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"]);
    n(&["link", "set", "eth0", "up"]);
    run(&[
        "ip",
        "netns",
        "exec",
        node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    // The pod, wired like the CNI does: /32, default route via a link-local
    // gateway answered by a permanent neighbour entry, /32 route on the node.
    n(&[
        "link",
        "add",
        &host_if,
        "address",
        &mac(host_mac),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod,
    ]);
    p(&["link", "set", "eth0", "address", &mac(pod_mac)]);
    p(&["link", "set", "lo", "up"]);
    p(&["link", "set", "eth0", "up"]);
    p(&["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"]);
    p(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &mac(host_mac),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    p(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    n(&["link", "set", &host_if, "up"]);
    n(&[
        "route",
        "add",
        &format!("{pod_ip}/32"),
        "dev",
        &host_if,
        "scope",
        "link",
    ]);
    // The other node's pod CIDR, as the agent routes it.
    let (peer_cidr, peer_node) = peer;
    n(&[
        "route",
        "add",
        &format!("{peer_cidr}/24"),
        "via",
        &peer_node.to_string(),
    ]);

    spawn_in(node, move || {
        let mut dp = Datapath::load(&Pinning::None).expect("load datapath");
        dp.set_config(&node_config(node_ip, 32768, 60999)).unwrap();
        dp.upsert_node(peer_cidr, 24, peer_node).unwrap();
        let c_if = std::ffi::CString::new(host_if.clone()).unwrap();
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c_if.as_ptr()) };
        assert_ne!(ifindex, 0, "{host_if} exists");
        dp.endpoints()
            .unwrap()
            .upsert(
                pod_ip,
                EndpointValue {
                    ifindex,
                    flags: 0,
                    mac: pod_mac,
                    node_mac: host_mac,
                },
            )
            .unwrap();
        common::attach_from_pod(&mut dp, &host_if);
        let uplink = dp.attach_uplink("eth0").expect("attach uplink");
        let svcs = dp.services().unwrap();
        NodeDp {
            svcs,
            dp,
            _uplink: uplink,
        }
    })
    .join()
    .unwrap()
}

/// A node's configuration as the agent writes it, with SNAT ports
/// `min..=max`.
fn node_config(node_ip: Ipv4Addr, snat_port_min: u16, snat_port_max: u16) -> Config {
    Config {
        node_ip_be: u32::from(node_ip).to_be(),
        hairpin_ip_be: u32::from(Ipv4Addr::new(169, 254, 42, 1)).to_be(),
        cluster_cidr_be: u32::from(Ipv4Addr::new(10, 42, 0, 0)).to_be(),
        cluster_cidr_len: 16,
        nomasq_cidr_be: u32::from(node_ip).to_be(),
        nomasq_cidr_len: 32,
        flags: CFG_F_MASQUERADE,
        snat_port_min,
        snat_port_max,
        ..Default::default()
    }
}

/// A TCP server in `ns` on `addr` that answers every connection with the
/// peer address it sees. Returns once it listens; the thread ends with the
/// process.
fn peer_echo_tcp(ns: &str, addr: SocketAddrV4) {
    let (tx, rx) = mpsc::channel();
    spawn_in(ns, move || {
        let l = TcpListener::bind(addr).expect("bind");
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            // A line with the peer, then 64 KiB so segments with payload
            // (GSO/TSO-sized on veth) cross the translations too.
            let mut reply = format!("{peer}\n").into_bytes();
            reply.extend(std::iter::repeat_n(b'x', 64 * 1024));
            let _ = s.write_all(&reply);
        }
    });
    rx.recv_timeout(TIMEOUT).expect("server listening");
}

fn peer_echo_udp(ns: &str, addr: SocketAddrV4) {
    let (tx, rx) = mpsc::channel();
    spawn_in(ns, move || {
        let s = UdpSocket::bind(addr).expect("bind");
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = s.recv_from(&mut buf) {
            let _ = s.send_to(peer.to_string().as_bytes(), peer);
        }
    });
    rx.recv_timeout(TIMEOUT).expect("server listening");
}

/// Connects from `ns` to `to`; returns (our local address, the peer address
/// the server saw).
fn tcp_from(ns: &str, to: SocketAddrV4) -> Result<(SocketAddr, String), String> {
    spawn_in(ns, move || {
        let mut s = TcpStream::connect_timeout(&to.into(), TIMEOUT)
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let local = s.local_addr().unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all)
            .map_err(|e| format!("read from {to}: {e}"))?;
        let (seen, rest) = all.split_once('\n').unwrap_or((&all, ""));
        if rest.len() != 64 * 1024 || rest.bytes().any(|b| b != b'x') {
            return Err(format!("{to}: payload damaged ({} bytes)", rest.len()));
        }
        Ok((local, seen.to_owned()))
    })
    .join()
    .unwrap()
}

/// Sends a datagram from `ns` to `to`; returns (our local address, the
/// address the answer came from, the peer address the server saw).
fn udp_from(ns: &str, to: SocketAddrV4) -> Result<(SocketAddr, SocketAddr, String), String> {
    spawn_in(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.send_to(b"who am i", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let (n, from) = s
            .recv_from(&mut buf)
            .map_err(|e| format!("no answer from {to}: {e}"))?;
        // The local address is only known per route; ask the kernel.
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.connect(to).unwrap();
        let mut local = probe.local_addr().unwrap();
        local.set_port(s.local_addr().unwrap().port());
        Ok((local, from, String::from_utf8_lossy(&buf[..n]).into_owned()))
    })
    .join()
    .unwrap()
}

/// `ethtool -K <ifname> tx <on>` (the ethtool binary is not a dependency):
/// the legacy ETHTOOL_STXCSUM ioctl, still mapped onto the feature flags.
fn set_tx_csum(ifname: &str, on: bool) {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: SIOCETHTOOL with an ifreq pointing at a live ethtool_value.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    assert_eq!(rc, 0, "ETHTOOL_STXCSUM on {ifname}: {err}");
}

/// Two nodes with one pod each (see the module docs); everything is
/// removed on drop.
struct Lab {
    node1: NodeDp,
    node2: NodeDp,
    n1: String,
    n2: String,
    p1: String,
    p2: String,
    /// With [`lab_outside`]: the outside client's namespace.
    c: String,
    _namespaces: Vec<Netns>,
}

fn lab(tag: &str) -> Lab {
    lab_with(tag, false)
}

/// [`lab`] with the nodes' `eth0` on a bridge (in namespace `…sw`) instead
/// of one veth pair, and an outside client `…c` at [`OUTSIDE`] on the same
/// bridge: the segment a NodePort's client, node 1 and node 2 share.
fn lab_outside(tag: &str) -> Lab {
    lab_with(tag, true)
}

fn lab_with(tag: &str, outside: bool) -> Lab {
    let id = std::process::id();
    let mut roles = vec!["n1", "n2", "p1", "p2"];
    if outside {
        roles.extend(["sw", "c"]);
    }
    let names: Vec<String> = roles.iter().map(|s| format!("rt{tag}{id}{s}")).collect();
    let namespaces: Vec<Netns> = names.iter().map(|n| Netns::new(n.clone())).collect();
    let (n1, n2, p1, p2) = (&names[0], &names[1], &names[2], &names[3]);
    let mut c = String::new();
    if outside {
        let (sw, cl) = (&names[4], &names[5]);
        run(&["ip", "-n", sw, "link", "add", "br0", "type", "bridge"]);
        run(&["ip", "-n", sw, "link", "set", "br0", "up"]);
        for (port, ns) in [("s1", n1), ("s2", n2), ("s3", cl)] {
            run(&[
                "ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            run(&["ip", "-n", sw, "link", "set", port, "master", "br0", "up"]);
        }
        run(&[
            "ip",
            "-n",
            cl,
            "addr",
            "add",
            &format!("{OUTSIDE}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", cl, "link", "set", "eth0", "up"]);
        c.clone_from(cl);
    } else {
        run(&[
            "ip", "-n", n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            n2,
        ]);
    }
    let (n1_ip, n2_ip) = (ip(N1), ip(N2));
    let node1 = setup_node(n1, p1, 1, n1_ip, (ip("10.42.2.0"), n2_ip));
    let node2 = setup_node(n2, p2, 2, n2_ip, (ip("10.42.1.0"), n1_ip));
    // Without TX checksum offload on the underlay, a pod's CHECKSUM_PARTIAL
    // packet leaving a node gets its checksum computed from what our
    // programs left in the field, and the receiver verifies it in software.
    // With offload on, veth would carry the packet as CHECKSUM_PARTIAL end
    // to end and nothing would ever check it.
    for n in [n1, n2] {
        let n = n.clone();
        spawn_in(&n, || set_tx_csum("eth0", false)).join().unwrap();
    }
    Lab {
        node1,
        node2,
        n1: n1.clone(),
        n2: n2.clone(),
        p1: p1.clone(),
        p2: p2.clone(),
        c,
        _namespaces: namespaces,
    }
}

/// Name, protocol, frontend, the one backend, and whether it runs on node 2.
type OneBackend<'a> = (
    &'a str,
    Protocol,
    (FrontendKind, Ipv4Addr, u16),
    SocketAddrV4,
    bool,
);

impl Lab {
    /// Installs each one-backend service on both nodes as each node's agent
    /// would write it: the backend is local on node 2 when the flag holds,
    /// on node 1 otherwise.
    fn upsert_on_both(&mut self, services: &[OneBackend]) {
        for (node, is_node2) in [(&mut self.node1, false), (&mut self.node2, true)] {
            for &(name, protocol, frontend, backend, on_node2) in services {
                node.svcs
                    .upsert(&service(
                        name,
                        protocol,
                        frontend,
                        backend,
                        on_node2 == is_node2,
                    ))
                    .unwrap();
            }
        }
    }

    /// Both nodes' non-zero counters, flows and NAT entries, for failure
    /// messages.
    fn state(&self) -> String {
        [("n1", &self.node1), ("n2", &self.node2)]
            .iter()
            .map(|(name, n)| {
                format!(
                    "{name} stats {:?}\n{name} conntrack {:?}\n{name} nat {:?}\n",
                    stats_of(n),
                    n.dp.conntrack().unwrap(),
                    n.dp.nat().unwrap(),
                )
            })
            .collect()
    }
}

const N1: &str = "198.18.0.11";
const N2: &str = "198.18.0.12";
const OUTSIDE: &str = "198.18.0.100";

fn stats_of(n: &NodeDp) -> Vec<(&'static str, u64)> {
    n.dp.stats()
        .unwrap()
        .named()
        .filter(|(_, v)| *v > 0)
        .collect()
}

#[test]
fn netns_masquerade_node_to_remote_pod_and_pod_node_combinations_work() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let lab = lab("mq");
    let node2 = &lab.node2;
    let (n1, n2, p1, p2) = (&lab.n1, &lab.n2, &lab.p1, &lab.p2);
    let (n1_ip, n2_ip) = (ip(N1), ip(N2));
    let (p1_ip, p2_ip) = (ip("10.42.1.10"), ip("10.42.2.10"));

    peer_echo_tcp(p2, SocketAddrV4::new(p2_ip, 8080));
    peer_echo_udp(p2, SocketAddrV4::new(p2_ip, 5353));
    peer_echo_tcp(n1, SocketAddrV4::new(n1_ip, 9090));
    peer_echo_tcp(n2, SocketAddrV4::new(n2_ip, 9091));

    let ctx = || lab.state();

    // Node → remote pod (the lab regression): works, and the pod sees the
    // node's own address.
    let (local, seen) = tcp_from(n1, SocketAddrV4::new(p2_ip, 8080))
        .unwrap_or_else(|e| panic!("node → remote pod TCP: {e}\n{}", ctx()));
    assert_eq!(
        seen,
        local.to_string(),
        "pod sees the node's address\n{}",
        ctx()
    );
    assert_eq!(local.ip(), n1_ip);
    let (local, from, seen) = udp_from(n1, SocketAddrV4::new(p2_ip, 5353))
        .unwrap_or_else(|e| panic!("node → remote pod UDP: {e}\n{}", ctx()));
    assert_eq!(
        from,
        SocketAddr::from((p2_ip, 5353)),
        "answer from the pod address\n{}",
        ctx()
    );
    assert_eq!(seen, local.to_string());
    assert_eq!(node2.dp.stats().unwrap().get(stats::SNAT), 0, "{}", ctx());

    // Pod → other node: masqueraded to its node's address, and it works.
    let (_, seen) = tcp_from(p2, SocketAddrV4::new(n1_ip, 9090))
        .unwrap_or_else(|e| panic!("pod → other node: {e}\n{}", ctx()));
    assert!(
        seen.starts_with(&format!("{n2_ip}:")),
        "masqueraded: {seen}\n{}",
        ctx()
    );
    assert!(node2.dp.stats().unwrap().get(stats::SNAT) > 0);

    // Pod → its own node: works (local delivery, not masqueraded).
    let (_, seen) = tcp_from(p2, SocketAddrV4::new(n2_ip, 9091))
        .unwrap_or_else(|e| panic!("pod → own node: {e}\n{}", ctx()));
    assert!(seen.starts_with(&format!("{p2_ip}:")), "{seen}");

    // Node → local pod: the pod sees the node's source address.
    let (local, seen) = tcp_from(n2, SocketAddrV4::new(p2_ip, 8080))
        .unwrap_or_else(|e| panic!("node → local pod: {e}\n{}", ctx()));
    assert_eq!(seen, local.to_string(), "{}", ctx());

    // Pod → remote pod: the pod address is kept end to end.
    let (local, seen) = tcp_from(p1, SocketAddrV4::new(p2_ip, 8080))
        .unwrap_or_else(|e| panic!("pod → remote pod: {e}\n{}", ctx()));
    assert_eq!(local.ip(), p1_ip);
    assert_eq!(seen, local.to_string(), "{}", ctx());
}

/// A service `name` with one frontend and one backend, as the agent of the
/// node where `backend_local` holds would write it.
fn service(
    name: &str,
    protocol: Protocol,
    frontend: (FrontendKind, Ipv4Addr, u16),
    backend: SocketAddrV4,
    backend_local: bool,
) -> Service {
    Service {
        name: name.into(),
        protocol,
        frontends: vec![Frontend {
            kind: frontend.0,
            addr: frontend.1,
            port: frontend.2,
        }],
        backends: vec![Backend {
            addr: SocketAddrV4::new(*backend.ip(), backend.port()),
            state: BackendState::Active,
            local: backend_local,
        }],
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

/// The per-packet LB (no socket LB attached) on real packets from real
/// sockets: the pods' TCP/UDP come with CHECKSUM_PARTIAL over veth, so the
/// checksum updates meet the offload state the BPF_PROG_TEST_RUN tests
/// cannot create, and a 64 KiB answer crosses the reverse translations.
#[test]
fn netns_per_packet_lb_clusterip_hairpin_and_nodeport_with_real_packets() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut lab = lab("lb");
    let (n1_ip, n2_ip) = (ip(N1), ip(N2));
    let (p1_ip, p2_ip) = (ip("10.42.1.10"), ip("10.42.2.10"));
    let vip = ip("10.43.0.10");
    let web = SocketAddrV4::new(p2_ip, 8080);
    let dns = SocketAddrV4::new(p2_ip, 5353);
    let on_p1 = SocketAddrV4::new(p1_ip, 9999);
    let none = Ipv4Addr::UNSPECIFIED;
    lab.upsert_on_both(&[
        (
            "default/web:http",
            Protocol::Tcp,
            (FrontendKind::ClusterIp, vip, 80),
            web,
            true,
        ),
        (
            "default/dns:udp",
            Protocol::Udp,
            (FrontendKind::ClusterIp, vip, 53),
            dns,
            true,
        ),
        (
            "default/web-np:http",
            Protocol::Tcp,
            (FrontendKind::NodePort, none, 30080),
            web,
            true,
        ),
        (
            "default/p1-np:http",
            Protocol::Tcp,
            (FrontendKind::NodePort, none, 30081),
            on_p1,
            false,
        ),
    ]);
    let (n1, n2, p1, p2) = (&lab.n1, &lab.n2, &lab.p1, &lab.p2);
    peer_echo_tcp(p2, web);
    peer_echo_udp(p2, dns);
    peer_echo_tcp(p1, on_p1);
    let ctx = || lab.state();

    // ClusterIP from a pod to a backend on the other node: the backend
    // sees the client pod; the client's socket got its answer from the VIP
    // (or the connect would have been reset).
    let (local, seen) = tcp_from(p1, SocketAddrV4::new(vip, 80))
        .unwrap_or_else(|e| panic!("pod → ClusterIP (remote backend): {e}\n{}", ctx()));
    assert_eq!(seen, local.to_string(), "client address kept\n{}", ctx());
    let (local, from, seen) = udp_from(p1, SocketAddrV4::new(vip, 53))
        .unwrap_or_else(|e| panic!("pod → ClusterIP UDP: {e}\n{}", ctx()));
    assert_eq!(
        from,
        SocketAddr::from((vip, 53)),
        "answer from the VIP\n{}",
        ctx()
    );
    assert_eq!(seen, local.to_string());

    // Hairpin: the backend pod reaches its own service.
    let (_, seen) = tcp_from(p2, SocketAddrV4::new(vip, 80))
        .unwrap_or_else(|e| panic!("hairpin: {e}\n{}", ctx()));
    assert!(
        seen.starts_with("169.254.42.1:"),
        "hairpin source: {seen}\n{}",
        ctx()
    );

    // NodePort from another node to a local backend: client address kept.
    let (local, seen) = tcp_from(n1, SocketAddrV4::new(n2_ip, 30080))
        .unwrap_or_else(|e| panic!("NodePort, local backend: {e}\n{}", ctx()));
    assert_eq!(seen, local.to_string(), "{}", ctx());

    // NodePort to a backend on the client's own node: DNAT + SNAT on n2,
    // the backend (behind n1's masquerade) answers n2, n2 restores it.
    let (_, seen) = tcp_from(n1, SocketAddrV4::new(n2_ip, 30081))
        .unwrap_or_else(|e| panic!("NodePort, remote backend: {e}\n{}", ctx()));
    assert!(
        seen.starts_with(&format!("{n2_ip}:")),
        "SNAT to n2: {seen}\n{}",
        ctx()
    );
    let _ = (n1_ip, n2);
}

/// NodePort from an outside client to a backend on another node, all three
/// on one segment: node 1 DNATs on its uplink's ingress and, instead of
/// handing the packet to the kernel's forwarding path, sends it straight
/// back out the uplink (`bpf_fib_lookup` + `bpf_redirect`); its egress
/// program still runs on the redirected packet and SNATs it to node 1's
/// address (the backend sees node 1, or its replies would never come back).
/// The replies, un-SNATed on ingress, leave the same way and get the
/// NodePort restored as source. The first SYN, before node 1 has a
/// neighbour entry for node 2, takes the kernel's path, which resolves it.
#[test]
fn netns_nodeport_to_remote_backend_is_forwarded_by_fib_redirect() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut lab = lab_outside("fib");
    let n1_ip = ip(N1);
    let p2_ip = ip("10.42.2.10");
    let web = SocketAddrV4::new(p2_ip, 8080);
    let dns = SocketAddrV4::new(p2_ip, 5353);
    let none = Ipv4Addr::UNSPECIFIED;
    lab.upsert_on_both(&[
        (
            "default/web-np:http",
            Protocol::Tcp,
            (FrontendKind::NodePort, none, 30080),
            web,
            true,
        ),
        (
            "default/dns-np:udp",
            Protocol::Udp,
            (FrontendKind::NodePort, none, 30053),
            dns,
            true,
        ),
    ]);
    let (n1, c, p2) = (&lab.n1, &lab.c, &lab.p2);
    peer_echo_tcp(p2, web);
    peer_echo_udp(p2, dns);
    let neigh = |ns: &str| {
        let out = Command::new("ip")
            .args(["-n", ns, "neigh", "show"])
            .output()
            .expect("spawn ip");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ctx = || format!("{}n1 neighbours:\n{}", lab.state(), neigh(n1));
    let fib = |n: &NodeDp| {
        let s = n.dp.stats().unwrap();
        (s.get(stats::FIB_REDIRECT), s.get(stats::FIB_FALLBACK))
    };

    // Node 1 starts without neighbour entries on its uplink.
    run(&["ip", "-n", n1, "neigh", "flush", "dev", "eth0"]);
    let (local, seen) = tcp_from(c, SocketAddrV4::new(n1_ip, 30080))
        .unwrap_or_else(|e| panic!("outside → NodePort, remote backend: {e}\n{}", ctx()));
    assert_eq!(local.ip(), ip(OUTSIDE));
    assert!(
        seen.starts_with(&format!("{n1_ip}:")),
        "the backend sees node 1's address (SNAT on egress after the redirect): {seen}\n{}",
        ctx()
    );
    let (redirected, fell_back) = fib(&lab.node1);
    assert!(
        fell_back >= 1,
        "the first SYN found no neighbour entry for node 2\n{}",
        ctx()
    );
    // SYN-ACK, data and FIN from the backend, ACKs and FIN from the client.
    assert!(
        redirected >= 4,
        "packets of the flow were redirected ({redirected})\n{}",
        ctx()
    );

    // One datagram each way, both neighbours resolved now: exactly two
    // redirects (the request after DNAT, the answer after un-SNAT), and
    // the answer comes from the NodePort (reverse DNAT on egress).
    let before = fib(&lab.node1);
    let (local, from, seen) = udp_from(c, SocketAddrV4::new(n1_ip, 30053))
        .unwrap_or_else(|e| panic!("outside → UDP NodePort, remote backend: {e}\n{}", ctx()));
    assert_eq!(local.ip(), ip(OUTSIDE));
    assert_eq!(
        from,
        SocketAddr::from((n1_ip, 30053)),
        "answer from the NodePort\n{}",
        ctx()
    );
    assert!(seen.starts_with(&format!("{n1_ip}:")), "{seen}\n{}", ctx());
    assert_eq!(
        fib(&lab.node1),
        (before.0 + 2, before.1),
        "request and answer both redirected\n{}",
        ctx()
    );
    // Node 2 only delivers to its local pod: nothing for it to forward.
    assert_eq!(fib(&lab.node2), (0, 0), "{}", ctx());
}

/// A socket of `kind` (`SOCK_STREAM`/`SOCK_DGRAM`) bound to
/// `0.0.0.0:port` before it connects, as netperf's TCP_CRR or any host
/// application choosing its local port does; send, receive and connect
/// time out after [`TIMEOUT`].
fn bound_socket(kind: libc::c_int, port: u16) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(TIMEOUT.as_secs()).unwrap(),
        tv_usec: 0,
    };
    // SAFETY: setsockopt with pointers to live values of the option's type.
    unsafe {
        let set = |opt, val: *const libc::c_void, len: usize| {
            let rc = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                val,
                libc::socklen_t::try_from(len).unwrap(),
            );
            assert_eq!(
                rc,
                0,
                "setsockopt {opt}: {}",
                std::io::Error::last_os_error()
            );
        };
        set(
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>(),
        );
        // Linux's connect() honours the send timeout.
        set(
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>(),
        );
        set(
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>(),
        );
    }
    let sa = sockaddr_in(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    // SAFETY: bind(2) with a sockaddr_in of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "bind :{port}: {}", std::io::Error::last_os_error());
    fd
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// connect(2) of `fd` to `to`.
fn connect_fd(fd: &OwnedFd, to: SocketAddrV4) -> std::io::Result<()> {
    let sa = sockaddr_in(to);
    // SAFETY: connect(2) with a sockaddr_in of the right size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A host process on node 1 (its own netns, host network) opening
/// connections from a local port that equals a NodePort (30000): the
/// replies (outside:port → node 1:30000) find no conntrack entry on the
/// uplink's ingress and look like new NodePort flows. They belong to the
/// local socket, so `rt_from_net` leaves them to the kernel (counted as
/// `local_socket`) instead of DNATing them to the NodePort's backend,
/// which made the connect() hang. A listener or an unconnected UDP socket
/// bound to 0.0.0.0:30000 on node 1 does not stop the NodePort.
#[test]
fn netns_host_connection_from_a_nodeport_port_is_left_to_the_kernel() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut lab = lab_outside("ls");
    let n1_ip = ip(N1);
    let p1_ip = ip("10.42.1.10");
    let outside = ip(OUTSIDE);
    let (web, dns) = (
        SocketAddrV4::new(p1_ip, 8080),
        SocketAddrV4::new(p1_ip, 5353),
    );
    let none = Ipv4Addr::UNSPECIFIED;
    let s = &mut lab.node1.svcs;
    s.upsert(&service(
        "default/web-np:http",
        Protocol::Tcp,
        (FrontendKind::NodePort, none, 30000),
        web,
        true,
    ))
    .unwrap();
    s.upsert(&service(
        "default/dns-np:udp",
        Protocol::Udp,
        (FrontendKind::NodePort, none, 30000),
        dns,
        true,
    ))
    .unwrap();
    let (n1, c, p1) = (&lab.n1, &lab.c, &lab.p1);
    peer_echo_tcp(p1, web);
    peer_echo_udp(p1, dns);
    let (c_tcp, c_udp) = (
        SocketAddrV4::new(outside, 7000),
        SocketAddrV4::new(outside, 7053),
    );
    peer_echo_tcp(c, c_tcp);
    peer_echo_udp(c, c_udp);
    let ctx = || lab.state();
    let local_socket = || lab.node1.dp.stats().unwrap().get(stats::LOCAL_SOCKET);

    // TCP from node 1's local port 30000 to the outside server: the
    // SYN-ACK and everything after it reach the socket.
    let got = spawn_in(n1, move || {
        let fd = bound_socket(libc::SOCK_STREAM, 30000);
        connect_fd(&fd, c_tcp).map_err(|e| format!("connect {c_tcp} from :30000: {e}"))?;
        let mut s = TcpStream::from(fd);
        let mut all = String::new();
        s.read_to_string(&mut all)
            .map_err(|e| format!("read from {c_tcp}: {e}"))?;
        Ok::<_, String>((s.local_addr().unwrap(), all))
    })
    .join()
    .unwrap();
    let (local, all) = got.unwrap_or_else(|e| panic!("host TCP from :30000: {e}\n{}", ctx()));
    assert_eq!(local, SocketAddr::from((n1_ip, 30000)));
    let (seen, rest) = all.split_once('\n').unwrap_or((&all, ""));
    assert_eq!(seen, local.to_string(), "{}", ctx());
    assert_eq!(rest.len(), 64 * 1024, "payload\n{}", ctx());
    let after_tcp = local_socket();
    assert!(after_tcp > 0, "counted as local_socket\n{}", ctx());
    assert_eq!(
        lab.node1.dp.stats().unwrap().get(stats::LB_NEW),
        0,
        "nothing balanced\n{}",
        ctx()
    );

    // UDP: a socket bound to :30000 and connected to the outside server.
    let got = spawn_in(n1, move || {
        let fd = bound_socket(libc::SOCK_DGRAM, 30000);
        connect_fd(&fd, c_udp).map_err(|e| format!("connect {c_udp}: {e}"))?;
        let s = UdpSocket::from(fd);
        s.send(b"who am i").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = s
            .recv(&mut buf)
            .map_err(|e| format!("no answer from {c_udp}: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .join()
    .unwrap();
    let seen = got.unwrap_or_else(|e| panic!("host UDP from :30000: {e}\n{}", ctx()));
    assert_eq!(seen, format!("{n1_ip}:30000"), "{}", ctx());
    assert!(local_socket() > after_tcp, "counted\n{}", ctx());
    assert_eq!(
        lab.node1.dp.stats().unwrap().get(stats::LB_NEW),
        0,
        "{}",
        ctx()
    );

    // A listener and an unconnected UDP socket on 0.0.0.0:30000 on node 1:
    // the NodePort still wins, from outside both reach the backend pod.
    let before = local_socket();
    let (tx, rx) = mpsc::channel();
    let (hold_tx, hold_rx) = mpsc::channel::<()>();
    let holder = spawn_in(n1, move || {
        let l = TcpListener::bind("0.0.0.0:30000").unwrap();
        let u = UdpSocket::bind("0.0.0.0:30000").unwrap();
        tx.send(()).unwrap();
        let _ = hold_rx.recv();
        drop((l, u));
    });
    rx.recv_timeout(TIMEOUT).expect("node 1 sockets bound");
    let (local, seen) = tcp_from(c, SocketAddrV4::new(n1_ip, 30000))
        .unwrap_or_else(|e| panic!("outside → NodePort with a listener: {e}\n{}", ctx()));
    assert_eq!(
        seen,
        local.to_string(),
        "the backend pod answered\n{}",
        ctx()
    );
    let (local, from, seen) = udp_from(c, SocketAddrV4::new(n1_ip, 30000))
        .unwrap_or_else(|e| panic!("outside → UDP NodePort with a bound socket: {e}\n{}", ctx()));
    assert_eq!(from, SocketAddr::from((n1_ip, 30000)), "{}", ctx());
    assert_eq!(
        seen,
        local.to_string(),
        "the backend pod answered\n{}",
        ctx()
    );
    assert_eq!(local_socket(), before, "{}", ctx());
    assert_eq!(
        lab.node1.dp.stats().unwrap().get(stats::LB_NEW),
        2,
        "{}",
        ctx()
    );
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
}

/// A TCP server in `ns` on `addr` that echoes every line of every
/// connection until the client closes it: a stand-in for the apiserver a
/// node's agent keeps a watch open to.
fn line_echo_tcp(ns: &str, addr: SocketAddrV4) {
    let (tx, rx) = mpsc::channel();
    spawn_in(ns, move || {
        let l = TcpListener::bind(addr).expect("bind");
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                let mut w = &s;
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    if w.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    rx.recv_timeout(TIMEOUT).expect("server listening");
}

/// One round trip of `line` over `s` (a [`line_echo_tcp`] connection).
fn echo_line(s: &TcpStream, line: &str) -> Result<(), String> {
    let mut w = s;
    w.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send {line:?}: {e}"))?;
    let mut got = String::new();
    BufReader::new(s)
        .read_line(&mut got)
        .map_err(|e| format!("answer to {line:?}: {e}"))?;
    if got.trim_end() != line {
        return Err(format!("sent {line:?}, got {got:?}"));
    }
    Ok(())
}

/// A TCP connection from `ns`, local port `port` (0: any), to `to`.
fn tcp_bound(ns: &str, port: u16, to: SocketAddrV4) -> Result<TcpStream, String> {
    spawn_in(ns, move || {
        let fd = bound_socket(libc::SOCK_STREAM, port);
        connect_fd(&fd, to).map_err(|e| format!("connect {to} from :{port}: {e}"))?;
        Ok(TcpStream::from(fd))
    })
    .join()
    .unwrap()
}

/// A UDP socket in `ns` bound to local port `port` and connected to `to`.
fn udp_bound(ns: &str, port: u16, to: SocketAddrV4) -> UdpSocket {
    spawn_in(ns, move || {
        let fd = bound_socket(libc::SOCK_DGRAM, port);
        connect_fd(&fd, to).unwrap();
        UdpSocket::from(fd)
    })
    .join()
    .unwrap()
}

/// Asks a [`peer_echo_udp`] server through `s` which address it sees.
fn udp_ask(s: &UdpSocket) -> Result<String, String> {
    s.send(b"who am i").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The first SNAT port of the host-socket tests: inside the kernel's
/// default ephemeral range, which is also masquerade's.
const HOST_PORT: u16 = 40000;

/// The lab of the host-socket tests: node 1 runs a line-echo TCP server
/// (the "apiserver") and a UDP server, returned as (lab, TCP, UDP
/// address); node 2's SNAT range is `HOST_PORT..=snat_port_max`.
fn host_lab(tag: &str, snat_port_max: u16) -> (Lab, SocketAddrV4, SocketAddrV4) {
    let mut lab = lab(tag);
    let n1_ip = ip(N1);
    let api = SocketAddrV4::new(n1_ip, 6443);
    let dns = SocketAddrV4::new(n1_ip, 5353);
    line_echo_tcp(&lab.n1, api);
    peer_echo_udp(&lab.n1, dns);
    lab.node2
        .dp
        .set_config(&node_config(ip(N2), HOST_PORT, snat_port_max))
        .unwrap();
    (lab, api, dns)
}

/// The lab flake (one node's agent got no watch events for minutes): the
/// agent's watch is a host socket `node:port → apiserver:6443`, and pods
/// reach the same apiserver masqueraded to the same node address, from
/// the same port range. Here node 2's SNAT range is the one port a host
/// socket of node 2 already uses to node 1's "apiserver", so a pod flow to
/// that peer has no other tuple to take: masquerade must refuse it
/// (`masq_no_port`) rather than hand out the host's tuple, whose replies
/// `rt_from_net` would then deliver to the pod. TCP and UDP.
#[test]
fn netns_masquerade_never_takes_a_host_socket_tuple() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let (lab, api, dns) = host_lab("hs", HOST_PORT);
    let (n2_ip, n2, p2) = (ip(N2), &lab.n2, &lab.p2);
    let ctx = || lab.state();

    let host = tcp_bound(n2, HOST_PORT, api).unwrap_or_else(|e| panic!("host TCP: {e}\n{}", ctx()));
    echo_line(&host, "before").unwrap_or_else(|e| panic!("host TCP: {e}\n{}", ctx()));
    let host_udp = udp_bound(n2, HOST_PORT, dns);
    let me = format!("{n2_ip}:{HOST_PORT}");
    assert_eq!(udp_ask(&host_udp).as_deref(), Ok(me.as_str()), "{}", ctx());

    // The pod's flows to the same peers: the only SNAT port is the host's.
    let pod_tcp = tcp_bound(p2, 0, api);
    let pod_udp = udp_from(p2, dns);

    echo_line(&host, "after").unwrap_or_else(|e| {
        panic!(
            "host TCP connection hijacked by a pod's masquerade: {e}\n{}",
            ctx()
        )
    });
    assert_eq!(
        udp_ask(&host_udp).as_deref(),
        Ok(me.as_str()),
        "host UDP flow hijacked by a pod's masquerade\n{}",
        ctx()
    );
    assert!(
        pod_tcp.is_err(),
        "the pod's TCP flow took the host's tuple\n{}",
        ctx()
    );
    assert!(
        pod_udp.is_err(),
        "the pod's UDP flow took the host's tuple\n{}",
        ctx()
    );
    let st = lab.node2.dp.stats().unwrap();
    assert!(st.get(stats::MASQ_NO_PORT) >= 2, "{}", ctx());
    assert!(st.get(stats::NAT_HOST_NEW) >= 2, "{}", ctx());
}

/// The other order: a pod's masqueraded flow holds `node:port → peer`
/// first, then a host socket picks the same local port to the same peer
/// (the kernel cannot know the tuple is taken on the wire). The host's
/// flow is moved to another port (`nat_host_remap`) and both work. The
/// new port is found by masquerade's random tries over two ports: all 15
/// miss it with probability 2⁻¹⁵.
#[test]
fn netns_host_flow_on_a_masqueraded_tuple_is_moved_to_a_free_port() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let (lab, api, dns) = host_lab("hr", HOST_PORT + 1);
    let (n2_ip, n2, p2) = (ip(N2), &lab.n2, &lab.p2);
    let ctx = || lab.state();

    // The pod's own port is in the range: masquerade keeps it.
    let pod = tcp_bound(p2, HOST_PORT, api).unwrap_or_else(|e| panic!("pod TCP: {e}\n{}", ctx()));
    echo_line(&pod, "pod").unwrap_or_else(|e| panic!("pod TCP: {e}\n{}", ctx()));
    let pod_udp = udp_bound(p2, HOST_PORT, dns);
    let taken = format!("{n2_ip}:{HOST_PORT}");
    assert_eq!(
        udp_ask(&pod_udp).as_deref(),
        Ok(taken.as_str()),
        "{}",
        ctx()
    );

    let host = tcp_bound(n2, HOST_PORT, api)
        .unwrap_or_else(|e| panic!("host TCP on a masqueraded tuple: {e}\n{}", ctx()));
    echo_line(&host, "host").unwrap_or_else(|e| panic!("host TCP: {e}\n{}", ctx()));
    let host_udp = udp_bound(n2, HOST_PORT, dns);
    let moved = format!("{n2_ip}:{}", HOST_PORT + 1);
    assert_eq!(
        udp_ask(&host_udp).as_deref(),
        Ok(moved.as_str()),
        "host UDP on a masqueraded tuple\n{}",
        ctx()
    );
    // Both pairs keep working, each getting its own replies.
    echo_line(&pod, "pod again")
        .unwrap_or_else(|e| panic!("pod TCP after the host's: {e}\n{}", ctx()));
    echo_line(&host, "host again").unwrap_or_else(|e| panic!("host TCP: {e}\n{}", ctx()));
    assert_eq!(
        udp_ask(&pod_udp).as_deref(),
        Ok(taken.as_str()),
        "{}",
        ctx()
    );
    assert_eq!(
        udp_ask(&host_udp).as_deref(),
        Ok(moved.as_str()),
        "{}",
        ctx()
    );
    assert_eq!(
        lab.node2.dp.stats().unwrap().get(stats::NAT_HOST_REMAP),
        2,
        "{}",
        ctx()
    );
}
