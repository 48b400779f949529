//! podCIDR fallback for clusters without node IPAM.
//!
//! On a real cluster the node's pod range comes from `Node.spec.podCIDR`
//! (kube-controller-manager `--allocate-node-cidrs`, k3s always). Without
//! it, and only when `--pod-cidr-fallback-after` is set, the agent claims a
//! range itself: the lowest `/24` of `--cluster-cidr` that no other Node
//! holds (in `spec.podCIDR(s)` or in a claim), written as the annotation
//! [`POD_CIDR_ANNOTATION`] on its own Node. The Nodes are the allocator state (like
//! the control plane's node IPAM), so there is nothing else to keep
//! consistent, and a restarted agent finds its claim again.
//!
//! **Races.** Two agents that claim within one watch round-trip of each
//! other can pick the same range (each patches only its own Node, so no
//! resourceVersion precondition can serialise them). Both then see the
//! duplicate; the Node whose name sorts first keeps it and the other claims
//! the next free range at once. Until then (about a second) both may hand
//! out addresses from the same range; pods started in that window on the
//! losing node keep a duplicate address until they are recreated. A range
//! assigned in `spec.podCIDR` always beats a claim. Do not mix the fallback
//! with cluster IPAM over the same range: IPAM does not read the claims.

use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    node::{POD_CIDR_ANNOTATION, claimed_pod_cidr, spec_pod_cidr},
    slim::SlimNode,
    store::Store,
    watch,
};

/// Size of a claimed range (one per node, like the control plane's IPAM).
pub const PREFIX: u8 = 24;

/// What the own node should do about its podCIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The own Node is not in the store (yet).
    NotRegistered,
    /// Cluster IPAM assigned one: nothing to do.
    Assigned(Ipv4Network),
    /// The own, uncontested claim.
    Claimed(Ipv4Network),
    /// Write this claim; `replacing` is a contested earlier claim.
    Claim { cidr: Ipv4Network, replacing: Option<Ipv4Network> },
    /// No free range is left in the cluster range.
    Exhausted,
}

/// Pure decision for node `own` given every Node (deterministic: same
/// inputs, same range on every agent).
pub fn decide<'a>(own: &str, nodes: impl IntoIterator<Item = &'a SlimNode>, cluster: Ipv4Network, prefix: u8) -> Decision {
    let mut me = None;
    // (name, range, from spec)
    let mut others: Vec<(String, Ipv4Network, bool)> = Vec::new();
    for n in nodes {
        let name = n.name().to_owned();
        if name == own {
            me = Some(n);
            continue;
        }
        if let Some(c) = spec_pod_cidr(n) {
            others.push((name, c, true));
        } else if let Some(c) = claimed_pod_cidr(n) {
            others.push((name, c, false));
        }
    }
    let Some(me) = me else { return Decision::NotRegistered };
    if let Some(c) = spec_pod_cidr(me) {
        return Decision::Assigned(c);
    }
    let mine = claimed_pod_cidr(me);
    if let Some(c) = mine {
        let usable = c.is_subnet_of(cluster);
        let contested = others
            .iter()
            .any(|(name, o, from_spec)| o.overlaps(c) && (*from_spec || name.as_str() < own));
        if usable && !contested {
            return Decision::Claimed(c);
        }
    }
    riptide_cidr::subnets(cluster, prefix.max(cluster.prefix()))
        .find(|cand| !others.iter().any(|(_, o, _)| o.overlaps(*cand)))
        .map_or(Decision::Exhausted, |cidr| Decision::Claim { cidr, replacing: mine })
}

/// Settings of the fallback.
#[derive(Clone, Copy, Debug)]
pub struct Fallback {
    /// How long the own Node must be without `spec.podCIDR` before the
    /// agent claims a range (gives cluster IPAM the first chance).
    pub after: Duration,
    pub cluster: Ipv4Network,
    pub prefix: u8,
}

/// Runs the fallback on the agent's Node store until the runtime stops.
/// Claims reach the podCIDR file and routes the normal way: the Node watch
/// delivers the annotation and [`crate::node::pod_cidr`] reads it.
pub fn spawn(client: Client, nodes: Store<SlimNode>, node: String, fb: Fallback) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = watch::declared::<Node>(&["patch"]) {
            tracing::error!(error = %e, "podCIDR fallback disabled");
            return;
        }
        nodes.wait_until_ready().await;
        let api: Api<Node> = Api::all(client);
        let mut missing_since: Option<Instant> = None;
        let mut last_patch: Option<(Ipv4Network, Instant)> = None;
        let mut warned_exhausted = false;
        loop {
            let state = nodes.state();
            match decide(&node, state.iter().map(AsRef::as_ref), fb.cluster, fb.prefix) {
                Decision::NotRegistered | Decision::Assigned(_) | Decision::Claimed(_) => missing_since = None,
                Decision::Exhausted => {
                    if !warned_exhausted {
                        tracing::warn!(cluster = %fb.cluster, "no free podCIDR left to claim");
                        warned_exhausted = true;
                    }
                }
                Decision::Claim { cidr, replacing } => {
                    let since = *missing_since.get_or_insert_with(Instant::now);
                    // A contested claim moves at once; a missing one waits
                    // for cluster IPAM first.
                    let due = replacing.is_some() || since.elapsed() >= fb.after;
                    // The watch has not shown our last patch yet.
                    let pending = last_patch.is_some_and(|(c, t)| c == cidr && t.elapsed() < Duration::from_secs(5));
                    if due && !pending {
                        let patch = serde_json::json!({"metadata": {"annotations": {POD_CIDR_ANNOTATION: cidr.to_string()}}});
                        match api.patch(&node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                            Ok(_) => {
                                tracing::info!(cidr = %cidr, replacing = ?replacing.map(|c| c.to_string()), annotation = POD_CIDR_ANNOTATION,
                                    "no podCIDR from cluster IPAM; claimed one on the Node");
                                last_patch = Some((cidr, Instant::now()));
                            }
                            Err(e) => tracing::warn!(error = %e, "claiming a podCIDR failed; retrying"),
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, spec: Option<&str>, claim: Option<&str>) -> SlimNode {
        let mut n: SlimNode = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": spec},
        }))
        .unwrap();
        if let Some(c) = claim {
            n.pod_cidr_claim = Some(c.into());
        }
        n
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    const CLUSTER: &str = "10.42.0.0/16";

    #[test]
    fn spec_wins_and_claims_are_kept() {
        let nodes = [node("a", Some("10.42.7.0/24"), Some("10.42.0.0/24")), node("b", None, Some("10.42.1.0/24"))];
        assert_eq!(decide("a", &nodes, net(CLUSTER), 24), Decision::Assigned(net("10.42.7.0/24")));
        assert_eq!(decide("b", &nodes, net(CLUSTER), 24), Decision::Claimed(net("10.42.1.0/24")));
        assert_eq!(decide("c", &nodes, net(CLUSTER), 24), Decision::NotRegistered);
    }

    #[test]
    fn lowest_free_range_skips_spec_and_claims_of_others() {
        let nodes = [
            node("a", Some("10.42.0.0/24"), None),
            node("b", None, Some("10.42.1.0/24")),
            node("c", None, None),
            node("d", Some("10.42.3.0/24"), None),
        ];
        assert_eq!(decide("c", &nodes, net(CLUSTER), 24), Decision::Claim { cidr: net("10.42.2.0/24"), replacing: None });
    }

    #[test]
    fn duplicate_claim_goes_to_the_first_name() {
        let nodes = [node("a", None, Some("10.42.0.0/24")), node("b", None, Some("10.42.0.0/24"))];
        assert_eq!(decide("a", &nodes, net(CLUSTER), 24), Decision::Claimed(net("10.42.0.0/24")));
        assert_eq!(
            decide("b", &nodes, net(CLUSTER), 24),
            Decision::Claim { cidr: net("10.42.1.0/24"), replacing: Some(net("10.42.0.0/24")) }
        );
        // IPAM handing the same range to another node beats any claim.
        let nodes = [node("z", Some("10.42.0.0/24"), None), node("b", None, Some("10.42.0.0/24"))];
        assert!(matches!(decide("b", &nodes, net(CLUSTER), 24), Decision::Claim { replacing: Some(_), .. }));
    }

    #[test]
    fn claims_outside_the_cluster_range_are_replaced_and_exhaustion_is_reported() {
        let nodes = [node("a", None, Some("192.168.0.0/24"))];
        assert_eq!(
            decide("a", &nodes, net(CLUSTER), 24),
            Decision::Claim { cidr: net("10.42.0.0/24"), replacing: Some(net("192.168.0.0/24")) }
        );
        let nodes = [node("a", Some("10.42.0.0/25"), None), node("b", Some("10.42.0.128/25"), None), node("c", None, None)];
        assert_eq!(decide("c", &nodes, net("10.42.0.0/24"), 25), Decision::Exhausted);
        // Deterministic: the same view gives the same answer.
        let nodes = [node("x", None, None), node("y", None, None)];
        assert_eq!(decide("x", &nodes, net(CLUSTER), 24), decide("x", &nodes, net(CLUSTER), 24));
    }
}
