//! Reflectors for the six kinds the agent needs, as controller-rs does it:
//! `watcher(..).default_backoff()`, `.modify()` to trim what we never read,
//! into a `reflector` store (Services, EndpointSlices, Pods and Nodes need no
//! trim: they decode into [`SlimService`], [`SlimSlice`], [`SlimPod`] and
//! [`SlimNode`], which hold only what is read). Every event also becomes
//! a small [`Change`] on a channel, so the reconcile loop knows *what* to
//! recompute instead of rescanning the stores.

use std::{fmt::Debug, hash::Hash};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    metrics::Metrics,
    slim::{SlimNode, SlimPod, SlimService, SlimSlice},
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
    /// Decoded as [`SlimService`]: only the fields the agent reads.
    pub services: Store<SlimService>,
    /// Decoded as [`SlimSlice`]: only the fields the model reads.
    pub slices: Store<SlimSlice>,
    /// Decoded as [`SlimNode`]: addresses, podCIDRs, taint keys, the claim.
    pub nodes: Store<SlimNode>,
    /// Every pod of the cluster, decoded as [`SlimPod`].
    pub pods: Store<SlimPod>,
    pub namespaces: Store<Namespace>,
    pub policies: Store<NetworkPolicy>,
}

/// Starts the six reflectors; changes go to `tx`.
pub fn start(client: &Client, node_name: &str, tx: &UnboundedSender<Change>, metrics: &Metrics) -> Stores {
    let services = spawn(
        Api::<SlimService>::all(client.clone()),
        watcher::Config::default(),
        Kind::Service,
        tx.clone(),
        metrics.clone(),
        |s: &SlimService| Change::Service { namespace: s.namespace().unwrap_or_default(), name: s.name_any() },
        // Nothing left to trim: the type decodes only what is read.
        |_: &mut SlimService| {},
    );
    let slices = spawn(
        Api::<SlimSlice>::all(client.clone()),
        watcher::Config::default(),
        Kind::EndpointSlice,
        tx.clone(),
        metrics.clone(),
        |s: &SlimSlice| Change::Slice {
            namespace: s.namespace().unwrap_or_default(),
            name: s.name_any(),
            service: s.service_name.clone(),
            deleted: false,
        },
        // Nothing left to trim: the type decodes only what is read.
        |_: &mut SlimSlice| {},
    );
    let nodes = spawn(
        Api::<SlimNode>::all(client.clone()),
        watcher::Config::default(),
        Kind::Node,
        tx.clone(),
        metrics.clone(),
        |n: &SlimNode| Change::Node { name: n.name_any() },
        // Nothing left to trim: the type decodes only what is read.
        |_: &mut SlimNode| {},
    );
    let node = node_name.to_owned();
    let pods = spawn(
        Api::<SlimPod>::all(client.clone()),
        watcher::Config::default(),
        Kind::Pod,
        tx.clone(),
        metrics.clone(),
        move |p: &SlimPod| Change::Pod {
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            local: p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()),
        },
        // Nothing left to trim: the type decodes only what is read.
        |_: &mut SlimPod| {},
    );
    let namespaces = spawn(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        Kind::Namespace,
        tx.clone(),
        metrics.clone(),
        |n: &Namespace| Change::Namespace { name: n.name_any() },
        |n: &mut Namespace| {
            // Labels and annotations (the policy audit switch) are read;
            // namespaces are few, so their annotations stay whole.
            n.meta_mut().managed_fields = None;
            n.meta_mut().owner_references = None;
            n.spec = None;
            n.status = None;
        },
    );
    let policies = spawn(
        Api::<NetworkPolicy>::all(client.clone()),
        watcher::Config::default(),
        Kind::NetworkPolicy,
        tx.clone(),
        metrics.clone(),
        |p: &NetworkPolicy| Change::NetworkPolicy { namespace: p.namespace().unwrap_or_default(), name: p.name_any() },
        |p: &mut NetworkPolicy| trim_meta(p.meta_mut()),
    );
    Stores { services, slices, nodes, pods, namespaces, policies }
}

fn trim_meta(m: &mut kube::api::ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
}

fn spawn<K>(
    api: Api<K>,
    cfg: watcher::Config,
    kind: Kind,
    tx: UnboundedSender<Change>,
    metrics: Metrics,
    change: impl Fn(&K) -> Change + Send + 'static,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: Resource + k8s_openapi::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    if let Err(e) = declared::<K>(WATCH_VERBS) {
        // A programming error, loud: the store never fills, so the agent
        // never turns ready (and tests fail) instead of running without RBAC.
        tracing::error!(error = %e, "not starting an undeclared watch");
        metrics.watch_errors.get_or_create(&crate::metrics::KindLabel { kind: kind.as_str() }).inc();
        return reader;
    }
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff().modify(trim));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let msg = match ev {
                Ok(watcher::Event::Apply(o)) => change(&o),
                Ok(watcher::Event::Delete(o)) => match change(&o) {
                    Change::Slice { namespace, name, service, .. } => {
                        Change::Slice { namespace, name, service, deleted: true }
                    }
                    other => other,
                },
                Ok(watcher::Event::InitDone) => Change::Resynced(kind),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
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
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_watched_kind_is_declared() {
        declared::<SlimService>(WATCH_VERBS).unwrap();
        declared::<SlimSlice>(WATCH_VERBS).unwrap();
        declared::<SlimNode>(WATCH_VERBS).unwrap();
        declared::<SlimPod>(WATCH_VERBS).unwrap();
        declared::<Namespace>(WATCH_VERBS).unwrap();
        declared::<NetworkPolicy>(WATCH_VERBS).unwrap();
        declared::<SlimNode>(&["patch"]).unwrap();
    }

    #[test]
    fn undeclared_calls_are_refused() {
        let e = declared::<SlimPod>(&["delete"]).unwrap_err();
        assert_eq!((e.group, e.resource, e.verb.as_str()), ("", "pods", "delete"));
        assert!(declared::<SlimService>(&["patch"]).is_err());
        assert!(declared::<k8s_openapi::api::core::v1::Secret>(&["list"]).is_err());
    }
}
