//! Kernel tests (need root): `loadBalancerSourceRanges` through
//! BPF_PROG_TEST_RUN on `rt_from_net`, `rt_from_pod` (tc) and `rt_xdp_net`.
//!
//! A Service with a load-balancer IP, a NodePort and ranges: a first
//! packet from inside a range is balanced, from outside one dropped and
//! counted (`lb_src_range`); the NodePort stays open (kube-proxy filters
//! the load-balancer IPs only); an established flow is not judged again
//! when the list narrows; no list opens the frontend to everyone, an empty
//! one (every range invalid) closes it.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::programs::XdpMode;
use common::*;
use ipnetwork::Ipv4Network;
use riptide_common::{Config, SVC_F_NO_SOCK_LB, SVC_F_SRC_RANGE, names, stats};
use riptide_datapath::service::{LbMode, SourceRanges};
use riptide_test_support::{
    netns, privileged,
    uplink_lab::{NODE, uplink_lab},
};

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;

/// The load-balancer IP (outside the uplink lab's addresses: only looked
/// up, never routed).
const LB_IP: &str = "192.0.2.100";
const ALLOWED: &str = "203.0.113.9";
const DENIED: &str = "198.51.100.7";
const POD: &str = "10.42.0.5";
const REMOTE_BE: &str = "10.42.1.10";
const NODEPORT: u16 = 30080;

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn only(ranges: &[&str]) -> SourceRanges {
    SourceRanges::Only(ranges.iter().map(|r| net(r)).collect())
}

fn lb_service(source_ranges: SourceRanges) -> Service {
    Service {
        name: "default/web:http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::LoadBalancer,
                addr: ip(LB_IP),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: Ipv4Addr::UNSPECIFIED,
                port: NODEPORT,
            },
        ],
        backends: vec![Backend {
            addr: SocketAddrV4::new(ip(REMOTE_BE), 8080),
            state: BackendState::Active,
            local: false,
        }],
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges,
        algorithm: Algorithm::Random,
        lb_mode: LbMode::Snat,
    }
}

fn config() -> Config {
    Config {
        node_ip_be: u32::from(ip(NODE)).to_be(),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    }
}

fn stat(n: &Node, reason: u32) -> u64 {
    n.dp.stats().unwrap().get(reason)
}

fn dump(n: &Node) -> String {
    format!(
        "services: {:?}\nranges: {:?}\nconntrack: {:?}\nstats: {:?}",
        n.svcs.dump_services(),
        n.svcs.dump_source_ranges(),
        n.dp.conntrack().unwrap(),
        n.dp.stats()
            .unwrap()
            .named()
            .filter(|(_, v)| *v > 0)
            .collect::<Vec<_>>()
    )
}

/// The tc verdict and output of `rt_from_net` for a SYN `src → dst`.
fn from_net(n: &mut Node, src: (&str, u16), dst: (&str, u16)) -> (u32, Vec<u8>) {
    run(
        &mut n.dp,
        names::PROG_FROM_NET,
        &syn((ip(src.0), src.1), (ip(dst.0), dst.1)),
    )
}

#[test]
fn tc_drops_new_flows_from_outside_the_ranges_and_only_those() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = Node::load(&config(), []);
    n.svcs
        .upsert(&lb_service(only(&["203.0.113.0/24", "10.42.0.0/16"])))
        .unwrap();
    let lb_master = n
        .svcs
        .dump_services()
        .into_iter()
        .find(|(k, _)| k.vip_be == u32::from(ip(LB_IP)).to_be() && k.slot == 0)
        .unwrap()
        .1;
    assert_eq!(
        lb_master.flags & (SVC_F_SRC_RANGE | SVC_F_NO_SOCK_LB),
        SVC_F_SRC_RANGE | SVC_F_NO_SOCK_LB,
        "the LB frontend is checked and left to the per-packet path"
    );
    assert_eq!(n.svcs.dump_source_ranges().len(), 2, "{}", dump(&n));

    // Inside a range: balanced to the backend.
    let (v, out) = from_net(&mut n, (ALLOWED, 40000), (LB_IP, 80));
    assert_ne!(v, TC_ACT_SHOT, "allowed source\n{}", dump(&n));
    assert_eq!((view(&out).dst, view(&out).dport), (ip(REMOTE_BE), 8080));

    // Outside every range: dropped, counted, nothing tracked.
    let ct_before = n.dp.conntrack().unwrap().len();
    let (v, out) = from_net(&mut n, (DENIED, 40001), (LB_IP, 80));
    assert_eq!(v, TC_ACT_SHOT, "denied source\n{}", dump(&n));
    assert_eq!(view(&out).dst, ip(LB_IP), "left as it came");
    assert_eq!(stat(&n, stats::DROP_LB_SRC_RANGE), 1);
    assert_eq!(n.dp.conntrack().unwrap().len(), ct_before, "no state for a denied flow");

    // kube-proxy's scope: the NodePort of the same Service stays open.
    let (v, out) = from_net(&mut n, (DENIED, 40002), (NODE, NODEPORT));
    assert_ne!(v, TC_ACT_SHOT, "NodePort is not filtered\n{}", dump(&n));
    assert_eq!(view(&out).dst, ip(REMOTE_BE));

    // A pod is judged by its own address on its veth, as kube-proxy does
    // in PREROUTING.
    let (v, out) = run(
        &mut n.dp,
        names::PROG_FROM_POD,
        &syn((ip(POD), 41000), (ip(LB_IP), 80)),
    );
    assert_ne!(v, TC_ACT_SHOT, "pod inside 10.42.0.0/16\n{}", dump(&n));
    assert_eq!(view(&out).dst, ip(REMOTE_BE));
    assert_eq!(stat(&n, stats::DROP_LB_SRC_RANGE), 1);
}

#[test]
fn tc_established_flows_are_not_judged_again_and_lists_update_live() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut n = Node::load(&config(), []);
    n.svcs.upsert(&lb_service(only(&["203.0.113.0/24"]))).unwrap();
    let client = (ip(ALLOWED), 42000);
    let (v, _) = run(&mut n.dp, names::PROG_FROM_NET, &syn(client, (ip(LB_IP), 80)));
    assert_ne!(v, TC_ACT_SHOT);

    // The list narrows to exclude the client: its established flow keeps
    // going (conntrack remembers), a new flow from it is dropped.
    n.svcs.upsert(&lb_service(only(&["10.0.0.0/8"]))).unwrap();
    assert_eq!(
        n.svcs
            .dump_source_ranges()
            .iter()
            .map(|(_, a, l)| (*a, *l))
            .collect::<Vec<_>>(),
        vec![(ip("10.0.0.0"), 8)],
        "the dropped prefix is gone"
    );
    let ack = tcp(client, (ip(LB_IP), 80), 0x10, b"more");
    let (v, out) = run(&mut n.dp, names::PROG_FROM_NET, &ack);
    assert_ne!(v, TC_ACT_SHOT, "established flow\n{}", dump(&n));
    assert_eq!(view(&out).dst, ip(REMOTE_BE));
    let (v, _) = from_net(&mut n, (ALLOWED, 42001), (LB_IP, 80));
    assert_eq!(v, TC_ACT_SHOT, "new flow, narrowed list\n{}", dump(&n));

    // No ranges: everyone, and the map holds nothing for the frontend.
    n.svcs.upsert(&lb_service(SourceRanges::Any)).unwrap();
    assert!(n.svcs.dump_source_ranges().is_empty(), "{}", dump(&n));
    let (v, _) = from_net(&mut n, (DENIED, 42002), (LB_IP, 80));
    assert_ne!(v, TC_ACT_SHOT, "no ranges = open\n{}", dump(&n));

    // An empty list (every range was invalid): nobody.
    n.svcs.upsert(&lb_service(SourceRanges::Only(Vec::new()))).unwrap();
    let (v, _) = from_net(&mut n, (ALLOWED, 42003), (LB_IP, 80));
    assert_eq!(v, TC_ACT_SHOT, "empty list = closed\n{}", dump(&n));

    // Removing the Service removes its prefixes (a reused reverse-NAT id
    // must not inherit them).
    n.svcs.upsert(&lb_service(only(&["203.0.113.0/24"]))).unwrap();
    n.svcs.remove("default/web:http").unwrap();
    assert!(n.svcs.dump_source_ranges().is_empty(), "{}", dump(&n));
    assert_eq!(stat(&n, stats::DROP_LB_SRC_RANGE), 2);
}

#[test]
fn xdp_drops_denied_sources_before_the_stack() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    // The program asks the FIB about the backend's next hop: run in a
    // namespace shaped like a node's uplink (see kernel_xdp_test_run.rs).
    let ns = uplink_lab(&format!("rtsrcr{}", std::process::id()));
    netns::run_in(ns.name(), || {
        let mut n = Node::load(&config(), []);
        n.svcs.upsert(&lb_service(only(&["203.0.113.0/24"]))).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"up0".as_ptr()) };
        assert_ne!(ifindex, 0, "up0 exists");
        let _link = n
            .dp
            .xdp(names::PROG_XDP_NET)
            .unwrap()
            .attach("up0", XdpMode::Driver)
            .expect("attach rt_xdp_net natively to a veth");

        let (v, out) = xdp(&mut n.dp, ifindex, &syn((ip(ALLOWED), 43000), (ip(LB_IP), 80)));
        assert_eq!(v, XDP_TX, "allowed: balanced at XDP\n{}", dump(&n));
        assert_eq!((view(&out).dst, view(&out).dport), (ip(REMOTE_BE), 8080));

        let f = syn((ip(DENIED), 43001), (ip(LB_IP), 80));
        let (v, out) = xdp(&mut n.dp, ifindex, &f);
        assert_eq!((v, out.as_slice()), (XDP_DROP, f.as_slice()), "denied SYN\n{}", dump(&n));
        // Not a SYN, no conntrack entry: tc would judge it new as well.
        let ack = tcp((ip(DENIED), 43001), (ip(LB_IP), 80), 0x10, b"x");
        let (v, _) = xdp(&mut n.dp, ifindex, &ack);
        assert_eq!(v, XDP_DROP, "denied non-SYN\n{}", dump(&n));
        assert_eq!(stat(&n, stats::DROP_LB_SRC_RANGE), 2);

        // The allowed flow's next packet: conntrack, no judgement, even
        // after the list stops covering it.
        n.svcs.upsert(&lb_service(only(&["10.0.0.0/8"]))).unwrap();
        let ack = tcp((ip(ALLOWED), 43000), (ip(LB_IP), 80), 0x10, b"y");
        let (v, out) = xdp(&mut n.dp, ifindex, &ack);
        assert_eq!(v, XDP_TX, "established flow\n{}", dump(&n));
        assert_eq!(view(&out).dst, ip(REMOTE_BE));
        assert_eq!(stat(&n, stats::DROP_LB_SRC_RANGE), 2);
    });
    drop(ns);
}

#[test]
fn a_list_that_does_not_fit_leaves_the_previous_service_in_place() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // Room for one prefix: a second one fails the write with E2BIG.
    let mut sizes = MapSizes::default();
    sizes.set(names::SRCRANGE4, 1).unwrap();
    let mut n = Node::load_sized(&config(), [], &sizes);
    n.svcs.upsert(&lb_service(only(&["203.0.113.0/24"]))).unwrap();
    let services = n.svcs.dump_services();
    let ranges = n.svcs.dump_source_ranges();

    let err = n
        .svcs
        .upsert(&lb_service(only(&["198.51.100.0/24", "10.0.0.0/8"])))
        .unwrap_err();
    assert!(err.to_string().contains(names::SRCRANGE4), "{err}");
    let mut after = n.svcs.dump_services();
    let mut before = services.clone();
    after.sort_by_key(|(k, _)| (k.vip_be, k.port_be, k.scope, k.slot));
    before.sort_by_key(|(k, _)| (k.vip_be, k.port_be, k.scope, k.slot));
    assert_eq!(after, before, "services rolled back");
    assert_eq!(n.svcs.dump_source_ranges(), ranges, "prefixes rolled back");
    // The old list still decides.
    let (v, _) = from_net(&mut n, (ALLOWED, 44000), (LB_IP, 80));
    assert_ne!(v, TC_ACT_SHOT, "old list still allows\n{}", dump(&n));
    let (v, _) = from_net(&mut n, (DENIED, 44001), (LB_IP, 80));
    assert_eq!(v, TC_ACT_SHOT, "old list still denies\n{}", dump(&n));

    // A new Service whose list does not fit leaves nothing behind.
    n.svcs.remove("default/web:http").unwrap();
    assert!(n.svcs.upsert(&lb_service(only(&["198.51.100.0/24", "10.0.0.0/8"]))).is_err());
    assert!(n.svcs.dump_services().is_empty(), "{}", dump(&n));
    assert!(n.svcs.dump_source_ranges().is_empty(), "{}", dump(&n));
    assert!(n.svcs.dump_revnat().is_empty(), "{}", dump(&n));
}
