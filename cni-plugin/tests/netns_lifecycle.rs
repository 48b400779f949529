//! ADD → inspect → CHECK → DEL → inspect → DEL again, modelled on
//! containernetworking/plugins `bridge_test.go`, against the real binary run
//! inside a node namespace with the node's datapath pinned.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddrV4};

use common::{Netns, Node, result_ip, tag, tcp_echo};
use serde_json::json;
use riptide_test_support::privileged;

#[test]
fn netns_add_check_del_lifecycle() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(61).unwrap();
    let pod = Netns::new(&format!("rtcni-pod-{}", tag())).unwrap();
    let id = format!("lifecycle{}", tag());
    let pod_path = pod.path().to_str().unwrap().to_owned();

    // ADD
    let res = node.add(&id, &pod, "1.1.0").unwrap().expect_ok("ADD");
    let pod_ip = result_ip(&res);
    assert_eq!(res["cniVersion"], "1.1.0");
    assert!(pod_ip.to_string().starts_with("10.42.61."), "{res}");
    assert_eq!(res["ips"][0]["address"], format!("{pod_ip}/32"));
    assert_eq!(res["ips"][0]["gateway"], "10.42.61.1");
    assert_eq!(res["ips"][0]["interface"], 1);
    assert!(res["ips"][0].get("version").is_none());
    assert_eq!(res["routes"], json!([{"dst": "0.0.0.0/0", "gw": "10.42.61.1"}]));
    assert_eq!(res["dns"]["nameservers"], json!(["10.43.0.10"]));
    let host = res["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(host, riptide_cni::link::host_ifname(&id, "eth0"));
    assert!(res["interfaces"][0].get("sandbox").is_none());
    assert_eq!(res["interfaces"][1]["name"], "eth0");
    assert_eq!(res["interfaces"][1]["sandbox"], pod.path().to_str().unwrap());
    assert_eq!(res["interfaces"][1]["mtu"], 1450);
    let pod_mac = res["interfaces"][1]["mac"].as_str().unwrap().to_owned();
    let host_mac = res["interfaces"][0]["mac"].as_str().unwrap().to_owned();

    // Inside the pod: eth0 up with the MAC, MTU and /32 address; default
    // route via the gateway; permanent neighbour for the gateway.
    let links = pod.ip_json(&["addr", "show", "dev", "eth0"]).unwrap();
    let eth0 = &links[0];
    assert_eq!(eth0["address"], pod_mac);
    assert_eq!(eth0["mtu"], 1450);
    assert!(eth0["flags"].as_array().unwrap().iter().any(|f| f == "UP"), "{eth0}");
    let addrs: Vec<_> = eth0["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| (a["local"].as_str().unwrap().to_owned(), a["prefixlen"].as_u64().unwrap()))
        .collect();
    assert_eq!(addrs, vec![(pod_ip.to_string(), 32)]);
    let routes = pod.ip_json(&["route", "show"]).unwrap();
    let default = routes.as_array().unwrap().iter().find(|r| r["dst"] == "default").unwrap_or_else(|| panic!("{routes}"));
    assert_eq!(default["gateway"], "10.42.61.1");
    assert_eq!(default["dev"], "eth0");
    let neigh = pod.ip_json(&["neigh", "show", "dev", "eth0"]).unwrap();
    let gw = neigh.as_array().unwrap().iter().find(|n| n["dst"] == "10.42.61.1").unwrap_or_else(|| panic!("{neigh}"));
    assert_eq!(gw["lladdr"], host_mac);
    assert!(gw["state"].as_array().unwrap().iter().any(|s| s == "PERMANENT"), "{gw}");

    // On the node: host veth, /32 route, the tc program, the endpoint.
    let hl = node.ns.ip_json(&["link", "show", "dev", &host]).unwrap();
    assert_eq!(hl[0]["mtu"], 1450);
    let hroutes = node.ns.ip_json(&["route", "show", &format!("{pod_ip}/32")]).unwrap();
    assert_eq!(hroutes[0]["dev"], host.as_str(), "{hroutes}");
    let tc = node.ns.exec("tc", &["filter", "show", "dev", &host, "ingress"]).unwrap();
    assert!(tc.contains("bpf") && tc.contains("direct-action"), "tc filter: {tc}");
    let tc = node.ns.exec("tc", &["filter", "show", "dev", &host, "egress"]).unwrap();
    assert!(tc.contains("rt_to_pod") && tc.contains("direct-action"), "tc egress filter: {tc}");
    let eps = node.endpoints();
    let ep = eps.iter().find(|(a, _)| *a == pod_ip).unwrap_or_else(|| panic!("endpoint missing: {eps:?}"));
    let hidx = hl[0]["ifindex"].as_u64().unwrap();
    assert_eq!(u64::from(ep.1.ifindex), hidx);
    assert_eq!(riptide_cni::netlink::fmt_mac(ep.1.mac), pod_mac);
    assert_eq!(riptide_cni::netlink::fmt_mac(ep.1.node_mac), host_mac);
    assert_eq!(
        node.reservations().get(&pod_ip.to_string()).map(String::as_str),
        Some(format!("{id}\neth0").as_str())
    );

    // Traffic: the node reaches the pod and the pod reaches the node (TCP),
    // without NAT.
    let seen = tcp_echo(&pod, SocketAddrV4::new(pod_ip, 8080), &node.ns).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(node.node_ip));
    let seen = tcp_echo(&node.ns, SocketAddrV4::new(node.node_ip, 8081), &pod).unwrap();
    assert_eq!(seen.ip(), IpAddr::V4(pod_ip));

    // CHECK with the ADD result as prevResult.
    let mut conf = node.config("1.1.0");
    conf["prevResult"] = res.clone();
    let env = [
        ("CNI_COMMAND", "CHECK"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_NETNS", pod_path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = node.cni(&env, &conf).unwrap();
    out.expect_ok("CHECK");
    assert!(out.stdout.trim().is_empty(), "CHECK prints nothing: {}", out.stdout);

    // CHECK notices a broken attachment: the veth's egress program gone,
    // a route removed behind our back.
    node.ns.exec("tc", &["filter", "del", "dev", &host, "egress"]).unwrap();
    node.cni(&env, &conf).unwrap().expect_err(103, "egress");
    pod.exec("ip", &["route", "del", "default"]).unwrap();
    node.cni(&env, &conf).unwrap().expect_err(103, "default route");

    // DEL with prevResult, then everything is gone.
    let mut del_conf = node.config("1.1.0");
    del_conf["prevResult"] = res.clone();
    let del_env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_NETNS", pod_path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    node.cni(&del_env, &del_conf).unwrap().expect_ok("DEL");
    assert!(!pod.link_names().unwrap().contains(&"eth0".to_owned()));
    assert!(node.host_veths().is_empty(), "{:?}", node.host_veths());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert!(node.endpoints().is_empty(), "{:?}", node.endpoints());
    let hroutes = node.ns.ip_json(&["route", "show", &format!("{pod_ip}/32")]).unwrap();
    assert_eq!(hroutes, json!([]));

    // DEL again, and DEL once the netns is gone: still success.
    node.cni(&del_env, &del_conf).unwrap().expect_ok("second DEL");
    drop(pod);
    node.del(&id, None).unwrap().expect_ok("DEL without netns");
}

/// The result shape follows the config's cniVersion (0.4.0 carries
/// `ips[].version`, only 1.1.0 carries interface MTU).
#[test]
fn netns_result_shape_per_version() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(62).unwrap();
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let pod = Netns::new(&format!("rtcni-pod-{}", tag())).unwrap();
        let id = format!("shape{}", tag());
        let res = node.add(&id, &pod, version).unwrap().expect_ok("ADD");
        assert_eq!(res["cniVersion"], version);
        assert_eq!(res["ips"][0].get("version").is_some(), version == "0.4.0", "{res}");
        assert_eq!(res["interfaces"][1].get("mtu").is_some(), version == "1.1.0", "{res}");
        // CHECK works on 0.4.0 and newer.
        let mut conf = node.config(version);
        conf["prevResult"] = res.clone();
        node.cni(
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_NETNS", pod.path().to_str().unwrap()),
                ("CNI_IFNAME", "eth0"),
            ],
            &conf,
        )
        .unwrap()
        .expect_ok("CHECK");
        node.del(&id, Some(&pod)).unwrap().expect_ok("DEL");
    }
    assert!(node.reservations().is_empty());
    assert!(node.host_veths().is_empty());
}
