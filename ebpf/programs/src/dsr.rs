//! Direct Server Return for NodePort, externalIP and LoadBalancer-IP
//! frontends whose backend runs on another node (Cilium's DSR "opt" mode,
//! `bpf/lib/nodeport.h`: `dsr_set_opt4` / `handle_dsr_v4`).
//!
//! Entry node (`rt_from_net`, or `rt_xdp_net` with [`push_xdp`]; a
//! frontend with [`SVC_F_DSR`]): the flow is DNATed to the backend
//! *without* source NAT, and the packet carries the frontend in an 8-byte
//! IPv4 option right after the 20-byte header
//! ([`push`]): type [`DSR_OPT_TYPE`], length 8, frontend port, frontend
//! address. TCP: the packet that creates the flow's conntrack entry (the
//! SYN, or a packet re-balanced after an eviction); UDP: every packet, so
//! the backend's node re-learns the flow whatever it evicted (and a UDP
//! "flow" has no first packet the sender could know about).
//!
//! Backend's node (`rt_from_net`, a packet for a local pod carrying exactly
//! that option): [`take`] records the reply entry (pod → client, flags
//! `CT_F_REPLY | CT_F_NODEPORT | CT_F_DSR`, the frontend to restore) and
//! strips the option; the packet is then delivered like any packet from
//! outside to a pod (NetworkPolicy judges the real client). The pod's reply
//! passes `rt_from_pod` untouched (a NodePort reply), the kernel routes it
//! out the uplink straight to the client, and `rt_to_net` rewrites its
//! source to the frontend there, as for the replies of flows it balanced
//! itself: a source that may be an address of this node (a load-balancer
//! IP announced by several nodes) must not re-enter the input path, and
//! on egress `rp_filter` has already passed.
//!
//! Per flow, DSR falls back to source NAT ([`usable`]) when the packet plus
//! the option would exceed the route's MTU (`bpf_fib_lookup` with the new
//! length says FRAG_NEEDED), when the backend is not reached out the
//! device the packet came in on (VXLAN routing: the reply would have to
//! cross the tunnel back, which the backend's node does not do for a
//! client outside the cluster), when the packet already has IP options, or
//! when the kernel refuses the room. A backend on this node needs nothing.
//!
//! Trust: any sender that reaches a node's uplink can attach the option
//! and make a local pod's replies carry an address of its choice; the
//! same holds for Cilium's DSR. Nodes behind a border that filters IP
//! options from outside are not exposed.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_NO_CSUM_RESET, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_adj_room_mode::BPF_ADJ_ROOM_NET, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_csum_update, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use riptide_common::{
    BE_F_LOCAL, DSR_OPT_LEN, DSR_OPT_TYPE, SVC_F_DSR, SVC_F_LOCAL_ONLY, proto, stats,
};

use crate::{
    csum::{add_words, apply_diff, diff16, diff32, fold, fold32},
    lb::{Chosen, Service},
    maps::count,
    parse::{Frame, IP_OFF, IpHdr, L4_OFF, Pkt, Ports, linear, ptr_at},
    route,
};

const OPT: usize = DSR_OPT_LEN as usize;

/// Where the FIB sends a packet of `p`'s flow once it is DNATed to the
/// backend and carries the option.
pub enum Path {
    /// Out the device the packet came in on, within the route's MTU; the
    /// answer when the next hop is resolved (`None`: NO_NEIGH, the kernel
    /// resolves it when it forwards the packet).
    Same(Option<FibLookup>),
    /// The packet plus the option exceeds the route's MTU.
    TooBig,
    /// Another device (VXLAN routing: the reply would have to cross the
    /// tunnel back), no route, or a packet that already has IP options.
    Elsewhere,
}

/// The FIB's [`Path`] for `p` (as it arrived, client → frontend) DNATed to
/// `backend_be` with the option: one `bpf_fib_lookup` with the grown
/// length. Shared by tc ([`usable`]) and XDP, which needs the resolved
/// next hop to send the packet itself.
#[inline(always)]
pub fn path(ctx: &impl Frame, p: &Pkt, backend_be: u32) -> Path {
    if p.l4_off != L4_OFF {
        return Path::Elsewhere;
    }
    let len = p.tot_len.saturating_add(u16::from(DSR_OPT_LEN));
    let (rc, fib) = route::fib_lookup(ctx, p.saddr_be, backend_be, p, len);
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        return Path::TooBig;
    }
    let resolved = rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    let routed = resolved || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
    if !routed || fib.ifindex != ctx.ifindex() {
        return Path::Elsewhere;
    }
    Path::Same(resolved.then_some(fib))
}

/// Whether a packet of `p`'s flow, DNATed to `backend_be`, may go there
/// with the option (the kernel forwards it, so an unresolved next hop is
/// fine). A no is counted by reason.
#[inline(always)]
pub fn usable(ctx: &impl Frame, p: &Pkt, backend_be: u32) -> bool {
    match path(ctx, p, backend_be) {
        Path::Same(_) => true,
        Path::TooBig => {
            count(stats::DSR_FALLBACK_MTU);
            false
        }
        Path::Elsewhere => {
            count(stats::DSR_FALLBACK_ROUTE);
            false
        }
    }
}

/// Whether a new flow of `svc` balanced to `chosen` goes by DSR: a DSR
/// frontend, a backend on another node, and not externalTrafficPolicy
/// Local (which keeps the client address anyway and never picks a remote
/// backend).
#[inline(always)]
pub fn wants(svc: &Service, chosen: &Chosen) -> bool {
    chosen.be.flags & BE_F_LOCAL == 0
        && svc.master.flags & (SVC_F_DSR | SVC_F_LOCAL_ONLY) == SVC_F_DSR
}

/// Writes the option carrying `(addr_be, port_be)` at `opt` and makes the
/// header at `ip` one of IHL 7 and total length `tot_len` (the grown one),
/// its checksum recomputed.
///
/// # Safety
/// `ip` and `opt` point at the IPv4 header and the 8 bytes right after it,
/// inside bounds-checked packet data.
#[inline(always)]
unsafe fn write_option(
    ip: *mut IpHdr,
    opt: *mut u32,
    (addr_be, port_be): (u32, u16),
    tot_len: u16,
) {
    let port = port_be.to_ne_bytes();
    // SAFETY: the caller's bounds.
    unsafe {
        (*ip).vihl = 0x40 | ((20 + OPT) / 4) as u8;
        (*ip).tot_len = tot_len.to_be();
        *opt = u32::from_ne_bytes([DSR_OPT_TYPE, DSR_OPT_LEN, port[0], port[1]]);
        *opt.add(1) = addr_be;
        recompute::<{ (20 + OPT) / 2 }>(ip);
    }
}

/// Recomputes the IPv4 header checksum over `words` 16-bit words.
///
/// # Safety
/// `ip` points at a header of at least `WORDS * 2` linear, bounds-checked
/// bytes.
#[inline(always)]
unsafe fn recompute<const WORDS: usize>(ip: *mut IpHdr) {
    // SAFETY: the caller's bounds.
    unsafe {
        (*ip).check = 0;
        let words = &*(ip as *const [u16; WORDS]);
        (*ip).check = fold(add_words(0, words));
    }
}

/// Inserts the option carrying `frontend` (address, port; network order)
/// after the IPv4 header of `p` (which has none) and updates `p`.
/// Addresses and ports are untouched, so the L4 checksum stays valid;
/// the header is rewritten whole (IHL 7, total length, checksum), and the
/// header's sum stays 0, so a CHECKSUM_COMPLETE `skb->csum` needs nothing.
/// An error leaves the packet as it was.
#[inline(always)]
pub fn push(ctx: &TcContext, p: &mut Pkt, (addr_be, port_be): (u32, u16)) -> Result<(), u32> {
    if p.l4_off != L4_OFF {
        return Err(stats::DSR_FALLBACK_ROUTE);
    }
    if p.tot_len > u16::MAX - OPT as u16 {
        return Err(stats::DSR_FALLBACK_MTU);
    }
    // BPF_ADJ_ROOM_NET inserts the room right after the 20-byte IPv4 base
    // header (`bpf_skb_net_grow`); the L4 header does not move, so a
    // CHECKSUM_PARTIAL skb's csum_start stays right. Keep
    // CHECKSUM_UNNECESSARY: the L4 bytes are unchanged.
    ctx.skb
        .adjust_room(
            OPT as i32,
            BPF_ADJ_ROOM_NET,
            u64::from(BPF_F_ADJ_ROOM_NO_CSUM_RESET),
        )
        .map_err(|_| stats::DSR_FALLBACK_ROOM)?;
    let data = linear(ctx, L4_OFF + OPT).ok_or(stats::NAT_FAIL)?;
    // SAFETY: Ethernet, the IPv4 header and the option are inside the
    // linear area checked by `linear`; no helper ran since.
    unsafe {
        write_option(
            (data + IP_OFF) as *mut IpHdr,
            (data + L4_OFF) as *mut u32,
            (addr_be, port_be),
            p.tot_len + OPT as u16,
        );
    }
    p.l4_off = L4_OFF + OPT;
    p.tot_len += OPT as u16;
    count(stats::DSR_OPT_SET);
    Ok(())
}

/// The frontend a DSR packet carries, with the option stripped and `p`
/// updated; `Ok(None)` (nothing touched) for any packet that does not carry
/// exactly the option [`push`] writes (IHL 7, the option first).
#[inline(always)]
pub fn take(ctx: &TcContext, p: &mut Pkt) -> Result<Option<(u32, u16)>, u32> {
    // The header, the option and at least a UDP header.
    if p.l4_off != L4_OFF + OPT || !p.has_ports() || p.tot_len < (20 + OPT + 8) as u16 {
        return Ok(None);
    }
    let Some(data) = linear(ctx, L4_OFF + OPT) else {
        return Ok(None);
    };
    // SAFETY: bounds checked by `linear`; no helper ran since.
    let (w0, w1) = unsafe {
        let opt = (data + L4_OFF) as *const u32;
        (*opt, *opt.add(1))
    };
    let b = w0.to_ne_bytes();
    if b[0] != DSR_OPT_TYPE || b[1] != DSR_OPT_LEN {
        return Ok(None);
    }
    let frontend = (w1, u16::from_ne_bytes([b[2], b[3]]));
    // The option's own sum: `bpf_skb_generic_pop` takes it out of a
    // CHECKSUM_COMPLETE `skb->csum`, but the header rewritten below sums to
    // 0 again, so it has to go back in (below).
    let opt_sum = fold32(u64::from(w0) + u64::from(w1));
    // Removes the bytes right after the 20-byte base header: the option.
    ctx.skb
        .adjust_room(
            -(OPT as i32),
            BPF_ADJ_ROOM_NET,
            u64::from(BPF_F_ADJ_ROOM_NO_CSUM_RESET),
        )
        .map_err(|_| stats::NAT_FAIL)?;
    let data = linear(ctx, L4_OFF).ok_or(stats::NAT_FAIL)?;
    // SAFETY: Ethernet and IPv4 header bounds checked by `linear`; no
    // helper ran since.
    unsafe {
        let ip = (data + IP_OFF) as *mut IpHdr;
        (*ip).vihl = 0x45;
        (*ip).tot_len = (p.tot_len - OPT as u16).to_be();
        recompute::<10>(ip);
    }
    // SAFETY: plain helper call; a no-op unless CHECKSUM_COMPLETE.
    unsafe { bpf_csum_update(ctx.skb.skb, opt_sum) };
    p.l4_off = L4_OFF;
    p.tot_len -= OPT as u16;
    count(stats::DSR_OPT_RECV);
    Ok(Some(frontend))
}

/// Starts DSR for a new flow of `svc` balanced to `chosen`, `p` being its
/// packet as it arrived (frontend as destination): true when the option
/// is in and the flow goes without source NAT; false (fallback counted by
/// reason) when the frontend does not use DSR, the backend is local, only
/// local backends may serve (externalTrafficPolicy Local keeps the client
/// address anyway), or the packet cannot carry the option.
#[inline(always)]
pub fn start(ctx: &TcContext, p: &mut Pkt, svc: &Service, chosen: &Chosen) -> bool {
    if !wants(svc, chosen) {
        return false;
    }
    if !usable(ctx, p, chosen.be.addr_be) {
        return false;
    }
    let frontend = (p.daddr_be, p.dport_be);
    match push(ctx, p, frontend) {
        Ok(()) => true,
        Err(reason) => {
            count(reason);
            false
        }
    }
}

/// The option on a later packet of a UDP DSR flow, `p` already DNATed to
/// its remote backend: best effort (the backend's node still has the
/// reply entry an earlier packet left), counted when left off.
#[inline(always)]
pub fn refresh(ctx: &TcContext, p: &mut Pkt, frontend: (u32, u16)) {
    if p.proto != proto::UDP || !usable(ctx, p, p.daddr_be) {
        return;
    }
    if let Err(reason) = push(ctx, p, frontend) {
        count(reason);
    }
}

/// XDP's [`push`] and DNAT in one pass, for a received frame (checksums
/// complete, no IP options): `bpf_xdp_adjust_head` grows the frame by the
/// option at the front, Ethernet type and IPv4 header move back into
/// place (the MACs are the next hop's, written by `route::hop`), the
/// option goes behind the header, the destination becomes `backend` with
/// the L4 checksum updated inline, the header checksum is recomputed.
/// The client stays the source. An error before the frame grew leaves it
/// as it came; after, nothing can fail that the bounds checked before did
/// not rule out.
#[inline(always)]
pub fn push_xdp(
    ctx: &XdpContext,
    p: &mut Pkt,
    frontend: (u32, u16),
    (daddr_be, dport_be): (u32, u16),
) -> Result<(), u32> {
    if p.l4_off != L4_OFF || !p.has_ports() {
        return Err(stats::DSR_FALLBACK_ROUTE);
    }
    if p.tot_len > u16::MAX - OPT as u16 {
        return Err(stats::DSR_FALLBACK_MTU);
    }
    let udp = p.proto == proto::UDP;
    let csum_off = if udp { 6 } else { 16 };
    // The L4 checksum field is in the frame now, so it is after the move.
    ptr_at::<u16>(ctx, L4_OFF + csum_off).ok_or(stats::NAT_FAIL)?;
    // SAFETY: plain helper call; a negative delta grows the frame at the
    // front (fails only without headroom, leaving the frame as it was).
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OPT as i32)) } != 0 {
        return Err(stats::DSR_FALLBACK_ROOM);
    }
    let data = linear(ctx, L4_OFF + OPT + 4).ok_or(stats::NAT_FAIL)?;
    let f = ptr_at::<u16>(ctx, L4_OFF + OPT + csum_off).ok_or(stats::NAT_FAIL)?;
    // SAFETY: headers, option and ports are inside the bytes checked by
    // `linear`, the checksum field by `ptr_at`; no helper ran since.
    unsafe {
        // Ethernet type and IPv4 header, 2-byte words from 8 bytes on
        // (ascending: the source is ahead of the destination).
        let w = data as *mut u16;
        let mut i = 6;
        while i < L4_OFF / 2 {
            *w.add(i) = *w.add(i + OPT / 2);
            i += 1;
        }
        let ip = (data + IP_OFF) as *mut IpHdr;
        (*ip).daddr = daddr_be;
        write_option(
            ip,
            (data + L4_OFF) as *mut u32,
            frontend,
            p.tot_len + OPT as u16,
        );
        let l4 = (data + L4_OFF + OPT) as *mut Ports;
        (*l4).dest = dport_be;
        // UDP checksum 0 means none and stays 0.
        if !(udp && *f == 0) {
            let d = diff16(diff32(0, p.daddr_be, daddr_be), p.dport_be, dport_be);
            let mut new = apply_diff(*f, d);
            if udp && new == 0 {
                new = 0xffff;
            }
            *f = new;
        }
    }
    p.daddr_be = daddr_be;
    p.dport_be = dport_be;
    p.l4_off = L4_OFF + OPT;
    p.tot_len += OPT as u16;
    count(stats::DSR_OPT_SET);
    Ok(())
}
