//! A plugin SIGKILLed in the middle of ADD leaves nothing behind after GC;
//! GC frees exactly what is not in `cni.dev/valid-attachments`; STATUS
//! reports readiness.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Netns, Node, result_ip, tag};
use serde_json::json;
use riptide_test_support::privileged;

/// Waits until `pid` is stopped (state `T` in /proc/<pid>/stat).
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next());
        if state == Some("T") {
            return;
        }
        assert!(Instant::now() < deadline, "plugin {pid} never reached its stop point: {stat}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn check(node: &Node, id: &str, pod: &Netns, prev: &serde_json::Value) -> common::CniOut {
    let mut conf = node.config("1.1.0");
    conf["prevResult"] = prev.clone();
    node.cni(
        &[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", pod.path().to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
        ],
        &conf,
    )
    .unwrap()
}

/// Only the keeper's state is left on the node.
fn only(node: &Node, id: &str, ip: std::net::Ipv4Addr) {
    let res = node.reservations();
    assert_eq!(res.keys().cloned().collect::<Vec<_>>(), vec![ip.to_string()], "{res:?}");
    assert_eq!(node.host_veths(), vec![riptide_cni::link::host_ifname(id, "eth0")]);
    assert_eq!(node.endpoints().into_iter().map(|(a, _)| a).collect::<Vec<_>>(), vec![ip]);
}

#[test]
fn netns_sigkill_mid_add_leaks_nothing_after_gc() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(66).unwrap();
    let keeper = Netns::new(&format!("rtcni-k-{}", tag())).unwrap();
    let kid = format!("keeper{}", tag());
    let kres = node.add(&kid, &keeper, "1.1.0").unwrap().expect_ok("ADD keeper");
    let kip = result_ip(&kres);

    let victims: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("rtcni-v{i}-{}", tag())).unwrap()).collect();
    for (point, pod) in ["reserved", "wired", "attached"].iter().zip(&victims) {
        let id = format!("victim-{point}");
        let netns = pod.path().to_str().unwrap().to_owned();
        let mut child = node
            .spawn_cni(
                &[
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", &id),
                    ("CNI_NETNS", &netns),
                    ("CNI_IFNAME", "eth0"),
                    ("RIPTIDE_CNI_STOP_AT", point),
                ],
                &node.config("1.1.0"),
            )
            .unwrap();
        wait_stopped(child.id());
        child.kill().unwrap();
        let _ = child.wait();
        // The crash left a whole (never torn) record behind.
        assert!(node.reservations().values().any(|v| *v == format!("{id}\neth0")), "{point}: {:?}", node.reservations());
        if *point != "reserved" {
            assert!(node.host_veths().contains(&riptide_cni::link::host_ifname(&id, "eth0")));
        }
    }
    // And kills at arbitrary instants.
    let pods: Vec<Netns> = (0..15).map(|i| Netns::new(&format!("rtcni-r{i}-{}", tag())).unwrap()).collect();
    for (i, pod) in pods.iter().enumerate() {
        let id = format!("random{i}");
        let netns = pod.path().to_str().unwrap().to_owned();
        let mut child = node
            .spawn_cni(
                &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", &id), ("CNI_NETNS", &netns), ("CNI_IFNAME", "eth0")],
                &node.config("1.1.0"),
            )
            .unwrap();
        std::thread::sleep(Duration::from_micros(250 * i as u64));
        let _ = child.kill();
        let _ = child.wait();
    }
    for (name, content) in node.reservations() {
        assert_eq!(content.lines().count(), 2, "torn record {name}: {content:?}");
    }

    node.gc(&[(&kid, "eth0")]).unwrap().expect_ok("GC");
    only(&node, &kid, kip);
    for pod in victims.iter().chain(&pods) {
        assert!(!pod.link_names().unwrap().contains(&"eth0".to_owned()), "eth0 left in {}", pod.name);
    }
    let tmp: Vec<_> = std::fs::read_dir(node.ipam_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    // The keeper was not disturbed.
    check(&node, &kid, &keeper, &kres).expect_ok("CHECK keeper after GC");
    node.del(&kid, Some(&keeper)).unwrap().expect_ok("DEL keeper");
    assert!(node.reservations().is_empty() && node.host_veths().is_empty() && node.endpoints().is_empty());
}

#[test]
fn netns_gc_frees_only_invalid_attachments() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::new(67).unwrap();
    let a = Netns::new(&format!("rtcni-ga-{}", tag())).unwrap();
    let b = Netns::new(&format!("rtcni-gb-{}", tag())).unwrap();
    let ares = node.add("gc-a", &a, "1.1.0").unwrap().expect_ok("ADD a");
    node.add("gc-b", &b, "1.1.0").unwrap().expect_ok("ADD b");
    // GC needs CNI_PATH.
    node.cni(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "")], &node.config("1.1.0"))
        .unwrap()
        .expect_err(4, "CNI_PATH");
    node.gc(&[("gc-a", "eth0")]).unwrap().expect_ok("GC");
    only(&node, "gc-a", result_ip(&ares));
    assert!(!b.link_names().unwrap().contains(&"eth0".to_owned()));
    check(&node, "gc-a", &a, &ares).expect_ok("CHECK a");
    // An empty list frees everything; GC twice is harmless.
    node.gc(&[]).unwrap().expect_ok("GC all");
    node.gc(&[]).unwrap().expect_ok("GC again");
    assert!(node.reservations().is_empty() && node.host_veths().is_empty() && node.endpoints().is_empty());
}

#[test]
fn netns_status_reports_readiness() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let node = Node::with_cidr("10.42.68.0/30").unwrap();
    let status = |conf: &serde_json::Value| node.cni(&[("CNI_COMMAND", "STATUS")], conf).unwrap();
    let out = status(&node.config("1.1.0"));
    out.expect_ok("STATUS");
    assert!(out.stdout.trim().is_empty());
    // Datapath missing.
    let mut conf = node.config("1.1.0");
    conf["nodeName"] = json!(format!("absent-{}", tag()));
    status(&conf).expect_err(50, "not loaded");
    // Pod range not known yet (file named but absent), then present.
    let file = node.state.path().join("podcidr");
    let mut conf = node.config("1.1.0");
    conf.as_object_mut().unwrap().remove("podCIDR");
    conf["podCIDRFile"] = json!(file);
    status(&conf).expect_err(50, "no pod range");
    std::fs::write(&file, "10.42.68.0/30\n").unwrap();
    status(&conf).expect_ok("STATUS with podCIDRFile");
    // STATUS is a 1.1.0 operation.
    status(&node.config("1.0.0")).expect_err(1, "does not allow STATUS");
    // Range exhausted (a /30 has one pod address).
    let pod = Netns::new(&format!("rtcni-s-{}", tag())).unwrap();
    node.add("status-1", &pod, "1.1.0").unwrap().expect_ok("ADD");
    status(&node.config("1.1.0")).expect_err(50, "exhausted");
    node.del("status-1", Some(&pod)).unwrap().expect_ok("DEL");
    status(&node.config("1.1.0")).expect_ok("STATUS after DEL");
}
