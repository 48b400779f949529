//! Privileged test (root: eBPF pins, network namespaces) of NetworkPolicy
//! through the whole agent: apiserver + agent + kubectl in a fresh netns,
//! policies and labels changed with kubectl, and what `riptide policy
//! list`, `riptide policy check` and `riptide status` say, with the pinned
//! `rt_polep4_v1` and `rt_config_v1` read directly. Traffic verdicts are the
//! lab's (`tests/tests/netns_e2e_netpol.rs`); this checks the wiring.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::Ipv4Addr, process::Command};

use aya::maps::{Array, HashMap, Map, MapData};
use common::{Netns, add_node, agent_log_tail, apply, eventually, kill_agent, kubectl, riptide, start_agent, start_apiserver};
use riptide_common::{CFG_F_POLICY, Config, EndpointKey, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, PolicyEndpointValue, names};
use riptide_test_support::privileged;
use serde_json::Value;

/// `rt_polep4_v1` of the node's pins: address → flags.
fn polep(node: &str) -> Vec<(Ipv4Addr, u32)> {
    let path = format!("{}/{node}/{}", riptide_common::PIN_ROOT, names::POLEP4);
    let map: HashMap<MapData, EndpointKey, PolicyEndpointValue> = HashMap::try_from(Map::HashMap(MapData::from_pin(path).unwrap())).unwrap();
    let mut v: Vec<(Ipv4Addr, u32)> = map.iter().map(|r| r.unwrap()).map(|(k, e)| (Ipv4Addr::from(u32::from_be(k.addr_be)), e.flags)).collect();
    v.sort();
    v
}

/// `CFG_F_POLICY` in the node's pinned `rt_config_v1`.
fn policy_flag(node: &str) -> bool {
    let path = format!("{}/{node}/{}", riptide_common::PIN_ROOT, names::CONFIG);
    let map: Array<MapData, Config> = Array::try_from(Map::Array(MapData::from_pin(path).unwrap())).unwrap();
    map.get(&0, 0).unwrap().flags & CFG_F_POLICY != 0
}

/// A pod on `node` with `labels` and address `ip` (set through the status
/// subresource, as a kubelet does).
fn pod(ns: &Netns, kc: &std::path::Path, namespace: &str, name: &str, node: &str, ip: &str, labels: &str) {
    apply(
        ns,
        kc,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: \"{name}\", namespace: \"{namespace}\", labels: {{{labels}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: x\n    ports: [{{name: http, containerPort: 8080}}]\n"
        ),
    );
    let patch = format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
    kubectl(ns, kc, &["patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", &patch], None);
}

/// `riptide policy check` → (exit code, JSON).
fn check(ns: &Netns, from: &str, to: &str, port: &str) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(ns.path("agent.sock"))
        .args(["policy", "check", "--from", from, "--to", to, "--port", port, "-o", "json"])
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// The `riptide policy list` row of `pod`.
fn row(ns: &Netns, pod: &str) -> Option<Value> {
    riptide(ns, &["policy", "list"])?.as_array()?.iter().find(|r| r["pod"] == pod).cloned()
}

const ALLOW_Y: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: \"y\"}}
    ports:
    - {port: http}
";

/// A node namespace `tag` with its underlay, an apiserver, this node's
/// Node (podCIDR `pod_cidr`) and namespace `x`.
fn node_with_apiserver(tag: &str, pod_cidr: &str) -> (Netns, std::path::PathBuf, String) {
    let mut ns = Netns::new(tag);
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    add_node(&ns, &kc, &me, pod_cidr, "198.18.77.1");
    kubectl(&ns, &kc, &["create", "ns", "x"], None);
    (ns, kc, me)
}

#[test]
fn privileged_policy_list_check_and_status_follow_kubectl() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let (mut ns, kc, me) = node_with_apiserver("pol", "10.42.7.0/24");
    add_node(&ns, &kc, "peer", "10.42.8.0/24", "198.18.77.2");
    kubectl(&ns, &kc, &["create", "ns", "y"], None);
    pod(&ns, &kc, "x", "a", &me, "10.42.7.5", "app: a");
    pod(&ns, &kc, "x", "b", &me, "10.42.7.6", "app: b");
    pod(&ns, &kc, "y", "c", "peer", "10.42.8.7", "app: c");
    let agent = start_agent(&mut ns, &kc, &[]);

    // No policy: both local pods listed, none isolated, nothing enforced.
    eventually(&ns, "ready, two local pods listed", || {
        riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true && s["policy"]["synced"] == true)
            && riptide(&ns, &["policy", "list"]).is_some_and(|l| l.as_array().is_some_and(|a| a.len() == 2))
    });
    assert_eq!(row(&ns, "x/a").unwrap()["isolated_in"], false);
    assert!(polep(&me).is_empty() && !policy_flag(&me));
    let (code, v) = check(&ns, "x/b", "x/a", "8080/TCP");
    assert_eq!((code, &v["allowed"]), (0, &Value::Bool(true)), "{v}");

    // A policy isolates x/a: the map, the config flag, the list and check.
    apply(&ns, &kc, ALLOW_Y);
    eventually(&ns, "x/a isolated for ingress in rt_polep4_v1", || polep(&me).iter().any(|(ip, f)| *ip == Ipv4Addr::new(10, 42, 7, 5) && f & PE_F_ISOLATED_IN != 0));
    assert!(policy_flag(&me), "CFG_F_POLICY set once a pod is isolated");
    let a = row(&ns, "x/a").unwrap();
    assert_eq!((&a["isolated_in"], &a["isolated_out"], &a["fail_closed"], &a["pending"]), (&Value::Bool(true), &Value::Bool(false), &Value::Bool(false), &Value::Bool(false)), "{a}");
    assert_eq!(a["policies_in"], serde_json::json!(["allow-y"]), "{a}");
    assert_eq!(row(&ns, "x/b").unwrap()["isolated_in"], false);
    let (code, v) = check(&ns, "y/c", "x/a", "8080/TCP");
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ingress_policy"], "x/allow-y", "{v}");
    let (code, v) = check(&ns, "y/c", "x/a", "80/TCP");
    assert_eq!(code, 1, "only the named port: {v}");
    assert_eq!(v["ingress_isolated_by"], serde_json::json!(["x/allow-y"]), "{v}");
    let (code, v) = check(&ns, "x/b", "x/a", "8080/TCP");
    assert_eq!(code, 1, "x is not y: {v}");
    let (code, _) = check(&ns, "203.0.113.9/32", "x/a", "8080/TCP");
    assert_eq!(code, 1, "outside the cluster");
    let (code, _) = check(&ns, "198.18.77.1", "x/a", "80/TCP");
    assert_eq!(code, 0, "the node always reaches its pods");
    let st = riptide(&ns, &["status"]).unwrap();
    assert_eq!((&st["policy"]["enforcing"], &st["policy"]["endpoints"]), (&Value::Bool(true), &Value::from(1)), "{st}");

    // An Egress-only policy with no rules isolates x/b's egress; a label
    // change moves x/b out of it again.
    apply(
        &ns,
        &kc,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Egress]\n",
    );
    eventually(&ns, "x/b isolated for egress", || polep(&me).iter().any(|(ip, f)| *ip == Ipv4Addr::new(10, 42, 7, 6) && f & PE_F_ISOLATED_OUT != 0));
    kubectl(&ns, &kc, &["label", "pod", "b", "-n", "x", "app=other", "--overwrite"], None);
    eventually(&ns, "x/b leaves b-out with its label", || !polep(&me).iter().any(|(ip, _)| *ip == Ipv4Addr::new(10, 42, 7, 6)));

    // Restart (kill -9): the pins keep enforcing, the new agent converges
    // to the same state with nothing pending.
    let before = polep(&me);
    kill_agent(&mut ns, agent);
    assert_eq!(polep(&me), before, "pins outlive the agent");
    assert!(policy_flag(&me));
    start_agent(&mut ns, &kc, &[]);
    eventually(&ns, "agent back, ready, policy synced", || {
        riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true && s["policy"]["synced"] == true)
    });
    let log = std::fs::read_to_string(ns.path("agent.log")).unwrap();
    // Without the terminal colours tracing adds.
    let plain: String = log.split('\x1b').map(|part| part.split_once('m').filter(|(code, _)| code.starts_with('[')).map_or(part, |(_, rest)| rest)).collect();
    let first_pass = plain.lines().rev().find(|l| l.contains("NetworkPolicy written")).unwrap_or_default();
    assert!(first_pass.contains("read_back=true") && first_pass.contains("renumbered=false"), "the restarted agent adopted the pinned numbering: {first_pass}");
    let after: Vec<(Ipv4Addr, u32)> = polep(&me);
    assert_eq!(after.iter().map(|(ip, f)| (*ip, f & (PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT))).collect::<Vec<_>>(), [(Ipv4Addr::new(10, 42, 7, 5), PE_F_ISOLATED_IN)], "{}", agent_log_tail(&ns, 30));
    assert!(riptide(&ns, &["policy", "list"]).unwrap().as_array().unwrap().iter().all(|r| r["pending"] == false && r["fail_closed"] == false));
    let (code, v) = check(&ns, "y/c", "x/a", "8080/TCP");
    assert_eq!(code, 0, "{v}");

    // The last policy goes: nothing isolated, CFG_F_POLICY cleared.
    kubectl(&ns, &kc, &["delete", "networkpolicy", "allow-y", "b-out", "-n", "x"], None);
    eventually(&ns, "no endpoint entry, flag cleared", || polep(&me).is_empty() && !policy_flag(&me));
    let (code, v) = check(&ns, "x/b", "x/a", "80/TCP");
    assert_eq!(code, 0, "{v}");
}

/// `curl` from pod `from` to `to:80` with a 1 s connect timeout: its exit
/// code (7: refused, the SYN reached the pod; 28: timed out, dropped).
fn curl(ns: &Netns, from: &str, to: Ipv4Addr) -> i32 {
    let out = ns.pod_cmd(from, "curl").args(["-s", "--connect-timeout", "1", &format!("http://{to}:80/")]).output().unwrap();
    out.status.code().unwrap_or(-1)
}

/// The agent's metric line starting with `prefix` (the node namespace's
/// 127.0.0.1:9962).
fn metric(ns: &Netns, prefix: &str) -> Option<u64> {
    let out = ns.cmd("curl").args(["-s", "http://127.0.0.1:9962/metrics"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

#[test]
fn privileged_policy_drops_and_audits_show_up_as_events_and_metrics() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let (mut ns, kc, me) = node_with_apiserver("pev", "10.42.9.0/24");
    start_agent(&mut ns, &kc, &[]);
    eventually(&ns, "agent ready", || riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true));
    let a = ns.add_pod("a");
    let b = ns.add_pod("b");
    pod(&ns, &kc, "x", "a", &me, &a.to_string(), "app: a");
    pod(&ns, &kc, "x", "b", &me, &b.to_string(), "app: b");
    assert_eq!(curl(&ns, "a", b), 7, "no policy: the SYN reaches b (nothing listens: refused)");

    apply(&ns, &kc, "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-deny, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: b}}\n");
    eventually(&ns, "b isolated", || polep(&me).iter().any(|(ip, f)| *ip == b && f & PE_F_ISOLATED_IN != 0));
    assert_eq!(curl(&ns, "a", b), 28, "deny-all ingress drops the SYN");
    let events = || riptide(&ns, &["events"]).and_then(|v| v.as_array().cloned()).unwrap_or_default();
    let find = |verdict: &str| events().into_iter().find(|e| e["verdict"] == verdict && e["dst"] == format!("{b}:80"));
    eventually(&ns, "a policy-denied event", || find("policy-denied").is_some());
    let e = find("policy-denied").unwrap();
    assert_eq!((&e["direction"], &e["src_pod"], &e["dst_pod"], &e["protocol"], &e["reason"]), (&Value::from("ingress"), &Value::from("x/a"), &Value::from("x/b"), &Value::from("TCP"), &Value::from("policy_deny_in")), "{e}");
    let denied = r#"riptide_policy_verdicts_total{direction="ingress",verdict="deny"}"#;
    eventually(&ns, "the deny counted", || metric(&ns, denied).is_some_and(|n| n >= 1));

    // Audit mode on the namespace: the flow passes and is reported.
    kubectl(&ns, &kc, &["annotate", "ns", "x", "policy.riptide.io/audit=true"], None);
    eventually(&ns, "b audited", || polep(&me).iter().any(|(ip, f)| *ip == b && f & riptide_common::PE_F_AUDIT_IN != 0));
    assert_eq!(curl(&ns, "a", b), 7, "audit mode lets the SYN through");
    eventually(&ns, "a policy-audit event", || find("policy-audit").is_some());
    let e = find("policy-audit").unwrap();
    assert_eq!((&e["direction"], &e["src_pod"], &e["dst_pod"]), (&Value::from("ingress"), &Value::from("x/a"), &Value::from("x/b")), "{e}");
    let audited = r#"riptide_policy_verdicts_total{direction="ingress",verdict="audit"}"#;
    eventually(&ns, "the audit counted", || metric(&ns, audited).is_some_and(|n| n >= 1));
}
