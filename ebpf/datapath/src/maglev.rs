//! Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, §3.4), one per frontend and
//! scope of a service with [`crate::service::Algorithm::Maglev`], written to
//! `rt_maglev4_v1`. The programs index a table with the flow's 5-tuple hash.
//!
//! Every node must build the same table from the same backends, so the
//! backend permutations come from a hash that is fixed here (FNV-1a 64 over
//! the address and port, finished with splitmix64), never from std's
//! `DefaultHasher` (whose algorithm may change between Rust releases), and
//! backends are taken in address order.

use std::net::Ipv4Addr;

use riptide_common::MAGLEV_M;

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

/// The Maglev table for `backends` (`(id, address, port)`): `MAGLEV_M`
/// backend ids, each backend owning about `MAGLEV_M / n` positions. Empty
/// when there is no backend.
pub fn table(backends: &[(u32, Ipv4Addr, u16)]) -> Vec<u32> {
    let mut bs: Vec<(u32, Ipv4Addr, u16)> = backends.to_vec();
    bs.sort_by_key(|(_, addr, port)| (*addr, *port));
    bs.dedup_by_key(|(_, addr, port)| (*addr, *port));
    if bs.is_empty() {
        return Vec::new();
    }
    let m = MAGLEV_M as u64;
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
    let mut entry: Vec<Option<usize>> = vec![None; MAGLEV_M];
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
            if filled == MAGLEV_M {
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
        for n in [1u32, 2, 3, 7, 40] {
            let t = table(&backends(n));
            assert_eq!(t.len(), MAGLEV_M);
            let s = shares(&t);
            assert_eq!(s.len(), n as usize, "every backend owns positions");
            let ideal = MAGLEV_M as f64 / f64::from(n);
            for (id, c) in &s {
                assert!(*id >= 100, "no empty position");
                let dev = (*c as f64 - ideal).abs() / ideal;
                assert!(dev < 0.05, "n={n}: backend {id} owns {c}, ideal {ideal:.0}");
            }
        }
        assert!(table(&[]).is_empty());
    }

    #[test]
    fn the_table_depends_only_on_the_backend_set() {
        let mut b = backends(5);
        let t = table(&b);
        b.reverse();
        assert_eq!(table(&b), t, "input order does not matter");
        // Ids are local to a node; addresses decide positions.
        let renumbered: Vec<_> = b.iter().map(|(id, a, p)| (id + 1000, *a, *p)).collect();
        let t2 = table(&renumbered);
        assert!(t.iter().zip(&t2).all(|(a, b)| a + 1000 == *b));
    }

    #[test]
    fn removing_a_backend_moves_mostly_its_own_positions() {
        let b = backends(10);
        let before = table(&b);
        let after = table(&b[1..]);
        let removed = b[0].0;
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| **x != removed && x != y)
            .count();
        // The paper: only a small fraction beyond the removed backend's own
        // share moves.
        assert!(
            (moved_others as f64) < MAGLEV_M as f64 * 0.05,
            "{moved_others} positions of remaining backends moved"
        );
    }
}
