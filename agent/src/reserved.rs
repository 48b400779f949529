//! Addresses a Service may never claim as an external frontend
//! (`spec.externalIPs` or a LoadBalancer ingress IP), whatever the
//! apiserver stored. A frontend captures traffic on every node, before
//! the kernel's own sockets see it: an external IP equal to a node's
//! address hijacks that node's port 22 or 10250 (CVE-2020-8554), one in
//! the pod or Service range hijacks cluster traffic. The apiserver's
//! allow list (`--service-external-ip-cidrs`) is the first line; this is
//! the second, for apiservers that have none (k3s and kubeadm admit any
//! external IP by default) and for status writers that skip admission.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

use crate::slim::SlimNode;

/// What an external frontend must not be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reserved {
    /// Every node's addresses (all types of `status.addresses`) and this
    /// node's own.
    pub node_addrs: BTreeSet<Ipv4Addr>,
    /// (range, what it is), checked in order.
    pub ranges: Vec<(Ipv4Network, &'static str)>,
}

/// Ranges that are never a Service's to take, on any network.
const SPECIAL: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 8, "the \"this network\" range"),
    ([127, 0, 0, 0], 8, "the loopback range"),
    ([169, 254, 0, 0], 16, "the link-local range"),
    ([224, 0, 0, 0], 4, "the multicast range"),
    ([240, 0, 0, 0], 4, "the reserved range"),
];

impl Reserved {
    /// The pod and Service ranges and the special-purpose ranges; node
    /// addresses come from [`Reserved::set_nodes`].
    pub fn new(cluster_cidr: Ipv4Network, service_cidr: Ipv4Network) -> Self {
        let mut ranges = vec![(cluster_cidr, "the pod range"), (service_cidr, "the Service range")];
        for (ip, len, what) in SPECIAL {
            if let Ok(n) = Ipv4Network::new(Ipv4Addr::from(*ip), *len) {
                ranges.push((n, what));
            }
        }
        Self { node_addrs: BTreeSet::new(), ranges }
    }

    /// Replaces the node addresses with those of `nodes` plus `own`;
    /// returns whether they changed.
    pub fn set_nodes<'a>(&mut self, nodes: impl Iterator<Item = &'a SlimNode>, own: impl IntoIterator<Item = Ipv4Addr>) -> bool {
        let mut addrs: BTreeSet<Ipv4Addr> = nodes
            .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
            .filter_map(|a| a.address.parse().ok())
            .collect();
        addrs.extend(own);
        let changed = addrs != self.node_addrs;
        self.node_addrs = addrs;
        changed
    }

    /// Why `ip` may not be an external frontend, or `None` if it may.
    pub fn refusal(&self, ip: Ipv4Addr) -> Option<String> {
        if self.node_addrs.contains(&ip) {
            return Some("it is a node's address".to_owned());
        }
        if ip == Ipv4Addr::BROADCAST {
            return Some("it is the broadcast address".to_owned());
        }
        self.ranges.iter().find(|(n, _)| n.contains(ip)).map(|(n, what)| format!("it is in {what} {n}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn node_addresses_cluster_ranges_and_special_ranges_are_refused() {
        let mut r = Reserved::new("10.42.0.0/16".parse().unwrap(), "10.43.0.0/16".parse().unwrap());
        let node: SlimNode = serde_json::from_value(json!({"metadata": {"name": "b"}, "status": {"addresses": [
            {"type": "InternalIP", "address": "198.18.0.12"}, {"type": "ExternalIP", "address": "203.0.113.2"},
            {"type": "Hostname", "address": "b"}]}}))
        .unwrap();
        assert!(r.set_nodes([&node].into_iter(), ["198.18.0.11".parse().unwrap()]));
        assert!(!r.set_nodes([&node].into_iter(), ["198.18.0.11".parse().unwrap()]));
        for (ip, why) in [
            ("198.18.0.11", "node's address"),
            ("198.18.0.12", "node's address"),
            ("203.0.113.2", "node's address"),
            ("10.42.3.4", "pod range 10.42.0.0/16"),
            ("10.43.0.1", "Service range 10.43.0.0/16"),
            ("127.0.0.1", "loopback"),
            ("169.254.42.1", "link-local"),
            ("255.255.255.255", "broadcast"),
        ] {
            let got = r.refusal(ip.parse().unwrap());
            assert!(got.as_deref().is_some_and(|g| g.contains(why)), "{ip}: {got:?}");
        }
        assert_eq!(r.refusal("198.18.0.200".parse().unwrap()), None);
    }
}
