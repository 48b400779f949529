//! Packets per second forwarded at a NodePort whose only backend is on
//! another node (`cargo xtask bench pps`; needs root):
//!
//! `cargo run -p riptide-datapath --release --example pps_bench [-- --quick]`
//!
//! Small UDP datagrams (64-byte frames, 64 flows) from an outside client to
//! node 1's NodePort, DNATed to a pod on node 2 and source-NATed to node 1
//! (eTP=Cluster), on the wiring of `topo.rs` (every namespace created here
//! and deleted at the end). Paths, measured interleaved round by round:
//!
//! * `direct` — no Service: the client sends to the pod's address and node
//!   1 only routes (the reference: what the rest of the path costs);
//! * `iptables`, `nftables` — kube-proxy-shaped rules in node 1
//!   (`riptide_test_support::kubeproxy`: KUBE-SERVICES → KUBE-NODEPORTS →
//!   KUBE-EXT → KUBE-SVC → KUBE-SEP DNAT, masquerade; nftables verdict
//!   maps), netfilter conntrack;
//! * `riptide-tc` — `rt_from_net` / `rt_to_net` on node 1's uplink (DNAT,
//!   `bpf_fib_lookup` + `bpf_redirect` out the same device, SNAT on egress);
//! * `riptide-xdp` — the same plus `rt_xdp_net` attached natively: DNAT and
//!   SNAT at once and `XDP_TX` (each flow's first packet goes through tc,
//!   which asks the socket table about a node-address frontend);
//! * `riptide-xdp-dsr` — `riptide-xdp` to a second NodePort in DSR mode:
//!   every datagram grows by the DSR option at XDP (`bpf_xdp_adjust_head`)
//!   and keeps the client's address; node 2 runs riptide's uplink programs
//!   in this path only (`node2.rs`: the option taken, the datagram handed
//!   into the pod with `bpf_redirect_peer` instead of the kernel's
//!   forwarding), as a DSR backend node must.
//!
//! at 1 and 10,000 Services (the same kube-proxy-shaped Service list for
//! every path: the fillers are ClusterIP Services with a backend each). GRO
//! is on for node 1's uplink peer in every path, since `XDP_TX` into a veth
//! needs NAPI there; the other paths then cross the same devices the same
//! way.
//!
//! Each point: the generator (`traffic.rs`) runs for `--seconds` or 20 M
//! packets on one CPU; forwarded packets are counted at the backend (UDP
//! datagrams the pod's namespace received with a valid checksum: no socket
//! listens, so each counts as `NoPorts`; one with a bad checksum fails the
//! run), softirq time over all CPUs from
//! `/proc/stat`. Printed: one JSON object per (path, Services) with the
//! median, minimum and maximum packets/s of the rounds and the median
//! softirq CPU-seconds per million packets, then a summary object with the
//! ratios to `iptables` of the same run and the machine's conditions.
//!
//! `--hop node1` measures node 1's forwarding alone instead (`hop.rs`: a
//! generator without skbs, XDP in `BPF_PROG_TEST_RUN` live-frames mode,
//! and a counting drop on the first hop after node 1); `--hop both` runs
//! both modes interleaved, measurement by measurement (what `cargo xtask
//! bench pps` runs). The output's `hop` field names the mode: `path` (the
//! whole path, above) or `node1`.
//!
//! `--netperf`: netperf TCP_RR and TCP_CRR through the same NodePort paths
//! instead (`rr.rs`).
#![allow(clippy::unwrap_used)]

mod hop;
mod node1;
mod node2;
mod rr;
mod topo;
mod traffic;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_common::stats;
use riptide_datapath::service::{
    Algorithm, Backend, BackendState, Frontend, FrontendKind, LbMode, Protocol, Service,
    TrafficPolicy,
};
use riptide_test_support::{
    kubeproxy::{self, Proto, SvcPort},
    netns,
};
use topo::{NODE1_IP, NODE1_MAC, OUTSIDE_IP, OUTSIDE_MAC, POD_IP, Topo};

const NODE_PORT: u16 = 30_000;
/// The NodePort of the same backend in DSR mode.
const DSR_NODE_PORT: u16 = 30_001;
/// Services whose name contains this are written in DSR mode (this run's
/// and `rr.rs`'s).
const DSR_MARK: &str = "-dsr";
const DSR_NAME: &str = "bench/pps-dsr:udp";
const BACKEND_PORT: u16 = 8080;
/// Flows of the generator (distinct source ports).
const FLOWS: u16 = 64;
/// Upper bound of one measurement's packets, whatever the rate.
const MAX_PACKETS: u64 = 20_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Direct,
    Iptables,
    Nftables,
    RiptideTc,
    RiptideXdp,
    RiptideXdpDsr,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::Direct,
        Path::Iptables,
        Path::Nftables,
        Path::RiptideTc,
        Path::RiptideXdp,
        Path::RiptideXdpDsr,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Iptables => "iptables",
            Path::Nftables => "nftables",
            Path::RiptideTc => "riptide-tc",
            Path::RiptideXdp => "riptide-xdp",
            Path::RiptideXdpDsr => "riptide-xdp-dsr",
        }
    }

    fn xdp(self) -> bool {
        matches!(self, Path::RiptideXdp | Path::RiptideXdpDsr)
    }

    fn riptide(self) -> bool {
        matches!(self, Path::RiptideTc) || self.xdp()
    }
}

/// What a measurement counts (`--hop`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// The whole path, generator to pod.
    Path,
    /// Node 1 alone (`hop.rs`).
    Node1,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Path => "path",
            Mode::Node1 => "node1",
        }
    }
}

struct Opts {
    modes: Vec<Mode>,
    /// Live-frames batch of the node-1 generator.
    batch: u32,
    /// GRO on node 1's uplink in the node-1 mode.
    gro: bool,
    rounds: u32,
    seconds: f64,
    counts: Vec<usize>,
    cpu: usize,
    /// netperf TCP_RR / TCP_CRR instead of packets/s (`rr.rs`).
    netperf: bool,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        modes: vec![Mode::Path],
        batch: 256,
        gro: true,
        rounds: 3,
        seconds: 2.0,
        counts: vec![1, 10_000],
        cpu: 1,
        netperf: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => {
                o.rounds = 1;
                o.seconds = 1.0;
            }
            "--rounds" => o.rounds = args.next().context("--rounds N")?.parse()?,
            "--seconds" => o.seconds = args.next().context("--seconds S")?.parse()?,
            "--services" => {
                o.counts = args
                    .next()
                    .context("--services N[,N...]")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
            }
            "--cpu" => o.cpu = args.next().context("--cpu N")?.parse()?,
            "--netperf" => o.netperf = true,
            "--hop" => {
                o.modes = match args.next().as_deref() {
                    Some("path") => vec![Mode::Path],
                    Some("node1") => vec![Mode::Node1],
                    Some("both") => vec![Mode::Path, Mode::Node1],
                    _ => bail!("--hop path|node1|both"),
                }
            }
            "--batch" => o.batch = args.next().context("--batch N")?.parse()?,
            "--no-gro" => o.gro = false,
            other => bail!(
                "unknown argument {other} (--quick, --rounds N, --seconds S, --services N,N, --cpu N, --netperf, --hop path|node1|both, --batch N, --no-gro)"
            ),
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    o.cpu = o.cpu.min(cpus - 1);
    Ok(o)
}

/// The Service list of a run with `n` Services: kube-proxy's shape, the
/// measured NodePort in the middle.
fn service_list(n: usize) -> Vec<SvcPort> {
    let measured = SvcPort {
        name: "bench/pps:udp".into(),
        vip: Ipv4Addr::new(10, 43, 255, 10),
        proto: Proto::Udp,
        port: BACKEND_PORT,
        node_port: Some(NODE_PORT),
        endpoints: vec![(POD_IP, BACKEND_PORT)],
    };
    let dsr = SvcPort {
        name: DSR_NAME.into(),
        vip: Ipv4Addr::new(10, 43, 255, 11),
        node_port: Some(DSR_NODE_PORT),
        ..measured.clone()
    };
    kubeproxy::services_with(n, &[measured, dsr], POD_IP)
}

/// The same Service port as riptide's writer takes it (every backend on
/// another node).
fn riptide_service(p: &SvcPort) -> Service {
    let mut frontends = vec![Frontend {
        kind: FrontendKind::ClusterIp,
        addr: p.vip,
        port: p.port,
    }];
    if let Some(np) = p.node_port {
        frontends.push(Frontend {
            kind: FrontendKind::NodePort,
            addr: Ipv4Addr::UNSPECIFIED,
            port: np,
        });
    }
    Service {
        name: p.name.clone(),
        protocol: match p.proto {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        },
        frontends,
        backends: p
            .endpoints
            .iter()
            .map(|(a, port)| Backend {
                addr: SocketAddrV4::new(*a, *port),
                state: BackendState::Active,
                local: false,
            })
            .collect(),
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: if p.name.contains(DSR_MARK) {
            LbMode::Dsr
        } else {
            LbMode::Snat
        },
    }
}

/// Installs the kube-proxy-shaped rules of `path` in `ns`, or removes
/// every table (`None`): removing the tables, not just flushing them,
/// takes netfilter's conntrack and NAT hooks out of the namespace, so the
/// other paths do not pay for them.
fn rules(ns: &str, path: Option<Path>, services: &[SvcPort]) -> Result<()> {
    let (prog, args, input): (&str, &[&str], String) = match path {
        Some(Path::Iptables) => (
            "iptables-restore",
            &[],
            kubeproxy::iptables_restore(services),
        ),
        Some(Path::Nftables) => ("nft", &["-f", "-"], kubeproxy::nft_script(services)),
        _ => ("nft", &["flush", "ruleset"], String::new()),
    };
    pipe(ns, prog, args, &input)?;
    if path.is_none() {
        let _ = netns::command(ns, "conntrack")
            .arg("-F")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

/// Sets the nodes up for `path`: riptide on node 1 (tc, XDP) and node 2
/// (the DSR path) attached or detached, the kube-proxy-shaped rules of
/// `services` installed or removed. Returns the `XDP_PASS` program on node
/// 1's uplink peer that the XDP paths need in `mode` path (the node-1
/// mode's sink takes its place), attached while it is held.
fn enter(
    t: &Topo,
    (mode, path): (Mode, Path),
    rt: &mut Option<node1::Riptide>,
    rt2: &mut Option<node2::Riptide>,
    services: &[SvcPort],
) -> Result<Option<std::os::fd::OwnedFd>> {
    let n1 = t.node1.name();
    let r = rt.take().context("riptide")?;
    *rt = Some(r.set(n1, path.riptide(), path.xdp())?);
    let r2 = rt2.take().context("riptide on node 2")?;
    *rt2 = Some(r2.set(t.node2.name(), path == Path::RiptideXdpDsr)?);
    let peer = (path.xdp() && mode == Mode::Path)
        .then(|| t.xdp_pass_on_peer())
        .transpose()
        .context("attaching XDP_PASS to node 1's uplink peer")?;
    rules(
        n1,
        matches!(path, Path::Iptables | Path::Nftables).then_some(path),
        services,
    )?;
    Ok(peer)
}

/// Packets node 1's XDP program sent with `XDP_TX` so far.
fn xdp_tx_count(rt: Option<&node1::Riptide>) -> Result<u64> {
    Ok(rt.context("riptide")?.dp.stats()?.get(stats::XDP_TX))
}

fn pipe(ns: &str, prog: &str, args: &[&str], input: &str) -> Result<()> {
    riptide_test_support::netns::pipe(ns, prog, args, input)
        .with_context(|| format!("{prog} in {ns}"))
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
struct Point {
    sent: u64,
    delivered: u64,
    pps: f64,
    /// Softirq CPU-seconds per million delivered packets.
    softirq_s_per_mpkt: f64,
    /// The generator CPU's system and softirq time per delivered packet,
    /// in µs (the node-1 mode only: system is the generator's `bpf(2)`
    /// call, softirq node 1 and the sink).
    gen_cpu_us: Option<(f64, f64)>,
}

fn frames(path: Path) -> Vec<Vec<u8>> {
    let dst = match path {
        Path::Direct => (POD_IP, BACKEND_PORT),
        Path::RiptideXdpDsr => (NODE1_IP, DSR_NODE_PORT),
        _ => (NODE1_IP, NODE_PORT),
    };
    (0..FLOWS)
        .map(|k| traffic::udp_frame((OUTSIDE_MAC, NODE1_MAC), (OUTSIDE_IP, 10_000 + k), dst))
        .collect()
}

/// Valid UDP datagrams the pod's namespace received so far, and ones with
/// a bad checksum.
fn pod_rx(t: &Topo) -> Result<(u64, u64)> {
    netns::run_in(t.pod.name(), traffic::udp_received)
}

fn generate(
    t: &Topo,
    path: Path,
    packets: u64,
    time: Duration,
    cpu: usize,
) -> Result<traffic::Sent> {
    let f = frames(path);
    netns::run_in(t.outside.name(), move || {
        traffic::send("eth0", &f, packets, time, Some(cpu))
    })
}

fn measure(t: &Topo, path: Path, o: &Opts) -> Result<Point> {
    // Every flow's first packets (conntrack entries, riptide's tc-made
    // flows) before the clock starts.
    generate(
        t,
        path,
        u64::from(FLOWS) * 16,
        Duration::from_secs(1),
        o.cpu,
    )?;
    std::thread::sleep(Duration::from_millis(100));
    let (rx0, bad0) = pod_rx(t)?;
    let (si0, _) = traffic::softirq_seconds()?;
    let sent = generate(
        t,
        path,
        MAX_PACKETS,
        Duration::from_secs_f64(o.seconds),
        o.cpu,
    )?;
    // What is still queued reaches the pod within this.
    std::thread::sleep(Duration::from_millis(50));
    let (si1, _) = traffic::softirq_seconds()?;
    let (rx1, bad1) = pod_rx(t)?;
    let delivered = rx1.saturating_sub(rx0);
    ensure!(
        bad1 == bad0,
        "{} datagrams reached the pod with a bad UDP checksum",
        bad1 - bad0
    );
    let pps = delivered as f64 / sent.elapsed.as_secs_f64();
    Ok(Point {
        sent: sent.packets,
        delivered,
        pps,
        softirq_s_per_mpkt: if delivered == 0 {
            f64::NAN
        } else {
            (si1 - si0) / (delivered as f64 / 1e6)
        },
        gen_cpu_us: None,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// Ctrl-C or SIGTERM (`cargo xtask bench` interrupted, a cancelled run)
/// ends the process without running `Drop`: the handler kills what runs
/// in the bench's namespaces (netserver, netperf, which would keep a
/// deleted namespace alive) and deletes them, then exits.
fn remove_on_signal(names: Vec<String>) -> Result<()> {
    ctrlc::set_handler(move || {
        eprintln!("pps_bench: interrupted; removing its namespaces");
        for name in &names {
            if let Ok(out) = std::process::Command::new("ip").args(["netns", "pids", name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = std::process::Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C / SIGTERM handler")
}

fn main() -> Result<()> {
    let o = opts()?;
    for tool in ["iptables-restore", "nft", "conntrack", "bridge", "ethtool"] {
        let ok = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool} >/dev/null")])
            .status()
            .is_ok_and(|s| s.success());
        ensure!(
            ok,
            "{tool} not found (cargo xtask bench installs the bench tools)"
        );
    }
    let t = Topo::new(&format!("rtpps{}", std::process::id()));
    remove_on_signal(t.netns_names())?;
    // The generator's frames carry full checksums anyway; the pod never
    // sends. The same wiring as the netns test.
    t.full_checksums();
    if o.netperf {
        for tool in ["netperf", "netserver"] {
            ensure!(
                std::process::Command::new("sh")
                    .args(["-c", &format!("command -v {tool} >/dev/null")])
                    .status()
                    .is_ok_and(|s| s.success()),
                "{tool} not found (cargo xtask bench installs the bench tools)"
            );
        }
        let r = rr::run(&t, o.rounds, o.seconds.ceil() as u32, o.cpu);
        drop(t);
        return r;
    }
    let n1 = t.node1.name().to_owned();
    let mut rt = Some(netns::run_in(&n1, node1::Riptide::load)?);
    let n2 = t.node2.name().to_owned();
    let mut rt2 = Some(node2::Riptide::load(&n2)?);
    let load_before = traffic::loadavg();
    let started = std::time::Instant::now();
    let hop = o
        .modes
        .contains(&Mode::Node1)
        .then(|| hop::Hop::new(&t, o.batch, o.gro))
        .transpose()?;
    // (mode, path, services) → points
    let mut results: Vec<(Mode, Path, usize, Vec<Point>)> = Vec::new();
    // The node-1 mode's floor (`hop::Hop::floor`) per Service count.
    let mut floors: Vec<(usize, Vec<Point>)> = Vec::new();
    let mut xdp_tx = 0u64;
    for &n in &o.counts {
        let list = service_list(n);
        {
            let r = rt.as_mut().context("riptide")?;
            for s in &list {
                r.svcs.upsert(&riptide_service(s))?;
            }
        }
        for round in 0..o.rounds {
            let mut order = Path::ALL.to_vec();
            let k = round as usize % order.len();
            order.rotate_left(k);
            for path in order {
                for &mode in &o.modes {
                    // Dropped (detached) after this path's measurement.
                    let _peer = enter(&t, (mode, path), &mut rt, &mut rt2, &list)?;
                    let before = xdp_tx_count(rt.as_ref())?;
                    let p = match (mode, &hop) {
                        (Mode::Node1, Some(h)) => h.measure(&t, path, &o),
                        _ => measure(&t, path, &o),
                    }
                    .with_context(|| {
                        format!("{} at {n} Services ({})", path.name(), mode.name())
                    })?;
                    rules(&n1, None, &[])?;
                    // A broken path delivers next to nothing. A working one
                    // can lose more than half: with XDP on, the generator's
                    // CPU spends less in softirq and sends faster than node 2
                    // and the pod take on a 2-CPU machine
                    // (`delivered_fraction` in the output).
                    if p.delivered < p.sent / 5 {
                        eprintln!("{}", t.counters());
                        bail!(
                            "{} at {n} Services ({}) delivered {} of {} packets",
                            path.name(),
                            mode.name(),
                            p.delivered,
                            p.sent
                        );
                    }
                    if path.xdp() {
                        let after = xdp_tx_count(rt.as_ref())?;
                        xdp_tx += after - before;
                        ensure!(
                            after - before >= p.delivered / 2,
                            "XDP sent {} of {} delivered packets: the XDP path was not taken",
                            after - before,
                            p.delivered
                        );
                    }
                    eprintln!(
                        "[{:>4.0}s] {n:>5} svc round {} {:<5} {:<15} sent {:>9} delivered {:>9} ({:>5.1} %) {:>8.0} pps, softirq {:.3} CPU-s/Mpkt, load {:.2}",
                        started.elapsed().as_secs_f64(),
                        round + 1,
                        mode.name(),
                        path.name(),
                        p.sent,
                        p.delivered,
                        100.0 * p.delivered as f64 / p.sent.max(1) as f64,
                        p.pps,
                        p.softirq_s_per_mpkt,
                        traffic::loadavg()
                    );
                    match results
                        .iter_mut()
                        .find(|(m, q, c, _)| *m == mode && *q == path && *c == n)
                    {
                        Some((_, _, _, v)) => v.push(p),
                        None => results.push((mode, path, n, vec![p])),
                    }
                }
            }
            if let Some(h) = &hop {
                // riptide and the rules off: node 1 bounces frames only.
                drop(enter(
                    &t,
                    (Mode::Node1, Path::Direct),
                    &mut rt,
                    &mut rt2,
                    &list,
                )?);
                let p = h
                    .floor(&t, &o)
                    .with_context(|| format!("the floor at {n} Services"))?;
                eprintln!(
                    "[{:>4.0}s] {n:>5} svc round {} node1 floor (XDP_TX) sent {:>9} delivered {:>9} {:>8.0} pps, softirq {:.3} CPU-s/Mpkt",
                    started.elapsed().as_secs_f64(),
                    round + 1,
                    p.sent,
                    p.delivered,
                    p.pps,
                    p.softirq_s_per_mpkt,
                );
                match floors.iter_mut().find(|(c, _)| *c == n) {
                    Some((_, v)) => v.push(p),
                    None => floors.push((n, vec![p])),
                }
            }
        }
    }
    // Detach before the namespaces go.
    if let Some(r) = rt.take() {
        drop(r.set(&n1, false, false)?);
    }
    if let Some(r) = rt2.take() {
        drop(r.set(&n2, false)?);
    }
    let load_after = traffic::loadavg();
    let med = |mode: Mode, path: Path, n: usize| -> Option<(f64, f64)> {
        results
            .iter()
            .find(|(m, q, c, _)| *m == mode && *q == path && *c == n)
            .map(|(_, _, _, v)| {
                (
                    median(v.iter().map(|p| p.pps).collect()),
                    median(v.iter().map(|p| p.softirq_s_per_mpkt).collect()),
                )
            })
    };
    for (mode, path, n, v) in &results {
        let pps: Vec<f64> = v.iter().map(|p| p.pps).collect();
        let (m, si) = med(*mode, *path, *n).unwrap_or((f64::NAN, f64::NAN));
        let gen_cpu = if *mode == Mode::Node1 {
            let sys = median(v.iter().filter_map(|p| p.gen_cpu_us).map(|c| c.0).collect());
            let si = median(v.iter().filter_map(|p| p.gen_cpu_us).map(|c| c.1).collect());
            format!(
                ",\"gen_cpu_system_us_per_pkt\":{},\"gen_cpu_softirq_us_per_pkt\":{}",
                json_num(sys),
                json_num(si)
            )
        } else {
            String::new()
        };
        let delivered: u64 = v.iter().map(|p| p.delivered).sum();
        let sent: u64 = v.iter().map(|p| p.sent).sum();
        println!(
            "{{\"hop\":\"{}\",\"path\":\"{}\",\"services\":{n},\"rounds\":{},\"pps_median\":{},\"pps_min\":{},\"pps_max\":{},\"delivered_fraction\":{},\"softirq_cpu_s_per_mpkt\":{}{gen_cpu}}}",
            mode.name(),
            path.name(),
            v.len(),
            json_num(m),
            json_num(pps.iter().copied().fold(f64::INFINITY, f64::min)),
            json_num(pps.iter().copied().fold(0.0, f64::max)),
            json_num(delivered as f64 / sent.max(1) as f64),
            json_num(si)
        );
    }
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    for &mode in &o.modes {
        let mut ratios = String::new();
        for &n in &o.counts {
            let base = med(mode, Path::Iptables, n).map_or(f64::NAN, |x| x.0);
            let tc = med(mode, Path::RiptideTc, n).map_or(f64::NAN, |x| x.0);
            for path in Path::ALL {
                let m = med(mode, path, n).map_or(f64::NAN, |x| x.0);
                let _ = write!(
                    ratios,
                    "{}\"{}@{n}\":{}",
                    if ratios.is_empty() { "" } else { "," },
                    path.name(),
                    json_num(m / base)
                );
            }
            let x = med(mode, Path::RiptideXdp, n).map_or(f64::NAN, |x| x.0);
            let d = med(mode, Path::RiptideXdpDsr, n).map_or(f64::NAN, |x| x.0);
            let _ = write!(
                ratios,
                ",\"riptide-xdp/riptide-tc@{n}\":{},\"riptide-xdp-dsr/riptide-tc@{n}\":{}",
                json_num(x / tc),
                json_num(d / tc)
            );
            // Node 1's own time per packet: the path's minus the floor's.
            if mode == Mode::Node1
                && let Some((_, v)) = floors.iter().find(|(c, _)| *c == n)
            {
                let floor = median(v.iter().map(|p| p.pps).collect());
                let _ = write!(ratios, ",\"floor_pps@{n}\":{}", json_num(floor));
                for path in Path::ALL {
                    let m = med(mode, path, n).map_or(f64::NAN, |x| x.0);
                    let _ = write!(
                        ratios,
                        ",\"{}_own_ns@{n}\":{}",
                        path.name(),
                        json_num(1e9 / m - 1e9 / floor)
                    );
                }
            }
        }
        println!(
            "{{\"summary\":\"pps\",\"hop\":\"{}\",\"ratio_to_iptables\":{{{ratios}}},\"xdp_tx_packets\":{xdp_tx},\"seconds_per_point\":{},\"rounds\":{},\"generator_cpu\":{},\"batch\":{},\"cpus\":{},\"cpu_model\":\"{}\",\"kernel\":\"{}\",\"loadavg_before\":{},\"loadavg_after\":{},\"elapsed_s\":{:.0}}}",
            mode.name(),
            o.seconds,
            o.rounds,
            o.cpu,
            o.batch,
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model.replace('"', ""),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            json_num(load_before),
            json_num(load_after),
            started.elapsed().as_secs_f64()
        );
    }
    drop(t);
    Ok(())
}
