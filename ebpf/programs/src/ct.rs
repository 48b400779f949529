//! Connection tracking for per-packet LB (LRU): `rt_ct4_v3` for TCP,
//! `rt_ctany4_v3` for every other protocol and for inbound markers, so
//! nothing a flood can be made of cheaply (spoofed UDP, ICMP, new flows
//! into a pod that only need a marker) evicts an established TCP
//! connection (Cilium's `ct4_global` / `ct_any4_global` split).
//!
//! A translated flow has two entries: the forward one keyed by the client's
//! original tuple (client → frontend) pins the backend; the reply one
//! ([`CT_F_REPLY`]) keyed by the reply tuple (backend → client, or → the
//! SNAT address for hairpin flows) tells the reply path which frontend to
//! restore as source and which client address to restore as destination.
//! Both live under the same key `dir` ([`CT_DIR_ANY`]), so a packet's own
//! tuple is looked up exactly once and the entry says what it is (keying
//! the roles apart would cost every forward packet a miss first).
//!
//! An inbound marker ([`CT_F_INBOUND`] alone, see `masq`) always goes to
//! the other table, whatever the protocol: it keeps masquerade off the
//! replies of a flow and nothing else depends on it.
//!
//! A non-service TCP flow NetworkPolicy allowed ([`CT_F_POLICY`], see
//! `policy`) has one entry under its original tuple carrying nothing but
//! the flags ([`CT_F_BIDIR`]): its packets hit it with their own tuple,
//! its replies, after their own tuple missed and policy state was found
//! on some side, with the reverse one ([`answers_policy`], asked by
//! `policy::judge`; a SYN never asks), so neither is judged again and
//! a new allowed connection pays one LRU insert, not two. A connection
//! that goes on past [`CT_BIDIR_REPLIES`] replies gets the second entry
//! then ([`CT_F_POLICY_REV`], under the reply tuple), so its later replies
//! cost one lookup as its forward packets do; a short one (a request and
//! its answer) never pays that insert. Other protocols
//! have no SYN to tell a new flow from a reply without that second lookup
//! on every first packet, and flows whose replies masquerade must leave
//! alone need a [`CT_F_INBOUND`] entry under the reply's own tuple (which
//! `masq` looks up): both keep an entry per direction.
//!
//! Entries refresh `last_seen_ns` with the coarse clock (no TSC read per
//! packet, only a store when the tick changed; see [`crate::clock`]); LRU eviction and the
//! agent's GC remove idle ones.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use riptide_common::{
    BE_F_LOCAL, BackendValue, CT_BIDIR_REPLIES, CT_DIR_ANY, CT_F_BE_LOCAL, CT_F_BIDIR,
    CT_F_CLOSING, CT_F_DSR, CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_INBOUND, CT_F_NODEPORT, CT_F_POLICY,
    CT_F_POLICY_REV, CT_F_REPLY, CtKey, CtValue, proto, stats,
};

use crate::{
    clock::{now, touch},
    lb::Chosen,
    maps::{CT_ANY4, CT4, count},
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The table of protocol `proto`.
#[inline(always)]
fn table(proto: u8) -> &'static LruHashMap<CtKey, CtValue> {
    if proto == proto::TCP { &CT4 } else { &CT_ANY4 }
}

/// TCP SYN without ACK/RST/FIN: the only TCP packet that opens a flow.
#[inline(always)]
pub fn is_pure_syn(p: &Pkt) -> bool {
    pure_syn(p.tcp_flags)
}

/// [`is_pure_syn`] of the TCP flags `tcp_flags`.
#[inline(always)]
pub fn pure_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Counts a new load-balanced flow whose packet is TCP but not a SYN: its
/// conntrack entry was evicted or expired while the connection lived
/// (`ct_lost_tcp`, the reason operators alert on for a too small table).
#[inline(always)]
pub fn note_new_flow(p: &Pkt) {
    if p.proto == proto::TCP && !is_pure_syn(p) {
        count(stats::CT_LOST_TCP);
    }
}

#[inline(always)]
pub fn key(p: &Pkt) -> CtKey {
    CtKey {
        saddr_be: p.saddr_be,
        daddr_be: p.daddr_be,
        sport_be: p.sport_be,
        dport_be: p.dport_be,
        proto: p.proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    }
}

/// An entry found for a packet, refreshed.
pub struct Hit {
    pub e: &'static mut CtValue,
    /// First packet of the flow in this clock tick (see [`fwd_backend`]).
    pub ticked: bool,
}

/// The entry of `k`, refreshed.
#[inline(always)]
pub fn lookup_key(k: &CtKey) -> Option<Hit> {
    // Two call sites, one per map, so the kernel can inline each lookup
    // (a map pointer that depends on the path is called through the
    // helper).
    let ptr = if k.proto == proto::TCP {
        CT4.get_ptr_mut(k)?
    } else {
        CT_ANY4.get_ptr_mut(k)?
    };
    // SAFETY: map value pointer, valid for this program run; racing
    // refreshes of last_seen are harmless.
    let e = unsafe { &mut *ptr };
    let ticked = touch(&mut e.last_seen_ns);
    Some(Hit { e, ticked })
}

/// The entry of the packet's own tuple, whatever its role, with its TCP
/// close state updated. A pure SYN does not match a [`CT_F_POLICY_REV`]
/// entry: it opens a flow of its own, which is judged.
#[inline(always)]
pub fn lookup(p: &Pkt) -> Option<Hit> {
    let h = lookup_key(&key(p))?;
    let flags = h.e.flags;
    if flags & CT_F_BIDIR != 0 {
        track_half_close(p.proto, p.tcp_flags, &mut h.e.flags, CT_F_FIN_FWD);
    } else if flags & CT_F_POLICY_REV != 0 {
        if is_pure_syn(p) {
            return None;
        }
        track_close(p, &mut h.e.flags, CT_F_CLOSING);
        if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            // The connection's close state lives in its forward entry.
            answers_policy(&reverse(p), p.tcp_flags);
        }
    } else {
        track_close(p, &mut h.e.flags, CT_F_CLOSING);
    }
    Some(h)
}

/// Whether a packet whose own entry is missing and whose reverse tuple is
/// `rev` (TCP flags `tcp_flags`) answers a flow NetworkPolicy allowed: a
/// [`CT_F_POLICY`] entry under `rev` (refreshed, with the reply
/// direction's close state). The [`CT_BIDIR_REPLIES`]th reply of a
/// [`CT_F_BIDIR`] flow records the [`CT_F_POLICY_REV`] entry its later
/// replies hit directly (best effort, as [`create_policy`]).
#[inline(always)]
pub fn answers_policy(rev: &CtKey, tcp_flags: u8) -> bool {
    let ptr = if rev.proto == proto::TCP {
        CT4.get_ptr_mut(rev)
    } else {
        CT_ANY4.get_ptr_mut(rev)
    };
    let Some(ptr) = ptr else {
        return false;
    };
    // SAFETY: map value pointer, valid for this program run; racing
    // refreshes are harmless.
    let e = unsafe { &mut *ptr };
    if e.flags & CT_F_POLICY == 0 {
        return false;
    }
    touch(&mut e.last_seen_ns);
    if e.flags & CT_F_BIDIR != 0 {
        track_half_close(rev.proto, tcp_flags, &mut e.flags, CT_F_FIN_REV);
        if tcp_flags & (TCP_FIN | TCP_RST) == 0 {
            if e.replies < CT_BIDIR_REPLIES {
                e.replies += 1;
            } else {
                insert_policy_rev(rev, e);
            }
        }
    }
    true
}

/// Room for the key and value [`insert_policy_rev`] inserts.
#[repr(C)]
struct Scratch {
    key: CtKey,
    value: CtValue,
}

/// Per-CPU scratch for [`insert_policy_rev`]: its 56 bytes on the stack
/// would push the deepest call chain of `rt_from_net` (main frame, then
/// `policy::judge`) past what Linux 6.1's verifier allows for the whole
/// chain (512 bytes, each frame rounded up to 32). Private, not pinned.
#[map]
static CT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Records the [`CT_F_POLICY_REV`] entry of the [`CT_F_BIDIR`] flow `fwd`
/// (under `rev`) under the reply tuple: a copy of the flow's entry (which
/// holds nothing but its stamp and flags) with its own flags.
#[inline(always)]
fn insert_policy_rev(rev: &CtKey, fwd: &CtValue) {
    let Some(s) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; programs do not migrate mid-run.
    let s = unsafe { &mut *s };
    s.key = reverse_key(rev);
    s.value = *fwd;
    s.value.flags = CT_F_POLICY | CT_F_POLICY_REV;
    s.value.replies = 0;
    let _ = CT4.insert(&s.key, &s.value, u64::from(BPF_NOEXIST));
}

/// TCP close tracking for one direction of a flow: a FIN or RST sets
/// `closing` in `flags` (the GC then uses the short close timeout), a new
/// SYN on the same tuple (port reuse) clears it, and so does the SYN-ACK
/// that answers it on the reply direction's entry: otherwise a reused
/// connection whose server then stayed silent past the close timeout would
/// lose its reply entry (and its reverse translation) to the GC. Writes
/// only on change; one branch for every other packet.
#[inline(always)]
pub fn track_close(p: &Pkt, flags: &mut u16, closing: u16) {
    if p.proto != proto::TCP {
        return;
    }
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        if *flags & closing == 0 {
            *flags |= closing;
        }
    } else if p.tcp_flags & TCP_SYN != 0 && *flags & closing != 0 {
        *flags &= !closing;
    }
}

/// TCP close tracking for an entry that stands for both directions
/// ([`CT_F_BIDIR`]): a FIN marks its direction (`half`), and the entry is
/// [`CT_F_CLOSING`] once both directions sent one, or on an RST; a new SYN
/// on the forward tuple (port reuse) clears it all. A connection one side
/// half-closed keeps the established timeout while the other still sends.
#[inline(always)]
fn track_half_close(l4: u8, tcp_flags: u8, flags: &mut u16, half: u16) {
    if l4 != proto::TCP {
        return;
    }
    let all = CT_F_CLOSING | CT_F_FIN_FWD | CT_F_FIN_REV;
    let mut f = *flags;
    if tcp_flags & TCP_RST != 0 {
        f |= CT_F_CLOSING;
    } else if tcp_flags & TCP_FIN != 0 {
        f |= half;
        if f & (CT_F_FIN_FWD | CT_F_FIN_REV) == CT_F_FIN_FWD | CT_F_FIN_REV {
            f |= CT_F_CLOSING;
        }
    } else if half == CT_F_FIN_FWD && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        f &= !all;
    }
    if f != *flags {
        *flags = f;
    }
}

/// The backend of a forward entry, from the entry itself. Once per clock
/// tick per flow (and for entries without a cached address) it is checked
/// against `rt_be4_v1`: `None` when the backend was deleted or its id now
/// names another address, and the caller balances the flow anew.
#[inline(always)]
pub fn fwd_backend(h: &Hit) -> Option<Chosen> {
    let e = &*h.e;
    if h.ticked || e.be_addr_be == 0 {
        let be = crate::lb::backend(e.backend_id)?;
        if e.be_addr_be != 0 && (be.addr_be != e.be_addr_be || be.port_be != e.be_port_be) {
            return None;
        }
        return Some(Chosen {
            id: e.backend_id,
            be,
        });
    }
    Some(Chosen {
        id: e.backend_id,
        be: BackendValue {
            addr_be: e.be_addr_be,
            port_be: e.be_port_be,
            proto: 0,
            state: 0,
            flags: if e.flags & CT_F_BE_LOCAL != 0 {
                BE_F_LOCAL
            } else {
                0
            },
        },
    })
}

#[inline(always)]
pub fn remove(p: &Pkt) {
    let _ = table(p.proto).remove(&key(p));
}

/// The reply tuple of `p` (as the reply path sees it).
#[inline(always)]
pub fn reverse(p: &Pkt) -> CtKey {
    reverse_key(&key(p))
}

/// The reply tuple of `k`.
#[inline(always)]
pub fn reverse_key(k: &CtKey) -> CtKey {
    CtKey {
        saddr_be: k.daddr_be,
        daddr_be: k.saddr_be,
        sport_be: k.dport_be,
        dport_be: k.sport_be,
        proto: k.proto,
        dir: CT_DIR_ANY,
        _pad: 0,
    }
}

/// What a new translated flow looks like.
pub struct NewFlow<'a> {
    /// The client's packet before translation (client → frontend).
    pub orig: CtKey,
    /// The reply as the reply path will look it up (backend → client or SNAT).
    pub reply: CtKey,
    pub backend: &'a Chosen,
    pub revnat_id: u16,
    pub flags: u16,
    /// Source the client was rewritten to (hairpin), 0 when none.
    pub snat_addr_be: u32,
    pub snat_port_be: u16,
}

/// Records both entries. The forward one first: its hash bucket is warm
/// from the packet's own conntrack miss, and that order costs a new flow
/// less than the reply entry first (`lb_bench`). Another CPU's packet of
/// the flow that finds the forward entry before the reply entry exists
/// goes to the backend, whose answer comes back long after this program
/// has returned; if the reply entry cannot be made, the forward one is
/// removed again, so no flow goes to a backend whose replies could not be
/// translated back. One value, rewritten between the inserts: two would
/// be 40 more bytes in the callers' main frames, which the verifier adds
/// to every call chain.
#[inline(always)]
pub fn create(f: &NewFlow) -> Result<(), u32> {
    let be_local = if f.backend.be.flags & BE_F_LOCAL != 0 {
        CT_F_BE_LOCAL
    } else {
        0
    };
    let mut v = CtValue {
        last_seen_ns: now(),
        backend_id: f.backend.id,
        revnat_id: f.revnat_id,
        flags: f.flags | be_local,
        nat_addr_be: f.snat_addr_be,
        nat_port_be: f.snat_port_be,
        replies: 0,
        vip_be: f.orig.daddr_be,
        vport_be: f.orig.dport_be,
        _pad2: 0,
        be_addr_be: f.backend.be.addr_be,
        be_port_be: f.backend.be.port_be,
        _pad3: 0,
    };
    let map = table(f.orig.proto);
    map.insert(&f.orig, &v, 0)
        .map_err(|_| stats::DROP_CT_FULL)?;
    v.flags = f.flags | CT_F_REPLY;
    v.nat_addr_be = f.orig.saddr_be;
    v.nat_port_be = f.orig.sport_be;
    v.be_addr_be = 0;
    v.be_port_be = 0;
    if map.insert(&f.reply, &v, 0).is_err() {
        let _ = map.remove(&f.orig);
        return Err(stats::DROP_CT_FULL);
    }
    Ok(())
}

/// Records (or refreshes) the reply entry of a DSR flow whose packet `p`
/// (client → local backend, as it arrived) carried `frontend`: the reply
/// (backend → client) leaves with the frontend as source
/// (`CT_F_REPLY | CT_F_NODEPORT`, so `rt_from_pod` leaves it to `rt_to_net`
/// as any NodePort reply). No forward entry: the flow's packets need no
/// translation here.
#[inline(always)]
pub fn create_dsr_reply(p: &Pkt, (vip_be, vport_be): (u32, u16)) -> Result<(), u32> {
    let v = CtValue {
        last_seen_ns: now(),
        flags: CT_F_REPLY | CT_F_NODEPORT | CT_F_DSR,
        nat_addr_be: p.saddr_be,
        nat_port_be: p.sport_be,
        vip_be,
        vport_be,
        ..CtValue::default()
    };
    table(p.proto)
        .insert(&reverse(p), &v, 0)
        .map_err(|_| stats::DROP_CT_FULL)
}

/// Records a flow NetworkPolicy allowed (`orig`, untranslated). A TCP
/// flow: one [`CT_F_POLICY`] | [`CT_F_BIDIR`] entry its replies find with
/// [`answers_policy`]. Other protocols, and flows whose replies masquerade
/// must leave alone (`inbound`), also get an entry under the reply tuple
/// (the reply's first), marked [`CT_F_INBOUND`] when
/// `inbound`. An entry that already exists under a tuple (a load-balanced
/// flow sharing it) is kept. Best effort: without the entries the next
/// packet is judged again.
#[inline(always)]
pub fn create_policy(orig: &CtKey, inbound: bool) {
    let mut v = CtValue {
        last_seen_ns: now(),
        flags: CT_F_POLICY | CT_F_BIDIR,
        ..CtValue::default()
    };
    let map = table(orig.proto);
    if inbound || orig.proto != proto::TCP {
        v.flags = CT_F_POLICY | if inbound { CT_F_INBOUND } else { 0 };
        let _ = map.insert(&reverse_key(orig), &v, u64::from(BPF_NOEXIST));
        v.flags = CT_F_POLICY;
    }
    let _ = map.insert(orig, &v, u64::from(BPF_NOEXIST));
}

/// Records (or refreshes) the inbound marker of `p`, a packet from outside
/// the node for a local pod, keyed by the pod's reply, in `rt_ctany4_v3`
/// whatever the protocol. True when it was created.
#[inline(always)]
pub fn mark_inbound(p: &Pkt) -> bool {
    let key = reverse(p);
    if let Some(v) = CT_ANY4.get_ptr_mut(&key) {
        // SAFETY: map value pointer; a racing refresh is harmless.
        touch(unsafe { &mut (*v).last_seen_ns });
        return false;
    }
    let v = CtValue {
        last_seen_ns: now(),
        flags: CT_F_INBOUND,
        ..CtValue::default()
    };
    CT_ANY4.insert(&key, &v, 0).is_ok()
}

/// Whether the TCP packet `p` (a pod's, leaving the node) answers an
/// inbound flow: its tuple has an inbound marker. Other protocols find
/// their marker with the packet's own lookup ([`lookup`]).
#[inline(always)]
pub fn tcp_inbound(p: &Pkt) -> bool {
    let Some(v) = CT_ANY4.get_ptr_mut(&key(p)) else {
        return false;
    };
    // SAFETY: map value pointer; a racing refresh is harmless.
    let v = unsafe { &mut *v };
    touch(&mut v.last_seen_ns);
    v.flags & CT_F_INBOUND != 0
}
