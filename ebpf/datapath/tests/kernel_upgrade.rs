//! Kernel test (needs root, pins under `/sys/fs/bpf/riptide/`): a node
//! whose pins come from the previous version (one conntrack table,
//! `rt_ct4_v2`, and one NAT table, `rt_nat4_v1`) is loaded by this one:
//! established flows and their source NAT mappings move into the
//! per-protocol tables and the retired pins are removed.
#![allow(clippy::unwrap_used)]

use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use riptide_common::{
    CT_DIR_ANY, CT_F_INBOUND, CT_F_POLICY, CT_F_REPLY, CtKey, CtValue, NAT_DIR_EGRESS,
    NAT_DIR_INGRESS, NAT_F_MASQ, NatValue, names, proto,
};
use riptide_datapath::{Datapath, Pinning, pin_dir, unpin_node};
use riptide_test_support::privileged;

const NODE: &str = "rt-ct-upgrade-test";

/// Removes the node's pins when the test ends, passed or not.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = unpin_node(NODE);
    }
}

/// Creates an LRU hash map of conntrack keys and `V` values and pins it at
/// `path`, as the previous version's loader did (raw `BPF_MAP_CREATE` +
/// `BPF_OBJ_PIN`: the current object no longer declares this map).
fn create_pinned_lru<V>(path: &Path) {
    let mut attr = [0u32; 32];
    attr[0] = 9; // BPF_MAP_TYPE_LRU_HASH
    attr[1] = size_of::<CtKey>() as u32;
    attr[2] = size_of::<V>() as u32;
    attr[3] = 64; // max_entries
    // SAFETY: BPF_MAP_CREATE reads the first fields of the zeroed attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), size_of_val(&attr)) };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd the syscall just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c = CString::new(path.to_str().unwrap()).unwrap();
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: BPF_OBJ_PIN with a valid path and fd, both alive here.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, &raw mut pin, size_of::<ObjPin>()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

fn key(p: u8, sport: u16) -> CtKey {
    CtKey {
        saddr_be: u32::from_be_bytes([10, 42, 0, 5]).to_be(),
        daddr_be: u32::from_be_bytes([10, 43, 0, 10]).to_be(),
        sport_be: sport.to_be(),
        dport_be: 80u16.to_be(),
        proto: p,
        dir: CT_DIR_ANY,
        _pad: 0,
    }
}

fn nat_key(p: u8, dir: u8) -> CtKey {
    CtKey { dir, ..key(p, 5000) }
}

#[test]
fn kernel_conntrack_and_nat_of_the_previous_layout_move_into_the_per_protocol_tables() {
    if !privileged("to pin eBPF maps") {
        return;
    }
    let _cleanup = Cleanup;
    let _ = unpin_node(NODE);
    let dir = pin_dir(NODE).unwrap();
    riptide_datapath::ensure_bpffs().unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let prev = dir.join(names::CT4_PREV);
    create_pinned_lru::<CtValue>(&prev);
    let prev_nat = dir.join(names::NAT4_PREV);
    create_pinned_lru::<NatValue>(&prev_nat);

    let entries = [
        (key(proto::TCP, 1000), 0, names::CT4),
        (key(proto::TCP, 1001), CT_F_REPLY, names::CT4),
        (key(proto::TCP, 1002), CT_F_POLICY | CT_F_INBOUND, names::CT4),
        (key(proto::TCP, 1003), CT_F_INBOUND, names::CT_ANY4),
        (key(proto::UDP, 1004), 0, names::CT_ANY4),
        (key(proto::UDP, 1005), CT_F_INBOUND, names::CT_ANY4),
    ];
    {
        let data = MapData::from_pin(&prev).unwrap();
        let mut old: HashMap<MapData, CtKey, CtValue> =
            HashMap::try_from(Map::LruHashMap(data)).unwrap();
        for (i, (k, flags, _)) in entries.iter().enumerate() {
            let v = CtValue {
                last_seen_ns: 1,
                backend_id: 7 + i as u32,
                flags: *flags,
                ..CtValue::default()
            };
            old.insert(k, v, 0).unwrap();
        }
    }

    // Both halves of a masqueraded TCP and UDP flow.
    let mappings = [
        (nat_key(proto::TCP, NAT_DIR_EGRESS), names::NAT4),
        (nat_key(proto::TCP, NAT_DIR_INGRESS), names::NAT4),
        (nat_key(proto::UDP, NAT_DIR_EGRESS), names::NAT_ANY4),
        (nat_key(proto::UDP, NAT_DIR_INGRESS), names::NAT_ANY4),
    ];
    {
        let data = MapData::from_pin(&prev_nat).unwrap();
        let mut old: HashMap<MapData, CtKey, NatValue> =
            HashMap::try_from(Map::LruHashMap(data)).unwrap();
        for (i, (k, _)) in mappings.iter().enumerate() {
            let v = NatValue { last_seen_ns: 1, addr_be: 0, port_be: (40_000 + i as u16).to_be(), flags: NAT_F_MASQ };
            old.insert(k, v, 0).unwrap();
        }
    }

    let dp = Datapath::load(&Pinning::Node(NODE.into())).unwrap();
    assert_eq!(dp.upgrade().ct_moved, entries.len());
    assert_eq!(dp.upgrade().nat_moved, mappings.len());
    assert_eq!(dp.upgrade().retired, [names::CT4_PREV, names::NAT4_PREV]);
    assert!(!prev.exists() && !prev_nat.exists(), "retired pins removed");
    for table in [names::NAT4, names::NAT_ANY4] {
        let got = dp.nat_table(table).unwrap();
        let want: Vec<_> = mappings.iter().enumerate().filter(|(_, m)| m.1 == table).collect();
        assert_eq!(got.len(), want.len(), "{table}: {got:?}");
        for (i, (k, _)) in want {
            let v = got.iter().find(|(gk, _)| gk == k).map(|(_, v)| (u16::from_be(v.port_be), v.flags));
            assert_eq!(v, Some((40_000 + i as u16, NAT_F_MASQ)), "{table}: {k:?}");
        }
    }
    for table in [names::CT4, names::CT_ANY4] {
        let got = dp.conntrack_table(table).unwrap();
        let want: Vec<_> = entries.iter().filter(|e| e.2 == table).collect();
        assert_eq!(got.len(), want.len(), "{table}: {got:?}");
        for (i, (k, flags, _)) in entries.iter().enumerate().filter(|(_, e)| e.2 == table) {
            let v = got.iter().find(|(gk, _)| gk == k).map(|(_, v)| v);
            assert_eq!(
                v.map(|v| (v.flags, v.backend_id)),
                Some((*flags, 7 + i as u32)),
                "{table}: {k:?}"
            );
        }
    }
    drop(dp);

    // A second load (restart of the same version) has nothing to move.
    let dp = Datapath::load(&Pinning::Node(NODE.into())).unwrap();
    assert_eq!(dp.upgrade(), &riptide_datapath::upgrade::Upgrade::default());
    assert_eq!(dp.conntrack().unwrap().len(), entries.len(), "pinned entries kept");
    assert_eq!(dp.nat().unwrap().len(), mappings.len(), "pinned mappings kept");
}
