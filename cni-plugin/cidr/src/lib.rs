//! The cluster's IPv4 ranges: one parse-and-validate rule ([`parse`]) and
//! the split of a range into node ranges ([`subnets`]). See README.md for
//! why the rule rejects host bits instead of clearing them.

use std::net::Ipv4Addr;

pub use ipnetwork::Ipv4Network;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} {value:?} is not an IPv4 CIDR (a.b.c.d/n, n = 0..=32)")]
    Syntax { what: &'static str, value: String },
    #[error("{what} {value} has host bits set; did you mean {network}?")]
    HostBits {
        what: &'static str,
        value: String,
        network: Ipv4Network,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses `value` (`a.b.c.d/n`, surrounding whitespace ignored) as the
/// range called `what` in messages (`cluster-cidr`, `podCIDR`, ...).
/// Host bits are an error that names the network the user probably meant.
pub fn parse(what: &'static str, value: &str) -> Result<Ipv4Network> {
    let value = value.trim();
    let syntax = || Error::Syntax {
        what,
        value: value.to_owned(),
    };
    let (addr, prefix) = value.split_once('/').ok_or_else(syntax)?;
    if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
    let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
    let given = Ipv4Network::new(addr, prefix).map_err(|_| syntax())?;
    let network = Ipv4Network::new(given.network(), prefix).map_err(|_| syntax())?;
    if network != given {
        return Err(Error::HostBits {
            what,
            value: value.to_owned(),
            network,
        });
    }
    Ok(network)
}

/// The ranges of length `prefix` inside `range`, lowest first (none when
/// `prefix` is shorter than the range's own prefix or longer than 32).
pub fn subnets(range: Ipv4Network, prefix: u8) -> impl Iterator<Item = Ipv4Network> {
    let count = if (range.prefix()..=32).contains(&prefix) {
        1u64 << (prefix - range.prefix())
    } else {
        0
    };
    let base = u64::from(u32::from(range.network()));
    let step = 1u64 << (32 - u32::from(prefix.min(32)));
    (0..count).filter_map(move |i| {
        let addr = u32::try_from(base + i * step).ok()?;
        Ipv4Network::new(addr.into(), prefix).ok()
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse() {
        assert_eq!(parse("cluster-cidr", "10.42.0.0/16").unwrap(), net("10.42.0.0/16"));
        assert_eq!(parse("podCIDR", " 10.42.7.0/24\n").unwrap(), net("10.42.7.0/24"));
        assert_eq!(parse("x", "0.0.0.0/0").unwrap(), net("0.0.0.0/0"));
        assert_eq!(parse("x", "10.42.0.9/32").unwrap(), net("10.42.0.9/32"));
    }

    #[test]
    fn host_bits_name_the_network_meant() {
        let e = parse("cluster-cidr", "10.42.0.1/16").unwrap_err();
        assert_eq!(e.to_string(), "cluster-cidr 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?");
        assert!(matches!(e, Error::HostBits { network, .. } if network == net("10.42.0.0/16")));
        assert!(parse("podCIDR", "10.42.7.1/24").is_err());
        assert!(parse("podCIDR", "10.42.1.0/16").is_err(), "a /24 typed as /16");
    }

    #[test]
    fn only_address_slash_length() {
        for bad in ["10.42.0.0", "10.42.0.0/", "10.42.0.0/33", "10.42.0.0/255.255.0.0", "10.42.0.0/+8", "10.42.0.0/016", "10.42.0/16", "fd00::/64", "", "/16"] {
            let e = parse("cluster-cidr", bad).unwrap_err();
            assert!(matches!(e, Error::Syntax { .. }), "{bad:?}: {e}");
            assert!(e.to_string().starts_with("cluster-cidr "), "{e}");
        }
    }

    #[test]
    fn subnets_in_address_order() {
        let s: Vec<_> = subnets(net("10.42.0.0/16"), 24).collect();
        assert_eq!(s.len(), 256);
        assert_eq!((s[0], s[7], s[255]), (net("10.42.0.0/24"), net("10.42.7.0/24"), net("10.42.255.0/24")));
        assert!(s.iter().all(|c| c.is_subnet_of(net("10.42.0.0/16"))));
        assert_eq!(subnets(net("10.42.0.0/24"), 24).collect::<Vec<_>>(), [net("10.42.0.0/24")]);
        assert_eq!(subnets(net("10.42.0.0/24"), 16).count(), 0);
        assert_eq!(subnets(net("10.42.0.0/24"), 33).count(), 0);
        assert_eq!(subnets(net("255.255.255.0/24"), 25).last(), Some(net("255.255.255.128/25")));
        assert_eq!(subnets(net("0.0.0.0/0"), 1).collect::<Vec<_>>(), [net("0.0.0.0/1"), net("128.0.0.0/1")]);
    }
}
