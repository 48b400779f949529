//! The writer: [`Services`] puts [`Service`]s into a node's maps
//! (`rt_svc4_v1`, `rt_be4_v1`, `rt_revnat4_v1`, `rt_maglev4_v1`) and keeps
//! the bookkeeping (ids, backend refcounts) that makes updates incremental.
//!
//! Writes happen in the order a running program tolerates (Cilium
//! `lb.h`): backends first, then the slots of each frontend, then the master
//! entry with the new count last; shrinking deletes the extra slots only
//! after the master says they are gone; removal deletes the master first and
//! the backends last. Backends are shared between services by address and
//! refcounted; backend ids and reverse-NAT ids are read back from the pinned
//! maps on open, so a restarted agent keeps them stable (and established
//! flows, whose conntrack entries hold backend ids, keep working).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet as StdHashSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::maps::{HashMap, MapData};
use riptide_common::{
    BackendKey, BackendValue, MAGLEV_M, MaglevKey, MaglevValue, RevNatKey, RevNatValue, SCOPE_EXT,
    SvcKey, SvcValue, names,
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
    frontends: BTreeMap<FrontendId, InstalledFrontend>,
    backends: BTreeSet<BackendAddr>,
}

#[derive(Clone)]
struct InstalledFrontend {
    /// Slot count written per scope.
    slots: BTreeMap<u8, u16>,
    /// Scopes with a Maglev table.
    maglev: BTreeSet<u8>,
}

/// Writes services into a node's maps and keeps the bookkeeping (ids,
/// backend refcounts) that makes updates incremental.
pub struct Services {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    be: HashMap<MapData, BackendKey, BackendValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    maglev: HashMap<MapData, MaglevKey, MaglevValue>,
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
    next_backend_id: u32,
    next_revnat_id: u16,
}

impl Services {
    /// Opens the node's pinned service maps and reads back the ids in use.
    pub fn open_pinned(node: &str) -> Result<Self> {
        let dir = crate::pin_dir(node)?;
        let open = |name: &'static str| -> Result<aya::maps::Map> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Ok(aya::maps::Map::HashMap(data))
        };
        Self::from_maps(
            open(names::SVC4)?,
            open(names::BE4)?,
            open(names::REVNAT4)?,
            open(names::MAGLEV4)?,
        )
    }

    pub(crate) fn from_maps(
        svc: aya::maps::Map,
        be: aya::maps::Map,
        revnat: aya::maps::Map,
        maglev: aya::maps::Map,
    ) -> Result<Self> {
        let svc = HashMap::try_from(svc).map_err(map_err(names::SVC4))?;
        let be = HashMap::try_from(be).map_err(map_err(names::BE4))?;
        let revnat = HashMap::try_from(revnat).map_err(map_err(names::REVNAT4))?;
        let maglev = HashMap::try_from(maglev).map_err(map_err(names::MAGLEV4))?;
        let mut s = Self {
            svc,
            be,
            revnat,
            maglev,
            installed: StdHashMap::new(),
            backend_ids: StdHashMap::new(),
            backend_refs: StdHashMap::new(),
            revnat_ids: StdHashMap::new(),
            used_backend_ids: StdHashSet::new(),
            used_revnat_ids: StdHashSet::new(),
            frontend_owner: StdHashMap::new(),
            adopted: BTreeMap::new(),
            adopted_maglev: BTreeSet::new(),
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
        let mut id = self.next_revnat_id.max(1);
        let mut tries = 0u32;
        while used.contains(&id) || id == 0 {
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

    /// Adds or replaces `svc`.
    pub fn upsert(&mut self, svc: &Service) -> Result<()> {
        // Frontend ownership: one frontend belongs to one service.
        for fid in svc.frontend_ids() {
            if let Some(name) = self.frontend_owner.get(&fid) {
                if name != &svc.name {
                    return Err(Error::Service {
                        service: svc.name.clone(),
                        reason: format!(
                            "frontend {}:{} already belongs to {name}",
                            fid.addr, fid.port
                        ),
                    });
                }
            }
        }
        for b in &svc.backends {
            self.backend_id(svc.backend_addr(b))?;
        }
        for fid in svc.frontend_ids() {
            self.revnat_id(fid)?;
        }
        let plan = build(svc, &self.backend_ids, &self.revnat_ids)?;
        let old = self.take_installed(&svc.name);
        let new_backends: BTreeSet<BackendAddr> =
            svc.backends.iter().map(|b| svc.backend_addr(b)).collect();

        // 1. Backends (new ones become visible before any slot names them).
        for (id, value) in &plan.backends {
            self.be
                .insert(BackendKey { id: *id }, *value, 0)
                .map_err(map_err(names::BE4))?;
        }
        for addr in &new_backends {
            let in_old = old.as_ref().is_some_and(|o| o.backends.contains(addr));
            if !in_old {
                let id = self.backend_ids[addr];
                *self.backend_refs.entry(id).or_insert(0) += 1;
            }
        }

        // 2. Frontends: reverse NAT, slots, master (count last), then shrink.
        let mut frontends = BTreeMap::new();
        for fp in &plan.frontends {
            let fid = fp.id;
            let prev = match old.as_ref().and_then(|o| o.frontends.get(&fid)) {
                Some(f) => (f.slots.clone(), f.maglev.clone()),
                None => {
                    let slots = self.adopted.remove(&fid).unwrap_or_default();
                    let maglev = slots
                        .keys()
                        .filter(|scope| self.adopted_maglev.remove(&(fp.revnat_id, **scope)))
                        .copied()
                        .collect();
                    (slots, maglev)
                }
            };
            let (slots, maglev) = self.write_frontend(fp, &prev.0, &prev.1)?;
            frontends.insert(
                fid,
                InstalledFrontend {
                    slots,
                    maglev,
                },
            );
        }

        // 3. Frontends the new version dropped.
        if let Some(o) = &old {
            for (fid, f) in &o.frontends {
                if !frontends.contains_key(fid) {
                    self.delete_frontend(fid, &f.slots)?;
                }
            }
        }

        // 4. Backends the new version dropped, once nothing points at them.
        if let Some(o) = &old {
            for addr in o.backends.difference(&new_backends) {
                self.unref_backend(*addr)?;
            }
        }
        for fid in frontends.keys() {
            self.frontend_owner.insert(*fid, svc.name.clone());
        }
        self.installed.insert(
            svc.name.clone(),
            Installed {
                frontends,
                backends: new_backends,
            },
        );
        tracing::debug!(service = %svc.name, frontends = svc.frontends.len(), backends = svc.backends.len(), "service written");
        Ok(())
    }

    fn write_frontend(
        &mut self,
        fp: &FrontendPlan,
        prev: &BTreeMap<u8, u16>,
        prev_maglev: &BTreeSet<u8>,
    ) -> Result<(BTreeMap<u8, u16>, BTreeSet<u8>)> {
        let fe = &fp.id;
        let rn = RevNatValue {
            vip_be: u32::from(fe.addr).to_be(),
            port_be: fe.port.to_be(),
            _pad: 0,
        };
        self.revnat
            .insert(
                RevNatKey {
                    id: fp.revnat_id,
                    _pad: 0,
                },
                rn,
                0,
            )
            .map_err(map_err(names::REVNAT4))?;
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
                self.svc
                    .insert(fe.key(sp.scope, slot), v, 0)
                    .map_err(map_err(names::SVC4))?;
            }
            // The table before the master that says "Maglev" (a reader
            // without a table falls back to a random slot anyway).
            let mkey = MaglevKey {
                revnat_id: fp.revnat_id,
                scope: sp.scope,
                _pad: 0,
            };
            if let Some(t) = &sp.maglev {
                let mut v = MaglevValue {
                    backend_ids: [0; MAGLEV_M],
                    _pad: 0,
                };
                for (d, id) in v.backend_ids.iter_mut().zip(t) {
                    *d = *id;
                }
                self.maglev
                    .insert(mkey, v, 0)
                    .map_err(map_err(names::MAGLEV4))?;
                maglev_written.insert(sp.scope);
            }
            self.svc
                .insert(fe.key(sp.scope, 0), sp.master, 0)
                .map_err(map_err(names::SVC4))?;
            if sp.maglev.is_none() && prev_maglev.contains(&sp.scope) {
                ignore_missing(self.maglev.remove(&mkey)).map_err(map_err(names::MAGLEV4))?;
            }
            let n = sp.master.count;
            let old_n = prev.get(&sp.scope).copied().unwrap_or(0);
            for slot in (n + 1)..=old_n {
                ignore_missing(self.svc.remove(&fe.key(sp.scope, slot)))
                    .map_err(map_err(names::SVC4))?;
            }
            written.insert(sp.scope, n);
        }
        // A scope the frontend no longer has (two scopes → one): the EXT
        // master written above no longer points at it; delete it now.
        for (scope, old_n) in prev {
            if !written.contains_key(scope) {
                self.delete_scope(*fe, *scope, *old_n)?;
            }
        }
        Ok((written, maglev_written))
    }

    fn delete_scope(&mut self, fid: FrontendId, scope: u8, n: u16) -> Result<()> {
        // Master first: no new lookup finds the scope, then its slots.
        ignore_missing(self.svc.remove(&fid.key(scope, 0))).map_err(map_err(names::SVC4))?;
        for slot in 1..=n {
            ignore_missing(self.svc.remove(&fid.key(scope, slot))).map_err(map_err(names::SVC4))?;
        }
        if let Some(&revnat_id) = self.revnat_ids.get(&fid) {
            let key = MaglevKey {
                revnat_id,
                scope,
                _pad: 0,
            };
            ignore_missing(self.maglev.remove(&key)).map_err(map_err(names::MAGLEV4))?;
            self.adopted_maglev.remove(&(revnat_id, scope));
        }
        Ok(())
    }

    fn delete_frontend(&mut self, fid: &FrontendId, slots: &BTreeMap<u8, u16>) -> Result<()> {
        // EXT first: it is the entry every lookup starts from.
        let mut scopes: Vec<_> = slots.iter().collect();
        scopes.sort_by_key(|(scope, _)| **scope != SCOPE_EXT);
        for (scope, n) in scopes {
            self.delete_scope(*fid, *scope, *n)?;
        }
        if let Some(id) = self.revnat_ids.remove(fid) {
            self.used_revnat_ids.remove(&id);
            ignore_missing(self.revnat.remove(&RevNatKey { id, _pad: 0 }))
                .map_err(map_err(names::REVNAT4))?;
        }
        Ok(())
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

    fn unref_backend(&mut self, addr: BackendAddr) -> Result<()> {
        let Some(&id) = self.backend_ids.get(&addr) else {
            return Ok(());
        };
        let refs = self.backend_refs.entry(id).or_insert(0);
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.backend_refs.remove(&id);
            self.backend_ids.remove(&addr);
            self.used_backend_ids.remove(&id);
            ignore_missing(self.be.remove(&BackendKey { id })).map_err(map_err(names::BE4))?;
        }
        Ok(())
    }

    /// Removes service `name` and every entry only it used. Unknown names
    /// are not an error (idempotent delete).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let Some(old) = self.take_installed(name) else {
            return Ok(());
        };
        for (fid, f) in &old.frontends {
            self.delete_frontend(fid, &f.slots)?;
        }
        for addr in &old.backends {
            self.unref_backend(*addr)?;
        }
        tracing::debug!(service = %name, "service removed");
        Ok(())
    }

    /// After the initial full resync of a restarted agent: deletes frontends
    /// found in the maps that no upserted service claimed, and backends no
    /// service references. Returns how many frontends and backends went.
    pub fn remove_unclaimed(&mut self) -> Result<(usize, usize)> {
        let adopted = std::mem::take(&mut self.adopted);
        let n_fe = adopted.len();
        for (fid, slots) in &adopted {
            self.delete_frontend(fid, slots)?;
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

    /// Raw dump of `rt_be4_v1`.
    pub fn dump_backends(&self) -> Vec<(BackendKey, BackendValue)> {
        self.be.iter().filter_map(std::result::Result::ok).collect()
    }

    /// The Maglev table of a frontend's scope, if written.
    pub fn maglev_table(&self, fe: &FrontendId, scope: u8) -> Option<Vec<u32>> {
        let revnat_id = self.revnat_id_of(fe)?;
        let key = MaglevKey {
            revnat_id,
            scope,
            _pad: 0,
        };
        self.maglev
            .get(&key, 0)
            .ok()
            .map(|v| v.backend_ids.to_vec())
    }

    /// The keys of `rt_maglev4_v1` (which tables exist).
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

