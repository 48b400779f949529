//! `rt_xdp_net`: XDP on the node's uplink, the fast path of NodePort,
//! externalIP and LoadBalancer-IP traffic whose backend is on another node
//! (Cilium's `bpf_xdp.c` / `nodeport_lb4` at XDP).
//!
//! Before the kernel allocates an skb, for TCP and UDP without IP options:
//!
//! 1. a reply from a remote backend to a flow this node source-NATed
//!    (backend → node:port): un-SNAT and reverse DNAT at once (frontend →
//!    client), back out the uplink;
//! 2. a packet of a flow already balanced to a remote backend: DNAT and
//!    SNAT at once, out the uplink;
//! 3. the first packet of a new flow (a pure TCP SYN, or UDP to a frontend
//!    that is not the node's own address): the service lookup and backend
//!    choice of tc (`lb`), the state of tc (`nodeport`), then as 2.
//!
//! DSR frontends (`dsr`) the same way, without the source NAT: the first
//! packet of a flow (every UDP packet) grows by the option at the front
//! (`bpf_xdp_adjust_head`, `dsr::push_xdp`) and is DNATed; later TCP
//! packets are only DNATed. The per-flow choice is tc's, from the same
//! FIB answer (`dsr::path`, asked with the grown length): too big for the
//! route's MTU → source NAT here (counted `dsr_fallback_mtu`); another
//! device, an unresolved next hop, IP options → tc, which decides and
//! counts.
//!
//! "Out the uplink" is `XDP_TX` after `bpf_fib_lookup` says the next hop
//! is on the same device and resolved (`route::next_hop_same_dev`, asked
//! *before* anything is written, with the packet's length for the MTU),
//! with TTL − 1 and the next hop's MACs (`route::hop`). Every packet this
//! program does not finish goes to the tc path untouched (`XDP_PASS`,
//! counted `xdp_to_tc` when it concerns a frontend): a local backend
//! (`rt_from_net` delivers it with `bpf_redirect_peer`; an `XDP_REDIRECT`
//! into a pod's veth would need an XDP program on the pod side and gives up
//! GRO), a next hop on another device or not resolved yet, TTL ≤ 1, a new
//! TCP flow that is not a SYN or a new UDP flow to a node address (the
//! kernel's socket table decides whether a host socket owns it, a lookup
//! tc makes, `local_sock`), ICMP, fragments, IP options, NetworkPolicy.
//! Everything that is not a frontend passes with no more than the parse,
//! the conntrack and NAT lookups and a service lookup.
//!
//! Early drops: a malformed IPv4 header (the entry's verdict), no port
//! left for the source NAT (as tc), a source outside the frontend's
//! `loadBalancerSourceRanges` (`srcrange`), and, when the node drops instead of
//! rejecting (`CFG_F_DROP_NO_BACKEND`), a service without backends.
//! Otherwise a packet to a service without backends gets its answer from
//! XDP (`XDP_TX`, the bytes tc's `reject` writes): a RST for TCP, an ICMP
//! port unreachable for UDP (tc's when the frame is shorter than the
//! 28 bytes to quote or has no headroom to grow).
//!
//! Checksums are updated inline (`csum::rewrite_complete`): a received
//! frame's checksums are complete.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use riptide_common::{
    BE_F_LOCAL, CFG_F_DROP_NO_BACKEND, CT_F_DSR, CT_F_INBOUND, CT_F_NODEPORT, CT_F_POLICY,
    CT_F_REPLY, CT_F_SNAT, Config, EV_SRC_XDP_NET, NAT_F_NODEPORT, proto, stats,
};

use crate::{
    csum::rewrite_complete,
    ct,
    dsr::{self, Path},
    events, lb,
    maps::{config, count},
    nat, nodeport,
    parse::{self, ETH_LEN, Frame, IP_OFF, L4_OFF, Pkt, TCP_RST, linear},
    reject, route,
};

/// Leaves a frontend packet to tc, untouched.
#[inline(always)]
fn to_tc() -> Result<u32, u32> {
    count(stats::XDP_TO_TC);
    Ok(XDP_PASS)
}

/// Sends `p`, rewritten to `saddr:sport → daddr:dport`, back out the
/// uplink; `None` when the FIB does not allow it (nothing written).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    p: &mut Pkt,
    (saddr_be, sport_be): (u32, u16),
    (daddr_be, dport_be): (u32, u16),
) -> Result<Option<u32>, u32> {
    if p.ttl <= 1 {
        return Ok(None);
    }
    let Some(fib) = route::next_hop_same_dev(ctx, saddr_be, daddr_be, p, p.tot_len) else {
        return Ok(None);
    };
    rewrite_complete(ctx, p, saddr_be, sport_be, daddr_be, dport_be)?;
    route::hop(ctx, &fib.dmac, &fib.smac)?;
    count(stats::XDP_TX);
    Ok(Some(XDP_TX))
}

/// XDP on the uplink.
#[inline(always)]
pub fn try_xdp_net(ctx: &XdpContext) -> Result<u32, u32> {
    let Some(mut p) = parse::headers(ctx)? else {
        return Ok(XDP_PASS);
    };
    if !p.has_ports() || p.l4_off != L4_OFF {
        return Ok(XDP_PASS);
    }
    let cfg = config();
    let is_node = cfg.node_ip_be != 0 && p.daddr_be == cfg.node_ip_be;

    // 1. A reply to a NodePort flow we source-NATed (masqueraded pod
    //    traffic coming back goes to tc: it ends in a pod).
    if is_node && let Some(n) = nat::lookup_ingress(&p) {
        if n.flags & NAT_F_NODEPORT == 0 {
            return Ok(XDP_PASS);
        }
        let client = (n.addr_be, n.port_be);
        let mut reply = p;
        reply.daddr_be = client.0;
        reply.dport_be = client.1;
        if let Some(hit) = ct::lookup(&reply) {
            let e = &*hit.e;
            if e.flags & (CT_F_REPLY | CT_F_NODEPORT) == CT_F_REPLY | CT_F_NODEPORT {
                let frontend = (e.vip_be, e.vport_be);
                if let Some(v) = send(ctx, &mut p, frontend, client)? {
                    count(stats::UNSNAT);
                    count(stats::REVNAT);
                    return Ok(v);
                }
            }
        }
        return to_tc();
    }

    // 2. A packet of a flow already balanced here.
    if let Some(hit) = ct::lookup(&p) {
        let e = &*hit.e;
        if e.flags & (CT_F_REPLY | CT_F_POLICY | CT_F_INBOUND) != 0 {
            // Replies to local clients, policy-tracked and inbound flows
            // end in a pod or the node: tc.
            return Ok(XDP_PASS);
        }
        let snatted = e.flags & CT_F_SNAT != 0;
        let is_dsr = e.flags & CT_F_DSR != 0;
        let frontend = (e.vip_be, e.vport_be);
        let Some(c) = ct::fwd_backend(&hit) else {
            // The backend went away: tc balances the flow anew.
            return to_tc();
        };
        if c.be.flags & BE_F_LOCAL != 0 {
            return to_tc();
        }
        if is_dsr {
            if let Some(v) = send_dsr(ctx, &mut p, frontend, (c.be.addr_be, c.be.port_be))? {
                count(stats::LB_CT_HIT);
                return Ok(v);
            }
            return to_tc();
        }
        if !snatted {
            return to_tc();
        }
        let mut to_backend = p;
        to_backend.daddr_be = c.be.addr_be;
        to_backend.dport_be = c.be.port_be;
        let Some(n) = nat::lookup_egress(&to_backend) else {
            // The mapping was evicted: tc's egress decides (as for tc).
            return to_tc();
        };
        let src = (n.addr_be, n.port_be);
        if let Some(v) = send(ctx, &mut p, src, (c.be.addr_be, c.be.port_be))? {
            count(stats::LB_CT_HIT);
            count(stats::SNAT);
            return Ok(v);
        }
        return to_tc();
    }

    // 3. A new flow to a frontend of this node.
    let Some(svc) = lb::lookup_with_node(p.daddr_be, p.dport_be, p.proto, false, is_node) else {
        return Ok(XDP_PASS);
    };
    // No conntrack entry: whatever packet of the flow this is, tc would
    // judge it as new too, so a denied source is dropped here already.
    if crate::srcrange::denied(ctx, &svc, &p, EV_SRC_XDP_NET) {
        return Ok(XDP_DROP);
    }
    let starts_here = if p.proto == proto::TCP {
        ct::is_pure_syn(&p)
    } else {
        !is_node
    };
    if !starts_here {
        return to_tc();
    }
    let Some(chosen) = lb::select_for(&svc, &p)? else {
        return no_backend(ctx, &p, cfg);
    };
    if chosen.be.flags & BE_F_LOCAL != 0 || cfg.node_ip_be == 0 {
        return to_tc();
    }
    let orig = ct::key(&p);
    let mut to_backend = p;
    to_backend.daddr_be = chosen.be.addr_be;
    to_backend.dport_be = chosen.be.port_be;
    let backend = (chosen.be.addr_be, chosen.be.port_be);
    if dsr::wants(&svc, &chosen) {
        match dsr::path(ctx, &p, chosen.be.addr_be) {
            Path::Same(Some(fib)) if p.ttl > 1 => {
                // State first, as tc: the flow is DSR from its first packet.
                nodeport::record(&orig, &to_backend, &svc, &chosen, CT_F_DSR)?;
                let frontend = (p.daddr_be, p.dport_be);
                if dsr::push_xdp(ctx, &mut p, frontend, backend).is_err() {
                    // No headroom (the frame as it came): tc starts the
                    // flow with `bpf_skb_adjust_room`.
                    ct::remove(&p);
                    return to_tc();
                }
                route::hop(ctx, &fib.dmac, &fib.smac)?;
                count(stats::XDP_TX);
                count(stats::LB_NEW);
                return Ok(XDP_TX);
            }
            // As tc: a flow whose first packet cannot carry the option is
            // source-NATed (below).
            Path::TooBig => count(stats::DSR_FALLBACK_MTU),
            // Another device, an unresolved next hop, TTL ≤ 1: tc decides
            // (and counts the fallback).
            _ => return to_tc(),
        }
    }
    // The source port is only known once allocated, and allocating needs
    // the FIB's yes first: ask with the node address, then allocate and
    // record (state before any write: a failure leaves the packet as it
    // came).
    let sent = send_new(ctx, &mut p, cfg, backend, || {
        let port = match nodeport::snat(&to_backend, cfg, &svc, &chosen)? {
            Some(port) => port,
            // Never forward a remote flow with the client's address.
            None => return Err(stats::NAT_FAIL),
        };
        nodeport::record(&orig, &to_backend, &svc, &chosen, CT_F_SNAT)?;
        Ok(port)
    });
    match sent {
        Ok(Some(v)) => {
            count(stats::LB_NEW);
            Ok(v)
        }
        Ok(None) => to_tc(),
        Err(reason @ (stats::SNAT_NO_PORT | stats::NAT_FAIL)) => {
            count(reason);
            events::report(ctx, reason, EV_SRC_XDP_NET);
            Ok(XDP_DROP)
        }
        Err(reason) => Err(reason),
    }
}

/// A later packet of a DSR flow to `backend`: DNAT only (the client stays
/// the source); UDP carries the option again (as tc's `dsr::refresh`),
/// or goes without it when the packet plus option exceeds the MTU. `None`
/// when XDP cannot send it (nothing written).
#[inline(always)]
fn send_dsr(
    ctx: &XdpContext,
    p: &mut Pkt,
    frontend: (u32, u16),
    backend: (u32, u16),
) -> Result<Option<u32>, u32> {
    if p.proto == proto::UDP {
        match dsr::path(ctx, p, backend.0) {
            Path::Same(Some(fib)) if p.ttl > 1 => {
                match dsr::push_xdp(ctx, p, frontend, backend) {
                    Ok(()) => {}
                    Err(stats::DSR_FALLBACK_ROOM) => return Ok(None),
                    Err(reason) => return Err(reason),
                }
                route::hop(ctx, &fib.dmac, &fib.smac)?;
                count(stats::XDP_TX);
                return Ok(Some(XDP_TX));
            }
            Path::TooBig => count(stats::DSR_FALLBACK_MTU),
            _ => return Ok(None),
        }
    }
    let client = (p.saddr_be, p.sport_be);
    send(ctx, p, client, backend)
}

/// [`send`] for a new flow, whose source port `alloc` allocates once the
/// FIB said yes.
#[inline(always)]
fn send_new(
    ctx: &XdpContext,
    p: &mut Pkt,
    cfg: &Config,
    (daddr_be, dport_be): (u32, u16),
    alloc: impl FnOnce() -> Result<u16, u32>,
) -> Result<Option<u32>, u32> {
    if p.ttl <= 1 {
        return Ok(None);
    }
    let Some(fib) = route::next_hop_same_dev(ctx, cfg.node_ip_be, daddr_be, p, p.tot_len) else {
        return Ok(None);
    };
    let sport_be = alloc()?;
    rewrite_complete(ctx, p, cfg.node_ip_be, sport_be, daddr_be, dport_be)?;
    route::hop(ctx, &fib.dmac, &fib.smac)?;
    count(stats::XDP_TX);
    Ok(Some(XDP_TX))
}

/// A service without a usable backend: dropped here when the node drops
/// (`CFG_F_DROP_NO_BACKEND`); otherwise answered from here with what tc's
/// `reject` would send: a RST for TCP ([`rst`]), an ICMP port unreachable
/// for UDP ([`port_unreachable`]; a frame that cannot hold it goes to tc
/// untouched, which answers or drops it). Counted and reported once, by
/// whichever hook answers.
#[inline(always)]
fn no_backend(ctx: &XdpContext, p: &Pkt, cfg: &Config) -> Result<u32, u32> {
    if cfg.flags & CFG_F_DROP_NO_BACKEND != 0 {
        reject::counted(ctx.ifindex(), p, EV_SRC_XDP_NET);
        return Ok(XDP_DROP);
    }
    match p.proto {
        proto::TCP => {
            reject::counted(ctx.ifindex(), p, EV_SRC_XDP_NET);
            if p.tcp_flags & TCP_RST != 0 {
                // Never answer a RST with a RST.
                return Ok(XDP_DROP);
            }
            rst(ctx, p)
        }
        proto::UDP => match port_unreachable(ctx, p) {
            Some(v) => Ok(v),
            None => to_tc(),
        },
        _ => to_tc(),
    }
}

/// Turns `p` (UDP, no IP options) into the ICMP port unreachable tc's
/// `reject` sends, byte for byte: the frame grown by the new IPv4 and
/// ICMP headers at the front (`bpf_xdp_adjust_head`) and cut after the
/// 28 quoted bytes (`bpf_xdp_adjust_tail`), so the quote stays where it
/// was; MACs swapped, headers from `reject::port_unreachable`; `XDP_TX`.
/// `None` (nothing written, nothing counted) when the frame is shorter
/// than the quote (the parser needs only the ports) or has no headroom.
#[inline(always)]
fn port_unreachable(ctx: &XdpContext, p: &Pkt) -> Option<u32> {
    const KEEP: usize = ETH_LEN + reject::QUOTE_LEN;
    const GROW: usize = reject::IP_LEN + reject::ICMP_LEN;
    const LEN: usize = GROW + KEEP;
    linear(ctx, KEEP)?;
    // SAFETY: plain helper call; a negative delta grows the frame at the
    // front and fails only without headroom, leaving the frame as it was.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return None;
    }
    reject::counted(ctx.ifindex(), p, EV_SRC_XDP_NET);
    let len = ctx.data_end() - ctx.data();
    // SAFETY: plain helper call; shrinking a frame of at least LEN bytes
    // to LEN. It cannot fail for such a frame; if it did, the frame is
    // no longer the packet that came, so it is dropped, not passed.
    if len > LEN && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - LEN) as i32)) } != 0 {
        count(stats::NAT_FAIL);
        return Some(XDP_DROP);
    }
    let Some(data) = linear(ctx, LEN) else {
        count(stats::NAT_FAIL);
        return Some(XDP_DROP);
    };
    // SAFETY: 2-byte words inside the `LEN` bytes checked by `linear`
    // (the frame start stays 2-byte aligned: it moved by 28); no helper
    // ran since. The received Ethernet header is at GROW now, the quote
    // at LEN - QUOTE_LEN; the new headers overwrite only bytes before it.
    unsafe {
        let w = data as *mut u16;
        let e = GROW / 2;
        let macs = [
            *w.add(e),
            *w.add(e + 1),
            *w.add(e + 2),
            *w.add(e + 3),
            *w.add(e + 4),
            *w.add(e + 5),
        ];
        let mut quote = [0u16; reject::QUOTE_LEN / 2];
        let mut i = 0;
        while i < reject::QUOTE_LEN / 2 {
            quote[i] = *w.add(KEEP / 2 + i);
            i += 1;
        }
        let (ip, icmp) = reject::port_unreachable(p, &quote);
        put_answer_headers(w, &macs, &ip);
        put(w, L4_OFF / 2, &icmp);
    }
    count(stats::REJECT_ICMP);
    Some(XDP_TX)
}

/// Turns `p` (TCP, no IP options) into the RST that answers it, from the
/// frontend it was sent to, and sends it back to the sender's MAC with
/// `XDP_TX`: the frame cut to Ethernet + 20 + 20 bytes
/// (`bpf_xdp_adjust_tail`), MACs swapped, a new IPv4 header, the TCP
/// header of `reject::rst_tcp` (byte for byte what tc writes).
#[inline(always)]
fn rst(ctx: &XdpContext, p: &Pkt) -> Result<u32, u32> {
    const LEN: usize = L4_OFF + 20;
    let data = linear(ctx, LEN).ok_or(stats::DROP_MALFORMED)?;
    // SAFETY: the Ethernet, IPv4 and TCP base headers are inside the
    // bytes checked by `linear`; no helper ran since.
    let (macs, seq, ack, doff) = unsafe {
        let w = data as *const u16;
        (
            [*w, *w.add(1), *w.add(2), *w.add(3), *w.add(4), *w.add(5)],
            *((data + L4_OFF + 4) as *const u32),
            *((data + L4_OFF + 8) as *const u32),
            *((data + L4_OFF + 12) as *const u8),
        )
    };
    let len = ctx.data_end() - ctx.data();
    // SAFETY: plain helper call; a negative delta shrinks the frame at
    // its end (it keeps at least the headers written below).
    if len > LEN && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - LEN) as i32)) } != 0 {
        return Err(stats::NAT_FAIL);
    }
    let mut ip = [0u16; 10];
    reject::ip_header(&mut ip, 40, proto::TCP, 0, p.daddr_be, p.saddr_be);
    let (head, tail) = reject::rst_tcp(p, &ip, seq, ack, doff);
    let data = linear(ctx, LEN).ok_or(stats::NAT_FAIL)?;
    // SAFETY: 2-byte words inside the `LEN` bytes checked by `linear`
    // (the frame start is 2-byte aligned); no helper ran since.
    unsafe {
        let w = data as *mut u16;
        put_answer_headers(w, &macs, &ip);
        put(w, L4_OFF / 2, &head);
        put(w, L4_OFF / 2 + 7, &tail);
    }
    count(stats::REJECT_RST);
    Ok(XDP_TX)
}

/// Writes `words` from 2-byte word `at` of the frame that starts at `w`.
///
/// # Safety
///
/// `w` is the frame start `linear` returned for at least
/// `2 * (at + words.len())` bytes, and no helper ran since.
#[inline(always)]
unsafe fn put(w: *mut u16, at: usize, words: &[u16]) {
    let mut i = 0;
    while i < words.len() {
        // SAFETY: inside the checked bytes (the caller's contract).
        unsafe { *w.add(at + i) = words[i] };
        i += 1;
    }
}

/// Writes the Ethernet header of an answer to the received frame whose
/// first 12 bytes were `macs` (back to its sender, from the address it
/// was sent to; IPv4) and the answer's IPv4 header `ip` after it.
///
/// # Safety
///
/// As [`put`], for the [`L4_OFF`] bytes of the two headers.
#[inline(always)]
unsafe fn put_answer_headers(w: *mut u16, macs: &[u16; 6], ip: &[u16; 10]) {
    // SAFETY: the caller's contract.
    unsafe {
        put(w, 0, &macs[3..]);
        put(w, 3, &macs[..3]);
        put(w, 6, &[0x0800u16.to_be()]);
        put(w, IP_OFF / 2, ip);
    }
}
