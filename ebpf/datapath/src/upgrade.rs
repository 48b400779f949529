//! Pins an earlier version left behind. Map names carry a version
//! (`rt_ct4_v2`), so a layout change is a new map: a load by a newer version
//! creates the new maps next to the old pins, moves over what must survive
//! the restart, and removes the retired pins (`names::RETIRED_MAPS`).
//!
//! What moves: the conntrack entries of `rt_ct4_v2`, which held every
//! protocol in one table, into `rt_ct4_v3` (TCP flows) and `rt_ctany4_v3`
//! (everything else and the inbound markers), so established load-balanced
//! connections keep their backends and their reverse NAT across the
//! upgrade. The key and value layouts did not change, so an entry is copied
//! as it is. Entries the old programs create after the copy (they stay
//! attached until the agent attaches the new ones) are lost; those flows
//! are balanced again on their next packet, as after an eviction.
//!
//! A failed copy leaves the old pin in place, so the next load tries again.

use std::path::Path;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData},
};
use riptide_common::{CT_F_INBOUND, CT_F_POLICY, CtKey, CtValue, names, proto};

use crate::{
    Error, Result,
    error::map_err,
    gc::dump,
    pins::remove_if_exists,
};

/// What an upgrade did (for the agent's log).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Conntrack entries copied from the previous layout.
    pub ct_moved: usize,
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
        up.ct_moved = move_conntrack(&prev, ebpf)?;
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

fn move_conntrack(prev: &Path, ebpf: &mut Ebpf) -> Result<usize> {
    let name = names::CT4_PREV;
    let data = MapData::from_pin(prev).map_err(map_err(name))?;
    let old: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
    let entries = dump(&old).map_err(map_err(name))?;
    let mut moved = 0;
    for table in [names::CT4, names::CT_ANY4] {
        let map = ebpf.map_mut(table).ok_or(Error::MissingMap { name: table })?;
        let mut new: HashMap<&mut MapData, CtKey, CtValue> =
            HashMap::try_from(map).map_err(map_err(table))?;
        for (k, v) in entries.iter().filter(|(k, v)| ct_table(k, v) == table) {
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
    fn retired_names_are_never_current_ones() {
        for r in names::RETIRED_MAPS {
            assert!(!names::ALL_MAPS.contains(&r), "{r}");
        }
        assert!(names::RETIRED_MAPS.contains(&names::CT4_PREV));
    }
}
