//! Protocols and port ranges as `rt_policy4_v1` prefixes.

use riptide_common::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_FULL, proto};

/// IP protocol number of SCTP (not in `riptide_common::proto`: the
/// datapath parses no SCTP ports, so SCTP rules only ever match as "every
/// port" or through "every protocol").
pub const SCTP: u8 = 132;

/// The IP protocol number of a NetworkPolicy / containerPort protocol
/// (`None` = the API default, TCP); `Err` holds an unknown name.
pub fn protocol_number(name: Option<&str>) -> Result<u8, String> {
    match name.unwrap_or("TCP") {
        "TCP" => Ok(proto::TCP),
        "UDP" => Ok(proto::UDP),
        "SCTP" => Ok(SCTP),
        other => Err(other.to_owned()),
    }
}

/// The protocol's name (for messages and views).
pub fn protocol_name(number: u8) -> String {
    match number {
        proto::TCP => "TCP".to_owned(),
        proto::UDP => "UDP".to_owned(),
        SCTP => "SCTP".to_owned(),
        proto::ICMP => "ICMP".to_owned(),
        n => n.to_string(),
    }
}

/// The fewest aligned port prefixes covering exactly `lo..=hi`, as
/// (first port, `rt_policy4_v1` prefix length in
/// `POLICY_PREFIX_ANY_PORT..=POLICY_PREFIX_FULL`), lowest first. Empty when
/// `lo > hi`. Greedy from the low end: at each step the largest block that
/// is aligned at the current port and does not pass `hi`, which is the
/// minimal cover (each block is a maximal subtree of the port trie).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let hi = u32::from(hi);
    let mut cur = u32::from(lo);
    while cur <= hi {
        // Largest power-of-two block aligned at `cur` (the whole space at 0).
        let mut size: u32 = if cur == 0 { 1 << 16 } else { 1 << cur.trailing_zeros().min(16) };
        while cur + size - 1 > hi {
            size >>= 1;
        }
        let port_bits = 16 - size.trailing_zeros();
        out.push((u16::try_from(cur).unwrap_or(u16::MAX), POLICY_PREFIX_ANY_PORT + port_bits));
        cur += size;
    }
    debug_assert!(out.iter().all(|(_, p)| *p <= POLICY_PREFIX_FULL));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimal exact cover by aligned blocks, by recursion over the
    /// port trie (a block inside the range is one prefix; a block
    /// straddling it splits in two).
    fn minimal(lo: u32, hi: u32, base: u32, size: u32) -> usize {
        let end = base + size - 1;
        if end < lo || base > hi {
            0
        } else if lo <= base && end <= hi {
            1
        } else {
            minimal(lo, hi, base, size / 2) + minimal(lo, hi, base + size / 2, size / 2)
        }
    }

    fn check_range(lo: u16, hi: u16) {
        let prefixes = port_prefixes(lo, hi);
        let mut covered = Vec::new();
        for (base, prefix) in &prefixes {
            assert!((POLICY_PREFIX_ANY_PORT..=POLICY_PREFIX_FULL).contains(prefix));
            let size = 1u32 << (POLICY_PREFIX_FULL - prefix);
            assert_eq!(u32::from(*base) % size, 0, "{lo}..={hi}: {base}/{prefix} not aligned");
            covered.extend(u32::from(*base)..u32::from(*base) + size);
        }
        let want: Vec<u32> = (u32::from(lo)..=u32::from(hi)).collect();
        assert_eq!(covered, want, "{lo}..={hi}: {prefixes:?}");
        assert_eq!(
            prefixes.len(),
            minimal(u32::from(lo), u32::from(hi), 0, 1 << 16),
            "{lo}..={hi}: {prefixes:?} is not minimal"
        );
    }

    #[test]
    fn every_small_range_decomposes_exactly_and_minimally() {
        for lo in 0..=130u16 {
            for hi in lo..=130u16 {
                check_range(lo, hi);
            }
        }
    }

    #[test]
    fn ranges_at_the_top_and_across_the_space_decompose_exactly_and_minimally() {
        for lo in 65_400..=u16::MAX {
            for hi in lo..=u16::MAX {
                check_range(lo, hi);
            }
        }
        for (lo, hi) in [(0, u16::MAX), (1, u16::MAX), (1, 65_534), (1024, 65_535), (32_000, 32_768), (80, 8080)] {
            check_range(lo, hi);
        }
    }

    #[test]
    fn known_decompositions() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 96)]);
        assert_eq!(port_prefixes(0, u16::MAX), vec![(0, 80)]);
        // 32000..=32768 (upstream's endPort e2e range): 32000/88 covers
        // 32000..=32255, 32256/87 ..=32767, 32768/96.
        assert_eq!(port_prefixes(32_000, 32_768), vec![(32_000, 88), (32_256, 87), (32_768, 96)]);
        assert_eq!(port_prefixes(81, 80), vec![]);
    }

    #[test]
    fn protocols() {
        assert_eq!(protocol_number(None), Ok(proto::TCP));
        assert_eq!(protocol_number(Some("UDP")), Ok(proto::UDP));
        assert_eq!(protocol_number(Some("SCTP")), Ok(SCTP));
        assert_eq!(protocol_number(Some("tcp")), Err("tcp".to_owned()));
    }
}
