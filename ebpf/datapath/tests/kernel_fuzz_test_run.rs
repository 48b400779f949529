//! Kernel fuzzing (need root): random and mutated frames through every tc
//! program with BPF_PROG_TEST_RUN (issue #19 "Fuzzing").
//!
//! The programs passed the verifier when the datapath loaded, so no path
//! can crash the kernel; what this checks is the programs' own contract on
//! input nobody designed: the verdict is one tc knows (OK, SHOT, REDIRECT),
//! the frame that comes out is a frame (an Ethernet header, no growth past
//! the one reply the datapath may build), and a well-formed packet never
//! leaves with a broken checksum, however its addresses, ports and flags
//! combine with Services, NodePorts, masquerade and NetworkPolicy.
//!
//! The node has all features on: a ClusterIP + NodePort Service with a local
//! and a remote backend, masquerade, and one isolated pod. Short in
//! `cargo xtask test`; `PROPTEST_CASES` (as `cargo xtask fuzz` sets it) runs
//! longer.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    cell::RefCell,
    net::{Ipv4Addr, SocketAddrV4},
};

use common::*;
use proptest::{prelude::*, test_runner::TestRunner};
use riptide_common::{
    CFG_F_MASQUERADE, CFG_F_POLICY, CFG_F_SOCK_LB, Config, IpcacheValue, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT,
    PolicyEndpointValue, identity, names,
};
use riptide_test_support::privileged;

const NODE_IP: &str = "198.18.0.1";
const VIP: &str = "10.43.0.10";
const PROGRAMS: [&str; 4] = [names::PROG_FROM_POD, names::PROG_FROM_NET, names::PROG_TO_NET, names::PROG_TO_POD];
const TC_VERDICTS: [u32; 3] = [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT];

fn node() -> Node {
    let config = Config {
        node_ip_be: u32::from(ip(NODE_IP)).to_be(),
        hairpin_ip_be: u32::from(ip("169.254.42.1")).to_be(),
        cluster_cidr_be: u32::from(ip("10.42.0.0")).to_be(),
        cluster_cidr_len: 16,
        nomasq_cidr_be: u32::from(ip("198.18.0.0")).to_be(),
        nomasq_cidr_len: 24,
        flags: CFG_F_MASQUERADE | CFG_F_SOCK_LB | CFG_F_POLICY,
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    };
    let pods = ["10.42.0.5", "10.42.0.20", "10.42.0.21"];
    let mut n = Node::load(&config, (0u8..).zip(pods).map(|(i, a)| (ip(a), pod_endpoint(100 + u32::from(i), [0, i]))));
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        n.svcs
            .upsert(&Service {
                name: format!("default/web:{protocol:?}"),
                protocol,
                frontends: vec![
                    Frontend { kind: FrontendKind::ClusterIp, addr: ip(VIP), port: 80 },
                    Frontend { kind: FrontendKind::NodePort, addr: Ipv4Addr::UNSPECIFIED, port: 30080 },
                ],
                backends: vec![
                    Backend { addr: SocketAddrV4::new(ip("10.42.0.20"), 8080), state: BackendState::Active, local: true },
                    Backend { addr: SocketAddrV4::new(ip("10.42.1.7"), 8080), state: BackendState::Active, local: false },
                ],
                affinity_timeout_s: None,
                external_policy: TrafficPolicy::Cluster,
                internal_policy: TrafficPolicy::Cluster,
                source_ranges: Default::default(),
                algorithm: Algorithm::Random,
                lb_mode: riptide_datapath::service::LbMode::Snat,
            })
            .unwrap();
    }
    // 10.42.0.21 is isolated both ways with no rule: policy judges (and
    // drops) its new flows, so the policy path is fuzzed too.
    let mut policy = n.dp.policy().unwrap();
    policy
        .upsert_endpoint(
            ip("10.42.0.21"),
            PolicyEndpointValue { ep_id: 1, identity: identity::FIRST_LABELS, flags: PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT, _pad: 0 },
        )
        .unwrap();
    policy
        .upsert_ipcache(ip("10.42.0.21"), 32, IpcacheValue { identity: identity::FIRST_LABELS, cidr_identity: 0 })
        .unwrap();
    policy.upsert_ipcache(ip("0.0.0.0"), 0, IpcacheValue { identity: identity::WORLD, cidr_identity: 0 }).unwrap();
    n
}

/// Addresses that mean something to this node, and a few that mean nothing.
fn address() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        Just(ip(VIP)),
        Just(ip(NODE_IP)),
        Just(ip("10.42.0.5")),
        Just(ip("10.42.0.20")),
        Just(ip("10.42.0.21")),
        Just(ip("10.42.1.7")),
        Just(ip("198.18.0.100")),
        Just(ip("169.254.42.1")),
        Just(ip("10.43.0.99")),
        Just(Ipv4Addr::BROADCAST),
        Just(Ipv4Addr::UNSPECIFIED),
        any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![Just(80u16), Just(8080), Just(30080), Just(0), Just(65535), Just(40000), any::<u16>()]
}

/// A well-formed TCP, UDP or ICMP frame (checksums valid).
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let ends = || (address(), port(), address(), port());
    let payload = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (ends(), any::<u8>(), payload())
            .prop_map(|((s, sp, d, dp), flags, payload): (_, u8, Vec<u8>)| tcp((s, sp), (d, dp), flags, &payload)),
        (ends(), payload(), any::<bool>())
            .prop_map(|((s, sp, d, dp), payload, zero): (_, Vec<u8>, bool)| udp((s, sp), (d, dp), &payload, zero)),
        (ends(), any::<u8>(), any::<u8>()).prop_map(|((s, sp, d, dp), ty, code)| {
            // An ICMP message quoting a TCP header: errors (3, 11) are the
            // ones the datapath looks into.
            let quoted = &tcp((d, dp), (s, sp), 0x02, b"")[14..];
            icmp_error(s, d, ty % 16, code % 16, &quoted[..28])
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        // Most flips land in the headers, where the parser decides.
        (0usize..64, any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (0usize..128).prop_map(Mutation::Truncate),
        (0usize..64, proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Mutation::Insert(i, b)),
    ];
    proptest::collection::vec(one, 1..5)
}

fn mutate(mut f: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        match m {
            Mutation::Set(i, b) if *i < f.len() => f[*i] = *b,
            // The kernel refuses IPv4 frames shorter than an IP header
            // before any program runs (see `run_checked`).
            Mutation::Truncate(n) => f.truncate((*n).max(14 + 20)),
            Mutation::Insert(i, bytes) if *i <= f.len() => {
                f.splice(*i..*i, bytes.iter().copied());
            }
            _ => {}
        }
    }
    f
}

/// Whether every checksum of an IPv4 frame verifies (the non-panicking twin
/// of `assert_checksums`, for a property's verdict).
fn checksums_valid(f: &[u8]) -> bool {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return true;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if ihl < 20 || 14 + tot > f.len() || tot < ihl || csum16(&f[14..14 + ihl]) != 0 {
        return false;
    }
    let l4 = &f[14 + ihl..14 + tot];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, f[23]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    match f[23] {
        6 => csum16(&pseudo) == 0,
        17 => l4.len() < 8 || l4[6..8] == [0, 0] || csum16(&pseudo) == 0,
        1 => csum16(l4) == 0,
        _ => true,
    }
}

/// [`common::try_run`] as a property step: the kernel refuses (EINVAL) an IPv4
/// frame shorter than an IPv4 header before any program runs, which is
/// not the programs' doing, so such a case is discarded; any other refusal
/// fails the property.
fn run_checked(n: &RefCell<Node>, prog: &'static str, f: &[u8]) -> Result<(u32, Vec<u8>), TestCaseError> {
    match try_run(&mut n.borrow_mut().dp, prog, f) {
        Ok(r) => Ok(r),
        Err(e) if f.len() < 14 + 20 && e.contains("InvalidInput") => Err(TestCaseError::reject(format!("kernel refused: {e}"))),
        Err(e) => Err(TestCaseError::fail(format!("{prog}: {e} for {f:02x?}"))),
    }
}

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })
}

/// What every program must do with any frame: a tc verdict, and an output
/// that is still a frame no longer than the input plus the largest reply
/// (an ICMP error quoting the packet) the datapath builds.
fn check_contract(prog: &str, input: &[u8], verdict: u32, out: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(TC_VERDICTS.contains(&verdict), "{prog}: verdict {verdict} for {input:02x?}");
    if verdict != TC_ACT_SHOT {
        prop_assert!(out.len() >= 14.min(input.len()), "{prog}: output shrank to {} bytes", out.len());
        prop_assert!(out.len() <= input.len().max(14 + 20 + 8 + 576) + 28, "{prog}: output grew to {} bytes", out.len());
    }
    Ok(())
}

#[test]
fn well_formed_frames_keep_valid_checksums() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let n = RefCell::new(node());
    runner()
        .run(&(frame(), 0..PROGRAMS.len()), |(f, p)| {
            let prog = PROGRAMS[p];
            let (verdict, out) = run_checked(&n, prog, &f)?;
            check_contract(prog, &f, verdict, &out)?;
            if verdict != TC_ACT_SHOT {
                prop_assert!(checksums_valid(&out), "{prog}: checksum broken\nin:  {f:02x?}\nout: {out:02x?}");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_frames_get_a_tc_verdict() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let n = RefCell::new(node());
    runner()
        .run(&(frame(), mutations(), 0..PROGRAMS.len()), |(f, muts, p)| {
            let prog = PROGRAMS[p];
            let f = mutate(f, &muts);
            let (verdict, out) = run_checked(&n, prog, &f)?;
            check_contract(prog, &f, verdict, &out)
        })
        .unwrap();
}

#[test]
fn random_bytes_get_a_tc_verdict() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let n = RefCell::new(node());
    // BPF_PROG_TEST_RUN wants at least an Ethernet header.
    runner()
        .run(&(proptest::collection::vec(any::<u8>(), 14..200), 0..PROGRAMS.len()), |(f, p)| {
            let prog = PROGRAMS[p];
            let (verdict, out) = run_checked(&n, prog, &f)?;
            check_contract(prog, &f, verdict, &out)
        })
        .unwrap();
}
