//! The NetworkPolicy sync on a real, pinned datapath (needs root to load
//! eBPF): compile → the three maps hold exactly the compile; a change of
//! the cluster → stale entries gone; an agent restart (new compiler, fresh
//! numbering, the pinned maps reused, leftovers planted in them) → the
//! first pass reads the maps back and converges. Read back through the
//! datapath library's `list`, not through the syncer's own bookkeeping.
#![allow(clippy::unwrap_used)]

use std::{net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use riptide_agent::{
    policy::{Compiled, Compiler, Inputs, Peer, RuleKey},
    policy_sync::{MapState, PolicySync},
    slim::{SlimNode as Node, SlimPod as Pod},
};
use riptide_common::{
    IpcacheValue, PE_F_EXACT_IN, PE_F_FAIL_CLOSED, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, POL_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyKey,
    PolicyValue, identity, proto,
};
use riptide_datapath::{Datapath, Pinning, policy::PolicyMaps};
use riptide_test_support::privileged;
use serde_json::json;

/// Pins of a test node, removed on drop (also when an assertion fails).
struct TestNode(String);

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = riptide_datapath::unpin_node(&self.0);
    }
}

fn ns(name: &str, labels: serde_json::Value) -> Arc<Namespace> {
    Arc::new(serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap())
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: serde_json::Value) -> Arc<Pod> {
    Arc::new(
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap(),
    )
}

fn node(name: &str, ip: &str) -> Arc<Node> {
    Arc::new(serde_json::from_value(json!({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})).unwrap())
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Arc<NetworkPolicy> {
    Arc::new(serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec})).unwrap())
}

struct Cluster {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    policies: Vec<Arc<NetworkPolicy>>,
    nodes: Vec<Arc<Node>>,
    me: String,
}

impl Cluster {
    fn new(me: &str) -> Self {
        Self {
            namespaces: vec![
                ns("x", json!({"kubernetes.io/metadata.name": "x"})),
                ns("y", json!({"kubernetes.io/metadata.name": "y", "team": "y"})),
            ],
            pods: vec![
                pod("x", "a", me, "10.42.0.5", json!({"app": "a"})),
                pod("x", "b", me, "10.42.0.6", json!({"app": "b"})),
                pod("y", "c", "other", "10.42.1.7", json!({"app": "c"})),
            ],
            policies: vec![policy(
                "x",
                "allow-y-to-a",
                json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}], "ports": [{"port": 80}, {"port": "http"}]}]}),
            )],
            nodes: vec![node(me, "198.18.0.10"), node("other", "198.18.0.11")],
            me: me.to_owned(),
        }
    }

    fn compile(&self, c: &mut Compiler) -> Compiled {
        let host = [Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(169, 254, 42, 1)];
        c.compile(&Inputs {
            pods: &self.pods,
            namespaces: &self.namespaces,
            policies: &self.policies,
            nodes: &self.nodes,
            node_name: &self.me,
            host_addrs: &host,
        })
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The maps as the kernel lists them.
fn read(maps: &PolicyMaps) -> MapState {
    MapState::read(maps).unwrap()
}

/// What `compiled` asks for, as a [`MapState`].
fn want(c: &Compiled) -> MapState {
    MapState::desired(c)
}

fn dump(m: &MapState) -> String {
    let mut rules: Vec<String> = m.rules.iter().map(|(k, v)| format!("{k:?} -> {v:?}")).chain(m.rules_exact.iter().map(|(k, v)| format!("exact {k:?} -> {v:?}"))).collect();
    rules.sort();
    format!("ipcache {:#?}\nipcache exact {:#?}\nendpoints {:#?}\nrules {rules:#?}", m.ipcache, m.ipcache_exact, m.endpoints)
}

#[test]
fn kernel_policy_sync_writes_shrinks_and_converges_after_restart() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let me = format!("rt-kps-{}", std::process::id());
    let _pins = TestNode(me.clone());
    let mut cluster = Cluster::new(&me);
    let mut compiler = Compiler::new();
    let dp = Datapath::load(&Pinning::Node(me.clone())).unwrap();
    let mut sync = PolicySync::new(dp.policy().unwrap());

    // 1. First compile: x/a isolated for ingress, allowing y's pods on 80
    //    and its own named port http (8080).
    let c1 = cluster.compile(&mut compiler);
    assert!(c1.warnings.is_empty(), "{:?}", c1.warnings);
    let rep = sync.sync(&c1);
    assert!(rep.ok() && rep.read_back && !rep.renumbered, "{rep:?}");
    let maps = read(sync.writer());
    assert_eq!(maps, want(&c1), "maps differ from the compile:\n{}", dump(&maps));
    let a = maps.endpoints.get(&ip("10.42.0.5")).copied().unwrap_or_else(|| panic!("x/a not isolated:\n{}", dump(&maps)));
    assert_eq!(a.flags & (PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT | PE_F_FAIL_CLOSED), PE_F_ISOLATED_IN);
    assert!(!maps.endpoints.contains_key(&ip("10.42.0.6")), "x/b is selected by no policy");
    // Addresses in the exact hash, prefixes in the trie.
    let c_id = maps.ipcache_exact[&ip("10.42.1.7")].identity;
    assert!(c_id >= identity::FIRST_LABELS);
    assert_eq!(maps.ipcache_exact[&ip("198.18.0.11")].identity, identity::REMOTE_NODE);
    assert_eq!(maps.ipcache_exact[&ip("198.18.0.10")].identity, identity::HOST);
    assert_eq!(maps.ipcache[&(ip("0.0.0.0"), 0)].identity, identity::WORLD);
    assert!(maps.ipcache.keys().all(|(_, len)| *len < 32), "{}", dump(&maps));
    let rule = |port: u16| RuleKey {
        prefix_len: POLICY_PREFIX_FULL,
        key: PolicyKey { ep_id_be: a.ep_id.to_be(), identity_be: c_id.to_be(), dir: POL_DIR_INGRESS, proto: proto::TCP, port_be: port.to_be() },
    };
    // Single-port rules: in the exact hash, the trie is not asked.
    assert!(maps.rules_exact.contains_key(&rule(80).key) && maps.rules_exact.contains_key(&rule(8080).key), "{}", dump(&maps));
    assert_eq!((maps.rules_exact.len(), maps.rules.len()), (2, 0), "{}", dump(&maps));
    assert_eq!(a.flags & PE_F_EXACT_IN, PE_F_EXACT_IN);
    // The datapath's own lookup agrees (what `riptide policy check` says).
    let peer = |namespace: &str, name: &str| Peer::Pod { namespace: namespace.into(), name: name.into() };
    let v = c1.check(&cluster.pods, &peer("y", "c"), &peer("x", "a"), 80, proto::TCP).unwrap();
    assert!(v.allowed, "{v:?}");
    let v = c1.check(&cluster.pods, &peer("x", "b"), &peer("x", "a"), 80, proto::TCP).unwrap();
    assert!(!v.allowed, "{v:?}");

    // 2. The cluster changes: the policy goes, x/b gets an egress policy
    //    with an ipBlock, y/c goes away. Stale entries must go.
    cluster.policies = vec![policy(
        "x",
        "b-egress",
        json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/28"]}}], "ports": [{"protocol": "UDP", "port": 53}]}]}),
    )];
    cluster.pods.retain(|p| p.name() != "c");
    let c2 = cluster.compile(&mut compiler);
    let rep = sync.sync(&c2);
    assert!(rep.ok() && !rep.read_back, "{rep:?}");
    assert!(rep.endpoints_removed == 1 && rep.rules_removed == 2 && rep.ipcache_removed >= 1, "{rep:?}");
    let maps = read(sync.writer());
    assert_eq!(maps, want(&c2), "maps differ from the second compile:\n{}", dump(&maps));
    assert!(!maps.endpoints.contains_key(&ip("10.42.0.5")), "x/a no longer isolated");
    assert!(!maps.ipcache_exact.contains_key(&ip("10.42.1.7")), "y/c's address gone");
    let b = maps.endpoints[&ip("10.42.0.6")];
    assert_eq!(b.flags & (PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT), PE_F_ISOLATED_OUT);
    assert!(maps.ipcache.contains_key(&(ip("203.0.113.0"), 24)) && maps.ipcache.contains_key(&(ip("203.0.113.0"), 28)), "{}", dump(&maps));
    assert!(maps.all_rules().all(|k| u32::from_be(k.key.ep_id_be) == b.ep_id), "only x/b has rules:\n{}", dump(&maps));

    // 3. Restart: the process goes, the pins stay. Meanwhile the cluster
    //    changed (a new pod and policy) and the maps hold leftovers no
    //    compile asks for (in the tries, where an agent before the exact
    //    hashes wrote them).
    drop(sync);
    drop(dp);
    {
        let mut m = PolicyMaps::open_pinned(&me).unwrap();
        m.upsert_ipcache(ip("10.42.9.9"), 32, IpcacheValue { identity: 999, cidr_identity: 0 }).unwrap();
        m.upsert_rule(POLICY_PREFIX_FULL, PolicyKey { ep_id_be: 4242u32.to_be(), identity_be: 999u32.to_be(), dir: POL_DIR_INGRESS, proto: proto::TCP, port_be: 22u16.to_be() }, PolicyValue::default())
            .unwrap();
        m.upsert_endpoint(ip("10.42.0.99"), riptide_common::PolicyEndpointValue { ep_id: 4242, identity: 999, flags: PE_F_ISOLATED_IN, _pad: 0 }).unwrap();
    }
    cluster.pods.push(pod("x", "d", &me, "10.42.0.8", json!({"app": "d"})));
    cluster.policies.push(policy("x", "deny-d", json!({"podSelector": {"matchLabels": {"app": "d"}}})));
    let dp = Datapath::load(&Pinning::Node(me.clone())).unwrap();
    let mut compiler = Compiler::new();
    let mut sync = PolicySync::new(dp.policy().unwrap());
    let before = sync.read_back().unwrap().clone();
    assert!(before.endpoints.contains_key(&ip("10.42.0.6")), "pins kept the maps:\n{}", dump(&before));
    assert!(compiler.adopt(before.all_ipcache(), &before.endpoints, before.all_rules()), "a fresh compiler adopts");
    let c3 = cluster.compile(&mut compiler);
    let rep = sync.sync(&c3);
    assert!(rep.ok() && rep.read_back, "{rep:?}");
    // Adopted numbering: no endpoint had to be closed, x/b keeps its
    // endpoint entry and rule keys (a rule's value, the policy_ref, may be
    // renumbered: display only); x/d comes and the planted leftovers go.
    assert!(!rep.renumbered, "{rep:?}");
    assert_eq!((rep.endpoints_written, rep.endpoints_removed, rep.rules_removed), (1, 1, 1), "{rep:?}");
    let maps = read(sync.writer());
    assert_eq!(maps, want(&c3), "not converged after the restart:\n{}", dump(&maps));
    assert!(!maps.endpoints.contains_key(&ip("10.42.0.99")) && !maps.ipcache.contains_key(&(ip("10.42.9.9"), 32)));
    assert_eq!(maps.endpoints[&ip("10.42.0.6")], before.endpoints[&ip("10.42.0.6")], "x/b's entry kept as pinned");
    let kept: std::collections::BTreeSet<String> = before.all_rules().filter(|k| u32::from_be(k.key.ep_id_be) != 4242).map(|k| format!("{k:?}")).collect();
    let now: std::collections::BTreeSet<String> = maps.all_rules().map(|k| format!("{k:?}")).collect();
    assert_eq!(kept, now, "the same rule keys as before the restart");
    assert_eq!(maps.endpoints[&ip("10.42.0.8")].flags & PE_F_ISOLATED_IN, PE_F_ISOLATED_IN, "x/d: deny-all ingress");
    assert!(maps.endpoints.values().all(|e| e.flags & PE_F_FAIL_CLOSED == 0), "nothing left fail-closed:\n{}", dump(&maps));
    // And a second pass has nothing to do.
    let rep = sync.sync(&cluster.compile(&mut compiler));
    assert!(rep.ok() && !rep.changed(), "{rep:?}");
}
