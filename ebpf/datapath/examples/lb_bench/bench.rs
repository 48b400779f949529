//! Micro-benchmarks of the LB paths, run by `cargo xtask bench` through
//! this example (`main.rs`); timing targets belong here, never in tests.
//!
//! **tc path** (`rt_from_pod`) through BPF_PROG_TEST_RUN with 1, 1k, 10k…
//! ClusterIP services in the maps. What each number includes:
//!
//! * `ct_hit_repeat_ns` — the established-flow path (conntrack hit, DNAT of
//!   address and port with checksum updates, delivery decision), as the
//!   kernel's mean over `repeat` runs inside one syscall: no syscall, no
//!   per-run clock read. `repeat` reruns the program on the *same* skb, so
//!   the packet must stay a valid established-flow packet after each run:
//!   the bench installs a second service whose frontend is the first one's
//!   backend and whose backend is the first one's VIP. After one warm-up
//!   run per direction both tuples have conntrack entries, and every
//!   further run is an established-flow hit that rewrites VIP→backend or
//!   backend→VIP (never a no-op: `old == new` would skip the rewrite).
//!   Includes `local_bh_disable/enable` and the loop around each run (a few
//!   ns).
//! * `ct_hit_median_ns` / `new_flow_median_ns` — one syscall per packet with
//!   `repeat = 1`: the kernel's duration of a single run, which includes one
//!   `ktime_get_ns()` and the loop bookkeeping. `passthrough_single_median_ns
//!   − passthrough_ns` estimates that per-sample overhead. New flows cannot
//!   use `repeat` (each run must be a fresh tuple).
//! * `passthrough_ns` — a packet for no service (parse, lookups that miss,
//!   delivery decision), with `repeat`.
//! * `passthrough_new_median_ns` — the first packet of a flow for no
//!   service (a fresh source port per sample, one run per syscall): what
//!   the direct path's SYN pays. Its conntrack miss lands in a cold bucket
//!   of the 512k-bucket table just as a new service flow's does, so
//!   `new_flow_median_ns − passthrough_new_median_ns` is what balancing a
//!   new flow adds over not balancing it (the service, slot and backend
//!   lookups, the two conntrack inserts, the rewrite).
//! * `floor_ns` — an ARP frame with `repeat`: the test loop's own cost per
//!   run plus a few instructions; subtract it from the `repeat` numbers for
//!   the programs' own cost.
//!
//! **Socket LB** (`rt_sock_conn4`): the program's own run time from the
//! kernel's BPF run-time statistics (`BPF_ENABLE_STATS`, `run_time_ns /
//! run_cnt`, which include two `sched_clock()` reads per run), plus the
//! `connect()` latency a process sees with and without a service hit.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions};
use riptide_common::{CFG_F_SOCK_LB, Config, names};

use anyhow::{Context as _, Result, anyhow, bail};
use riptide_datapath::{
    Datapath, Pinning,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, Services,
        TrafficPolicy,
    },
};

/// Result of one tc-path scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct LbBench {
    pub services: u32,
    /// Established flow, kernel mean over `samples` runs in one syscall
    /// (see the module docs for how the packet stays valid).
    pub ct_hit_repeat_ns: f64,
    /// Established flow, one run per syscall (median / mean of the
    /// kernel-reported single-run durations).
    pub ct_hit_median_ns: u64,
    pub ct_hit_mean_ns: f64,
    /// First packet of a flow: service lookup, backend choice, conntrack
    /// insert, DNAT; one run per syscall.
    pub new_flow_median_ns: u64,
    pub new_flow_mean_ns: f64,
    /// A packet that is not for a service, with `repeat`.
    pub passthrough_ns: f64,
    /// An ARP frame, with `repeat`: the program returns after the
    /// Ethernet type check, so this is the test loop's own cost per run
    /// (`bpf_test_run` bookkeeping, `local_bh_disable/enable`, the program
    /// call) plus a few instructions — subtract it from the `repeat`
    /// numbers for the programs' own cost.
    pub floor_ns: f64,
    /// The same pass-through packet measured one run per syscall: the
    /// difference to `passthrough_ns` is the per-sample measurement
    /// overhead contained in the two single-run medians above.
    pub passthrough_single_median_ns: u64,
    /// First packet of a flow for no service, one run per syscall.
    pub passthrough_new_median_ns: u64,
    pub samples: u32,
}

fn vip(i: u32) -> Ipv4Addr {
    // 10.43.0.0/16 holds 65k VIPs; skip .0.
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 0, 0)) + 1 + i)
}

/// A TCP frame from the client pod to `dst:dport` (valid checksums are not
/// needed for timing; the programs update them incrementally either way).
pub(crate) fn frame(src_port: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&Ipv4Addr::new(10, 42, 0, 5).octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&src_port.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// Runs `rt_from_pod` `repeat` times on `data`; returns the kernel's mean
/// duration per run and the frame after the last run.
fn run(dp: &mut Datapath, data: &[u8], repeat: u32) -> Result<(std::time::Duration, Vec<u8>)> {
    let mut out = vec![0u8; data.len() + 128];
    let prog = dp.classifier(names::PROG_FROM_POD)?;
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("{}: BPF_PROG_TEST_RUN", names::PROG_FROM_POD))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.duration, out))
}

pub(crate) fn run_ns(dp: &mut Datapath, data: &[u8]) -> Result<u64> {
    Ok(u64::try_from(run(dp, data, 1)?.0.as_nanos()).unwrap_or(u64::MAX))
}

pub(crate) fn median_mean(mut v: Vec<u64>) -> (u64, f64) {
    v.sort_unstable();
    let median = v.get(v.len() / 2).copied().unwrap_or(0);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    };
    (median, mean)
}

pub(crate) fn clusterip(name: String, vip: Ipv4Addr, port: u16, backends: Vec<Backend>) -> Service {
    Service {
        name,
        protocol: Protocol::Tcp,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: vip,
            port,
        }],
        backends,
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

pub(crate) fn remote(addr: Ipv4Addr, port: u16) -> Backend {
    Backend {
        addr: SocketAddrV4::new(addr, port),
        state: BackendState::Active,
        // Backends on other nodes (kernel-routed, no redirect).
        local: false,
    }
}

/// A private datapath with `services` ClusterIP services of 3 remote
/// backends each, plus the flip-flop pair (see the module docs).
fn setup(services: u32) -> Result<(Datapath, Services)> {
    let mut dp = Datapath::load(&Pinning::None)?;
    dp.set_config(&Config {
        node_ip_be: u32::from(Ipv4Addr::new(198, 18, 0, 1)).to_be(),
        flags: CFG_F_SOCK_LB,
        ..Default::default()
    })?;
    let mut svcs = dp.services()?;
    for i in 0..services {
        let backends = (0..3u32)
            .map(|b| {
                remote(
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 1, 0)) + i * 3 + b),
                    8080,
                )
            })
            .collect();
        svcs.upsert(&clusterip(format!("bench/s{i}:p"), vip(i), 80, backends))?;
    }
    svcs.upsert(&clusterip(
        "bench/flip:a".into(),
        FLIP_VIP,
        80,
        vec![remote(FLIP_BE, 8080)],
    ))?;
    svcs.upsert(&clusterip(
        "bench/flip:b".into(),
        FLIP_BE,
        8080,
        vec![remote(FLIP_VIP, 80)],
    ))?;
    Ok((dp, svcs))
}

const FLIP_VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 255, 250);
const FLIP_BE: Ipv4Addr = Ipv4Addr::new(10, 42, 200, 7);

/// The established path with `repeat` (module docs): kernel mean ns/run.
fn flip_repeat(dp: &mut Datapath, repeat: u32) -> Result<f64> {
    let flip = frame(2000, FLIP_VIP, 80, 0x10);
    // Warm-up: creates both conntrack entries (first run VIP → B, second
    // B → VIP as a new flow of the second service).
    let (_, warm) = run(dp, &flip, 2)?;
    if warm != flip {
        bail!("the flip-flop packet did not come back to its original after two runs");
    }
    let (d, _) = run(dp, &flip, repeat.max(2) & !1)?;
    Ok(d.as_nanos() as f64)
}

/// Only the established path with `repeat` (for profilers: one syscall
/// running the program `repeat` times).
pub fn established_repeat(services: u32, repeat: u32) -> Result<f64> {
    let (mut dp, _svcs) = setup(services)?;
    flip_repeat(&mut dp, repeat)
}

/// Only new flows, one syscall each (for profilers): `n` SYNs from
/// distinct source ports (≤ 60000 before ports repeat).
pub fn new_flows(services: u32, n: u32) -> Result<()> {
    let (mut dp, _svcs) = setup(services)?;
    let target = vip(services / 2);
    for i in 0..n {
        let port = 1024 + (i % 60_000) as u16;
        run(&mut dp, &frame(port, target, 80, 0x02), 1)?;
    }
    Ok(())
}

/// Loads a private datapath, installs `services` ClusterIP services with 3
/// backends each, and measures `samples` packets per path.
pub fn tc_lb(services: u32, samples: u32) -> Result<LbBench> {
    let (mut dp, _svcs) = setup(services)?;
    let target = vip(services / 2);

    // New flows: a fresh source port per sample (cycling over 60k ports;
    // samples beyond that meet conntrack entries and are CT hits instead,
    // so keep samples ≤ 60000).
    let mut new_flow = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let port = 1024 + (i % 60_000) as u16;
        new_flow.push(run_ns(&mut dp, &frame(port, target, 80, 0x02))?);
    }
    // Established flow, one run per syscall: the same tuple again and again.
    let est = frame(1024, target, 80, 0x10);
    run(&mut dp, &est, 1)?;
    let mut hit = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        hit.push(run_ns(&mut dp, &est)?);
    }

    let ct_hit_repeat_ns = flip_repeat(&mut dp, samples)?;

    // Pass-through: not a service; unchanged by the program, so `repeat` is fine.
    let other = frame(1024, Ipv4Addr::new(10, 42, 7, 7), 80, 0x10);
    let (pass, _) = run(&mut dp, &other, samples.max(1))?;
    let mut arp = frame(0, Ipv4Addr::UNSPECIFIED, 0, 0);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (floor, _) = run(&mut dp, &arp, samples.max(1))?;
    let mut pass1 = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        pass1.push(run_ns(&mut dp, &other)?);
    }
    let (passthrough_single_median_ns, _) = median_mean(pass1);
    // Fresh tuples to an address that is no service (distinct from the
    // service flows above, so every sample misses conntrack).
    let mut pass_new = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let port = 1024 + (i % 60_000) as u16;
        pass_new.push(run_ns(
            &mut dp,
            &frame(port, Ipv4Addr::new(10, 42, 7, 8), 80, 0x02),
        )?);
    }
    let (passthrough_new_median_ns, _) = median_mean(pass_new);
    let (ct_hit_median_ns, ct_hit_mean_ns) = median_mean(hit);
    let (new_flow_median_ns, new_flow_mean_ns) = median_mean(new_flow);
    Ok(LbBench {
        services,
        ct_hit_repeat_ns,
        ct_hit_median_ns,
        ct_hit_mean_ns,
        new_flow_median_ns,
        new_flow_mean_ns,
        passthrough_ns: pass.as_nanos() as f64,
        floor_ns: floor.as_nanos() as f64,
        passthrough_single_median_ns,
        passthrough_new_median_ns,
        samples,
    })
}

/// Result of the socket-LB scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct SockBench {
    pub services: u32,
    pub connects: u32,
    /// `rt_sock_conn4` run time per run from BPF run-time statistics, over
    /// the connects to a service (translated) …
    pub prog_hit_ns: f64,
    /// … and over connects to an address that is no service.
    pub prog_miss_ns: f64,
    /// `connect()` of a UDP socket as the process sees it (median, incl.
    /// the syscall and route lookup; no packet is sent) to a service …
    pub connect_hit_median_ns: u64,
    /// … and to a non-service address.
    pub connect_miss_median_ns: u64,
}

/// A cgroup the bench moves itself into; moves back and removes it on drop.
struct BenchCgroup {
    path: PathBuf,
    home: Option<PathBuf>,
}

const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> anyhow::Error {
    let path = path.to_owned();
    move |source| anyhow::Error::new(source).context(format!("{action} {}", path.display()))
}

impl BenchCgroup {
    fn new() -> Result<Self> {
        let path = Path::new(CGROUP2).join(format!("riptide-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(io_err("creating cgroup", &path))?;
        Ok(Self { path, home: None })
    }

    /// Moves this whole process into the cgroup (cgroup v2 membership is
    /// per process), remembering where it was.
    fn enter(&mut self) -> Result<()> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io_err("reading", Path::new("/proc/self/cgroup")))?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/');
        self.home = Some(Path::new(CGROUP2).join(rel));
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(io_err("entering cgroup", &procs))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        if let Some(home) = &self.home {
            let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Measures `rt_sock_conn4` with `services` ClusterIP services: `connects`
/// UDP `connect()` calls to a service (backends on 127.0.0.0/8, so the
/// rewritten connect routes over loopback and no packet leaves anything)
/// and to a non-service loopback address. Moves this process into a
/// temporary cgroup under `/sys/fs/cgroup/unified` for the duration.
pub fn sock_connect(services: u32, connects: u32) -> Result<SockBench> {
    let mut dp = Datapath::load(&Pinning::None)?;
    dp.set_config(&Config {
        flags: CFG_F_SOCK_LB,
        ..Default::default()
    })?;
    let mut svcs = dp.services()?;
    for i in 0..services {
        let backends = (0..3u8)
            .map(|b| Backend {
                addr: SocketAddrV4::new(Ipv4Addr::new(127, 0, 1, 1 + b), 9),
                state: BackendState::Active,
                local: true,
            })
            .collect();
        let mut s = clusterip(format!("bench/s{i}:p"), vip(i), 80, backends);
        s.protocol = Protocol::Udp;
        svcs.upsert(&s)?;
    }
    let mut cg = BenchCgroup::new()?;
    let _attached = dp.attach_sock_lb(&cg.path)?;
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| anyhow!("BPF_ENABLE_STATS: {e}"))?;
    cg.enter()?;
    let target = (vip(services / 2), 80);
    let miss = (Ipv4Addr::new(127, 0, 2, 1), 80);
    let mut measure = |dst: (Ipv4Addr, u16)| -> Result<(u64, f64)> {
        let before = prog_stats(&mut dp)?;
        let mut lat = Vec::with_capacity(connects as usize);
        for _ in 0..connects {
            let s = UdpSocket::bind("127.0.0.1:0").map_err(io_err("binding", Path::new("udp")))?;
            let t = Instant::now();
            s.connect(dst)
                .map_err(io_err("connecting", Path::new("udp")))?;
            lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        let after = prog_stats(&mut dp)?;
        let runs = after.1.saturating_sub(before.1).max(1);
        let per_run = after.0.saturating_sub(before.0) as f64 / runs as f64;
        Ok((median_mean(lat).0, per_run))
    };
    let (connect_hit_median_ns, prog_hit_ns) = measure(target)?;
    let (connect_miss_median_ns, prog_miss_ns) = measure(miss)?;
    drop(cg);
    drop(stats_fd);
    Ok(SockBench {
        services,
        connects,
        prog_hit_ns,
        prog_miss_ns,
        connect_hit_median_ns,
        connect_miss_median_ns,
    })
}

/// (run time ns, run count) of `rt_sock_conn4`.
fn prog_stats(dp: &mut Datapath) -> Result<(u64, u64)> {
    let info = dp
        .sock_addr(names::PROG_SOCK_CONNECT4)?
        .info()
        .with_context(|| format!("{}: reading program info", names::PROG_SOCK_CONNECT4))?;
    Ok((
        u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        info.run_count(),
    ))
}
