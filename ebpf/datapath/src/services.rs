//! Services → map entries (`rt_svc4_v1`, `rt_be4_v1`, `rt_revnat4_v1`).
//!
//! A [`Service`] here is one Kubernetes *service port*: its frontends
//! (ClusterIP:port, NodePort, externalIPs, LoadBalancer ingress IPs,
//! hostPorts) share one backend list (endpoints with the target port
//! resolved per EndpointSlice). The agent makes one per `ServicePort`.
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
    net::Ipv4Addr,
};

use aya::maps::{HashMap, MapData, MapError};
use riptide_common::{
    ALG_MAGLEV, ALG_RANDOM, BE_F_LOCAL, BE_STATE_ACTIVE, BE_STATE_QUARANTINED,
    BE_STATE_TERMINATING, BackendKey, BackendValue, MAGLEV_M, MaglevKey, MaglevValue, RevNatKey,
    RevNatValue, SCOPE_EXT, SCOPE_INT, SVC_F_AFFINITY, SVC_F_CLUSTERIP, SVC_F_EXTERNALIP,
    SVC_F_HOSTPORT, SVC_F_LOADBALANCER, SVC_F_LOCAL_ONLY, SVC_F_NODEPORT, SVC_F_TWO_SCOPES, SvcKey,
    SvcValue, names, proto,
};

use crate::{Error, Result};

/// Transport protocol of a frontend or backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    ClusterIp,
    /// `addr` is ignored: a NodePort answers on every node address.
    NodePort,
    ExternalIp,
    LoadBalancer,
    /// `addr` is the hostIP, or UNSPECIFIED for every node address.
    HostPort,
}

/// One address:port a service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    fn vip(&self) -> Ipv4Addr {
        match self.kind {
            FrontendKind::NodePort => Ipv4Addr::UNSPECIFIED,
            _ => self.addr,
        }
    }

    fn key(&self, scope: u8, slot: u16) -> SvcKey {
        SvcKey {
            vip_be: u32::from(self.vip()).to_be(),
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            scope,
            slot,
            _pad: 0,
        }
    }

    fn id(&self) -> FrontendId {
        FrontendId {
            vip: self.vip(),
            port: self.port,
            protocol: self.protocol,
        }
    }

    fn kind_flag(&self) -> u16 {
        match self.kind {
            FrontendKind::ClusterIp => SVC_F_CLUSTERIP,
            FrontendKind::NodePort => SVC_F_NODEPORT,
            FrontendKind::ExternalIp => SVC_F_EXTERNALIP,
            FrontendKind::LoadBalancer => SVC_F_LOADBALANCER,
            FrontendKind::HostPort => SVC_F_HOSTPORT,
        }
    }

    /// Frontends reached from outside the cluster obey
    /// externalTrafficPolicy; the ClusterIP obeys internalTrafficPolicy.
    fn is_external(&self) -> bool {
        !matches!(self.kind, FrontendKind::ClusterIp | FrontendKind::HostPort)
    }
}

/// A frontend's identity in the maps (what `rt_svc4_v1` is keyed by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendId {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// Endpoint conditions, as the agent derives them from an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// `ready`: used for new flows.
    Active,
    /// `serving && terminating`: used for new flows only when no backend is
    /// ready (KEP-1669); existing flows keep it.
    Terminating,
    /// Neither ready nor serving: kept only so established flows are not
    /// cut while the endpoint still exists.
    Quarantined,
}

/// A backend address (shared across services by this identity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// One endpoint of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    /// The target port, resolved (named ports per EndpointSlice).
    pub port: u16,
    pub state: BackendState,
    /// Runs on this node.
    pub local: bool,
}

/// externalTrafficPolicy / internalTrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// How a service picks a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// A random slot (kube-proxy's behaviour).
    #[default]
    Random,
    /// Maglev consistent hashing of the 5-tuple (`rt_maglev4_v1`): every
    /// node picks the same backend for a flow and backend changes move
    /// few flows. Socket LB still picks at random (no 5-tuple at connect
    /// time, and a local choice needs no agreement between nodes).
    Maglev,
}

/// One Kubernetes service port, as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Stable identity, e.g. `default/web:http`. Upserting the same name
    /// replaces the previous version.
    pub name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` with `timeoutSeconds`.
    pub affinity_timeout_s: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// Backend selection for new flows (per service).
    pub algorithm: Algorithm,
}

impl Service {
    fn backend_addr(&self, b: &Backend) -> BackendAddr {
        BackendAddr {
            addr: b.addr,
            port: b.port,
            protocol: self.protocol,
        }
    }
}

// ----------------------------------------------------------- pure building

/// The entries of one scope of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopePlan {
    pub scope: u8,
    pub master: SvcValue,
    /// Backend ids of slots `1..=len`.
    pub slots: Vec<u32>,
    /// The scope's Maglev table (`MAGLEV_M` backend ids) when the service
    /// uses Maglev and has backends.
    pub maglev: Option<Vec<u32>>,
}

/// The entries of one frontend; `scopes` is in write order (INT before the
/// EXT master that points readers at it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub frontend: Frontend,
    pub revnat_id: u16,
    pub scopes: Vec<ScopePlan>,
}

/// Every map entry of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub backends: Vec<(u32, BackendValue)>,
    pub frontends: Vec<FrontendPlan>,
}

/// Backends eligible for new flows among `candidates` (KEP-1669: ready ones;
/// if none is ready, the serving-terminating ones).
fn eligible<'a>(candidates: impl Iterator<Item = &'a Backend> + Clone) -> Vec<&'a Backend> {
    let ready: Vec<_> = candidates
        .clone()
        .filter(|b| b.state == BackendState::Active)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .filter(|b| b.state == BackendState::Terminating)
        .collect()
}

/// Builds the map entries of `svc` given its ids. Pure: no map access.
pub fn build(
    svc: &Service,
    backend_ids: &StdHashMap<BackendAddr, u32>,
    revnat_ids: &StdHashMap<FrontendId, u16>,
) -> Result<Plan> {
    let id_of = |b: &Backend| -> Result<u32> {
        backend_ids
            .get(&svc.backend_addr(b))
            .copied()
            .ok_or_else(|| Error::Service {
                service: svc.name.clone(),
                reason: format!("no id for backend {}:{}", b.addr, b.port),
            })
    };
    let mut backends = Vec::new();
    let mut seen = BTreeSet::new();
    for b in &svc.backends {
        let id = id_of(b)?;
        if !seen.insert(id) {
            continue;
        }
        backends.push((
            id,
            BackendValue {
                addr_be: u32::from(b.addr).to_be(),
                port_be: b.port.to_be(),
                proto: svc.protocol.number(),
                state: match b.state {
                    BackendState::Active => BE_STATE_ACTIVE,
                    BackendState::Terminating => BE_STATE_TERMINATING,
                    BackendState::Quarantined => BE_STATE_QUARANTINED,
                },
                flags: if b.local { BE_F_LOCAL } else { 0 },
            },
        ));
    }
    // Deterministic slot order (sorted by address) so a re-sync with the
    // same endpoints writes identical entries.
    let mut sorted: Vec<&Backend> = svc.backends.iter().collect();
    sorted.sort_by_key(|b| (b.addr, b.port));
    sorted.dedup_by_key(|b| (b.addr, b.port));
    let all = eligible(sorted.iter().copied());
    let local = eligible(sorted.iter().copied().filter(|b| b.local));

    let mut frontends = Vec::new();
    for fe in &svc.frontends {
        if fe.protocol != svc.protocol {
            return Err(Error::Service {
                service: svc.name.clone(),
                reason: format!("frontend {}:{} has another protocol", fe.addr, fe.port),
            });
        }
        let revnat_id = *revnat_ids.get(&fe.id()).ok_or_else(|| Error::Service {
            service: svc.name.clone(),
            reason: format!("no reverse-NAT id for frontend {}:{}", fe.vip(), fe.port),
        })?;
        let mut flags = fe.kind_flag();
        let mut affinity_timeout_s = 0;
        if let Some(t) = svc.affinity_timeout_s {
            flags |= SVC_F_AFFINITY;
            affinity_timeout_s = t;
        }
        let ids = |set: &[&Backend]| -> Result<Vec<u32>> { set.iter().map(|b| id_of(b)).collect() };
        let maglev = svc.algorithm == Algorithm::Maglev;
        let master = |flags: u16, n: usize| -> Result<SvcValue> {
            Ok(SvcValue {
                backend_id: 0,
                count: u16::try_from(n).map_err(|_| Error::Service {
                    service: svc.name.clone(),
                    reason: format!("{n} backends exceed a frontend's 65535 slots"),
                })?,
                revnat_id,
                flags,
                algorithm: if maglev && n > 0 {
                    ALG_MAGLEV
                } else {
                    ALG_RANDOM
                },
                _pad: 0,
                affinity_timeout_s,
            })
        };
        let scope = |scope: u8, flags: u16, set: &[&Backend]| -> Result<ScopePlan> {
            let slots = ids(set)?;
            let table = if maglev && !set.is_empty() {
                let entries: Vec<(u32, Ipv4Addr, u16)> = set
                    .iter()
                    .zip(&slots)
                    .map(|(b, id)| (*id, b.addr, b.port))
                    .collect();
                Some(crate::maglev::table(&entries))
            } else {
                None
            };
            Ok(ScopePlan {
                scope,
                master: master(flags, slots.len())?,
                slots,
                maglev: table,
            })
        };
        // hostPort backends are the node's own pod: always local.
        let scopes = if fe.is_external() && svc.external_policy == TrafficPolicy::Local {
            // eTP=Local: outside clients only reach local backends (client
            // address kept); traffic from inside still uses every backend.
            vec![
                scope(SCOPE_INT, flags, &all)?,
                scope(
                    SCOPE_EXT,
                    flags | SVC_F_LOCAL_ONLY | SVC_F_TWO_SCOPES,
                    &local,
                )?,
            ]
        } else if !fe.is_external()
            && fe.kind == FrontendKind::ClusterIp
            && svc.internal_policy == TrafficPolicy::Local
        {
            // iTP=Local: in-cluster clients only reach backends on their own
            // node; a node without one rejects (as kube-proxy drops).
            vec![scope(SCOPE_EXT, flags | SVC_F_LOCAL_ONLY, &local)?]
        } else {
            vec![scope(SCOPE_EXT, flags, &all)?]
        };
        frontends.push(FrontendPlan {
            frontend: *fe,
            revnat_id,
            scopes,
        });
    }
    Ok(Plan {
        backends,
        frontends,
    })
}

// --------------------------------------------------------------- the writer

struct Installed {
    frontends: BTreeMap<FrontendId, InstalledFrontend>,
    backends: BTreeSet<BackendAddr>,
}

#[derive(Clone)]
struct InstalledFrontend {
    frontend: Frontend,
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

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Deleting an absent key is success. aya 0.14 reports it from
/// `bpf_map_delete_elem` as a syscall error with ENOENT, not as
/// `MapError::KeyNotFound` (which only lookups return), so accept both.
pub(crate) fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
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
                addr: Ipv4Addr::from(u32::from_be(v.addr_be)),
                port: u16::from_be(v.port_be),
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
                vip: Ipv4Addr::from(u32::from_be(k.vip_be)),
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
        for fe in &svc.frontends {
            if let Some(name) = self.frontend_owner.get(&fe.id()) {
                if name != &svc.name {
                    return Err(Error::Service {
                        service: svc.name.clone(),
                        reason: format!(
                            "frontend {}:{} already belongs to {name}",
                            fe.vip(),
                            fe.port
                        ),
                    });
                }
            }
        }
        for b in &svc.backends {
            self.backend_id(svc.backend_addr(b))?;
        }
        for fe in &svc.frontends {
            self.revnat_id(fe.id())?;
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
            let fid = fp.frontend.id();
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
                    frontend: fp.frontend,
                    slots,
                    maglev,
                },
            );
        }

        // 3. Frontends the new version dropped.
        if let Some(o) = &old {
            for (fid, f) in &o.frontends {
                if !frontends.contains_key(fid) {
                    self.delete_frontend(&f.frontend.id(), &f.slots)?;
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
        let fe = &fp.frontend;
        let rn = RevNatValue {
            vip_be: u32::from(fe.vip()).to_be(),
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
                self.delete_scope(fe.id(), *scope, *old_n)?;
            }
        }
        Ok((written, maglev_written))
    }

    fn delete_scope(&mut self, fid: FrontendId, scope: u8, n: u16) -> Result<()> {
        let fe = Frontend {
            kind: FrontendKind::ClusterIp,
            addr: fid.vip,
            port: fid.port,
            protocol: fid.protocol,
        };
        // Master first: no new lookup finds the scope, then its slots.
        ignore_missing(self.svc.remove(&fe.key(scope, 0))).map_err(map_err(names::SVC4))?;
        for slot in 1..=n {
            ignore_missing(self.svc.remove(&fe.key(scope, slot))).map_err(map_err(names::SVC4))?;
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
    pub fn revnat_id_of(&self, fe: &Frontend) -> Option<u16> {
        self.revnat_ids.get(&fe.id()).copied()
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
    pub fn maglev_table(&self, fe: &Frontend, scope: u8) -> Option<Vec<u32>> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn be(addr: &str, state: BackendState, local: bool) -> Backend {
        Backend {
            addr: ip(addr),
            port: 8080,
            state,
            local,
        }
    }

    fn svc(backends: Vec<Backend>) -> Service {
        Service {
            name: "default/web:http".into(),
            protocol: Protocol::Tcp,
            frontends: vec![
                Frontend {
                    kind: FrontendKind::ClusterIp,
                    addr: ip("10.43.0.10"),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                Frontend {
                    kind: FrontendKind::NodePort,
                    addr: ip("198.18.0.1"),
                    port: 30080,
                    protocol: Protocol::Tcp,
                },
            ],
            backends,
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            algorithm: Algorithm::Random,
        }
    }

    fn ids(s: &Service) -> (StdHashMap<BackendAddr, u32>, StdHashMap<FrontendId, u16>) {
        let b = s
            .backends
            .iter()
            .enumerate()
            .map(|(i, x)| (s.backend_addr(x), 100 + i as u32))
            .collect();
        let f = s
            .frontends
            .iter()
            .enumerate()
            .map(|(i, x)| (x.id(), 7 + i as u16))
            .collect();
        (b, f)
    }

    #[test]
    fn maglev_service_gets_a_table_over_the_eligible_backends() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
            be("10.42.0.9", BackendState::Terminating, true),
        ]);
        s.algorithm = Algorithm::Maglev;
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        for fp in &plan.frontends {
            let sp = &fp.scopes[0];
            assert_eq!(sp.master.algorithm, ALG_MAGLEV);
            let t = sp.maglev.as_ref().unwrap();
            assert_eq!(t.len(), MAGLEV_M);
            let used: BTreeSet<u32> = t.iter().copied().collect();
            assert_eq!(used, BTreeSet::from([100, 101]), "ready backends only");
        }
        // Random services and services without backends have no table.
        s.algorithm = Algorithm::Random;
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.frontends[0].scopes[0].maglev.is_none());
        assert_eq!(plan.frontends[0].scopes[0].master.algorithm, ALG_RANDOM);
        s.algorithm = Algorithm::Maglev;
        s.backends.clear();
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.frontends[0].scopes[0].maglev.is_none());
        assert_eq!(plan.frontends[0].scopes[0].master.algorithm, ALG_RANDOM);
    }

    #[test]
    fn clusterip_and_nodeport_get_all_ready_backends_in_address_order() {
        let s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
            be("10.42.0.9", BackendState::Terminating, true),
        ]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(
            plan.backends.len(),
            3,
            "terminating backends stay in the backend map"
        );
        let ci = &plan.frontends[0];
        assert_eq!(ci.scopes.len(), 1);
        assert_eq!(ci.scopes[0].scope, SCOPE_EXT);
        assert_eq!(
            ci.scopes[0].slots,
            vec![101, 100],
            "sorted by address, terminating excluded"
        );
        assert_eq!(ci.scopes[0].master.count, 2);
        assert_eq!(ci.scopes[0].master.revnat_id, 7);
        assert_eq!(ci.scopes[0].master.flags, SVC_F_CLUSTERIP);
        let np = &plan.frontends[1];
        assert_eq!(
            np.frontend.key(SCOPE_EXT, 0).vip_be,
            0,
            "NodePort is node-wide"
        );
        assert_eq!(np.frontend.key(SCOPE_EXT, 0).port_be, 30080u16.to_be());
        assert_eq!(np.scopes[0].master.flags, SVC_F_NODEPORT);
        let local = plan.backends.iter().find(|(id, _)| *id == 101).unwrap().1;
        assert_eq!(local.flags, BE_F_LOCAL);
        assert_eq!(local.addr_be, u32::from(ip("10.42.0.2")).to_be());
    }

    #[test]
    fn terminating_backends_are_used_only_when_none_is_ready() {
        let s = svc(vec![
            be("10.42.0.9", BackendState::Terminating, true),
            be("10.42.0.8", BackendState::Quarantined, true),
        ]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(plan.frontends[0].scopes[0].slots, vec![100]);
        let term = plan.backends.iter().find(|(id, _)| *id == 100).unwrap().1;
        assert_eq!(term.state, BE_STATE_TERMINATING);
    }

    #[test]
    fn no_backends_gives_count_zero() {
        let s = svc(vec![]);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert!(plan.backends.is_empty());
        assert_eq!(plan.frontends[0].scopes[0].master.count, 0);
    }

    #[test]
    fn external_traffic_policy_local_uses_two_scopes() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
        ]);
        s.external_policy = TrafficPolicy::Local;
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        // ClusterIP is not governed by eTP.
        assert_eq!(plan.frontends[0].scopes.len(), 1);
        let np = &plan.frontends[1];
        assert_eq!(np.scopes.len(), 2);
        assert_eq!(
            np.scopes[0].scope, SCOPE_INT,
            "INT written before the EXT master"
        );
        assert_eq!(np.scopes[0].slots, vec![101, 100]);
        assert_eq!(np.scopes[1].scope, SCOPE_EXT);
        assert_eq!(np.scopes[1].slots, vec![101], "only the local backend");
        assert_eq!(
            np.scopes[1].master.flags,
            SVC_F_NODEPORT | SVC_F_LOCAL_ONLY | SVC_F_TWO_SCOPES
        );
    }

    #[test]
    fn internal_traffic_policy_local_restricts_clusterip() {
        let mut s = svc(vec![
            be("10.42.1.3", BackendState::Active, false),
            be("10.42.0.2", BackendState::Active, true),
        ]);
        s.internal_policy = TrafficPolicy::Local;
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        assert_eq!(plan.frontends[0].scopes[0].slots, vec![101]);
        assert_eq!(
            plan.frontends[0].scopes[0].master.flags,
            SVC_F_CLUSTERIP | SVC_F_LOCAL_ONLY
        );
        assert_eq!(
            plan.frontends[1].scopes[0].slots,
            vec![101, 100],
            "NodePort unaffected"
        );
    }

    #[test]
    fn affinity_sets_flag_and_timeout() {
        let mut s = svc(vec![be("10.42.0.2", BackendState::Active, true)]);
        s.affinity_timeout_s = Some(10_800);
        let (b, f) = ids(&s);
        let plan = build(&s, &b, &f).unwrap();
        let m = plan.frontends[0].scopes[0].master;
        assert_eq!(m.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
        assert_eq!(m.affinity_timeout_s, 10_800);
    }

    #[test]
    fn mismatched_frontend_protocol_is_an_error() {
        let mut s = svc(vec![]);
        s.frontends[0].protocol = Protocol::Udp;
        let (b, f) = ids(&s);
        assert!(build(&s, &b, &f).is_err());
    }
}
