//! Does a socket of the node itself own this packet?
//!
//! A host-network process may open a connection from a local port that
//! equals a NodePort (netperf TCP_CRR cycles explicit local ports through
//! 5000–65535; any application may bind one in 30000–32767). Its replies
//! (remote:port → node:30000) look exactly like a new NodePort flow to the
//! uplink's ingress. kube-proxy never DNATs them because its rules only
//! apply to conntrack NEW connections and the kernel's conntrack knows the
//! local socket's connection; here the kernel's socket table is asked
//! instead (`bpf_skc_lookup_tcp` / `bpf_sk_lookup_udp`, the lookup
//! `tcp_v4_rcv` / `udp_rcv` would do for this packet).

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Ipv4Tuple,
    },
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use riptide_common::proto;

use crate::parse::Pkt;

/// True when a connection of a local socket owns `p`'s tuple: for TCP any
/// socket found that is not a listener (an established or connecting
/// socket, but also a request or time-wait socket, which `skc` lookups
/// return), for UDP a connected socket. A listener or an unconnected UDP
/// socket bound to the port does not own it: a NodePort on that port is
/// still balanced (it wins over a host socket, as with kube-proxy).
#[inline(always)]
pub fn owns(ctx: &TcContext, p: &Pkt) -> bool {
    // SAFETY: plain data; all-zero is a valid value of every field.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // The tuple as in the packet: source = the remote end, destination =
    // this node (the lookup is from the receiver's point of view).
    // SAFETY: writes to the IPv4 member of a plain-data union.
    unsafe {
        let t = &mut tuple.__bindgen_anon_1.ipv4;
        t.saddr = p.saddr_be;
        t.daddr = p.daddr_be;
        t.sport = p.sport_be;
        t.dport = p.dport_be;
    }
    // The helpers take a u64 whose low 32 bits, as s32 < 0, select the
    // caller's namespace (the uplink's device's, i.e. the node's).
    let netns = BPF_F_CURRENT_NETNS as u64;
    let size = core::mem::size_of::<Ipv4Tuple>() as u32;
    let tcp = p.proto == proto::TCP;
    // SAFETY: `tuple` lives on this stack frame and `size` is its IPv4
    // part; the returned reference is released below on every path.
    let sk: *mut bpf_sock = unsafe {
        if tcp {
            bpf_skc_lookup_tcp(ctx.skb.skb.cast(), &raw mut tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.skb.skb.cast(), &raw mut tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null socket reference from the lookup; `state` and
    // `dst_port` are readable for sock_common too (the skc lookup may
    // return a request or time-wait socket).
    let owned = unsafe {
        if tcp {
            (*sk).state != BPF_TCP_LISTEN
        } else {
            (*sk).dst_port != 0
        }
    };
    // SAFETY: releases the reference taken by the lookup (exactly once).
    unsafe { bpf_sk_release(sk.cast()) };
    owned
}
