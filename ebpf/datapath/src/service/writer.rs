//! The writer: [`Services`] puts [`Service`]s into a node's maps
//! (`rt_svc4_v1`, `rt_be4_v1`, `rt_revnat4_v1`, `rt_maglev4_v2`,
//! `rt_srcrange4_v1`) and keeps
//! the bookkeeping (ids, backend refcounts) that makes updates incremental.
//!
//! Writes happen in the order a running program tolerates (Cilium
//! `lb.h`): backends first, then the slots of each frontend, then the master
//! entry with the new count last; shrinking deletes the extra slots only
//! after the master says they are gone; removal deletes the master first and
//! the backends last. A frontend's allowed source prefixes are written
//! before the master that turns the check on and deleted after the master
//! that turns it off (or drops the prefix), so a reader never judges a
//! flow against a half-written list it would wrongly deny; a narrowed list
//! takes effect for new flows once the write returns. Backends are shared between services by address and
//! refcounted; backend ids and reverse-NAT ids are read back from the pinned
//! maps on open, so a restarted agent keeps them stable (and established
//! flows, whose conntrack entries hold backend ids, keep working).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet as StdHashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    Pod,
    maps::{
        HashMap, LpmTrie, MapData, MapError,
        lpm_trie::Key as LpmKey,
    },
};
use riptide_common::{
    ALG_MAGLEV, BackendKey, BackendValue, MAGLEV_CHUNK, MaglevKey, MaglevValue, RevNatKey,
    RevNatValue, SCOPE_EXT, SRCRANGE_PREFIX_BASE, SrcRangeKey, SvcKey, SvcValue, names,
};

use super::{
    BackendAddr, FrontendId, Protocol, Service,
    plan::{FrontendPlan, build},
};
use crate::{
    Error, Result,
    error::{ignore_missing, map_err},
};

struct Installed {
    frontends: FrontendTable,
    backends: BTreeSet<BackendAddr>,
}

/// A written Service's frontends, sorted by id. Kept for every Service
/// port of the cluster, and nearly all have one or two frontends: a boxed
/// slice of them costs a tenth of a `BTreeMap`, whose first insert
/// allocates a whole node of eleven.
struct FrontendTable(Box<[(FrontendId, InstalledFrontend)]>);

impl FrontendTable {
    fn get(&self, fid: &FrontendId) -> Option<&InstalledFrontend> {
        let at = self.0.binary_search_by(|(f, _)| f.cmp(fid)).ok()?;
        self.0.get(at).map(|(_, f)| f)
    }

    fn keys(&self) -> impl Iterator<Item = &FrontendId> {
        self.0.iter().map(|(fid, _)| fid)
    }
}

impl From<BTreeMap<FrontendId, InstalledFrontend>> for FrontendTable {
    fn from(m: BTreeMap<FrontendId, InstalledFrontend>) -> Self {
        // BTreeMap iterates in key order: the slice is sorted.
        Self(m.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a FrontendTable {
    type Item = (&'a FrontendId, &'a InstalledFrontend);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (FrontendId, InstalledFrontend)>,
        fn(&'a (FrontendId, InstalledFrontend)) -> (&'a FrontendId, &'a InstalledFrontend),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(fid, f)| (fid, f))
    }
}

#[derive(Clone)]
struct InstalledFrontend {
    /// Slot count written per scope.
    slots: BTreeMap<u8, u16>,
    /// Scopes with a Maglev table.
    maglev: BTreeSet<u8>,
    /// Allowed source prefixes in `rt_srcrange4_v1`.
    ranges: BTreeSet<Prefix>,
}

/// A source prefix: network address and length.
type Prefix = (Ipv4Addr, u8);

/// The `rt_srcrange4_v1` key of prefix `p` of the frontend `revnat_id`.
fn range_key(revnat_id: u16, (addr, len): Prefix) -> LpmKey<SrcRangeKey> {
    LpmKey::new(
        SRCRANGE_PREFIX_BASE + u32::from(len),
        SrcRangeKey {
            revnat_id,
            _pad: 0,
            addr_be: u32::from(addr).to_be(),
        },
    )
}

/// Ids an upsert allocated, released again if it fails.
#[derive(Default)]
struct FreshIds {
    backends: Vec<BackendAddr>,
    frontends: Vec<FrontendId>,
}

/// What a successful map write leaves for the bookkeeping.
struct Staged {
    frontends: BTreeMap<FrontendId, InstalledFrontend>,
    backends: BTreeSet<BackendAddr>,
    /// Adopted frontends this upsert claimed: (frontend, revnat id, scopes).
    claimed: Vec<(FrontendId, u16, Vec<u8>)>,
    /// Frontends the new version no longer has.
    dropped: Vec<FrontendId>,
}

/// One map write and what its key held before (`None`: absent).
enum Undo {
    Svc(SvcKey, Option<SvcValue>),
    Be(BackendKey, Option<BackendValue>),
    RevNat(RevNatKey, Option<RevNatValue>),
    /// Boxed: a Maglev chunk is 4 KiB.
    Maglev(MaglevKey, Option<Box<MaglevValue>>),
    /// A source prefix and whether it was there before (the writer knows
    /// exactly which prefixes it wrote: an LPM lookup would answer with
    /// any covering prefix).
    SrcRange(u16, Prefix, bool),
}

/// The writes of one operation, newest last. `record` off skips the lookup
/// of the previous value (a removal is retried, never rolled back).
struct Journal {
    undo: Vec<Undo>,
    record: bool,
}

impl Journal {
    fn recording() -> Self {
        Self {
            undo: Vec::new(),
            record: true,
        }
    }

    fn not_recording() -> Self {
        Self {
            undo: Vec::new(),
            record: false,
        }
    }
}

/// The value under `k`, `None` when absent.
fn lookup<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    k: &K,
) -> Result<Option<V>> {
    match map.get(k, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(Error::Map { name, source }),
    }
}

/// Writes `v` under `k`; returns the previous value when `record`.
fn put<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    k: K,
    v: V,
    record: bool,
) -> Result<Option<V>> {
    let prev = if record { lookup(map, name, &k)? } else { None };
    map.insert(k, v, 0).map_err(map_err(name))?;
    Ok(prev)
}

/// Deletes `k` (absent is fine); returns the deleted value when `record`.
fn del<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    k: K,
    record: bool,
) -> Result<Option<V>> {
    let prev = if record { lookup(map, name, &k)? } else { None };
    ignore_missing(map.remove(&k)).map_err(map_err(name))?;
    Ok(prev)
}

/// Puts `k` back to `v` (`None`: deletes it).
fn restore<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    k: K,
    v: Option<V>,
) -> Result<()> {
    match v {
        Some(v) => map.insert(k, v, 0).map_err(map_err(name)),
        None => ignore_missing(map.remove(&k)).map_err(map_err(name)),
    }
}

/// The `rt_maglev4_v2` key of chunk `chunk` of a table.
fn maglev_key(revnat_id: u16, scope: u8, chunk: usize) -> Result<MaglevKey> {
    Ok(MaglevKey {
        revnat_id,
        scope,
        chunk: u8::try_from(chunk).map_err(|_| Error::IdsExhausted {
            what: "maglev chunk",
        })?,
    })
}

/// Writes services into a node's maps and keeps the bookkeeping (ids,
/// backend refcounts) that makes updates incremental.
pub struct Services {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    be: HashMap<MapData, BackendKey, BackendValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    maglev: HashMap<MapData, MaglevKey, MaglevValue>,
    srcrange: LpmTrie<MapData, SrcRangeKey, u8>,
    installed: StdHashMap<String, Installed>,
    backend_ids: StdHashMap<BackendAddr, u32>,
    backend_refs: StdHashMap<u32, u32>,
    revnat_ids: StdHashMap<FrontendId, u16>,
    /// The ids in `backend_ids` / `revnat_ids` (allocation checks a
    /// candidate without walking every id: 50k backends made the initial
    /// sync quadratic).
    used_backend_ids: StdHashSet<u32>,
    used_revnat_ids: StdHashSet<u16>,
    /// Which installed service owns each frontend (mirrors `installed`, so
    /// the one-owner check is a lookup, not a walk over every service).
    frontend_owner: StdHashMap<FrontendId, String>,
    /// Frontends found in the maps at open time and not yet claimed by an
    /// upsert: [`Services::remove_unclaimed`] deletes them after a resync.
    adopted: BTreeMap<FrontendId, BTreeMap<u8, u16>>,
    /// Maglev tables found at open time, by (revnat id, scope).
    adopted_maglev: BTreeSet<(u16, u8)>,
    /// Source prefixes found at open time, by revnat id.
    adopted_ranges: BTreeMap<u16, BTreeSet<Prefix>>,
    next_backend_id: u32,
    next_revnat_id: u16,
}

impl Services {
    /// Opens the node's pinned service maps and reads back the ids in use.
    pub fn open_pinned(node: &str) -> Result<Self> {
        let dir = crate::pins::pin_dir(node)?;
        let open = |name: &'static str| -> Result<aya::maps::Map> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Ok(aya::maps::Map::HashMap(data))
        };
        Self::from_maps(
            open(names::SVC4)?,
            open(names::BE4)?,
            open(names::REVNAT4)?,
            open(names::MAGLEV4)?,
            aya::maps::Map::LpmTrie(
                MapData::from_pin(dir.join(names::SRCRANGE4)).map_err(map_err(names::SRCRANGE4))?,
            ),
        )
    }

    pub(crate) fn from_maps(
        svc: aya::maps::Map,
        be: aya::maps::Map,
        revnat: aya::maps::Map,
        maglev: aya::maps::Map,
        srcrange: aya::maps::Map,
    ) -> Result<Self> {
        let svc = HashMap::try_from(svc).map_err(map_err(names::SVC4))?;
        let be = HashMap::try_from(be).map_err(map_err(names::BE4))?;
        let revnat = HashMap::try_from(revnat).map_err(map_err(names::REVNAT4))?;
        let maglev = HashMap::try_from(maglev).map_err(map_err(names::MAGLEV4))?;
        let srcrange = LpmTrie::try_from(srcrange).map_err(map_err(names::SRCRANGE4))?;
        let mut s = Self {
            svc,
            be,
            revnat,
            maglev,
            srcrange,
            installed: StdHashMap::new(),
            backend_ids: StdHashMap::new(),
            backend_refs: StdHashMap::new(),
            revnat_ids: StdHashMap::new(),
            used_backend_ids: StdHashSet::new(),
            used_revnat_ids: StdHashSet::new(),
            frontend_owner: StdHashMap::new(),
            adopted: BTreeMap::new(),
            adopted_maglev: BTreeSet::new(),
            adopted_ranges: BTreeMap::new(),
            next_backend_id: 1,
            next_revnat_id: 1,
        };
        s.adopt()?;
        Ok(s)
    }

    /// Reads the ids already in the maps (a restarted agent).
    fn adopt(&mut self) -> Result<()> {
        for entry in self.be.iter() {
            let (k, v) = entry.map_err(map_err(names::BE4))?;
            let Some(protocol) = Protocol::from_number(v.proto) else {
                continue;
            };
            let addr = BackendAddr {
                addr: SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(v.addr_be)),
                    u16::from_be(v.port_be),
                ),
                protocol,
            };
            self.backend_ids.insert(addr, k.id);
            self.used_backend_ids.insert(k.id);
            self.backend_refs.entry(k.id).or_insert(0);
            self.next_backend_id = self.next_backend_id.max(k.id.saturating_add(1));
        }
        for entry in self.svc.iter() {
            let (k, v) = entry.map_err(map_err(names::SVC4))?;
            if k.slot != 0 {
                continue;
            }
            let Some(protocol) = Protocol::from_number(k.proto) else {
                continue;
            };
            let id = FrontendId {
                addr: Ipv4Addr::from(u32::from_be(k.vip_be)),
                port: u16::from_be(k.port_be),
                protocol,
            };
            self.revnat_ids.insert(id, v.revnat_id);
            self.used_revnat_ids.insert(v.revnat_id);
            self.adopted.entry(id).or_default().insert(k.scope, v.count);
            self.next_revnat_id = self.next_revnat_id.max(v.revnat_id.saturating_add(1));
        }
        for key in self.maglev.keys() {
            let k = key.map_err(map_err(names::MAGLEV4))?;
            self.adopted_maglev.insert((k.revnat_id, k.scope));
        }
        for key in self.srcrange.keys() {
            let k = key.map_err(map_err(names::SRCRANGE4))?;
            let Some(len) = k
                .prefix_len()
                .checked_sub(SRCRANGE_PREFIX_BASE)
                .and_then(|l| u8::try_from(l).ok())
            else {
                continue;
            };
            let d = k.data();
            self.adopted_ranges
                .entry(d.revnat_id)
                .or_default()
                .insert((Ipv4Addr::from(u32::from_be(d.addr_be)), len));
        }
        Ok(())
    }

    fn backend_id(&mut self, addr: BackendAddr) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&addr) {
            return Ok(*id);
        }
        let used = &self.used_backend_ids;
        let mut id = self.next_backend_id.max(1);
        // Wrap once: ids freed earlier are reused when the counter runs out.
        let mut tries = 0u64;
        while used.contains(&id) || id == 0 {
            id = id.wrapping_add(1);
            tries += 1;
            if tries > u64::from(u32::MAX) {
                return Err(Error::IdsExhausted { what: "backend" });
            }
        }
        self.next_backend_id = id.wrapping_add(1);
        self.backend_ids.insert(addr, id);
        self.used_backend_ids.insert(id);
        Ok(id)
    }

    fn revnat_id(&mut self, fe: FrontendId) -> Result<u16> {
        if let Some(id) = self.revnat_ids.get(&fe) {
            return Ok(*id);
        }
        let used = &self.used_revnat_ids;
        // Prefixes left under an id with no master (a write cut short)
        // must not become a new frontend's list: such ids wait for
        // `remove_unclaimed` to clear them.
        let orphan_ranges = &self.adopted_ranges;
        let mut id = self.next_revnat_id.max(1);
        let mut tries = 0u32;
        while used.contains(&id) || id == 0 || orphan_ranges.contains_key(&id) {
            id = id.wrapping_add(1);
            tries += 1;
            if tries > u32::from(u16::MAX) + 1 {
                return Err(Error::IdsExhausted {
                    what: "reverse-NAT",
                });
            }
        }
        self.next_revnat_id = id.wrapping_add(1);
        self.revnat_ids.insert(fe, id);
        self.used_revnat_ids.insert(id);
        Ok(id)
    }

    /// Adds or replaces `svc`, all or nothing: on any map error the maps
    /// are put back to what they held before (undoing the writes made, last
    /// first) and the bookkeeping is left untouched, so a retry starts from
    /// the same state and [`Services::remove`] still finds every entry.
    pub fn upsert(&mut self, svc: &Service) -> Result<()> {
        self.check_owner(svc)?;
        let old = self.take_installed(&svc.name);
        let mut fresh = FreshIds::default();
        let mut journal = Journal::recording();
        match self.write_service(svc, old.as_ref(), &mut fresh, &mut journal) {
            Ok(staged) => {
                self.commit(svc, old, staged);
                tracing::debug!(service = %svc.name, frontends = svc.frontends.len(), backends = svc.backends.len(), "service written");
                Ok(())
            }
            Err(e) => {
                self.rollback(journal);
                self.release_fresh(fresh);
                if let Some(o) = old {
                    self.restore_installed(&svc.name, o);
                }
                Err(e)
            }
        }
    }

    /// One frontend belongs to one service.
    fn check_owner(&self, svc: &Service) -> Result<()> {
        for fid in svc.frontend_ids() {
            if let Some(name) = self.frontend_owner.get(&fid).filter(|n| **n != svc.name) {
                return Err(Error::Service {
                    service: svc.name.clone(),
                    reason: format!(
                        "frontend {}:{} already belongs to {name}",
                        fid.addr, fid.port
                    ),
                });
            }
        }
        Ok(())
    }

    /// The map half of an upsert: allocates ids (noted in `fresh`), writes
    /// every entry (noted in `journal`) and returns what the bookkeeping must
    /// learn once all writes succeeded.
    fn write_service(
        &mut self,
        svc: &Service,
        old: Option<&Installed>,
        fresh: &mut FreshIds,
        j: &mut Journal,
    ) -> Result<Staged> {
        for b in &svc.backends {
            let addr = svc.backend_addr(b);
            if !self.backend_ids.contains_key(&addr) {
                self.backend_id(addr)?;
                fresh.backends.push(addr);
            }
        }
        for fid in svc.frontend_ids() {
            if !self.revnat_ids.contains_key(&fid) {
                self.revnat_id(fid)?;
                fresh.frontends.push(fid);
            }
        }
        let plan = build(svc, &self.backend_ids, &self.revnat_ids)?;
        let new_backends: BTreeSet<BackendAddr> =
            svc.backends.iter().map(|b| svc.backend_addr(b)).collect();

        // 1. Backends (new ones become visible before any slot names them).
        for (id, value) in &plan.backends {
            let key = BackendKey { id: *id };
            let prev = put(&mut self.be, names::BE4, key, *value, j.record)?;
            j.undo.push(Undo::Be(key, prev));
        }

        // 2. Frontends: reverse NAT, slots, master (count last), then shrink.
        let mut frontends = BTreeMap::new();
        let mut claimed = Vec::new();
        for fp in &plan.frontends {
            let fid = fp.id;
            let (slots, maglev, ranges) = match old.and_then(|o| o.frontends.get(&fid)) {
                Some(f) => (f.slots.clone(), f.maglev.clone(), f.ranges.clone()),
                None => {
                    let slots = self.adopted.get(&fid).cloned().unwrap_or_default();
                    let maglev: BTreeSet<u8> = slots
                        .keys()
                        .filter(|scope| self.adopted_maglev.contains(&(fp.revnat_id, **scope)))
                        .copied()
                        .collect();
                    let ranges = if self.adopted.contains_key(&fid) {
                        claimed.push((fid, fp.revnat_id, slots.keys().copied().collect()));
                        self.adopted_ranges.get(&fp.revnat_id).cloned().unwrap_or_default()
                    } else {
                        BTreeSet::new()
                    };
                    (slots, maglev, ranges)
                }
            };
            let prev = InstalledFrontend {
                slots,
                maglev,
                ranges,
            };
            let installed = self.write_frontend(fp, &prev, j)?;
            frontends.insert(fid, installed);
        }

        // 3. Frontends the new version dropped.
        let mut dropped = Vec::new();
        if let Some(o) = old {
            for (fid, f) in &o.frontends {
                if !frontends.contains_key(fid) {
                    self.delete_frontend_maps(fid, f, j)?;
                    dropped.push(*fid);
                }
            }
        }

        // 4. Backends the new version dropped, once nothing points at them.
        if let Some(o) = old {
            for addr in o.backends.difference(&new_backends) {
                self.delete_backend_if_last(*addr, j)?;
            }
        }
        Ok(Staged {
            frontends,
            backends: new_backends,
            claimed,
            dropped,
        })
    }

    /// The bookkeeping half of an upsert, run once the maps agree.
    fn commit(&mut self, svc: &Service, old: Option<Installed>, staged: Staged) {
        let old_backends = old.as_ref().map(|o| &o.backends);
        for addr in &staged.backends {
            if !old_backends.is_some_and(|o| o.contains(addr)) {
                let id = self.backend_ids[addr];
                *self.backend_refs.entry(id).or_insert(0) += 1;
            }
        }
        if let Some(o) = old_backends {
            for addr in o.difference(&staged.backends) {
                self.unref_backend(*addr);
            }
        }
        for (fid, revnat_id, scopes) in staged.claimed {
            self.adopted.remove(&fid);
            for scope in scopes {
                self.adopted_maglev.remove(&(revnat_id, scope));
            }
            self.adopted_ranges.remove(&revnat_id);
        }
        for fid in &staged.dropped {
            self.forget_frontend(fid);
        }
        self.restore_installed(
            &svc.name,
            Installed {
                frontends: staged.frontends.into(),
                backends: staged.backends,
            },
        );
    }

    /// Puts every entry the journal wrote back to what it held before, in
    /// reverse order: the reverse of a reader-safe order is reader-safe
    /// (masters go back to their old counts before the slots they name, new
    /// backends go last, once no slot points at them).
    fn rollback(&mut self, j: Journal) {
        for u in j.undo.into_iter().rev() {
            let r = match u {
                Undo::Svc(k, v) => restore(&mut self.svc, names::SVC4, k, v),
                Undo::Be(k, v) => restore(&mut self.be, names::BE4, k, v),
                Undo::RevNat(k, v) => restore(&mut self.revnat, names::REVNAT4, k, v),
                Undo::Maglev(k, v) => restore(&mut self.maglev, names::MAGLEV4, k, v.map(|b| *b)),
                Undo::SrcRange(id, p, was) => {
                    let k = range_key(id, p);
                    if was {
                        self.srcrange.insert(&k, 0, 0).map_err(map_err(names::SRCRANGE4))
                    } else {
                        ignore_missing(self.srcrange.remove(&k)).map_err(map_err(names::SRCRANGE4))
                    }
                }
            };
            if let Err(e) = r {
                tracing::error!(error = %e, "rolling back a failed service write");
            }
        }
    }

    /// Frees the ids a failed upsert allocated.
    fn release_fresh(&mut self, fresh: FreshIds) {
        for addr in fresh.backends {
            if let Some(id) = self.backend_ids.remove(&addr) {
                self.used_backend_ids.remove(&id);
            }
        }
        for fid in fresh.frontends {
            self.forget_frontend(&fid);
        }
    }

    fn write_frontend(
        &mut self,
        fp: &FrontendPlan,
        prev_fe: &InstalledFrontend,
        j: &mut Journal,
    ) -> Result<InstalledFrontend> {
        let (prev, prev_maglev) = (&prev_fe.slots, &prev_fe.maglev);
        let fe = &fp.id;
        let rn = RevNatValue {
            vip_be: u32::from(fe.addr).to_be(),
            port_be: fe.port.to_be(),
            _pad: 0,
        };
        let rkey = RevNatKey {
            id: fp.revnat_id,
            _pad: 0,
        };
        let prev_rn = put(&mut self.revnat, names::REVNAT4, rkey, rn, j.record)?;
        j.undo.push(Undo::RevNat(rkey, prev_rn));
        // New prefixes before any master that turns the check on.
        for p in fp.source_ranges.difference(&prev_fe.ranges) {
            self.put_range(fp.revnat_id, *p, j)?;
        }
        let mut written = BTreeMap::new();
        let mut maglev_written = BTreeSet::new();
        for sp in &fp.scopes {
            for (i, id) in sp.slots.iter().enumerate() {
                let slot =
                    u16::try_from(i + 1).map_err(|_| Error::IdsExhausted { what: "slot" })?;
                let v = SvcValue {
                    backend_id: *id,
                    count: 0,
                    revnat_id: fp.revnat_id,
                    flags: 0,
                    algorithm: 0,
                    _pad: 0,
                    affinity_timeout_s: 0,
                };
                self.put_svc(fe.key(sp.scope, slot), v, j)?;
            }
            // The table before the master that says "Maglev" with its size
            // (a reader without a chunk falls back to a random slot anyway).
            let mut chunks = 0;
            if let Some(t) = &sp.maglev {
                for (c, part) in t.chunks(MAGLEV_CHUNK).enumerate() {
                    let mkey = maglev_key(fp.revnat_id, sp.scope, c)?;
                    let mut v = MaglevValue {
                        backend_ids: [0; MAGLEV_CHUNK],
                    };
                    v.backend_ids[..part.len()].copy_from_slice(part);
                    let prev = put(&mut self.maglev, names::MAGLEV4, mkey, v, j.record)?;
                    j.undo.push(Undo::Maglev(mkey, prev.map(Box::new)));
                    chunks = c + 1;
                }
                maglev_written.insert(sp.scope);
            }
            self.put_svc(fe.key(sp.scope, 0), sp.master, j)?;
            // After the master: a smaller table (or none) leaves chunks
            // past its end, which the old size could still index.
            if sp.maglev.is_some() || prev_maglev.contains(&sp.scope) {
                self.del_maglev(fp.revnat_id, sp.scope, chunks, j)?;
            }
            let n = sp.master.count;
            let old_n = prev.get(&sp.scope).copied().unwrap_or(0);
            for slot in (n + 1)..=old_n {
                self.del_svc(fe.key(sp.scope, slot), j)?;
            }
            written.insert(sp.scope, n);
        }
        // A scope the frontend no longer has (two scopes → one): the EXT
        // master written above no longer points at it; delete it now.
        for (scope, old_n) in prev {
            if !written.contains_key(scope) {
                self.delete_scope_maps(*fe, *scope, *old_n, j)?;
            }
        }
        // Dropped prefixes once the masters say what the list is now.
        for p in prev_fe.ranges.difference(&fp.source_ranges) {
            self.del_range(fp.revnat_id, *p, j)?;
        }
        Ok(InstalledFrontend {
            slots: written,
            maglev: maglev_written,
            ranges: fp.source_ranges.clone(),
        })
    }

    fn put_range(&mut self, revnat_id: u16, p: Prefix, j: &mut Journal) -> Result<()> {
        self.srcrange
            .insert(&range_key(revnat_id, p), 0, 0)
            .map_err(map_err(names::SRCRANGE4))?;
        j.undo.push(Undo::SrcRange(revnat_id, p, false));
        Ok(())
    }

    fn del_range(&mut self, revnat_id: u16, p: Prefix, j: &mut Journal) -> Result<()> {
        ignore_missing(self.srcrange.remove(&range_key(revnat_id, p)))
            .map_err(map_err(names::SRCRANGE4))?;
        j.undo.push(Undo::SrcRange(revnat_id, p, true));
        Ok(())
    }

    fn put_svc(&mut self, k: SvcKey, v: SvcValue, j: &mut Journal) -> Result<()> {
        let prev = put(&mut self.svc, names::SVC4, k, v, j.record)?;
        j.undo.push(Undo::Svc(k, prev));
        Ok(())
    }

    fn del_svc(&mut self, k: SvcKey, j: &mut Journal) -> Result<()> {
        if let Some(prev) = del(&mut self.svc, names::SVC4, k, j.record)? {
            j.undo.push(Undo::Svc(k, Some(prev)));
        }
        Ok(())
    }

    /// Deletes the chunks `from..` of a table. Tables are written as chunks
    /// `0..n` and shrunk from the end, so the first missing chunk ends it.
    fn del_maglev(
        &mut self,
        revnat_id: u16,
        scope: u8,
        from: usize,
        j: &mut Journal,
    ) -> Result<()> {
        for c in from..=u8::MAX as usize {
            let k = maglev_key(revnat_id, scope, c)?;
            let Some(prev) = lookup(&self.maglev, names::MAGLEV4, &k)? else {
                break;
            };
            ignore_missing(self.maglev.remove(&k)).map_err(map_err(names::MAGLEV4))?;
            if j.record {
                j.undo.push(Undo::Maglev(k, Some(Box::new(prev))));
            }
        }
        Ok(())
    }

    fn delete_scope_maps(
        &mut self,
        fid: FrontendId,
        scope: u8,
        n: u16,
        j: &mut Journal,
    ) -> Result<()> {
        // Master first: no new lookup finds the scope, then its slots.
        self.del_svc(fid.key(scope, 0), j)?;
        for slot in 1..=n {
            self.del_svc(fid.key(scope, slot), j)?;
        }
        if let Some(&revnat_id) = self.revnat_ids.get(&fid) {
            self.del_maglev(revnat_id, scope, 0, j)?;
        }
        Ok(())
    }

    /// Deletes a frontend's entries from the maps; the bookkeeping is
    /// [`Self::forget_frontend`]'s, once every delete succeeded.
    fn delete_frontend_maps(
        &mut self,
        fid: &FrontendId,
        fe: &InstalledFrontend,
        j: &mut Journal,
    ) -> Result<()> {
        // EXT first: it is the entry every lookup starts from.
        let mut scopes: Vec<_> = fe.slots.iter().collect();
        scopes.sort_by_key(|(scope, _)| **scope != SCOPE_EXT);
        for (scope, n) in scopes {
            self.delete_scope_maps(*fid, *scope, *n, j)?;
        }
        if let Some(&id) = self.revnat_ids.get(fid) {
            // After the masters: a reused id must not inherit the list.
            for p in &fe.ranges {
                self.del_range(id, *p, j)?;
            }
            let key = RevNatKey { id, _pad: 0 };
            if let Some(prev) = del(&mut self.revnat, names::REVNAT4, key, j.record)? {
                j.undo.push(Undo::RevNat(key, Some(prev)));
            }
        }
        Ok(())
    }

    /// Forgets a frontend's reverse-NAT id and any Maglev table adopted for it.
    fn forget_frontend(&mut self, fid: &FrontendId) {
        if let Some(id) = self.revnat_ids.remove(fid) {
            self.used_revnat_ids.remove(&id);
            self.adopted_maglev.retain(|(rn, _)| *rn != id);
        }
    }

    /// Takes `name` out of `installed` and its frontends out of
    /// `frontend_owner` (which mirrors it).
    fn take_installed(&mut self, name: &str) -> Option<Installed> {
        let old = self.installed.remove(name)?;
        for fid in old.frontends.keys() {
            if self.frontend_owner.get(fid).is_some_and(|o| o == name) {
                self.frontend_owner.remove(fid);
            }
        }
        Some(old)
    }

    /// The inverse of [`Self::take_installed`].
    fn restore_installed(&mut self, name: &str, installed: Installed) {
        for fid in installed.frontends.keys() {
            self.frontend_owner.insert(*fid, name.to_owned());
        }
        self.installed.insert(name.to_owned(), installed);
    }

    /// Deletes the map entry of backend `addr` if the service dropping it is
    /// its last user (the refcount itself changes in [`Self::unref_backend`]).
    fn delete_backend_if_last(&mut self, addr: BackendAddr, j: &mut Journal) -> Result<()> {
        let Some(&id) = self.backend_ids.get(&addr) else {
            return Ok(());
        };
        if self.backend_refs(id) <= 1 {
            let key = BackendKey { id };
            if let Some(prev) = del(&mut self.be, names::BE4, key, j.record)? {
                j.undo.push(Undo::Be(key, Some(prev)));
            }
        }
        Ok(())
    }

    fn unref_backend(&mut self, addr: BackendAddr) {
        let Some(&id) = self.backend_ids.get(&addr) else {
            return;
        };
        let refs = self.backend_refs.entry(id).or_insert(0);
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.backend_refs.remove(&id);
            self.backend_ids.remove(&addr);
            self.used_backend_ids.remove(&id);
        }
    }

    /// Removes service `name` and every entry only it used. Unknown names
    /// are not an error (idempotent delete). On a map error the service stays
    /// known with its bookkeeping unchanged, so a retry deletes what is left.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let Some(old) = self.take_installed(name) else {
            return Ok(());
        };
        let mut j = Journal::not_recording();
        let deleted = (|| {
            for (fid, f) in &old.frontends {
                self.delete_frontend_maps(fid, f, &mut j)?;
            }
            for addr in &old.backends {
                self.delete_backend_if_last(*addr, &mut j)?;
            }
            Ok(())
        })();
        if let Err(e) = deleted {
            self.restore_installed(name, old);
            return Err(e);
        }
        for fid in old.frontends.keys() {
            self.forget_frontend(fid);
        }
        for addr in &old.backends {
            self.unref_backend(*addr);
        }
        tracing::debug!(service = %name, "service removed");
        Ok(())
    }

    /// After the initial full resync of a restarted agent: deletes frontends
    /// found in the maps that no upserted service claimed, and backends no
    /// service references. Returns how many frontends and backends went.
    pub fn remove_unclaimed(&mut self) -> Result<(usize, usize)> {
        self.remove_unclaimed_except(|_| false)
    }

    /// [`Services::remove_unclaimed`] keeping the frontends `keep` names
    /// (those of services whose write failed and is being retried: their
    /// previous entries serve until the retry succeeds) and the backends
    /// those frontends' slots point at.
    pub fn remove_unclaimed_except(
        &mut self,
        keep: impl Fn(&FrontendId) -> bool,
    ) -> Result<(usize, usize)> {
        let gone: Vec<FrontendId> = self.adopted.keys().filter(|f| !keep(f)).copied().collect();
        let n_fe = gone.len();
        let mut j = Journal::not_recording();
        for fid in gone {
            if let Some(slots) = self.adopted.get(&fid).cloned() {
                let ranges = self
                    .revnat_ids
                    .get(&fid)
                    .and_then(|id| self.adopted_ranges.get(id))
                    .cloned()
                    .unwrap_or_default();
                let fe = InstalledFrontend {
                    slots,
                    maglev: BTreeSet::new(),
                    ranges,
                };
                self.delete_frontend_maps(&fid, &fe, &mut j)?;
            }
            self.adopted.remove(&fid);
            if let Some(id) = self.revnat_ids.get(&fid) {
                self.adopted_ranges.remove(id);
            }
            self.forget_frontend(&fid);
        }
        // Prefixes under ids no frontend has (a write cut short).
        let orphan_ids: Vec<u16> = self
            .adopted_ranges
            .keys()
            .filter(|id| !self.used_revnat_ids.contains(id))
            .copied()
            .collect();
        for id in orphan_ids {
            if let Some(ranges) = self.adopted_ranges.remove(&id) {
                for p in ranges {
                    self.del_range(id, p, &mut j)?;
                }
            }
        }
        if !self.adopted.is_empty() {
            // Kept frontends still point at their backends by id.
            return Ok((n_fe, 0));
        }
        let orphans: Vec<(BackendAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| self.backend_refs.get(id).copied().unwrap_or(0) == 0)
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in &orphans {
            self.backend_ids.remove(addr);
            self.used_backend_ids.remove(id);
            self.backend_refs.remove(id);
            ignore_missing(self.be.remove(&BackendKey { id: *id })).map_err(map_err(names::BE4))?;
        }
        Ok((n_fe, orphans.len()))
    }

    /// The backend id of `addr`, if it has one.
    pub fn backend_id_of(&self, addr: &BackendAddr) -> Option<u32> {
        self.backend_ids.get(addr).copied()
    }

    /// The reverse-NAT id of a frontend, if it has one.
    pub fn revnat_id_of(&self, fe: &FrontendId) -> Option<u16> {
        self.revnat_ids.get(fe).copied()
    }

    /// How many services reference backend `id`.
    pub fn backend_refs(&self, id: u32) -> u32 {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }

    /// Names of the services written through this writer.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.installed.keys().map(String::as_str)
    }

    /// Raw dump of `rt_svc4_v1` (for the CLI and failing tests).
    pub fn dump_services(&self) -> Vec<(SvcKey, SvcValue)> {
        self.svc
            .iter()
            .filter_map(std::result::Result::ok)
            .collect()
    }

    /// The allowed source prefixes in `rt_srcrange4_v1`, as (frontend
    /// reverse-NAT id, network address, length), sorted.
    pub fn dump_source_ranges(&self) -> Vec<(u16, Ipv4Addr, u8)> {
        let mut v: Vec<(u16, Ipv4Addr, u8)> = self
            .srcrange
            .keys()
            .filter_map(std::result::Result::ok)
            .filter_map(|k| {
                let len = k.prefix_len().checked_sub(SRCRANGE_PREFIX_BASE)?;
                let d = k.data();
                Some((d.revnat_id, Ipv4Addr::from(u32::from_be(d.addr_be)), u8::try_from(len).ok()?))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Raw dump of `rt_be4_v1`.
    pub fn dump_backends(&self) -> Vec<(BackendKey, BackendValue)> {
        self.be.iter().filter_map(std::result::Result::ok).collect()
    }

    /// The Maglev table of a frontend's scope (`M` ids, `M` from its
    /// master), if the master says Maglev and every chunk is there.
    pub fn maglev_table(&self, fe: &FrontendId, scope: u8) -> Option<Vec<u32>> {
        let revnat_id = self.revnat_id_of(fe)?;
        let master = self.svc.get(&fe.key(scope, 0), 0).ok()?;
        if master.algorithm != ALG_MAGLEV {
            return None;
        }
        let m = master.backend_id as usize;
        let mut t = Vec::with_capacity(m);
        for c in 0..m.div_ceil(MAGLEV_CHUNK) {
            let v = self
                .maglev
                .get(&maglev_key(revnat_id, scope, c).ok()?, 0)
                .ok()?;
            t.extend_from_slice(&v.backend_ids);
        }
        t.truncate(m);
        Some(t)
    }

    /// The keys of `rt_maglev4_v2` (which table chunks exist).
    pub fn dump_maglev(&self) -> Vec<MaglevKey> {
        self.maglev
            .keys()
            .filter_map(std::result::Result::ok)
            .collect()
    }

    /// Raw dump of `rt_revnat4_v1`.
    pub fn dump_revnat(&self) -> Vec<(RevNatKey, RevNatValue)> {
        self.revnat
            .iter()
            .filter_map(std::result::Result::ok)
            .collect()
    }
}
