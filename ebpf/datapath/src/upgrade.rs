//! Pins an earlier version left behind. Map names carry a version
//! (`rt_ct4_v2`), so a layout change is a new map: a load by a newer version
//! creates the new maps next to the old pins, moves over what must survive
//! the restart, and removes the retired pins (`names::RETIRED_MAPS`).
//!
//! What moves: the conntrack entries of `rt_ct4_v2`, which held every
//! protocol in one table, into `rt_ct4_v3` (TCP flows) and `rt_ctany4_v3`
//! (everything else and the inbound markers), so established load-balanced
//! connections keep their backends and their reverse NAT across the
//! upgrade; and the mappings of `rt_nat4_v1`, also one table for every
//! protocol, into `rt_nat4_v2` (TCP) and `rt_natany4_v2` (the rest), so
//! masqueraded and NodePort-SNATed connections keep their ports (a TCP
//! packet of a masqueraded flow without its mapping is dropped). The key
//! and value layouts did not change, so an entry is copied as it is.
//! Entries the old programs create after the copy (they stay attached
//! until the agent attaches the new ones) are lost; those flows are
//! balanced again on their next packet, as after an eviction, and a TCP
//! connection masqueraded in that moment is dropped as `masq_lost_mapping`.
//!
//! A failed copy leaves the old pin in place, so the next load tries again.
//!
//! Nothing moves for the NetworkPolicy exact-match hashes
//! (`rt_ipcache4x_v1`, `rt_policy4x_v1`): a load creates them empty next
//! to the tries an earlier version filled with every entry, and the
//! programs ask the tries after a hash miss (the policy trie unless an
//! endpoint entry says `PE_F_EXACT_*`, which earlier agents never set), so
//! those entries keep judging until the agent's first pass writes them
//! into the hashes and then removes them from the tries.

use std::path::Path;

use aya::{
    Ebpf, Pod,
    maps::{HashMap, Map, MapData},
};
use riptide_common::{CT_F_INBOUND, CT_F_POLICY, CtKey, CtValue, NatValue, names, proto};

use crate::{
    Error, Result,
    error::map_err,
    gc::{CT_TABLES, NAT_TABLES, dump, nat_table},
    pins::remove_if_exists,
};

/// What an upgrade did (for the agent's log).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Conntrack entries copied from the previous layout.
    pub ct_moved: usize,
    /// NAT mappings (each half counted) copied from the previous layout.
    pub nat_moved: usize,
    /// Retired pins removed.
    pub retired: Vec<&'static str>,
}

/// The conntrack table an entry belongs to in the current layout: TCP
/// flows in [`names::CT4`]; other protocols and bare inbound markers (which
/// only keep masquerade off a reply) in [`names::CT_ANY4`].
pub fn ct_table(k: &CtKey, v: &CtValue) -> &'static str {
    let marker = v.flags & CT_F_INBOUND != 0 && v.flags & CT_F_POLICY == 0;
    if k.proto == proto::TCP && !marker {
        names::CT4
    } else {
        names::CT_ANY4
    }
}

/// Moves what the retired pins under `dir` hold into the maps of `ebpf`
/// and removes them.
pub(crate) fn run(dir: &Path, ebpf: &mut Ebpf) -> Result<Upgrade> {
    let mut up = Upgrade::default();
    let prev = dir.join(names::CT4_PREV);
    if prev.exists() {
        up.ct_moved = move_entries::<CtValue>(&prev, names::CT4_PREV, ebpf, &CT_TABLES, ct_table)?;
    }
    let prev = dir.join(names::NAT4_PREV);
    if prev.exists() {
        up.nat_moved =
            move_entries::<NatValue>(&prev, names::NAT4_PREV, ebpf, &NAT_TABLES, |k, _| nat_table(k.proto))?;
    }
    for name in names::RETIRED_MAPS {
        let path = dir.join(name);
        if path.exists() {
            remove_if_exists(&path)?;
            up.retired.push(name);
        }
    }
    Ok(up)
}

/// `BPF_NOEXIST` of `bpf_map_update_elem` (uapi `linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

/// Copies every entry of the LRU map pinned at `prev` (named `name`) into
/// the table of `tables` that `table_of` names for it.
fn move_entries<V: Pod>(
    prev: &Path,
    name: &'static str,
    ebpf: &mut Ebpf,
    tables: &[&'static str],
    table_of: impl Fn(&CtKey, &V) -> &'static str,
) -> Result<usize> {
    let data = MapData::from_pin(prev).map_err(map_err(name))?;
    let old: HashMap<MapData, CtKey, V> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
    let entries = dump(&old).map_err(map_err(name))?;
    let mut moved = 0;
    for &table in tables {
        let map = ebpf.map_mut(table).ok_or(Error::MissingMap { name: table })?;
        let mut new: HashMap<&mut MapData, CtKey, V> =
            HashMap::try_from(map).map_err(map_err(table))?;
        for (k, v) in entries.iter().filter(|(k, v)| table_of(k, v) == table) {
            // An entry the new programs already made wins.
            match new.insert(k, v, BPF_NOEXIST) {
                Ok(()) => moved += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(table)(e)),
            }
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use riptide_common::{CT_F_REPLY, CT_F_SNAT};

    use super::*;

    fn key(p: u8) -> CtKey {
        CtKey {
            proto: p,
            ..CtKey::default()
        }
    }

    fn val(flags: u16) -> CtValue {
        CtValue {
            flags,
            ..CtValue::default()
        }
    }

    #[test]
    fn entries_go_to_the_table_the_programs_use() {
        assert_eq!(ct_table(&key(proto::TCP), &val(0)), names::CT4);
        assert_eq!(ct_table(&key(proto::TCP), &val(CT_F_REPLY | CT_F_SNAT)), names::CT4);
        assert_eq!(ct_table(&key(proto::TCP), &val(CT_F_POLICY | CT_F_INBOUND)), names::CT4);
        assert_eq!(ct_table(&key(proto::TCP), &val(CT_F_INBOUND)), names::CT_ANY4);
        assert_eq!(ct_table(&key(proto::UDP), &val(0)), names::CT_ANY4);
        assert_eq!(ct_table(&key(proto::ICMP), &val(CT_F_POLICY)), names::CT_ANY4);
    }

    #[test]
    fn nat_mappings_go_to_the_table_of_their_protocol() {
        assert_eq!(nat_table(proto::TCP), names::NAT4);
        assert_eq!(nat_table(proto::UDP), names::NAT_ANY4);
        assert_eq!(nat_table(proto::ICMP), names::NAT_ANY4);
    }

    #[test]
    fn retired_names_are_never_current_ones() {
        for r in names::RETIRED_MAPS {
            assert!(!names::ALL_MAPS.contains(&r), "{r}");
        }
        assert!(names::RETIRED_MAPS.contains(&names::CT4_PREV));
        assert!(names::RETIRED_MAPS.contains(&names::NAT4_PREV));
    }
}
