//! Where a measurement's CPU goes besides netperf: the agents' threads
//! (CPU time read from `/proc` around every measurement) and, with
//! `--bpf-stats`, riptide's eBPF programs (`kernel.bpf_stats_enabled`,
//! run time and run count per program from `bpftool`). Plus
//! `--pause-agents`: both agents stopped (`SIGSTOP`) while netperf runs, to
//! tell what the agents' own work costs a data path from what the programs
//! cost.
//!
//! Everything is per measurement and divided by its transactions, so the
//! numbers sit next to netperf's own CPU per transaction.

use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::lab::LabConfig;

/// CPU time (µs) of one thread or process, from `/proc/.../stat`.
fn cpu_us(stat: &str) -> Option<(String, u64)> {
    stat_cpu(stat, false)
}

/// Like [`cpu_us`]; with `children` plus the time of reaped children
/// (`cutime`, `cstime`: a build's short-lived compilers show up at cargo).
fn stat_cpu(stat: &str, children: bool) -> Option<(String, u64)> {
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 after comm.
    let mut ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    if children {
        ticks += fields.get(13)?.parse::<u64>().ok()? + fields.get(14)?.parse::<u64>().ok()?;
    }
    Some((comm, ticks * 1_000_000 / hz()))
}

fn hz() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1)
}

/// The whole machine at one instant: busy and softirq CPU time from
/// `/proc/stat`, and every process's CPU time with its reaped children's.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub busy_us: u64,
    pub softirq_us: u64,
    procs: BTreeMap<u32, (String, u64)>,
}

impl Machine {
    pub fn read() -> Self {
        let mut m = Self::default();
        if let Some(cpu) = std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(|s| s.lines().next().map(str::to_owned)) {
            // cpu user nice system idle iowait irq softirq steal …
            let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            m.busy_us = total.saturating_sub(idle) * 1_000_000 / hz();
            m.softirq_us = v.get(6).copied().unwrap_or(0) * 1_000_000 / hz();
        }
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(c) = std::fs::read_to_string(e.path().join("stat")).ok().as_deref().and_then(|s| stat_cpu(s, true)) {
                m.procs.insert(pid, c);
            }
        }
        m
    }

    /// CPU µs between `self` and the later `after`, by command name, the
    /// largest `n` (processes gone meanwhile count at the parent that
    /// reaped them).
    pub fn top(&self, after: &Self, n: usize) -> Vec<(String, u64)> {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        for (pid, (comm, us)) in &after.procs {
            let before = self.procs.get(pid).filter(|(c, _)| c == comm).map_or(0, |(_, b)| *b);
            *by.entry(comm.clone()).or_default() += us.saturating_sub(before);
        }
        let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, us)| *us > 0).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1));
        v.truncate(n);
        v
    }
}

/// Pids of the `riptide-agent` processes of the lab's nodes (hand-wired or
/// the DaemonSet's pods, both under the nodes' cgroups).
pub fn agent_pids(c: &LabConfig) -> Vec<u32> {
    let mut pids = Vec::new();
    for i in 1..=2 {
        procs_under(&c.node_cgroup(i), &mut pids);
    }
    pids.retain(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "riptide-agent"));
    pids
}

fn procs_under(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            procs_under(&e.path(), out);
        }
    }
}

/// CPU µs of every agent thread, summed by thread name (tokio's workers
/// share one name).
pub fn agent_threads(pids: &[u32]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for p in pids {
        for t in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            if let Some((comm, us)) = std::fs::read_to_string(t.path().join("stat")).ok().as_deref().and_then(cpu_us) {
                *m.entry(comm).or_default() += us;
            }
        }
    }
    m
}

/// The agents' CPU over one measurement, per thread name (µs).
pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Stops (`SIGSTOP`) the agents while it lives; `SIGCONT` on drop, also
/// when the measurement failed.
pub struct Paused(Vec<u32>);

impl Paused {
    pub fn new(pids: Vec<u32>) -> Self {
        for p in &pids {
            signal(*p, libc::SIGSTOP);
        }
        Self(pids)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        for p in &self.0 {
            signal(*p, libc::SIGCONT);
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on a pid we read from the lab's cgroups.
        unsafe { libc::kill(p, sig) };
    }
}

/// Run time and runs of one eBPF program (all loaded copies of one name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgTime {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

#[derive(Deserialize)]
struct BpftoolProg {
    #[serde(default)]
    name: String,
    #[serde(default)]
    run_time_ns: u64,
    #[serde(default)]
    run_cnt: u64,
}

/// `kernel.bpf_stats_enabled` on while it lives (the previous value back on
/// drop): the kernel then times every program run.
pub struct BpfStats {
    before: String,
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<Self> {
        if Command::new("bpftool").arg("version").output().is_err() {
            bail!("--bpf-stats needs bpftool (Debian: apt-get install bpftool)");
        }
        let before = std::fs::read_to_string(STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?;
        std::fs::write(STATS_SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self { before: before.trim().to_owned() })
    }

    /// riptide's programs (`rt_*`) by name, summed over their copies.
    pub fn read(&self) -> Result<BTreeMap<String, ProgTime>> {
        let out = Command::new("bpftool").args(["-j", "prog", "show"]).output().context("running bpftool")?;
        if !out.status.success() {
            bail!("bpftool prog show: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let progs: Vec<BpftoolProg> = serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")?;
        let mut m: BTreeMap<String, ProgTime> = BTreeMap::new();
        for p in progs.into_iter().filter(|p| p.name.starts_with("rt_")) {
            let e = m.entry(p.name).or_default();
            e.run_time_ns += p.run_time_ns;
            e.run_cnt += p.run_cnt;
        }
        Ok(m)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, &self.before);
    }
}

/// Per program: what ran between two reads.
pub fn prog_delta(before: &BTreeMap<String, ProgTime>, after: &BTreeMap<String, ProgTime>) -> BTreeMap<String, ProgTime> {
    after
        .iter()
        .map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                ProgTime { run_time_ns: v.run_time_ns.saturating_sub(b.run_time_ns), run_cnt: v.run_cnt.saturating_sub(b.run_cnt) },
            )
        })
        .filter(|(_, v)| v.run_cnt > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_cpu_time_and_a_comm_with_spaces() {
        let stat = "42 (tokio runtime) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        let (comm, us) = super::cpu_us(stat).expect("parse");
        assert_eq!(comm, "tokio runtime");
        assert_eq!(us, 300 * 1_000_000 / super::hz());
        assert!(super::cpu_us("garbage").is_none());
        // With reaped children (cutime 7, cstime 3).
        let stat = "7 (cargo) S 1 7 7 0 -1 0 0 0 0 0 10 5 7 3 20";
        assert_eq!(super::stat_cpu(stat, true).map(|c| c.1), Some(25 * 1_000_000 / super::hz()));
    }
}
