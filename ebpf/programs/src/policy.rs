//! NetworkPolicy: the verdict for the first packet of a flow.
//!
//! Cilium's shape with node-local identities: `rt_ipcache4_v1` gives the
//! peer's identity (and the identity of the longest ipBlock prefix holding
//! it), `rt_policy4_v1` holds the allow rules of each local endpoint keyed
//! by (endpoint, peer identity, direction, protocol, port prefix), and
//! `rt_polep4_v1` says which local pods are isolated (absent = allow all;
//! asked only when the pod's slot in `rt_polidx4_v1` counts an entry, so
//! the packets of pods no policy selects skip the hash lookup).
//! The common cases have exact-match hashes in front of the two tries:
//! `rt_ipcache4x_v1` holds the `/32`s (every pod and node address) and
//! `rt_policy4x_v1` the single-port rules; the tries keep the shorter
//! prefixes (ipBlocks, the world) and the port ranges and any-port or
//! any-protocol rules. An endpoint whose rules of a direction are all
//! single-port (`PE_F_EXACT_*`) never asks the policy trie.
//!
//! Only new flows are judged, and only when the node has some policy state
//! (`CFG_F_POLICY`). A flow is judged after Service translation, on the
//! backend's address and port: egress of the source when it is a local pod
//! with state, ingress of the destination when it is one. When some side
//! has state and the flow is allowed, the caller records it in conntrack
//! (`CT_F_POLICY` entries: one for both directions of a TCP flow, one per
//! tuple otherwise; or the load-balancer's entries), so every later packet
//! is a conntrack hit that never comes here: the established path pays
//! nothing for policy.
//!
//! The replies of a TCP flow recorded with one entry miss conntrack under
//! their own tuple. The entry under their reverse tuple is asked for only
//! where policy state may be: before the Service probe when the
//! `rt_polidx4_v1` slot of the pod whose veth or uplink the packet
//! crosses counts an entry ([`before_probe`]), by [`judge`] once it found
//! the other side's endpoint state. Such a reply costs that one conntrack
//! lookup on the pod's side, and only the first
//! [`CT_BIDIR_REPLIES`](riptide_common::CT_BIDIR_REPLIES) of
//! a connection do: then the reply tuple gets its own entry
//! ([`ct::answers_policy`]); a flow between pods no policy selects never
//! pays for it (the endpoint lookups are the ones its verdict makes
//! anyway).
//!
//! Always allowed: the node itself (identity `HOST`, the node address, the
//! hairpin address — kubelet probes, host processes) and a pod reaching
//! itself. Kubernetes policy has only allows; ipBlock `except` works
//! through the ipcache (the longer except prefix has an identity no rule
//! names). `PE_F_FAIL_CLOSED` denies everything else. In audit mode a
//! would-be denial is counted and reported but passes.

use aya_ebpf::{bindings::TC_ACT_SHOT, maps::lpm_trie::Key, programs::TcContext};
use riptide_common::{
    BackendValue, CFG_F_POLICY, CT_DIR_ANY, Config, CtKey, DropEvent, EndpointKey, IpcacheKey,
    IpcacheValue, PE_F_ANY_IN, PE_F_ANY_OUT, PE_F_EXACT_IN, PE_F_EXACT_OUT,
    PE_F_AUDIT_IN, PE_F_AUDIT_OUT, PE_F_FAIL_CLOSED, PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT,
    POL_DIR_EGRESS, POL_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyEndpointValue, PolicyKey, identity,
    polidx_slot, proto, stats,
};

use crate::{
    ct, events,
    maps::{IPCACHE4, IPCACHE4_EXACT, POLEP4, POLICY4, POLICY4_EXACT, POLIDX4, config, count},
    parse::{IP_OFF, IpHdr, L4_OFF, Pkt, Ports, ptr_at},
};

/// The node has policy state: new flows must be judged.
#[inline(always)]
pub fn enabled(cfg: &Config) -> bool {
    cfg.flags & CFG_F_POLICY != 0
}

/// No side of the flow has policy state: nothing judged, nothing recorded.
pub const OPEN: u32 = 0;
/// Allowed, and some side has policy state: record the flow.
pub const ALLOW: u32 = 1;
/// Denied: drop the packet.
pub const DENY: u32 = 2;
/// A reply of a TCP flow recorded with one entry: pass, record nothing.
pub const REPLY: u32 = 3;
/// (From [`before_probe`]) the side must be judged.
pub const JUDGE: u32 = 4;

/// A new flow as policy sees it (after Service translation).
#[repr(C)]
pub struct Flow {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// Judge the source's egress (it may be a local pod).
    pub egress: u8,
    /// Judge the destination's ingress (it may be a local pod).
    pub ingress: u8,
    /// `EV_SRC_*` for events.
    pub source: u8,
    pub ifindex: u32,
    pub tcp_flags: u8,
    /// The tuple is the packet's own (untranslated): it may be the reply
    /// of a flow recorded with one entry.
    pub untranslated: u8,
    pub _pad: u16,
}

impl Flow {
    /// The flow of `p` as it is (no translation).
    #[inline(always)]
    pub fn of(ctx: &TcContext, p: &Pkt, egress: bool, ingress: bool, source: u8) -> Self {
        Self {
            saddr_be: p.saddr_be,
            daddr_be: p.daddr_be,
            sport_be: p.sport_be,
            dport_be: p.dport_be,
            proto: p.proto,
            egress: u8::from(egress),
            ingress: u8::from(ingress),
            source,
            // SAFETY: reading a field of the context the program was given.
            ifindex: unsafe { (*ctx.skb.skb).ifindex },
            tcp_flags: p.tcp_flags,
            untranslated: 1,
            _pad: 0,
        }
    }

    /// The flow as it reaches the chosen backend `be` of a Service.
    #[inline(always)]
    pub fn to_backend(mut self, be: &BackendValue) -> Self {
        self.daddr_be = be.addr_be;
        self.dport_be = be.port_be;
        self.untranslated = 0;
        self
    }
}

/// Judges the flow `f`, whose own tuple conntrack does not know:
/// [`OPEN`], [`ALLOW`], [`DENY`] or [`REPLY`]. Counts the verdict of every
/// isolated direction and reports denials (and audited would-be denials)
/// as events.
///
/// A BPF-to-BPF call, not inlined: the programs judge flows at several
/// places, and one copy of the lookups keeps them small for the verifier.
#[inline(never)]
pub fn judge(f: &Flow) -> u32 {
    let mut verdict = OPEN;
    if f.egress != 0
        && let Some(ep) = endpoint(f.saddr_be)
    {
        if answers(f) {
            return REPLY;
        }
        verdict = ALLOW;
        if !side(f, &ep, true) {
            return DENY;
        }
    }
    if f.ingress != 0
        && let Some(ep) = endpoint(f.daddr_be)
    {
        if verdict == OPEN && answers(f) {
            return REPLY;
        }
        verdict = ALLOW;
        if !side(f, &ep, false) {
            return DENY;
        }
    }
    verdict
}

/// Whether `f` is a TCP reply of a flow recorded with one entry (see
/// [`ct::answers_policy`]); a SYN opens a flow and never asks.
#[inline(always)]
fn answers(f: &Flow) -> bool {
    if f.untranslated == 0
        || f.proto != proto::TCP
        || ct::pure_syn(f.tcp_flags)
    {
        return false;
    }
    // The flow's entry is under the reverse tuple.
    let k = CtKey {
        saddr_be: f.daddr_be,
        daddr_be: f.saddr_be,
        sport_be: f.dport_be,
        dport_be: f.sport_be,
        proto: f.proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    };
    ct::answers_policy(&k, f.tcp_flags)
}

/// The policy state of the local pod `addr`, copied out.
#[inline(always)]
fn endpoint(addr_be: u32) -> Option<PolicyEndpointValue> {
    if !may_have_state(addr_be) {
        return None;
    }
    // SAFETY: copied out at once.
    unsafe { POLEP4.get(&EndpointKey { addr_be }) }.copied()
}

/// Whether `addr` may have an entry in `rt_polep4_v1`: false only when
/// its `rt_polidx4_v1` slot counts none (an array read the verifier
/// inlines, where the hash lookup is a call). The agent counts an entry
/// before writing it, so an isolated pod is never skipped.
#[inline(always)]
fn may_have_state(addr_be: u32) -> bool {
    POLIDX4.get(polidx_slot(addr_be)).is_none_or(|n| *n != 0)
}

/// Whether one direction of `f` passes for the endpoint `ep` (the source
/// for egress, the destination for ingress), counted and reported.
#[inline(always)]
fn side(f: &Flow, ep: &PolicyEndpointValue, egress: bool) -> bool {
    let (isolated, audit, any, exact, dir, me, peer) = if egress {
        (
            PE_F_ISOLATED_OUT,
            PE_F_AUDIT_OUT,
            PE_F_ANY_OUT,
            PE_F_EXACT_OUT,
            POL_DIR_EGRESS,
            f.saddr_be,
            f.daddr_be,
        )
    } else {
        (
            PE_F_ISOLATED_IN,
            PE_F_AUDIT_IN,
            PE_F_ANY_IN,
            PE_F_EXACT_IN,
            POL_DIR_INGRESS,
            f.daddr_be,
            f.saddr_be,
        )
    };
    if ep.flags & isolated == 0 {
        return true;
    }
    let dir = Dir {
        dir,
        any: ep.flags & any != 0,
        trie: ep.flags & exact == 0,
    };
    if allowed(f, ep, &dir, me, peer) {
        count(if egress {
            stats::POLICY_ALLOW_OUT
        } else {
            stats::POLICY_ALLOW_IN
        });
        return true;
    }
    let audited = ep.flags & audit != 0;
    let reason = match (egress, audited) {
        (true, true) => stats::POLICY_AUDIT_OUT,
        (true, false) => stats::POLICY_DENY_OUT,
        (false, true) => stats::POLICY_AUDIT_IN,
        (false, false) => stats::POLICY_DENY_IN,
    };
    count(reason);
    events::emit(DropEvent {
        reason,
        ifindex: f.ifindex,
        saddr_be: f.saddr_be,
        daddr_be: f.daddr_be,
        sport_be: f.sport_be,
        dport_be: f.dport_be,
        proto: f.proto,
        source: f.source,
        ..DropEvent::default()
    });
    audited
}

/// One direction of an endpoint's rules.
struct Dir {
    /// `POL_DIR_*`.
    dir: u8,
    /// Some rule allows every peer.
    any: bool,
    /// Some rule is not a single-port one: ask the trie too.
    trie: bool,
}

/// Whether some rule of `ep` in direction `d` allows `peer`.
#[inline(always)]
fn allowed(
    f: &Flow,
    ep: &PolicyEndpointValue,
    d: &Dir,
    me: u32,
    peer: u32,
) -> bool {
    // A pod reaching itself (directly or through a Service), the node
    // (kubelet probes) and hairpin flows always pass, whatever the ipcache
    // holds. (The config is looked up here, an inlined array access,
    // rather than kept live across `judge`'s lookups: its frame counts
    // against the callers' whole call chain.)
    let cfg = config();
    if peer == me
        || (cfg.node_ip_be != 0 && peer == cfg.node_ip_be)
        || (cfg.hairpin_ip_be != 0 && peer == cfg.hairpin_ip_be)
    {
        return true;
    }
    let id = ipcache(peer);
    // An address the ipcache does not know (no `0.0.0.0/0` entry yet) is
    // the outside world.
    let (identity, cidr_identity) =
        id.map_or((identity::WORLD, 0), |v| (v.identity, v.cidr_identity));
    if identity == identity::HOST {
        return true;
    }
    if ep.flags & PE_F_FAIL_CLOSED != 0 {
        return false;
    }
    let mut k = PolicyKey {
        ep_id_be: ep.ep_id.to_be(),
        identity_be: identity.to_be(),
        dir: d.dir,
        proto: f.proto,
        port_be: f.dport_be,
    };
    if rule(&k, d.trie) {
        return true;
    }
    if cidr_identity != 0 {
        k.identity_be = cidr_identity.to_be();
        if rule(&k, d.trie) {
            return true;
        }
    }
    if d.any {
        k.identity_be = identity::ANY.to_be();
        return rule(&k, d.trie);
    }
    false
}

/// The identities of `addr_be`: its own `/32` entry, else the longest
/// prefix holding it.
#[inline(always)]
fn ipcache(addr_be: u32) -> Option<IpcacheValue> {
    let k = IpcacheKey { addr_be };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { IPCACHE4_EXACT.get(&k) } {
        return Some(*v);
    }
    IPCACHE4.get(Key::new(32, k)).copied()
}

/// Whether a rule allows `k`: a single-port rule, or (`trie`) a range or
/// any-port or any-protocol one.
#[inline(always)]
fn rule(k: &PolicyKey, trie: bool) -> bool {
    // SAFETY: only whether the entry exists is read.
    unsafe { POLICY4_EXACT.get(k) }.is_some()
        || (trie && POLICY4.get(Key::new(POLICY_PREFIX_FULL, *k)).is_some())
}

/// Judges the packet `p`, not translated and unknown to conntrack under
/// its own tuple: `true` when it is denied (the caller drops it).
/// `ingress`: the destination may be a local pod (a caller that knows it
/// is not saves the lookup). An allowed new flow with policy state on some
/// side is recorded in conntrack ([`ct::create_policy`]), so its later
/// packets and its replies pass without a verdict; `inbound`: masquerade
/// must not touch its replies.
#[inline(always)]
pub fn deny_plain(
    ctx: &TcContext,
    p: &Pkt,
    egress: bool,
    ingress: bool,
    source: u8,
    inbound: bool,
) -> bool {
    let f = Flow::of(ctx, p, egress, ingress, source);
    match judge(&f) {
        DENY => true,
        ALLOW => {
            ct::create_policy(&ct::key(p), inbound);
            false
        }
        _ => false,
    }
}

/// Before the Service probe, for a packet `p` whose own tuple conntrack
/// does not know, and the local pod `addr_be` on its side (the source on
/// a pod's veth, the destination on the uplink): [`REPLY`] when `p`
/// answers a TCP flow recorded with one entry, [`OPEN`] when that pod has
/// no policy state (no verdict needed on its side), else [`JUDGE`]. Only
/// non-SYN TCP packets ask, and only when the pod's `rt_polidx4_v1` slot
/// counts an entry. Such a slot is the pod's own (a node's pod CIDR fits
/// in the slots), so conntrack is asked before the endpoint hash: a reply
/// costs one conntrack lookup, and the endpoint lookup is left to what
/// is not a reply (a pod sharing a slot with an isolated one gets
/// [`OPEN`] from it).
#[inline(always)]
pub fn before_probe(p: &Pkt, addr_be: u32) -> u32 {
    if p.proto != proto::TCP || ct::is_pure_syn(p) {
        return JUDGE;
    }
    if !may_have_state(addr_be) {
        return OPEN;
    }
    if ct::answers_policy(&ct::reverse(p), p.tcp_flags) {
        return REPLY;
    }
    // SAFETY: only whether the entry exists is read.
    if unsafe { POLEP4.get(&EndpointKey { addr_be }) }.is_none() {
        return OPEN;
    }
    JUDGE
}

/// The drop verdict of a denied flow.
#[inline(always)]
pub fn drop() -> Result<i32, u32> {
    Ok(TC_ACT_SHOT)
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
const IPPROTO_SCTP: u8 = 132;

/// Policy for a packet without TCP/UDP ports (ICMP, SCTP, other
/// protocols, fragments): `true` when it is denied.
///
/// ICMP errors pass (they concern a flow that was judged), and so do
/// fragments after the first (the first, which carries the ports, was
/// judged). SCTP is judged on its ports (the first four bytes of its
/// header, like TCP and UDP); anything else (ICMP echo, …) with port 0,
/// which only rules for every port of the protocol allow. Conntrack
/// remembers allowed flows as for TCP/UDP (ICMP by address pair).
#[inline(always)]
pub fn deny_other(ctx: &TcContext, p: &Pkt, egress: bool, source: u8, inbound: bool) -> bool {
    let mut q = *p;
    if p.fragment {
        let Some(ip) = ptr_at::<IpHdr>(ctx, IP_OFF) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        if u16::from_be(unsafe { (*ip).frag_off }) & 0x1fff != 0 {
            return false;
        }
    }
    if p.proto == proto::ICMP {
        let ty: u8 = if p.l4_off == L4_OFF {
            match ptr_at::<u8>(ctx, L4_OFF) {
                // SAFETY: bounds checked by ptr_at.
                Some(t) => unsafe { *t },
                None => return false,
            }
        } else {
            match ctx.load(p.l4_off) {
                Ok(t) => t,
                Err(_) => return false,
            }
        };
        if ty == ICMP_DEST_UNREACH || ty == ICMP_TIME_EXCEEDED || ty == ICMP_PARAMETERPROB {
            return false;
        }
    } else if p.proto == IPPROTO_SCTP || p.proto == proto::TCP || p.proto == proto::UDP {
        // SCTP, or the first fragment of a TCP/UDP datagram (the parser
        // read its ports already).
        if p.proto == IPPROTO_SCTP {
            let ports = if p.l4_off == L4_OFF {
                match ptr_at::<Ports>(ctx, L4_OFF) {
                    // SAFETY: bounds checked by ptr_at.
                    Some(pp) => unsafe { [(*pp).source, (*pp).dest] },
                    None => return false,
                }
            } else {
                match ctx.load::<[u16; 2]>(p.l4_off) {
                    Ok(pp) => pp,
                    Err(_) => return false,
                }
            };
            q.sport_be = ports[0];
            q.dport_be = ports[1];
        }
    }
    if ct::lookup(&q).is_some() {
        return false;
    }
    deny_plain(ctx, &q, egress, true, source, inbound)
}
