//! 200 concurrent ADDs, then 200 concurrent DELs, on one node: every pod
//! gets its own address, every reservation/veth/endpoint matches a pod, and
//! nothing is left afterwards.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashSet, process::Child, time::Instant};

use common::{CniOut, Netns, Node, result_ip, tag};
use riptide_test_support::privileged;

const PODS: usize = 200;

/// Starts the plugin with `command` (ADD or DEL) for every pod at once,
/// without waiting: the children in `pods` order.
fn spawn_all(node: &Node, command: &str, pods: &[Netns], ids: &[String]) -> Vec<Child> {
    pods.iter()
        .zip(ids)
        .map(|(pod, id)| {
            let netns = pod.path().to_str().unwrap().to_owned();
            node.spawn_cni(
                &[("CNI_COMMAND", command), ("CNI_CONTAINERID", id), ("CNI_NETNS", &netns), ("CNI_IFNAME", "eth0")],
                &node.config("1.1.0"),
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn netns_200_concurrent_adds_then_dels() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(65).unwrap();
    let t = Instant::now();
    let pods: Vec<Netns> = (0..PODS)
        .map(|i| Netns::new(&format!("rtcni-c{i}-{}", tag())).unwrap())
        .collect();
    eprintln!("created {PODS} netns in {:?}", t.elapsed());
    let ids: Vec<String> = (0..PODS).map(|i| format!("conc{i}-{}", tag())).collect();

    let t = Instant::now();
    let children = spawn_all(&node, "ADD", &pods, &ids);
    let results: Vec<CniOut> = children.into_iter().map(|c| CniOut::wait(c).unwrap()).collect();
    eprintln!("{PODS} concurrent ADDs in {:?}", t.elapsed());
    let ips: Vec<_> = results.iter().map(|r| result_ip(&r.expect_ok("ADD"))).collect();
    let unique: HashSet<_> = ips.iter().collect();
    assert_eq!(unique.len(), PODS, "duplicate addresses handed out");

    // Disk, kernel and datapath agree with the results, one to one.
    let res = node.reservations();
    assert_eq!(res.len(), PODS);
    for (id, ip) in ids.iter().zip(&ips) {
        assert_eq!(res.get(&ip.to_string()).map(String::as_str), Some(format!("{id}\neth0").as_str()));
    }
    let veths: HashSet<String> = node.host_veths().into_iter().collect();
    let want: HashSet<String> = ids.iter().map(|id| riptide_cni::link::host_ifname(id, "eth0")).collect();
    assert_eq!(veths, want);
    let eps: HashSet<_> = node.endpoints().into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(eps, ips.iter().copied().collect::<HashSet<_>>());

    let t = Instant::now();
    let children = spawn_all(&node, "DEL", &pods, &ids);
    for c in children {
        CniOut::wait(c).unwrap().expect_ok("DEL");
    }
    eprintln!("{PODS} concurrent DELs in {:?}", t.elapsed());
    assert!(node.reservations().is_empty(), "leaked: {:?}", node.reservations());
    assert!(node.host_veths().is_empty(), "leaked veths: {:?}", node.host_veths());
    assert!(node.endpoints().is_empty(), "leaked endpoints: {:?}", node.endpoints());
    let leftovers: Vec<_> = std::fs::read_dir(node.ipam_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "last_reserved")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
