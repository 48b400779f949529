//! Source NAT (LRU): NodePort flows to remote backends and pod→outside
//! masquerade are rewritten to the node address. Two tables, picked by
//! protocol as conntrack's: `rt_nat4_v2` for TCP, `rt_natany4_v2` for the
//! rest, so a flood of new UDP mappings (a pod resolving names through an
//! outside server, or anything a pod or a NodePort client sends) evicts
//! only UDP mappings, never the mapping of an established TCP connection,
//! whose next packet masquerade would have to drop (`masq_lost_mapping`).
//! The split changes no port allocation: the ingress key that reserves a
//! port carries the protocol, so each protocol always had its own ports.
//!
//! Each translation is a pair: EGRESS keyed by the original tuple gives the
//! new source; INGRESS keyed by the reply tuple (remote → node:port) gives
//! the address to restore as destination. The INGRESS entry is inserted with
//! BPF_NOEXIST, which is what makes a port ours: two flows can never share a
//! reply tuple.
//!
//! The node's own sockets use the same address and, by default, the same
//! port range (the kernel's ephemeral ports, 32768–60999), and the kernel
//! knows nothing of our mappings. So flows the node itself sends from a
//! port in the SNAT range are recorded too (`track_host`, Cilium's
//! `snat_v4_track_connection` for host connections): an identity pair
//! (`NAT_F_HOST`, new source = old source) whose INGRESS entry reserves the
//! tuple, so `alloc` never hands it to a pod or a NodePort client, and
//! whose replies `rt_from_net` leaves to the host. A host flow whose first
//! packet finds its tuple already taken by a mapping is itself moved to a
//! free port, as any translated flow.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    maps::LruHashMap,
    programs::TcContext,
};
use riptide_common::{
    CT_DIR_ANY, CT_F_NODEPORT, CT_F_REPLY, CtKey, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_CLOSING,
    NAT_F_HOST, NAT_F_NODEPORT, NatValue, proto, stats,
};

use crate::{
    clock, ct, events,
    maps::{CT4, NAT_ANY4, NAT4, count},
    parse::{Pkt, TCP_FIN, TCP_RST},
};

/// Attempts at finding a free port before giving up (counted as SNAT_NO_PORT).
const PORT_TRIES: u32 = 16;

#[inline(always)]
fn nat_key(p: &Pkt, dir: u8) -> CtKey {
    let mut k = ct::key(p);
    k.dir = dir;
    k
}

/// The table of protocol `proto`.
#[inline(always)]
fn table(proto: u8) -> &'static LruHashMap<CtKey, NatValue> {
    if proto == proto::TCP {
        &NAT4
    } else {
        &NAT_ANY4
    }
}

#[inline(always)]
fn lookup_mut(k: &CtKey) -> Option<&'static mut NatValue> {
    // Two call sites, one per map, so the kernel can inline each lookup
    // (a map pointer that depends on the path is called through the
    // helper).
    let ptr = if k.proto == proto::TCP {
        NAT4.get_ptr_mut(k)?
    } else {
        NAT_ANY4.get_ptr_mut(k)?
    };
    // SAFETY: map value pointer, valid for this program run; racing
    // last_seen refreshes are harmless.
    let v = unsafe { &mut *ptr };
    clock::touch(&mut v.last_seen_ns);
    Some(v)
}

#[inline(always)]
fn lookup(k: &CtKey) -> Option<&'static NatValue> {
    lookup_mut(k).map(|v| &*v)
}

/// The entry of the packet's own flow in direction `dir`, with its TCP
/// close state updated (see `ct::track_close`).
#[inline(always)]
fn lookup_pkt(p: &Pkt, dir: u8) -> Option<&'static NatValue> {
    let v = lookup_mut(&nat_key(p, dir))?;
    ct::track_close(p, &mut v.flags, NAT_F_CLOSING);
    Some(v)
}

/// The new source of an outgoing packet of an already translated flow.
#[inline(always)]
pub fn lookup_egress(p: &Pkt) -> Option<&'static NatValue> {
    lookup_pkt(p, NAT_DIR_EGRESS)
}

/// The original destination of a reply to a translated flow.
#[inline(always)]
pub fn lookup_ingress(p: &Pkt) -> Option<&'static NatValue> {
    lookup_pkt(p, NAT_DIR_INGRESS)
}

/// [`lookup_egress`] / [`lookup_ingress`] for a tuple that is not the
/// packet's own (ICMP errors), `dir` one of `NAT_DIR_*`.
#[inline(always)]
pub fn lookup_tuple(k: &CtKey, dir: u8) -> Option<&'static NatValue> {
    let mut k = *k;
    k.dir = dir;
    lookup(&k)
}

/// Drops a packet source NAT could not translate (no port, a failed
/// insert, a lost mapping), counted as `reason` and reported: sent as it
/// is, it would carry a pod's (or a NodePort client's) address where the
/// node's belongs.
#[inline(always)]
pub fn drop(ctx: &TcContext, reason: u32, source: u8) -> Result<i32, u32> {
    count(reason);
    events::report(ctx, reason, source);
    Ok(TC_ACT_SHOT)
}

/// Records the mapping of `p` to `nat_addr:port`: the INGRESS half
/// under `ingress` with `insert_flags` (`BPF_NOEXIST` claims a free port,
/// 0 takes over a finished mapping's), then the EGRESS half. False when
/// the INGRESS half could not be written; an EGRESS half that cannot be
/// written takes the INGRESS half back out.
#[inline(always)]
fn record(
    p: &Pkt,
    ingress: &CtKey,
    (nat_addr_be, port_be): (u32, u16),
    flags: u16,
    t: u64,
    insert_flags: u64,
) -> Result<bool, u32> {
    let nat = table(p.proto);
    let back = NatValue {
        last_seen_ns: t,
        addr_be: p.saddr_be,
        port_be: p.sport_be,
        flags,
    };
    if nat.insert(ingress, &back, insert_flags).is_err() {
        return Ok(false);
    }
    let fwd = NatValue {
        last_seen_ns: t,
        addr_be: nat_addr_be,
        port_be,
        flags,
    };
    if nat.insert(&nat_key(p, NAT_DIR_EGRESS), &fwd, 0).is_err() {
        let _ = nat.remove(ingress);
        return Err(stats::NAT_FAIL);
    }
    Ok(true)
}

/// Allocates `nat_addr:port` for the flow of `p` (as it leaves the node) and
/// records both entries. Returns the port (network order). Callers that
/// did not just look the egress entry up pass `reuse` so a mapping that
/// outlived its conntrack entry is reused rather than duplicated.
#[inline(always)]
pub fn alloc(
    p: &Pkt,
    nat_addr_be: u32,
    port_min: u16,
    port_max: u16,
    flags: u16,
    reuse: bool,
) -> Result<u16, u32> {
    if reuse && let Some(v) = lookup_egress(p) {
        return Ok(v.port_be);
    }
    let (lo, hi) = port_range(port_min, port_max);
    let span = hi - lo + 1;
    if span == 0 {
        // Unreachable (hi ≥ lo), but proves to LLVM that `%` cannot panic.
        return Err(stats::SNAT_NO_PORT);
    }
    let t = clock::now();
    let mut port = first_port(p, lo, span);
    let mut i = 0;
    while i < PORT_TRIES {
        let port_be = (port as u16).to_be();
        let ingress = reply_key(p, nat_addr_be, port_be);
        if record(p, &ingress, (nat_addr_be, port_be), flags, t, u64::from(BPF_NOEXIST))? {
            return Ok(port_be);
        }
        port = random_port(lo, span);
        i += 1;
    }
    if p.proto == proto::TCP && ct::is_pure_syn(p) {
        return reuse_finished(p, nat_addr_be, lo, span, flags, t);
    }
    Err(stats::SNAT_NO_PORT)
}

/// The first port [`alloc`] and [`reuse_finished`] try for `p`: the
/// client's own when it is in `lo..lo + span` (keeps ports stable, like
/// iptables MASQUERADE), else a random one. `span` is not 0.
#[inline(always)]
fn first_port(p: &Pkt, lo: u32, span: u32) -> u32 {
    let port = u32::from(u16::from_be(p.sport_be));
    if port >= lo && port - lo < span {
        port
    } else {
        random_port(lo, span)
    }
}

/// A random port of `lo..lo + span` (`span` not 0).
#[inline(always)]
fn random_port(lo: u32, span: u32) -> u32 {
    // SAFETY: plain helper call.
    lo + unsafe { bpf_get_prandom_u32() } % span
}

/// Time a finished mapping must have been idle before [`reuse_finished`]
/// hands its port to a new connection: past the last ACK of the close (and
/// a retransmitted FIN), as Cilium's and the agent's 10 s close timeout is
/// past it, but short enough that a client opening thousands of
/// connections a second to one backend finds ports between two GC passes.
const REUSE_IDLE_NS: u64 = 1_000_000_000;

/// The last resort of [`alloc`] for a new TCP connection (pure SYN) when
/// every port it tried is some mapping's: take over the port of a mapping
/// whose connection is over, as netfilter reuses the tuple of a connection
/// in TIME_WAIT or CLOSE (`nf_nat_used_tuple_harder`). Without it, a client
/// that opens more connections to one backend than the range holds within
/// one GC period (closed mappings stay until the agent's close timeout)
/// finds no port: SYNs dropped, each costing the client a 1 s retransmit.
///
/// Over means: both halves saw a FIN or RST (`NAT_F_CLOSING`; the EGRESS
/// half may also be gone or belong to a newer mapping of its tuple), both
/// idle [`REUSE_IDLE_NS`], and not a host flow's reservation (the host's
/// own sockets keep their TIME_WAIT tuples). Candidates as in [`alloc`]:
/// the client's own port first, then random ones. A peer still holding
/// the tuple in TIME_WAIT takes the new SYN when its timestamp is newer;
/// otherwise it answers with an ACK, which the client resets before it
/// resends the SYN (Linux: within milliseconds). The old EGRESS half and,
/// for a NodePort flow, its conntrack entries are removed, as the agent's
/// GC removes them; a late packet of the old flow finds no mapping, as
/// after the GC. Two CPUs taking over one tuple at once: the later write
/// wins, the other connection's SYN-ACK goes astray and its client
/// retries.
#[inline(always)]
fn reuse_finished(
    p: &Pkt,
    nat_addr_be: u32,
    lo: u32,
    span: u32,
    flags: u16,
    t: u64,
) -> Result<u16, u32> {
    let nat = table(p.proto);
    let mut port = first_port(p, lo, span);
    let mut i = 0;
    while i < PORT_TRIES {
        let port_be = (port as u16).to_be();
        let ingress = reply_key(p, nat_addr_be, port_be);
        // SAFETY: read only, and without refreshing `last_seen`: looking
        // must not keep a finished mapping alive.
        if let Some(held) = unsafe { nat.get(&ingress) }
            && is_over(held, t)
        {
            let old = CtKey {
                saddr_be: held.addr_be,
                daddr_be: p.daddr_be,
                sport_be: held.port_be,
                dport_be: p.dport_be,
                proto: p.proto,
                dir: NAT_DIR_EGRESS,
                _pad: 0,
            };
            // SAFETY: as above.
            let old_fwd = unsafe { nat.get(&old) }
                .map(|v| is_identity(v, nat_addr_be, port_be).then_some(is_over(v, t)));
            // The EGRESS half is this mapping's and still live: not over.
            if old_fwd != Some(Some(false)) {
                if old_fwd == Some(Some(true)) {
                    let _ = nat.remove(&old);
                }
                if held.flags & NAT_F_NODEPORT != 0 {
                    forget_nodeport_flow(p, held);
                }
                if !record(p, &ingress, (nat_addr_be, port_be), flags, t, 0)? {
                    return Err(stats::NAT_FAIL);
                }
                return Ok(port_be);
            }
        }
        port = random_port(lo, span);
        i += 1;
    }
    Err(stats::SNAT_NO_PORT)
}

/// Removes the conntrack entries of the finished NodePort flow whose
/// mapping [`reuse_finished`] takes (client `held` → backend `p.daddr`),
/// as the agent's GC removes both in one pass: a new SYN on the old
/// client's tuple must start a new flow (and get a mapping), not continue
/// the old one without its mapping.
#[inline(always)]
fn forget_nodeport_flow(p: &Pkt, held: &NatValue) {
    let rev = CtKey {
        saddr_be: p.daddr_be,
        daddr_be: held.addr_be,
        sport_be: p.dport_be,
        dport_be: held.port_be,
        proto: p.proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    };
    // SAFETY: read only; the values are copied before the removals.
    let Some((flags, vip_be, vport_be)) =
        unsafe { CT4.get(&rev) }.map(|e| (e.flags, e.vip_be, e.vport_be))
    else {
        return;
    };
    if flags & (CT_F_REPLY | CT_F_NODEPORT) != CT_F_REPLY | CT_F_NODEPORT {
        return;
    }
    let orig = CtKey {
        saddr_be: held.addr_be,
        daddr_be: vip_be,
        sport_be: held.port_be,
        dport_be: vport_be,
        proto: p.proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    };
    let _ = CT4.remove(&orig);
    let _ = CT4.remove(&rev);
}

/// A half of a translated (not host) TCP mapping that saw a FIN or RST
/// and has been idle [`REUSE_IDLE_NS`] at `now`.
#[inline(always)]
fn is_over(v: &NatValue, now: u64) -> bool {
    v.flags & (NAT_F_CLOSING | NAT_F_HOST) == NAT_F_CLOSING
        && now.saturating_sub(v.last_seen_ns) >= REUSE_IDLE_NS
}

/// The SNAT port range `min..=max` (host order) as configured, or the
/// kernel's default ephemeral range when unset or inverted.
#[inline(always)]
fn port_range(port_min: u16, port_max: u16) -> (u32, u32) {
    if port_min == 0 || port_max < port_min {
        (32_768, 60_999)
    } else {
        (u32::from(port_min), u32::from(port_max))
    }
}

/// The INGRESS key of `p`'s flow once its source is `addr_be:port_be`:
/// the tuple its replies carry.
#[inline(always)]
fn reply_key(p: &Pkt, addr_be: u32, port_be: u16) -> CtKey {
    CtKey {
        saddr_be: p.daddr_be,
        daddr_be: addr_be,
        sport_be: p.dport_be,
        dport_be: port_be,
        proto: p.proto,
        dir: NAT_DIR_INGRESS,
        _pad: 0,
    }
}

/// An entry whose translation changes nothing for `(addr, port)`: the
/// identity pair of a host flow (`track_host`).
#[inline(always)]
pub fn is_identity(n: &NatValue, addr_be: u32, port_be: u16) -> bool {
    n.addr_be == addr_be && n.port_be == port_be
}

/// Records `p`, a TCP or UDP packet the node itself sends (source = the
/// node address, no NAT or conntrack entry of its own), when its source
/// port is one `alloc` could hand out: reserves its reply tuple
/// (identity pair, `NAT_F_HOST`) so no mapping takes it. Called only on
/// a miss of the packet's EGRESS entry, which the pair's EGRESS half then
/// answers for every later packet (that lookup happens anyway), so an
/// established host flow costs nothing more per packet.
///
/// TCP is recorded from any packet but a FIN or RST, not only the SYN:
/// connections the host opened before the programs were attached (the
/// kubelet's watch) get their entry from their next segment (an ACK).
/// When the tuple is already a translated flow's (a pod's masquerade took
/// it first): a SYN or a UDP datagram moves the host flow to a free port
/// (`Some(new source port)`, counted `nat_host_remap`); a later TCP
/// segment cannot be moved without breaking its connection and leaves as
/// it is (`nat_host_clash`), as does a flow with no free port.
#[inline(always)]
pub fn track_host(p: &Pkt, port_min: u16, port_max: u16) -> Option<u16> {
    let (lo, hi) = port_range(port_min, port_max);
    let sport = u32::from(u16::from_be(p.sport_be));
    if sport < lo || sport > hi {
        return None;
    }
    let tcp = p.proto == proto::TCP;
    if tcp && p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    let nat = table(p.proto);
    let own = NatValue {
        last_seen_ns: clock::now(),
        addr_be: p.saddr_be,
        port_be: p.sport_be,
        flags: NAT_F_HOST,
    };
    let ingress = reply_key(p, p.saddr_be, p.sport_be);
    if nat.insert(&ingress, &own, u64::from(BPF_NOEXIST)).is_ok() {
        count(stats::NAT_HOST_NEW);
    } else {
        let Some(held) = lookup(&ingress) else {
            // Deleted in between: the next packet records it.
            return None;
        };
        if held.flags & NAT_F_HOST == 0 || !is_identity(held, p.saddr_be, p.sport_be) {
            // Another flow's reply tuple.
            if (!tcp || ct::is_pure_syn(p))
                && let Ok(port_be) = alloc(p, p.saddr_be, port_min, port_max, NAT_F_HOST, false)
            {
                count(stats::NAT_HOST_REMAP);
                return Some(port_be);
            }
            count(stats::NAT_HOST_CLASH);
            return None;
        }
        // Our own reservation, whose EGRESS half expired alone.
    }
    // Best effort: without it the next packet records the flow again.
    let _ = nat.insert(&nat_key(p, NAT_DIR_EGRESS), &own, 0);
    None
}
