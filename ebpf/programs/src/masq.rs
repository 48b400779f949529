//! Pod → outside masquerade (source := node address), only for flows the
//! pod originates.
//!
//! iptables' MASQUERADE never rewrites a reply because conntrack knows the
//! reply direction. Our NAT map only knows flows it translated, so two
//! rules keep replies of flows that came *into* a pod untouched (a node or
//! an outside client talking to a pod IP expects the answer from that IP):
//!
//! * `rt_from_net` records every non-service flow from a source we would
//!   masquerade towards into a local pod as an inbound (`CT_F_INBOUND`) entry keyed
//!   by the pod's reply; `rt_to_net` never masquerades a packet matching
//!   one (UDP needs this; TCP gets it too).
//! * TCP: only a pure SYN may create a new mapping. A SYN-ACK, an ACK of a
//!   flow whose mapping was evicted, a RST are never rewritten to the node
//!   address (the peer would reset or ignore them anyway, and a reply of an
//!   inbound flow must keep the pod address).
//!
//! The recording happens on the uplink's ingress, not on a to-pod program:
//! a flow from the node itself (node → local pod) is answered by local
//! delivery and never reaches the uplink egress where masquerade happens.

use aya_ebpf::maps::lpm_trie::Key;
use riptide_common::{CFG_F_MASQUERADE, CT_F_INBOUND, Config, CtValue, NodeKey, proto, stats};

use crate::{
    clock, ct,
    maps::{CT4, NODE4, count},
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, in_cidr},
};

/// Masquerade is configured (flag and a node address to use).
#[inline(always)]
pub fn enabled(cfg: &Config) -> bool {
    cfg.flags & CFG_F_MASQUERADE != 0 && cfg.node_ip_be != 0
}

/// A pod packet to `peer` would be masqueraded: `peer` is outside the
/// cluster CIDR, the no-masquerade range and every remote pod CIDR.
#[inline(always)]
pub fn applies_to(cfg: &Config, peer_be: u32) -> bool {
    !in_cidr(peer_be, cfg.cluster_cidr_be, cfg.cluster_cidr_len)
        && !in_cidr(peer_be, cfg.nomasq_cidr_be, cfg.nomasq_cidr_len)
        && NODE4
            .get(Key::new(32, NodeKey { addr_be: peer_be }))
            .is_none()
}

/// TCP SYN without ACK/RST/FIN: the only TCP packet that opens a flow.
#[inline(always)]
pub fn is_pure_syn(p: &Pkt) -> bool {
    p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Records (or refreshes) the inbound flow of `p`, a packet from outside
/// the node for a local pod, keyed by the pod's reply. Best effort: without
/// the entry a UDP reply would be masqueraded, but failing the packet would
/// be worse.
#[inline(always)]
pub fn track_inbound(p: &Pkt) {
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return;
    }
    let key = ct::reverse(p);
    if let Some(v) = CT4.get_ptr_mut(&key) {
        // SAFETY: map value pointer; a racing refresh is harmless.
        clock::touch(unsafe { &mut (*v).last_seen_ns });
        return;
    }
    let v = CtValue {
        last_seen_ns: clock::now(),
        flags: CT_F_INBOUND,
        ..CtValue::default()
    };
    if CT4.insert(&key, &v, 0).is_ok() {
        count(stats::INBOUND_NEW);
    }
}

/// Whether `p` (leaving the node from a local pod, no mapping yet) may get
/// a new masquerade mapping; `inbound`: its tuple has an inbound entry
/// (found by the caller's conntrack lookup, which also refreshed it).
/// Counts the reason when not.
#[inline(always)]
pub fn may_create_mapping(p: &Pkt, inbound: bool) -> bool {
    if inbound {
        count(stats::MASQ_SKIP_INBOUND);
        return false;
    }
    if p.proto == proto::TCP && !is_pure_syn(p) {
        count(stats::MASQ_SKIP_NOT_SYN);
        return false;
    }
    true
}
