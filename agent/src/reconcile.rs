//! Desired service ports → the difference written to the datapath.
//!
//! Desired state is kept per owner (a Service or a Pod with hostPorts), so a
//! change re-computes one owner, not the cluster. What was written is kept
//! per service-port name; [`Reconciler::apply`] writes only the ports whose
//! effective content changed. A port is held once: the written copy is the
//! desired one (an `Arc`) unless a conflict cut frontends from it. Two owners claiming the same frontend
//! (address:port/protocol) are resolved deterministically: Services before
//! Pods, then by name; the loser keeps its other frontends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use riptide_datapath::service::{BackendState, FrontendId, Service, Services};

use crate::model::{Desired, HealthCheck, Owner};

/// Where service ports are written (the datapath's [`Services`] writer, or a
/// recorder in tests).
pub trait ServiceWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Adds or replaces the port named `port.name`.
    fn upsert(&mut self, port: &Service) -> Result<(), Self::Error>;
    /// Removes the port `name` (unknown names are fine).
    fn remove(&mut self, name: &str) -> Result<(), Self::Error>;
    /// After the first full sync: drops entries found in the maps at start
    /// that no port claimed (a restarted agent's leftovers), except the
    /// frontends in `keep` (ports whose write failed keep their previous
    /// entries until a retry succeeds). Returns how many frontends went.
    fn finish_resync(&mut self, keep: &HashSet<FrontendId>) -> Result<usize, Self::Error>;
}

impl ServiceWriter for Services {
    type Error = riptide_datapath::Error;

    fn upsert(&mut self, port: &Service) -> Result<(), Self::Error> {
        Services::upsert(self, port)
    }

    fn remove(&mut self, name: &str) -> Result<(), Self::Error> {
        Services::remove(self, name)
    }

    fn finish_resync(&mut self, keep: &HashSet<FrontendId>) -> Result<usize, Self::Error> {
        let (frontends, backends) = self.remove_unclaimed_except(|f| keep.contains(f))?;
        if frontends + backends > 0 {
            tracing::info!(frontends, backends, "removed entries no Service claims any more");
        }
        Ok(frontends)
    }
}

/// What one [`Reconciler::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub upserted: usize,
    pub removed: usize,
    /// Ports whose write failed; they stay dirty and are retried.
    pub failed: Vec<(String, String)>,
}

/// A port's name as the reconciler's tables hold it: one allocation per
/// port, shared by every table that names it.
pub type PortName = Arc<str>;

/// A port claim on a frontend; ordering decides conflicts.
type Claim = (Owner, PortName);

#[derive(Default)]
pub struct Reconciler {
    /// Port names per owner.
    owners: HashMap<Owner, Vec<PortName>>,
    /// Desired ports (all claimed frontends) by name.
    ports: BTreeMap<PortName, Arc<Service>>,
    /// Claims per frontend, sorted (the first wins). Nearly every
    /// frontend has one claim: a vector of one costs a tenth of a
    /// `BTreeSet`, whose first insert allocates a whole node.
    claims: HashMap<FrontendId, Vec<Claim>>,
    /// Ports as last written (effective frontends only): the same `Arc` as
    /// in `ports` when the port won all its frontends.
    applied: BTreeMap<PortName, Arc<Service>>,
    dirty: BTreeSet<PortName>,
    health: BTreeMap<Owner, HealthCheck>,
    notes: HashMap<Owner, Vec<String>>,
    /// Ports whose last write failed → the error (retried while dirty).
    failed: BTreeMap<PortName, String>,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces what `owner` wants (an empty [`Desired`] removes it).
    pub fn set(&mut self, owner: &Owner, desired: Desired) {
        if desired.notes.is_empty() {
            self.notes.remove(owner);
        } else if self.notes.get(owner) != Some(&desired.notes) {
            for note in &desired.notes {
                tracing::info!(owner = %owner, "{note}");
            }
            self.notes.insert(owner.clone(), desired.notes.clone());
        }
        match desired.health_check {
            Some(hc) => {
                self.health.insert(owner.clone(), hc);
            }
            None => {
                self.health.remove(owner);
            }
        }
        let old = self.owners.remove(owner).unwrap_or_default();
        for name in &old {
            if let Some(p) = self.ports.remove(name) {
                for id in p.frontend_ids() {
                    self.unclaim(id, owner, name);
                }
            }
            self.dirty.insert(Arc::clone(name));
        }
        let mut names = Vec::with_capacity(desired.ports.len());
        for p in desired.ports {
            // A port the owner had keeps its name's allocation.
            let name = old.iter().find(|n| ***n == *p.name).map_or_else(|| PortName::from(p.name.as_str()), Arc::clone);
            for id in p.frontend_ids() {
                let set = self.claims.entry(id).or_insert_with(|| Vec::with_capacity(1));
                let claim = (owner.clone(), Arc::clone(&name));
                if let Err(at) = set.binary_search(&claim) {
                    set.insert(at, claim);
                }
                // Everyone else claiming it may win or lose now.
                self.dirty.extend(set.iter().map(|(_, n)| Arc::clone(n)));
            }
            self.dirty.insert(Arc::clone(&name));
            names.push(Arc::clone(&name));
            self.ports.insert(name, Arc::new(p));
        }
        if !names.is_empty() {
            self.owners.insert(owner.clone(), names);
        }
    }

    fn unclaim(&mut self, id: FrontendId, owner: &Owner, name: &str) {
        if let Some(set) = self.claims.get_mut(&id) {
            if let Ok(at) = set.binary_search_by(|(o, n)| (o, &**n).cmp(&(owner, name))) {
                set.remove(at);
            }
            self.dirty.extend(set.iter().map(|(_, n)| Arc::clone(n)));
            if set.is_empty() {
                self.claims.remove(&id);
            }
        }
    }

    /// Owners currently known.
    pub fn owners(&self) -> impl Iterator<Item = &Owner> {
        self.owners.keys()
    }

    /// Forgets every owner `keep` says no (after a relist).
    pub fn retain_owners(&mut self, keep: impl Fn(&Owner) -> bool) {
        let gone: Vec<Owner> = self
            .owners
            .keys()
            .chain(self.health.keys())
            .filter(|o| !keep(o))
            .cloned()
            .collect();
        for o in gone {
            self.set(&o, Desired::default());
        }
    }

    /// `port` with only the frontends it wins (`port` itself when it wins
    /// them all, as nearly every port does).
    fn effective(&self, port: &Arc<Service>) -> Arc<Service> {
        let wins = |f: &riptide_datapath::service::Frontend| {
            self.claims
                .get(&f.id(port.protocol))
                .and_then(|s| s.first())
                .is_some_and(|(_, n)| **n == *port.name)
        };
        if port.frontends.iter().all(wins) {
            return Arc::clone(port);
        }
        let mut p = Service::clone(port);
        p.frontends.retain(wins);
        Arc::new(p)
    }

    /// Frontends a port lost to another owner (for the status output).
    pub fn conflicts(&self) -> Vec<(FrontendId, Vec<String>)> {
        self.claims
            .iter()
            .filter(|(_, s)| s.len() > 1)
            .map(|(id, s)| (*id, s.iter().map(|(_, n)| n.to_string()).collect()))
            .collect()
    }

    /// Whether anything waits to be written.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Writes the difference. Removals first, then ports that gain no
    /// frontend, then the rest: a frontend moving between ports is released
    /// before it is claimed (the writer refuses shared frontends).
    pub fn apply<W: ServiceWriter>(&mut self, w: &mut W) -> ApplyReport {
        let mut report = ApplyReport::default();
        let dirty = std::mem::take(&mut self.dirty);
        let mut removes = Vec::new();
        let mut shrinks = Vec::new();
        let mut grows = Vec::new();
        for name in dirty {
            match self.ports.get(&name).map(|p| self.effective(p)) {
                None => {
                    if self.applied.contains_key(&name) {
                        removes.push(name);
                    }
                }
                Some(eff) => match self.applied.get(&name) {
                    Some(old) if *old == eff => {}
                    Some(old) if eff.frontends.iter().all(|f| old.frontends.contains(f)) => shrinks.push((name, eff)),
                    _ => grows.push((name, eff)),
                },
            }
        }
        let mut failed = Vec::new();
        for name in removes {
            match w.remove(&name) {
                Ok(()) => {
                    tracing::info!(port = %name, "service port removed");
                    self.applied.remove(&name);
                    self.failed.remove(&name);
                    report.removed += 1;
                }
                Err(e) => failed.push((name, error_chain(&e))),
            }
        }
        for (name, eff) in shrinks.into_iter().chain(grows) {
            match w.upsert(&eff) {
                Ok(()) => {
                    log_change(self.applied.get(&name).map(AsRef::as_ref), &eff);
                    self.failed.remove(&name);
                    report.upserted += 1;
                    self.applied.insert(name, eff);
                }
                Err(e) => failed.push((name, error_chain(&e))),
            }
        }
        for (name, err) in failed {
            // Retried every second: said again only when the error changes.
            if self.failed.get(&name) != Some(&err) {
                tracing::warn!(port = %name, error = %err, "writing service port failed; will retry");
            }
            report.failed.push((name.to_string(), err.clone()));
            self.dirty.insert(Arc::clone(&name));
            self.failed.insert(name, err);
        }
        // A port no owner wants any more cannot fail any more.
        self.failed.retain(|n, _| self.ports.contains_key(n) || self.applied.contains_key(n));
        report
    }

    /// Owners (`namespace/name`, `pod/namespace/name`) with a port whose
    /// last write failed, with that error: they are retried while the rest
    /// of the node is served. A failed removal of a gone owner is named by
    /// its port.
    pub fn failing(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (owner, names) in &self.owners {
            if let Some(err) = names.iter().find_map(|n| self.failed.get(n)) {
                out.insert(owner.to_string(), err.clone());
            }
        }
        for (name, err) in &self.failed {
            if !self.ports.contains_key(name) {
                out.insert(name.to_string(), err.clone());
            }
        }
        out
    }

    /// Frontends of ports whose last write failed (what they held before
    /// stays in the maps until a retry succeeds).
    pub fn failing_frontends(&self) -> HashSet<FrontendId> {
        self.failed
            .keys()
            .filter_map(|n| self.ports.get(n).or_else(|| self.applied.get(n)))
            .flat_map(|p| p.frontend_ids())
            .collect()
    }

    /// Ports as written, by name.
    pub fn applied(&self) -> &BTreeMap<PortName, Arc<Service>> {
        &self.applied
    }

    /// Health checks of eTP=Local Services, by owner.
    pub fn health_checks(&self) -> &BTreeMap<Owner, HealthCheck> {
        &self.health
    }
}

/// Cuts every port of `desired` to at most `cap` backends, keeping ready
/// ones before serving-terminating before the rest, local before remote
/// (eTP/iTP=Local frontends use only local ones), then by address so every
/// pass keeps the same set. Returns (backends of the largest port, kept)
/// when something was cut.
pub fn cap_backends(desired: &mut Desired, cap: usize) -> Option<(usize, usize)> {
    let mut cut = None;
    for p in &mut desired.ports {
        let n = p.backends.len();
        if n <= cap {
            continue;
        }
        let rank = |s: BackendState| match s {
            BackendState::Active => 0,
            BackendState::Terminating => 1,
            BackendState::Quarantined => 2,
        };
        p.backends.sort_by_key(|b| (rank(b.state), !b.local, b.addr));
        p.backends.truncate(cap);
        let (all, _) = cut.get_or_insert((0, cap));
        *all = (*all).max(n);
    }
    cut
}

fn log_change(old: Option<&Service>, new: &Service) {
    let backends = new.backends.len();
    let frontends = new.frontends.len();
    match old {
        None => tracing::info!(port = %new.name, frontends, backends, "service port added"),
        Some(o) => tracing::info!(
            port = %new.name, frontends, backends,
            backends_before = o.backends.len(),
            "service port updated"
        ),
    }
}

/// `e: cause: cause…` in one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
