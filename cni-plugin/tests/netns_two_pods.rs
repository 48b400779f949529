//! Two pods on one node talk through the eBPF redirect (`rt_from_pod` finds
//! the peer in `rt_ep4_v1` and `bpf_redirect_peer`s into it).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddrV4};

use aya::maps::{Map, MapData, PerCpuArray};
use common::{Netns, Node, result_ip, tag, tcp_echo};
use riptide_common::{names, stats};
use riptide_test_support::privileged;

fn redirects(node: &str) -> u64 {
    let path = riptide_datapath::pin_dir(node).unwrap().join(names::STATS);
    let map = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(MapData::from_pin(path).unwrap())).unwrap();
    map.get(&stats::REDIRECT_LOCAL, 0).unwrap().iter().sum()
}

#[test]
fn netns_two_pods_talk_through_the_ebpf_redirect() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(63).unwrap();
    let a = Netns::new(&format!("rtcni-a-{}", tag())).unwrap();
    let b = Netns::new(&format!("rtcni-b-{}", tag())).unwrap();
    let ida = format!("poda{}", tag());
    let idb = format!("podb{}", tag());
    let ip_a = result_ip(&node.add(&ida, &a, "1.1.0").unwrap().expect_ok("ADD a"));
    let ip_b = result_ip(&node.add(&idb, &b, "1.1.0").unwrap().expect_ok("ADD b"));
    assert_ne!(ip_a, ip_b);

    let before = redirects(&node.name);
    // a → b and b → a, each seeing the other's own address (no NAT).
    let seen = tcp_echo(&b, SocketAddrV4::new(ip_b, 9000), &a).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(ip_a));
    let seen = tcp_echo(&a, SocketAddrV4::new(ip_a, 9001), &b).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(ip_b));
    let after = redirects(&node.name);
    // Each exchange is a handshake, data both ways and acks: many packets,
    // every one of them redirected pod to pod by the program.
    assert!(after >= before + 8, "rt_from_pod redirected {} packets", after - before);

    node.del(&ida, Some(&a)).unwrap().expect_ok("DEL a");
    node.del(&idb, Some(&b)).unwrap().expect_ok("DEL b");
    assert!(node.endpoints().is_empty());
    assert!(node.host_veths().is_empty());
}
