//! Kernel tests (need root): run `rt_from_pod` through BPF_PROG_TEST_RUN on
//! crafted frames and check the bytes that come out.

mod common;

use std::net::Ipv4Addr;

use riptide_common::{EndpointValue, names};
use riptide_datapath::{Datapath, Pinning};
use common::{TC_ACT_OK, TC_ACT_REDIRECT, csum16};
use riptide_test_support::privileged;

/// Ethernet + IPv4 + TCP SYN from `src:sport` to `dst:dport`, checksums valid.
fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, ttl: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst mac (node side)
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src mac (pod)
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum16(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = csum16(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

fn run(dp: &mut Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    common::run(dp, names::PROG_FROM_POD, frame)
}

const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x2a, 0x00, 0x07];
const NODE_MAC: [u8; 6] = [0x0e, 0xee, 0xee, 0xee, 0xee, 0x07];

fn loaded_with_endpoint() -> Datapath {
    let mut dp = Datapath::load(&Pinning::None).expect("load datapath");
    dp.endpoints()
        .expect("endpoint map")
        .upsert(
            Ipv4Addr::new(10, 42, 0, 7),
            EndpointValue {
                ifindex: 42,
                flags: 0,
                mac: POD_MAC,
                node_mac: NODE_MAC,
            },
        )
        .expect("insert endpoint");
    dp
}

#[test]
fn local_pod_is_redirected_with_macs_rewritten_and_ttl_decremented() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = loaded_with_endpoint();
    let frame = tcp_frame(Ipv4Addr::new(10, 42, 0, 5), Ipv4Addr::new(10, 42, 0, 7), 40000, 8080, 64);
    let (verdict, out) = run(&mut dp, &frame);

    assert_eq!(verdict, TC_ACT_REDIRECT, "expected a redirect to the peer");
    assert_eq!(out.len(), frame.len());
    assert_eq!(&out[0..6], &POD_MAC, "destination MAC is the pod's");
    assert_eq!(&out[6..12], &NODE_MAC, "source MAC is the node side of the veth");
    assert_eq!(out[14 + 8], 63, "TTL decremented");
    assert_eq!(csum16(&out[14..34]), 0, "IPv4 header checksum still valid");
    // Everything but MACs, TTL and IP checksum is untouched.
    assert_eq!(&out[12..22], &frame[12..22]);
    assert_eq!(&out[23..24], &frame[23..24]);
    assert_eq!(&out[26..], &frame[26..]);
}

#[test]
fn removing_an_absent_endpoint_is_not_an_error() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = loaded_with_endpoint();
    let mut eps = dp.endpoints().expect("endpoint map");
    eps.remove(Ipv4Addr::new(10, 42, 0, 7)).expect("remove present");
    eps.remove(Ipv4Addr::new(10, 42, 0, 7)).expect("remove absent again");
    assert_eq!(eps.get(Ipv4Addr::new(10, 42, 0, 7)).expect("get"), None);
}

#[test]
fn unknown_destination_passes_unchanged() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = loaded_with_endpoint();
    let frame = tcp_frame(Ipv4Addr::new(10, 42, 0, 5), Ipv4Addr::new(10, 42, 1, 9), 40000, 80, 64);
    let (verdict, out) = run(&mut dp, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
}

#[test]
fn expiring_ttl_is_left_to_the_kernel() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = loaded_with_endpoint();
    let frame = tcp_frame(Ipv4Addr::new(10, 42, 0, 5), Ipv4Addr::new(10, 42, 0, 7), 40000, 80, 1);
    let (verdict, out) = run(&mut dp, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
}

#[test]
fn non_ip_frames_pass_unchanged() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = loaded_with_endpoint();
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let (verdict, out) = run(&mut dp, &arp);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, arp);
}
