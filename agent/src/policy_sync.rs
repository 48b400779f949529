//! NetworkPolicy into the datapath: the compiler's output
//! ([`crate::policy::Compiled`]) written to `rt_ipcache4_v1`,
//! `rt_policy4_v1` and `rt_polep4_v1` by difference with what the maps hold.
//! Each ipcache entry and rule has one place: a `/32` goes to the
//! exact-match `rt_ipcache4x_v1`, a single-port rule to `rt_policy4x_v1`
//! (the programs ask those first), everything else to the tries. An entry
//! found in the other map of its pair (written by an agent before the
//! split) counts as stale there: the pass writes it in its place, then
//! removes it with the other stale entries.
//!
//! Write order, for the programs that judge new flows meanwhile (the
//! Cilium order, `pkg/policy` → `bpf/lib/policy.h`): ipcache entries first
//! (peers get their identities before rules name them), then new and
//! changed rules (keyed by endpoint id: unused until the endpoint entry
//! points at them), then endpoint entries (a pod becomes isolated with its
//! rules already in place), and only then deletions — stale endpoint
//! entries, stale rules, stale ipcache entries — so a narrowing change
//! narrows last and nothing is ever judged against a half-written state
//! that allows more than either the old or the new one.
//!
//! Failures fail closed: a rule that cannot be written sets
//! [`PE_F_FAIL_CLOSED`] on its endpoint (the programs then deny all but the
//! node and the pod itself), an ipcache entry that cannot be written sets
//! it on every endpoint (any of them could misjudge that peer). The report
//! names them; the agent turns not ready, logs and counts them, and the
//! next pass (a second later) retries from what the maps really hold.
//!
//! What the maps hold is read back (`list`) on the first pass and after
//! any failed write; otherwise the last pass's state is trusted (the agent
//! is the maps' only writer, under the node lock). A restarted agent hands
//! that read ([`PolicySync::read_back`]) to the compiler's `adopt` before
//! its first compile, so identities and endpoint ids keep their pinned
//! numbers and the first pass rewrites only what changed while it was down.
//! Where the pinned entries may still mean other label sets than the new
//! compile's (what adoption could not match, or no adoption), every pinned
//! endpoint entry is set fail-closed before that pass writes anything, so
//! no flow is judged by old rules against new identities (brief denials of
//! new flows of isolated pods, never a wrong allow).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    net::Ipv4Addr,
};

use riptide_common::{IpcacheValue, PE_F_FAIL_CLOSED, POLICY_PREFIX_FULL, PolicyEndpointValue, PolicyKey, PolicyValue, identity};
use riptide_datapath::policy::PolicyMaps;

use crate::policy::{Compiled, Inputs, RuleKey};

/// An `rt_ipcache4_v1` entry: (address, prefix length) → identities.
pub type IpcacheEntry = ((Ipv4Addr, u8), IpcacheValue);

/// Where the policy maps are written (the datapath's [`PolicyMaps`], or a
/// recorder with injected failures in tests).
pub trait PolicyWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn upsert_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: IpcacheValue) -> Result<(), Self::Error>;
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), Self::Error>;
    fn list_ipcache(&self) -> Result<Vec<IpcacheEntry>, Self::Error>;
    fn upsert_endpoint(&mut self, addr: Ipv4Addr, value: PolicyEndpointValue) -> Result<(), Self::Error>;
    fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), Self::Error>;
    fn list_endpoints(&self) -> Result<Vec<(Ipv4Addr, PolicyEndpointValue)>, Self::Error>;
    fn upsert_rule(&mut self, rule: RuleKey, value: PolicyValue) -> Result<(), Self::Error>;
    fn remove_rule(&mut self, rule: RuleKey) -> Result<(), Self::Error>;
    fn list_rules(&self) -> Result<Vec<(RuleKey, PolicyValue)>, Self::Error>;
    fn upsert_ipcache_exact(&mut self, addr: Ipv4Addr, value: IpcacheValue) -> Result<(), Self::Error>;
    fn remove_ipcache_exact(&mut self, addr: Ipv4Addr) -> Result<(), Self::Error>;
    fn list_ipcache_exact(&self) -> Result<Vec<(Ipv4Addr, IpcacheValue)>, Self::Error>;
    fn upsert_rule_exact(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), Self::Error>;
    fn remove_rule_exact(&mut self, key: PolicyKey) -> Result<(), Self::Error>;
    fn list_rules_exact(&self) -> Result<Vec<(PolicyKey, PolicyValue)>, Self::Error>;
}

/// Whether the ipcache entry of a prefix of `len` bits lives in
/// `rt_ipcache4x_v1`.
pub fn ipcache_exact(len: u8) -> bool {
    len == 32
}

/// Whether `rule` lives in `rt_policy4x_v1`.
pub fn rule_exact(rule: &RuleKey) -> bool {
    rule.prefix_len == POLICY_PREFIX_FULL
}

impl PolicyWriter for PolicyMaps {
    type Error = riptide_datapath::Error;

    fn upsert_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8, value: IpcacheValue) -> Result<(), Self::Error> {
        PolicyMaps::upsert_ipcache(self, addr, prefix_len, value)
    }
    fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), Self::Error> {
        PolicyMaps::remove_ipcache(self, addr, prefix_len)
    }
    fn list_ipcache(&self) -> Result<Vec<IpcacheEntry>, Self::Error> {
        PolicyMaps::list_ipcache(self)
    }
    fn upsert_endpoint(&mut self, addr: Ipv4Addr, value: PolicyEndpointValue) -> Result<(), Self::Error> {
        PolicyMaps::upsert_endpoint(self, addr, value)
    }
    fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), Self::Error> {
        PolicyMaps::remove_endpoint(self, addr)
    }
    fn list_endpoints(&self) -> Result<Vec<(Ipv4Addr, PolicyEndpointValue)>, Self::Error> {
        PolicyMaps::list_endpoints(self)
    }
    fn upsert_rule(&mut self, rule: RuleKey, value: PolicyValue) -> Result<(), Self::Error> {
        PolicyMaps::upsert_rule(self, rule.prefix_len, rule.key, value)
    }
    fn remove_rule(&mut self, rule: RuleKey) -> Result<(), Self::Error> {
        PolicyMaps::remove_rule(self, rule.prefix_len, rule.key)
    }
    fn list_rules(&self) -> Result<Vec<(RuleKey, PolicyValue)>, Self::Error> {
        Ok(PolicyMaps::list_rules(self)?
            .into_iter()
            .map(|((prefix_len, key), v)| (RuleKey { prefix_len, key }, v))
            .collect())
    }
    fn upsert_ipcache_exact(&mut self, addr: Ipv4Addr, value: IpcacheValue) -> Result<(), Self::Error> {
        PolicyMaps::upsert_ipcache_exact(self, addr, value)
    }
    fn remove_ipcache_exact(&mut self, addr: Ipv4Addr) -> Result<(), Self::Error> {
        PolicyMaps::remove_ipcache_exact(self, addr)
    }
    fn list_ipcache_exact(&self) -> Result<Vec<(Ipv4Addr, IpcacheValue)>, Self::Error> {
        PolicyMaps::list_ipcache_exact(self)
    }
    fn upsert_rule_exact(&mut self, key: PolicyKey, value: PolicyValue) -> Result<(), Self::Error> {
        PolicyMaps::upsert_rule_exact(self, key, value)
    }
    fn remove_rule_exact(&mut self, key: PolicyKey) -> Result<(), Self::Error> {
        PolicyMaps::remove_rule_exact(self, key)
    }
    fn list_rules_exact(&self) -> Result<Vec<(PolicyKey, PolicyValue)>, Self::Error> {
        PolicyMaps::list_rules_exact(self)
    }
}

/// The contents of the five maps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapState {
    /// `rt_ipcache4_v1` (the trie).
    pub ipcache: BTreeMap<(Ipv4Addr, u8), IpcacheValue>,
    pub endpoints: BTreeMap<Ipv4Addr, PolicyEndpointValue>,
    /// `rt_policy4_v1` (the trie).
    pub rules: HashMap<RuleKey, PolicyValue>,
    /// `rt_ipcache4x_v1`: the `/32`s.
    pub ipcache_exact: BTreeMap<Ipv4Addr, IpcacheValue>,
    /// `rt_policy4x_v1`: the single-port rules.
    pub rules_exact: HashMap<PolicyKey, PolicyValue>,
}

impl MapState {
    /// Reads the maps.
    pub fn read<W: PolicyWriter>(w: &W) -> Result<Self, W::Error> {
        Ok(Self {
            ipcache: w.list_ipcache()?.into_iter().collect(),
            endpoints: w.list_endpoints()?.into_iter().collect(),
            rules: w.list_rules()?.into_iter().collect(),
            ipcache_exact: w.list_ipcache_exact()?.into_iter().collect(),
            rules_exact: w.list_rules_exact()?.into_iter().collect(),
        })
    }

    /// Every ipcache entry, of either map, as `(address, prefix length)`.
    pub fn all_ipcache(&self) -> impl Iterator<Item = ((Ipv4Addr, u8), IpcacheValue)> + '_ {
        let exact = self.ipcache_exact.iter().map(|(a, v)| ((*a, 32), *v));
        self.ipcache.iter().map(|(k, v)| (*k, *v)).chain(exact)
    }

    /// Every rule, of either map.
    pub fn all_rules(&self) -> impl Iterator<Item = RuleKey> + '_ {
        let exact = self.rules_exact.keys().map(|key| RuleKey { prefix_len: POLICY_PREFIX_FULL, key: *key });
        self.rules.keys().copied().chain(exact)
    }

    /// Rule entries in both maps.
    pub fn rule_count(&self) -> usize {
        self.rules.len() + self.rules_exact.len()
    }

    /// The state `compiled` asks for, each entry in its map.
    pub fn desired(compiled: &Compiled) -> Self {
        let (exact, trie): (BTreeMap<_, _>, BTreeMap<_, _>) = compiled.ipcache.iter().map(|(k, v)| (*k, *v)).partition(|((_, len), _)| ipcache_exact(*len));
        let (rules_exact, rules): (HashMap<_, _>, HashMap<_, _>) = compiled.rules.iter().map(|(k, v)| (*k, *v)).partition(|(k, _)| rule_exact(k));
        Self {
            ipcache: trie,
            endpoints: compiled.endpoints.clone(),
            rules,
            ipcache_exact: exact.into_iter().map(|((a, _), v)| (a, v)).collect(),
            rules_exact: rules_exact.into_iter().map(|(k, v)| (k.key, v)).collect(),
        }
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The maps were read back before the diff (first pass, or after a
    /// failure).
    pub read_back: bool,
    /// The read-back state named endpoints or identities differently from
    /// this compile (an agent restart): pinned endpoints were set
    /// fail-closed before anything else was written.
    pub renumbered: bool,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
    pub rules_written: usize,
    pub rules_removed: usize,
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    /// Local pods left fail-closed because some write for them failed.
    pub fail_closed: BTreeSet<Ipv4Addr>,
    /// Every failed operation, one line each (retried on the next pass).
    pub errors: Vec<String>,
}

impl SyncReport {
    /// Everything asked for is in the maps.
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.fail_closed.is_empty()
    }

    pub fn changed(&self) -> bool {
        self.ipcache_written + self.ipcache_removed + self.rules_written + self.rules_removed + self.endpoints_written + self.endpoints_removed > 0
    }
}

/// Keeps the policy maps equal to the last compile.
pub struct PolicySync<W> {
    writer: W,
    /// What the maps hold; `None`: read them back before the next diff.
    known: Option<MapState>,
    /// `known` was read from the maps by [`Self::read_back`] and no pass
    /// has written since.
    fresh: bool,
}

impl<W: PolicyWriter> PolicySync<W> {
    pub fn new(writer: W) -> Self {
        Self { writer, known: None, fresh: false }
    }

    /// Reads the maps now (unless the last pass left a trusted state) and
    /// returns what they hold: a restarted agent hands it to
    /// [`crate::policy::Compiler::adopt`] before its first compile, so the
    /// first pass rewrites only what changed while it was down. The next
    /// [`Self::sync`] diffs against this read.
    pub fn read_back(&mut self) -> Result<&MapState, W::Error> {
        let known = match self.known.take() {
            Some(k) => k,
            None => {
                let k = MapState::read(&self.writer)?;
                self.fresh = true;
                k
            }
        };
        Ok(self.known.insert(known))
    }

    /// What the maps hold as far as the last pass knows (`None` before the
    /// first pass and after a failed one).
    pub fn known(&self) -> Option<&MapState> {
        self.known.as_ref()
    }

    /// Makes the maps hold what `compiled` asks for (see the module docs
    /// for the order and the failure rules).
    pub fn sync(&mut self, compiled: &Compiled) -> SyncReport {
        let mut rep = SyncReport { read_back: std::mem::take(&mut self.fresh), ..SyncReport::default() };
        let mut have = match self.known.take() {
            Some(k) => k,
            None => match MapState::read(&self.writer) {
                Ok(k) => {
                    rep.read_back = true;
                    k
                }
                Err(e) => {
                    rep.errors.push(format!("reading the policy maps: {}", crate::reconcile::error_chain(&e)));
                    // Nothing known, nothing written: every local isolated
                    // pod counts as not enforced.
                    rep.fail_closed = compiled.endpoints.keys().copied().collect();
                    return rep;
                }
            },
        };
        // Only the endpoints change on the way (fail-closed flags); the
        // ipcache and the rules, by far the largest, are read in place.
        let (want_ipcache, want_rules) = (&compiled.ipcache, &compiled.rules);
        let mut want_endpoints = compiled.endpoints.clone();
        if rep.read_back && renumbered(&have, compiled) {
            rep.renumbered = true;
            self.close_all(&mut have, &mut rep);
        }
        let mut failed_eps: BTreeSet<u32> = BTreeSet::new();
        let mut all_failed = false;

        for (&(addr, len), v) in want_ipcache {
            let exact = ipcache_exact(len);
            let held = if exact { have.ipcache_exact.get(&addr) } else { have.ipcache.get(&(addr, len)) };
            if held == Some(v) {
                continue;
            }
            let written = if exact { self.writer.upsert_ipcache_exact(addr, *v) } else { self.writer.upsert_ipcache(addr, len, *v) };
            match written {
                Ok(()) => {
                    if exact {
                        have.ipcache_exact.insert(addr, *v);
                    } else {
                        have.ipcache.insert((addr, len), *v);
                    }
                    rep.ipcache_written += 1;
                }
                Err(e) => {
                    all_failed = true;
                    rep.errors.push(format!("ipcache {addr}/{len}: {}", crate::reconcile::error_chain(&e)));
                }
            }
        }
        let held = |have: &MapState, k: &RuleKey| if rule_exact(k) { have.rules_exact.get(&k.key).copied() } else { have.rules.get(k).copied() };
        let mut rules: Vec<(&RuleKey, &PolicyValue)> = want_rules.iter().filter(|(k, v)| held(&have, k) != Some(**v)).collect();
        // Deterministic order (the map is a HashMap): by endpoint, then key.
        rules.sort_by_key(|(k, _)| rule_order(k));
        for (k, v) in rules {
            let exact = rule_exact(k);
            let written = if exact { self.writer.upsert_rule_exact(k.key, *v) } else { self.writer.upsert_rule(*k, *v) };
            match written {
                Ok(()) => {
                    if exact {
                        have.rules_exact.insert(k.key, *v);
                    } else {
                        have.rules.insert(*k, *v);
                    }
                    rep.rules_written += 1;
                }
                Err(e) => {
                    failed_eps.insert(u32::from_be(k.key.ep_id_be));
                    rep.errors.push(format!("rule {}: {}", describe(k), crate::reconcile::error_chain(&e)));
                }
            }
        }
        for (addr, v) in &mut want_endpoints {
            if all_failed || failed_eps.contains(&v.ep_id) {
                v.flags |= PE_F_FAIL_CLOSED;
                rep.fail_closed.insert(*addr);
            }
        }
        for (&addr, v) in &want_endpoints {
            if have.endpoints.get(&addr) == Some(v) {
                continue;
            }
            match self.writer.upsert_endpoint(addr, *v) {
                Ok(()) => {
                    have.endpoints.insert(addr, *v);
                    rep.endpoints_written += 1;
                }
                Err(e) => {
                    // Whatever entry it had stays: older rules, or none.
                    rep.fail_closed.insert(addr);
                    rep.errors.push(format!("endpoint {addr}: {}", crate::reconcile::error_chain(&e)));
                }
            }
        }

        let w = &mut self.writer;
        let stale: Vec<Ipv4Addr> = have.endpoints.keys().filter(|a| !want_endpoints.contains_key(a)).copied().collect();
        rep.endpoints_removed += remove_stale(stale, &mut rep.errors, |a| format!("endpoint {a}"), |a| {
            w.remove_endpoint(*a).map(|()| {
                have.endpoints.remove(a);
            })
        });
        // A trie entry that belongs to a hash is stale in the trie.
        let mut stale: Vec<RuleKey> = have.rules.keys().filter(|k| rule_exact(k) || !want_rules.contains_key(k)).copied().collect();
        stale.sort_by_key(rule_order);
        rep.rules_removed += remove_stale(stale, &mut rep.errors, |k| format!("rule {}", describe(k)), |k| {
            w.remove_rule(*k).map(|()| {
                have.rules.remove(k);
            })
        });
        let mut stale: Vec<RuleKey> =
            have.rules_exact.keys().map(|key| RuleKey { prefix_len: POLICY_PREFIX_FULL, key: *key }).filter(|k| !want_rules.contains_key(k)).collect();
        stale.sort_by_key(rule_order);
        rep.rules_removed += remove_stale(stale, &mut rep.errors, |k| format!("rule {}", describe(k)), |k| {
            w.remove_rule_exact(k.key).map(|()| {
                have.rules_exact.remove(&k.key);
            })
        });
        let stale: Vec<(Ipv4Addr, u8)> = have.ipcache.keys().filter(|k| ipcache_exact(k.1) || !want_ipcache.contains_key(k)).copied().collect();
        rep.ipcache_removed += remove_stale(stale, &mut rep.errors, |(a, len)| format!("ipcache {a}/{len}"), |&(a, len)| {
            w.remove_ipcache(a, len).map(|()| {
                have.ipcache.remove(&(a, len));
            })
        });
        let stale: Vec<Ipv4Addr> = have.ipcache_exact.keys().filter(|a| !want_ipcache.contains_key(&(**a, 32))).copied().collect();
        rep.ipcache_removed += remove_stale(stale, &mut rep.errors, |a| format!("ipcache {a}/32"), |a| {
            w.remove_ipcache_exact(*a).map(|()| {
                have.ipcache_exact.remove(a);
            })
        });
        // After a failure the maps are read again: the next diff starts
        // from the truth, not from what this pass believes it did.
        if rep.errors.is_empty() {
            self.known = Some(have);
        }
        rep
    }

    /// Sets every endpoint entry in `have` fail-closed (a restart renumbered
    /// ids; see the module docs).
    fn close_all(&mut self, have: &mut MapState, rep: &mut SyncReport) {
        for (addr, v) in &mut have.endpoints {
            if v.flags & PE_F_FAIL_CLOSED != 0 {
                continue;
            }
            let closed = PolicyEndpointValue { flags: v.flags | PE_F_FAIL_CLOSED, ..*v };
            match self.writer.upsert_endpoint(*addr, closed) {
                Ok(()) => *v = closed,
                Err(e) => rep.errors.push(format!("closing endpoint {addr}: {}", crate::reconcile::error_chain(&e))),
            }
        }
    }

    /// The writer (tests inspect the maps through it).
    pub fn writer(&self) -> &W {
        &self.writer
    }
}

/// Whether `have` (read from pinned maps) may use an endpoint id or an
/// identity with another meaning than `want`. The maps do not say which
/// label set an identity stood for, so this is conservative: an address
/// both know with other values, an endpoint with another id or identity,
/// or an id `have` uses that `want` gives to an address `have` does not
/// know (a new pod could have taken an old number).
fn renumbered(have: &MapState, want: &Compiled) -> bool {
    let held = |(addr, len): &(Ipv4Addr, u8)| if ipcache_exact(*len) { have.ipcache_exact.get(addr).or_else(|| have.ipcache.get(&(*addr, *len))) } else { have.ipcache.get(&(*addr, *len)) };
    let changed_ipcache = want.ipcache.iter().any(|(k, v)| held(k).is_some_and(|h| h != v));
    let changed_eps = want.endpoints.iter().any(|(a, v)| have.endpoints.get(a).is_some_and(|h| (h.ep_id, h.identity) != (v.ep_id, v.identity)));
    let old_ids: BTreeSet<u32> = have
        .all_ipcache()
        .flat_map(|(_, v)| [v.identity, v.cidr_identity])
        .chain(have.all_rules().map(|k| u32::from_be(k.key.identity_be)))
        .chain(have.endpoints.values().map(|v| v.identity))
        // Reserved identities mean the same to every agent.
        .filter(|id| *id >= identity::FIRST_LABELS)
        .collect();
    let reused_id = want
        .ipcache
        .iter()
        .filter(|(k, _)| held(k).is_none())
        .any(|(_, v)| old_ids.contains(&v.identity) || (v.cidr_identity != 0 && old_ids.contains(&v.cidr_identity)));
    let old_eps: BTreeSet<u32> = have.endpoints.values().map(|v| v.ep_id).chain(have.all_rules().map(|k| u32::from_be(k.key.ep_id_be))).collect();
    let reused_ep = want.endpoints.iter().filter(|(a, _)| !have.endpoints.contains_key(a)).any(|(_, v)| old_eps.contains(&v.ep_id));
    changed_ipcache || changed_eps || reused_id || reused_ep
}

/// A hash of what the compiler reads from `inputs`, so a batch of changes
/// nothing depends on (pod status churn, Node heartbeats, annotation-only
/// edits) skips the compile. Pods, Namespaces, NetworkPolicies and Nodes
/// count by the fields the compiler uses, not by resourceVersion.
pub fn inputs_fingerprint(inputs: &Inputs<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    let mut json = |v: &dyn erased::Json| v.hash_json(&mut h);
    for p in inputs.pods {
        json(&(p.namespace(), p.name(), &p.uid, p.labels(), p.deleting));
        json(&(&p.spec, &p.status));
    }
    for n in inputs.namespaces {
        json(&(&n.metadata.name, &n.metadata.labels, &n.metadata.annotations));
    }
    for p in inputs.policies {
        json(&(&p.metadata.namespace, &p.metadata.name, &p.metadata.uid, &p.spec));
    }
    for n in inputs.nodes {
        json(&(n.name(), n.status.as_ref().map(|s| &s.addresses)));
    }
    h.write(inputs.node_name.as_bytes());
    inputs.host_addrs.hash(&mut h);
    h.finish()
}

/// Hashing any serializable value through its JSON form (k8s-openapi types
/// do not implement `Hash`), streamed into the hasher without a buffer.
mod erased {
    use std::{hash::Hasher, io};

    pub trait Json {
        fn hash_json(&self, h: &mut std::hash::DefaultHasher);
    }

    impl<T: serde::Serialize> Json for T {
        fn hash_json(&self, h: &mut std::hash::DefaultHasher) {
            struct W<'a>(&'a mut std::hash::DefaultHasher);
            impl io::Write for W<'_> {
                fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                    self.0.write(buf);
                    Ok(buf.len())
                }
                fn flush(&mut self) -> io::Result<()> {
                    Ok(())
                }
            }
            // Cannot fail: the writer never does and every map key of these
            // types is a string.
            let _ = serde_json::to_writer(W(h), self);
            // A separator, so (a, b) and (ab, "") differ.
            h.write_u8(0xff);
        }
    }
}

/// Removes each of `stale` in order with `remove` (which also forgets it in
/// the known state) and returns how many went; a failure is reported as
/// "removing {what}: …" and the entry stays for the next pass.
fn remove_stale<K, E: std::error::Error + 'static>(
    stale: Vec<K>,
    errors: &mut Vec<String>,
    what: impl Fn(&K) -> String,
    mut remove: impl FnMut(&K) -> Result<(), E>,
) -> usize {
    let mut removed = 0;
    for k in stale {
        match remove(&k) {
            Ok(()) => removed += 1,
            Err(e) => errors.push(format!("removing {}: {}", what(&k), crate::reconcile::error_chain(&e))),
        }
    }
    removed
}

fn rule_order(k: &RuleKey) -> (u32, u32, u8, u8, u16, u32) {
    (
        u32::from_be(k.key.ep_id_be),
        u32::from_be(k.key.identity_be),
        k.key.dir,
        k.key.proto,
        u16::from_be(k.key.port_be),
        k.prefix_len,
    )
}

fn describe(k: &RuleKey) -> String {
    let PolicyKey { ep_id_be, identity_be, dir, proto, port_be } = k.key;
    format!(
        "ep {} identity {} dir {dir} proto {proto} port {}/{}",
        u32::from_be(ep_id_be),
        u32::from_be(identity_be),
        u16::from_be(port_be),
        k.prefix_len
    )
}

#[cfg(test)]
#[path = "policy_sync_tests.rs"]
mod tests;
