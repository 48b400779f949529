//! Garbage-collection access to the flow-state maps (the conntrack tables
//! `rt_ct4_v3` (TCP) and `rt_ctany4_v3` (the rest, inbound markers), the
//! NAT tables `rt_nat4_v2` (TCP) and `rt_natany4_v2` (the rest),
//! `rt_aff4_v1`, `rt_sockrev4_v1`) through their pins. The two tables of
//! each kind read as one: callers see every entry and delete by key.
//!
//! Added by the agent's helper for the agent's GC (`agent/src/gc.rs`): the
//! policy (which entry is expired or stale) lives there; this file only
//! dumps and deletes. It opens its own map fds from the node's pins, so the
//! GC runs on its own thread without holding the agent's `Datapath`.
//!
//! Dumps use `BPF_MAP_LOOKUP_BATCH` (one syscall per few thousand entries;
//! a 512k-entry conntrack table is read in tens of milliseconds instead of
//! a million `get_next_key` + `lookup` syscalls), falling back to key
//! iteration where the kernel refuses batches. [`lookup_batch`] is the one
//! batch walker; the agent's map-pressure sampler counts with it too.
//! Large deletions go the same way (`BPF_MAP_DELETE_BATCH` after a fresh
//! read that keeps refreshed entries): a node serving short connections
//! has one or two closed conntrack entries per connection to delete every
//! pass.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, Map, MapData, MapError},
};
use riptide_common::{
    AffKey, AffValue, BackendKey, BackendValue, CtKey, CtValue, NatValue, RevNatKey, RevNatValue,
    SockRevKey, SockRevValue, SvcKey, SvcValue, names, proto,
};

use crate::{
    Result,
    error::{deleted, map_err},
};

/// The two conntrack tables: TCP, then everything else (and inbound
/// markers). Per-table results of [`FlowMaps`] come in this order.
pub const CT_TABLES: [&str; 2] = [names::CT4, names::CT_ANY4];

/// The two NAT tables: TCP, then everything else. Per-table results of
/// [`FlowMaps`] come in this order.
pub const NAT_TABLES: [&str; 2] = [names::NAT4, names::NAT_ANY4];

/// The index in [`NAT_TABLES`] of the table that holds the mappings of
/// protocol `proto` (the programs' `nat::table`).
pub fn nat_table_index(proto: u8) -> usize {
    usize::from(proto != proto::TCP)
}

/// The name of the NAT table that holds the mappings of protocol `proto`.
pub fn nat_table(proto: u8) -> &'static str {
    NAT_TABLES[nat_table_index(proto)]
}

/// Handles on a node's flow-state maps.
pub struct FlowMaps {
    /// TCP conntrack, then the table of everything else.
    ct: [HashMap<MapData, CtKey, CtValue>; 2],
    /// TCP source NAT, then the table of everything else.
    nat: [HashMap<MapData, CtKey, NatValue>; 2],
    aff: HashMap<MapData, AffKey, AffValue>,
    sockrev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// Read-only views of the service maps (GC compares flows against them;
    /// only the agent's `Services` writer changes them).
    svc: HashMap<MapData, SvcKey, SvcValue>,
    be: HashMap<MapData, BackendKey, BackendValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
}

impl FlowMaps {
    /// Opens the pinned maps of `node` (the datapath must have been loaded
    /// with `Pinning::Node(node)`).
    pub fn open_pinned(node: &str) -> Result<Self> {
        let dir = crate::pins::pin_dir(node)?;
        fn open<K: Pod, V: Pod>(
            dir: &std::path::Path,
            name: &'static str,
            lru: bool,
        ) -> Result<HashMap<MapData, K, V>> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            let map = if lru { Map::LruHashMap(data) } else { Map::HashMap(data) };
            HashMap::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            ct: [
                open(&dir, CT_TABLES[0], true)?,
                open(&dir, CT_TABLES[1], true)?,
            ],
            nat: [
                open(&dir, NAT_TABLES[0], true)?,
                open(&dir, NAT_TABLES[1], true)?,
            ],
            aff: open(&dir, names::AFF4, true)?,
            sockrev: open(&dir, names::SOCKREV4, true)?,
            svc: open(&dir, names::SVC4, false)?,
            be: open(&dir, names::BE4, false)?,
            revnat: open(&dir, names::REVNAT4, false)?,
        })
    }

    /// Every conntrack entry, of both tables.
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let [mut out, any] = self.conntrack_by_table()?;
        out.extend(any);
        Ok(out)
    }

    /// The entries of each conntrack table, in [`CT_TABLES`] order.
    pub fn conntrack_by_table(&self) -> Result<[Vec<(CtKey, CtValue)>; 2]> {
        Ok([
            dump(&self.ct[0]).map_err(map_err(CT_TABLES[0]))?,
            dump(&self.ct[1]).map_err(map_err(CT_TABLES[1]))?,
        ])
    }

    /// The entries of each NAT table, in [`NAT_TABLES`] order.
    pub fn nat_by_table(&self) -> Result<[Vec<(CtKey, NatValue)>; 2]> {
        Ok([
            dump(&self.nat[0]).map_err(map_err(NAT_TABLES[0]))?,
            dump(&self.nat[1]).map_err(map_err(NAT_TABLES[1]))?,
        ])
    }

    /// Every affinity entry.
    pub fn affinity(&self) -> Result<Vec<(AffKey, AffValue)>> {
        dump(&self.aff).map_err(map_err(names::AFF4))
    }

    /// Every socket-LB reverse entry (socket cookie + backend → frontend).
    pub fn sock_rev(&self) -> Result<Vec<(SockRevKey, SockRevValue)>> {
        dump(&self.sockrev).map_err(map_err(names::SOCKREV4))
    }

    /// Every service entry (masters and slots).
    pub fn services(&self) -> Result<Vec<(SvcKey, SvcValue)>> {
        dump(&self.svc).map_err(map_err(names::SVC4))
    }

    /// Every backend.
    pub fn backends(&self) -> Result<Vec<(BackendKey, BackendValue)>> {
        dump(&self.be).map_err(map_err(names::BE4))
    }

    /// Every reverse-NAT entry (frontend by id).
    pub fn revnat(&self) -> Result<Vec<(RevNatKey, RevNatValue)>> {
        dump(&self.revnat).map_err(map_err(names::REVNAT4))
    }

    /// Deletes the conntrack entries `keys` if their `last_seen_ns` still
    /// equals the value the caller decided on (a packet in between means
    /// the flow is alive after all). `None` deletes unconditionally.
    ///
    /// A key is looked for in the table of its protocol first, then in the
    /// other one (TCP inbound markers live in the non-TCP table). Returns
    /// the deletions per table, in [`CT_TABLES`] order.
    ///
    /// From [`BATCH_FROM`] keys on, see [`delete_stamped_batch`]: the
    /// check and the deletion cost two syscalls per table, not two per key
    /// (a table of closed connections is thousands of keys a pass).
    pub fn delete_conntrack(&mut self, keys: &[(CtKey, Option<u64>)]) -> Result<[usize; 2]> {
        if keys.len() >= BATCH_FROM {
            let want = wanted(keys);
            let mut n = [0; 2];
            for (i, m) in self.ct.iter_mut().enumerate() {
                n[i] = delete_stamped_batch(m, &want, |v| v.last_seen_ns).map_err(map_err(CT_TABLES[i]))?;
            }
            return Ok(n);
        }
        let mut n = [0; 2];
        for (k, seen) in keys {
            let first = usize::from(k.proto != proto::TCP);
            let mut gone = false;
            for i in [first, 1 - first] {
                match delete_one(&mut self.ct[i], k, *seen, |v| v.last_seen_ns)
                    .map_err(map_err(CT_TABLES[i]))?
                {
                    Deleted::Yes => {
                        n[i] += 1;
                        gone = true;
                    }
                    // Refreshed since the caller looked: alive, keep it.
                    Deleted::Alive => gone = true,
                    Deleted::Absent => {}
                }
                if gone {
                    break;
                }
            }
        }
        Ok(n)
    }

    /// Like [`FlowMaps::delete_conntrack`] for the NAT tables; a key is
    /// only looked for in the table of its protocol. Returns the deletions
    /// per table, in [`NAT_TABLES`] order.
    pub fn delete_nat(&mut self, keys: &[(CtKey, Option<u64>)]) -> Result<[usize; 2]> {
        if keys.len() >= BATCH_FROM {
            let mut n = [0; 2];
            for (i, m) in self.nat.iter_mut().enumerate() {
                let mine: Vec<(CtKey, Option<u64>)> =
                    keys.iter().filter(|(k, _)| nat_table_index(k.proto) == i).copied().collect();
                if !mine.is_empty() {
                    n[i] = delete_stamped_batch(m, &wanted(&mine), |v| v.last_seen_ns)
                        .map_err(map_err(NAT_TABLES[i]))?;
                }
            }
            return Ok(n);
        }
        let mut n = [0; 2];
        for (k, seen) in keys {
            let i = nat_table_index(k.proto);
            if matches!(
                delete_one(&mut self.nat[i], k, *seen, |v| v.last_seen_ns).map_err(map_err(NAT_TABLES[i]))?,
                Deleted::Yes
            ) {
                n[i] += 1;
            }
        }
        Ok(n)
    }

    /// Like [`FlowMaps::delete_conntrack`] for `rt_aff4_v1` (`last_used_ns`).
    pub fn delete_affinity(&mut self, keys: &[(AffKey, Option<u64>)]) -> Result<usize> {
        delete_checked(&mut self.aff, keys, |v| v.last_used_ns).map_err(map_err(names::AFF4))
    }

    /// Deletes socket-LB reverse entries (sockets that were destroyed).
    pub fn delete_sock_rev(&mut self, keys: &[SockRevKey]) -> Result<usize> {
        let mut n = 0;
        for k in keys {
            if remove(&mut self.sockrev, k).map_err(map_err(names::SOCKREV4))? {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Deletes `key` unless absent; `Ok(false)` when it was already gone.
fn remove<K: Pod, V: Pod>(m: &mut HashMap<MapData, K, V>, key: &K) -> Result<bool, MapError> {
    deleted(m.remove(key))
}

/// What [`delete_one`] did.
enum Deleted {
    Yes,
    /// Its stamp moved since the caller decided: kept.
    Alive,
    Absent,
}

/// Deletes `k` if its stamp still equals `seen` (`None`: unconditionally).
fn delete_one<K: Pod, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    k: &K,
    seen: Option<u64>,
    stamp: impl Fn(&V) -> u64,
) -> Result<Deleted, MapError> {
    if let Some(seen) = seen {
        match m.get(k, 0) {
            Ok(v) if stamp(&v) != seen => return Ok(Deleted::Alive),
            Ok(_) => {}
            Err(MapError::KeyNotFound) => return Ok(Deleted::Absent),
            Err(e) => return Err(e),
        }
    }
    Ok(if remove(m, k)? {
        Deleted::Yes
    } else {
        Deleted::Absent
    })
}

/// Key counts from which deletions go in batches ([`delete_stamped_batch`]):
/// below, a lookup and a delete per key cost less than reading the table.
const BATCH_FROM: usize = 64;

/// The stamps each key was judged by (a key can be in the list twice, once
/// per table it was read from).
fn wanted<K: Pod + Eq + std::hash::Hash>(keys: &[(K, Option<u64>)]) -> std::collections::HashMap<K, Vec<Option<u64>>> {
    let mut m: std::collections::HashMap<K, Vec<Option<u64>>> = std::collections::HashMap::with_capacity(keys.len());
    for (k, seen) in keys {
        m.entry(*k).or_default().push(*seen);
    }
    m
}

/// Deletes from `m` every key of `want` whose entry still carries one of
/// the stamps it was judged by (`None`: any), as [`delete_one`] does key
/// by key: the table is read again (`BPF_MAP_LOOKUP_BATCH`) right before
/// the keys go in `BPF_MAP_DELETE_BATCH` calls, so an entry a packet
/// refreshed since the caller's read stays. What a packet refreshes
/// between that read and the delete call (a few milliseconds for
/// thousands of keys) still goes, as between `delete_one`'s lookup and
/// delete. Returns the deletions.
fn delete_stamped_batch<K: Pod + Eq + std::hash::Hash, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    want: &std::collections::HashMap<K, Vec<Option<u64>>>,
    stamp: impl Fn(&V) -> u64,
) -> Result<usize, MapError> {
    let doomed: Vec<K> = dump(m)?
        .into_iter()
        .filter(|(k, v)| want.get(k).is_some_and(|seen| seen.iter().any(|s| s.is_none_or(|s| s == stamp(v)))))
        .map(|(k, _)| k)
        .collect();
    delete_batch(m, &doomed)
}

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Deletes `keys` from `m`, thousands per `BPF_MAP_DELETE_BATCH` call
/// (key by key where the kernel refuses batches). Absent keys are skipped.
/// Returns the deletions.
fn delete_batch<K: Pod, V: Pod>(m: &mut HashMap<MapData, K, V>, keys: &[K]) -> Result<usize, MapError> {
    let map_fd = u32::try_from(m.map().fd().as_fd().as_raw_fd()).map_err(|_| syscall_err("bpf_map_delete_batch", libc::EBADF))?;
    let mut n = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: u32::try_from(chunk.len()).unwrap_or(u32::MAX),
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at `count` keys of the map's key type, which
        // outlive the call; the kernel only reads them.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_BATCH, (&raw mut attr).cast::<libc::c_void>(), std::mem::size_of::<BatchAttr>())
        };
        // The kernel stops at the first key it cannot delete; `count` says
        // how many went before it.
        let done = (attr.count as usize).min(chunk.len());
        n += done;
        if rc == 0 {
            rest = &rest[chunk.len()..];
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Gone meanwhile (LRU eviction, a packet path's delete): skip it.
            Some(libc::ENOENT) => rest = &rest[(done + 1).min(rest.len())..],
            Some(libc::EINVAL | libc::ENOTSUP | libc::ENOSYS) if done == 0 => {
                for k in rest {
                    if remove(m, k)? {
                        n += 1;
                    }
                }
                return Ok(n);
            }
            _ => return Err(MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_delete_batch", io_error: e })),
        }
    }
    Ok(n)
}

fn syscall_err(call: &'static str, errno: i32) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError { call, io_error: std::io::Error::from_raw_os_error(errno) })
}

fn delete_checked<K: Pod, V: Pod>(
    m: &mut HashMap<MapData, K, V>,
    keys: &[(K, Option<u64>)],
    stamp: impl Fn(&V) -> u64,
) -> Result<usize, MapError> {
    let mut n = 0;
    for (k, seen) in keys {
        if matches!(delete_one(m, k, *seen, &stamp)?, Deleted::Yes) {
            n += 1;
        }
    }
    Ok(n)
}

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands (`struct { … } batch`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries per batch call. A hash bucket never holds more than a few
/// entries, so ENOSPC (bucket larger than the buffer) is practically
/// impossible; it is handled anyway by growing, up to [`MAX_BATCH`].
const BATCH: usize = 4096;
const MAX_BATCH: usize = 1 << 20;
/// Bytes of keys and values one batch may take: a map of wide values
/// (4 KiB each) would otherwise take 16 MiB for a 4,096-entry batch.
const BATCH_BYTES: usize = 256 << 10;

/// Walks every entry of the hash map behind `fd` with
/// `BPF_MAP_LOOKUP_BATCH`, handing each batch to `each` as `n` keys of
/// `key_size` bytes and `n` values of `value_size` bytes, back to back.
/// Errors are the kernel's (EINVAL/ENOTSUP/… where batches are not
/// supported: the caller picks its fallback).
pub fn lookup_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    mut each: impl FnMut(&[u8], &[u8], usize),
) -> std::io::Result<()> {
    let map_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    let mut chunk = (BATCH_BYTES / (key_size + value_size).max(1)).clamp(1, BATCH);
    let mut keys: Vec<u8> = Vec::new();
    let mut values: Vec<u8> = Vec::new();
    // For hash maps the batch token is a bucket index (u32); 8 bytes keeps
    // any map type's token in bounds.
    let mut in_token = [0u8; 8];
    let mut out_token = [0u8; 8];
    let mut first = true;
    loop {
        keys.resize(chunk * key_size, 0);
        values.resize(chunk * value_size, 0);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_mut_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values of the
        // sizes the caller gives for this map, and at 8-byte tokens; all
        // outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                (&raw mut attr).cast::<libc::c_void>(),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                each(&keys[..n * key_size], &values[..n * value_size], n);
                if err.is_some() {
                    // ENOENT: no more buckets.
                    return Ok(());
                }
            }
            // One bucket holds more than `chunk` entries: retry it bigger.
            Some(libc::ENOSPC) if n == 0 && chunk < MAX_BATCH => {
                chunk *= 2;
                continue;
            }
            _ => return Err(err.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EIO))),
        }
        in_token = out_token;
        first = false;
    }
}

/// Every entry of `m`: batched, or by iteration when batches are refused.
pub(crate) fn dump<K: Pod, V: Pod>(m: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>, MapError> {
    match dump_batch::<K, V>(m.map()) {
        Ok(v) => Ok(v),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOTSUP | libc::ENOSYS | libc::EPERM)
            ) =>
        {
            Ok(m.iter().filter_map(std::result::Result::ok).collect())
        }
        Err(io_error) => Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        })),
    }
}

fn dump_batch<K: Pod, V: Pod>(map: &MapData) -> std::io::Result<Vec<(K, V)>> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut out = Vec::new();
    lookup_batch(map.fd().as_fd(), ks, vs, |keys, values, n| {
        for i in 0..n {
            // SAFETY: K and V are the map's Pod types (checked by aya's
            // HashMap), every bit pattern is valid for them, and entry `i`
            // lies inside the batch's buffers; the reads are unaligned.
            let entry = unsafe {
                (
                    keys.as_ptr().add(i * ks).cast::<K>().read_unaligned(),
                    values.as_ptr().add(i * vs).cast::<V>().read_unaligned(),
                )
            };
            out.push(entry);
        }
    })?;
    Ok(out)
}
