//! Pod routing: deliver a packet addressed to a pod on this node straight
//! into that pod with `bpf_redirect_peer`, skipping the host stack. Anything
//! else (pods on other nodes, the outside) is left to the kernel's routes,
//! which the agent programs (a route per remote node's pod CIDR).
//!
//! One exception, [`forward_out`]: a NodePort & co packet the uplink's
//! ingress translated towards another node (or back to an outside client)
//! and that the kernel's routes send out the same uplink is forwarded here
//! ("BPF host routing" in Cilium's terms): `bpf_fib_lookup` asks the
//! kernel's FIB and neighbour table, and `bpf_redirect` puts the packet on
//! the uplink's egress, where `rt_to_net` still applies the source NAT.
//! Whatever the lookup cannot settle falls back to the kernel's path.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT, bpf_fib_lookup as FibLookup},
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use riptide_common::{EndpointKey, EndpointValue, stats};

use crate::{
    csum::{apply_diff, diff16},
    maps::{EP4, count},
    parse::{Frame, IP_OFF, IpHdr, L4_OFF, Pkt, linear},
};

/// True when `addr` is a pod on this node.
#[inline(always)]
pub fn is_local_pod(addr_be: u32) -> bool {
    EP4.get_ptr(&EndpointKey { addr_be }).is_some()
}

/// Hands the packet to the kernel (routing to other nodes or outside).
#[inline(always)]
pub fn pass() -> Result<i32, u32> {
    count(stats::PASS);
    Ok(TC_ACT_OK)
}

/// Delivers `p` to its destination pod if that pod is on this node, else
/// hands it to the kernel.
#[inline(always)]
pub fn deliver(ctx: &TcContext, p: &Pkt) -> Result<i32, u32> {
    deliver_to(ctx, p, endpoint(p.daddr_be))
}

/// The endpoint of `addr` if it is a pod on this node.
#[inline(always)]
pub fn endpoint(addr_be: u32) -> Option<&'static EndpointValue> {
    let ep = EP4.get_ptr(&EndpointKey { addr_be })?;
    // SAFETY: map value pointer, valid for this program run.
    Some(unsafe { &*ep })
}

/// [`deliver`] with the destination's endpoint already looked up.
#[inline(always)]
pub fn deliver_to(ctx: &TcContext, p: &Pkt, ep: Option<&EndpointValue>) -> Result<i32, u32> {
    let Some(ep) = ep else {
        // Not a pod on this node: the kernel routes it (other node, outside).
        return pass();
    };
    redirect(ctx, p, ep)
}

/// Delivers `p` into the local pod `ep` with `bpf_redirect_peer`.
#[inline(always)]
pub fn redirect(ctx: &TcContext, p: &Pkt, ep: &EndpointValue) -> Result<i32, u32> {
    if p.ttl <= 1 {
        // Let the kernel answer with ICMP time exceeded, as a router would.
        return Ok(TC_ACT_OK);
    }
    // We act as the router between the two pods: decrement TTL (fixing the
    // IP checksum incrementally over the TTL/protocol word) and rewrite MACs
    // so the peer's eth0 accepts the frame as addressed to it.
    hop(ctx, &ep.mac, &ep.node_mac)?;
    count(stats::REDIRECT_LOCAL);
    // bpf_redirect_peer() moves the skb to the ingress of the peer of
    // `ifindex` (the pod's eth0) without a second pass through the backlog.
    // SAFETY: plain helper call.
    let verdict = unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        // Unknown ifindex (stale endpoint): the kernel's route still works.
        return Ok(TC_ACT_OK);
    }
    Ok(verdict)
}

/// What a router does to a packet it forwards: TTL − 1 with the IP
/// checksum fixed incrementally over the TTL/protocol word, and the next
/// hop's MAC as destination, the sending interface's as source. Packet
/// pointers are derived here, after any helper that may have moved data.
/// The caller has checked TTL > 1.
#[inline(always)]
pub fn hop(ctx: &impl Frame, dmac: &[u8; 6], smac: &[u8; 6]) -> Result<(), u32> {
    let data = linear(ctx, L4_OFF).ok_or(stats::NAT_FAIL)?;
    // SAFETY: Ethernet and IPv4 header bounds checked by `linear`; no
    // helper ran since.
    unsafe {
        let ip = &mut *((data + IP_OFF) as *mut IpHdr);
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.check = apply_diff(ip.check, diff16(0, old, new));
        // 16-bit stores (the frame start is 2-byte aligned) instead of a
        // 6-byte copy, which LLVM lowers to a byte-loop `memmove` on BPF.
        let eth = data as *mut u16;
        let mut i = 0;
        while i < 3 {
            *eth.add(i) = u16::from_ne_bytes([dmac[2 * i], dmac[2 * i + 1]]);
            *eth.add(3 + i) = u16::from_ne_bytes([smac[2 * i], smac[2 * i + 1]]);
            i += 1;
        }
    }
    Ok(())
}

const AF_INET: u8 = 2;

/// Sends `p`, already translated by the uplink's ingress and bound for
/// another node or an outside client, straight back out the uplink it
/// came in on, skipping the kernel's forwarding path (`ip_rcv`, routing,
/// netfilter FORWARD/POSTROUTING). The tc egress program of the uplink
/// still runs on the redirected packet (`bpf_redirect` without
/// `BPF_F_INGRESS` goes through `dev_queue_xmit`), so the source NAT stays
/// where it was.
///
/// Only when the FIB says "out the same device" with a resolved neighbour
/// ([`next_hop_same_dev`]). Every other answer (another device such as the
/// vxlan tunnel, no neighbour, too big, forwarding off, blackhole, …) and
/// TTL ≤ 1 leave the packet to the kernel, which resolves ARP, answers
/// with ICMP, or routes it elsewhere.
#[inline(always)]
pub fn forward_out(ctx: &TcContext, p: &Pkt) -> Result<i32, u32> {
    if p.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        count(stats::FIB_FALLBACK);
        return Ok(TC_ACT_OK);
    }
    // tot_len 0: the helper checks the skb itself against the egress MTU
    // (`is_skb_forwardable`, which lets GSO packets through). A GRO'ed
    // packet's IP total length would exceed the MTU and always fall back,
    // though it came in on this device and leaves on it again.
    let Some(fib) = next_hop_same_dev(ctx, p.saddr_be, p.daddr_be, p, 0) else {
        count(stats::FIB_FALLBACK);
        return Ok(TC_ACT_OK);
    };
    // The next hop's MAC as destination, the uplink's as source.
    hop(ctx, &fib.dmac, &fib.smac)?;
    count(stats::FIB_REDIRECT);
    // SAFETY: plain helper call; flags 0 = the device's egress.
    Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
}

/// The FIB's answer for a packet `saddr → daddr` with `p`'s protocol and
/// ports, when it leaves through the device it arrived on (`ctx`'s) with a
/// resolved next hop: `bpf_fib_lookup` without flags checks that
/// forwarding is enabled on the ingress device, the route and (for a
/// non-zero `tot_len`) the egress MTU, and fails with NO_NEIGH until the
/// kernel has resolved the next hop. Shared by tc (`forward_out`) and XDP,
/// which asks before it rewrites anything (the addresses are the ones the
/// packet will carry).
#[inline(always)]
pub fn next_hop_same_dev(
    ctx: &impl Frame,
    saddr_be: u32,
    daddr_be: u32,
    p: &Pkt,
    tot_len: u16,
) -> Option<FibLookup> {
    let (rc, fib) = fib_lookup(ctx, saddr_be, daddr_be, p, tot_len);
    (rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) && fib.ifindex == ctx.ifindex()).then_some(fib)
}

/// `bpf_fib_lookup` for a packet `saddr → daddr` with `p`'s protocol and
/// ports arriving on `ctx`'s device: the helper's return code and the
/// answer (`ifindex` is the egress device once a route was found, before
/// the neighbour lookup; a non-zero `tot_len` is checked against the
/// route's MTU first).
#[inline(always)]
pub fn fib_lookup(
    ctx: &impl Frame,
    saddr_be: u32,
    daddr_be: u32,
    p: &Pkt,
    tot_len: u16,
) -> (i64, FibLookup) {
    let ifindex = ctx.ifindex();
    // SAFETY: plain data; all-zero is a valid value of every field.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = p.proto;
    fib.sport = p.sport_be;
    fib.dport = p.dport_be;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_3.ipv4_src = saddr_be;
    fib.__bindgen_anon_4.ipv4_dst = daddr_be;
    fib.ifindex = ifindex;
    // SAFETY: `fib` lives on this stack frame; the size is the struct's.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.raw(),
            &raw mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    (rc, fib)
}
