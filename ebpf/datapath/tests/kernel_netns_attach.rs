//! Kernel test (needs root): the uplink programs attach to a device in a
//! namespace this test creates — as tcx links (≥ 6.6) or netlink tc filters
//! (older kernels), whichever the running kernel has — survive their
//! process, are replaced by a restarted one, and detach again.
#![allow(clippy::unwrap_used)]

mod common;

use riptide_datapath::{Datapath, Pinning, TcMode, detach_uplink_filters, unpin_node};
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
    // Interface names resolve in the caller's namespace: attach from a
    // thread that entered the test namespace.
    let mode = TcMode::detect();
    let pins = netns::run_in(ns.name(), move || {
        let mut dp = Datapath::load(&Pinning::Node(node)).expect("load pinned");
        let links = dp.pin_dir().unwrap().join("links");
        let att = dp.attach_uplink("up0").expect("attach uplink");
        assert_eq!(att.target(), "up0");
        assert_eq!(att.mode(), Some(mode));
        let pins = att.pin(&links, "uplink").expect("pin links");
        match mode {
            TcMode::Tcx => {
                assert_eq!(pins.len(), 2);
                // tcx refuses the same program twice on a device: an error,
                // not a silent double attachment.
                assert!(dp.attach_uplink("up0").is_err());
            }
            // Netlink filters stay on the device, nothing to pin.
            TcMode::Netlink => assert!(pins.is_empty(), "{pins:?}"),
        }
        pins
    });
    let first = filters(ns.name());
    if mode == TcMode::Netlink {
        // The filters outlive the handles the attaching thread dropped.
        assert_eq!(first.len(), 2, "one filter per hook: {first:?}");
    }
    let node2 = pinned.0.clone();
    let pins2 = netns::run_in(ns.name(), move || {
        // A restarted agent loads new program instances: tcx links attach
        // next to the pinned ones and their pins replace the old ones (whose
        // links then detach); a netlink filter gets the new program swapped
        // in. Either way traffic is never without a program.
        let mut again = Datapath::load(&Pinning::Node(node2)).expect("reload");
        let links = again.pin_dir().unwrap().join("links");
        let att = again.attach_uplink("up0").expect("attach after restart");
        let pins2 = att.pin(&links, "uplink").expect("re-pin links");
        // Unknown devices are an error, not a panic.
        assert!(again.attach_uplink("nosuchdev0").is_err());
        pins2
    });
    assert_eq!(pins, pins2);
    for p in &pins {
        assert!(p.exists(), "{} pinned", p.display());
    }
    if mode == TcMode::Netlink {
        let second = filters(ns.name());
        assert_eq!(second.len(), 2, "still one filter per hook: {second:?}");
        for ((hook, old), (_, new)) in first.iter().zip(&second) {
            assert_ne!(old, new, "{hook}: the restarted agent's program is in the filter");
        }
    }
    // Uninstall's netlink clean-up: the filters go; with tcx there are none
    // and it finds nothing. A second run finds nothing either.
    let (cleaned, again) = netns::run_in(ns.name(), || {
        let cleaned = detach_uplink_filters().expect("detach");
        (cleaned, detach_uplink_filters().expect("detach again"))
    });
    let expected: &[&str] = match mode {
        TcMode::Tcx => &[],
        TcMode::Netlink => &["up0"],
    };
    assert_eq!(cleaned, expected);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(filters(ns.name()), Vec::new());
}

/// `(hook, program id)` of each bpf filter on up0's clsact hooks.
fn filters(ns: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for hook in ["ingress", "egress"] {
        let text = tc(&["-n", ns, "filter", "show", "dev", "up0", hook]);
        // "filter protocol all pref 1 bpf chain 0" heads the filters of a
        // priority, then one line per filter: "… bpf chain 0 handle 0x1
        // rt_from_net direct-action not_in_hw id 42 tag …".
        for line in text.lines().filter(|l| l.contains(" bpf ") && l.contains(" handle ")) {
            let id = line
                .split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .unwrap_or_default();
            out.push((hook, id.to_owned()));
        }
    }
    out
}

/// `tc <args>`; a device without a clsact qdisc lists nothing.
fn tc(args: &[&str]) -> String {
    let out = std::process::Command::new("tc").args(args).output().expect("running tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
