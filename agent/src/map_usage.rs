//! How full each pinned datapath map is: entries, capacity and pressure
//! (entries / max_entries, as Cilium's `cilium_bpf_map_pressure`).
//!
//! Counting entries walks a map in the kernel, which for a full conntrack
//! table is hundreds of thousands of elements: it runs on a thread of its
//! own ([`spawn_sampler`]) with its own map fds, never under the agent's
//! locks and never on an async worker, and publishes a snapshot that
//! `/metrics`, `riptide status` and `riptide map list` read.
//!
//! Hash and LRU maps are counted with `BPF_MAP_LOOKUP_BATCH` (one syscall
//! per few thousand entries), falling back to `BPF_MAP_GET_NEXT_KEY` where
//! the kernel refuses batches (LPM tries, per-CPU values). Arrays are always
//! "full" and ring buffers have no entries: they are listed with their
//! capacity but no pressure.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aya::maps::{MapInfo, MapType};
use serde::{Deserialize, Serialize};

/// One map's usage (`riptide map list`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapUsage {
    pub name: String,
    /// `hash`, `lru_hash`, `lpm_trie`, `array`, `percpu_array`, `ringbuf`, …
    pub kind: String,
    /// `None` for maps whose entry count means nothing (arrays, rings).
    pub entries: Option<u64>,
    pub max_entries: u32,
    /// `entries / max_entries` in 0..=1.
    pub pressure: Option<f64>,
}

/// The last sample of every map of the node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapSnapshot {
    pub maps: Vec<MapUsage>,
    /// Unix seconds when it was taken (`None`: never).
    pub taken_unix_s: Option<f64>,
    /// Milliseconds the walk took.
    pub took_ms: f64,
}

impl MapSnapshot {
    /// Entries of map `name`, if counted.
    pub fn entries(&self, name: &str) -> Option<u64> {
        self.maps.iter().find(|m| m.name == name).and_then(|m| m.entries)
    }
}

fn kind_name(t: MapType) -> &'static str {
    match t {
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::PerCpuHash => "percpu_hash",
        MapType::LruPerCpuHash => "lru_percpu_hash",
        MapType::LpmTrie => "lpm_trie",
        MapType::Array => "array",
        MapType::PerCpuArray => "percpu_array",
        MapType::RingBuf => "ringbuf",
        MapType::ProgramArray => "prog_array",
        _ => "other",
    }
}

/// Samples every map pinned directly under `dir` (programs and link pins
/// are skipped), sorted by name.
pub fn sample(dir: &Path) -> MapSnapshot {
    let started = std::time::Instant::now();
    let mut maps = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return MapSnapshot::default();
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        // Programs and the links directory fail here: not maps.
        let Ok(info) = MapInfo::from_pin(&path) else { continue };
        let Ok(t) = info.map_type() else { continue };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let counted = matches!(t, MapType::Hash | MapType::LruHash | MapType::PerCpuHash | MapType::LruPerCpuHash | MapType::LpmTrie);
        let entries = if counted {
            info.fd().ok().and_then(|fd| {
                let batch = matches!(t, MapType::Hash | MapType::LruHash);
                count_entries(fd.as_fd(), info.key_size(), info.value_size(), info.max_entries(), batch)
                    .map_err(|e| tracing::debug!(map = %name, error = %e, "cannot count map entries"))
                    .ok()
            })
        } else {
            None
        };
        let pressure = entries.map(|n| if info.max_entries() == 0 { 0.0 } else { n as f64 / f64::from(info.max_entries()) });
        maps.push(MapUsage { name, kind: kind_name(t).to_owned(), entries, max_entries: info.max_entries(), pressure });
    }
    MapSnapshot {
        maps,
        taken_unix_s: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok().map(|d| d.as_secs_f64()),
        took_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a live, properly laid out bpf_attr of its size; the
    // pointers inside it point at buffers the caller keeps alive.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), std::mem::size_of::<T>()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Entries in the map behind `fd`. A map that changes during the walk gives
/// an approximate count (never more than `max`).
fn count_entries(fd: BorrowedFd<'_>, key_size: u32, value_size: u32, max: u32, batch: bool) -> std::io::Result<u64> {
    let raw = u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::Error::other("negative fd"))?;
    if batch {
        let mut total = 0u64;
        match riptide_datapath::gc::lookup_batch(fd, key_size as usize, value_size as usize, |_, _, n| total += n as u64)
            .map(|()| total)
        {
            Ok(n) => return Ok(n.min(u64::from(max))),
            // Kernels or maps without batch support.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | 524)) => {}
            Err(e) => return Err(e),
        }
    }
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u64;
    let mut first = true;
    // A deleted current key restarts the walk from the first key; the bound
    // keeps a map under heavy churn from looping for long.
    while n < u64::from(max) {
        let mut attr = NextKeyAttr {
            map_fd: raw,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..NextKeyAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        n += 1;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

/// Samples the node's maps (and the per-reason counters) every `every` on
/// a thread of its own and hands each sample to `publish`; the thread ends
/// when `publish` returns false (the agent is gone).
pub fn spawn_sampler(
    dir: PathBuf,
    every: Duration,
    mut publish: impl FnMut(MapSnapshot, Option<riptide_datapath::node_maps::Stats>) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("riptide-maps".into()).spawn(move || {
        while publish(sample(&dir), read_stats(&dir)) {
            std::thread::sleep(every);
        }
    })?;
    Ok(())
}

/// The per-reason datapath counters, summed over CPUs, from the pin.
fn read_stats(dir: &Path) -> Option<riptide_datapath::node_maps::Stats> {
    let data = aya::maps::MapData::from_pin(dir.join(riptide_common::names::STATS)).ok()?;
    let arr: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).ok()?;
    let mut v = Vec::with_capacity(riptide_common::stats::MAX as usize);
    for i in 0..riptide_common::stats::MAX {
        v.push(arr.get(&i, 0).map_or(0, |per_cpu| per_cpu.iter().sum()));
    }
    Some(riptide_datapath::node_maps::Stats(v))
}
