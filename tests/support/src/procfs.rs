//! What the benchmarks read of a process from `/proc`: its memory as
//! `/proc/<pid>/status` reports it (`VmRSS`, `VmHWM`, `RssAnon`, …).

use std::io;

/// The `kB` fields `names` (without the colon: `"VmRSS"`, `"VmHWM"`) of
/// `/proc/<pid>/status`, in KiB, in the order asked; one read, so the
/// values are of one moment (the kernel's `task_mem()` prints them
/// together: `VmHWM` is never below `VmRSS`).
///
/// An error names the pid and what went wrong: the file is unreadable
/// (the process exited), a field is missing (e.g. `RssAnon` before Linux
/// 4.5), or its value is not a number of `kB` (e.g. `Threads`).
pub fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> io::Result<[u64; N]> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))?;
    let mut out = [0; N];
    for (slot, name) in out.iter_mut().zip(names) {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{path} has no {name} field")))?;
        *slot = value
            .trim()
            .strip_suffix(" kB")
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: {name} is {value:?}, not a number of kB")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::status_kib;

    /// This process's own status while it holds 64 MiB it has written to:
    /// resident memory must count them, the peak must not be below the
    /// current value, and anonymous memory (the buffer is heap) is part of
    /// the resident set.
    #[test]
    fn status_kib_reads_the_memory_of_this_process() {
        const MIB: usize = 1 << 20;
        let held = std::hint::black_box(vec![1u8; 64 * MIB]);
        let [rss, hwm, anon] = status_kib(std::process::id(), ["VmRSS", "VmHWM", "RssAnon"]).unwrap();
        assert!(rss >= 64 * 1024, "VmRSS {rss} kB while holding 64 MiB");
        assert!(hwm >= rss, "VmHWM {hwm} kB below VmRSS {rss} kB");
        assert!((64 * 1024..=rss).contains(&anon), "RssAnon {anon} kB, VmRSS {rss} kB");
        drop(held);
    }

    #[test]
    fn status_kib_names_what_it_could_not_read() {
        let me = std::process::id();
        // A prefix of a field is not that field.
        let err = status_kib(me, ["VmRS"]).unwrap_err();
        assert!(err.to_string().contains("has no VmRS field"), "{err}");
        let err = status_kib(me, ["Threads"]).unwrap_err();
        assert!(err.to_string().contains("Threads is"), "{err}");
        // Above the kernel's largest pid_max (2^22), so no such process.
        let err = status_kib(u32::MAX, ["VmRSS"]).unwrap_err();
        assert!(err.to_string().contains(&format!("reading /proc/{}/status", u32::MAX)), "{err}");
    }
}
