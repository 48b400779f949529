//! Kernel tests (need root): NetworkPolicy. The typed map access of
//! `riptide_datapath::policy`, and the verdicts of `rt_from_pod`,
//! `rt_from_net` and `rt_to_pod` through BPF_PROG_TEST_RUN on crafted
//! frames, each checked by verdict and by the policy counters.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use riptide_common::{
    IpcacheValue, POL_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyEndpointValue, PolicyKey,
    PolicyValue,
};
use riptide_datapath::{policy::PolicyMaps, unpin_node};
use riptide_test_support::privileged;

struct PinGuard(String);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = unpin_node(&self.0);
    }
}

#[test]
fn kernel_policy_maps_round_trip_from_a_datapath_and_from_pins() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let node = format!("policy-test-{}", std::process::id());
    let _guard = PinGuard(node.clone());
    let dp = Datapath::load(&Pinning::Node(node.clone())).expect("load pinned");
    let mut m = dp.policy().expect("policy maps");
    let id = |identity, cidr_identity| IpcacheValue {
        identity,
        cidr_identity,
    };
    m.upsert_ipcache(ip("0.0.0.0"), 0, id(2, 0)).unwrap();
    // Host bits of a prefix are dropped: this is 10.42.0.0/16.
    m.upsert_ipcache(ip("10.42.9.9"), 16, id(2, 1 << 24)).unwrap();
    m.upsert_ipcache(ip("10.42.0.7"), 32, id(300, 1 << 24)).unwrap();
    let ep = PolicyEndpointValue {
        ep_id: 7,
        identity: 300,
        flags: 1,
        _pad: 0,
    };
    m.upsert_endpoint(ip("10.42.0.7"), ep).unwrap();
    let rule = PolicyKey {
        ep_id_be: 7u32.to_be(),
        identity_be: 301u32.to_be(),
        dir: POL_DIR_INGRESS,
        proto: 6,
        port_be: 80u16.to_be(),
    };
    m.upsert_rule(POLICY_PREFIX_FULL, rule, PolicyValue { policy_ref: 5, flags: 0 })
        .unwrap();
    assert!(m.upsert_rule(POLICY_PREFIX_FULL + 1, rule, PolicyValue::default()).is_err());
    assert!(m.upsert_ipcache(ip("1.2.3.4"), 33, id(2, 0)).is_err());

    // A second handle, from the pins, sees the same entries.
    let pinned = PolicyMaps::open_pinned(&node).expect("open pinned");
    let mut cache = pinned.list_ipcache().unwrap();
    cache.sort_by_key(|((a, l), _)| (*a, *l));
    assert_eq!(
        cache,
        vec![
            ((ip("0.0.0.0"), 0), id(2, 0)),
            ((ip("10.42.0.0"), 16), id(2, 1 << 24)),
            ((ip("10.42.0.7"), 32), id(300, 1 << 24)),
        ]
    );
    assert_eq!(pinned.list_endpoints().unwrap(), vec![(ip("10.42.0.7"), ep)]);
    assert_eq!(pinned.get_endpoint(ip("10.42.0.7")).unwrap(), Some(ep));
    assert_eq!(pinned.get_endpoint(ip("10.42.0.8")).unwrap(), None);
    assert_eq!(
        pinned.list_rules().unwrap(),
        vec![((POLICY_PREFIX_FULL, rule), PolicyValue { policy_ref: 5, flags: 0 })]
    );

    // Removing, twice: the second time the key is absent, which is fine.
    for _ in 0..2 {
        m.remove_ipcache(ip("10.42.0.0"), 16).unwrap();
        m.remove_endpoint(ip("10.42.0.7")).unwrap();
        m.remove_rule(POLICY_PREFIX_FULL, rule).unwrap();
    }
    assert_eq!(pinned.list_ipcache().unwrap().len(), 2);
    assert!(pinned.list_endpoints().unwrap().is_empty());
    assert!(pinned.list_rules().unwrap().is_empty());
}
