//! Pod → outside masquerade (source := node address), only for flows the
//! pod originates.
//!
//! iptables' MASQUERADE never rewrites a reply because conntrack knows the
//! reply direction. Our NAT map only knows flows it translated, so two
//! rules keep replies of flows that came *into* a pod untouched (a node or
//! an outside client talking to a pod IP expects the answer from that IP):
//!
//! * `rt_from_net` records every non-service flow from a source we would
//!   masquerade towards into a local pod as an inbound marker
//!   (`CT_F_INBOUND`, in `rt_ctany4_v3` whatever the protocol, so inbound
//!   floods never evict TCP connections) keyed by the pod's reply;
//!   `rt_to_net` never masquerades a packet matching one.
//! * TCP: only a pure SYN may create a new mapping. A SYN-ACK without a
//!   mapping answers an inbound connection and passes untouched. Any other
//!   TCP packet without a mapping and without a marker belongs to a flow
//!   whose mapping was evicted or expired: it is dropped and counted
//!   (`masq_lost_mapping`), never sent with the pod's address (the peer
//!   would reset it anyway).
//! * No free node port for a new mapping: dropped and counted
//!   (`masq_no_port`), never sent with the pod's address. Ports the
//!   node's own sockets use towards the same peer are never free
//!   (`nat::track_host`): a mapping on a host socket's tuple would hand
//!   that connection's replies to the pod.
//!
//! The recording happens on the uplink's ingress, not on a to-pod program:
//! a flow from the node itself (node → local pod) is answered by local
//! delivery and never reaches the uplink egress where masquerade happens.

use aya_ebpf::maps::lpm_trie::Key;
use riptide_common::{CFG_F_MASQUERADE, Config, NodeKey, proto, stats};

use crate::{
    ct,
    maps::{NODE4, count},
    parse::{Pkt, TCP_ACK, TCP_SYN, in_cidr},
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

/// Records (or refreshes) the inbound flow of `p`, a packet from outside
/// the node for a local pod, keyed by the pod's reply. Best effort: without
/// the entry a UDP reply would be masqueraded, but failing the packet would
/// be worse.
#[inline(always)]
pub fn track_inbound(p: &Pkt) {
    if p.proto != proto::TCP && p.proto != proto::UDP {
        return;
    }
    if ct::mark_inbound(p) {
        count(stats::INBOUND_NEW);
    }
}

/// What masquerade does with a pod's packet that has no mapping.
pub enum Verdict {
    /// Allocate a mapping and rewrite the source.
    Create,
    /// Leave the packet as it is (a reply of an inbound flow).
    Leave,
    /// Drop it, counted with this reason (a TCP flow whose mapping is lost).
    Drop(u32),
}

/// What to do with `p` (leaving the node from a local pod towards a peer
/// it would be masqueraded to, no mapping); `inbound`: the packet's own
/// conntrack lookup found an inbound entry (and refreshed it). Counts the
/// reason when the packet is left alone.
#[inline(always)]
pub fn decide(p: &Pkt, inbound: bool) -> Verdict {
    if inbound {
        count(stats::MASQ_SKIP_INBOUND);
        return Verdict::Leave;
    }
    if p.proto != proto::TCP || ct::is_pure_syn(p) {
        return Verdict::Create;
    }
    // TCP markers live in the other table than TCP flows: one more lookup,
    // paid only by TCP packets without a mapping.
    if ct::tcp_inbound(p) {
        count(stats::MASQ_SKIP_INBOUND);
        return Verdict::Leave;
    }
    if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        // Accepting a connection whose SYN left no marker (it did not come
        // through the uplink): an answer, never a pod-originated flow.
        count(stats::MASQ_SKIP_NOT_SYN);
        return Verdict::Leave;
    }
    Verdict::Drop(stats::MASQ_LOST_MAPPING)
}
