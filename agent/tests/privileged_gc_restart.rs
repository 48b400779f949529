//! End to end with real traffic (needs root): the apiserver and the agent in
//! a node namespace, pods wired by the real CNI plugin, a socket-LB cgroup
//! this test creates, servers and clients as real processes (this binary
//! re-executed, see `agent_test_helper`).
//!
//! - restart: long-lived TCP connections through a ClusterIP — one
//!   translated by socket LB (client in the cgroup), one by the per-packet
//!   path with conntrack (client outside it) — keep exchanging data across
//!   `kill -9` of the agent and its restart; new connections work while it
//!   is down and after; the service maps and the live flows' conntrack and
//!   socket entries are identical afterwards (the GC ran several passes
//!   meanwhile, and cut nothing).
//! - stale UDP: connected UDP clients (socket LB and per-packet) pinned to
//!   a backend move to the remaining one when their backend stops serving
//!   and when it is deleted, although the old backend keeps answering.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use common::{
    Cgroup, HELPER_ENV, Helper, Netns, add_node, agent_log_tail, apply, eventually, eventually_for, kill_agent,
    riptide, spawn_helper, start_agent, start_apiserver,
};
use riptide_common::{CtKey, CtValue};
use riptide_datapath::{gc::FlowMaps, service::Services};
use riptide_test_support::privileged;

const HELPER: &str = "agent_test_helper";

fn service_yaml(name: &str, vip: &str, proto: &str, port: u16, target: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: p, port: {port}, targetPort: {target}, protocol: {proto}}}]\n"
    )
}

/// `(ip, ready, serving, terminating)` endpoints of one slice.
fn slice_yaml(service: &str, node: &str, proto: &str, port: u16, eps: &[(Ipv4Addr, bool, bool, bool)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: p, port: {port}, protocol: {proto}}}]\nendpoints:\n"
    );
    for (ip, ready, serving, terminating) in eps {
        s.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    if eps.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    s
}

/// Backends (`addr:port state`) of the frontend `fe` (`ip:port/PROTO`).
fn backends_of(ns: &Netns, fe: &str) -> Vec<String> {
    let Some(serde_json::Value::Array(list)) = riptide(ns, &["service", "list"]) else {
        return Vec::new();
    };
    let mut b: Vec<String> = list
        .iter()
        .filter(|f| f["frontend"] == fe)
        .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
        .map(|b| format!("{} {}", b["addr"].as_str().unwrap_or(""), b["state"].as_str().unwrap_or("")))
        .collect();
    b.sort();
    b
}

fn ready(ns: &Netns) -> bool {
    riptide(ns, &["status"]).is_some_and(|s| s["ready"] == true)
}

fn gc_passes(ns: &Netns) -> u64 {
    riptide(ns, &["status"]).and_then(|s| s["gc"]["passes"].as_u64()).unwrap_or(0)
}

/// Sends `word` through an interactive TCP client and checks the echo.
fn exchange(ns: &Netns, c: &mut Helper, word: &str) {
    let n = c.snapshot().len();
    c.send(word);
    let line = c.wait_line(n, "reply", Duration::from_secs(5));
    assert_eq!(
        line.as_deref(),
        Some(format!("reply echo {word}").as_str()),
        "client output: {:?}\nagent log:\n{}",
        c.snapshot(),
        agent_log_tail(ns, 30)
    );
}

/// A conntrack key as a tuple, and what matters of its value (backend, frontend).
type Flows = BTreeMap<(u32, u32, u16, u16, u8, u8), (u32, u16)>;

/// Conntrack entries of flows from or to `client`, without the timestamp.
fn flows_of(maps: &FlowMaps, client: Ipv4Addr) -> Flows {
    let c = u32::from(client).to_be();
    maps.conntrack()
        .unwrap()
        .into_iter()
        .filter(|(k, _): &(CtKey, CtValue)| k.saddr_be == c || k.daddr_be == c)
        .map(|(k, v)| ((k.saddr_be, k.daddr_be, k.sport_be, k.dport_be, k.proto, k.dir), (v.backend_id, v.revnat_id)))
        .collect()
}

#[test]
fn privileged_tcp_flows_survive_agent_kill_and_restart() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    // Declared first: dropped last, once every process in it is gone.
    let cg = Cgroup::new("rs");
    let mut ns = Netns::new("rs");
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    add_node(&ns, &kc, &me, "10.42.7.0/24", "198.18.77.1");
    let cg_path = cg.path.to_str().unwrap().to_owned();
    // A GC pass every second: several run while the flows live, none may
    // touch them.
    let agent_args = ["--cgroup", cg_path.as_str(), "--ct-gc-interval-s", "1"];
    let agent = start_agent(&mut ns, &kc, &agent_args);
    eventually(&ns, "agent ready and podCIDR handed to the CNI", || {
        ready(&ns) && std::fs::read_to_string(ns.path("podcidr")).is_ok_and(|s| s.trim() == "10.42.7.0/24")
    });

    let be = ns.add_pod("be");
    ns.add_pod("c1");
    let c2 = ns.add_pod("c2");
    let server = spawn_helper(&mut ns, "be", None, HELPER, "tcp-echo 8080");
    assert!(server.wait_line(0, "listening", Duration::from_secs(10)).is_some(), "echo server did not start");
    apply(&ns, &kc, &service_yaml("echo", "10.43.77.10", "TCP", 80, 8080));
    apply(&ns, &kc, &slice_yaml("echo", &me, "TCP", 8080, &[(be, true, true, false)]));
    eventually(&ns, "ClusterIP with the echo backend", || backends_of(&ns, "10.43.77.10:80/TCP") == vec![format!("{be}:8080 active")]);

    // c1 is in the socket-LB cgroup; c2 is not, so its flow goes through
    // rt_from_pod's DNAT and conntrack.
    let mut sock_lb = spawn_helper(&mut ns, "c1", Some(&cg), HELPER, "tcp-client 10.43.77.10:80");
    let mut per_packet = spawn_helper(&mut ns, "c2", None, HELPER, "tcp-client 10.43.77.10:80");
    for c in [&sock_lb, &per_packet] {
        let l = c.wait_line(0, "connected", Duration::from_secs(10)).expect("client connected");
        assert!(l.contains("peer=10.43.77.10:80"), "the application sees the ClusterIP: {l}");
    }
    exchange(&ns, &mut sock_lb, "before");
    exchange(&ns, &mut per_packet, "before");

    let flow_maps = FlowMaps::open_pinned(&me).unwrap();
    let ct_before = flows_of(&flow_maps, c2);
    assert_eq!(ct_before.len(), 2, "forward and reply entries of the per-packet flow: {ct_before:?}");
    let sockrev_before = flow_maps.sock_rev().unwrap();
    assert!(
        sockrev_before.iter().any(|(k, _)| u32::from_be(k.addr_be) == u32::from(be)),
        "socket LB remembered the connected socket: {sockrev_before:?}"
    );
    let dump = || {
        let s = Services::open_pinned(&me).unwrap();
        (s.dump_services(), s.dump_backends(), s.dump_revnat())
    };
    let maps_before = dump();

    // kill -9: nothing of the agent runs any more; the pinned programs,
    // links and maps carry on.
    kill_agent(&mut ns, agent);
    exchange(&ns, &mut sock_lb, "while-down");
    exchange(&ns, &mut per_packet, "while-down");
    let mut fresh = spawn_helper(&mut ns, "c1", Some(&cg), HELPER, "tcp-client 10.43.77.10:80");
    exchange(&ns, &mut fresh, "new-while-down");

    start_agent(&mut ns, &kc, &agent_args);
    eventually(&ns, "agent back and ready", || ready(&ns));
    let passes = gc_passes(&ns);
    eventually(&ns, "two more GC passes after the restart", || gc_passes(&ns) >= passes + 2);
    exchange(&ns, &mut sock_lb, "after");
    exchange(&ns, &mut per_packet, "after");
    for pod in ["c1", "c2"] {
        let cg = (pod == "c1").then_some(&cg);
        let mut c = spawn_helper(&mut ns, pod, cg, HELPER, "tcp-client 10.43.77.10:80");
        exchange(&ns, &mut c, &format!("new-after-{pod}"));
    }

    assert_eq!(maps_before, dump(), "a restart must not change the service maps");
    let ct_after = flows_of(&flow_maps, c2);
    for (k, v) in &ct_before {
        assert_eq!(ct_after.get(k), Some(v), "the live per-packet flow keeps its conntrack entries and backend: {ct_after:?}");
    }
    let sockrev_after = flow_maps.sock_rev().unwrap();
    for e in &sockrev_before {
        assert!(sockrev_after.contains(e), "socket-LB entry {e:?} survived the restart: {sockrev_after:?}");
    }
    let status = riptide(&ns, &["status"]).unwrap();
    assert_eq!(status["gc"]["stale_deleted"], 0, "{status}");
}

/// A Service without endpoints: both paths refuse the connection, and the
/// agent reports each refusal as an event naming the flow, the program and
/// the Service (`riptide events`).
#[test]
fn privileged_refused_connects_show_up_as_events() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let cg = Cgroup::new("ev");
    let mut ns = Netns::new("ev");
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    add_node(&ns, &kc, &me, "10.42.8.0/24", "198.18.78.1");
    let cg_path = cg.path.to_str().unwrap().to_owned();
    start_agent(&mut ns, &kc, &["--cgroup", cg_path.as_str()]);
    eventually(&ns, "agent ready", || ready(&ns));
    ns.add_pod("c1");
    let c2 = ns.add_pod("c2");
    apply(&ns, &kc, &service_yaml("empty", "10.43.78.10", "TCP", 80, 8080));
    apply(&ns, &kc, &slice_yaml("empty", &me, "TCP", 8080, &[]));
    let vip = "10.43.78.10:80";
    eventually(&ns, "the empty Service is in the maps", || {
        riptide(&ns, &["service", "list"]).is_some_and(|l| l.to_string().contains(&format!("{vip}/TCP")))
    });

    // c1 is in the socket-LB cgroup (connect fails with ECONNREFUSED); c2
    // is not (rt_from_pod answers its SYN with a RST).
    for (pod, cg) in [("c1", Some(&cg)), ("c2", None)] {
        let c = spawn_helper(&mut ns, pod, cg, HELPER, &format!("tcp-client {vip}"));
        let l = c.wait_line(0, "", Duration::from_secs(10)).expect("client result");
        assert!(l.starts_with("error connect") && l.contains("refused"), "{pod}: {l}");
    }

    let events = || riptide(&ns, &["events"]).and_then(|v| v.as_array().cloned()).unwrap_or_default();
    let find = |list: &[serde_json::Value], program: &str| {
        list.iter().find(|e| e["program"] == program && e["dst"] == vip).cloned()
    };
    eventually(&ns, "both refusals reported", || {
        let l = events();
        find(&l, "socket-lb").is_some() && find(&l, "from-pod").is_some()
    });
    let list = events();
    let sock = find(&list, "socket-lb").unwrap();
    assert_eq!(sock["reason"], "sock_no_backend", "{sock}");
    assert_eq!(sock["protocol"], "TCP", "{sock}");
    assert_eq!(sock["service"], "default/empty:p", "{sock}");
    let tc = find(&list, "from-pod").unwrap();
    assert_eq!(tc["reason"], "drop_no_backend", "{tc}");
    assert_eq!(tc["service"], "default/empty:p", "{tc}");
    assert!(tc["src"].as_str().unwrap().starts_with(&format!("{c2}:")), "the client pod's address: {tc}");
    // Paging: nothing after the newest.
    let newest = list.iter().filter_map(|e| e["seq"].as_u64()).max().unwrap();
    let after = riptide(&ns, &["events", "--since", &(newest + 1).to_string()]).unwrap();
    assert_eq!(after, serde_json::json!([]), "{after}");
    // The log names them too (what an operator tails).
    let log = agent_log_tail(&ns, 200);
    assert!(log.contains("datapath event") && log.contains("sock_no_backend"), "{log}");
}

/// Waits until the client's last `n` lines are all `reply <name>`.
fn settles_on(ns: &Netns, c: &Helper, name: &str, what: &str) {
    let want = format!("reply {name}");
    eventually_for(ns, what, Duration::from_secs(15), || {
        let l = c.snapshot();
        l.len() >= 5 && l[l.len() - 5..].iter().all(|x| *x == want)
    });
}

#[test]
fn privileged_udp_clients_move_off_removed_backends() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let cg = Cgroup::new("udp");
    let mut ns = Netns::new("udp");
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    add_node(&ns, &kc, &me, "10.42.7.0/24", "198.18.77.1");
    let cg_path = cg.path.to_str().unwrap().to_owned();
    // Default GC interval (30 s): moving clients within seconds is the
    // change-triggered pass's doing.
    start_agent(&mut ns, &kc, &["--cgroup", cg_path.as_str()]);
    eventually(&ns, "agent ready", || ready(&ns) && ns.path("podcidr").exists());

    let u1 = ns.add_pod("u1");
    let u2 = ns.add_pod("u2");
    ns.add_pod("c1");
    ns.add_pod("c2");
    for (pod, name) in [("u1", "u1"), ("u2", "u2")] {
        let s = spawn_helper(&mut ns, pod, None, HELPER, &format!("udp-echo 5353 {name}"));
        assert!(s.wait_line(0, "listening", Duration::from_secs(10)).is_some());
    }
    apply(&ns, &kc, &service_yaml("dns", "10.43.77.53", "UDP", 53, 5353));
    apply(&ns, &kc, &slice_yaml("dns", &me, "UDP", 5353, &[(u1, true, true, false)]));
    eventually(&ns, "ClusterIP with u1", || backends_of(&ns, "10.43.77.53:53/UDP") == vec![format!("{u1}:5353 active")]);

    let sock_lb = spawn_helper(&mut ns, "c1", Some(&cg), HELPER, "udp-client 10.43.77.53:53");
    let per_packet = spawn_helper(&mut ns, "c2", None, HELPER, "udp-client 10.43.77.53:53");
    settles_on(&ns, &sock_lb, "u1", "socket-LB client talks to u1");
    settles_on(&ns, &per_packet, "u1", "per-packet client talks to u1");

    // u2 becomes ready, u1 stops serving (but keeps running and answering:
    // only the agent can make the clients leave it).
    apply(&ns, &kc, &slice_yaml("dns", &me, "UDP", 5353, &[(u1, false, false, false), (u2, true, true, false)]));
    settles_on(&ns, &sock_lb, "u2", "socket-LB client moved to u2");
    settles_on(&ns, &per_packet, "u2", "per-packet client moved to u2");
    let l = sock_lb.snapshot();
    assert!(
        l.iter().any(|x| x.starts_with("error") && (x.contains(&libc::ECONNABORTED.to_string()) || x.contains(&libc::EDESTADDRREQ.to_string()))),
        "the socket-LB client's socket was aborted and it reconnected: {l:?}"
    );
    let status = riptide(&ns, &["status"]).unwrap();
    assert!(status["gc"]["udp_sockets_destroyed"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["gc"]["stale_deleted"].as_u64().unwrap() >= 2, "conntrack entries of the per-packet flow: {status}");

    // u2 deleted, u1 ready again: both move back.
    apply(&ns, &kc, &slice_yaml("dns", &me, "UDP", 5353, &[(u1, true, true, false)]));
    settles_on(&ns, &sock_lb, "u1", "socket-LB client moved back to u1");
    settles_on(&ns, &per_packet, "u1", "per-packet client moved back to u1");
}

/// Not a test: the server and client processes of the tests above, chosen
/// by [`HELPER_ENV`]. Output lines start with `OUT `.
#[test]
#[ignore = "helper process for the end-to-end tests"]
fn agent_test_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<&str> = spec.split_whitespace().collect();
    let out = common::helper_out;
    match args[..] {
        ["tcp-echo", port] => common::tcp_echo_server(port),
        ["tcp-client", target] => {
            let target: SocketAddrV4 = target.parse().unwrap();
            let s = match TcpStream::connect_timeout(&target.into(), Duration::from_secs(5)) {
                Ok(s) => s,
                Err(e) => return out(format!("error connect {e}")),
            };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            out(format!("connected peer={} local={}", s.peer_addr().unwrap(), s.local_addr().unwrap()));
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            for cmd in std::io::stdin().lines() {
                let Ok(cmd) = cmd else { break };
                if let Err(e) = writeln!(w, "{cmd}") {
                    out(format!("error write {e}"));
                    continue;
                }
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) => out("error closed".into()),
                    Ok(_) => out(format!("reply {}", line.trim_end())),
                    Err(e) => out(format!("error read {e}")),
                }
            }
        }
        ["udp-echo", port, name] => {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port.parse::<u16>().unwrap())).unwrap();
            out("listening".into());
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(name.as_bytes(), from);
            }
        }
        ["udp-client", target] => {
            // A well-behaved connected UDP client (a DNS resolver, say):
            // one socket, reconnected when the kernel reports an error.
            let target: SocketAddrV4 = target.parse().unwrap();
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            s.connect(target).unwrap();
            let mut buf = [0u8; 64];
            for seq in 0u64.. {
                let res = s.send(seq.to_string().as_bytes()).and_then(|_| s.recv(&mut buf));
                match res {
                    Ok(n) => out(format!("reply {}", String::from_utf8_lossy(&buf[..n]))),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => out("timeout".into()),
                    Err(e) => {
                        out(format!("error {} {e}", e.raw_os_error().unwrap_or(0)));
                        match s.connect(target) {
                            Ok(()) => out("reconnected".into()),
                            Err(e) => out(format!("error reconnect {e}")),
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        _ => panic!("unknown helper spec {spec:?}"),
    }
}
