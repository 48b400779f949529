//! The upgrade path of `rt_to_pod` (needs root: eBPF pins, a network
//! namespace): the host veth of a pod created by an older CNI gets the
//! program at tc egress, one the current CNI already equipped is left
//! alone (exactly one filter each, however often the agent starts).
#![allow(clippy::unwrap_used)]

use std::net::Ipv4Addr;

use aya::programs::{
    SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use riptide_agent::to_pod;
use riptide_common::{EP_F_HOST, EndpointValue, names};
use riptide_datapath::{Datapath, Pinning};
use riptide_test_support::{
    netns::{self, Netns},
    privileged,
};

/// Pins of a test node, removed on drop.
struct TestNode(String);

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = riptide_datapath::unpin_node(&self.0);
    }
}

/// `tc filter show dev <dev> egress` inside the namespace.
fn egress_filters(ns: &str, dev: &str) -> String {
    let out = netns::command(ns, "tc").args(["filter", "show", "dev", dev, "egress"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -o link show dev <dev>` starts with `<ifindex>: `.
fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = netns::command(ns, "ip").args(["-o", "link", "show", "dev", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(':').next().unwrap().trim().parse().unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn netns_rt_to_pod_is_attached_where_an_old_cni_left_it_out() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let node = format!("rt-tp-{}", std::process::id());
    let _pins = TestNode(node.clone());
    let dp = Datapath::load(&Pinning::Node(node.clone())).unwrap();
    let pin_dir = dp.pin_dir().unwrap().to_path_buf();
    let ns = Netns::new(format!("rt-tp-{}", std::process::id()));
    for (host, pod) in [("rtold", "rtold-p"), ("rtnew", "rtnew-p")] {
        netns::command(ns.name(), "ip").args(["link", "add", host, "type", "veth", "peer", "name", pod]).status().unwrap();
        netns::command(ns.name(), "ip").args(["link", "set", host, "up"]).status().unwrap();
    }
    // The current CNI's way (cni-plugin/src/datapath.rs): clsact, then the
    // pinned program at priority 1 with a kernel-chosen handle.
    let pins = pin_dir.clone();
    netns::run_in(ns.name(), move || {
        tc::qdisc_add_clsact("rtnew").unwrap();
        let mut prog = SchedClassifier::from_pin(pins.join(names::PROG_TO_POD)).unwrap();
        let id = prog
            .attach_with_options("rtnew", TcAttachType::Egress, TcAttachOptions::Netlink(NlOptions { priority: 1, ..NlOptions::default() }))
            .unwrap();
        std::mem::forget(prog.take_link(id).unwrap());
    });
    let before = egress_filters(ns.name(), "rtnew");
    assert!(before.contains("rt_to_pod") && before.contains("handle 0x1 "), "the CNI's filter is handle 1: {before}");
    assert!(!egress_filters(ns.name(), "rtold").contains("rt_to_pod"));

    let ep = |dev: &str, flags: u32| (Ipv4Addr::UNSPECIFIED, EndpointValue { ifindex: ifindex(ns.name(), dev), flags, ..EndpointValue::default() });
    let endpoints = vec![ep("rtold", 0), ep("rtnew", 0), ep("lo", EP_F_HOST), (Ipv4Addr::UNSPECIFIED, EndpointValue { ifindex: 999_999, ..EndpointValue::default() })];
    for round in 0..2 {
        let (pins, eps) = (pin_dir.clone(), endpoints.clone());
        let rep = netns::run_in(ns.name(), move || to_pod::attach_missing(&pins, &eps));
        assert!(rep.failed.is_empty(), "{rep:?}");
        if round == 0 {
            assert_eq!((rep.attached.as_slice(), rep.present), (["rtold".to_owned()].as_slice(), 1), "{rep:?}");
        } else {
            assert_eq!((rep.attached.len(), rep.present), (0, 2), "a second start attaches nothing: {rep:?}");
        }
        for dev in ["rtold", "rtnew"] {
            let f = egress_filters(ns.name(), dev);
            assert_eq!(f.lines().filter(|l| l.contains("rt_to_pod")).count(), 1, "{dev} after round {round}: {f}");
        }
    }
    assert!(!egress_filters(ns.name(), "lo").contains("rt_to_pod"), "host-network endpoints are skipped");
}
