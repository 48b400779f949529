//! Privileged test (root: eBPF pins, network namespaces) of the agent's
//! input guards on Nodes: a podCIDR outside `--cluster-cidr` never reaches
//! the routes or the node map (`rt_node4_v1`), and the agent log names the
//! Node it refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::Ipv4Addr;

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use common::{Netns, agent_log_tail, apply, eventually, riptide, set_node_ip, start_agent, start_apiserver};
use riptide_common::{NodeKey, NodeValue, names};
use riptide_test_support::privileged;

fn node_yaml(name: &str, cidr: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs: [{cidr}]\n")
}

/// The prefixes in the node's pinned `rt_node4_v1`, as `a.b.c.d/len`.
fn node_map(node: &str) -> Vec<String> {
    let path = riptide_datapath::pin_dir(node).unwrap().join(names::NODE4);
    let map = Map::LpmTrie(MapData::from_pin(&path).unwrap());
    let trie: LpmTrie<_, NodeKey, NodeValue> = LpmTrie::try_from(map).unwrap();
    let mut v: Vec<String> = trie
        .keys()
        .map(|k: Result<Key<NodeKey>, _>| {
            let k = k.unwrap();
            format!("{}/{}", Ipv4Addr::from(u32::from_be(k.data().addr_be)), k.prefix_len())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn privileged_pod_cidr_outside_the_cluster_range_is_refused() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("guard");
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    apply(&ns, &kc, &node_yaml(&me, "10.42.7.0/24"));
    set_node_ip(&ns, &kc, &me, "198.18.77.1");
    apply(&ns, &kc, &node_yaml("peer", "10.42.8.0/24"));
    set_node_ip(&ns, &kc, "peer", "198.18.77.2");
    // Would switch masquerade off towards half of the internet.
    apply(&ns, &kc, &node_yaml("rogue", "0.0.0.0/1"));
    set_node_ip(&ns, &kc, "rogue", "198.18.77.3");
    start_agent(&mut ns, &kc, &["--cluster-cidr", "10.42.0.0/16"]);

    eventually(&ns, "ready with the peer's route", || {
        riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true && s["routes"]["10.42.8.0/24"] == "198.18.77.2")
    });
    let status = riptide(&ns, &["status"]).unwrap();
    assert_eq!(status["routes"].as_object().unwrap().len(), 1, "only the peer: {status}");
    assert_eq!(node_map(&me), ["10.42.8.0/24"], "rt_node4_v1 holds only the in-range podCIDR");
    let log = agent_log_tail(&ns, 200);
    assert!(
        log.lines().any(|l| l.contains("refusing a podCIDR outside the cluster range") && l.contains("rogue") && l.contains("0.0.0.0/1")),
        "the log names the Node:\n{log}"
    );
}
