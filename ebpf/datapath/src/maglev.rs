//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, §3.4), one per frontend and
//! scope of a service using Maglev (see [`crate::service::Algorithm`]),
//! written to `rt_maglev4_v2` in chunks. The programs index a table with
//! the flow's 5-tuple hash.
//!
//! Every node must build the same table from the same backends with no
//! shared state, so the backend permutations come from a hash that is fixed
//! here (FNV-1a 64 over the address and port, finished with splitmix64),
//! never from std's `DefaultHasher` (whose algorithm may change between
//! Rust releases), and backends are taken in (address, port) order, never
//! in the order of node-local ids. Cilium (`pkg/maglev`) does the same with
//! murmur3 over the backend's address string and a cluster-wide seed.
//! Weights are not supported: EndpointSlices carry none (every backend
//! owns an equal share).

use std::{fmt, net::Ipv4Addr, str::FromStr};

use riptide_common::{MAGLEV_CHUNK, MAGLEV_M_DEFAULT, MAGLEV_SIZES};
use serde::{Deserialize, Serialize};

/// A Maglev table size: one of [`MAGLEV_SIZES`] (primes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct TableSize(u32);

/// A table size that is not one of [`MAGLEV_SIZES`].
#[derive(Debug, thiserror::Error)]
#[error("maglev table size {0} is not one of {MAGLEV_SIZES:?}")]
pub struct InvalidTableSize(pub String);

impl TableSize {
    pub const DEFAULT: Self = Self(MAGLEV_M_DEFAULT);

    pub fn new(m: u32) -> Result<Self, InvalidTableSize> {
        if MAGLEV_SIZES.contains(&m) {
            Ok(Self(m))
        } else {
            Err(InvalidTableSize(m.to_string()))
        }
    }

    /// `M`, the number of positions.
    pub fn get(self) -> u32 {
        self.0
    }

    /// How many `rt_maglev4_v2` chunks a table of this size takes.
    pub fn chunks(self) -> usize {
        (self.0 as usize).div_ceil(MAGLEV_CHUNK)
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u32> for TableSize {
    type Error = InvalidTableSize;

    fn try_from(m: u32) -> Result<Self, Self::Error> {
        Self::new(m)
    }
}

impl From<TableSize> for u32 {
    fn from(m: TableSize) -> u32 {
        m.0
    }
}

impl FromStr for TableSize {
    type Err = InvalidTableSize;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u32>()
            .ok()
            .and_then(|m| Self::new(m).ok())
            .ok_or_else(|| InvalidTableSize(s.to_owned()))
    }
}

impl fmt::Display for TableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a 64 of `bytes` from `seed`, finished with splitmix64's mixer so
/// nearby addresses land far apart.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The Maglev table of size `m` for `backends` (`(id, address, port)`):
/// `M` backend ids, each backend owning about `M / n` positions (a backend
/// beyond the `M`-th owns none). Empty when there is no backend.
pub fn table(backends: &[(u32, Ipv4Addr, u16)], m: TableSize) -> Vec<u32> {
    let mut bs: Vec<(u32, Ipv4Addr, u16)> = backends.to_vec();
    bs.sort_by_key(|(_, addr, port)| (*addr, *port));
    bs.dedup_by_key(|(_, addr, port)| (*addr, *port));
    if bs.is_empty() {
        return Vec::new();
    }
    let size = m.get() as usize;
    let m = u64::from(m.get());
    // Each backend's preference list: offset + j·skip (mod M), a
    // permutation of 0..M because M is prime and 1 ≤ skip < M.
    let perms: Vec<(u64, u64)> = bs
        .iter()
        .map(|(_, addr, port)| {
            let mut name = addr.octets().to_vec();
            name.extend_from_slice(&port.to_be_bytes());
            let offset = hash(0, &name) % m;
            let skip = hash(0x5bd1_e995, &name) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; bs.len()];
    let mut entry: Vec<Option<usize>> = vec![None; size];
    let mut filled = 0;
    // Backends take turns claiming their next preferred free position.
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = ((offset + next[i] * skip) % m) as usize;
            while entry[c].is_some() {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m) as usize;
            }
            entry[c] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    entry
        .into_iter()
        .map(|e| e.map_or(0, |i| bs[i].0))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;

    fn backends(n: u32) -> Vec<(u32, Ipv4Addr, u16)> {
        (0..n)
            .map(|i| {
                (
                    100 + i,
                    Ipv4Addr::new(10, 42, (i / 200) as u8, (i % 200) as u8 + 1),
                    8080,
                )
            })
            .collect()
    }

    fn shares(t: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for id in t {
            *m.entry(*id).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn every_position_names_a_backend_and_shares_are_even() {
        for (n, m) in [
            (1u32, 4093),
            (2, 251),
            (3, 4093),
            (7, 1021),
            (40, 4093),
            (160, 16381),
        ] {
            let m = TableSize::new(m).unwrap();
            let t = table(&backends(n), m);
            assert_eq!(t.len(), m.get() as usize);
            let s = shares(&t);
            assert_eq!(s.len(), n as usize, "every backend owns positions");
            let ideal = f64::from(m.get()) / f64::from(n);
            for (id, c) in &s {
                assert!(*id >= 100, "no empty position");
                let dev = (*c as f64 - ideal).abs() / ideal;
                assert!(dev < 0.05, "n={n}: backend {id} owns {c}, ideal {ideal:.0}");
            }
        }
        assert!(table(&[], TableSize::DEFAULT).is_empty());
    }

    #[test]
    fn the_table_depends_only_on_the_backend_set() {
        let mut b = backends(5);
        let t = table(&b, TableSize::DEFAULT);
        b.reverse();
        assert_eq!(
            table(&b, TableSize::DEFAULT),
            t,
            "input order does not matter"
        );
        // Ids are local to a node; addresses decide positions.
        let renumbered: Vec<_> = b.iter().map(|(id, a, p)| (id + 1000, *a, *p)).collect();
        let t2 = table(&renumbered, TableSize::DEFAULT);
        assert!(t.iter().zip(&t2).all(|(a, b)| a + 1000 == *b));
    }

    #[test]
    fn removing_a_backend_moves_mostly_its_own_positions() {
        let b = backends(10);
        let before = table(&b, TableSize::DEFAULT);
        let after = table(&b[1..], TableSize::DEFAULT);
        let removed = b[0].0;
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| **x != removed && x != y)
            .count();
        // The paper: only a small fraction beyond the removed backend's own
        // share moves.
        assert!(
            (moved_others as f64) < before.len() as f64 * 0.05,
            "{moved_others} positions of remaining backends moved"
        );
    }
}

#[cfg(test)]
mod size_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_listed_primes_are_table_sizes() {
        for m in MAGLEV_SIZES {
            assert_eq!(TableSize::new(m).unwrap().get(), m);
            assert_eq!(m.to_string().parse::<TableSize>().unwrap().get(), m);
        }
        for bad in ["0", "1000", "16384", "65537", "-1", "x", ""] {
            assert!(bad.parse::<TableSize>().is_err(), "{bad} accepted");
        }
        assert_eq!(TableSize::new(251).unwrap().chunks(), 1);
        assert_eq!(TableSize::new(4093).unwrap().chunks(), 4);
        assert_eq!(TableSize::new(65521).unwrap().chunks(), 64);
        assert!(TableSize::try_from(1000).is_err());
    }
}
