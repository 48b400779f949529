//! Every error path gives the spec's code, a clear message, a non-zero exit,
//! and changes nothing: no state files, no links, no endpoints.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Netns, Node, snapshot, tag};
use serde_json::json;
use riptide_test_support::privileged;

/// Everything the plugin could have touched on the node.
type Files = Vec<(String, std::collections::BTreeMap<String, String>)>;
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, serde_json::Value, u64, &'a str);

fn world(node: &Node) -> (Files, Vec<String>, usize) {
    let mut files = vec![(String::from("state"), snapshot(node.state.path()))];
    files.push((String::from("ipam"), snapshot(&node.ipam_dir())));
    (files, node.host_veths(), node.endpoints().len())
}

#[test]
fn netns_error_paths_change_nothing() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    // A /30: exactly one pod address (10.42.64.2).
    let node = Node::with_cidr("10.42.64.0/30").unwrap();
    let pod = Netns::new(&format!("rtcni-e1-{}", tag())).unwrap();
    let pod2 = Netns::new(&format!("rtcni-e2-{}", tag())).unwrap();
    let p1 = pod.path().to_str().unwrap().to_owned();
    let p2 = pod2.path().to_str().unwrap().to_owned();
    let conf = node.config("1.1.0");
    let add = |id: &'static str, netns: &'static str| {
        vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", id), ("CNI_NETNS", netns), ("CNI_IFNAME", "eth0")]
    };
    let leak = |s: &str| -> &'static str { Box::leak(s.to_owned().into_boxed_str()) };
    let (p1s, p2s) = (leak(&p1), leak(&p2));

    let before = world(&node);
    let cases: Vec<Case<'_>> = vec![
        ("no CNI_COMMAND", vec![("CNI_CONTAINERID", "c1")], conf.clone(), 4, "CNI_COMMAND"),
        ("unknown command", vec![("CNI_COMMAND", "FROB")], conf.clone(), 4, "unknown CNI_COMMAND"),
        ("ADD without netns", vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")], conf.clone(), 4, "CNI_NETNS"),
        ("bad container id", add("bad/id", p1s), conf.clone(), 4, "CNI_CONTAINERID"),
        ("netns does not exist", add("c1", "/run/netns/does-not-exist-riptide"), conf.clone(), 4, "CNI_NETNS"),
        ("netns is the plugin's own", add("c1", "/proc/self/ns/net"), conf.clone(), 4, "should not be the same"),
        ("unknown cniVersion", add("c1", p1s), json!({"cniVersion": "0.2.0", "name": "riptide", "type": "riptide"}), 1, "incompatible CNI versions"),
        ("missing name", add("c1", p1s), json!({"cniVersion": "1.1.0", "type": "riptide"}), 7, "missing network name"),
        ("bad podCIDR", add("c1", p1s), { let mut c = conf.clone(); c["podCIDR"] = json!("10.99.0.0/24"); c }, 7, "not inside the cluster range"),
        ("ipam section", add("c1", p1s), { let mut c = conf.clone(); c["ipam"] = json!({"type": "host-local"}); c }, 2, "ipam"),
        ("datapath not loaded", add("c1", p1s), { let mut c = conf.clone(); c["nodeName"] = json!(format!("absent-{}", tag())); c }, 11, "not loaded"),
        ("CHECK unknown container", vec![("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "nobody"), ("CNI_NETNS", p1s), ("CNI_IFNAME", "eth0")],
            { let mut c = conf.clone(); c["prevResult"] = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.42.64.2/32"}]}); c }, 3, "no address reserved"),
        ("CHECK without prevResult", vec![("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "nobody"), ("CNI_NETNS", p1s), ("CNI_IFNAME", "eth0")], conf.clone(), 7, "prevResult"),
        ("GC on 0.4.0", vec![("CNI_COMMAND", "GC")], { let mut c = conf.clone(); c["cniVersion"] = json!("0.4.0"); c }, 1, "does not allow GC"),
    ];
    for (what, env, stdin, code, needle) in &cases {
        let out = node.cni(env, stdin).unwrap();
        eprintln!("{what}: {}", out.stdout.trim());
        out.expect_err(*code, needle);
        assert_eq!(world(&node), before, "{what} changed the node");
    }
    // Malformed JSON on stdin (not representable as a Value: raw bytes).
    let out = {
        let mut cmd = node.ns.command(common::BIN).unwrap();
        cmd.env_clear().envs(add("c1", p1s)).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"{\"cniVersion\": \"1.1.0\", ").unwrap();
        common::CniOut::wait(child).unwrap()
    };
    out.expect_err(6, "decoding");
    assert_eq!(world(&node), before, "malformed JSON changed the node");

    // Exhausted range: the one address goes to c1; c2 fails and leaves
    // c1's state exactly as it was.
    node.add("c1", &pod, "1.1.0").unwrap().expect_ok("ADD c1");
    let with_c1 = world(&node);
    let out = node.cni(&add("c2", p2s), &conf).unwrap();
    out.expect_err(102, "no free address in 10.42.64.0/30");
    assert_eq!(world(&node), with_c1, "exhaustion changed the node");
    assert!(!pod2.link_names().unwrap().contains(&"eth0".to_owned()));

    // ADD into a netns that already has the interface.
    let out = node.cni(&add("c3", p1s), &conf).unwrap();
    out.expect_err(101, "already exists");
    assert_eq!(world(&node), with_c1, "interface-exists changed the node");

    node.del("c1", Some(&pod)).unwrap().expect_ok("DEL c1");
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty());
}
