//! Kernel test (needs root): the uplink programs attach to a device (tcx)
//! in a namespace this test creates, can be pinned, and detach again.
#![allow(clippy::unwrap_used)]

mod common;

use riptide_datapath::{Datapath, Pinning, unpin_node};
use riptide_test_support::{
    ip,
    netns::{self, Netns},
    privileged,
};

/// Removes the test node's pins on drop (also when the test fails).
struct Unpin(String);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = unpin_node(&self.0);
    }
}

#[test]
fn netns_uplink_programs_attach_pin_and_detach() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    // Dropped in reverse: the namespace (and its device) first, then the pins.
    let pinned = Unpin(format!("attach-test-{}", std::process::id()));
    let ns = Netns::new(format!("rtatt{}", std::process::id()));
    ip(&["-n", ns.name(), "link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ip(&["-n", ns.name(), "link", "set", "up0", "up"]);
    let node = pinned.0.clone();
    let node2 = pinned.0.clone();
    // Interface names resolve in the caller's namespace: attach from a
    // thread that entered the test namespace.
    let pins = netns::run_in(ns.name(), move || {
        let mut dp = Datapath::load(&Pinning::Node(node)).expect("load pinned");
        let links = dp.pin_dir().unwrap().join("links");
        let att = dp.attach_uplink("up0").expect("attach uplink");
        assert_eq!(att.target(), "up0");
        let pins = att.pin(&links, "uplink").expect("pin links");
        assert_eq!(pins.len(), 2);
        // tcx refuses the same program twice on a device: an error, not a
        // silent double attachment.
        assert!(dp.attach_uplink("up0").is_err());
        // A restarted agent loads new program instances: they attach next to
        // the pinned links and their pins replace the old ones (whose links
        // then detach), so traffic is never without a program.
        let mut again = Datapath::load(&Pinning::Node(node2)).expect("reload");
        let att = again.attach_uplink("up0").expect("attach after restart");
        let pins2 = att.pin(&links, "uplink").expect("re-pin links");
        assert_eq!(pins, pins2);
        // Unknown devices are an error, not a panic.
        assert!(again.attach_uplink("nosuchdev0").is_err());
        pins
    });
    for p in &pins {
        assert!(p.exists(), "{} pinned", p.display());
    }
}
