//! Kernel test (needs root): the uplink programs attach to a device (tcx)
//! in a namespace this test creates, can be pinned, and detach again.
#![allow(clippy::unwrap_used)]

mod common;

use std::{os::fd::AsRawFd, process::Command};

use riptide_datapath::{Datapath, Pinning, unpin_node};
use riptide_test_support::privileged;

struct Cleanup {
    ns: String,
    node: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = unpin_node(&self.node);
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn netns_uplink_programs_attach_pin_and_detach() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let c = Cleanup {
        ns: format!("rtatt{}", std::process::id()),
        node: format!("attach-test-{}", std::process::id()),
    };
    ip(&["netns", "add", &c.ns]);
    ip(&["-n", &c.ns, "link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ip(&["-n", &c.ns, "link", "set", "up0", "up"]);
    let ns_file = std::fs::File::open(format!("/run/netns/{}", c.ns)).unwrap();
    let node = c.node.clone();
    let node2 = c.node.clone();
    // Interface names resolve in the caller's namespace: attach from a
    // thread that entered the test namespace.
    let pins = std::thread::spawn(move || {
        // SAFETY: setns on this thread only.
        assert_eq!(unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
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
    })
    .join()
    .unwrap();
    for p in &pins {
        assert!(p.exists(), "{} pinned", p.display());
    }
}
