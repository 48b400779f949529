//! LoadBalancer address pools: the ConfigMap `kube-system/riptide-lb-pools`,
//! one data key per pool, the value a list of CIDRs, `first-last` ranges or
//! single addresses separated by commas or whitespace:
//!
//! ```yaml
//! data:
//!   default: "198.18.0.208/28, 198.18.0.240-198.18.0.250"
//! ```
//!
//! A CIDR of /30 or wider gives neither its network nor its broadcast
//! address (Cilium's `allowFirstLastIPs: No`); a range gives every address.
//!
//! Two readers: the LB IPAM controller (`controllers::lbipam`) hands
//! addresses out of the pools, and the apiserver's Service admission
//! (`apiserver::admission`) admits a LoadBalancer ingress address written
//! to `services/status` when a pool holds it.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

/// Namespace and name of the pools ConfigMap.
pub const POOLS_NAMESPACE: &str = "kube-system";
pub const POOLS_CONFIGMAP: &str = "riptide-lb-pools";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool:?}: {entry:?} is not an IPv4 CIDR, first-last range or address")]
    Entry { pool: String, entry: String },
    #[error("pool {pool:?}: {entry:?} has host bits set")]
    HostBits { pool: String, entry: String },
    #[error("pool {pool:?}: range {entry:?} ends before it starts")]
    Reversed { pool: String, entry: String },
    #[error("pools {a:?} and {b:?} overlap")]
    Overlap { a: String, b: String },
}

/// A named set of inclusive address ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    ranges: Vec<(u32, u32)>,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&v))
    }

    /// Every address, in order.
    pub fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ranges.iter().flat_map(|(a, b)| (*a..=*b).map(Ipv4Addr::from))
    }
}

impl fmt::Display for Pool {
    /// `name (a-b, c)`, as an operator wrote the ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|(a, b)| if a == b { Ipv4Addr::from(*a).to_string() } else { format!("{}-{}", Ipv4Addr::from(*a), Ipv4Addr::from(*b)) })
            .collect();
        write!(f, "{} ({})", self.name, ranges.join(", "))
    }
}

fn parse_entry(pool: &str, entry: &str) -> Result<(u32, u32), PoolError> {
    let bad = || PoolError::Entry { pool: pool.into(), entry: entry.into() };
    if let Some((ip, len)) = entry.split_once('/') {
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u32 = len.parse().map_err(|_| bad())?;
        if len > 32 {
            return Err(bad());
        }
        let base = u32::from(ip);
        let host = if len == 0 { u32::MAX } else { (1u32 << (32 - len)) - 1 };
        if base & host != 0 {
            return Err(PoolError::HostBits { pool: pool.into(), entry: entry.into() });
        }
        let last = base | host;
        // Network and broadcast addresses stay out, as on any LAN.
        return Ok(if len <= 30 { (base + 1, last - 1) } else { (base, last) });
    }
    if let Some((a, b)) = entry.split_once('-') {
        let a = u32::from(a.trim().parse::<Ipv4Addr>().map_err(|_| bad())?);
        let b = u32::from(b.trim().parse::<Ipv4Addr>().map_err(|_| bad())?);
        if b < a {
            return Err(PoolError::Reversed { pool: pool.into(), entry: entry.into() });
        }
        return Ok((a, b));
    }
    let v = u32::from(entry.parse::<Ipv4Addr>().map_err(|_| bad())?);
    Ok((v, v))
}

/// The pools of the ConfigMap's data, in name order. Any bad entry or two
/// pools sharing an address rejects the whole set: handing out addresses
/// from half a configuration would move them when it is fixed.
pub fn parse_pools(data: &BTreeMap<String, String>) -> Result<Vec<Pool>, PoolError> {
    let mut pools = Vec::new();
    for (name, text) in data {
        let ranges = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|e| !e.is_empty())
            .map(|e| parse_entry(name, e))
            .collect::<Result<Vec<_>, _>>()?;
        pools.push(Pool { name: name.clone(), ranges });
    }
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            let overlaps = a.ranges.iter().any(|(a0, a1)| b.ranges.iter().any(|(b0, b1)| a0 <= b1 && b0 <= a1));
            if overlaps {
                return Err(PoolError::Overlap { a: a.name.clone(), b: b.name.clone() });
            }
        }
    }
    Ok(pools)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Pools from (name, entries) pairs, as the ConfigMap's data.
    pub(crate) fn pools(kv: &[(&str, &str)]) -> Vec<Pool> {
        parse_pools(&kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()).unwrap()
    }

    pub(crate) fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn pools_parse_cidrs_ranges_and_addresses() {
        let p = pools(&[("a", "192.0.2.0/30, 192.0.2.10-192.0.2.11\n192.0.2.20"), ("b", "192.0.2.32/32")]);
        let a: Vec<_> = p[0].addresses().collect();
        assert_eq!(a, vec![ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.10"), ip("192.0.2.11"), ip("192.0.2.20")]);
        assert!(p[1].contains(ip("192.0.2.32")));
        let bad = |v: &str| parse_pools(&[("x".to_owned(), v.to_owned())].into_iter().collect()).unwrap_err();
        assert!(matches!(bad("192.0.2.1/24"), PoolError::HostBits { .. }));
        assert!(matches!(bad("192.0.2.9-192.0.2.1"), PoolError::Reversed { .. }));
        assert!(matches!(bad("fd00::/64"), PoolError::Entry { .. }));
        let overlap = parse_pools(&[("x".into(), "192.0.2.0/29".into()), ("y".into(), "192.0.2.6".into())].into_iter().collect());
        assert_eq!(overlap.unwrap_err().to_string(), "pools \"x\" and \"y\" overlap");
    }

    #[test]
    fn pools_print_as_written() {
        let p = pools(&[("a", "192.0.2.0/30, 192.0.2.10-192.0.2.11 192.0.2.20")]);
        assert_eq!(p[0].to_string(), "a (192.0.2.1-192.0.2.2, 192.0.2.10-192.0.2.11, 192.0.2.20)");
    }
}
