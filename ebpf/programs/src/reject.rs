//! Active rejection when a service has no backend: Kubernetes requires that
//! clients see an error at once (kube-proxy's REJECT rules), not a timeout.
//! TCP gets a RST, UDP an ICMP port unreachable, both sent back out of the
//! interface the packet came in on, from the service address it was sent to.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail},
    programs::TcContext,
};
use riptide_common::{CFG_F_DROP_NO_BACKEND, Config, DropEvent, proto, stats};

use crate::{
    csum::{add_words, fold},
    maps::count,
    parse::{ETH_LEN, IP_OFF, Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;
pub const ICMP_LEN: usize = 8;
/// Bytes of the offending datagram quoted in the ICMP error (RFC 792).
pub const QUOTE_LEN: usize = IP_LEN + 8;

/// Answers `p` with a RST or an ICMP port unreachable and returns the
/// verdict. `source` (`EV_SRC_*`) names the program for the event.
#[inline(always)]
pub fn reject(ctx: &TcContext, p: &Pkt, cfg: &Config, source: u8) -> Result<i32, u32> {
    counted(ifindex(ctx), p, source);
    if cfg.flags & CFG_F_DROP_NO_BACKEND != 0 {
        return Ok(TC_ACT_SHOT);
    }
    match p.proto {
        proto::TCP => tcp_rst(ctx, p),
        proto::UDP => icmp_port_unreachable(ctx, p),
        _ => Ok(TC_ACT_SHOT),
    }
}

/// Counts `p` as `drop_no_backend` and reports it with its own tuple (the
/// frame may already be rewritten). Shared by tc and XDP (`xdp`).
#[inline(always)]
pub fn counted(ifindex: u32, p: &Pkt, source: u8) {
    count(stats::DROP_NO_BACKEND);
    crate::events::emit(DropEvent {
        reason: stats::DROP_NO_BACKEND,
        ifindex,
        saddr_be: p.saddr_be,
        daddr_be: p.daddr_be,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
        source,
        ..DropEvent::default()
    });
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context the program was given.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// A 20-byte IPv4 header (DF, TTL 64) with its checksum.
#[inline(always)]
pub fn ip_header(buf: &mut [u16; 10], tot_len: u16, proto: u8, tos: u8, src: u32, dst: u32) {
    let b = |x: u16| x.to_be();
    buf[0] = b(0x4500 | u16::from(tos));
    buf[1] = b(tot_len);
    buf[2] = 0;
    buf[3] = b(0x4000); // DF
    buf[4] = b(0x4000 | u16::from(proto)); // TTL 64
    buf[5] = 0;
    let s = src.to_ne_bytes();
    let d = dst.to_ne_bytes();
    buf[6] = u16::from_ne_bytes([s[0], s[1]]);
    buf[7] = u16::from_ne_bytes([s[2], s[3]]);
    buf[8] = u16::from_ne_bytes([d[0], d[1]]);
    buf[9] = u16::from_ne_bytes([d[2], d[3]]);
    buf[5] = fold(add_words(0, buf));
}

#[inline(always)]
fn swap_macs(ctx: &TcContext, eth_off: usize) -> Result<(), u32> {
    let macs: [u8; 12] = ctx.load(eth_off).map_err(|_| stats::DROP_MALFORMED)?;
    let mut out = [0u8; 14];
    out[..6].copy_from_slice(&macs[6..12]);
    out[6..12].copy_from_slice(&macs[..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    ctx.store(0, &out, 0).map_err(|_| stats::NAT_FAIL)
}

fn tcp_rst(ctx: &TcContext, p: &Pkt) -> Result<i32, u32> {
    if p.tcp_flags & TCP_RST != 0 || p.fragment {
        // Never answer a RST with a RST.
        return Ok(TC_ACT_SHOT);
    }
    let seq: u32 = ctx.load(p.l4_off + 4).map_err(|_| stats::DROP_MALFORMED)?;
    let ack: u32 = ctx.load(p.l4_off + 8).map_err(|_| stats::DROP_MALFORMED)?;
    let doff: u8 = ctx.load(p.l4_off + 12).map_err(|_| stats::DROP_MALFORMED)?;
    swap_macs(ctx, 0)?;
    let new_len = ETH_LEN + IP_LEN + TCP_LEN;
    // SAFETY: helper on our own skb.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len as u32, 0) } != 0 {
        return Err(stats::NAT_FAIL);
    }
    let mut ip = [0u16; 10];
    ip_header(
        &mut ip,
        (IP_LEN + TCP_LEN) as u16,
        proto::TCP,
        0,
        p.daddr_be,
        p.saddr_be,
    );
    let (head, tail) = rst_tcp(p, &ip, seq, ack, doff);
    ctx.store(IP_OFF, &ip, 0).map_err(|_| stats::NAT_FAIL)?;
    ctx.store(IP_OFF + IP_LEN, &head, 0)
        .map_err(|_| stats::NAT_FAIL)?;
    ctx.store(IP_OFF + IP_LEN + 14, &tail, 0)
        .map_err(|_| stats::NAT_FAIL)?;
    count(stats::REJECT_RST);
    // SAFETY: plain helper call; egress of the interface it arrived on.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// The TCP header of the RST answering `p` (whose seq, ack and data-offset
/// byte are given, as in the packet) under the IPv4 header `ip`: ports,
/// seq, ack, offset and flags, then window 0, checksum, urgent 0. Two
/// arrays and no zeroed 20-byte buffer: LLVM zeroes the words such a
/// buffer leaves unfilled with a call to memset, one more call frame, and
/// 6.1's verifier counts every frame (at least 32 bytes) against the
/// 512-byte stack of the chain. Shared by tc and XDP (`xdp`).
#[inline(always)]
pub fn rst_tcp(p: &Pkt, ip: &[u16; 10], seq: u32, ack: u32, doff: u8) -> ([u16; 7], [u16; 3]) {
    let hdr = (p.l4_off - IP_OFF) as u32 + u32::from(doff >> 4) * 4;
    let payload = u32::from(p.tot_len).saturating_sub(hdr);
    // RFC 9293 3.10.7.1: if the segment has ACK, RST takes its seq from it;
    // otherwise seq 0 and ACK of everything the segment occupied.
    let (rseq, rack, flags) = if p.tcp_flags & TCP_ACK != 0 {
        (ack, 0u32, TCP_RST)
    } else {
        let mut len = payload;
        if p.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if p.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (
            0u32,
            (u32::from_be(seq).wrapping_add(len)).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    let s = rseq.to_ne_bytes();
    let a = rack.to_ne_bytes();
    let head = [
        p.dport_be,
        p.sport_be,
        u16::from_ne_bytes([s[0], s[1]]),
        u16::from_ne_bytes([s[2], s[3]]),
        u16::from_ne_bytes([a[0], a[1]]),
        u16::from_ne_bytes([a[2], a[3]]),
        u16::from_ne_bytes([0x50, flags]),
    ];
    // Pseudo-header: addresses (already in ip[6..10]), protocol, TCP length.
    let mut sum = add_words(0, &ip[6..10]);
    sum += u32::from(proto::TCP) + TCP_LEN as u32;
    (head, [0, fold(add_words(sum, &head)), 0])
}

fn icmp_port_unreachable(ctx: &TcContext, p: &Pkt) -> Result<i32, u32> {
    if p.l4_off != IP_OFF + IP_LEN {
        // Quoting IP options is allowed but not worth the code: drop.
        return Ok(TC_ACT_SHOT);
    }
    // Keep Ethernet + the quoted 28 bytes, then grow 28 bytes at the front:
    // [eth'][ip'][icmp'] followed by the quote that starts at 42.
    let keep = ETH_LEN + QUOTE_LEN;
    // SAFETY: helpers on our own skb.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, keep as u32, 0) != 0 {
            return Err(stats::NAT_FAIL);
        }
        if bpf_skb_change_head(ctx.skb.skb, (IP_LEN + ICMP_LEN) as u32, 0) != 0 {
            return Err(stats::NAT_FAIL);
        }
    }
    let grown = IP_LEN + ICMP_LEN;
    swap_macs(ctx, grown)?;
    let quote: [u16; QUOTE_LEN / 2] = ctx
        .load(ETH_LEN + grown)
        .map_err(|_| stats::DROP_MALFORMED)?;
    let (ip, icmp) = port_unreachable(p, &quote);
    ctx.store(IP_OFF, &ip, 0).map_err(|_| stats::NAT_FAIL)?;
    ctx.store(IP_OFF + IP_LEN, &icmp, 0)
        .map_err(|_| stats::NAT_FAIL)?;
    count(stats::REJECT_ICMP);
    // SAFETY: plain helper call; egress of the interface it arrived on.
    Ok(unsafe { bpf_redirect(ifindex(ctx), 0) } as i32)
}

/// The IPv4 header (TOS 0xc0, internetwork control, as the kernel's
/// `icmp_send`) and the ICMP header of the port unreachable answering `p`,
/// which quotes `quote` (the first [`QUOTE_LEN`] bytes of `p`'s IPv4
/// packet). Shared by tc and XDP (`xdp`).
#[inline(always)]
pub fn port_unreachable(p: &Pkt, quote: &[u16; QUOTE_LEN / 2]) -> ([u16; 10], [u16; ICMP_LEN / 2]) {
    let mut ip = [0u16; 10];
    ip_header(
        &mut ip,
        (IP_LEN + ICMP_LEN + QUOTE_LEN) as u16,
        proto::ICMP,
        0xc0,
        p.daddr_be,
        p.saddr_be,
    );
    let mut icmp = [0u16; ICMP_LEN / 2];
    icmp[0] = u16::from_be_bytes([3, 3]).to_be(); // dest unreachable / port
    icmp[1] = fold(add_words(add_words(0, &icmp), quote));
    (ip, icmp)
}
