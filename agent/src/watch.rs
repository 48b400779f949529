//! Watches of the six kinds the agent needs, as controller-rs does it:
//! `watcher(..).default_backoff()`, each event applied to a store. The
//! stores are the agent's own ([`crate::store`]): Services, EndpointSlices,
//! Pods and Nodes decode as the compact types of `slim.rs` (a [`Wire`] of
//! each for the watcher), which hold only what is read and no
//! `ObjectMeta`; Namespaces and NetworkPolicies, few, stay k8s-openapi
//! structs trimmed of what is never read. Every event also becomes a small
//! [`Change`] on a channel, so the reconcile loop knows *what* to recompute
//! instead of rescanning the stores.

use std::fmt::Debug;

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    metrics::Metrics,
    slim::{SlimNode, SlimPod, SlimService, SlimSlice, Wire},
    store::{Keyed, ObjKey, Store},
};

/// One Kubernetes API permission the agent uses: `verbs` on `resource` in
/// API group `group` ("" = core), as RBAC spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// What a kube-rs watcher calls: a (paginated) list, then watches.
pub const WATCH_VERBS: &[&str] = &["list", "watch"];

/// Every Lease call `l2announce` makes (one Lease per announced Service).
pub const LEASE_VERBS: &[&str] = &["get", "create", "update", "delete"];

/// Every API call the agent makes. The watchers below and the podCIDR
/// fallback ([`crate::podcidr`]) refuse to call anything missing from this
/// list ([`declared`]), and the DaemonSet's ClusterRole
/// (`manifests/riptide.yaml`) is tested to grant exactly this — so the code,
/// this list and the RBAC cannot drift apart.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess { group: "", resource: "services", verbs: WATCH_VERBS },
    ApiAccess { group: "discovery.k8s.io", resource: "endpointslices", verbs: WATCH_VERBS },
    // patch: the podCIDR fallback claims a range in an annotation on the
    // agent's own Node when the cluster has no node IPAM.
    ApiAccess { group: "", resource: "nodes", verbs: &["list", "watch", "patch"] },
    // Every pod of the cluster: NetworkPolicy peers are found by their IP
    // and labels wherever they run; this node's pods also give hostPorts.
    ApiAccess { group: "", resource: "pods", verbs: WATCH_VERBS },
    // Namespace labels (namespaceSelector) and the policy audit annotation.
    ApiAccess { group: "", resource: "namespaces", verbs: WATCH_VERBS },
    ApiAccess { group: "networking.k8s.io", resource: "networkpolicies", verbs: WATCH_VERBS },
    // L2 announcements: one Lease per announced Service, read, created,
    // renewed or taken over, and deleted once its Service needs none.
    ApiAccess { group: "coordination.k8s.io", resource: "leases", verbs: LEASE_VERBS },
    // Events on Services the agent cuts to --max-backends-per-service.
    ApiAccess { group: "", resource: "events", verbs: &["create"] },
];

pub use crate::slim::TRIGGER_TIME_ANNOTATION;

/// A call the code is about to make that [`API_ACCESS`] does not list.
#[derive(Debug, thiserror::Error)]
#[error("{verb} on {resource} (group {group:?}) is not declared in watch::API_ACCESS (nor granted by the manifests' ClusterRole)")]
pub struct Undeclared {
    pub group: &'static str,
    pub resource: &'static str,
    pub verb: String,
}

/// Checks that every one of `verbs` on `K`'s resource is in [`API_ACCESS`].
pub fn declared<K: k8s_openapi::Resource>(verbs: &[&str]) -> Result<(), Undeclared> {
    for verb in verbs {
        let ok = API_ACCESS
            .iter()
            .any(|a| a.group == K::GROUP && a.resource == K::URL_PATH_SEGMENT && a.verbs.contains(verb));
        if !ok {
            return Err(Undeclared { group: K::GROUP, resource: K::URL_PATH_SEGMENT, verb: (*verb).to_owned() });
        }
    }
    Ok(())
}

/// Which reflector an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::Pod, Kind::Namespace, Kind::NetworkPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::Node => "nodes",
            Self::Pod => "pods",
            Self::Namespace => "namespaces",
            Self::NetworkPolicy => "networkpolicies",
        }
    }
}

/// What changed, as far as the reconcile loop cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Service { namespace: String, name: String },
    /// `service` is the slice's `kubernetes.io/service-name` label.
    Slice { namespace: String, name: String, service: Option<String>, deleted: bool },
    Node { name: String },
    /// `local`: the pod runs on this node (only those have hostPorts).
    Pod { namespace: String, name: String, local: bool },
    Namespace { name: String },
    NetworkPolicy { namespace: String, name: String },
    /// A (re)list finished: the store holds the full state of `Kind`.
    Resynced(Kind),
}

/// The stores the reconcile loop reads.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<SlimService>,
    pub slices: Store<SlimSlice>,
    pub nodes: Store<SlimNode>,
    /// Every pod of the cluster.
    pub pods: Store<SlimPod>,
    pub namespaces: Store<Namespace>,
    pub policies: Store<NetworkPolicy>,
}

impl Keyed for Namespace {
    fn key(&self) -> ObjKey {
        ObjKey::new("", self.metadata.name.as_deref().unwrap_or(""))
    }
}

impl Keyed for NetworkPolicy {
    fn key(&self) -> ObjKey {
        ObjKey::new(self.metadata.namespace.as_deref().unwrap_or(""), self.metadata.name.as_deref().unwrap_or(""))
    }
}

/// Starts the six watches; changes go to `tx`.
pub fn start(client: &Client, node_name: &str, tx: &UnboundedSender<Change>, metrics: &Metrics) -> Stores {
    let services = spawn(
        Api::<Wire<SlimService>>::all(client.clone()),
        Kind::Service,
        tx.clone(),
        metrics.clone(),
        |w| w.object,
        |s: &SlimService| Change::Service { namespace: s.namespace().to_owned(), name: s.name().to_owned() },
    );
    let slices = spawn(
        Api::<Wire<SlimSlice>>::all(client.clone()),
        Kind::EndpointSlice,
        tx.clone(),
        metrics.clone(),
        |w| w.object,
        |s: &SlimSlice| Change::Slice {
            namespace: s.namespace().to_owned(),
            name: s.name().to_owned(),
            service: s.service_name.as_deref().map(str::to_owned),
            deleted: false,
        },
    );
    let nodes = spawn(
        Api::<Wire<SlimNode>>::all(client.clone()),
        Kind::Node,
        tx.clone(),
        metrics.clone(),
        |w| w.object,
        |n: &SlimNode| Change::Node { name: n.name().to_owned() },
    );
    let node = node_name.to_owned();
    let pods = spawn(
        Api::<Wire<SlimPod>>::all(client.clone()),
        Kind::Pod,
        tx.clone(),
        metrics.clone(),
        |w| w.object,
        move |p: &SlimPod| Change::Pod {
            namespace: p.namespace().to_owned(),
            name: p.name().to_owned(),
            local: p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()),
        },
    );
    let namespaces = spawn(
        Api::<Namespace>::all(client.clone()),
        Kind::Namespace,
        tx.clone(),
        metrics.clone(),
        |mut n: Namespace| {
            // Labels and annotations (the policy audit switch) are read;
            // namespaces are few, so their annotations stay whole.
            n.metadata.managed_fields = None;
            n.metadata.owner_references = None;
            n.spec = None;
            n.status = None;
            n
        },
        |n: &Namespace| Change::Namespace { name: n.metadata.name.clone().unwrap_or_default() },
    );
    let policies = spawn(
        Api::<NetworkPolicy>::all(client.clone()),
        Kind::NetworkPolicy,
        tx.clone(),
        metrics.clone(),
        |mut p: NetworkPolicy| {
            p.metadata.managed_fields = None;
            p.metadata.annotations = None;
            p.metadata.owner_references = None;
            p
        },
        |p: &NetworkPolicy| Change::NetworkPolicy {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
        },
    );
    Stores { services, slices, nodes, pods, namespaces, policies }
}

/// Watches `api` into a new store of `T` (each object as `convert` makes
/// it), sending a [`Change`] per event.
fn spawn<W, T>(
    api: Api<W>,
    kind: Kind,
    tx: UnboundedSender<Change>,
    metrics: Metrics,
    convert: impl Fn(W) -> T + Send + 'static,
    change: impl Fn(&T) -> Change + Send + 'static,
) -> Store<T>
where
    W: Resource + k8s_openapi::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    W::DynamicType: Default,
    T: Keyed,
{
    let store = Store::new();
    if let Err(e) = declared::<W>(WATCH_VERBS) {
        // A programming error, loud: the store never fills, so the agent
        // never turns ready (and tests fail) instead of running without RBAC.
        tracing::error!(error = %e, "not starting an undeclared watch");
        metrics.watch_errors.get_or_create(&crate::metrics::KindLabel { kind: kind.as_str() }).inc();
        return store;
    }
    let writer = store.clone();
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let msg = match ev {
                Ok(watcher::Event::Apply(o)) => {
                    let o = convert(o);
                    let msg = change(&o);
                    writer.apply(o);
                    msg
                }
                Ok(watcher::Event::Delete(o)) => {
                    let o = convert(o);
                    writer.delete(&o);
                    match change(&o) {
                        Change::Slice { namespace, name, service, .. } => {
                            Change::Slice { namespace, name, service, deleted: true }
                        }
                        other => other,
                    }
                }
                Ok(watcher::Event::Init) => {
                    writer.begin_relist();
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    writer.apply(convert(o));
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    writer.finish_relist();
                    Change::Resynced(kind)
                }
                Err(e) => {
                    metrics.watch_errors.get_or_create(&crate::metrics::KindLabel { kind: kind.as_str() }).inc();
                    tracing::warn!(kind = kind.as_str(), error = %e, "watch failed; retrying with backoff");
                    continue;
                }
            };
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_watched_kind_is_declared() {
        declared::<Wire<SlimService>>(WATCH_VERBS).unwrap();
        declared::<Wire<SlimSlice>>(WATCH_VERBS).unwrap();
        declared::<Wire<SlimNode>>(WATCH_VERBS).unwrap();
        declared::<Wire<SlimPod>>(WATCH_VERBS).unwrap();
        declared::<Namespace>(WATCH_VERBS).unwrap();
        declared::<NetworkPolicy>(WATCH_VERBS).unwrap();
        declared::<Wire<SlimNode>>(&["patch"]).unwrap();
    }

    #[test]
    fn undeclared_calls_are_refused() {
        let e = declared::<Wire<SlimPod>>(&["delete"]).unwrap_err();
        assert_eq!((e.group, e.resource, e.verb.as_str()), ("", "pods", "delete"));
        assert!(declared::<Wire<SlimService>>(&["patch"]).is_err());
        assert!(declared::<k8s_openapi::api::core::v1::Secret>(&["list"]).is_err());
    }
}
