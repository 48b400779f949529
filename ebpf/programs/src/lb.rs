//! Service lookup and backend selection (Cilium `bpf/lib/lb.h` layout):
//! the master entry (slot 0) gives the count, slots `1..=count` the backend
//! ids, backends come from the shared backend map.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use riptide_common::{
    AFF_CLIENT_IP, ALG_MAGLEV, AffKey, AffValue, BE_STATE_ACTIVE, BE_STATE_TERMINATING, BackendKey,
    BackendValue, MAGLEV_CHUNK, MAGLEV_M_MAX, MaglevKey, SCOPE_EXT, SCOPE_INT, SVC_F_AFFINITY,
    SVC_F_TWO_SCOPES, SvcKey, SvcValue, stats,
};

use crate::{
    maps::{AFF4, BE4, MAGLEV4, SVC4, count},
    parse::Pkt,
};

/// A service frontend's master entry and the key it was found under.
#[derive(Clone, Copy)]
pub struct Service {
    pub key: SvcKey,
    pub master: SvcValue,
}

/// A chosen backend.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub id: u32,
    pub be: BackendValue,
}

/// Finds the service frontend `vip:port/proto`. `internal` is true for
/// traffic from inside the cluster (pods, node sockets), which uses the
/// internal scope when the service has two.
#[inline(always)]
pub fn lookup(vip_be: u32, port_be: u16, proto: u8, internal: bool) -> Option<Service> {
    let mut key = SvcKey {
        vip_be,
        port_be,
        proto,
        scope: SCOPE_EXT,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let master = *unsafe { SVC4.get(&key) }?;
    if internal && master.flags & SVC_F_TWO_SCOPES != 0 {
        key.scope = SCOPE_INT;
        // SAFETY: as above.
        if let Some(m) = unsafe { SVC4.get(&key) } {
            return Some(Service { key, master: *m });
        }
        // The internal scope is written before the flag (update order), so a
        // miss means it is being removed: the external scope still works.
        key.scope = SCOPE_EXT;
    }
    Some(Service { key, master })
}

/// Looks `vip:port` up, then the node-wide frontends (vip 0: NodePort,
/// hostPort without hostIP) when `vip` is an address of this node.
#[inline(always)]
pub fn lookup_with_node(
    vip_be: u32,
    port_be: u16,
    proto: u8,
    internal: bool,
    is_node_addr: bool,
) -> Option<Service> {
    if let Some(s) = lookup(vip_be, port_be, proto, internal) {
        return Some(s);
    }
    if is_node_addr {
        return lookup(0, port_be, proto, internal);
    }
    None
}

/// Backend by id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: copied out at once.
    unsafe { BE4.get(&BackendKey { id }) }.copied()
}

/// The Linux kernel's `jhash_3words`: a cheap, well-mixed hash that user
/// space or another node computes the same way.
#[inline(always)]
fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(0xdead_beef).wrapping_add(3 << 2);
    let (mut a, mut b, mut c) = (
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    );
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// The flow hash Maglev indexes with: the packet's 5-tuple as the client
/// sent it (frontend as destination), so every node computes the same.
#[inline(always)]
pub fn flow_hash(p: &Pkt) -> u32 {
    let ports = (u32::from(u16::from_be(p.sport_be)) << 16) | u32::from(u16::from_be(p.dport_be));
    jhash_3words(
        u32::from_be(p.saddr_be),
        u32::from_be(p.daddr_be),
        ports,
        u32::from(p.proto),
    )
}

/// The backend id the frontend's Maglev table gives for `hash`. `None`
/// when the table (or the chunk holding the position) is missing: being
/// written or removed, and the caller falls back to a random slot.
#[inline(always)]
fn maglev(svc: &Service, hash: u32) -> Option<u32> {
    // The master carries the table size, so size and table change together.
    let m = svc.master.backend_id;
    if m == 0 || m > MAGLEV_M_MAX {
        return None;
    }
    // Lemire's multiply-shift instead of `%`: uniform over 0..M and
    // cheaper; the mask below is the bound the verifier needs.
    let i = ((u64::from(hash) * u64::from(m)) >> 32) as u32;
    let table = MAGLEV4.get_ptr(&MaglevKey {
        revnat_id: svc.master.revnat_id,
        scope: svc.key.scope,
        chunk: (i / MAGLEV_CHUNK as u32) as u8,
    })?;
    // SAFETY: map value pointer, index masked into the chunk.
    let id = unsafe { (*table).backend_ids[i as usize & (MAGLEV_CHUNK - 1)] };
    (id != 0).then_some(id)
}

/// [`select`] for the flow of packet `p`: ClientIP affinity by its source
/// address, Maglev by its 5-tuple (the per-packet paths: tc and XDP).
#[inline(always)]
pub fn select_for(svc: &Service, p: &Pkt) -> Result<Option<Chosen>, u32> {
    select(
        svc,
        || u64::from(p.saddr_be),
        AFF_CLIENT_IP,
        || Some(flow_hash(p)),
    )
}

/// Picks a backend for a new flow of `svc`, honouring ClientIP affinity for
/// `client` (an address or a netns cookie, `kind` says which; only asked
/// for when the service has affinity, since getting a cookie is a helper
/// call) and the service's algorithm: Maglev services use `hash` (the
/// flow's, `None` where there is no 5-tuple yet — socket LB — which then
/// picks at random: a connect-time choice needs no cross-node agreement).
/// `Ok(None)`: the service has no backend (the caller rejects the flow).
#[inline(always)]
pub fn select(
    svc: &Service,
    client: impl FnOnce() -> u64,
    kind: u8,
    hash: impl FnOnce() -> Option<u32>,
) -> Result<Option<Chosen>, u32> {
    let m = &svc.master;
    if m.count == 0 {
        return Ok(None);
    }
    let affinity = m.flags & SVC_F_AFFINITY != 0;
    let aff_key = AffKey {
        client: if affinity { client() } else { 0 },
        revnat_id: m.revnat_id,
        kind,
        _pad: [0; 5],
    };
    let now = if affinity { crate::clock::now() } else { 0 };
    if affinity && let Some(c) = affinity_hit(svc, &aff_key, now) {
        count(stats::AFFINITY_HIT);
        return Ok(Some(c));
    }
    let by_maglev = if m.algorithm == ALG_MAGLEV {
        hash().and_then(|h| maglev(svc, h))
    } else {
        None
    };
    let backend_id = match by_maglev {
        Some(id) => id,
        None => random_slot(svc)?,
    };
    let Some(be) = backend(backend_id) else {
        return Err(stats::DROP_STALE_SLOT);
    };
    if affinity {
        let v = AffValue {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        // Best effort: without the entry the next flow is just balanced anew.
        let _ = AFF4.insert(&aff_key, &v, 0);
    }
    Ok(Some(Chosen { id: backend_id, be }))
}

/// A backend id from a random slot of `svc` (count checked non-zero).
#[inline(always)]
fn random_slot(svc: &Service) -> Result<u32, u32> {
    // SAFETY: plain helper call.
    let r = unsafe { bpf_get_prandom_u32() };
    let n = u32::from(svc.master.count);
    if n == 0 {
        // Checked by the caller; repeated so LLVM drops the division-by-zero
        // panic.
        return Err(stats::DROP_STALE_SLOT);
    }
    let mut key = svc.key;
    key.slot = (r % n) as u16 + 1;
    // SAFETY: copied out at once.
    if let Some(s) = unsafe { SVC4.get(&key) } {
        return Ok(s.backend_id);
    }
    // The count was read before a shrink finished deleting the tail slots;
    // slot 1 exists whenever the new count is non-zero.
    key.slot = 1;
    // SAFETY: copied out at once.
    match unsafe { SVC4.get(&key) } {
        Some(s) => Ok(s.backend_id),
        None => Err(stats::DROP_STALE_SLOT),
    }
}

/// The affinity backend of `key` if it is recent enough and still usable.
#[inline(always)]
fn affinity_hit(svc: &Service, key: &AffKey, now: u64) -> Option<Chosen> {
    let ptr = AFF4.get_ptr_mut(key)?;
    // SAFETY: LRU entry pointer from the map; racing writers only store
    // whole u64/u32 fields.
    let v = unsafe { &mut *ptr };
    let timeout_ns = u64::from(svc.master.affinity_timeout_s) * 1_000_000_000;
    // Saturating: another CPU may have stamped the entry after our clock
    // read, and that is a fresh entry, not an old one.
    if now.saturating_sub(v.last_used_ns) > timeout_ns {
        return None;
    }
    let be = backend(v.backend_id)?;
    let usable =
        be.state == BE_STATE_ACTIVE || (be.state == BE_STATE_TERMINATING && slot1_terminating(svc));
    if !usable {
        return None;
    }
    v.last_used_ns = now;
    Some(Chosen {
        id: v.backend_id,
        be,
    })
}

/// KEP-1669: the slots hold terminating backends only when no backend is
/// ready; then a terminating affinity backend is as good as any.
#[inline(always)]
fn slot1_terminating(svc: &Service) -> bool {
    let mut key = svc.key;
    key.slot = 1;
    // SAFETY: copied out at once.
    let Some(s) = (unsafe { SVC4.get(&key) }).copied() else {
        return false;
    };
    matches!(backend(s.backend_id), Some(b) if b.state == BE_STATE_TERMINATING)
}
