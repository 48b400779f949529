//! The clock flow-state entries are aged with.
//!
//! The programs stamp conntrack, NAT and affinity entries and events with
//! `bpf_ktime_get_coarse_ns()` (see `ebpf/programs/src/clock.rs`):
//! `CLOCK_MONOTONIC`, the same clock as `bpf_ktime_get_ns()` at tick
//! granularity, so user space ages the stamps with `CLOCK_MONOTONIC`
//! too. That clock starts at 0 at boot. On a machine booted seconds ago
//! `now` and every stamp are small, so ages are computed as
//! `now.saturating_sub(stamp)` and never as `now - timeout`.

/// `CLOCK_MONOTONIC` in ns: `bpf_ktime_get_ns()` is `ktime_get_mono_fast_ns()`,
/// the same clock, so user space can age `last_seen_ns` stamps with it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// Where code that ages flow-state entries reads "now".
///
/// [`Clock::Monotonic`] in production. [`Clock::Fixed`] lets a test age
/// entries the way a machine up for any given time would — 5 s after boot,
/// say, with entries stamped near 0 — on a machine that has been up for
/// hours. The kernel's side of the clock cannot be moved for a test: a time
/// namespace offsets `clock_gettime()` for its processes but not
/// `bpf_ktime_get_ns()`, so the test moves the reader instead and writes
/// the stamps itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clock {
    /// `CLOCK_MONOTONIC` ([`monotonic_ns`]).
    #[default]
    Monotonic,
    /// Always this many ns since boot.
    Fixed(u64),
}

impl Clock {
    /// Now, in ns since boot.
    pub fn now_ns(self) -> u64 {
        match self {
            Self::Monotonic => monotonic_ns(),
            Self::Fixed(ns) => ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_moves_forward_and_a_fixed_one_does_not() {
        let a = Clock::Monotonic.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(Clock::Monotonic.now_ns() > a);
        assert_eq!(Clock::Fixed(5).now_ns(), 5);
    }
}
