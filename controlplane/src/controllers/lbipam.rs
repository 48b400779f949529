//! LoadBalancer IP address management, as Cilium LB-IPAM and MetalLB do it
//! without a cloud: addresses for `type: LoadBalancer` Services come from
//! pools an operator lists in the ConfigMap `kube-system/riptide-lb-pools`
//! (format: [`crate::lb_pools`]). The apiserver admits a pool's addresses
//! in `status.loadBalancer.ingress` without them being in the externalIPs
//! allow list, so what this controller writes always passes admission.
//!
//! Which Services are ours: `type: LoadBalancer` with no
//! `spec.loadBalancerClass` or [`LB_CLASS`]; any other class belongs to
//! another implementation and is never touched (KEP-1959).
//!
//! What a Service gets: the addresses named by the annotation
//! [`ANNOTATION_IPS`] (comma-separated; Cilium's `lbipam.cilium.io/ips`),
//! else `spec.loadBalancerIP`, else the lowest free address of the pool
//! named by [`ANNOTATION_POOL`] or of any pool (pools in name order). A
//! request is all or nothing: an address outside every pool or held by
//! another Service is a Warning Event and nothing new is assigned.
//!
//! The assignment is `status.loadBalancer.ingress`, written through the
//! status subresource; there is no other state. Every pass rebuilds the
//! allocation from the stored Services, oldest Service first, so two
//! Services claiming one address resolve the same way every time (the
//! older keeps it) and a restarted controller picks up where it was. An
//! address is released when its Service is deleted (it simply stops being
//! held), changes type away from LoadBalancer (its ingress is cleared),
//! asks for another address, or when the address leaves every pool.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    sync::Mutex,
};

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{events::Recorder, util::key};
pub use crate::lb_pools::{POOLS_CONFIGMAP, POOLS_NAMESPACE, Pool, PoolError, parse_pools};

/// `spec.loadBalancerClass` this controller answers to (besides none).
pub const LB_CLASS: &str = "riptide.io/lbipam";
/// Requested addresses, comma-separated (takes precedence over
/// `spec.loadBalancerIP`).
pub const ANNOTATION_IPS: &str = "lbipam.riptide.io/ips";
/// Restricts dynamic allocation to one pool.
pub const ANNOTATION_POOL: &str = "lbipam.riptide.io/pool";

/// Event reasons, stable for users who filter on them.
pub const REASON_ALLOCATED: &str = "IPAllocated";
pub const REASON_RELEASED: &str = "IPReleased";
pub const REASON_IN_USE: &str = "IPAlreadyInUse";
pub const REASON_NOT_IN_POOL: &str = "IPNotInPool";
pub const REASON_EXHAUSTED: &str = "PoolExhausted";
pub const REASON_NO_POOL: &str = "NoPool";
pub const REASON_BAD_REQUEST: &str = "InvalidIPRequest";
pub const REASON_BAD_POOLS: &str = "InvalidPools";

/// What this controller makes of one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    /// Ours: requested addresses (empty: any one) and an optional pool.
    Managed { requested: Result<Vec<Ipv4Addr>, String>, pool: Option<String> },
    /// Ours before, not a LoadBalancer now: clear what it holds.
    Release,
    /// Another class, or on its way out: its addresses stay blocked.
    Ignore,
}

/// The part of a Service the allocation looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcView {
    /// `namespace/name`.
    pub key: String,
    /// Sort key: creation time (RFC 3339 sorts by time), then key.
    pub age: String,
    pub wants: Wants,
    /// IPv4 addresses of `status.loadBalancer.ingress`.
    pub held: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        })
    }
}

/// One Service's outcome of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub key: String,
    /// The ingress to write, when it differs from what is held.
    pub set: Option<Vec<Ipv4Addr>>,
    /// (type, reason, message)
    pub event: Option<(EventType, &'static str, String)>,
}

pub fn view(svc: &Service) -> SvcView {
    let spec = svc.spec.as_ref();
    let held: Vec<Ipv4Addr> = svc
        .status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect();
    let class = spec.and_then(|s| s.load_balancer_class.as_deref());
    let ours = class.is_none_or(|c| c == LB_CLASS);
    let is_lb = spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
    let wants = if svc.metadata.deletion_timestamp.is_some() || !ours {
        Wants::Ignore
    } else if is_lb {
        let ann = svc.annotations();
        let text = ann
            .get(ANNOTATION_IPS)
            .cloned()
            .or_else(|| spec.and_then(|s| s.load_balancer_ip.clone()))
            .unwrap_or_default();
        let requested = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
            .map(|e| e.parse::<Ipv4Addr>().map_err(|_| format!("{e:?} is not an IPv4 address")))
            .collect::<Result<Vec<_>, _>>();
        Wants::Managed { requested, pool: ann.get(ANNOTATION_POOL).cloned() }
    } else {
        Wants::Release
    };
    let age = svc.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    SvcView { key: key(svc), age, wants, held }
}

fn list(ips: &[Ipv4Addr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// One allocation pass over every Service: what to write and what to tell.
/// Pure, so every rule above has a unit test.
pub fn plan(pools: &[Pool], svcs: &[SvcView]) -> Vec<Decision> {
    let mut order: Vec<&SvcView> = svcs.iter().collect();
    order.sort_by(|a, b| (&a.age, &a.key).cmp(&(&b.age, &b.key)));
    let pool_of = |ip: Ipv4Addr| pools.iter().find(|p| p.contains(ip));
    // address → holder
    let mut taken: HashMap<Ipv4Addr, &str> = HashMap::new();
    // Addresses of other implementations and of Services being deleted
    // stay blocked; nothing of ours may collide with them.
    for s in order.iter().filter(|s| s.wants == Wants::Ignore) {
        for ip in &s.held {
            taken.entry(*ip).or_insert(&s.key);
        }
    }
    // Pass 1, oldest first: what a Service holds and may keep.
    let mut kept: HashMap<&str, Vec<Ipv4Addr>> = HashMap::new();
    for s in &order {
        let Wants::Managed { requested, pool } = &s.wants else { continue };
        let mut keep = Vec::new();
        for ip in &s.held {
            let fits = match requested {
                Ok(r) if !r.is_empty() => r.contains(ip) && pool_of(*ip).is_some(),
                // A dynamic Service keeps one address of its pool.
                _ => keep.is_empty() && pool_of(*ip).is_some_and(|p| pool.as_ref().is_none_or(|n| *n == p.name)),
            };
            if fits && !taken.contains_key(ip) {
                taken.insert(*ip, &s.key);
                keep.push(*ip);
            }
        }
        kept.insert(&s.key, keep);
    }
    // Pass 2, oldest first: requests and new allocations.
    let mut out = Vec::new();
    for s in &order {
        let (set, event) = match &s.wants {
            Wants::Ignore => continue,
            Wants::Release => {
                if s.held.is_empty() {
                    continue;
                }
                let msg = format!("released {}: no longer type LoadBalancer", list(&s.held));
                (Vec::new(), Some((EventType::Normal, REASON_RELEASED, msg)))
            }
            Wants::Managed { requested, pool } => {
                let keep = kept.get(s.key.as_str()).cloned().unwrap_or_default();
                match requested {
                    Err(e) => {
                        let msg = format!("{ANNOTATION_IPS} / spec.loadBalancerIP: {e}");
                        (keep, Some((EventType::Warning, REASON_BAD_REQUEST, msg)))
                    }
                    Ok(req) if !req.is_empty() => {
                        let mut problems = Vec::new();
                        for ip in req.iter().filter(|ip| !keep.contains(ip)) {
                            if pool_of(*ip).is_none() {
                                problems.push((REASON_NOT_IN_POOL, format!("requested {ip} is in no pool of {POOLS_NAMESPACE}/{POOLS_CONFIGMAP}")));
                            } else if let Some(holder) = taken.get(ip) {
                                problems.push((REASON_IN_USE, format!("requested {ip} is already allocated to {holder}")));
                            }
                        }
                        if let Some((reason, msg)) = problems.into_iter().next() {
                            (keep, Some((EventType::Warning, reason, msg)))
                        } else {
                            let mut got = req.clone();
                            got.dedup();
                            for ip in &got {
                                taken.insert(*ip, &s.key);
                            }
                            let ev = (got != s.held).then(|| (EventType::Normal, REASON_ALLOCATED, format!("assigned requested {}", list(&got))));
                            (got, ev)
                        }
                    }
                    Ok(_) if !keep.is_empty() => (keep, None),
                    Ok(_) => {
                        let candidates: Vec<&Pool> = pools.iter().filter(|p| pool.as_ref().is_none_or(|n| *n == p.name)).collect();
                        if candidates.is_empty() {
                            let msg = match pool {
                                Some(n) => format!("pool {n:?} ({ANNOTATION_POOL}) is not in {POOLS_NAMESPACE}/{POOLS_CONFIGMAP}"),
                                None => format!("no LoadBalancer IP pool is configured (ConfigMap {POOLS_NAMESPACE}/{POOLS_CONFIGMAP})"),
                            };
                            (Vec::new(), Some((EventType::Warning, REASON_NO_POOL, msg)))
                        } else if let Some((p, ip)) =
                            candidates.iter().find_map(|p| p.addresses().find(|ip| !taken.contains_key(ip)).map(|ip| (p, ip)))
                        {
                            taken.insert(ip, &s.key);
                            (vec![ip], Some((EventType::Normal, REASON_ALLOCATED, format!("assigned {ip} from pool {}", p.name))))
                        } else {
                            let names: Vec<&str> = candidates.iter().map(|p| p.name.as_str()).collect();
                            let msg = format!("no free address left in pool(s) {}", names.join(", "));
                            (Vec::new(), Some((EventType::Warning, REASON_EXHAUSTED, msg)))
                        }
                    }
                }
            }
        };
        let set = (set != s.held).then_some(set);
        if set.is_some() || event.is_some() {
            out.push(Decision { key: s.key.clone(), set, event });
        }
    }
    out
}

pub struct Ctx {
    pub client: Client,
    pub services: Store<Service>,
    pub pools: Store<ConfigMap>,
    pub recorder: Recorder,
    /// The last event per Service (and for the ConfigMap), so a standing
    /// problem is told once, not every pass.
    pub told: Mutex<HashMap<String, String>>,
}

impl Ctx {
    /// Whether `(key, what)` is news; remembers it.
    fn news(&self, key: &str, what: &str) -> bool {
        let Ok(mut told) = self.told.lock() else { return true };
        if told.get(key).map(String::as_str) == Some(what) {
            return false;
        }
        told.insert(key.to_owned(), what.to_owned());
        true
    }
}

pub async fn reconcile_all(ctx: &Ctx) {
    let cm = ctx.pools.state().into_iter().find(|c| c.namespace().as_deref() == Some(POOLS_NAMESPACE) && c.name_any() == POOLS_CONFIGMAP);
    let pools = match cm.as_ref().map(|c| parse_pools(c.data.as_ref().unwrap_or(&BTreeMap::new()))) {
        None => Vec::new(),
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            // Keep every assignment as it is until the pools read again.
            if let Some(cm) = &cm
                && ctx.news("configmap", &e.to_string())
            {
                tracing::warn!(error = %e, "LoadBalancer IP pools not applied");
                ctx.recorder.warning(cm.as_ref(), REASON_BAD_POOLS, &e.to_string()).await;
            }
            return;
        }
    };
    ctx.news("configmap", "");
    let services = ctx.services.state();
    let views: Vec<SvcView> = services.iter().map(|s| view(s)).collect();
    let by_key: HashMap<String, &Service> = services.iter().map(|s| (key(s.as_ref()), s.as_ref())).collect();
    for d in plan(&pools, &views) {
        let Some(svc) = by_key.get(&d.key) else { continue };
        if let Some(ips) = &d.set {
            let ingress: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"})).collect();
            let patch = if ingress.is_empty() {
                json!({"status": {"loadBalancer": {"ingress": null}}})
            } else {
                json!({"status": {"loadBalancer": {"ingress": ingress}}})
            };
            let api: Api<Service> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
            if let Err(e) = api.patch_status(&svc.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::warn!(service = %d.key, error = %e, "writing status.loadBalancer");
                continue;
            }
            tracing::info!(service = %d.key, ingress = %list(ips), "LoadBalancer ingress written");
        }
        match &d.event {
            Some((ty, reason, msg)) => {
                if ctx.news(&d.key, msg) {
                    match ty {
                        EventType::Normal => ctx.recorder.normal(*svc, reason, msg).await,
                        EventType::Warning => {
                            tracing::warn!(service = %d.key, reason, "{msg}");
                            ctx.recorder.warning(*svc, reason, msg).await;
                        }
                    }
                }
            }
            None => {
                ctx.news(&d.key, "");
            }
        }
    }
    if let Ok(mut told) = ctx.told.lock() {
        told.retain(|k, _| k == "configmap" || by_key.contains_key(k));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::lb_pools::tests::{ip, pools};

    fn svc(key: &str, age: &str, req: &[&str], held: &[&str]) -> SvcView {
        SvcView {
            key: key.into(),
            age: age.into(),
            wants: Wants::Managed { requested: Ok(req.iter().map(|s| ip(s)).collect()), pool: None },
            held: held.iter().map(|s| ip(s)).collect(),
        }
    }

    #[test]
    fn allocation_is_lowest_free_oldest_first_and_stable() {
        let p = pools(&[("default", "192.0.2.10-192.0.2.12")]);
        let s = [svc("ns/b", "2", &[], &[]), svc("ns/a", "1", &[], &[])];
        let d = plan(&p, &s);
        assert_eq!(d[0].key, "ns/a");
        assert_eq!(d[0].set, Some(vec![ip("192.0.2.10")]));
        assert_eq!(d[1].set, Some(vec![ip("192.0.2.11")]));
        assert_eq!(d[1].event.as_ref().unwrap().1, REASON_ALLOCATED);
        // Once written, nothing changes.
        let s = [svc("ns/b", "2", &[], &["192.0.2.11"]), svc("ns/a", "1", &[], &["192.0.2.10"])];
        assert!(plan(&p, &s).is_empty());
    }

    #[test]
    fn requests_conflicts_and_exhaustion() {
        let p = pools(&[("default", "192.0.2.10-192.0.2.11")]);
        // The older holder keeps a requested address; the newer gets an event.
        let s = [svc("ns/old", "1", &[], &["192.0.2.10"]), svc("ns/new", "2", &["192.0.2.10"], &[])];
        let d = plan(&p, &s);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].set, None);
        let (ty, reason, msg) = d[0].event.clone().unwrap();
        assert_eq!((ty, reason), (EventType::Warning, REASON_IN_USE));
        assert_eq!(msg, "requested 192.0.2.10 is already allocated to ns/old");
        // Outside every pool.
        let d = plan(&p, &[svc("ns/x", "1", &["198.51.100.1"], &[])]);
        assert_eq!(d[0].event.as_ref().unwrap().1, REASON_NOT_IN_POOL);
        // A request moves a Service to the address it names.
        let d = plan(&p, &[svc("ns/x", "1", &["192.0.2.11"], &["192.0.2.10"])]);
        assert_eq!(d[0].set, Some(vec![ip("192.0.2.11")]));
        // Exhausted: two addresses, three Services.
        let s = [svc("ns/a", "1", &[], &[]), svc("ns/b", "2", &[], &[]), svc("ns/c", "3", &[], &[])];
        let d = plan(&p, &s);
        assert_eq!(d[2].key, "ns/c");
        assert_eq!(d[2].set, None);
        assert_eq!(d[2].event.as_ref().unwrap().1, REASON_EXHAUSTED);
        // No pools at all.
        assert_eq!(plan(&[], &[svc("ns/a", "1", &[], &[])])[0].event.as_ref().unwrap().1, REASON_NO_POOL);
    }

    #[test]
    fn release_duplicates_foreign_classes_and_pool_changes() {
        let p = pools(&[("default", "192.0.2.10-192.0.2.11")]);
        let mut gone = svc("ns/a", "1", &[], &["192.0.2.10"]);
        gone.wants = Wants::Release;
        let d = plan(&p, &[gone]);
        assert_eq!(d[0].set, Some(vec![]));
        assert_eq!(d[0].event.as_ref().unwrap().1, REASON_RELEASED);
        // Two Services holding one address (a hand-written status): the
        // newer one is moved.
        let s = [svc("ns/a", "1", &[], &["192.0.2.10"]), svc("ns/b", "2", &[], &["192.0.2.10"])];
        let d = plan(&p, &s);
        assert_eq!(d, vec![Decision { key: "ns/b".into(), set: Some(vec![ip("192.0.2.11")]), event: d[0].event.clone() }]);
        // Another class's address is never handed out, its Service never touched.
        let mut foreign = svc("ns/f", "0", &[], &["192.0.2.10"]);
        foreign.wants = Wants::Ignore;
        let d = plan(&p, &[foreign, svc("ns/a", "1", &[], &[])]);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].set, Some(vec![ip("192.0.2.11")]));
        // An address that left every pool is replaced.
        let d = plan(&p, &[svc("ns/a", "1", &[], &["203.0.113.1"])]);
        assert_eq!(d[0].set, Some(vec![ip("192.0.2.10")]));
    }
}
