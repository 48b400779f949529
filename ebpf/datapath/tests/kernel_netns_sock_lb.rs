//! Socket-LB tests (need root): the cgroup/sock_addr programs attached to a
//! cgroup this test creates, a client process placed in that cgroup and in a
//! network namespace this test creates, real TCP/UDP servers on backend
//! addresses inside that namespace. The service address is configured
//! nowhere: only the programs make it reachable.
//!
//! The client is this test binary re-executed (running the ignored
//! `sock_client_child` helper) so that only it, not the test harness, sits
//! in the cgroup; it is moved there and into the namespace between fork and
//! exec.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use common::ip;
use riptide_common::{CFG_F_SOCK_LB, Config};
use riptide_datapath::{
    Attachment, Datapath, Pinning,
    events::Events,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, Services,
        TrafficPolicy,
    },
};
use riptide_test_support::{
    netns::{self, Netns},
    privileged, run,
};

const VIP: &str = "10.96.77.10";
const BACKENDS: [&str; 3] = ["10.200.0.1", "10.200.0.2", "10.200.0.3"];
const BE_PORT: u16 = 8080;
const CLIENT_ENV: &str = "RIPTIDE_SOCK_CLIENT";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The servers' namespace (`lo` up, deleted on drop) with the backend
/// addresses on `lo`.
struct ServerNs(Netns);

impl ServerNs {
    fn new() -> Self {
        let ns = Netns::new(unique("rtsock"));
        for b in BACKENDS {
            run(&["ip", "-n", ns.name(), "addr", "add", &format!("{b}/32"), "dev", "lo"]);
        }
        Self(ns)
    }

    /// Runs `f` on a thread inside the namespace (sockets created there stay
    /// in it).
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        netns::spawn_in(self.0.name(), f)
    }
}

/// A cgroup v2 directory under /sys/fs/cgroup/unified, removed on drop.
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn new() -> Self {
        let path = PathBuf::from("/sys/fs/cgroup/unified").join(unique("riptide-test-"));
        std::fs::create_dir(&path).expect("create cgroup");
        Self { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The client has exited (waited for), so the cgroup is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("WARNING: could not remove {}", self.path.display());
    }
}

/// Everything one socket-LB test needs; torn down in reverse order on drop
/// (attachment, then servers' namespace, then the cgroup).
struct World {
    _attach: Attachment,
    svcs: Services,
    events: Events,
    _dp: Datapath,
    ns: ServerNs,
    cg: Cgroup,
}

fn world() -> World {
    let cg = Cgroup::new();
    let ns = ServerNs::new();
    let mut dp = Datapath::load(&Pinning::None).expect("load");
    dp.set_config(&Config {
        flags: CFG_F_SOCK_LB,
        ..Default::default()
    })
    .unwrap();
    let svcs = dp.services().unwrap();
    let events = dp.events().unwrap();
    let attach = dp.attach_sock_lb(&cg.path).expect("attach socket LB");
    World {
        _attach: attach,
        svcs,
        events,
        _dp: dp,
        ns,
        cg,
    }
}

fn service(protocol: Protocol, n: usize, affinity: Option<u32>) -> Service {
    Service {
        name: "default/sock:p".into(),
        protocol,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: ip(VIP),
            port: 80,
        }],
        backends: BACKENDS[..n]
            .iter()
            .map(|a| Backend {
                addr: SocketAddrV4::new(ip(a), BE_PORT),
                state: BackendState::Active,
                local: true,
            })
            .collect(),
        affinity_timeout_s: affinity,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

/// TCP servers on every backend address: answer each connection with the
/// backend's address, then close. Threads end with the process.
fn tcp_servers(ns: &ServerNs) {
    for b in BACKENDS {
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let l = TcpListener::bind((ip(b), BE_PORT)).expect("bind");
            tx.send(()).unwrap();
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.write_all(b.as_bytes());
            }
        });
        rx.recv().unwrap();
    }
}

fn udp_servers(ns: &ServerNs) {
    for b in BACKENDS {
        let (tx, rx) = std::sync::mpsc::channel();
        ns.spawn(move || {
            let s = UdpSocket::bind((ip(b), BE_PORT)).expect("bind");
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(b.as_bytes(), from);
            }
        });
        rx.recv().unwrap();
    }
}

/// Runs the client (this binary's `sock_client_child`) inside the cgroup
/// and the namespace; returns its result lines.
fn client(w: &World, mode: &str, count: u32) -> Vec<String> {
    client_to(w, mode, &format!("{VIP}:80"), count)
}

fn client_to(w: &World, mode: &str, target: &str, count: u32) -> Vec<String> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(w.cg.path.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let procs_fd = procs.as_raw_fd();
    let mut cmd = netns::command(w.ns.0.name(), std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "sock_client_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CLIENT_ENV, format!("{mode} {target} {count}"));
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run client");
    drop(procs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}\n{}\nservices: {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        w.svcs.dump_services()
    );
    stdout
        .lines()
        // The harness prints "test sock_client_child ... " without a newline
        // before the first result, so look for the marker anywhere.
        .filter_map(|l| l.find("RESULT ").map(|i| l[i + 7..].to_owned()))
        .collect()
}

fn tally(lines: &[String], key: &str) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for l in lines {
        for kv in l.split_whitespace() {
            if let Some(v) = kv.strip_prefix(key) {
                *m.entry(v.to_owned()).or_insert(0) += 1;
            }
        }
    }
    m
}

#[test]
fn netns_tcp_connect_to_vip_reaches_a_backend_and_getpeername_shows_the_vip() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Tcp, 3, None)).unwrap();
    tcp_servers(&w.ns);
    let lines = client(&w, "tcp", 5);
    assert_eq!(lines.len(), 5, "{lines:?}");
    for l in &lines {
        assert!(
            l.contains(&format!("peer={VIP}:80")),
            "getpeername shows the service: {l}"
        );
        assert!(l.contains("backend=10.200.0."), "a backend answered: {l}");
    }
}

#[test]
fn netns_tcp_connects_spread_evenly_over_three_backends() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Tcp, 3, None)).unwrap();
    tcp_servers(&w.ns);
    let lines = client(&w, "tcp", 300);
    let by = tally(&lines, "backend=");
    assert_eq!(by.len(), 3, "{by:?}");
    // Expected 100 each; binomial sd ≈ 8.2, so [50, 150] is ~6 sd wide.
    for (b, n) in &by {
        assert!((50..=150).contains(n), "backend {b} got {n} of 300: {by:?}");
    }
}

#[test]
fn netns_connect_without_backends_fails_with_econnrefused() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Tcp, 0, None)).unwrap();
    let lines = client(&w, "tcp", 1);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains(&format!("err={}", libc::ECONNREFUSED)),
        "expected ECONNREFUSED: {lines:?}"
    );
    // UDP: sendto() a service without backends fails the same way.
    w.svcs.upsert(&service(Protocol::Udp, 0, None)).unwrap();
    let lines = client(&w, "udp-send", 1);
    assert!(
        lines[0].contains(&format!("err={}", libc::ECONNREFUSED)),
        "expected ECONNREFUSED from sendto: {lines:?}"
    );
    // Both refusals are reported as events naming the service address.
    let events = w.events.drain();
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.reason() == "sock_no_backend")
        .collect();
    assert_eq!(refused.len(), 2, "{events:?}");
    for e in refused {
        assert_eq!(e.dst(), SocketAddrV4::new(ip(VIP), 80));
        assert_eq!(e.raw.source, riptide_common::EV_SRC_SOCK);
    }
}

#[test]
fn netns_client_ip_affinity_pins_a_client() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Tcp, 3, Some(60))).unwrap();
    tcp_servers(&w.ns);
    let lines = client(&w, "tcp", 40);
    let by = tally(&lines, "backend=");
    assert_eq!(by.values().sum::<u32>(), 40, "{lines:?}");
    assert_eq!(by.len(), 1, "one client, one backend: {by:?}");
}

#[test]
fn netns_udp_sendto_vip_reaches_a_backend_and_recvfrom_shows_the_vip() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Udp, 3, None)).unwrap();
    udp_servers(&w.ns);
    let lines = client(&w, "udp", 30);
    assert_eq!(lines.len(), 30, "{lines:?}");
    for l in &lines {
        assert!(
            l.contains(&format!("from={VIP}:80")),
            "recvfrom shows the service: {l}"
        );
        assert!(l.contains("backend=10.200.0."), "{l}");
    }
    // Connected UDP: connect() picks the backend, getpeername() shows the VIP.
    let lines = client(&w, "udp-connected", 5);
    assert_eq!(lines.len(), 5, "{lines:?}");
    for l in &lines {
        assert!(l.contains(&format!("peer={VIP}:80")), "{l}");
        assert!(l.contains("backend=10.200.0."), "{l}");
    }
}

#[test]
fn netns_nodeport_on_loopback_from_the_node_reaches_a_backend() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    let mut s = service(Protocol::Tcp, 3, None);
    s.frontends.push(Frontend {
        kind: FrontendKind::NodePort,
        addr: Ipv4Addr::UNSPECIFIED,
        port: 30080,
    });
    w.svcs.upsert(&s).unwrap();
    tcp_servers(&w.ns);
    let lines = client_to(&w, "tcp", "127.0.0.1:30080", 3);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert!(l.contains("peer=127.0.0.1:30080"), "{l}");
        assert!(l.contains("backend=10.200.0."), "{l}");
    }
}

#[test]
fn netns_removing_the_service_stops_translation() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut w = world();
    w.svcs.upsert(&service(Protocol::Tcp, 3, None)).unwrap();
    tcp_servers(&w.ns);
    assert_eq!(client(&w, "tcp", 1).len(), 1);
    w.svcs.remove("default/sock:p").unwrap();
    assert!(w.svcs.dump_services().is_empty());
    assert!(w.svcs.dump_backends().is_empty(), "no orphan backend");
    // The VIP is routed nowhere in the namespace: the connect fails, but
    // not with the service's ECONNREFUSED.
    let lines = client(&w, "tcp", 1);
    assert!(lines[0].starts_with("err="), "{lines:?}");
    assert!(
        !lines[0].contains(&format!("err={}", libc::ECONNREFUSED)),
        "{lines:?}"
    );
}

/// Not a test: the client process of the tests above (see the module doc).
#[test]
#[ignore = "helper process for the netns socket-LB tests"]
fn sock_client_child() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut parts = spec.split_whitespace();
    let mode = parts.next().unwrap().to_owned();
    let target: SocketAddrV4 = parts.next().unwrap().parse().unwrap();
    let count: u32 = parts.next().unwrap().parse().unwrap();
    let timeout = Some(Duration::from_secs(5));
    for _ in 0..count {
        match mode.as_str() {
            "tcp" => match TcpStream::connect_timeout(&target.into(), Duration::from_secs(5)) {
                Ok(mut s) => {
                    s.set_read_timeout(timeout).unwrap();
                    let peer = s.peer_addr().unwrap();
                    let mut buf = String::new();
                    s.read_to_string(&mut buf).unwrap();
                    println!("RESULT peer={peer} backend={buf}");
                }
                Err(e) => println!("RESULT err={}", e.raw_os_error().unwrap_or(-1)),
            },
            "udp" => {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.set_read_timeout(timeout).unwrap();
                s.send_to(b"ping", target).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = s.recv_from(&mut buf).unwrap();
                println!(
                    "RESULT from={from} backend={}",
                    String::from_utf8_lossy(&buf[..n])
                );
            }
            "udp-send" => match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .unwrap()
                .send_to(b"ping", target)
            {
                Ok(_) => println!("RESULT sent"),
                Err(e) => println!("RESULT err={}", e.raw_os_error().unwrap_or(-1)),
            },
            "udp-connected" => {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
                s.set_read_timeout(timeout).unwrap();
                s.connect(target).unwrap();
                s.send(b"ping").unwrap();
                let mut buf = [0u8; 64];
                let n = s.recv(&mut buf).unwrap();
                let peer = s.peer_addr().unwrap();
                println!(
                    "RESULT peer={peer} backend={}",
                    String::from_utf8_lossy(&buf[..n])
                );
            }
            other => panic!("unknown mode {other}"),
        }
    }
}
