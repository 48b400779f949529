//! `spec.loadBalancerSourceRanges` → the datapath's [`SourceRanges`], with
//! kube-proxy's rules (`pkg/proxy/iptables/proxier.go` `KUBE-FW-*`,
//! `pkg/proxy/nftables/proxier.go` firewall chains):
//!
//! - no ranges: every source may reach the load-balancer IPs;
//! - ranges: only sources inside one; the NodePort, externalIPs and
//!   ClusterIP are not filtered (kube-proxy's scope; Cilium's
//!   `bpf-lb-src-range-all-types` widening is not offered);
//! - when a range holds the node's own address, the load-balancer IPs are
//!   allowed as sources too: a node that answers for a VIP-like load
//!   balancer on a local address sends its own requests from the VIP
//!   (kube-proxy's `allowFromNode`).
//!
//! Entries that do not parse are skipped and reported (an Event on the
//! Service); IPv6 ranges do not apply to this IPv4 datapath. A list left
//! with no IPv4 range denies everyone rather than opening the Service: the
//! user asked for a restriction, and a typo must not lift it.

use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use riptide_datapath::service::SourceRanges;

/// The parsed list and the entries that did not parse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub ranges: SourceRanges,
    pub invalid: Vec<String>,
}

/// Parses `spec` (the field as written) for a Service whose load-balancer
/// IPs are `lb_ips`, on a node at `node_ip`.
pub fn parse(spec: &[String], lb_ips: &[Ipv4Addr], node_ip: Option<Ipv4Addr>) -> Parsed {
    if spec.is_empty() {
        return Parsed::default();
    }
    let mut v4 = Vec::new();
    let mut invalid = Vec::new();
    for raw in spec {
        // The apiserver trims the entries it validates the same way.
        match raw.trim().parse::<IpNetwork>() {
            Ok(IpNetwork::V4(n)) => v4.push(n),
            Ok(IpNetwork::V6(_)) => {}
            Err(_) => invalid.push(raw.clone()),
        }
    }
    if node_ip.is_some_and(|ip| v4.iter().any(|n| n.contains(ip))) {
        v4.extend(lb_ips.iter().map(|ip| Ipv4Network::from(*ip)));
    }
    Parsed {
        ranges: SourceRanges::Only(v4),
        invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn nets(p: &Parsed) -> Vec<String> {
        match &p.ranges {
            SourceRanges::Any => vec!["any".into()],
            SourceRanges::Only(v) => v.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn no_ranges_means_everyone() {
        assert_eq!(parse(&[], &[], None), Parsed::default());
        assert_eq!(Parsed::default().ranges, SourceRanges::Any);
    }

    #[test]
    fn ranges_parse_trimmed_and_ipv6_ones_do_not_apply() {
        let p = parse(&s(&[" 203.0.113.0/24", "10.0.0.0/8 ", "2001:db8::/32"]), &[], None);
        assert_eq!(nets(&p), ["203.0.113.0/24", "10.0.0.0/8"]);
        assert!(p.invalid.is_empty());
    }

    #[test]
    fn invalid_entries_are_reported_and_never_open_the_service() {
        let p = parse(&s(&["203.0.113.0/33", "10.0.0.0/8"]), &[], None);
        assert_eq!(nets(&p), ["10.0.0.0/8"]);
        assert_eq!(p.invalid, ["203.0.113.0/33"]);
        // Nothing valid left: deny, not allow.
        let p = parse(&s(&["not-a-cidr"]), &[], None);
        assert_eq!(p.ranges, SourceRanges::Only(Vec::new()));
        assert_eq!(p.invalid, ["not-a-cidr"]);
        let p = parse(&s(&["2001:db8::/32"]), &[], None);
        assert_eq!(p.ranges, SourceRanges::Only(Vec::new()), "IPv6 only: no IPv4 source allowed");
    }

    #[test]
    fn a_range_holding_the_node_allows_the_lb_ips_as_sources() {
        let lb = ["192.0.2.100".parse().unwrap()];
        let node = Some("198.18.0.11".parse().unwrap());
        let p = parse(&s(&["198.18.0.0/24"]), &lb, node);
        assert_eq!(nets(&p), ["198.18.0.0/24", "192.0.2.100/32"]);
        let p = parse(&s(&["203.0.113.0/24"]), &lb, node);
        assert_eq!(nets(&p), ["203.0.113.0/24"], "node outside every range");
    }
}
