//! End to end against our own apiserver (needs root: the agent loads eBPF
//! and programs routes). Everything runs inside a network namespace this
//! test creates — apiserver, agent, kubectl — so routes the agent writes
//! never reach the host. Assertions read the maps through `riptide service
//! list -o json`, i.e. what the datapath really holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{
    HELPER_ENV, Netns, add_node, agent_log_tail, apply, eventually, eventually_for, kubectl, riptide, set_node_ip,
    spawn_helper,
};
use serde_json::Value;
use riptide_test_support::privileged;

fn start_agent(ns: &mut Netns, kc: &Path) -> usize {
    common::start_agent(ns, kc, &[])
}

fn start_apiserver(ns: &mut Netns) -> std::path::PathBuf {
    common::start_apiserver(ns)
}

/// Frontends of `service` (port name prefix) → sorted backend "addr state".
fn frontends(ns: &Netns, service: &str) -> Vec<(String, String, Vec<String>)> {
    let Some(Value::Array(list)) = riptide(ns, &["service", "list"]) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String, Vec<String>)> = list
        .iter()
        .filter(|f| f["service"].as_str().is_some_and(|s| s.starts_with(service)))
        .map(|f| {
            let mut b: Vec<String> = f["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| format!("{} {}", b["addr"].as_str().unwrap(), b["state"].as_str().unwrap()))
                .collect();
            b.sort();
            (f["frontend"].as_str().unwrap().to_owned(), f["scope"].as_str().unwrap().to_owned(), b)
        })
        .collect();
    out.sort();
    out
}

fn nodes_yaml(me: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: {me}}}
spec: {{podCIDR: 10.42.7.0/24, podCIDRs: [10.42.7.0/24]}}
---
apiVersion: v1
kind: Node
metadata: {{name: {me}-peer}}
spec: {{podCIDR: 10.42.8.0/24, podCIDRs: [10.42.8.0/24]}}
"#
    )
}

fn slice_yaml(name: &str, port: u16, eps: &[(&str, &str, bool, bool, bool)]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints:\n"
    );
    for (ip, node, ready, serving, terminating) in eps {
        s.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n"
        ));
    }
    s
}

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
"#;

#[test]
fn privileged_agent_converges_with_the_apiserver() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("e2e");
    // The node's underlay: routes via the peer need it on-link.
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    apply(&ns, &kc, &nodes_yaml(&me));
    set_node_ip(&ns, &kc, &me, "198.18.77.1");
    set_node_ip(&ns, &kc, &format!("{me}-peer"), "198.18.77.2");
    apply(&ns, &kc, SERVICE);
    apply(&ns, &kc, &slice_yaml("web-a", 8080, &[("10.42.7.5", &me, true, true, false), ("10.42.8.5", "peer", true, true, false)]));
    let agent = start_agent(&mut ns, &kc);

    // Initial sync: ClusterIP and NodePort, both ready backends, port from the slice.
    eventually(&ns, "ClusterIP and NodePort with 2 backends", || {
        let f = frontends(&ns, "default/web:http");
        f.len() == 2
            && f.iter().all(|(_, _, b)| *b == vec!["10.42.7.5:8080 active".to_owned(), "10.42.8.5:8080 active".to_owned()])
            && f.iter().any(|(fe, _, _)| fe.starts_with("0.0.0.0:"))
    });
    let status = riptide(&ns, &["status"]).unwrap();
    assert_eq!(status["ready"], true);

    // Node routing and the podCIDR handed to the CNI.
    eventually(&ns, "podCIDR file", || std::fs::read_to_string(ns.path("podcidr")).is_ok_and(|s| s.trim() == "10.42.7.0/24"));
    eventually(&ns, "route to the peer's podCIDR", || {
        let out = ns.cmd("ip").args(["route", "show", "proto", "201"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("10.42.8.0/24 via 198.18.77.2")
    });

    // Named port resolved per slice: a second slice with another number.
    apply(&ns, &kc, &slice_yaml("web-b", 9090, &[("10.42.8.6", "peer", true, true, false)]));
    eventually(&ns, "backend from the second slice on port 9090", || {
        frontends(&ns, "default/web:http").iter().all(|(_, _, b)| b.contains(&"10.42.8.6:9090 active".to_owned()) && b.len() == 3)
    });

    // Terminating: not picked while others are ready ...
    apply(&ns, &kc, &slice_yaml("web-a", 8080, &[("10.42.7.5", &me, false, true, true), ("10.42.8.5", "peer", true, true, false)]));
    eventually(&ns, "terminating endpoint leaves the slots", || {
        frontends(&ns, "default/web:http").iter().all(|(_, _, b)| !b.iter().any(|x| x.starts_with("10.42.7.5")) && b.len() == 2)
    });
    // ... and used when nothing is ready (KEP-1669).
    kubectl(&ns, &kc, &["delete", "endpointslice", "web-b"], None);
    apply(&ns, &kc, &slice_yaml("web-a", 8080, &[("10.42.7.5", &me, false, true, true), ("10.42.8.5", "peer", false, false, true)]));
    eventually(&ns, "serving-terminating fallback", || {
        frontends(&ns, "default/web:http").iter().all(|(_, _, b)| *b == vec!["10.42.7.5:8080 terminating".to_owned()])
    });

    // Restart: kill -9, start again; same entries, same backend ids.
    let ids_before = riptide(&ns, &["service", "list"]).unwrap();
    let _ = ns.procs[agent].kill();
    let _ = ns.procs[agent].wait();
    start_agent(&mut ns, &kc);
    eventually(&ns, "agent back and ready", || riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true));
    let ids_after = riptide(&ns, &["service", "list"]).unwrap();
    assert_eq!(ids_before, ids_after, "a restart must not change the maps");

    // Opt-outs: another proxy's label, then the headless label.
    kubectl(&ns, &kc, &["label", "service", "web", "service.kubernetes.io/service-proxy-name=other"], None);
    eventually(&ns, "service-proxy-name opt-out", || frontends(&ns, "default/web").is_empty());
    kubectl(&ns, &kc, &["label", "service", "web", "service.kubernetes.io/service-proxy-name-"], None);
    eventually(&ns, "label removed: back", || frontends(&ns, "default/web:http").len() == 2);
    kubectl(&ns, &kc, &["label", "service", "web", "service.kubernetes.io/headless="], None);
    eventually(&ns, "headless opt-out", || frontends(&ns, "default/web").is_empty());
    kubectl(&ns, &kc, &["label", "service", "web", "service.kubernetes.io/headless-"], None);
    eventually(&ns, "back again", || frontends(&ns, "default/web:http").len() == 2);

    // Delete: the entries go; the peer node goes: its route goes.
    kubectl(&ns, &kc, &["delete", "service", "web"], None);
    eventually(&ns, "service deleted", || {
        riptide(&ns, &["service", "list"]).is_some_and(|v| {
            v.as_array().is_some_and(|l| !l.iter().any(|f| f["service"].as_str().is_some_and(|s| s.starts_with("default/web"))))
        })
    });
    kubectl(&ns, &kc, &["delete", "node", &format!("{me}-peer")], None);
    eventually(&ns, "route removed with the node", || {
        let out = ns.cmd("ip").args(["route", "show", "proto", "201"]).output().unwrap();
        out.stdout.is_empty()
    });
}

const HELPER: &str = "apiserver_test_helper";

fn cluster_ip_yaml(name: &str, vip: &str, backend: Ipv4Addr, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: p, port: 80, targetPort: 8080, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: p, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [{backend}]\n  nodeName: {node}\n  conditions: {{ready: true, serving: true, terminating: false}}\n"
    )
}

/// ClusterIP frontends (`ip:port/TCP`) the maps hold.
fn frontend_addrs(ns: &Netns) -> Vec<String> {
    let Some(Value::Array(list)) = riptide(ns, &["service", "list"]) else {
        return Vec::new();
    };
    let mut v: Vec<String> = list.iter().filter_map(|f| f["frontend"].as_str().map(str::to_owned)).collect();
    v.sort();
    v
}

/// `riptide status` (exit code, JSON), whatever the exit code.
fn status_exit(ns: &Netns) -> (Option<i32>, Option<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(ns.path("agent.sock"))
        .args(["status", "-o", "json"])
        .output()
        .unwrap();
    (out.status.code(), serde_json::from_slice(&out.stdout).ok())
}

/// The apiserver stops for several times `--stale-after-s` while a pod
/// keeps opening connections to a ClusterIP and talking over one
/// long-lived connection: none of them fails, the agent says stale (not
/// ready, `riptide status` exits 1). Meanwhile the cluster changes behind
/// its back (the apiserver runs briefly on another address the agent does
/// not know: a Service deleted, one added); once the apiserver is back on
/// its address, the agent relists and the maps converge on both changes.
#[test]
fn privileged_traffic_flows_while_the_apiserver_is_down_and_changes_converge_after() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("down");
    ns.underlay();
    let listen = "127.0.0.1:16444";
    let kc = common::start_apiserver_on(&mut ns, listen);
    let api = ns.procs.len() - 1;
    let me = ns.node.clone();
    add_node(&ns, &kc, &me, "10.42.7.0/24", "198.18.77.1");
    common::start_agent(&mut ns, &kc, &["--stale-after-s", "2"]);
    eventually(&ns, "agent ready and podCIDR handed to the CNI", || {
        status_exit(&ns).1.is_some_and(|s| s["ready"] == true)
            && std::fs::read_to_string(ns.path("podcidr")).is_ok_and(|s| s.trim() == "10.42.7.0/24")
    });

    let be = ns.add_pod("be");
    ns.add_pod("c");
    let server = spawn_helper(&mut ns, "be", None, HELPER, "tcp-echo 8080");
    assert!(server.wait_line(0, "listening", Duration::from_secs(10)).is_some(), "echo server did not start");
    apply(&ns, &kc, &cluster_ip_yaml("web", "10.43.77.20", be, &me));
    apply(&ns, &kc, &cluster_ip_yaml("gone", "10.43.77.21", be, &me));
    eventually(&ns, "web and gone in the maps", || {
        let f = frontend_addrs(&ns);
        f.contains(&"10.43.77.20:80/TCP".to_owned()) && f.contains(&"10.43.77.21:80/TCP".to_owned())
    });

    // The client pod is outside any socket-LB cgroup: every packet goes
    // through rt_from_pod's translation and conntrack.
    let client = spawn_helper(&mut ns, "c", None, HELPER, "tcp-churn 10.43.77.20:80");
    let progress = |c: &common::Helper| c.snapshot().iter().filter(|l| l.starts_with("ok")).count();
    let errors = |c: &common::Helper| c.snapshot().into_iter().filter(|l| !l.starts_with("ok")).collect::<Vec<_>>();
    eventually(&ns, "the client is talking", || progress(&client) >= 10);

    // Down, for five times --stale-after-s in all.
    let down = Instant::now();
    ns.procs[api].kill().unwrap();
    ns.procs[api].wait().unwrap();
    eventually(&ns, "status says stale; riptide status exits 1", || {
        let (code, st) = status_exit(&ns);
        code == Some(1) && st.is_some_and(|s| s["ready"] == false && s["stale"].as_str().is_some_and(|m| m.contains("apiserver unreachable")))
    });
    let before = progress(&client);

    // The cluster changes where the agent cannot see it.
    let hidden = common::start_apiserver_on(&mut ns, "127.0.0.1:16445");
    let hidden_api = ns.procs.len() - 1;
    kubectl(&ns, &hidden, &["delete", "service", "gone"], None);
    kubectl(&ns, &hidden, &["delete", "endpointslice", "gone-1"], None);
    apply(&ns, &hidden, &cluster_ip_yaml("new", "10.43.77.22", be, &me));
    ns.procs[hidden_api].kill().unwrap();
    ns.procs[hidden_api].wait().unwrap();
    std::thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    assert!(status_exit(&ns).0 == Some(1), "still stale before the apiserver returns");
    assert!(
        frontend_addrs(&ns).contains(&"10.43.77.21:80/TCP".to_owned()),
        "the agent cannot know about the deletion yet: the maps keep the last view"
    );
    assert!(progress(&client) > before + 20, "traffic kept flowing while the apiserver was down: {:?}", client.snapshot().last());
    assert_eq!(errors(&client), Vec::<String>::new(), "no connection failed while the apiserver was down");

    // Back on its address: ready again, the deletion and the addition made
    // meanwhile reach the maps.
    let kc2 = common::start_apiserver_on(&mut ns, listen);
    assert_eq!(kc2, kc);
    eventually_for(&ns, "ready again after the apiserver returned", Duration::from_secs(60), || {
        let (code, st) = status_exit(&ns);
        code == Some(0) && st.is_some_and(|s| s["ready"] == true && s["stale"].is_null())
    });
    eventually_for(&ns, "the changes made while disconnected converge", Duration::from_secs(60), || {
        let f = frontend_addrs(&ns);
        f.contains(&"10.43.77.20:80/TCP".to_owned())
            && f.contains(&"10.43.77.22:80/TCP".to_owned())
            && !f.contains(&"10.43.77.21:80/TCP".to_owned())
    });
    let after = progress(&client);
    eventually(&ns, "traffic still flows after the recovery", || progress(&client) > after + 10);
    assert_eq!(errors(&client), Vec::<String>::new(), "no connection failed at all: agent log:\n{}", agent_log_tail(&ns, 30));
}

/// Not a test: the server and client processes of the test above, chosen
/// by [`HELPER_ENV`]. Output lines start with `OUT `.
#[test]
#[ignore = "helper process for the end-to-end tests"]
fn apiserver_test_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let args: Vec<&str> = spec.split_whitespace().collect();
    let out = common::helper_out;
    let timeout = Duration::from_secs(2);
    match args[..] {
        ["tcp-echo", port] => common::tcp_echo_server(port),
        // One long-lived connection plus a new connection every 20 ms,
        // each round trip checked: `ok <n>`, or `error <what>`.
        ["tcp-churn", target] => {
            let target: SocketAddrV4 = target.parse().unwrap();
            let connect = || -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
                let s = TcpStream::connect_timeout(&target.into(), timeout)?;
                s.set_read_timeout(Some(timeout))?;
                let r = BufReader::new(s.try_clone()?);
                Ok((s, r))
            };
            let round_trip = |(w, r): &mut (TcpStream, BufReader<TcpStream>), word: &str| -> std::io::Result<()> {
                writeln!(w, "{word}")?;
                let mut line = String::new();
                r.read_line(&mut line)?;
                if line.trim_end() == format!("echo {word}") {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("unexpected reply {line:?}")))
                }
            };
            let mut long = match connect() {
                Ok(c) => c,
                Err(e) => return out(format!("error connect long-lived {e}")),
            };
            for n in 0u64.. {
                if let Err(e) = round_trip(&mut long, &format!("long-{n}")) {
                    out(format!("error long-lived {e}"));
                }
                match connect() {
                    Ok(mut c) => match round_trip(&mut c, &format!("new-{n}")) {
                        Ok(()) => out(format!("ok {n}")),
                        Err(e) => out(format!("error new {n} {e}")),
                    },
                    Err(e) => out(format!("error connect {n} {e}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        _ => panic!("unknown helper spec {spec:?}"),
    }
}
