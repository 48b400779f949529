//! End to end against our own apiserver (needs root: the agent loads eBPF
//! and programs routes). Everything runs inside a network namespace this
//! test creates — apiserver, agent, kubectl — so routes the agent writes
//! never reach the host. Assertions read the maps through `riptide service
//! list -o json`, i.e. what the datapath really holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{Netns, apply, eventually, kubectl, riptide, set_node_ip};
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
