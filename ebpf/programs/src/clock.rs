//! The clock flow-state entries are stamped with (`last_seen_ns`,
//! `last_used_ns`, event timestamps): `CLOCK_MONOTONIC` at tick granularity,
//! the clock the agent's GC ages them with. Its own module so that every
//! user (conntrack, NAT, affinity in `lb`, events) depends on it and not on
//! each other — Cilium's `bpf/lib/mono.h` split for the same reason.
//!
//! The clock starts at 0 at boot: on a machine up for a few seconds every
//! stamp is small, so code comparing stamps subtracts with `saturating_sub`
//! / `wrapping_sub` and never assumes `now` is larger than any age.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// Per-CPU clock cache: `[jiffies, bpf_ktime_get_coarse_ns()]` of the last
/// read on this CPU. Not pinned: private scratch.
#[map]
static CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// `CLOCK_MONOTONIC` at tick granularity (no TSC read). The coarse clock
/// only moves once per tick, and `bpf_jiffies64` (one load behind one
/// call) says when: the per-CPU cache saves the nested calls of
/// `bpf_ktime_get_coarse_ns` on every other packet of the tick. A cached
/// time of 0 means "never read" (the coarse clock is past 0 long before
/// any program is attached).
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: plain helper call.
    let j = unsafe { bpf_jiffies64() };
    if let Some(c) = CLOCK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; programs do not migrate mid-run.
        let c = unsafe { &mut *c };
        if c[0] == j && c[1] != 0 {
            return c[1];
        }
        // SAFETY: plain helper call.
        let t = unsafe { bpf_ktime_get_coarse_ns() };
        c[0] = j;
        c[1] = t;
        return t;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Marks a map entry's `last_seen` as now, writing only when it changed
/// (a store per packet would bounce the cache line between CPUs). True when
/// it changed: the first packet of the flow in this clock tick.
#[inline(always)]
pub fn touch(last_seen: &mut u64) -> bool {
    let t = now();
    if *last_seen != t {
        *last_seen = t;
        return true;
    }
    false
}
