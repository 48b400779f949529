//! Truth tables modelled on the upstream netpol e2e suite
//! (test/e2e/network/netpol): namespaces x, y, z × pods a, b, c labelled
//! `pod=<name>`, each serving TCP and UDP on 80 and 81 (named
//! `serve-<port>-<proto>`), every pod probing every pod; each case compares
//! the whole 9×9 matrix (via [`Compiled::check`], i.e. the datapath's
//! lookups on the compiled maps) with the expected one and prints both on
//! failure. Loopback is always allowed, as upstream expects.

use std::{fmt::Write as _, net::Ipv4Addr, sync::Arc, time::Instant};

use k8s_openapi::api::{
    core::v1::Namespace,
    networking::v1::NetworkPolicy,
};
use riptide_common::{
    PE_F_ANY_IN, PE_F_ANY_OUT, PE_F_AUDIT_IN, PE_F_EXACT_IN, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, POL_DIR_INGRESS,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, identity, proto,
};
use serde_json::{Value, json};

use super::*;
use crate::slim::{SlimNode as Node, SlimPod as Pod};

const NODE: &str = "n1";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const REMOTE_NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const PODS: [&str; 9] = ["x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"];
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 9, 10);

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

/// Address of `ns/pod` in the standard cluster: 10.42.<ns>.<pod>.
fn ip_of(pod: &str) -> Ipv4Addr {
    let (ns, name) = pod.split_once('/').unwrap();
    let n = match ns {
        "x" => 1,
        "y" => 2,
        "z" => 3,
        _ => 9,
    };
    Ipv4Addr::new(10, 42, n, name.as_bytes()[0] - b'a' + 1)
}

fn serve_ports() -> Value {
    json!([
        {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
        {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
        {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
        {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"},
    ])
}

fn pod_json(ns: &str, name: &str, labels: Value, ip: Ipv4Addr, node: &str, ports: Value) -> Value {
    json!({
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

fn policy(ns: &str, name: &str, spec: Value) -> Arc<NetworkPolicy> {
    from_json(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
}

fn namespace(name: &str, labels: Value) -> Arc<Namespace> {
    from_json(json!({"metadata": {"name": name, "labels": labels}}))
}

fn node(name: &str, ip: Ipv4Addr) -> Arc<Node> {
    from_json(json!({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]}}))
}

struct Cluster {
    namespaces: Vec<Arc<Namespace>>,
    pods: Vec<Arc<Pod>>,
    policies: Vec<Arc<NetworkPolicy>>,
    nodes: Vec<Arc<Node>>,
    host: Vec<Ipv4Addr>,
}

impl Cluster {
    /// x, y, z × a, b, c on the local node, plus kube-system/coredns.
    /// Namespaces carry `ns=<name>` only: `kubernetes.io/metadata.name` is
    /// left to the compiler.
    fn new() -> Self {
        let mut c = Self {
            namespaces: ["x", "y", "z"].iter().map(|n| namespace(n, json!({"ns": n}))).collect(),
            pods: Vec::new(),
            policies: Vec::new(),
            nodes: vec![node(NODE, NODE_IP), node("n2", REMOTE_NODE_IP)],
            host: vec![NODE_IP, HAIRPIN],
        };
        c.namespaces.push(namespace("kube-system", json!({})));
        for p in PODS {
            let (ns, name) = p.split_once('/').unwrap();
            c.pods.push(from_json(pod_json(ns, name, json!({"pod": name}), ip_of(p), NODE, serve_ports())));
        }
        c.pods.push(from_json(pod_json(
            "kube-system",
            "coredns",
            json!({"k8s-app": "kube-dns"}),
            DNS_IP,
            "n2",
            json!([{"name": "dns", "containerPort": 53, "protocol": "UDP"}, {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}]),
        )));
        c
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            pods: &self.pods,
            namespaces: &self.namespaces,
            policies: &self.policies,
            nodes: &self.nodes,
            node_name: NODE,
            host_addrs: &self.host,
        }
    }

    fn compile(&self) -> Checked {
        self.compile_with(&mut Compiler::new())
    }

    fn compile_with(&self, compiler: &mut Compiler) -> Checked {
        let out = compiler.compile(&self.inputs());
        assert_canonical(&out);
        Checked {
            compiled: out,
            pods: self.pods.clone(),
        }
    }

    fn with(mut self, p: Arc<NetworkPolicy>) -> Self {
        self.policies.push(p);
        self
    }

    /// Index of `ns/name` in `pods`.
    fn pod_index(&self, pod: &str) -> usize {
        let (ns, name) = pod.split_once('/').unwrap();
        self.pods
            .iter()
            .position(|p| p.namespace() == ns && p.name() == name)
            .unwrap()
    }

    fn set_pod_labels(&mut self, pod: &str, labels: Value) {
        let idx = self.pod_index(pod);
        let mut new = (*self.pods[idx]).clone();
        new.set_labels(serde_json::from_value(labels).unwrap());
        self.pods[idx] = Arc::new(new);
    }

    fn set_ns_labels(&mut self, ns: &str, labels: Value) {
        let idx = self.namespaces.iter().position(|n| n.metadata.name.as_deref() == Some(ns)).unwrap();
        self.namespaces[idx] = namespace(ns, labels);
    }
}

/// A compile and the pods it was compiled from, which name the pods of a
/// check (the agent names them from its pod store).
#[derive(Debug)]
struct Checked {
    compiled: Compiled,
    pods: Vec<Arc<Pod>>,
}

impl std::ops::Deref for Checked {
    type Target = Compiled;

    fn deref(&self) -> &Compiled {
        &self.compiled
    }
}

impl PartialEq for Checked {
    fn eq(&self, other: &Self) -> bool {
        self.compiled == other.compiled
    }
}

impl Checked {
    fn check(&self, from: &Peer, to: &Peer, port: u16, proto: u8) -> Result<Verdict, CheckError> {
        self.compiled.check(&self.pods, from, to, port, proto)
    }
}

/// Every rule key has zero bits past its prefix (the kernel trie would
/// merge such keys; the map diff must not see two).
fn assert_canonical(c: &Compiled) {
    for k in c.rules.keys() {
        let port = u16::from_be(k.key.port_be);
        let port_bits = k.prefix_len.saturating_sub(POLICY_PREFIX_ANY_PORT);
        assert!(k.prefix_len >= POLICY_PREFIX_ANY_PROTO && k.prefix_len <= 96, "{k:?}");
        if k.prefix_len == POLICY_PREFIX_ANY_PROTO {
            assert_eq!((k.key.proto, port), (0, 0), "{k:?}");
        }
        if port_bits < 16 {
            assert_eq!(port & (u16::MAX >> port_bits), 0, "{k:?}");
        }
    }
}

fn peer(p: &str) -> Peer {
    p.parse().unwrap()
}

fn allowed(c: &Checked, from: &str, to: &str, port: u16, proto: u8) -> bool {
    c.check(&peer(from), &peer(to), port, proto)
        .unwrap()
        .allowed
}

/// Compares the 9×9 matrix for `port`/`proto` with `want(from, to)` (the
/// diagonal is always allowed); prints both on mismatch.
#[track_caller]
fn assert_matrix(c: &Checked, port: u16, proto: u8, want: impl Fn(&str, &str) -> bool) {
    let mut bad = false;
    let mut text = format!("{port}/{}: rows = from, columns = to; . allowed, X denied, ! = wrong\n     ", protocol_name(proto));
    for to in PODS {
        write!(text, "{to:>5}").unwrap();
    }
    for from in PODS {
        write!(text, "\n{from:>5}").unwrap();
        for to in PODS {
            let got = allowed(c, from, to, port, proto);
            let exp = from == to || want(from, to);
            let cell = match (got, exp == got) {
                (_, false) => "!",
                (true, true) => ".",
                (false, true) => "X",
            };
            bad |= exp != got;
            write!(text, "{cell:>5}").unwrap();
        }
    }
    assert!(!bad, "{text}\nwarnings: {:?}", c.warnings);
}

/// The four probes upstream runs (TCP/UDP × 80/81) all follow `want`.
#[track_caller]
fn assert_all_ports(c: &Checked, want: impl Fn(&str, &str) -> bool) {
    for (port, proto) in [
        (80, proto::TCP),
        (81, proto::TCP),
        (80, proto::UDP),
        (81, proto::UDP),
    ] {
        assert_matrix(c, port, proto, &want);
    }
}

fn ns(p: &str) -> &str {
    p.split_once('/').unwrap().0
}

// ------------------------------------------------------------------ cases

#[test]
fn no_policy_allows_everything_and_needs_no_datapath_work() {
    let c = Cluster::new().compile();
    assert_all_ports(&c, |_, _| true);
    assert!(!c.any_local_policy());
    assert!(c.endpoints.is_empty() && c.rules.is_empty());
    assert_eq!(c.views.len(), 9, "every local pod has a view");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn without_policies_only_local_pods_are_compiled() {
    // coredns runs on n2: no identity, no ipcache entry while no policy
    // exists; `check` still names it (from the pods, as the agent's store).
    let mut cl = Cluster::new();
    let mut compiler = Compiler::new();
    let lazy = cl.compile_with(&mut compiler);
    assert!(!lazy.ipcache.contains_key(&(DNS_IP, 32)));
    assert_eq!(lazy.identities.len(), 9, "{:?}", lazy.identities);
    assert_eq!(lazy.views.len(), 9);
    let v = lazy
        .check(&peer("x/a"), &peer("kube-system/coredns"), 53, proto::UDP)
        .unwrap();
    assert!(v.allowed && v.to == DNS_IP, "{v:?}");
    assert_eq!(
        identity_name_of(&cl.pods, DNS_IP).as_deref(),
        Some("kube-system:k8s-app=kube-dns")
    );
    // The first policy compiles the cluster; local pods keep their ids.
    cl.policies.push(policy(
        "x",
        "deny-in",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    let full = cl.compile_with(&mut compiler);
    assert!(full.ipcache[&(DNS_IP, 32)].identity >= identity::FIRST_LABELS);
    assert_eq!(full.identities.len(), 10);
    for (ip, view) in &lazy.views {
        assert_eq!(
            (full.views[ip].ep_id, full.views[ip].identity),
            (view.ep_id, view.identity)
        );
        assert_eq!(full.ipcache[&(*ip, 32)].identity, view.identity);
    }
    assert_all_ports(&full, |_, to| ns(to) != "x");
    // And back: the remote pods go again.
    cl.policies.clear();
    let again = cl.compile_with(&mut compiler);
    assert!(!again.ipcache.contains_key(&(DNS_IP, 32)) && again.endpoints.is_empty());
}

/// Two pods claiming one address (a stale store): the compile, `check`'s
/// names and the events' names pick the same owner, the one not being
/// deleted, although the deleting one comes first in name order.
#[test]
fn two_pods_on_one_address_have_one_owner_everywhere() {
    let mut cl = Cluster::new();
    let ip = ip_of("x/b");
    let mut stale = pod_json("a", "old", json!({"pod": "old"}), ip, NODE, json!([]));
    stale["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    cl.pods.push(from_json(stale));
    let c = cl.compile();
    assert!(
        c.warnings.iter().any(|w| w.contains("a/old and x/b") && w.ends_with("using x/b")),
        "{:?}",
        c.warnings
    );
    assert_eq!(names_by_ip(&cl.pods)[&ip], "x/b");
    let b = cl.pods.iter().find(|p| p.name() == "b" && p.namespace() == "x").unwrap();
    let labels = IdentityInfo::Labels {
        namespace: "x".into(),
        labels: b.labels.clone().unwrap_or_default(),
    };
    assert_eq!(identity_name_of(&cl.pods, ip), Some(labels.to_string()));
}

#[test]
fn default_deny_ingress() {
    let c = Cluster::new().with(policy("x", "deny-in", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))).compile();
    assert_all_ports(&c, |_, to| ns(to) != "x");
    assert!(c.any_local_policy());
    let v = &c.views[&ip_of("x/a")];
    assert!(v.isolated_in && !v.isolated_out);
    assert_eq!(v.policies_in, vec!["deny-in".to_owned()]);
    assert_eq!(c.endpoints.len(), 3);
    assert!(c.rules.is_empty());
}

#[test]
fn default_deny_egress() {
    let c = Cluster::new().with(policy("x", "deny-out", json!({"podSelector": {}, "policyTypes": ["Egress"]}))).compile();
    assert_all_ports(&c, |from, _| ns(from) != "x");
    // DNS too.
    assert!(!allowed(&c, "x/a", "kube-system/coredns", 53, proto::UDP));
    assert!(allowed(&c, "y/a", "kube-system/coredns", 53, proto::UDP));
}

#[test]
fn default_deny_both_ways_keeps_node_and_self() {
    let c = Cluster::new()
        .with(policy("x", "deny-all", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})))
        .compile();
    assert_all_ports(&c, |from, to| ns(from) != "x" && ns(to) != "x");
    for host in [NODE_IP, HAIRPIN] {
        let v = c.check(&Peer::Addr(host), &peer("x/a"), 80, proto::TCP).unwrap();
        assert!(v.allowed);
        assert_eq!(v.ingress, DirVerdict::AlwaysHost);
        let v = c.check(&peer("x/a"), &Peer::Addr(host), 10250, proto::TCP).unwrap();
        assert_eq!(v.egress, DirVerdict::AlwaysHost);
    }
    let v = c.check(&peer("x/a"), &peer("x/a"), 80, proto::TCP).unwrap();
    assert_eq!((v.egress, v.ingress), (DirVerdict::AlwaysSelf, DirVerdict::AlwaysSelf));
    // Another node and the world are peers like any other.
    assert!(!c.check(&Peer::Addr(REMOTE_NODE_IP), &peer("x/a"), 80, proto::TCP).unwrap().allowed);
    assert!(!c.check(&peer("x/a"), &Peer::Addr(Ipv4Addr::new(8, 8, 8, 8)), 53, proto::UDP).unwrap().allowed);
}

#[test]
fn allow_all_ingress_rule_allows_every_protocol() {
    // `ingress: [{}]` beside a deny-all: the union allows everything in.
    let c = Cluster::new()
        .with(policy("x", "deny-in", json!({"podSelector": {}, "policyTypes": ["Ingress"]})))
        .with(policy("x", "allow-all", json!({"podSelector": {}, "ingress": [{}]})))
        .compile();
    assert_all_ports(&c, |_, _| true);
    // Every protocol, ICMP echo (port 0) and outside peers included.
    assert!(allowed(&c, "y/a", "x/a", 0, proto::ICMP));
    assert!(allowed(&c, "8.8.8.8", "x/a", 443, proto::TCP));
    let ep = c.endpoints[&ip_of("x/a")];
    assert_eq!(ep.flags, PE_F_ISOLATED_IN | PE_F_ANY_IN);
    let v = c.check(&peer("y/a"), &peer("x/a"), 80, proto::TCP).unwrap();
    match v.ingress {
        DirVerdict::Allowed { policy, via, rule } => {
            assert_eq!(policy.unwrap().name, "allow-all");
            assert_eq!(via, Via::Any);
            assert_eq!(rule.prefix_len, POLICY_PREFIX_ANY_PROTO);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn allow_ingress_by_pod_in_own_namespace() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "allow-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || from == "x/b");
    // Only x/a is isolated; egress untouched (no egress rules, no type).
    assert_eq!(c.endpoints.len(), 1);
    assert_eq!(c.endpoints[&ip_of("x/a")].flags, PE_F_ISOLATED_IN);
}

#[test]
fn allow_ingress_by_namespace() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "from-y",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || ns(from) == "y");
}

#[test]
fn namespace_selected_by_metadata_name_label_with_expressions() {
    // NotIn on the name label the compiler adds: everything but x and y.
    let c = Cluster::new()
        .with(policy(
            "x",
            "not-xy",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x", "y"]}
            ]}}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| ns(to) != "x" || ns(from) == "z");
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "and",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"ns": "y"}},
                "podSelector": {"matchLabels": {"pod": "b"}},
            }]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || from == "y/b");
}

#[test]
fn two_peers_are_or() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "or",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                {"podSelector": {"matchLabels": {"pod": "b"}}},
            ]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || ns(from) == "y" || from == "x/b");
}

#[test]
fn empty_namespace_selector_means_all_namespaces() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "b-anywhere",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                "namespaceSelector": {},
                "podSelector": {"matchLabels": {"pod": "b"}},
            }]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || from.ends_with("/b"));
}

#[test]
fn ip_block_with_except_matches_pod_addresses() {
    // Upstream "should allow ingress access from namespace on one named
    // port"-style CIDR case: all pods but y/a (its /32 excepted).
    let c = Cluster::new()
        .with(policy(
            "x",
            "cidr",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                "ipBlock": {"cidr": "10.42.0.0/16", "except": [format!("{}/32", ip_of("y/a"))]}
            }]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || from != "y/a");
    // Outside the block: denied; the except's entry is WORLD with its own
    // CIDR identity.
    assert!(!allowed(&c, "172.16.0.1", "x/a", 80, proto::TCP));
    assert!(allowed(&c, "10.42.200.1", "x/a", 80, proto::TCP));
    let ya = c.ipcache[&(ip_of("y/a"), 32)];
    let except_id = c.ipcache_lookup(ip_of("y/a")).cidr_identity;
    assert_eq!(ya.cidr_identity, except_id);
    assert_eq!(c.identities[&except_id], IdentityInfo::Cidr(format!("{}/32", ip_of("y/a")).parse().unwrap()));
    let block = c.ipcache[&(Ipv4Addr::new(10, 42, 0, 0), 16)];
    assert_eq!(block.identity, identity::WORLD);
    assert_ne!(block.cidr_identity, except_id);
    assert_eq!(c.ipcache[&(ip_of("x/b"), 32)].cidr_identity, block.cidr_identity);
}

#[test]
fn ip_block_prefixes_of_other_policies_do_not_leak_through_excepts() {
    // Policy 1 allows 10.0.0.0/8 except 10.42.2.0/24 (all of y); policy 2
    // (another pod) mentions 10.42.2.0/25, a longer prefix inside the
    // except: y/a's cidr identity becomes that /25, which policy 1 must not
    // allow.
    let c = Cluster::new()
        .with(policy(
            "x",
            "p1",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.42.2.0/24"]}}]}]}),
        ))
        .with(policy(
            "z",
            "p2",
            json!({"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.42.2.0/25"}}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| match to {
        "x/a" => ns(from) != "y",
        "z/c" => ns(from) == "y",
        _ => true,
    });
}

#[test]
fn named_port_ingress_resolves_on_the_destination_pod() {
    let mut cl = Cluster::new().with(policy(
        "x",
        "named",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}]}),
    ));
    // x/b serves "serve-81-tcp" on 8081 instead.
    let idx = cl.pod_index("x/b");
    cl.pods[idx] = from_json(pod_json("x", "b", json!({"pod": "b"}), ip_of("x/b"), NODE, json!([{"name": "serve-81-tcp", "containerPort": 8081}])));
    let c = cl.compile();
    assert_matrix(&c, 80, proto::TCP, |_, to| ns(to) != "x");
    assert_matrix(&c, 81, proto::TCP, |_, to| ns(to) != "x" || to != "x/b");
    assert_matrix(&c, 8081, proto::TCP, |_, to| ns(to) != "x" || to == "x/b");
    assert_matrix(&c, 81, proto::UDP, |_, to| ns(to) != "x");
}

#[test]
fn named_port_egress_resolves_on_the_peer_pods() {
    // Egress from x to the UDP port named serve-81-udp, any destination:
    // the name resolves on each destination's pods.
    let mut cl = Cluster::new().with(policy(
        "x",
        "named-out",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
    ));
    // z/c serves it on 9000.
    let idx = cl.pod_index("z/c");
    cl.pods[idx] = from_json(pod_json("z", "c", json!({"pod": "c"}), ip_of("z/c"), NODE, json!([{"name": "serve-81-udp", "containerPort": 9000, "protocol": "UDP"}])));
    let c = cl.compile();
    assert_matrix(&c, 81, proto::UDP, |from, to| ns(from) != "x" || to != "z/c");
    assert_matrix(&c, 9000, proto::UDP, |from, to| ns(from) != "x" || to == "z/c");
    assert_matrix(&c, 81, proto::TCP, |from, _| ns(from) != "x");
    assert_matrix(&c, 80, proto::UDP, |from, _| ns(from) != "x");
    // No ANY entry: outside addresses have no named ports.
    assert_eq!(c.endpoints[&ip_of("x/a")].flags & PE_F_ANY_OUT, 0);
    assert!(!allowed(&c, "x/a", "8.8.8.8", 81, proto::UDP));
}

#[test]
fn end_port_range() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "range",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 79, "endPort": 81, "protocol": "TCP"}]}]}),
        ))
        .compile();
    for port in [79, 80, 81] {
        assert_matrix(&c, port, proto::TCP, |_, _| true);
    }
    for port in [78, 82] {
        assert_matrix(&c, port, proto::TCP, |_, to| ns(to) != "x");
    }
    assert_matrix(&c, 80, proto::UDP, |_, to| ns(to) != "x");
    // 79/96 + 80/95: two entries per (endpoint, ANY).
    let rules_of_xa = c.rules.keys().filter(|k| u32::from_be(k.key.ep_id_be) == c.endpoints[&ip_of("x/a")].ep_id).count();
    assert_eq!(rules_of_xa, 2);
}

#[test]
fn protocol_only_port_allows_every_port_of_that_protocol() {
    let c = Cluster::new()
        .with(policy("x", "udp", json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]})))
        .compile();
    assert_matrix(&c, 80, proto::UDP, |_, _| true);
    assert_matrix(&c, 81, proto::UDP, |_, _| true);
    assert_matrix(&c, 80, proto::TCP, |_, to| ns(to) != "x");
    assert!(!allowed(&c, "y/a", "x/a", 0, proto::ICMP));
}

#[test]
fn multiple_policies_are_a_union() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "from-y-80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": 80}]}]}),
        ))
        .with(policy(
            "x",
            "from-z-81",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}], "ports": [{"port": 81}]}]}),
        ))
        .compile();
    assert_matrix(&c, 80, proto::TCP, |from, to| to != "x/a" || ns(from) == "y");
    assert_matrix(&c, 81, proto::TCP, |from, to| to != "x/a" || ns(from) == "z");
    assert_matrix(&c, 80, proto::UDP, |_, to| to != "x/a");
    let v = &c.views[&ip_of("x/a")];
    assert_eq!(v.policies_in, vec!["from-y-80".to_owned(), "from-z-81".to_owned()]);
    let verdict = c.check(&peer("z/b"), &peer("x/a"), 81, proto::TCP).unwrap();
    assert!(matches!(verdict.ingress, DirVerdict::Allowed { policy: Some(ref p), .. } if p.name == "from-z-81"), "{verdict:?}");
}

#[test]
fn egress_deny_with_a_dns_exception() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "dns-only",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                "ports": [{"port": 53, "protocol": "UDP"}],
            }]}),
        ))
        .compile();
    assert_all_ports(&c, |from, _| ns(from) != "x");
    assert!(allowed(&c, "x/a", "kube-system/coredns", 53, proto::UDP));
    assert!(!allowed(&c, "x/a", "kube-system/coredns", 53, proto::TCP));
    assert!(!allowed(&c, "x/a", "8.8.8.8", 53, proto::UDP));
    // coredns runs on another node: its own ingress is judged there.
    let v = c.check(&peer("x/a"), &peer("kube-system/coredns"), 53, proto::UDP).unwrap();
    assert_eq!(v.ingress, DirVerdict::NotLocal);
    assert_eq!(c.ipcache[&(DNS_IP, 32)].identity, c.identities.iter().find(|(_, i)| matches!(i, IdentityInfo::Labels { namespace, .. } if namespace == "kube-system")).map(|(id, _)| *id).unwrap());
}

#[test]
fn policy_types_are_inferred_as_the_apiserver_defaults_them() {
    // No types + egress rules: Ingress (no rules: deny) and Egress.
    let c = Cluster::new()
        .with(policy("x", "inferred", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"podSelector": {}}]}]})))
        .compile();
    let ep = c.endpoints[&ip_of("x/a")];
    assert_eq!(ep.flags & (PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT), PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    assert_all_ports(&c, |from, to| to != "x/a" && (from != "x/a" || ns(to) == "x"));
    // No types + only ingress rules: egress not isolated; `egress: []`
    // counts as no rules.
    let c = Cluster::new()
        .with(policy("x", "in-only", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}], "egress": []})))
        .compile();
    assert_eq!(c.endpoints[&ip_of("x/a")].flags & PE_F_ISOLATED_OUT, 0);
    // Explicit Egress only: the ingress rules are ignored, ingress open.
    let c = Cluster::new()
        .with(policy(
            "x",
            "out-only",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ))
        .compile();
    assert_eq!(c.endpoints[&ip_of("x/a")].flags & PE_F_ISOLATED_IN, 0);
    assert_all_ports(&c, |from, _| from != "x/a");
}

#[test]
fn label_changes_move_pods_in_and_out_of_policies() {
    let mut cl = Cluster::new().with(policy(
        "x",
        "from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    let mut compiler = Compiler::new();
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| to != "x/a" || from.ends_with("/b"));
    // z/c becomes a "b": allowed from now on.
    cl.set_pod_labels("z/c", json!({"pod": "b"}));
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| {
        to != "x/a" || from.ends_with("/b") || from == "z/c"
    });
    // x/a stops being an "a": no longer selected, no longer isolated.
    cl.set_pod_labels("x/a", json!({"pod": "other"}));
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |_, _| true);
    assert!(!c.any_local_policy());
    // Namespace labels: a policy by namespace follows them.
    let mut cl = Cluster::new().with(policy(
        "x",
        "from-team",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    ));
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |_, to| ns(to) != "x");
    cl.set_ns_labels("y", json!({"ns": "y", "team": "blue"}));
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| ns(to) != "x" || ns(from) == "y");
}

#[test]
fn identities_endpoint_ids_and_policy_refs_are_stable_across_compiles() {
    let mut cl = Cluster::new()
        .with(policy("x", "p1", json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})))
        .with(policy("y", "p2", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.42.1.0/24"}}]}]})));
    let mut compiler = Compiler::new();
    let first = cl.compile_with(&mut compiler);
    // Same input, listed in another order: identical output.
    cl.pods.reverse();
    cl.policies.reverse();
    cl.namespaces.reverse();
    let second = cl.compile_with(&mut compiler);
    assert_eq!(first, second);
    // A new pod and policy leave everything else as it was.
    cl.pods.push(from_json(pod_json(
        "x",
        "d",
        json!({"pod": "d"}),
        Ipv4Addr::new(10, 42, 1, 4),
        NODE,
        serve_ports(),
    )));
    cl.policies
        .insert(0, policy("a-first", "p0", json!({"podSelector": {}})));
    let third = cl.compile_with(&mut compiler);
    for (ip, view) in &first.views {
        assert_eq!(third.views[ip].ep_id, view.ep_id);
        assert_eq!(third.views[ip].identity, view.identity);
    }
    for (key, value) in &first.ipcache {
        assert_eq!(third.ipcache.get(key), Some(value), "{key:?}");
    }
    for (key, value) in &first.rules {
        assert_eq!(third.rules.get(key), Some(value), "{key:?}");
    }
    assert_eq!(third.policy(0), first.policy(0));
    assert_eq!(third.policy(1), first.policy(1));
    // A deleted pod's endpoint id is not handed to the next new pod.
    let gone = first.views[&ip_of("y/c")].ep_id;
    cl.pods
        .retain(|p| !(p.namespace() == "y" && p.name() == "c"));
    let fourth = cl.compile_with(&mut compiler);
    assert!(!fourth.views.contains_key(&ip_of("y/c")));
    cl.pods.push(from_json(pod_json(
        "y",
        "e",
        json!({"pod": "e"}),
        Ipv4Addr::new(10, 42, 2, 5),
        NODE,
        serve_ports(),
    )));
    let fifth = cl.compile_with(&mut compiler);
    assert!(fifth.views.values().all(|v| v.ep_id != gone));
    // A deleted policy's ref is reused (refs stay dense), but only by a
    // later compile.
    let p2_ref = (0..)
        .find(|r| fifth.policy(*r).is_some_and(|p| p.name == "p2"))
        .unwrap();
    cl.policies
        .retain(|p| p.metadata.name.as_deref() != Some("p2"));
    let sixth = cl.compile_with(&mut compiler);
    assert_eq!(sixth.policy(p2_ref), None);
    cl.policies
        .push(policy("z", "p3", json!({"podSelector": {}})));
    let seventh = cl.compile_with(&mut compiler);
    assert_eq!(seventh.policy(p2_ref).map(|p| p.name.as_str()), Some("p3"));
}

#[test]
fn audit_namespace_marks_isolated_directions_and_passes_denials() {
    let mut cl = Cluster::new().with(policy("x", "deny-in", json!({"podSelector": {}, "policyTypes": ["Ingress"]})));
    let idx = cl.namespaces.iter().position(|n| n.metadata.name.as_deref() == Some("x")).unwrap();
    cl.namespaces[idx] = from_json(json!({"metadata": {"name": "x", "labels": {"ns": "x"}, "annotations": {AUDIT_ANNOTATION: "true"}}}));
    let c = cl.compile();
    assert_eq!(c.endpoints[&ip_of("x/a")].flags, PE_F_ISOLATED_IN | PE_F_AUDIT_IN | PE_F_EXACT_IN);
    assert!(c.views[&ip_of("x/a")].audit);
    let v = c.check(&peer("y/a"), &peer("x/a"), 80, proto::TCP).unwrap();
    assert!(v.allowed);
    assert_eq!(v.ingress, DirVerdict::Audited);
}

#[test]
fn ipcache_holds_pods_nodes_and_the_world() {
    let mut cl = Cluster::new();
    // z's pods run on n2; a host-network pod and a finished pod own no
    // address of their own.
    for p in ["z/a", "z/b", "z/c"] {
        let (ns, name) = p.split_once('/').unwrap();
        let idx = cl.pod_index(p);
        cl.pods[idx] = from_json(pod_json(ns, name, json!({"pod": name}), ip_of(p), "n2", serve_ports()));
    }
    let mut hostnet = pod_json("x", "hostnet", json!({"pod": "h"}), NODE_IP, NODE, json!([]));
    hostnet["spec"]["hostNetwork"] = json!(true);
    cl.pods.push(from_json(hostnet));
    let mut done = pod_json("x", "done", json!({"pod": "d"}), Ipv4Addr::new(10, 42, 1, 99), NODE, json!([]));
    done["status"]["phase"] = json!("Succeeded");
    cl.pods.push(from_json(done));
    cl.policies.push(policy("z", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})));
    let c = cl.compile();
    assert_eq!(c.ipcache[&(NODE_IP, 32)].identity, identity::HOST);
    assert_eq!(c.ipcache[&(HAIRPIN, 32)].identity, identity::HOST);
    assert_eq!(c.ipcache[&(REMOTE_NODE_IP, 32)].identity, identity::REMOTE_NODE);
    assert_eq!(c.ipcache[&(Ipv4Addr::UNSPECIFIED, 0)].identity, identity::WORLD);
    assert!(!c.ipcache.contains_key(&(Ipv4Addr::new(10, 42, 1, 99), 32)));
    // 10 pods + 3 node addresses (2 host + 1 remote) + the world.
    assert_eq!(c.ipcache.len(), 10 + 3 + 1, "{:?}", c.ipcache);
    // Pods with equal labels in different namespaces differ; equal label
    // sets share an identity.
    assert_ne!(c.ipcache[&(ip_of("x/a"), 32)].identity, c.ipcache[&(ip_of("y/a"), 32)].identity);
    assert!(c.ipcache[&(ip_of("x/a"), 32)].identity >= identity::FIRST_LABELS);
    // Local views only; remote pods' policy is not this node's job.
    assert_eq!(c.views.len(), 6);
    assert!(!c.any_local_policy());
    assert_eq!(c.check(&peer("x/a"), &peer("z/a"), 80, proto::TCP).unwrap().ingress, DirVerdict::NotLocal);
    // A host-network pod resolves to its node's address for `check`.
    assert_eq!(resolve(&c.pods, &peer("x/hostnet")), Ok(NODE_IP));
    assert_eq!(names_by_ip(&c.pods)[&ip_of("x/a")], "x/a");
    assert_eq!(
        c.check(&peer("x/hostnet"), &peer("x/a"), 80, proto::TCP)
            .unwrap()
            .from,
        NODE_IP
    );
}

#[test]
fn same_labels_share_an_identity_and_named_ports_union_over_its_pods() {
    let mut cl = Cluster::new();
    // Two "web" pods in y with one identity, serving "http" on different
    // ports: egress to "http" allows both ports to both pods (the rule is
    // per identity).
    cl.pods.push(from_json(pod_json("y", "web1", json!({"app": "web"}), Ipv4Addr::new(10, 42, 2, 11), "n2", json!([{"name": "http", "containerPort": 8080}]))));
    cl.pods.push(from_json(pod_json("y", "web2", json!({"app": "web"}), Ipv4Addr::new(10, 42, 2, 12), "n2", json!([{"name": "http", "containerPort": 8081}]))));
    cl.policies.push(policy(
        "x",
        "to-web",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "http"}]}]}),
    ));
    let c = cl.compile();
    assert_eq!(c.ipcache[&(Ipv4Addr::new(10, 42, 2, 11), 32)], c.ipcache[&(Ipv4Addr::new(10, 42, 2, 12), 32)]);
    for to in ["y/web1", "y/web2"] {
        for port in [8080, 8081] {
            assert!(allowed(&c, "x/a", to, port, proto::TCP), "{to}:{port}");
        }
        assert!(!allowed(&c, "x/a", to, 80, proto::TCP));
    }
}

#[test]
fn invalid_parts_are_skipped_with_warnings() {
    let c = Cluster::new()
        .with(policy(
            "x",
            "bad",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [
                {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Near", "values": ["b"]}]}},
                {"ipBlock": {"cidr": "10.42.2.1/16"}},
                {"ipBlock": {"cidr": "10.42.0.0/16", "except": ["10.43.0.0/24"]}},
                {"ipBlock": {"cidr": "fd00::/8"}},
                {},
                {"podSelector": {"matchLabels": {"pod": "c"}}},
            ], "ports": [{"port": 80, "endPort": 79}, {"port": 70000}, {"port": 80, "protocol": "ICMP"}, {"port": 80}]}]}),
        ))
        .with(policy("y", "bad-selector", json!({"podSelector": {"matchExpressions": [{"key": "x", "operator": "Bogus"}]}, "policyTypes": ["Ingress"]})))
        .compile();
    // Only the valid peer (x/c) and port (80/TCP) remain; the invalid
    // policy selector selects nothing, so y stays open.
    assert_matrix(&c, 80, proto::TCP, |from, to| to != "x/a" || from == "x/c");
    assert_matrix(&c, 81, proto::TCP, |_, to| to != "x/a");
    assert_eq!(c.warnings.len(), 8, "{:#?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.contains("host bits")), "{:#?}", c.warnings);
    assert!(c.warnings.iter().any(|w| w.contains("policy y/bad-selector podSelector: invalid label selector")), "{:#?}", c.warnings);
}

#[test]
fn a_ports_list_that_resolves_to_nothing_allows_nothing() {
    // A named port no pod has: the rule allows nothing (not everything).
    let c = Cluster::new()
        .with(policy("x", "ghost", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "no-such-port"}]}]})))
        .compile();
    assert_all_ports(&c, |_, to| ns(to) != "x");
    assert!(c.rules.is_empty());
    assert_eq!(c.endpoints[&ip_of("x/a")].flags, PE_F_ISOLATED_IN | PE_F_EXACT_IN);
}

#[test]
fn pods_without_an_address_or_namespace_object_still_work() {
    let mut cl = Cluster::new();
    // A pending pod without an IP: no entry, no view, no error.
    let mut pending = pod_json("x", "pending", json!({"pod": "p"}), Ipv4Addr::new(10, 42, 1, 50), NODE, json!([]));
    pending["status"] = json!({"phase": "Pending"});
    cl.pods.push(from_json(pending));
    // A pod whose Namespace is not in the store yet: selectable by name.
    cl.pods.push(from_json(pod_json("new", "n", json!({"pod": "n"}), Ipv4Addr::new(10, 42, 7, 1), NODE, serve_ports())));
    cl.policies.push(policy(
        "x",
        "from-new",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "new"}}}]}]}),
    ));
    let c = cl.compile();
    assert_eq!(c.views.len(), 10);
    assert!(allowed(&c, "new/n", "x/a", 80, proto::TCP));
    assert!(!allowed(&c, "y/a", "x/a", 80, proto::TCP));
    assert!(c.check(&peer("x/pending"), &peer("x/a"), 80, proto::TCP).is_err());
}

#[test]
fn rule_values_name_the_lowest_policy_ref_and_flags_track_any_entries() {
    let c = Cluster::new()
        .with(policy("x", "b", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})))
        .with(policy("x", "a", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}], "egress": [{"to": [{"podSelector": {}}]}]})))
        .compile();
    let xa = c.endpoints[&ip_of("x/a")];
    // Ingress has single-port rules only (the programs skip the trie),
    // egress a rule for every port and protocol.
    assert_eq!(xa.flags, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT | PE_F_ANY_IN | PE_F_EXACT_IN);
    let key = c.rule_lookup(xa.ep_id, identity::ANY, POL_DIR_INGRESS, proto::TCP, 80).unwrap();
    assert_eq!(c.policy(c.rules[&key].policy_ref).unwrap().name, "a");
}

// ------------------------------------------------------------------ scale

/// Builds `namespaces` × `pods_per_ns` pods over `nodes` nodes (node 0 is
/// local) and `policies_per_ns` policies per namespace, each selecting one
/// app and allowing it from two other apps of its namespace on a port, from
/// a monitoring namespace, and from an ipBlock.
fn scale_cluster(namespaces: usize, pods_per_ns: usize, policies_per_ns: usize, nodes: usize) -> Cluster {
    let mut c = Cluster {
        namespaces: Vec::new(),
        pods: Vec::new(),
        policies: Vec::new(),
        nodes: (0..nodes).map(|n| node(&format!("n{n}"), Ipv4Addr::new(192, 168, (n / 256) as u8, (n % 256) as u8))).collect(),
        host: vec![Ipv4Addr::new(192, 168, 0, 0)],
    };
    let apps = policies_per_ns;
    let mut n = 0u32;
    for ns in 0..namespaces {
        let name = format!("ns{ns}");
        c.namespaces.push(namespace(&name, json!({"team": format!("t{}", ns % 10)})));
        for p in 0..pods_per_ns {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 0, 0)) + n);
            let node = format!("n{}", n as usize % nodes);
            n += 1;
            c.pods.push(from_json(pod_json(
                &name,
                &format!("p{p}"),
                json!({"app": format!("app{}", p % apps), "pod-template-hash": format!("h{}", p % (apps * 2))}),
                ip,
                &node,
                json!([{"name": "http", "containerPort": 8080}]),
            )));
        }
        for k in 0..policies_per_ns {
            c.policies.push(policy(
                &name,
                &format!("pol{k}"),
                json!({
                    "podSelector": {"matchLabels": {"app": format!("app{k}")}},
                    "policyTypes": ["Ingress", "Egress"],
                    "ingress": [
                        {"from": [
                            {"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % apps)}}},
                            {"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": [format!("app{}", (k + 2) % apps)]}]}},
                        ], "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100, "protocol": "TCP"}]},
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": "t0"}}, "podSelector": {"matchLabels": {"app": "app0"}}}], "ports": [{"port": 9090}]},
                        {"from": [{"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + ns % 16), "except": [format!("172.{}.{k}.0/24", 16 + ns % 16)]}}]},
                    ],
                    "egress": [
                        {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}}}], "ports": [{"port": 53, "protocol": "UDP"}]},
                        {"to": [{"podSelector": {"matchLabels": {"app": format!("app{}", (k + 1) % apps)}}}], "ports": [{"port": "http"}]},
                    ],
                }),
            ));
        }
    }
    c
}

/// Runs `f`; its wall-clock and this thread's CPU time (the latter does not
/// grow when other builds load the machine).
fn timed<T>(f: impl FnOnce() -> T) -> (T, String) {
    fn cpu() -> std::time::Duration {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
        std::time::Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
    }
    let (wall, cpu0) = (Instant::now(), cpu());
    let out = f();
    (out, format!("{:?} (cpu {:?})", wall.elapsed(), cpu() - cpu0))
}

/// 1,000 policies × 5,000 pods (50 namespaces × 100 pods, 20 policies
/// each) over `nodes` nodes; compiles on node n0 and checks the sizes.
fn scale(nodes: usize) {
    let cl = scale_cluster(50, 100, 20, nodes);
    let inputs = Inputs { node_name: "n0", ..cl.inputs() };
    assert_eq!((cl.policies.len(), cl.pods.len()), (1000, 5000));
    let mut compiler = Compiler::new();
    let (c, first) = timed(|| compiler.compile(&inputs));
    let (again, second) = timed(|| compiler.compile(&inputs));
    // A policy change: one policy's object replaced (parsed again).
    let mut changed = cl.policies.clone();
    let mut edited = (*changed[0]).clone();
    edited.metadata.resource_version = Some("2".to_owned());
    changed[0] = Arc::new(edited);
    let (_, third) = timed(|| compiler.compile(&Inputs { policies: &changed, ..inputs }));
    eprintln!(
        "scale: 1000 policies × 5000 pods, {nodes} nodes: first compile {first}, recompile {second}, after a policy change {third}; {} rules, {} ipcache entries, {} endpoints",
        c.rules.len(),
        c.ipcache.len(),
        c.endpoints.len()
    );
    assert_eq!(c, again);
    assert!(c.warnings.is_empty(), "{:?}", &c.warnings[..c.warnings.len().min(5)]);
    // Pod n (= namespace × 100 + p) runs on node n % nodes; each local pod
    // is selected by exactly one policy (app = p % 20).
    let local = 5000 / nodes;
    assert_eq!(c.views.len(), local);
    assert_eq!(c.endpoints.len(), local);
    // Label identities: 50 namespaces × 40 (app, hash) pairs.
    let labels = c.identities.values().filter(|i| matches!(i, IdentityInfo::Labels { .. })).count();
    assert_eq!(labels, 50 * 40);
    // CIDR identities: 16 distinct /16 blocks, each with 20 excepts.
    assert_eq!(c.identities.len() - labels, 16 * (1 + 20));
    // ipcache: pods + nodes (the local one's address is the host address)
    // + prefixes + world.
    assert_eq!(c.ipcache.len(), 5000 + nodes + 16 * 21 + 1);
    // Rules per local endpoint (policy k in namespace ns, app k):
    // ingress rule 1: 2 apps × 2 hashes = 4 identities × (http + the
    //   prefixes of 9000..=9100);
    // ingress rule 2: app0 of the 5 t0 namespaces × 2 hashes = 10 × 9090;
    // ingress rule 3: the /16 and the 19 other policies' /24 excepts
    //   inside it (its own except excluded) = 20, every port;
    // egress rule 1: ns0's 40 identities × 53/UDP;
    // egress rule 2: app k+1's 2 identities × http.
    let per_ep = 4 * (1 + port_prefixes(9000, 9100).len()) + 10 + 20 + 40 + 2;
    assert_eq!(c.rules.len(), local * per_ep);
}

#[test]
fn scale_1000_policies_5000_pods_100_local() {
    scale(50);
}

#[test]
fn scale_1000_policies_5000_pods_1000_local() {
    scale(5);
}

#[test]
fn check_reports_unknown_pods() {
    let c = Cluster::new().compile();
    assert_eq!(
        c.check(&peer("x/zz"), &peer("x/a"), 80, proto::TCP),
        Err(CheckError::UnknownPod {
            namespace: "x".into(),
            name: "zz".into()
        })
    );
}

#[test]
fn egress_to_a_cidr_block_with_except() {
    // Upstream "should enforce except clause while egress access to server
    // in CIDR block": x/a may reach y's /24 except y/b.
    let c = Cluster::new()
        .with(policy(
            "x",
            "to-y-but-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {
                "cidr": "10.42.2.0/24", "except": [format!("{}/32", ip_of("y/b"))]
            }}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| from != "x/a" || (ns(to) == "y" && to != "y/b"));
}

#[test]
fn an_address_in_one_policys_except_and_anothers_cidr_is_allowed() {
    // Upstream "should ensure an IP overlapping both IPBlock.CIDR and
    // IPBlock.Except is allowed": the union wins.
    let c = Cluster::new()
        .with(policy(
            "x",
            "all-but-yb",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {
                "cidr": "10.42.0.0/16", "except": [format!("{}/32", ip_of("y/b"))]
            }}]}]}),
        ))
        .with(policy(
            "x",
            "yb",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {
                "cidr": format!("{}/32", ip_of("y/b"))
            }}]}]}),
        ))
        .compile();
    assert_all_ports(&c, |_, _| true);
    assert!(!allowed(&c, "x/a", "10.43.0.1", 80, proto::TCP));
}

#[test]
fn sctp_is_not_mistaken_for_tcp() {
    // Upstream "should not mistakenly treat 'protocol: SCTP' as 'protocol:
    // TCP'" and "should properly isolate pods that are selected by a policy
    // allowing SCTP".
    let c = Cluster::new()
        .with(policy("x", "sctp-81", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]})))
        .compile();
    assert_all_ports(&c, |_, to| ns(to) != "x");
    assert_matrix(&c, 81, SCTP, |_, _| true);
    assert_matrix(&c, 80, SCTP, |_, to| ns(to) != "x");
}

#[test]
fn client_side_egress_deny_wins_over_server_side_allow() {
    // Upstream "should support denying of egress traffic on the client side
    // (even if the server explicitly allows this traffic)".
    let c = Cluster::new()
        .with(policy("x", "deny-out", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]})))
        .with(policy("y", "allow-in", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})))
        .compile();
    assert_all_ports(&c, |from, _| from != "x/a");
    let v = c.check(&peer("x/a"), &peer("y/a"), 80, proto::TCP).unwrap();
    assert_eq!(v.egress, DirVerdict::Denied);
    assert!(matches!(v.ingress, DirVerdict::Allowed { .. }), "{v:?}");
    assert!(!v.allowed);
}

#[test]
fn ingress_and_egress_are_controlled_independently() {
    // Upstream "should enforce policies to check ingress and egress
    // policies can be controlled independently based on PodSelector".
    let mut cl = Cluster::new()
        .with(policy("x", "deny-out-a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]})));
    let mut compiler = Compiler::new();
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, _| from != "x/a");
    cl.policies.push(policy(
        "x",
        "allow-in-a-from-b",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    ));
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| {
        from != "x/a" && (to != "x/a" || from == "x/b")
    });
}

#[test]
fn updated_and_deleted_policies_take_effect_on_recompile() {
    // Upstream "should enforce updated policy" and "should stop enforcing
    // policies after they are deleted".
    let mut cl = Cluster::new().with(policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    ));
    let mut compiler = Compiler::new();
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| ns(to) != "x" || ns(from) == "y");
    cl.policies[0] = policy(
        "x",
        "p",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    );
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |from, to| ns(to) != "x" || ns(from) == "z");
    cl.policies.clear();
    let c = cl.compile_with(&mut compiler);
    assert_all_ports(&c, |_, _| true);
    assert!(c.rules.is_empty() && c.endpoints.is_empty());
}

#[test]
fn multiple_pod_and_namespace_selectors_with_expressions() {
    // Upstream "should enforce policy based on Multiple PodSelectors and
    // NamespaceSelectors": from namespaces other than x, pods a or b.
    let c = Cluster::new()
        .with(policy(
            "x",
            "multi",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
            }]}]}),
        ))
        .compile();
    assert_all_ports(&c, |from, to| to != "x/a" || (ns(from) != "x" && !from.ends_with("/c")));
}

#[test]
fn unchanged_policy_objects_are_not_parsed_again() {
    // The parse is cached by object: the same UID and resourceVersion is
    // the same policy (shown here with a changed spec under the old
    // version, which a real apiserver never sends), a new version is
    // parsed again.
    let with_rv = |rv: &str, from_ns: &str| {
        from_json::<NetworkPolicy>(json!({
            "metadata": {"namespace": "x", "name": "p", "uid": "u1", "resourceVersion": rv},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": from_ns}}}]}]},
        }))
    };
    let mut cl = Cluster::new().with(with_rv("1", "y"));
    let mut compiler = Compiler::new();
    assert_all_ports(&cl.compile_with(&mut compiler), |from, to| {
        ns(to) != "x" || ns(from) == "y"
    });
    cl.policies[0] = with_rv("1", "z");
    assert_all_ports(&cl.compile_with(&mut compiler), |from, to| {
        ns(to) != "x" || ns(from) == "y"
    });
    cl.policies[0] = with_rv("2", "z");
    assert_all_ports(&cl.compile_with(&mut compiler), |from, to| {
        ns(to) != "x" || ns(from) == "z"
    });
}

fn rule_keys(c: &Compiled) -> std::collections::HashSet<RuleKey> {
    c.rules.keys().copied().collect()
}

#[test]
fn a_restarted_compiler_adopts_the_numbering_of_the_maps() {
    let cl = Cluster::new()
        .with(policy("x", "from-y", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})))
        .with(policy("y", "cidr", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.42.0.0/16", "except": ["10.42.3.0/24"]}}]}]})));
    // The old agent's history numbered things differently from a fresh
    // compile: a namespace of pods and a prefix that are gone now.
    let mut old = Compiler::new();
    let mut history = Cluster::new().with(policy("a", "gone", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]})));
    for i in 0..5u8 {
        history.pods.insert(0, from_json(pod_json("a", &format!("p{i}"), json!({"i": i.to_string()}), Ipv4Addr::new(10, 42, 8, i + 1), NODE, json!([]))));
    }
    history.policies.extend(cl.policies.iter().cloned());
    old.compile(&history.inputs());
    let before = old.compile(&cl.inputs());
    let fresh = cl.compile_with(&mut Compiler::new());
    assert_ne!(
        fresh.ipcache, before.ipcache,
        "the history must have shifted the numbering"
    );
    // A new compiler adopting the maps numbers everything as before.
    let mut new = Compiler::new();
    assert!(new.adopt(&before.ipcache, &before.endpoints, before.rules.keys()));
    let after = new.compile(&cl.inputs());
    assert_eq!(after.ipcache, before.ipcache);
    assert_eq!(after.endpoints, before.endpoints);
    assert_eq!(rule_keys(&after), rule_keys(&before));
    assert!(!new.adopt(&before.ipcache, &before.endpoints, before.rules.keys()), "only before the first compile");
}

#[test]
fn adopted_numbering_never_hands_an_old_id_to_something_new() {
    let cl = Cluster::new().with(policy(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    let before = cl.compile_with(&mut Compiler::new());
    let old_ids: std::collections::HashSet<u32> = before
        .ipcache
        .values()
        .map(|v| v.identity)
        .filter(|id| *id >= identity::FIRST_LABELS)
        .collect();
    let old_eps: std::collections::HashSet<u32> =
        before.endpoints.values().map(|v| v.ep_id).collect();
    // While the agent was down: x/a was deleted, a new pod came up in x
    // (new labels, x/a's address), z/c changed labels.
    let mut now = cl;
    now.pods.retain(|p| !(p.namespace() == "x" && p.name() == "a"));
    now.pods.push(from_json(pod_json("x", "new", json!({"pod": "new"}), ip_of("x/a"), NODE, serve_ports())));
    now.set_pod_labels("z/c", json!({"pod": "c", "v": "2"}));
    let mut compiler = Compiler::new();
    compiler.adopt(&before.ipcache, &before.endpoints, before.rules.keys());
    let after = now.compile_with(&mut compiler);
    // Unchanged pods keep their identities and endpoint ids.
    for p in ["x/b", "y/a", "z/b"] {
        assert_eq!(after.ipcache[&(ip_of(p), 32)], before.ipcache[&(ip_of(p), 32)], "{p}");
    }
    assert_eq!(after.endpoints[&ip_of("x/b")], before.endpoints[&ip_of("x/b")]);
    // The pod at x/a's old address takes x/a's old numbers (the address
    // had them; the maps already judge it by them).
    assert_eq!(after.endpoints[&ip_of("x/a")].ep_id, before.endpoints[&ip_of("x/a")].ep_id);
    // z/c's new label set: its address's old identity (z/c was its only
    // pod).
    assert_eq!(after.ipcache[&(ip_of("z/c"), 32)].identity, before.ipcache[&(ip_of("z/c"), 32)].identity);
    // A label set with no pod at an old address gets a fresh number, never
    // an old one; the same for endpoint ids, in the next compile too.
    let mut later = now;
    later.pods.push(from_json(pod_json(
        "x",
        "later",
        json!({"pod": "later"}),
        Ipv4Addr::new(10, 42, 1, 77),
        NODE,
        serve_ports(),
    )));
    let next = later.compile_with(&mut compiler);
    let new_id = next.ipcache[&(Ipv4Addr::new(10, 42, 1, 77), 32)].identity;
    assert!(!old_ids.contains(&new_id), "{new_id} was an old identity");
    assert!(!old_eps.contains(&next.endpoints[&Ipv4Addr::new(10, 42, 1, 77)].ep_id));
}

#[test]
fn egress_ip_block_with_a_named_port_is_per_identity() {
    // x/a may reach 10.42.2.1/32 (y/a) on the port named serve-80-tcp. The
    // port resolves on the pods of y/a's identity; a second pod with y/a's
    // labels outside the block is allowed too (the documented
    // approximation: rules name identities, not addresses).
    let mut cl = Cluster::new().with(policy(
        "x",
        "named-block",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{
            "to": [{"ipBlock": {"cidr": format!("{}/32", ip_of("y/a"))}}],
            "ports": [{"port": "serve-80-tcp"}],
        }]}),
    ));
    cl.pods.push(from_json(pod_json("y", "a2", json!({"pod": "a"}), Ipv4Addr::new(10, 42, 2, 50), NODE, serve_ports())));
    let c = cl.compile();
    assert_matrix(&c, 80, proto::TCP, |from, to| from != "x/a" || to == "y/a");
    assert_matrix(&c, 81, proto::TCP, |from, _| from != "x/a");
    assert!(allowed(&c, "x/a", "y/a2", 80, proto::TCP));
    assert!(!allowed(&c, "x/a", "y/a2", 81, proto::TCP));
}
