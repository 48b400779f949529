//! Privileged: the kube-proxy-shaped baseline rules load for real
//! (iptables-restore and nft, in a throwaway netns), and DNAT a connection to
//! the ClusterIP onto the backend.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use riptide_tests::{
    bench::kubeproxy::{self, Proto, SvcPort},
    netns,
};
use riptide_test_support::privileged;

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = netns::ip(&["netns", "del", &self.0]);
    }
}

fn load(ns: &str, prog: &str, args: &[&str], input: &str) -> std::process::Output {
    let mut child = netns::command(ns, prog)
        .expect("netns")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write");
    child.wait_with_output().expect("wait")
}

fn measured(backend: Ipv4Addr) -> Vec<SvcPort> {
    vec![SvcPort {
        name: "default/web:http".into(),
        vip: Ipv4Addr::new(10, 43, 0, 10),
        proto: Proto::Tcp,
        port: 80,
        node_port: None,
        endpoints: vec![(backend, 7070)],
    }]
}

/// With the rules loaded, a connect to 10.43.0.10:80 inside the netns lands
/// on the backend listening on 127.0.0.1-reachable address :7070.
fn assert_clusterip_reaches_backend(ns: &str, backend: Ipv4Addr) {
    let ok = netns::run_in(ns, move || {
        let l = TcpListener::bind((backend, 7070)).expect("bind backend");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.write_all(b"pong").expect("write");
        });
        let mut c = TcpStream::connect_timeout(&(Ipv4Addr::new(10, 43, 0, 10), 80).into(), Duration::from_secs(3))
            .expect("connect to the ClusterIP");
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).expect("read");
        t.join().expect("backend");
        buf == *b"pong"
    })
    .expect("netns");
    assert!(ok);
}

fn setup(tag: &str) -> (Ns, Ipv4Addr) {
    let name = format!("rtkp{}{tag}", std::process::id());
    netns::ip(&["netns", "add", &name]).expect("netns add");
    let ns = Ns(name);
    // A dummy-less setup: a veth pair inside the netns gives the backend an
    // address and the ClusterIP range a route (the netns has no way out).
    netns::ip(&["-n", &ns.0, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]).expect("veth");
    netns::ip(&["-n", &ns.0, "addr", "add", "198.18.99.1/24", "dev", "v0"]).expect("addr");
    for dev in ["v0", "v1", "lo"] {
        netns::ip(&["-n", &ns.0, "link", "set", dev, "up"]).expect("up");
    }
    netns::ip(&["-n", &ns.0, "route", "add", "10.43.0.0/16", "dev", "v0"]).expect("route");
    (ns, Ipv4Addr::new(198, 18, 99, 1))
}

#[test]
fn netns_iptables_baseline_loads_and_dnats() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let (ns, backend) = setup("i");
    let rules = kubeproxy::iptables_restore(&kubeproxy::services_with(500, &measured(backend), backend));
    let out = load(&ns.0, "iptables-restore", &[], &rules);
    assert!(out.status.success(), "iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
    let listed = netns::command(&ns.0, "iptables-save").expect("netns").output().expect("iptables-save");
    let saved = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(saved.matches("-A KUBE-SERVICES -d").count(), 500, "one KUBE-SERVICES rule per Service port");
    assert_clusterip_reaches_backend(&ns.0, backend);
}

#[test]
fn netns_nftables_baseline_loads_and_dnats() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let (ns, backend) = setup("n");
    let script = kubeproxy::nft_script(&kubeproxy::services_with(500, &measured(backend), backend));
    let out = load(&ns.0, "nft", &["-f", "-"], &script);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    assert_clusterip_reaches_backend(&ns.0, backend);
}
