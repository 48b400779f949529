//! Rewriting addresses and ports with incremental checksum updates.
//!
//! Fields are written with direct packet access. The IPv4 header checksum
//! is updated inline (RFC 1624): it is always complete in the packet and
//! the header still sums to 0xffff afterwards, so no skb checksum state
//! changes — exactly what `bpf_l3_csum_replace` does, minus a helper call.
//! The TCP/UDP checksum goes through `bpf_l4_csum_replace`, which knows the
//! skb's checksum state: with CHECKSUM_PARTIAL (pods' own TCP/UDP with
//! offload) only pseudo-header changes (`BPF_F_PSEUDO_HDR`) may touch the
//! field, port changes must not; with CHECKSUM_COMPLETE it fixes `skb->csum`
//! too. One call covers all address changes (a precomputed difference,
//! size 0); port changes are folded in without a second call when the
//! field shows the checksum is complete (`l4_update`). UDP checksum 0 means
//! "none" and must stay 0: `BPF_F_MARK_MANGLED_0`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use riptide_common::{proto, stats};

use crate::parse::{Frame, IP_OFF, IpHdr, L4_OFF, Pkt, Ports, ptr_at};

/// Checksum differences are accumulated as plain u64 sums of 32-bit (or
/// 16-bit) words and folded once: BPF has no carry flag, so folding after
/// every add (the kernel's `csum_add`) costs a dozen instructions each.
///
/// Difference of replacing word `old` by `new` (`csum_diff`), on the raw
/// in-memory (network order) values, added to `acc`.
#[inline(always)]
pub fn diff32(acc: u64, old: u32, new: u32) -> u64 {
    acc + u64::from(!old) + u64::from(new)
}

/// Same for a 16-bit word.
#[inline(always)]
pub fn diff16(acc: u64, old: u16, new: u16) -> u64 {
    acc + u64::from(!old) + u64::from(new)
}

/// Folds a u64 sum into a 32-bit partial sum (`__wsum`, what
/// `bpf_l4_csum_replace` takes as a difference).
#[inline(always)]
pub fn fold32(s: u64) -> u32 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

/// Applies a difference to a 16-bit checksum field (`csum_replace_by_diff`
/// on a field that holds a complemented sum).
#[inline(always)]
pub fn apply_diff(check: u16, diff: u64) -> u16 {
    let s = diff + u64::from(!check);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
fn l4_flags(p: &Pkt) -> u64 {
    if p.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// What a rewrite changes and the checksum differences it makes.
pub struct Change {
    pub addr: bool,
    pub port: bool,
    pub addr_diff: u64,
    pub port_diff: u64,
}

/// The hook-independent half of a rewrite, by direct access (tc skbs and
/// XDP buffers alike): the addresses with the IPv4 header checksum and,
/// when the header has no IP options, the ports. Returns the differences
/// the L4 checksum needs (its update depends on the hook); `None` when
/// nothing changes. `p` is left as it was.
#[inline(always)]
pub fn write_headers(
    ctx: &impl Frame,
    p: &Pkt,
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
) -> Result<Option<Change>, u32> {
    let ports = p.has_ports();
    let s_addr = saddr_be != p.saddr_be;
    let d_addr = daddr_be != p.daddr_be;
    let s_port = ports && sport_be != p.sport_be;
    let d_port = ports && dport_be != p.dport_be;
    if !(s_addr || d_addr || s_port || d_port) {
        return Ok(None);
    }
    // IP header: addresses and the header checksum, directly.
    let mut addr_diff = 0u64;
    if s_addr || d_addr {
        let ip = ptr_at::<IpHdr>(ctx, IP_OFF).ok_or(stats::NAT_FAIL)?;
        // SAFETY: bounds checked by ptr_at; no helper ran since.
        let ip = unsafe { &mut *ip };
        if s_addr {
            addr_diff = diff32(addr_diff, p.saddr_be, saddr_be);
            ip.saddr = saddr_be;
        }
        if d_addr {
            addr_diff = diff32(addr_diff, p.daddr_be, daddr_be);
            ip.daddr = daddr_be;
        }
        ip.check = apply_diff(ip.check, addr_diff);
    }
    let mut port_diff = 0u64;
    if s_port {
        port_diff = diff16(port_diff, p.sport_be, sport_be);
    }
    if d_port {
        port_diff = diff16(port_diff, p.dport_be, dport_be);
    }
    if (s_port || d_port) && p.l4_off == L4_OFF {
        let l4 = ptr_at::<Ports>(ctx, L4_OFF).ok_or(stats::NAT_FAIL)?;
        // SAFETY: bounds checked by ptr_at; no helper ran since.
        let l4 = unsafe { &mut *l4 };
        if s_port {
            l4.source = sport_be;
        }
        if d_port {
            l4.dest = dport_be;
        }
    }
    Ok(Some(Change {
        addr: s_addr || d_addr,
        port: s_port || d_port,
        addr_diff,
        port_diff,
    }))
}

/// Records a rewrite in `p`.
#[inline(always)]
fn note(p: &mut Pkt, saddr_be: u32, sport_be: u16, daddr_be: u32, dport_be: u16) {
    p.saddr_be = saddr_be;
    p.daddr_be = daddr_be;
    if p.has_ports() {
        p.sport_be = sport_be;
        p.dport_be = dport_be;
    }
}

/// Rewrites source and/or destination to the given address/port (values
/// equal to the current ones are left alone) and updates `p`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    p: &mut Pkt,
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
) -> Result<(), u32> {
    let Some(c) = write_headers(ctx, p, saddr_be, sport_be, daddr_be, dport_be)? else {
        return Ok(());
    };
    // Ports behind IP options, through the helper.
    if c.port && p.l4_off != L4_OFF {
        if sport_be != p.sport_be {
            ctx.store(p.l4_off, &sport_be, 0)
                .map_err(|_| stats::NAT_FAIL)?;
        }
        if dport_be != p.dport_be {
            ctx.store(p.l4_off + 2, &dport_be, 0)
                .map_err(|_| stats::NAT_FAIL)?;
        }
    }
    // L4 checksum (see the module docs). ICMP has no pseudo-header;
    // fragments carry no (complete) L4 header.
    if p.has_ports()
        && let Some(csum_off) = p.l4_csum_off()
    {
        l4_update(ctx, p, csum_off, c.addr, c.addr_diff, c.port, c.port_diff)?;
    }
    note(p, saddr_be, sport_be, daddr_be, dport_be);
    Ok(())
}

/// [`rewrite`] for a packet whose L4 checksum is complete in the packet
/// and whose header has no IP options: XDP's received frames (a sender's
/// checksum offload is resolved before a frame is on the wire; XDP runs
/// before any skb could be CHECKSUM_PARTIAL). Both checksums inline, no
/// helper; UDP checksum 0 ("none") stays 0.
#[inline(always)]
pub fn rewrite_complete(
    ctx: &impl Frame,
    p: &mut Pkt,
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
) -> Result<(), u32> {
    if p.l4_off != L4_OFF || !p.has_ports() {
        return Err(stats::NAT_FAIL);
    }
    // Bounds of the checksum field before anything is written: a failure
    // leaves the packet as it was.
    let udp = p.proto == proto::UDP;
    let f =
        ptr_at::<u16>(ctx, if udp { L4_OFF + 6 } else { L4_OFF + 16 }).ok_or(stats::NAT_FAIL)?;
    let Some(c) = write_headers(ctx, p, saddr_be, sport_be, daddr_be, dport_be)? else {
        return Ok(());
    };
    // SAFETY: bounds checked by ptr_at; no helper ran since.
    let f = unsafe { &mut *f };
    if !(udp && *f == 0) {
        let mut new = apply_diff(*f, c.addr_diff + c.port_diff);
        if udp && new == 0 {
            new = 0xffff;
        }
        *f = new;
    }
    note(p, saddr_be, sport_be, daddr_be, dport_be);
    Ok(())
}

/// The kernel's `csum_add` on a 32-bit `__wsum` (end-around carry).
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let r = a.wrapping_add(b);
    r.wrapping_add(u32::from(r < b))
}

/// The kernel's `csum_fold`.
#[inline(always)]
fn csum_fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// What `inet_proto_csum_replace_by_diff` writes into a checksum field
/// holding `f` for difference `d`: (field of a complete checksum, field of
/// a CHECKSUM_PARTIAL skb, which holds the uncomplemented pseudo-header
/// sum).
#[inline(always)]
fn replaced_by_diff(f: u16, d: u32) -> (u16, u16) {
    (
        csum_fold(csum_add(d, !u32::from(f))),
        !csum_fold(csum_add(u32::from(f), d)),
    )
}

/// Updates the L4 checksum for an address difference (`addr`, part of the
/// pseudo-header) and a port difference (`port`, inside the segment).
///
/// Both go through `bpf_l4_csum_replace` when needed, but a helper call
/// costs ~25 ns on this class of machine (every return pays the SRSO
/// return thunk), so when both change — every DNAT to a target port other
/// than the service port — one call does the addresses and the ports are
/// done inline *if* the skb's checksum is complete in the packet. Whether
/// it is shows in what the helper wrote: for CHECKSUM_PARTIAL it adds the
/// difference to the uncomplemented pseudo-header sum, otherwise it
/// updates a complemented checksum, and the two results differ unless the
/// difference is 0 mod 0xffff. Partial: the device sums the segment later,
/// so the ports must not be added (exactly what the helper would do).
/// Complete (NONE / UNNECESSARY / COMPLETE): update the field inline; the
/// segment's sum is unchanged by a port change plus its compensating
/// checksum change, so `skb->csum` needs nothing. Ambiguous or unexpected:
/// the second helper call, as before.
#[inline(always)]
fn l4_update(
    ctx: &TcContext,
    p: &Pkt,
    csum_off: usize,
    addr: bool,
    addr_diff: u64,
    port: bool,
    port_diff: u64,
) -> Result<(), u32> {
    let udp = p.proto == proto::UDP;
    let (addr_d, port_d) = (fold32(addr_diff), fold32(port_diff));
    let fast = addr && port && p.l4_off == L4_OFF;
    // The field before any update (direct read; fixed offsets only).
    let mut before = 0u16;
    if fast {
        let off = if udp { L4_OFF + 6 } else { L4_OFF + 16 };
        let f = ptr_at::<u16>(ctx, off).ok_or(stats::NAT_FAIL)?;
        // SAFETY: bounds checked by ptr_at.
        before = unsafe { *f };
        if udp && before == 0 {
            // UDP without checksum: nothing to update (the helper would
            // return early too, BPF_F_MARK_MANGLED_0).
            return Ok(());
        }
    }
    if addr {
        ctx.l4_csum_replace(
            csum_off,
            0,
            u64::from(addr_d),
            u64::from(BPF_F_PSEUDO_HDR) | l4_flags(p),
        )
        .map_err(|_| stats::NAT_FAIL)?;
    }
    if !port {
        return Ok(());
    }
    if fast {
        let off = if udp { L4_OFF + 6 } else { L4_OFF + 16 };
        // Re-derived: the helper invalidated every packet pointer.
        let f = ptr_at::<u16>(ctx, off).ok_or(stats::NAT_FAIL)?;
        // SAFETY: bounds checked by ptr_at; no helper since.
        let f = unsafe { &mut *f };
        let (mut complete, mut partial) = replaced_by_diff(before, addr_d);
        if udp {
            // BPF_F_MARK_MANGLED_0: a computed 0 is sent as 0xffff.
            if complete == 0 {
                complete = 0xffff;
            }
            if partial == 0 {
                partial = 0xffff;
            }
        }
        if complete != partial {
            if *f == partial {
                return Ok(());
            }
            if *f == complete {
                let (mut new, _) = replaced_by_diff(*f, port_d);
                if udp && new == 0 {
                    new = 0xffff;
                }
                *f = new;
                return Ok(());
            }
        }
    }
    ctx.l4_csum_replace(csum_off, 0, u64::from(port_d), l4_flags(p))
        .map_err(|_| stats::NAT_FAIL)
}

/// Rewrites the destination to `addr:port` and updates `p`.
#[inline(always)]
pub fn set_dst(ctx: &TcContext, p: &mut Pkt, addr_be: u32, port_be: u16) -> Result<(), u32> {
    rewrite(ctx, p, p.saddr_be, p.sport_be, addr_be, port_be)
}

/// Rewrites the source to `addr:port` and updates `p`.
#[inline(always)]
pub fn set_src(ctx: &TcContext, p: &mut Pkt, addr_be: u32, port_be: u16) -> Result<(), u32> {
    rewrite(ctx, p, addr_be, port_be, p.daddr_be, p.dport_be)
}

/// One's-complement sum of `words` (16-bit, network order as loaded) folded
/// into `acc`. Fixed-size callers keep the verifier's loop bound obvious.
#[inline(always)]
pub fn add_words(mut acc: u32, words: &[u16]) -> u32 {
    for w in words {
        acc += u32::from(u16::from_be(*w));
    }
    acc
}

/// Folds a 32-bit sum into the final checksum (network order).
#[inline(always)]
pub fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_be()
}
