//! What the agent reads from Node objects: a node's InternalIP and its
//! podCIDR, whether cluster IPAM assigned it (`spec.podCIDRs`) or the node's
//! agent claimed it in an annotation ([`crate::podcidr`] writes the claims).

use ipnetwork::Ipv4Network;

pub use crate::slim::POD_CIDR_ANNOTATION;
use crate::slim::SlimNode;

/// A node's InternalIP (the address other nodes route its podCIDR to).
pub fn internal_ip(node: &SlimNode) -> Option<std::net::Ipv4Addr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// A node's IPv4 podCIDR: the one cluster IPAM assigned, else the range its
/// agent claimed when the cluster has no node IPAM.
pub fn pod_cidr(node: &SlimNode) -> Option<Ipv4Network> {
    spec_pod_cidr(node).or_else(|| claimed_pod_cidr(node))
}

/// The podCIDR cluster IPAM assigned (`spec.podCIDRs`, then `spec.podCIDR`).
pub fn spec_pod_cidr(node: &SlimNode) -> Option<Ipv4Network> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .find_map(|c| riptide_cidr::parse("podCIDR", c).ok())
}

/// The range claimed in `node`'s [`POD_CIDR_ANNOTATION`], if it is a valid
/// range.
pub fn claimed_pod_cidr(node: &SlimNode) -> Option<Ipv4Network> {
    riptide_cidr::parse(POD_CIDR_ANNOTATION, node.pod_cidr_claim.as_deref()?).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn internal_ip_and_pod_cidr() {
        let n: SlimNode = serde_json::from_value(json!({
            "metadata": {"name": "node-b"},
            "spec": {"podCIDR": "10.42.1.0/24", "podCIDRs": ["10.42.1.0/24", "fd00:42:1::/64"]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-b"},
                {"type": "ExternalIP", "address": "203.0.113.2"},
                {"type": "InternalIP", "address": "fd00::2"},
                {"type": "InternalIP", "address": "198.18.0.2"},
            ]}
        }))
        .unwrap();
        assert_eq!(internal_ip(&n), Some("198.18.0.2".parse().unwrap()));
        assert_eq!(pod_cidr(&n), Some("10.42.1.0/24".parse().unwrap()));
    }
}
