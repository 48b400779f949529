//! Drop/failure events (`rt_events_v1`, ring buffer) for the agent to log
//! and export: which flow met which failure, not just a counter. Never one
//! per packet of a flood: each CPU may emit `EVENTS_PER_CPU_PER_S` events
//! per second; beyond that (or with the ring full) only
//! `events_suppressed` counts. Every occurrence is counted by reason in
//! `rt_stats_v2` regardless.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use riptide_common::{DropEvent, capacity, proto, stats};

use crate::{
    clock,
    maps::count,
    parse::{Frame, IP_OFF, IpHdr, L4_OFF, Ports, linear},
};

#[map(name = "rt_events_v1")]
static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// Per-CPU rate limiter: `[window start (ns), events in the window]`.
/// Private scratch, not pinned.
#[map]
static EVENT_RATE: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

const WINDOW_NS: u64 = 1_000_000_000;

/// Sends `ev` unless this CPU is over its rate.
#[inline(always)]
pub fn emit(mut ev: DropEvent) {
    let now = clock::now();
    let Some(rate) = EVENT_RATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; programs do not migrate mid-run.
    let rate = unsafe { &mut *rate };
    if now.wrapping_sub(rate[0]) >= WINDOW_NS {
        rate[0] = now;
        rate[1] = 0;
    }
    if rate[1] >= capacity::EVENTS_PER_CPU_PER_S {
        count(stats::EVENTS_SUPPRESSED);
        return;
    }
    rate[1] += 1;
    ev.ts_ns = now;
    if EVENTS.output::<DropEvent>(&ev, 0).is_err() {
        count(stats::EVENTS_SUPPRESSED);
    }
}

/// Reports `reason` for the packet in `ctx` (best effort: the tuple is
/// read directly if the headers are linear, 0 otherwise).
#[inline(always)]
pub fn report(ctx: &impl Frame, reason: u32, source: u8) {
    let mut ev = DropEvent {
        reason,
        source,
        ifindex: ctx.ifindex(),
        ..DropEvent::default()
    };
    if let Some(data) = linear(ctx, L4_OFF) {
        // SAFETY: L4_OFF bytes are linear (checked just above).
        unsafe {
            if *((data + 12) as *const u16) == 0x0800u16.to_be() {
                let ip = &*((data + IP_OFF) as *const IpHdr);
                ev.saddr_be = ip.saddr;
                ev.daddr_be = ip.daddr;
                ev.proto = ip.proto;
                let ports_ok = ip.vihl == 0x45
                    && u16::from_be(ip.frag_off) & 0x1fff == 0
                    && (ip.proto == proto::TCP || ip.proto == proto::UDP);
                if ports_ok && let Some(data) = linear(ctx, L4_OFF + 4) {
                    let ports = &*((data + L4_OFF) as *const Ports);
                    ev.sport_be = ports.source;
                    ev.dport_be = ports.dest;
                }
            }
        }
    }
    emit(ev);
}
