//! Privileged: the lab topology itself — nodes reach each other and the
//! control-plane address over the underlay, each node's datapath is pinned,
//! and teardown leaves nothing, also after a "crash".

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use riptide_tests::{
    lab::{self, Install, Lab, LabConfig},
    netns,
};
use riptide_test_support::privileged;

/// Serves one TCP echo inside `ns` on `addr:port`; returns once listening.
fn echo_server_in(ns: &str, addr: Ipv4Addr) -> std::thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_owned();
    let handle = std::thread::spawn(move || {
        netns::run_in(&ns, move || {
            let l = TcpListener::bind((addr, 7777)).expect("bind in netns");
            tx.send(()).expect("signal listening");
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).expect("read");
            s.write_all(&buf).expect("write");
        })
        .expect("enter netns");
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("server listening");
    handle
}

fn echo_from(ns: Option<&str>, to: Ipv4Addr) -> std::io::Result<Vec<u8>> {
    let talk = move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((to, 7777)), Duration::from_secs(3))?;
        s.write_all(b"hello")?;
        let mut buf = vec![0u8; 5];
        s.read_exact(&mut buf)?;
        Ok(buf)
    };
    match ns {
        Some(ns) => netns::run_in(ns, talk).map_err(std::io::Error::other)?,
        None => talk(),
    }
}

fn assert_nothing_left(cfg: &LabConfig) {
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", cfg.prefix)))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!Path::new("/sys/class/net").join(cfg.host_link()).exists(), "root veth left");
    assert!(!cfg.cgroup_dir().exists(), "cgroup left");
    for i in 1..=cfg.nodes {
        let pins = Path::new(lab::PIN_ROOT).join(cfg.node_name(i));
        assert!(!pins.exists(), "pins left at {}", pins.display());
    }
}

#[test]
fn netns_lab_nodes_talk_over_the_underlay_and_teardown_is_complete() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let cfg = LabConfig::for_test(2).expect("config");
    {
        let mut lab = Lab::up(cfg.clone()).expect("lab up");
        // Agents alone, before any control plane: only the lab can start
        // them (there is no DaemonSet yet).
        lab.set_install(Install::HandWired);
        for i in 1..=2 {
            lab.start_agent(i).expect("agent");
        }
        // node1 → node2, outside → node1, root (control plane) → node2.
        let srv = echo_server_in(&cfg.node_netns(2), cfg.node_ip(2));
        assert_eq!(echo_from(Some(&cfg.node_netns(1)), cfg.node_ip(2)).expect("n1→n2"), b"hello");
        srv.join().expect("server");
        let srv = echo_server_in(&cfg.node_netns(1), cfg.node_ip(1));
        assert_eq!(echo_from(Some(&cfg.outside_netns()), cfg.node_ip(1)).expect("out→n1"), b"hello");
        srv.join().expect("server");
        let srv = echo_server_in(&cfg.node_netns(2), cfg.node_ip(2));
        assert_eq!(echo_from(None, cfg.node_ip(2)).expect("root→n2"), b"hello");
        srv.join().expect("server");

        // Each agent pinned its node's datapath.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for i in 1..=2 {
            let map = Path::new(lab::PIN_ROOT).join(cfg.node_name(i)).join("rt_ep4_v1");
            while !map.exists() && std::time::Instant::now() < deadline {
                assert!(lab.exited().is_empty(), "agent died: {}", lab.agent_log_tail(i, 20));
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(map.exists(), "agent of node {i} pinned nothing: {}", lab.agent_log_tail(i, 20));
        }
        // The control plane listens on the lab's host address; kubectl works
        // against it, and a node can reach it over the underlay.
        lab.start_apiserver().expect("apiserver");
        let out = lab.kubectl().args(["get", "namespaces", "-o", "name"]).output().expect("kubectl");
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && names.contains("namespace/kube-system"), "kubectl get ns: {names} {}", String::from_utf8_lossy(&out.stderr));
        let api = cfg.apiserver_addr();
        let reachable = netns::run_in(&cfg.node_netns(1), move || {
            TcpStream::connect_timeout(&api, Duration::from_secs(3)).is_ok()
        })
        .expect("netns");
        assert!(reachable, "node 1 cannot reach the apiserver at {api}");

        // Nodes have no default route: nothing in the lab can leave the machine.
        let routes = std::process::Command::new("ip")
            .args(["-n", &cfg.node_netns(1), "route", "show", "default"])
            .output()
            .expect("ip route");
        assert!(routes.stdout.is_empty(), "node has a default route: {}", String::from_utf8_lossy(&routes.stdout));
        lab.down().expect("down");
        lab.down().expect("down twice is fine");
    }
    assert_nothing_left(&cfg);
}

#[test]
fn netns_lab_teardown_cleans_a_crashed_run() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut cfg = LabConfig::for_test(1).expect("config");
    // A different prefix from the other test in this process.
    cfg.prefix.push('c');
    cfg.subnet = cfg.subnet.wrapping_add(1);
    cfg.state_dir = cfg.state_dir.with_extension("crash");
    let mut lab = Lab::up(cfg.clone()).expect("lab up");
    lab.set_install(Install::HandWired);
    lab.start_agent(1).expect("agent");
    // Simulate a crash: the Lab value vanishes without running teardown,
    // leaving the agent running inside the node namespace.
    std::mem::forget(lab);
    assert!(netns::list().contains(&cfg.node_netns(1)));
    lab::teardown(&cfg.prefix, &cfg.state_dir).expect("teardown");
    assert_nothing_left(&cfg);
    lab::teardown(&cfg.prefix, &cfg.state_dir).expect("teardown again");
}
