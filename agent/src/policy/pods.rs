//! Pods by name and by address, read from the pod store when asked
//! (`riptide policy check`, datapath events): the compile keeps no index of
//! the cluster's pods, and while no NetworkPolicy exists it looks at local
//! pods only.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use super::{CheckError, IdentityInfo, Peer};
use crate::slim::SlimPod;

/// A pod's address as policy sees it: its IPv4 address from the moment it
/// has one until it has finished, and whether that is its node's address
/// (host network).
pub(super) fn pod_addr(pod: &SlimPod) -> Option<(Ipv4Addr, bool)> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    Some((status.pod_ip?, spec.host_network == Some(true)))
}

/// The pod's namespace (`default` when the object names none).
pub(super) fn namespace_of(pod: &SlimPod) -> &str {
    Some(pod.namespace())
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default")
}

/// The address of `peer`: an address as given, a pod's from `pods`.
pub fn resolve(pods: &[Arc<SlimPod>], peer: &Peer) -> Result<Ipv4Addr, CheckError> {
    match peer {
        Peer::Addr(a) => Ok(*a),
        Peer::Pod { namespace, name } => pods
            .iter()
            .filter(|p| namespace_of(p) == namespace && p.name() == name)
            .find_map(|p| pod_addr(p))
            .map(|(ip, _)| ip)
            .ok_or_else(|| CheckError::UnknownPod {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
    }
}

/// The pod that owns `addr`, when two claim it: a pod's own address before
/// a host-network pod's (that is its node's), one not being deleted before
/// one that is, then (namespace, name) order.
pub(super) fn owner_rank(pod: &SlimPod, host_network: bool) -> (bool, bool, &str, &str) {
    (host_network, pod.deleting, namespace_of(pod), pod.name())
}

/// Address → the pod owning it (see [`owner_rank`]), every pod of `pods`
/// that has one.
fn owners(pods: &[Arc<SlimPod>]) -> HashMap<Ipv4Addr, (&SlimPod, bool)> {
    let mut out: HashMap<Ipv4Addr, (&SlimPod, bool)> = HashMap::new();
    for pod in pods {
        let Some((ip, host_network)) = pod_addr(pod) else {
            continue;
        };
        match out.get(&ip) {
            Some((other, other_host))
                if owner_rank(other, *other_host) <= owner_rank(pod, host_network) => {}
            _ => {
                out.insert(ip, (pod.as_ref(), host_network));
            }
        }
    }
    out
}

/// Address → `namespace/name`, every pod of `pods` that has one.
pub fn names_by_ip(pods: &[Arc<SlimPod>]) -> HashMap<Ipv4Addr, String> {
    owners(pods)
        .into_iter()
        .map(|(ip, (pod, _))| (ip, format!("{}/{}", namespace_of(pod), pod.name())))
        .collect()
}

/// The label identity's name of the pod owning `addr` (what a compile
/// with policies gives it: namespace and pod labels); `None` when no pod
/// owns it or it is a host-network pod's (its node's address).
pub fn identity_name_of(pods: &[Arc<SlimPod>], addr: Ipv4Addr) -> Option<String> {
    let (pod, host_network) = pods
        .iter()
        .filter_map(|p| {
            pod_addr(p)
                .filter(|(ip, _)| *ip == addr)
                .map(|(_, host)| (p.as_ref(), host))
        })
        .min_by(|(a, ah), (b, bh)| owner_rank(a, *ah).cmp(&owner_rank(b, *bh)))?;
    (!host_network).then(|| {
        IdentityInfo::Labels {
            namespace: namespace_of(pod).to_owned(),
            labels: pod.labels.clone().unwrap_or_default(),
        }
        .to_string()
    })
}
