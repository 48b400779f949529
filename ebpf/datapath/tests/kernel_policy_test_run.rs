//! Kernel tests (need root): NetworkPolicy. The typed map access of
//! `riptide_datapath::policy`, and the verdicts of `rt_from_pod`,
//! `rt_from_net` and `rt_to_pod` through BPF_PROG_TEST_RUN on crafted
//! frames, each checked by verdict and by the policy counters (a verdict
//! alone could come from a program that ignores policy).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::*;
use riptide_common::{
    CFG_F_MASQUERADE, CFG_F_POLICY, CT_BIDIR_REPLIES, CT_F_BIDIR, CT_F_CLOSING, CT_F_FIN_FWD,
    CT_F_FIN_REV, CT_F_INBOUND, CT_F_POLICY, CT_F_POLICY_REV, Config, EV_SRC_FROM_NET,
    EV_SRC_FROM_POD, EV_SRC_TO_POD, IpcacheValue, PE_F_ANY_IN, PE_F_AUDIT_IN, PE_F_FAIL_CLOSED,
    PE_F_EXACT_IN, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, POL_DIR_EGRESS, POL_DIR_INGRESS, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, PolicyEndpointValue, PolicyKey, PolicyValue,
    identity, names, proto, stats,
};
use riptide_datapath::{events::Events, policy::PolicyMaps, unpin_node};
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
    m.upsert_ipcache(ip("10.42.9.9"), 16, id(2, 1 << 24))
        .unwrap();
    m.upsert_ipcache(ip("10.42.0.7"), 32, id(300, 1 << 24))
        .unwrap();
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
    m.upsert_rule(
        POLICY_PREFIX_FULL,
        rule,
        PolicyValue {
            policy_ref: 5,
            flags: 0,
        },
    )
    .unwrap();
    assert!(
        m.upsert_rule(POLICY_PREFIX_FULL + 1, rule, PolicyValue::default())
            .is_err()
    );
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
    assert_eq!(
        pinned.list_endpoints().unwrap(),
        vec![(ip("10.42.0.7"), ep)]
    );
    assert_eq!(pinned.get_endpoint(ip("10.42.0.7")).unwrap(), Some(ep));
    assert_eq!(pinned.get_endpoint(ip("10.42.0.8")).unwrap(), None);
    assert_eq!(
        pinned.list_rules().unwrap(),
        vec![(
            (POLICY_PREFIX_FULL, rule),
            PolicyValue {
                policy_ref: 5,
                flags: 0
            }
        )]
    );

    // The exact hashes, apart from the tries.
    m.upsert_ipcache_exact(ip("10.42.0.8"), id(301, 0)).unwrap();
    m.upsert_rule_exact(rule, PolicyValue { policy_ref: 6, flags: 0 })
        .unwrap();
    assert_eq!(
        pinned.list_ipcache_exact().unwrap(),
        vec![(ip("10.42.0.8"), id(301, 0))]
    );
    assert_eq!(
        pinned.list_rules_exact().unwrap(),
        vec![(rule, PolicyValue { policy_ref: 6, flags: 0 })]
    );
    assert_eq!(pinned.list_ipcache().unwrap().len(), 3);

    // Removing, twice: the second time the key is absent, which is fine.
    for _ in 0..2 {
        m.remove_ipcache(ip("10.42.0.0"), 16).unwrap();
        m.remove_endpoint(ip("10.42.0.7")).unwrap();
        m.remove_rule(POLICY_PREFIX_FULL, rule).unwrap();
        m.remove_ipcache_exact(ip("10.42.0.8")).unwrap();
        m.remove_rule_exact(rule).unwrap();
    }
    assert_eq!(pinned.list_ipcache().unwrap().len(), 2);
    assert!(pinned.list_endpoints().unwrap().is_empty());
    assert!(pinned.list_rules().unwrap().is_empty());
    assert!(pinned.list_ipcache_exact().unwrap().is_empty());
    assert!(pinned.list_rules_exact().unwrap().is_empty());
}

// ------------------------------------------------------------- the verdicts

const NODE_IP: &str = "198.18.0.1";
const HAIRPIN_IP: &str = "169.254.42.1";
/// Local pods: client A, server B, another local pod C.
const A: &str = "10.42.0.5";
const B: &str = "10.42.0.20";
const C: &str = "10.42.0.21";
/// A local pod in B's `rt_polidx4_v1` slot (the same low 12 bits).
const D: &str = "10.42.16.20";
/// A pod on another node and a host outside the cluster.
const R: &str = "10.42.1.7";
const W: &str = "203.0.113.9";
const VIP: &str = "10.43.0.10";

const A_ID: u32 = 300;
const B_ID: u32 = 301;
const C_ID: u32 = 302;
const D_ID: u32 = 304;
const R_ID: u32 = 303;
/// Endpoint ids of the local pods.
const A_EP: u32 = 1;
const B_EP: u32 = 2;

/// One node with policy on: three local pods, the ipcache the agent would
/// write (pods, node addresses, the rest of the world), no rules yet.
struct PolicyNode {
    n: Node,
    pol: PolicyMaps,
    events: Events,
}

impl PolicyNode {
    fn new() -> Self {
        Self::with_flags(CFG_F_POLICY | CFG_F_MASQUERADE)
    }

    fn with_flags(flags: u32) -> Self {
        let config = Config {
            node_ip_be: u32::from(ip(NODE_IP)).to_be(),
            hairpin_ip_be: u32::from(ip(HAIRPIN_IP)).to_be(),
            cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
            cluster_cidr_len: 16,
            nomasq_cidr_be: u32::from(ip("198.18.0.0")).to_be(),
            nomasq_cidr_len: 24,
            flags,
            snat_port_min: 32768,
            snat_port_max: 60999,
            ..Default::default()
        };
        let pods = [A, B, C, D];
        let mut n = Node::load(
            &config,
            (0u8..)
                .zip(pods)
                .map(|(i, a)| (ip(a), pod_endpoint(100 + u32::from(i), [0, i]))),
        );
        let mut pol = n.dp.policy().unwrap();
        let events = n.dp.events().unwrap();
        let cache = [
            ("0.0.0.0", 0, identity::WORLD),
            (A, 32, A_ID),
            (B, 32, B_ID),
            (C, 32, C_ID),
            (D, 32, D_ID),
            (R, 32, R_ID),
            (NODE_IP, 32, identity::HOST),
            // Another address of this node (what the kernel picks as the
            // source towards a pod may be any of them).
            ("10.42.0.1", 32, identity::HOST),
        ];
        for (addr, len, identity) in cache {
            pol.upsert_ipcache(
                ip(addr),
                len,
                IpcacheValue {
                    identity,
                    cidr_identity: 0,
                },
            )
            .unwrap();
        }
        Self { n, pol, events }
    }

    /// Gives the local pod `addr` policy state.
    fn endpoint(&mut self, addr: &str, ep_id: u32, identity: u32, flags: u32) {
        self.pol
            .upsert_endpoint(
                ip(addr),
                PolicyEndpointValue {
                    ep_id,
                    identity,
                    flags,
                    _pad: 0,
                },
            )
            .unwrap();
    }

    fn rule_key(ep_id: u32, peer: u32, dir: u8, proto: u8, port: u16) -> PolicyKey {
        PolicyKey {
            ep_id_be: ep_id.to_be(),
            identity_be: peer.to_be(),
            dir,
            proto,
            port_be: port.to_be(),
        }
    }

    /// Allows `peer` for `ep_id` in `dir` on `proto`/`port` with `prefix`
    /// bits of the key.
    fn allow(&mut self, ep_id: u32, peer: u32, dir: u8, proto: u8, port: u16, prefix: u32) {
        self.pol
            .upsert_rule(
                prefix,
                Self::rule_key(ep_id, peer, dir, proto, port),
                PolicyValue {
                    policy_ref: 1,
                    flags: 0,
                },
            )
            .unwrap();
    }

    /// Allows `peer` on one TCP port.
    fn allow_tcp(&mut self, ep_id: u32, peer: u32, dir: u8, port: u16) {
        self.allow(ep_id, peer, dir, proto::TCP, port, POLICY_PREFIX_FULL);
    }

    fn revoke_tcp(&mut self, ep_id: u32, peer: u32, dir: u8, port: u16) {
        self.pol
            .remove_rule(
                POLICY_PREFIX_FULL,
                Self::rule_key(ep_id, peer, dir, proto::TCP, port),
            )
            .unwrap();
    }

    fn cidr(&mut self, addr: &str, len: u8, identity: u32, cidr_identity: u32) {
        self.pol
            .upsert_ipcache(
                ip(addr),
                len,
                IpcacheValue {
                    identity,
                    cidr_identity,
                },
            )
            .unwrap();
    }

    /// A and B isolated both ways; A → B:80 allowed (A's egress, B's
    /// ingress), nothing else.
    fn a_to_b_80_only() -> Self {
        let mut t = Self::new();
        let both = PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT;
        t.endpoint(A, A_EP, A_ID, both);
        t.endpoint(B, B_EP, B_ID, both);
        t.allow_tcp(A_EP, B_ID, POL_DIR_EGRESS, 80);
        t.allow_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);
        t
    }

    fn run(&mut self, prog: &'static str, frame: &[u8]) -> u32 {
        run(&mut self.n.dp, prog, frame).0
    }

    /// `[allow_in, allow_out, deny_in, deny_out, audit_in, audit_out]`.
    fn counters(&self) -> [u64; 6] {
        let st = self.n.dp.stats().unwrap();
        [
            stats::POLICY_ALLOW_IN,
            stats::POLICY_ALLOW_OUT,
            stats::POLICY_DENY_IN,
            stats::POLICY_DENY_OUT,
            stats::POLICY_AUDIT_IN,
            stats::POLICY_AUDIT_OUT,
        ]
        .map(|r| st.get(r))
    }

    fn policy_entries(&self) -> Vec<(SocketAddrV4, SocketAddrV4, u16)> {
        self.n
            .dp
            .conntrack()
            .unwrap()
            .into_iter()
            .filter(|(_, v)| v.flags & CT_F_POLICY != 0)
            .map(|(k, v)| {
                (
                    SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(k.saddr_be)),
                        u16::from_be(k.sport_be),
                    ),
                    SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(k.daddr_be)),
                        u16::from_be(k.dport_be),
                    ),
                    v.flags,
                )
            })
            .collect()
    }

    fn dump(&self) -> String {
        format!(
            "conntrack: {:?}\nendpoints: {:?}\nrules: {:?}\nstats: {:?}",
            self.n.dp.conntrack().unwrap(),
            self.pol.list_endpoints().unwrap(),
            self.pol.list_rules().unwrap(),
            self.n
                .dp
                .stats()
                .unwrap()
                .named()
                .filter(|(_, v)| *v > 0)
                .collect::<Vec<_>>()
        )
    }
}

const DENY_IN: usize = 2;
const DENY_OUT: usize = 3;
const AUDIT_IN: usize = 4;

fn at(addr: &str, port: u16) -> (Ipv4Addr, u16) {
    (ip(addr), port)
}

fn sa(addr: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(addr), port)
}

const FROM_POD: &str = names::PROG_FROM_POD;
const FROM_NET: &str = names::PROG_FROM_NET;
const TO_POD: &str = names::PROG_TO_POD;

#[test]
fn ingress_allows_the_selected_pod_on_the_selected_port_only() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    t.allow_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);

    let v = t.run(FROM_POD, &syn(at(A, 40000), at(B, 80)));
    assert_eq!(v, TC_ACT_REDIRECT, "A may reach B:80\n{}", t.dump());
    assert_eq!(t.counters(), [1, 0, 0, 0, 0, 0]);
    assert_eq!(
        t.policy_entries(),
        vec![(sa(A, 40000), sa(B, 80), CT_F_POLICY | CT_F_BIDIR)],
        "the allowed flow is recorded once, for both directions"
    );

    for (frame, what) in [
        (syn(at(C, 40000), at(B, 80)), "another pod"),
        (syn(at(A, 40001), at(B, 81)), "another port"),
        (
            udp(at(A, 40002), at(B, 80), b"x", false),
            "another protocol",
        ),
    ] {
        let before = t.counters();
        assert_eq!(
            t.run(FROM_POD, &frame),
            TC_ACT_SHOT,
            "{what} is denied\n{}",
            t.dump()
        );
        assert_eq!(
            t.counters()[DENY_IN],
            before[DENY_IN] + 1,
            "{what}: counted"
        );
    }
    assert_eq!(t.counters(), [1, 0, 3, 0, 0, 0]);
    assert_eq!(t.policy_entries().len(), 1, "denied flows are not recorded");

    let ev = t.events.drain();
    let denied: Vec<_> = ev
        .iter()
        .filter(|e| e.reason() == "policy_deny_in")
        .collect();
    assert_eq!(denied.len(), 3, "one event per denial: {ev:?}");
    assert_eq!(denied[0].src(), sa(C, 40000));
    assert_eq!(denied[0].dst(), sa(B, 80));
    assert_eq!(denied[0].raw.source, EV_SRC_FROM_POD);
    assert_eq!(denied[0].raw.proto, proto::TCP);
}

#[test]
fn endpoints_count_in_their_slot_and_a_load_recounts_the_pins() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let node = format!("polidx-test-{}", std::process::id());
    let _guard = PinGuard(node.clone());
    let dp = Datapath::load(&Pinning::Node(node.clone())).expect("load pinned");
    let mut m = dp.policy().expect("policy maps");
    let ep = PolicyEndpointValue {
        ep_id: 7,
        identity: 300,
        flags: PE_F_ISOLATED_IN,
        _pad: 0,
    };
    // 10.42.0.7 and 10.42.16.7 share a slot (the low 12 bits).
    let (a, b) = (ip("10.42.0.7"), ip("10.42.16.7"));
    assert_eq!(m.slot_count(a).unwrap(), 0);
    m.upsert_endpoint(a, ep).unwrap();
    m.upsert_endpoint(a, ep).unwrap();
    assert_eq!(m.slot_count(a).unwrap(), 1, "an update is not a new entry");
    m.upsert_endpoint(b, ep).unwrap();
    assert_eq!(m.slot_count(a).unwrap(), 2);
    for _ in 0..2 {
        m.remove_endpoint(a).unwrap();
    }
    assert_eq!(m.slot_count(b).unwrap(), 1, "a missing entry is not uncounted");
    assert_eq!(m.slot_count(ip("10.42.0.8")).unwrap(), 0);

    // An entry written without its count (an older agent's): the next load
    // (an agent restart) counts it, so the programs ask rt_polep4_v1 about
    // the pod again. A count without its entry stays (never lowered by a
    // load: a writer may be about to write the entry).
    let c = ip("10.42.0.9");
    let dir = std::path::Path::new(riptide_common::PIN_ROOT).join(&node);
    let raw = aya::maps::MapData::from_pin(dir.join(names::POLEP4)).unwrap();
    let mut raw: aya::maps::HashMap<_, riptide_common::EndpointKey, PolicyEndpointValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(raw)).unwrap();
    let key = riptide_common::EndpointKey {
        addr_be: u32::from(c).to_be(),
    };
    raw.insert(key, ep, 0).unwrap();
    raw.remove(&riptide_common::EndpointKey {
        addr_be: u32::from(b).to_be(),
    })
    .unwrap();
    assert_eq!(m.slot_count(c).unwrap(), 0);
    drop((m, dp));
    let dp = Datapath::load(&Pinning::Node(node.clone())).expect("load pinned again");
    let m = dp.policy().expect("policy maps");
    assert_eq!(m.slot_count(c).unwrap(), 1);
    assert_eq!(m.slot_count(b).unwrap(), 1);
}

#[test]
fn unselected_pods_and_a_node_without_policy_are_not_judged() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // Policy state for B, but the node flag is off: nothing is judged.
    let mut t = PolicyNode::with_flags(CFG_F_MASQUERADE);
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40000), at(B, 80))),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        t.run(FROM_NET, &syn(at(W, 40000), at(B, 80))),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.run(TO_POD, &syn(at(W, 40001), at(B, 80))), TC_ACT_OK);
    assert_eq!(t.counters(), [0; 6]);
    assert!(t.policy_entries().is_empty());

    // Flag on: C has no state, so C's flows to other unisolated places
    // are neither judged nor recorded.
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40000), at(A, 80))),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.run(FROM_POD, &syn(at(C, 40000), at(R, 80))), TC_ACT_OK);
    assert_eq!(t.counters(), [0; 6]);
    assert!(t.policy_entries().is_empty());
    // ... while B is isolated.
    assert_eq!(t.run(FROM_POD, &syn(at(C, 40001), at(B, 80))), TC_ACT_SHOT);
    assert_eq!(t.counters(), [0, 0, 1, 0, 0, 0]);
}

#[test]
fn a_pod_sharing_an_isolated_pods_slot_is_not_judged_and_its_replies_pass() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // B is isolated both ways and may only reach D:80; D has no policy
    // state but its slot counts B's entry.
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    t.allow_tcp(B_EP, D_ID, POL_DIR_EGRESS, 80);
    assert_eq!(t.pol.slot_count(ip(D)).unwrap(), 1, "D shares B's slot");

    // A packet of D's own flow that conntrack does not know (not a SYN)
    // is neither judged nor recorded.
    let ack = tcp(at(D, 40000), at(R, 80), 0x10, b"");
    assert_eq!(t.run(FROM_POD, &ack), TC_ACT_OK, "{}", t.dump());
    assert_eq!(t.counters(), [0; 6]);
    assert!(t.policy_entries().is_empty(), "{}", t.dump());

    // B → D:80 is allowed by B's egress and recorded once; D's replies
    // find that entry and pass unjudged.
    assert_eq!(
        t.run(FROM_POD, &syn(at(B, 40000), at(D, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(t.counters(), [0, 1, 0, 0, 0, 0]);
    for flags in [0x12, 0x10, 0x18] {
        let reply = tcp(at(D, 80), at(B, 40000), flags, b"");
        assert_eq!(
            t.run(FROM_POD, &reply),
            TC_ACT_REDIRECT,
            "D's reply (flags {flags:#x}) passes\n{}",
            t.dump()
        );
    }
    assert_eq!(t.counters(), [0, 1, 0, 0, 0, 0], "replies are not judged");
    // D's own new flow to B is judged by B's ingress (no rule: denied).
    assert_eq!(t.run(FROM_POD, &syn(at(D, 40001), at(B, 80))), TC_ACT_SHOT);
    assert_eq!(t.counters(), [0, 1, 1, 0, 0, 0]);
}

#[test]
fn replies_of_allowed_flows_pass_both_ways_and_established_packets_skip_policy() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // Only A → B:80 and A → R:443 are allowed.
    let mut t = PolicyNode::a_to_b_80_only();
    t.allow_tcp(A_EP, R_ID, POL_DIR_EGRESS, 443);

    assert_eq!(
        t.run(FROM_POD, &syn(at(A, 40000), at(B, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(
        t.counters(),
        [1, 1, 0, 0, 0, 0],
        "both directions judged once"
    );
    // B's SYN-ACK leaves B (egress-isolated, no egress rules) and enters A
    // (ingress-isolated, no ingress rules): a conntrack hit, not judged.
    let synack = tcp(at(B, 80), at(A, 40000), 0x12, b"");
    assert_eq!(
        t.run(FROM_POD, &synack),
        TC_ACT_REDIRECT,
        "reply passes\n{}",
        t.dump()
    );
    // The reply of A's flow to a pod on another node, through the uplink.
    assert_eq!(t.run(FROM_POD, &syn(at(A, 40001), at(R, 443))), TC_ACT_OK);
    assert_eq!(t.counters(), [1, 2, 0, 0, 0, 0]);
    let synack = tcp(at(R, 443), at(A, 40001), 0x12, b"");
    assert_eq!(
        t.run(FROM_NET, &synack),
        TC_ACT_REDIRECT,
        "reply from the uplink passes\n{}",
        t.dump()
    );
    assert_eq!(
        t.run(TO_POD, &synack),
        TC_ACT_OK,
        "and on the veth's egress"
    );
    assert_eq!(t.counters(), [1, 2, 0, 0, 0, 0], "replies are never judged");

    // The rules go away: established packets still pass, unjudged; a new
    // flow is denied.
    t.revoke_tcp(A_EP, B_ID, POL_DIR_EGRESS, 80);
    t.revoke_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);
    let ack = tcp(at(A, 40000), at(B, 80), 0x10, b"data");
    assert_eq!(t.run(FROM_POD, &ack), TC_ACT_REDIRECT, "established");
    assert_eq!(
        t.run(FROM_POD, &tcp(at(B, 80), at(A, 40000), 0x10, b"")),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.counters(), [1, 2, 0, 0, 0, 0]);
    assert_eq!(
        t.run(FROM_POD, &syn(at(A, 40002), at(B, 80))),
        TC_ACT_SHOT,
        "new flow"
    );
    assert_eq!(
        t.counters(),
        [1, 2, 0, 1, 0, 0],
        "denied on A's egress first"
    );
}

#[test]
fn one_entry_per_flow_closes_once_both_sides_finished() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::a_to_b_80_only();
    let (a, b) = (at(A, 40000), at(B, 80));
    let flags = |t: &PolicyNode| -> Vec<u16> {
        t.policy_entries().into_iter().map(|(_, _, f)| f).collect()
    };
    assert_eq!(t.run(FROM_POD, &syn(a, b)), TC_ACT_REDIRECT, "{}", t.dump());
    assert_eq!(flags(&t), vec![CT_F_POLICY | CT_F_BIDIR]);
    // A half-closes: the connection stays established while B still sends.
    assert_eq!(t.run(FROM_POD, &tcp(a, b, 0x11, b"")), TC_ACT_REDIRECT);
    assert_eq!(flags(&t), vec![CT_F_POLICY | CT_F_BIDIR | CT_F_FIN_FWD]);
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x10, b"more")), TC_ACT_REDIRECT);
    // B's FIN, found through the reverse tuple, closes it.
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x11, b"")), TC_ACT_REDIRECT);
    assert_eq!(
        flags(&t),
        vec![CT_F_POLICY | CT_F_BIDIR | CT_F_FIN_FWD | CT_F_FIN_REV | CT_F_CLOSING]
    );
    // Port reuse: a new SYN on the tuple opens it again, unjudged.
    assert_eq!(t.run(FROM_POD, &syn(a, b)), TC_ACT_REDIRECT);
    assert_eq!(flags(&t), vec![CT_F_POLICY | CT_F_BIDIR]);
    // An RST from either side closes at once.
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x14, b"")), TC_ACT_REDIRECT);
    assert_eq!(flags(&t), vec![CT_F_POLICY | CT_F_BIDIR | CT_F_CLOSING]);
    assert_eq!(t.counters(), [1, 1, 0, 0, 0, 0], "judged once");
}

#[test]
fn a_long_flows_replies_get_their_own_entry_which_closes_through_the_flow() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::a_to_b_80_only();
    let (a, b) = (at(A, 40000), at(B, 80));
    let entries = |t: &PolicyNode| {
        let mut v = t.policy_entries();
        v.sort();
        v
    };
    let fwd = |flags| (sa(A, 40000), sa(B, 80), CT_F_POLICY | CT_F_BIDIR | flags);
    let rev = |flags| {
        (
            sa(B, 80),
            sa(A, 40000),
            CT_F_POLICY | CT_F_POLICY_REV | flags,
        )
    };
    assert_eq!(t.run(FROM_POD, &syn(a, b)), TC_ACT_REDIRECT, "{}", t.dump());
    // The first replies find the flow under their reverse tuple ...
    for _ in 0..CT_BIDIR_REPLIES {
        assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x10, b"r")), TC_ACT_REDIRECT);
    }
    assert_eq!(entries(&t), vec![fwd(0)], "{}", t.dump());
    // ... the next one gives the reply tuple an entry of its own.
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x10, b"r")), TC_ACT_REDIRECT);
    assert_eq!(entries(&t), vec![fwd(0), rev(0)], "{}", t.dump());
    // Established: replies pass with the rules gone, in both programs.
    t.revoke_tcp(A_EP, B_ID, POL_DIR_EGRESS, 80);
    t.revoke_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x10, b"r")), TC_ACT_REDIRECT);
    assert_eq!(t.run(TO_POD, &tcp(b, a, 0x10, b"r")), TC_ACT_OK);
    assert_eq!(t.counters(), [1, 1, 0, 0, 0, 0], "replies are never judged");
    // A SYN on the reply tuple opens a flow from B: judged (and denied:
    // B's egress has no rule now).
    assert_eq!(t.run(FROM_POD, &syn(b, a)), TC_ACT_SHOT, "{}", t.dump());
    assert_eq!(t.counters(), [1, 1, 0, 1, 0, 0]);
    // B's FIN reaches the flow's entry; A's FIN then closes the connection.
    assert_eq!(t.run(FROM_POD, &tcp(b, a, 0x11, b"")), TC_ACT_REDIRECT);
    assert_eq!(
        entries(&t),
        vec![fwd(CT_F_FIN_REV), rev(CT_F_CLOSING)],
        "{}",
        t.dump()
    );
    assert_eq!(t.run(FROM_POD, &tcp(a, b, 0x11, b"")), TC_ACT_REDIRECT);
    assert_eq!(
        entries(&t),
        vec![
            fwd(CT_F_FIN_FWD | CT_F_FIN_REV | CT_F_CLOSING),
            rev(CT_F_CLOSING)
        ]
    );
}

#[test]
fn ipblock_peers_match_by_prefix_and_except_carves_out() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    let block = identity::FIRST_CIDR;
    let except = identity::FIRST_CIDR + 1;
    let pods_block = identity::FIRST_CIDR + 2;
    // ipBlock 203.0.113.0/24 except 203.0.113.128/25, and 10.42.1.0/24
    // (a remote node's pods): the agent writes each prefix with its own
    // CIDR identity, and pod entries inside a prefix carry it too.
    t.cidr("203.0.113.0", 24, identity::WORLD, block);
    t.cidr("203.0.113.128", 25, identity::WORLD, except);
    t.cidr("10.42.1.0", 24, identity::WORLD, pods_block);
    t.cidr(R, 32, R_ID, pods_block);
    t.endpoint(A, A_EP, A_ID, PE_F_ISOLATED_OUT);
    t.allow_tcp(A_EP, block, POL_DIR_EGRESS, 443);
    t.allow_tcp(A_EP, pods_block, POL_DIR_EGRESS, 443);

    let a = at(A, 40000);
    assert_eq!(
        t.run(FROM_POD, &syn(a, at(W, 443))),
        TC_ACT_OK,
        "inside the block\n{}",
        t.dump()
    );
    assert_eq!(t.counters(), [0, 1, 0, 0, 0, 0]);
    assert_eq!(
        t.run(FROM_POD, &syn(a, at("203.0.113.200", 443))),
        TC_ACT_SHOT,
        "in the except"
    );
    assert_eq!(
        t.run(FROM_POD, &syn(a, at("198.51.100.1", 443))),
        TC_ACT_SHOT,
        "outside the block"
    );
    assert_eq!(
        t.run(FROM_POD, &syn(a, at(W, 444))),
        TC_ACT_SHOT,
        "another port"
    );
    assert_eq!(t.counters(), [0, 1, 0, 3, 0, 0]);
    // A pod address inside an ipBlock matches it, as upstream expects.
    assert_eq!(
        t.run(FROM_POD, &syn(a, at(R, 443))),
        TC_ACT_OK,
        "pod inside the block"
    );
    assert_eq!(
        t.run(FROM_POD, &syn(a, at("10.42.1.8", 443))),
        TC_ACT_OK,
        "unknown address in it"
    );
    assert_eq!(t.counters(), [0, 3, 0, 3, 0, 0]);
    // Ingress from outside, judged on the uplink by the client's address.
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    t.allow_tcp(B_EP, block, POL_DIR_INGRESS, 80);
    assert_eq!(
        t.run(FROM_NET, &syn(at(W, 5000), at(B, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(
        t.run(FROM_NET, &syn(at("203.0.113.129", 5000), at(B, 80))),
        TC_ACT_SHOT
    );
    assert_eq!(t.counters(), [1, 3, 1, 3, 0, 0]);
    let ev = t.events.drain();
    assert!(
        ev.iter().any(|e| e.reason() == "policy_deny_in"
            && e.src() == sa("203.0.113.129", 5000)
            && e.raw.source == EV_SRC_FROM_NET),
        "{ev:?}"
    );
}

#[test]
fn any_peer_rules_apply_only_with_the_endpoint_flag() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    // `ingress: [{}]`: every peer, every protocol and port.
    t.allow(
        B_EP,
        identity::ANY,
        POL_DIR_INGRESS,
        0,
        0,
        POLICY_PREFIX_ANY_PROTO,
    );
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40000), at(B, 80))),
        TC_ACT_SHOT,
        "flag not set"
    );
    assert_eq!(t.counters(), [0, 0, 1, 0, 0, 0]);
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ANY_IN);
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40001), at(B, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(
        t.run(FROM_POD, &udp(at(A, 40001), at(B, 53), b"q", false)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        t.run(FROM_NET, &syn(at(W, 40001), at(B, 9999))),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.counters(), [3, 0, 1, 0, 0, 0]);
}

#[test]
fn port_ranges_are_prefixes_and_protocol_rules_cover_every_port() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    // port 8080, endPort 8087: one aligned prefix (the low 3 bits free).
    t.allow(
        B_EP,
        A_ID,
        POL_DIR_INGRESS,
        proto::TCP,
        8080,
        POLICY_PREFIX_FULL - 3,
    );
    // UDP on every port.
    t.allow(
        B_EP,
        A_ID,
        POL_DIR_INGRESS,
        proto::UDP,
        0,
        POLICY_PREFIX_ANY_PORT,
    );
    let mut sport = 40000;
    let mut try_port = |t: &mut PolicyNode, port: u16| {
        sport += 1;
        t.run(FROM_POD, &syn(at(A, sport), at(B, port)))
    };
    for port in [8080, 8085, 8087] {
        assert_eq!(
            try_port(&mut t, port),
            TC_ACT_REDIRECT,
            "TCP {port} in the range\n{}",
            t.dump()
        );
    }
    for port in [8079, 8088, 80] {
        assert_eq!(
            try_port(&mut t, port),
            TC_ACT_SHOT,
            "TCP {port} outside the range"
        );
    }
    for port in [53, 8088, 65535] {
        let v = t.run(FROM_POD, &udp(at(A, 40000), at(B, port), b"q", false));
        assert_eq!(v, TC_ACT_REDIRECT, "UDP {port}");
    }
    assert_eq!(t.counters(), [6, 0, 3, 0, 0, 0]);
}

#[test]
fn exact_hashes_answer_first_and_the_exact_flag_skips_the_trie() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    let key = |peer, port| PolicyNode::rule_key(B_EP, peer, POL_DIR_INGRESS, proto::TCP, port);
    let v = PolicyValue { policy_ref: 1, flags: 0 };
    t.pol.upsert_rule_exact(key(A_ID, 80), v).unwrap();
    // port 8080, endPort 8087: in the trie.
    t.allow(B_EP, A_ID, POL_DIR_INGRESS, proto::TCP, 8080, POLICY_PREFIX_FULL - 3);
    let mut sport = 40000;
    let mut try_port = |t: &mut PolicyNode, port: u16| {
        sport += 1;
        t.run(FROM_POD, &syn(at(A, sport), at(B, port)))
    };
    assert_eq!(try_port(&mut t, 80), TC_ACT_REDIRECT, "exact rule\n{}", t.dump());
    assert_eq!(try_port(&mut t, 8081), TC_ACT_REDIRECT, "trie rule");
    assert_eq!(try_port(&mut t, 81), TC_ACT_SHOT);
    // Every ingress rule single-port, says the flag: the trie is not asked.
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_EXACT_IN);
    assert_eq!(try_port(&mut t, 8082), TC_ACT_SHOT, "trie skipped");
    assert_eq!(try_port(&mut t, 80), TC_ACT_REDIRECT);
    // A's /32 in the exact ipcache wins over the trie's.
    t.pol
        .upsert_ipcache_exact(ip(A), IpcacheValue { identity: C_ID, cidr_identity: 0 })
        .unwrap();
    assert_eq!(try_port(&mut t, 80), TC_ACT_SHOT, "A is C now");
    t.pol.upsert_rule_exact(key(C_ID, 81), v).unwrap();
    assert_eq!(try_port(&mut t, 81), TC_ACT_REDIRECT, "{}", t.dump());
    assert_eq!(t.counters(), [4, 0, 3, 0, 0, 0]);
}

#[test]
fn audit_mode_counts_and_reports_but_passes() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_AUDIT_IN);
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40000), at(B, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(t.counters()[AUDIT_IN], 1);
    assert_eq!(t.counters()[DENY_IN], 0, "not a denial");
    let ev = t.events.drain();
    assert!(
        ev.iter()
            .any(|e| e.reason() == "policy_audit_in" && e.src() == sa(C, 40000)),
        "{ev:?}"
    );
    // Passed flows are flows: recorded, their later packets not judged again.
    assert_eq!(t.policy_entries().len(), 1);
    assert_eq!(
        t.run(FROM_POD, &tcp(at(C, 40000), at(B, 80), 0x10, b"x")),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.counters(), [0, 0, 0, 0, 1, 0]);
}

#[test]
fn fail_closed_denies_all_but_the_node_and_the_pod_itself() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(
        B,
        B_EP,
        B_ID,
        PE_F_ISOLATED_IN | PE_F_ANY_IN | PE_F_FAIL_CLOSED,
    );
    t.allow_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);
    t.allow(
        B_EP,
        identity::ANY,
        POL_DIR_INGRESS,
        0,
        0,
        POLICY_PREFIX_ANY_PROTO,
    );
    assert_eq!(
        t.run(FROM_POD, &syn(at(A, 40000), at(B, 80))),
        TC_ACT_SHOT,
        "{}",
        t.dump()
    );
    assert_eq!(t.counters(), [0, 0, 1, 0, 0, 0]);
    assert_eq!(
        t.run(TO_POD, &syn(at(NODE_IP, 40000), at(B, 80))),
        TC_ACT_OK,
        "the node"
    );
    assert_eq!(
        t.run(FROM_POD, &syn(at(B, 40000), at(B, 80))),
        TC_ACT_REDIRECT,
        "itself"
    );
    assert_eq!(t.counters(), [2, 0, 1, 0, 0, 0]);
}

#[test]
fn the_node_the_pod_itself_and_hairpin_flows_always_pass() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    // B is isolated both ways without a single rule.
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    t.n.svcs.upsert(&web(vec![(B, true)])).unwrap();
    // The kubelet's probe, from the node's address and from another
    // address of the node, into B through the veth's egress.
    assert_eq!(
        t.run(TO_POD, &syn(at(NODE_IP, 50000), at(B, 8080))),
        TC_ACT_OK,
        "{}",
        t.dump()
    );
    assert_eq!(
        t.run(TO_POD, &syn(at("10.42.0.1", 50000), at(B, 8080))),
        TC_ACT_OK
    );
    // B to the node.
    assert_eq!(
        t.run(FROM_POD, &syn(at(B, 50000), at(NODE_IP, 10250))),
        TC_ACT_OK
    );
    // B to itself, directly and through its own Service (hairpin).
    assert_eq!(
        t.run(FROM_POD, &syn(at(B, 50001), at(B, 8080))),
        TC_ACT_REDIRECT
    );
    let (v, out) = run(&mut t.n.dp, FROM_POD, &syn(at(B, 50002), at(VIP, 80)));
    assert_eq!(v, TC_ACT_REDIRECT, "hairpin\n{}", t.dump());
    assert_eq!(view(&out).src, ip(HAIRPIN_IP));
    assert_eq!(t.counters()[DENY_IN] + t.counters()[DENY_OUT], 0);
    // ... and isolation is real for anyone else.
    assert_eq!(t.run(TO_POD, &syn(at(W, 50000), at(B, 8080))), TC_ACT_SHOT);
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 50000), at(B, 8080))),
        TC_ACT_SHOT
    );
    assert_eq!(t.run(FROM_POD, &syn(at(B, 50003), at(C, 80))), TC_ACT_SHOT);
    assert_eq!(t.counters()[DENY_IN], 2);
    assert_eq!(t.counters()[DENY_OUT], 1);
    let ev = t.events.drain();
    assert!(
        ev.iter()
            .any(|e| e.reason() == "policy_deny_in" && e.raw.source == EV_SRC_TO_POD),
        "{ev:?}"
    );
}

#[test]
fn a_reply_to_a_client_port_a_node_port_also_uses_is_not_balanced() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    t.n.svcs.upsert(&web(vec![(B, true)])).unwrap();
    // A host process connects to B from local port 30080, which is also
    // the Service's NodePort: B's SYN-ACK to it hits that frontend.
    let (node, b) = (at(NODE_IP, 30080), at(B, 8080));
    assert_eq!(t.run(TO_POD, &syn(node, b)), TC_ACT_OK, "{}", t.dump());
    let (v, out) = run(&mut t.n.dp, FROM_POD, &tcp(b, node, 0x12, b""));
    assert_eq!(v, TC_ACT_OK, "the reply goes to the node\n{}", t.dump());
    assert_eq!((view(&out).dst, view(&out).dport), node, "not translated");
    assert_eq!(t.n.dp.stats().unwrap().get(stats::LB_NEW), 0, "not balanced");
    assert_eq!(t.counters()[DENY_IN] + t.counters()[DENY_OUT], 0);
}

fn web(backends: Vec<(&str, bool)>) -> Service {
    Service {
        name: "default/web:http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: ip(VIP),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: Ipv4Addr::UNSPECIFIED,
                port: 30080,
            },
        ],
        backends: backends
            .into_iter()
            .map(|(a, local)| Backend {
                addr: sa(a, 8080),
                state: BackendState::Active,
                local,
            })
            .collect(),
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

#[test]
fn service_flows_are_judged_on_the_backend_not_the_frontend() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.n.svcs.upsert(&web(vec![(B, true)])).unwrap();
    t.endpoint(A, A_EP, A_ID, PE_F_ISOLATED_OUT);
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    t.allow_tcp(B_EP, A_ID, POL_DIR_INGRESS, 8080);
    // Rules naming the frontend (the VIP is "world" to the ipcache) or the
    // frontend's port do not let A out.
    t.allow_tcp(A_EP, identity::WORLD, POL_DIR_EGRESS, 80);
    t.allow_tcp(A_EP, B_ID, POL_DIR_EGRESS, 80);
    assert_eq!(
        t.run(FROM_POD, &syn(at(A, 40000), at(VIP, 80))),
        TC_ACT_SHOT,
        "{}",
        t.dump()
    );
    assert_eq!(t.counters(), [0, 0, 0, 1, 0, 0]);
    assert!(
        t.n.dp.conntrack().unwrap().is_empty(),
        "a denied flow is not balanced"
    );

    t.allow_tcp(A_EP, B_ID, POL_DIR_EGRESS, 8080);
    let (v, out) = run(&mut t.n.dp, FROM_POD, &syn(at(A, 40001), at(VIP, 80)));
    assert_eq!(v, TC_ACT_REDIRECT, "{}", t.dump());
    assert_eq!((view(&out).dst, view(&out).dport), (ip(B), 8080));
    assert_eq!(
        t.counters(),
        [1, 1, 0, 1, 0, 0],
        "A's egress and B's ingress"
    );
    // The load balancer's entries carry the verdict: B's reply, later
    // packets.
    assert!(
        t.policy_entries().is_empty(),
        "no policy entries for balanced flows"
    );
    assert_eq!(
        t.run(FROM_POD, &tcp(at(B, 8080), at(A, 40001), 0x12, b"")),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        t.run(FROM_POD, &tcp(at(A, 40001), at(VIP, 80), 0x10, b"x")),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.counters(), [1, 1, 0, 1, 0, 0]);

    // C is not egress-isolated, but B's ingress does not allow it.
    assert_eq!(
        t.run(FROM_POD, &syn(at(C, 40000), at(VIP, 80))),
        TC_ACT_SHOT
    );
    assert_eq!(t.counters(), [1, 1, 1, 1, 0, 0]);

    // NodePort from outside to the local backend: B's ingress judges the
    // client's own address.
    assert_eq!(
        t.run(FROM_NET, &syn(at(W, 5000), at(NODE_IP, 30080))),
        TC_ACT_SHOT
    );
    assert_eq!(t.counters(), [1, 1, 2, 1, 0, 0]);
    t.cidr("203.0.113.0", 24, identity::WORLD, identity::FIRST_CIDR);
    t.allow_tcp(B_EP, identity::FIRST_CIDR, POL_DIR_INGRESS, 8080);
    let (v, out) = run(&mut t.n.dp, FROM_NET, &syn(at(W, 5001), at(NODE_IP, 30080)));
    assert_eq!(v, TC_ACT_REDIRECT, "{}", t.dump());
    assert_eq!(view(&out).src, ip(W), "client address kept");
    assert_eq!(t.counters(), [2, 1, 2, 1, 0, 0]);
}

#[test]
fn egress_to_a_remote_backend_is_judged_on_that_backend() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.n.svcs.upsert(&web(vec![(R, false)])).unwrap();
    t.endpoint(A, A_EP, A_ID, PE_F_ISOLATED_OUT);
    assert_eq!(
        t.run(FROM_POD, &syn(at(A, 40000), at(VIP, 80))),
        TC_ACT_SHOT
    );
    t.allow_tcp(A_EP, R_ID, POL_DIR_EGRESS, 8080);
    let (v, out) = run(&mut t.n.dp, FROM_POD, &syn(at(A, 40001), at(VIP, 80)));
    assert_eq!(v, TC_ACT_OK, "{}", t.dump());
    assert_eq!(view(&out).dst, ip(R));
    assert_eq!(t.counters(), [0, 1, 0, 1, 0, 0]);
}

#[test]
fn uplink_and_veth_egress_judge_ingress_and_record_inbound_replies() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    t.allow_tcp(B_EP, R_ID, POL_DIR_INGRESS, 80);
    t.cidr("203.0.113.0", 24, identity::WORLD, identity::FIRST_CIDR);
    t.allow_tcp(B_EP, identity::FIRST_CIDR, POL_DIR_INGRESS, 443);

    // From another node's pod, through the uplink.
    assert_eq!(
        t.run(FROM_NET, &syn(at(R, 40000), at(B, 80))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(t.run(FROM_NET, &syn(at(R, 40001), at(B, 81))), TC_ACT_SHOT);
    // From outside: its replies must never be masqueraded, so the reply
    // entry is inbound too.
    assert_eq!(
        t.run(FROM_NET, &syn(at(W, 40000), at(B, 443))),
        TC_ACT_REDIRECT
    );
    assert_eq!(t.counters(), [2, 0, 1, 0, 0, 0]);
    let entries = t.policy_entries();
    assert!(
        entries.contains(&(sa(B, 443), sa(W, 40000), CT_F_POLICY | CT_F_INBOUND)),
        "{entries:?}"
    );
    assert!(
        entries.contains(&(sa(W, 40000), sa(B, 443), CT_F_POLICY)),
        "{entries:?}"
    );
    assert!(
        entries.contains(&(sa(R, 40000), sa(B, 80), CT_F_POLICY | CT_F_BIDIR)),
        "{entries:?}"
    );
    assert_eq!(entries.len(), 3, "{entries:?}");
    // B's reply to the outside client leaves unmasqueraded.
    let (v, out) = run(
        &mut t.n.dp,
        names::PROG_TO_NET,
        &tcp(at(B, 443), at(W, 40000), 0x12, b""),
    );
    assert_eq!((v, view(&out).src), (TC_ACT_OK, ip(B)), "{}", t.dump());

    // Packets the kernel routes into the pod (veth egress).
    assert_eq!(t.run(TO_POD, &syn(at(R, 41000), at(B, 80))), TC_ACT_OK);
    assert_eq!(t.run(TO_POD, &syn(at(R, 41001), at(B, 22))), TC_ACT_SHOT);
    assert_eq!(t.counters(), [3, 0, 2, 0, 0, 0]);
    // Later packets of the allowed flow: a conntrack hit even after the
    // rule is gone.
    t.revoke_tcp(B_EP, R_ID, POL_DIR_INGRESS, 80);
    assert_eq!(
        t.run(TO_POD, &tcp(at(R, 41000), at(B, 80), 0x10, b"x")),
        TC_ACT_OK
    );
    assert_eq!(
        t.run(FROM_NET, &tcp(at(R, 40000), at(B, 80), 0x10, b"x")),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        t.run(TO_POD, &syn(at(R, 41002), at(B, 80))),
        TC_ACT_SHOT,
        "a new flow"
    );
    assert_eq!(t.counters(), [3, 0, 3, 0, 0, 0]);
}

/// ICMP echo request (`ty` 8) or reply (0) with identifier/sequence bytes.
fn echo(src: &str, dst: &str, ty: u8) -> Vec<u8> {
    icmp_error(ip(src), ip(dst), ty, 0, &[0u8; 28])
}

/// An SCTP packet (common header only; policy reads just the ports).
fn sctp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut f = syn(src, dst);
    f[23] = 132;
    // Fix the IPv4 header checksum for the new protocol.
    f[24] = 0;
    f[25] = 0;
    let c = csum16(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn packets_without_tcp_udp_ports() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut t = PolicyNode::new();
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN);
    t.allow_tcp(B_EP, A_ID, POL_DIR_INGRESS, 80);
    // Echo: only an every-port rule of ICMP (or every protocol) allows it.
    assert_eq!(t.run(FROM_POD, &echo(A, B, 8)), TC_ACT_SHOT, "{}", t.dump());
    assert_eq!(t.counters(), [0, 0, 1, 0, 0, 0]);
    t.allow(
        B_EP,
        A_ID,
        POL_DIR_INGRESS,
        proto::ICMP,
        0,
        POLICY_PREFIX_ANY_PORT,
    );
    assert_eq!(
        t.run(FROM_POD, &echo(A, B, 8)),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    // The echo reply is the recorded flow's reply.
    t.endpoint(B, B_EP, B_ID, PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT);
    assert_eq!(
        t.run(FROM_POD, &echo(B, A, 0)),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(t.counters(), [1, 0, 1, 0, 0, 0]);
    // ICMP errors concern judged flows: they pass, unjudged.
    let quoted = &syn(at(B, 80), at(C, 40000))[14..];
    let err = icmp_error(ip(C), ip(B), 3, 3, &quoted[..28]);
    assert_eq!(t.run(FROM_POD, &err), TC_ACT_REDIRECT, "{}", t.dump());
    assert_eq!(t.counters(), [1, 0, 1, 0, 0, 0]);
    // SCTP is judged on its ports.
    t.allow(B_EP, A_ID, POL_DIR_INGRESS, 132, 5000, POLICY_PREFIX_FULL);
    assert_eq!(
        t.run(FROM_POD, &sctp(at(A, 40000), at(B, 5000))),
        TC_ACT_REDIRECT,
        "{}",
        t.dump()
    );
    assert_eq!(
        t.run(FROM_POD, &sctp(at(A, 40000), at(B, 5001))),
        TC_ACT_SHOT
    );
    assert_eq!(t.counters(), [2, 0, 2, 0, 0, 0]);
    assert_eq!(
        t.run(FROM_POD, &sctp(at(B, 5000), at(A, 40000))),
        TC_ACT_REDIRECT,
        "SCTP reply"
    );
    assert_eq!(t.counters(), [2, 0, 2, 0, 0, 0]);
}
