//! How many entries each sizable map gets when a load creates it.
//!
//! [`MapSizes::default`] holds the capacities compiled into the object
//! (`riptide_common::capacity`); [`MapSizes::set`] overrides one map and
//! refuses sizes the kernel would reject or a node could not hold, so a bad
//! ConfigMap value fails at start-up with the map's name instead of as an
//! `EINVAL` from `BPF_MAP_CREATE`. The kernel tests use it to create
//! deliberately tiny maps.
//!
//! Sizes apply only to maps a load creates: a map reused from a pin keeps
//! the size it was created with (changing it means deleting the pin, which
//! drops its contents). The stats array, the config array and the events
//! ring buffer are not sizable: their sizes are part of the contract with
//! the programs.

use std::collections::BTreeMap;

use riptide_common::{capacity, names};

use crate::{Error, Result};

/// What kind of map a sizable map is (the kernel's rules differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Preallocated hash: every entry's memory is taken at creation.
    Hash,
    /// Hash allocated per entry (`BPF_F_NO_PREALLOC`, LPM tries).
    OnDemand,
    /// LRU hash: full means "evict the least recently used", never "fail".
    Lru,
}

/// One sizable map: its name, default and the range accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizableMap {
    pub name: &'static str,
    pub kind: MapKind,
    pub default: u32,
    pub max: u32,
}

/// Largest size accepted for any map (16 Mi entries): a conntrack table of
/// that size already takes ~1.5 GiB of kernel memory.
pub const MAX_ENTRIES: u32 = 1 << 24;

/// Every map whose size can be overridden.
pub const SIZABLE: [SizableMap; 18] = [
    sizable(names::EP4, MapKind::Hash, capacity::EP4),
    sizable(names::SVC4, MapKind::Hash, capacity::SVC4),
    sizable(names::BE4, MapKind::Hash, capacity::BE4),
    sizable(names::REVNAT4, MapKind::Hash, capacity::REVNAT4),
    sizable(names::CT4, MapKind::Lru, capacity::CT4),
    sizable(names::CT_ANY4, MapKind::Lru, capacity::CT_ANY4),
    sizable(names::NAT4, MapKind::Lru, capacity::NAT4),
    sizable(names::NAT_ANY4, MapKind::Lru, capacity::NAT_ANY4),
    sizable(names::AFF4, MapKind::Lru, capacity::AFF4),
    sizable(names::SOCKREV4, MapKind::Lru, capacity::SOCKREV4),
    sizable(names::NODE4, MapKind::OnDemand, capacity::NODE4),
    // Maglev values are kilobytes each.
    SizableMap {
        name: names::MAGLEV4,
        kind: MapKind::OnDemand,
        default: capacity::MAGLEV4,
        max: 1 << 20,
    },
    sizable(names::POLEP4, MapKind::Hash, capacity::POLEP4),
    sizable(names::IPCACHE4, MapKind::OnDemand, capacity::IPCACHE4),
    sizable(names::POLICY4, MapKind::OnDemand, capacity::POLICY4),
    sizable(names::SRCRANGE4, MapKind::OnDemand, capacity::SRCRANGE4),
    sizable(names::IPCACHE4_EXACT, MapKind::OnDemand, capacity::IPCACHE4_EXACT),
    sizable(names::POLICY4_EXACT, MapKind::OnDemand, capacity::POLICY4_EXACT),
];

const fn sizable(name: &'static str, kind: MapKind, default: u32) -> SizableMap {
    SizableMap {
        name,
        kind,
        default,
        max: MAX_ENTRIES,
    }
}

/// `max_entries` per sizable map (by map name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapSizes {
    sizes: BTreeMap<&'static str, u32>,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            sizes: SIZABLE.iter().map(|m| (m.name, m.default)).collect(),
        }
    }
}

impl MapSizes {
    /// The description of sizable map `name`.
    pub fn spec(name: &str) -> Option<&'static SizableMap> {
        SIZABLE.iter().find(|m| m.name == name)
    }

    /// The smallest size accepted for a map of `kind`. LRU maps keep a free
    /// list per CPU and, with `BPF_F_NO_COMMON_LRU`, one LRU list per CPU
    /// (`htab_map_alloc()` rounds `max_entries` to a multiple of the
    /// possible CPUs): at least one entry per possible CPU.
    pub fn min_entries(kind: MapKind) -> u32 {
        match kind {
            MapKind::Lru => possible_cpus(),
            MapKind::Hash | MapKind::OnDemand => 1,
        }
    }

    /// Overrides the size of map `name` after checking it.
    pub fn set(&mut self, name: &str, max_entries: u32) -> Result<&mut Self> {
        let Some(spec) = Self::spec(name) else {
            return Err(Error::MapSize {
                name: name.to_owned(),
                max_entries,
                reason: String::from("not a sizable map"),
            });
        };
        let min = Self::min_entries(spec.kind);
        if max_entries < min || max_entries > spec.max {
            return Err(Error::MapSize {
                name: name.to_owned(),
                max_entries,
                reason: format!("must be between {min} and {}", spec.max),
            });
        }
        self.sizes.insert(spec.name, max_entries);
        Ok(self)
    }

    /// [`MapSizes::set`] by value, for building sizes in one expression.
    pub fn with(mut self, name: &str, max_entries: u32) -> Result<Self> {
        self.set(name, max_entries)?;
        Ok(self)
    }

    /// The size map `name` gets (its default when not overridden), `None`
    /// for a map that is not sizable.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.sizes.get(name).copied()
    }

    /// `(map name, max_entries)` of every sizable map.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.sizes.iter().map(|(n, s)| (*n, *s))
    }

    /// `(map name, max_entries)` of the maps whose size differs from the
    /// default.
    pub fn overrides(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.iter()
            .filter(|(n, s)| Self::spec(n).is_some_and(|m| m.default != *s))
    }
}

/// Possible CPUs (what per-CPU map parts are sized by); 1 when sysfs cannot
/// say, which only makes the LRU minimum laxer.
fn possible_cpus() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_compiled_capacities() {
        let s = MapSizes::default();
        assert_eq!(s.get(names::CT4), Some(capacity::CT4));
        assert_eq!(s.get(names::BE4), Some(capacity::BE4));
        assert_eq!(s.overrides().count(), 0);
        assert_eq!(s.iter().count(), SIZABLE.len());
    }

    #[test]
    fn overrides_are_checked() {
        let s = MapSizes::default().with(names::BE4, 4).expect("4 backends");
        assert_eq!(s.get(names::BE4), Some(4));
        assert_eq!(s.overrides().collect::<Vec<_>>(), [(names::BE4, 4)]);

        let mut s = MapSizes::default();
        assert!(matches!(s.set(names::BE4, 0), Err(Error::MapSize { .. })));
        assert!(s.set(names::CT4, MAX_ENTRIES + 1).is_err());
        assert!(s.set(names::MAGLEV4, 1 << 21).is_err());
        assert!(s.set(names::STATS, 128).is_err(), "stats size is a contract");
        assert!(s.set("rt_nope_v1", 8).is_err());
        let lru_min = MapSizes::min_entries(MapKind::Lru);
        assert!(s.set(names::NAT4, lru_min).is_ok());
        if lru_min > 1 {
            assert!(s.set(names::NAT4, lru_min - 1).is_err());
        }
        assert_eq!(s, MapSizes::default().with(names::NAT4, lru_min).expect("min"));
    }

    #[test]
    fn every_sizable_map_is_in_the_object_list() {
        for m in SIZABLE {
            assert!(names::ALL_MAPS.contains(&m.name), "{}", m.name);
            assert!(m.default >= MapSizes::min_entries(m.kind) && m.default <= m.max);
        }
    }
}
