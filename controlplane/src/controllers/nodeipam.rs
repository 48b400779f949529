//! Node IPAM: one /24 per Node from the cluster range (10.42.0.0/16),
//! written once into `spec.podCIDR(s)` and never changed while the Node
//! exists. The allocator state is the set of Nodes itself, so a deleted
//! Node's range is free again on the next pass and a restarted controller
//! needs no state of its own.

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};

use super::events::Recorder;

/// Every node gets one range of this size.
pub const NODE_PREFIX: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    #[error(transparent)]
    Parse(#[from] riptide_cidr::Error),
    #[error("cluster-cidr {0} cannot be split into /24 node ranges: want a prefix of /8 to /24")]
    Size(Ipv4Network),
}

/// `--cluster-cidr`: the shared rule of riptide-cidr (agent and CNI read
/// the same string the same way), and a size this allocator can split.
pub fn parse_cluster_cidr(s: &str) -> Result<Ipv4Network, CidrError> {
    let c = riptide_cidr::parse("cluster-cidr", s)?;
    check_cluster_cidr(c)?;
    Ok(c)
}

pub fn check_cluster_cidr(c: Ipv4Network) -> Result<(), CidrError> {
    if (8..=NODE_PREFIX).contains(&c.prefix()) { Ok(()) } else { Err(CidrError::Size(c)) }
}

/// The lowest /24 of `cluster` that overlaps no range in `used`.
pub fn allocate(cluster: Ipv4Network, used: &[Ipv4Network]) -> Option<Ipv4Network> {
    riptide_cidr::subnets(cluster, NODE_PREFIX).find(|b| !used.iter().any(|u| u.overlaps(*b)))
}

pub struct Ctx {
    pub client: Client,
    pub nodes: Store<Node>,
    pub cidr: Ipv4Network,
    pub recorder: Recorder,
}

pub async fn reconcile_all(ctx: &Ctx) {
    let nodes = ctx.nodes.state();
    // Every valid range a Node holds, ours or not, so nothing is handed out twice.
    let mut used: Vec<Ipv4Network> = nodes
        .iter()
        .filter_map(|n| riptide_cidr::parse("podCIDR", n.spec.as_ref()?.pod_cidr.as_deref()?).ok())
        .collect();
    let mut pending: Vec<_> = nodes
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_none_or(String::is_empty))
        .collect();
    // Oldest node first, so names map to ranges in join order.
    pending.sort_by_key(|n| (n.metadata.creation_timestamp.as_ref().map(|t| t.0), n.name_any()));
    let api: Api<Node> = Api::all(ctx.client.clone());
    for n in pending {
        let Some(block) = allocate(ctx.cidr, &used) else {
            ctx.recorder.warning(n.as_ref(), "CIDRNotAvailable", "no free /24 left in the cluster CIDR").await;
            continue;
        };
        let p = serde_json::json!({"spec": {"podCIDR": block.to_string(), "podCIDRs": [block.to_string()]}});
        match api.patch(&n.name_any(), &PatchParams::default(), &Patch::Merge(&p)).await {
            Ok(_) => {
                used.push(block);
                tracing::info!(node = %n.name_any(), cidr = %block, "allocated pod CIDR");
                ctx.recorder.normal(n.as_ref(), "CIDRAssignmentSucceeded", &format!("assigned pod CIDR {block}")).await;
            }
            Err(e) => tracing::warn!(node = %n.name_any(), error = %e, "assigning pod CIDR"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        riptide_cidr::parse("test", s).expect("cidr")
    }

    #[test]
    fn blocks_are_stable_lowest_free_and_reused() {
        let c = parse_cluster_cidr("10.42.0.0/16").expect("cidr");
        let mut used = vec![net("10.42.0.0/24"), net("10.42.1.0/24"), net("10.42.3.0/24")];
        assert_eq!(allocate(c, &used), Some(net("10.42.2.0/24")));
        used.push(net("10.42.2.0/24"));
        assert_eq!(allocate(c, &used), Some(net("10.42.4.0/24")));
        used.retain(|u| *u != net("10.42.1.0/24")); // node deleted
        assert_eq!(allocate(c, &used), Some(net("10.42.1.0/24")));
        // A range from elsewhere (another /25, a range outside ours) blocks what it overlaps only.
        assert_eq!(allocate(c, &[net("10.42.0.128/25"), net("10.43.0.0/24")]), Some(net("10.42.1.0/24")));
        let full: Vec<_> = riptide_cidr::subnets(c, 24).collect();
        assert_eq!(full.len(), 256);
        assert_eq!(allocate(c, &full), None);
    }

    #[test]
    fn cluster_cidr_follows_the_shared_rule_and_fits_the_allocator() {
        assert_eq!(
            parse_cluster_cidr("10.42.0.1/16").expect_err("host bits").to_string(),
            "cluster-cidr 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?"
        );
        assert!(matches!(parse_cluster_cidr("10.42.0.0/25"), Err(CidrError::Size(_))));
        assert!(matches!(parse_cluster_cidr("10.0.0.0/7"), Err(CidrError::Size(_))));
        assert!(parse_cluster_cidr("10.0.0.0/8").is_ok());
    }
}
