//! Netns tests (need root): floods do not break established TCP
//! connections.
//!
//! - A flood of new inbound flows into a pod does not break established
//!   Service connections. 1,000 TCP connections from a client pod through
//!   a ClusterIP (balanced per packet by `rt_from_pod` over four backends,
//!   so a connection that lost its conntrack entry would land on another
//!   backend port and be reset) echo before and after a flood of new flows
//!   (TCP SYNs and UDP datagrams, 1M by default) sent with a raw
//!   `AF_PACKET` socket from outside the node to the server pod. The
//!   flood's inbound markers go to `rt_ctany4_v3`; the connections live in
//!   `rt_ct4_v3`, which the flood never touches.
//! - A flood of new UDP flows from both pods to outside does not break
//!   masqueraded TCP connections from a pod to outside. The node's
//!   `rt_natany4_v2` is made small (1,024 entries) and the pods send 20
//!   times that many new flows through it (real UDP sockets,
//!   `RIPTIDE_NAT_FLOOD_FLOWS`, at most [`NAT_FLOOD_TIME`]); the TCP
//!   mappings live in `rt_nat4_v2`, which the flood never touches, so
//!   every connection echoes afterwards and nothing is dropped as
//!   `masq_lost_mapping`.
//!
//! Everything lives in namespaces this test creates (named with the pid),
//! removed on drop, also when the test fails:
//!
//! ```text
//!  o (198.18.0.100) ══eth0══ n (198.18.0.1) ─vs─ s (10.42.1.10, backends :8080-8083)
//!                                            └─vc─ c (10.42.1.11, clients)
//! ```
//!
//! `RIPTIDE_FLOOD_FLOWS` sets the inbound flood size; the sender stops
//! after [`FLOOD_TIME`] whatever it reached, and the test says how many
//! flows the node saw. Each test names its namespaces apart, so both can
//! run at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use common::{ip, syn, udp};
use riptide_common::{CFG_F_MASQUERADE, Config, EndpointValue, names, stats};
use riptide_datapath::{
    Attachment, Datapath, MapSizes, Pinning,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, Services,
        TrafficPolicy,
    },
};
use riptide_test_support::{
    netns::{Netns, run_in},
    privileged, run,
};

const NODE_IP: &str = "198.18.0.1";
const OUTSIDE: &str = "198.18.0.100";
const SERVER: &str = "10.42.1.10";
const CLIENT: &str = "10.42.1.11";
const VIP: &str = "10.43.0.10";
const CONNECTIONS: usize = 1000;
const FLOOD_TIME: Duration = Duration::from_secs(90);
/// Masqueraded TCP connections kept up through the UDP flood.
const MASQ_CONNECTIONS: usize = 200;
/// Entries of the node's `rt_natany4_v2` in the UDP flood test.
const NAT_ANY_ENTRIES: u32 = 1024;
const NAT_FLOOD_TIME: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(5);

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Wires pod namespace `pod` at `addr` behind host veth `host_if` of node
/// namespace `node` as the CNI does; returns its endpoint entry's MACs.
fn add_pod(node: &str, pod: &str, host_if: &str, addr: &str, tail: u8) -> ([u8; 6], [u8; 6]) {
    let host_mac = [0x0e, 0xee, 0, 0, 1, tail];
    let pod_mac = [0x0a, 0x58, 10, 42, 1, tail];
    run(&["ip", "-n", node, "link", "add", host_if, "address", &mac(host_mac), "type", "veth", "peer", "name", "eth0", "netns", pod]);
    for args in [
        vec!["link", "set", "eth0", "address", &mac(pod_mac)],
        vec!["link", "set", "eth0", "up"],
        vec!["addr", "add", &format!("{addr}/32"), "dev", "eth0"],
        vec!["neigh", "add", "169.254.1.1", "lladdr", &mac(host_mac), "dev", "eth0", "nud", "permanent"],
        vec!["route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink"],
    ] {
        let mut v = vec!["ip", "-n", pod];
        v.extend(args.iter().copied());
        run(&v);
    }
    run(&["ip", "-n", node, "link", "set", host_if, "up"]);
    run(&["ip", "-n", node, "route", "add", &format!("{addr}/32"), "dev", host_if, "scope", "link"]);
    (pod_mac, host_mac)
}

struct Lab {
    dp: Datapath,
    _svcs: Services,
    _uplink: Attachment,
    n: String,
    o: String,
    s: String,
    c: String,
    _namespaces: Vec<Netns>,
}

/// The lab's namespaces are named `rtfl<pid><tag><role>`; the node's maps
/// get `sizes`.
fn lab(tag: &str, sizes: MapSizes) -> Lab {
    let id = std::process::id();
    let names: Vec<String> = ["n", "o", "s", "c"].iter().map(|r| format!("rtfl{id}{tag}{r}")).collect();
    let namespaces: Vec<Netns> = names.iter().map(|n| Netns::new(n.clone())).collect();
    let (n, o, s, c) = (names[0].clone(), names[1].clone(), names[2].clone(), names[3].clone());
    run(&["ip", "-n", &n, "link", "add", "eth0", "address", &mac(common::NODE_MAC), "type", "veth", "peer", "name", "eth0", "netns", &o]);
    run(&["ip", "-n", &o, "link", "set", "eth0", "address", &mac(common::CLIENT_MAC)]);
    for (ns, addr) in [(&n, NODE_IP), (&o, OUTSIDE)] {
        run(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
    }
    run(&["ip", "netns", "exec", &n, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let pods = [(s.clone(), "vs", SERVER, 10u8), (c.clone(), "vc", CLIENT, 11)];
    let wired: Vec<_> = pods.iter().map(|(ns, hif, addr, tail)| (*hif, ip(addr), add_pod(&n, ns, hif, addr, *tail))).collect();

    let (dp, svcs, uplink) = run_in(&n, move || {
        let mut dp = Datapath::load_sized(&Pinning::None, &sizes).expect("load datapath");
        dp.set_config(&Config {
            node_ip_be: u32::from(ip(NODE_IP)).to_be(),
            hairpin_ip_be: u32::from(ip("169.254.42.1")).to_be(),
            cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
            cluster_cidr_len: 16,
            nomasq_cidr_be: u32::from(ip(NODE_IP)).to_be(),
            nomasq_cidr_len: 32,
            flags: CFG_F_MASQUERADE,
            snat_port_min: 32768,
            snat_port_max: 60999,
            ..Default::default()
        })
        .unwrap();
        for (hif, addr, (pod_mac, host_mac)) in wired {
            let c_if = std::ffi::CString::new(hif).unwrap();
            // SAFETY: valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c_if.as_ptr()) };
            assert_ne!(ifindex, 0, "{hif} exists");
            dp.endpoints()
                .unwrap()
                .upsert(addr, EndpointValue { ifindex, flags: 0, mac: pod_mac, node_mac: host_mac })
                .unwrap();
            common::attach_from_pod(&mut dp, hif);
        }
        let uplink = dp.attach_uplink("eth0").unwrap();
        let mut svcs = dp.services().unwrap();
        svcs.upsert(&Service {
            name: "default/echo:tcp".into(),
            protocol: Protocol::Tcp,
            frontends: vec![Frontend { kind: FrontendKind::ClusterIp, addr: ip(VIP), port: 80 }],
            backends: (8080..8084)
                .map(|port| Backend {
                    addr: SocketAddrV4::new(ip(SERVER), port),
                    state: BackendState::Active,
                    local: true,
                })
                .collect(),
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: riptide_datapath::service::LbMode::Snat,
        })
        .unwrap();
        (dp, svcs, uplink)
    });
    Lab { dp, _svcs: svcs, _uplink: uplink, n, o, s, c, _namespaces: namespaces }
}

/// Echo servers on the four backend ports of pod `ns`: each connection
/// gets a small thread that writes back whatever it reads.
fn echo_servers(ns: &str) {
    for port in 8080..8084u16 {
        let l = run_in(ns, move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = std::thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

/// Sends a line on every connection and checks the echo; returns the
/// failures.
fn echo_all(conns: &mut [TcpStream], round: &str) -> Vec<String> {
    let mut failed = Vec::new();
    for (i, s) in conns.iter_mut().enumerate() {
        let msg = format!("{round} {i}\n");
        let mut got = vec![0u8; msg.len()];
        let r = s.write_all(msg.as_bytes()).and_then(|()| s.read_exact(&mut got));
        match r {
            Ok(()) if got == msg.as_bytes() => {}
            Ok(()) => failed.push(format!("{i}: echoed {:?}", String::from_utf8_lossy(&got))),
            Err(e) => failed.push(format!("{i}: {e}")),
        }
    }
    failed
}

/// [`echo_all`] that fails, naming the broken connections and showing the
/// node's flow tables and counters.
fn assert_all_echo(conns: &mut [TcpStream], round: &str, dp: &Datapath) {
    let failed = echo_all(conns, round);
    assert!(
        failed.is_empty(),
        "{round}: {} of {} connections broken: {:?}\n{}",
        failed.len(),
        conns.len(),
        &failed[..failed.len().min(10)],
        common::dump(dp)
    );
}

/// Sends up to `flows` frames of distinct new flows from the outside
/// namespace (raw `AF_PACKET` on its `eth0`): TCP SYNs and UDP datagrams
/// to the server pod, from every source port to 16 destination ports.
/// Returns (frames sent, time taken).
fn flood(ns: &str, flows: u32) -> (u32, Duration) {
    run_in(ns, move || {
        // SAFETY: plain socket call; protocol 0 sends only.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: the new fd, owned from here on.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let c_if = std::ffi::CString::new("eth0").unwrap();
        // SAFETY: sockaddr_ll is plain data; zeroed is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        // SAFETY: valid NUL-terminated name.
        sll.sll_ifindex = unsafe { libc::if_nametoindex(c_if.as_ptr()) } as i32;
        let len = size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: binding our socket to a sockaddr_ll of the right size.
        let rc = unsafe { libc::bind(raw, (&raw const sll).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let (src, dst) = (ip(OUTSIDE), ip(SERVER));
        let start = Instant::now();
        let mut sent = 0;
        while sent < flows && start.elapsed() < FLOOD_TIME {
            let sport = 1 + (sent / 2 % 65_535) as u16;
            let dport = 1000 + (sent / 2 / 65_535) as u16;
            let f = if sent % 2 == 0 { syn((src, sport), (dst, dport)) } else { udp((src, sport), (dst, dport), b"x", false) };
            // SAFETY: sending a buffer we own on our socket.
            let n = unsafe { libc::send(raw, f.as_ptr().cast(), f.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                // The veth queue is full: let the node catch up.
                assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "send: {e}");
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            sent += 1;
            if sent % 256 == 0 {
                // Leave the receiving side's backlog (netdev_max_backlog)
                // room: frames it drops never reach the programs.
                std::thread::yield_now();
            }
        }
        (sent, start.elapsed())
    })
}

/// Open files both tests of this file hold at once: both ends of every
/// connection live in this process, and the tests run side by side.
const OPEN_FILES: u64 = 2 * CONNECTIONS as u64 + 2 * MASQ_CONNECTIONS as u64 + 1024;

/// Raises the soft open-file limit (1024 on a bare VM boot, whose hard
/// limit is 4096) towards `want`, within the hard limit.
fn raise_open_file_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0, "getrlimit");
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
        }
    }
}

#[test]
fn netns_established_service_connections_survive_a_flood_of_new_inbound_flows() {
    if !privileged("to create network namespaces and attach eBPF programs") {
        return;
    }
    raise_open_file_limit(OPEN_FILES);
    let flows: u32 = std::env::var("RIPTIDE_FLOOD_FLOWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let lab = lab("", MapSizes::default());
    echo_servers(&lab.s);
    let mut conns: Vec<TcpStream> = run_in(&lab.c, || {
        (0..CONNECTIONS)
            .map(|i| {
                let s = TcpStream::connect_timeout(&SocketAddrV4::new(ip(VIP), 80).into(), TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s
            })
            .collect()
    });
    assert_all_echo(&mut conns, "before the flood", &lab.dp);
    let tcp_entries = lab.dp.conntrack_table(names::CT4).unwrap().len();
    assert!(tcp_entries >= 2 * CONNECTIONS, "{tcp_entries} TCP entries");

    let (sent, took) = flood(&lab.o, flows);
    // Let the last frames drain through the node.
    std::thread::sleep(Duration::from_millis(500));
    let st = lab.dp.stats().unwrap();
    let marked = st.get(stats::INBOUND_NEW);
    eprintln!(
        "flood: {sent} frames in {took:?} ({:.0} k/s); {marked} new inbound flows marked; \
         tables: tcp {}, other {}",
        f64::from(sent) / took.as_secs_f64() / 1000.0,
        lab.dp.conntrack_table(names::CT4).unwrap().len(),
        lab.dp.conntrack_table(names::CT_ANY4).unwrap().len(),
    );
    assert!(marked >= u64::from(sent) / 2, "most flood frames reached the node ({marked} of {sent})");

    assert_all_echo(&mut conns, "after the flood", &lab.dp);
    assert_eq!(lab.dp.stats().unwrap().get(stats::CT_LOST_TCP), 0, "no connection lost its entry");
    let _ = (&lab.n, &lab.c);
}

/// Sends one datagram to each of `flows` ports of the outside namespace
/// from a UDP socket in pod namespace `ns`: every port a new flow for
/// masquerade. Stops after [`NAT_FLOOD_TIME`]; returns the datagrams sent.
fn udp_flood_to_outside(ns: &str, first_port: u16, flows: u16) -> u32 {
    run_in(ns, move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let start = Instant::now();
        let mut sent = 0u32;
        let mut port = first_port;
        while port < first_port.saturating_add(flows) && start.elapsed() < NAT_FLOOD_TIME {
            match sock.send_to(b"q", SocketAddrV4::new(ip(OUTSIDE), port)) {
                Ok(_) => {
                    sent += 1;
                    port += 1;
                }
                // A full queue: let the node catch up.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                // An ICMP port unreachable of an earlier datagram, reported
                // on this unconnected socket: not a send failure.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                Err(e) => panic!("send to {OUTSIDE}:{port}: {e}"),
            }
            if sent % 128 == 0 {
                // Leave the node's backlog room (see `flood`).
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        sent
    })
}

#[test]
fn netns_masqueraded_tcp_connections_survive_a_udp_flood_from_pods_to_outside() {
    if !privileged("to create network namespaces and attach eBPF programs") {
        return;
    }
    raise_open_file_limit(OPEN_FILES);
    let flows: u32 = std::env::var("RIPTIDE_NAT_FLOOD_FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20 * NAT_ANY_ENTRIES)
        .min(2 * 30_000);
    let lab = lab("m", MapSizes::default().with(names::NAT_ANY4, NAT_ANY_ENTRIES).unwrap());
    echo_servers(&lab.o);
    // Connections from the client pod to the outside namespace, which has
    // no route to the pod network: only masquerade makes them work.
    let mut conns: Vec<TcpStream> = run_in(&lab.c, || {
        (0..MASQ_CONNECTIONS)
            .map(|i| {
                let to = SocketAddrV4::new(ip(OUTSIDE), 8080 + (i % 4) as u16);
                let s = TcpStream::connect_timeout(&to.into(), TIMEOUT).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s
            })
            .collect()
    });
    assert_all_echo(&mut conns, "before the UDP flood", &lab.dp);
    let tcp_mappings = lab.dp.nat_table(names::NAT4).unwrap().len();
    assert_eq!(tcp_mappings, 2 * MASQ_CONNECTIONS, "egress and ingress entry per connection");

    let snat_before = lab.dp.stats().unwrap().get(stats::SNAT);
    let started = Instant::now();
    // Half the flows from each pod, to ports the outside echo servers do
    // not use.
    let half = u16::try_from(flows / 2).unwrap_or(u16::MAX);
    let sent = udp_flood_to_outside(&lab.c, 10_000, half) + udp_flood_to_outside(&lab.s, 10_000, half);
    std::thread::sleep(Duration::from_millis(500));
    let st = lab.dp.stats().unwrap();
    let translated = st.get(stats::SNAT) - snat_before;
    let other = lab.dp.nat_table(names::NAT_ANY4).unwrap().len();
    eprintln!(
        "UDP flood: {sent} new flows in {:?}, {translated} masqueraded; NAT tables: tcp {}, other {other} (max {NAT_ANY_ENTRIES})",
        started.elapsed(),
        lab.dp.nat_table(names::NAT4).unwrap().len(),
    );
    assert!(translated >= u64::from(sent) / 2, "most flood datagrams reached the node ({translated} of {sent})");
    assert!(
        translated >= 4 * u64::from(NAT_ANY_ENTRIES),
        "the flood overfilled rt_natany4_v2 several times ({translated} mappings)"
    );
    assert!(other <= NAT_ANY_ENTRIES as usize, "{other} entries");

    assert_all_echo(&mut conns, "after the UDP flood", &lab.dp);
    let st = lab.dp.stats().unwrap();
    assert_eq!(st.get(stats::MASQ_LOST_MAPPING), 0, "no connection lost its mapping\n{}", common::dump(&lab.dp));
    assert_eq!(st.get(stats::MASQ_NO_PORT), 0, "{}", common::dump(&lab.dp));
    assert_eq!(lab.dp.nat_table(names::NAT4).unwrap().len(), 2 * MASQ_CONNECTIONS, "{}", common::dump(&lab.dp));
    let _ = (&lab.n, &lab.s);
}
