//! `cargo xtask bench`: data-path numbers measured side by side in one run,
//! so the noise of a shared machine cancels out in the ratios.
//!
//! A 2-node lab cluster runs a `netserver` pod on each node and a client pod
//! on node 1 (`topology`). Four scenarios (`paths`): pod → ClusterIP → pod on
//! the other node and on the same node, outside → NodePort on node 1 → pod
//! on node 2 and on node 1. In each, riptide's paths (socket LB, per-packet
//! tc, NodePort on the uplink) and kube-proxy-shaped iptables and nftables
//! rules in node 1's namespace (`kubeproxy`) are measured next to the direct
//! path from the same client, at 1, 1 000 and 10 000 Services: riptide's
//! fillers are real Services whose endpoints are the netserver pod; the
//! baselines' fillers are rules with real backends. Two more scenarios
//! measure NetworkPolicy (`netpol`): pod → pod on the other node and on the
//! same node with 100 policies selecting the server, against the same path
//! with no policy, interleaved with everything else.
//!
//! The baselines cannot run from riptide's client pod: riptide's uplink
//! program hands packets for a local pod to it with `bpf_redirect_peer`,
//! which skips the node's netfilter, so a reply from a remote backend would
//! reach the pod without netfilter's reverse DNAT (the pod sees the
//! backend's address and resets). Their client is a pod wired like the
//! reference `ptp` plugin, the kind of pod a kube-proxy cluster has.
//!
//! Method (REFERENCES.md): each measurement gets its own netperf data port,
//! conntrack is flushed before each, paths are interleaved run by run, all
//! paths of a run bind netperf and netserver to the same CPU (the next run
//! to the next CPU, see `netperf::run_with`), and the report gives medians
//! with min–max.

pub mod netperf;
pub mod netpol;
pub mod paths;
pub mod probe;
pub mod report;
pub mod topology;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

pub use riptide_test_support::kubeproxy;

pub use self::paths::{DataPath, Scenario};
use self::{
    kubeproxy::{Proto, SvcPort},
    netperf::{CONTROL_PORT, Target, Test},
    topology::{Client, PortPlan, Topology, VIP},
};
use crate::{
    e2e,
    lab::{Lab, LabConfig},
    netns,
};

#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub out_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// Build the bench cluster, print where everything is, and wait for
    /// Ctrl-C instead of measuring (for investigating a path by hand).
    pub hold: bool,
    /// Only these scenarios (empty: the plan's own).
    pub scenarios: Vec<Scenario>,
    /// Only these paths and the direct paths they are compared with (empty:
    /// every path of each scenario).
    pub paths: Vec<DataPath>,
    /// Only these netperf tests (empty: the plan's own).
    pub tests: Vec<Test>,
    /// Only these Service counts (empty: the plan's own).
    pub counts: Vec<usize>,
    /// Runs per point instead of the plan's.
    pub runs: Option<u32>,
    /// Both agents stopped (SIGSTOP) while netperf runs.
    pub pause_agents: bool,
    /// eBPF program time per transaction (`kernel.bpf_stats_enabled` on
    /// for the run, restored after).
    pub bpf_stats: bool,
}

/// One measurement with its coordinates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub scenario: Scenario,
    pub path: DataPath,
    pub test: Test,
    pub services: usize,
    pub run: u32,
    pub data_port: u16,
    /// The CPU netperf and netserver were bound to (see `netperf::run_with`).
    pub cpu: Option<usize>,
    #[serde(flatten)]
    pub m: netperf::Measurement,
    /// The agents' CPU and riptide's eBPF time during this measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

/// What ran besides netperf during one measurement (see `probe`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Probe {
    /// Both agents' CPU µs per transaction (per KB for streams).
    pub agent_cpu_us_per_unit: f64,
    /// The agents' CPU µs over the measurement by thread name.
    pub agent_threads_us: std::collections::BTreeMap<String, u64>,
    /// The agents were stopped while netperf ran.
    pub agents_paused: bool,
    /// riptide's eBPF programs: ns and runs per transaction, by program
    /// (`--bpf-stats` only).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bpf_per_unit: std::collections::BTreeMap<String, (f64, f64)>,
    /// The whole machine's busy CPU µs per transaction (netperf's CPU
    /// figure counts the same) and its softirq part.
    #[serde(default)]
    pub machine_busy_us_per_unit: f64,
    #[serde(default)]
    pub softirq_us_per_unit: f64,
    /// The processes that used the most CPU over the measurement (µs), to
    /// tell the path's own work from whatever else ran (other builds).
    #[serde(default)]
    pub top_us: Vec<(String, u64)>,
}

struct Plan {
    counts: Vec<usize>,
    tests: Vec<Test>,
    runs: u32,
    seconds: u32,
    scenarios: Vec<Scenario>,
    /// Empty: every path.
    paths: Vec<DataPath>,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            // A smoke run (under 3 minutes with the micro benchmarks): the
            // cross-node scenarios only, one short run per point.
            Self {
                counts: vec![1, 1_000],
                tests: vec![Test::TcpRr, Test::TcpCrr],
                runs: 1,
                seconds: 1,
                scenarios: vec![Scenario::ClusterIp, Scenario::NodePort, Scenario::NetPol],
                paths: Vec::new(),
            }
        } else {
            Self {
                counts: vec![1, 1_000, 10_000],
                tests: vec![Test::TcpRr, Test::TcpCrr, Test::TcpStream, Test::UdpRr],
                // Many short runs rather than few long ones: the median of
                // interleaved runs is what survives a shared machine.
                runs: 6,
                seconds: 2,
                scenarios: Scenario::ALL.to_vec(),
                paths: Vec::new(),
            }
        }
    }

    /// Measurements of one path in one scenario over the whole run.
    fn per_path(&self) -> usize {
        self.counts.len() * self.runs as usize * self.tests.len()
    }

    /// Is `p` one of the selected paths of `s`, or the direct path one of
    /// them is compared with?
    fn wanted(&self, s: Scenario, p: DataPath) -> bool {
        self.paths.is_empty()
            || self.paths.contains(&p)
            || s.paths().iter().any(|q| self.paths.contains(q) && q.baseline(s) == Some(p))
    }

    /// (scenario, path) pairs measured at Service count `n`, rotated by
    /// `run` so that no path always runs first or last.
    fn order(&self, n: usize, run: u32) -> Vec<(Scenario, DataPath)> {
        let first = self.counts.first().copied().unwrap_or(1);
        let mut v: Vec<(Scenario, DataPath)> = self
            .scenarios
            .iter()
            .flat_map(|s| s.paths().iter().map(move |p| (*s, *p)))
            .filter(|(s, p)| self.wanted(*s, *p))
            .filter(|(s, p)| (s.per_count() && p.per_count()) || n == first)
            .collect();
        if !v.is_empty() {
            let k = run as usize % v.len();
            v.rotate_left(k);
        }
        v
    }
}

/// Hands out each measurement's data port from the pool of its path.
struct Ports {
    cluster: [std::vec::IntoIter<u16>; 2],
    node_port: [std::vec::IntoIter<u16>; 2],
    /// Direct paths and the baselines' ClusterIP ports: any port works.
    free: u16,
    /// The baselines' NodePorts: never one of riptide's.
    baseline_node_port: u16,
}

impl Ports {
    fn new(plan: &PortPlan) -> Self {
        Self {
            cluster: [
                plan.cluster.clone().into_iter(),
                plan.cluster.clone().into_iter(),
            ],
            node_port: [
                plan.node_port_remote.clone().into_iter(),
                plan.node_port_local.clone().into_iter(),
            ],
            free: 40_000,
            baseline_node_port: 32_010,
        }
    }

    fn next(&mut self, s: Scenario, p: DataPath) -> Result<u16> {
        let i = usize::from(!s.remote_server());
        Ok(match p {
            DataPath::RiptideSock | DataPath::RiptideTc => self.cluster[i]
                .next()
                .context("riptide's ClusterIP Service has too few data ports")?,
            DataPath::Riptide => self.node_port[i]
                .next()
                .context("riptide's NodePort Service has too few ports")?,
            DataPath::Iptables | DataPath::Nftables if s.is_nodeport() => {
                self.baseline_node_port += 1;
                ensure!(
                    self.baseline_node_port < 32_768,
                    "out of baseline NodePorts"
                );
                self.baseline_node_port
            }
            _ => {
                self.free += 1;
                self.free
            }
        })
    }
}

/// Where the client of `path` in `scenario` runs.
fn client(s: Scenario, p: DataPath) -> Client {
    if s.is_nodeport() {
        return Client::Outside;
    }
    match p {
        DataPath::Direct | DataPath::RiptideSock | DataPath::Riptide | DataPath::Policy => {
            Client::Pod
        }
        DataPath::RiptideTc => Client::PodNoCgroup,
        DataPath::DirectPlain | DataPath::Iptables | DataPath::Nftables => Client::Plain,
        DataPath::DirectNode => Client::Node1,
        DataPath::DirectSym => Client::Outside,
    }
}

/// What the client of `path` in `scenario` connects to.
fn target(t: &Topology, s: Scenario, p: DataPath, data_port: u16) -> Target {
    let (addr, control_port) = match p {
        DataPath::Direct | DataPath::DirectPlain | DataPath::DirectSym | DataPath::Policy => {
            (t.server(s), CONTROL_PORT)
        }
        DataPath::DirectNode => (t.cfg.node_ip(2), CONTROL_PORT),
        DataPath::RiptideSock | DataPath::RiptideTc => (t.cluster_ip(s), CONTROL_PORT),
        DataPath::Riptide | DataPath::Iptables | DataPath::Nftables if s.is_nodeport() => {
            (t.cfg.node_ip(1), topology::control_node_port(s, p))
        }
        DataPath::Riptide | DataPath::Iptables | DataPath::Nftables => (VIP, CONTROL_PORT),
    };
    Target {
        addr,
        control_port,
        data_port,
        local: (p == DataPath::DirectSym).then_some(topology::RETURN_VIA_NODE1_IP),
    }
}

pub fn run(opts: &Options) -> Result<()> {
    for tool in [
        "netperf",
        "netserver",
        "iptables-restore",
        "nft",
        "conntrack",
    ] {
        if which(tool).is_none() {
            bail!("{tool} not found: run `cargo xtask bench` (it installs the bench tools)");
        }
    }
    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("creating {}", opts.out_dir.display()))?;
    let mut plan = Plan::new(opts.quick);
    if !opts.scenarios.is_empty() {
        plan.scenarios = opts.scenarios.clone();
    }
    if !opts.tests.is_empty() {
        plan.tests = opts.tests.clone();
    }
    if !opts.counts.is_empty() {
        plan.counts = opts.counts.clone();
    }
    if let Some(r) = opts.runs {
        plan.runs = r.max(1);
    }
    plan.paths = opts.paths.clone();
    ensure!(
        plan.scenarios.iter().any(|s| s.paths().iter().any(|p| plan.wanted(*s, *p) && p.baseline(*s).is_some())),
        "no selected path is measured in the selected scenarios"
    );
    // Before the lab: a missing bpftool fails here, not after minutes.
    let bpf_stats = if opts.bpf_stats { Some(probe::BpfStats::enable()?) } else { None };
    let cfg = LabConfig {
        prefix: "rtbench".into(),
        nodes: 2,
        subnet: 250,
        bin_dir: opts.bin_dir.clone(),
        state_dir: opts.out_dir.join("lab"),
    };
    let started = Instant::now();
    eprintln!("==> bench lab: 2 nodes, control plane, agents, kubelets");
    let mut lab = Lab::up(cfg.clone())?;
    lab.start_cluster(Duration::from_secs(120))?;
    let port_plan = PortPlan::new(plan.per_path());
    let topo = topology::deploy(&mut lab, &port_plan)?;
    eprintln!(
        "==> netserver pods {} (node 2, ClusterIP {}) and {} (node 1, ClusterIP {}); client pod and plain pod {} on node 1 ({:.0} s)",
        topo.server_remote,
        topo.cip_remote,
        topo.server_local,
        topo.cip_local,
        topology::PLAIN_IP,
        started.elapsed().as_secs_f64()
    );
    if opts.hold {
        return hold(lab, &topo);
    }

    let mut samples = Vec::new();
    let mut failures = Vec::new();
    let outcome = measure(
        &lab,
        &plan,
        &topo,
        &port_plan,
        &Probes { pause_agents: opts.pause_agents, bpf: bpf_stats.as_ref() },
        started,
        &mut samples,
        &mut failures,
    );
    drop(bpf_stats);
    // What the agents' conntrack GC did over the run (its deletions are
    // per-connection work the measurements above may have paid for).
    for node in 1..=2 {
        if let Ok(v) = agent_status(lab.config(), node) {
            let g = &v["gc"];
            eprintln!(
                "==> node {node} GC: {} passes, last {:.1} ms, {} expired deleted, {} conntrack entries left",
                g["passes"], g["last_pass_ms"].as_f64().unwrap_or(0.0), g["expired_deleted"], g["conntrack_entries"]
            );
        }
    }
    let down = lab.down();
    // Whatever was measured is written, also when a measurement or the
    // teardown failed.
    let report = report::Report::new(
        samples,
        started.elapsed(),
        opts.quick,
        plan.runs,
        plan.seconds,
    )
    .failed(outcome.as_ref().err().map(|e| format!("{e:#}")))
    .with_failures(failures);
    report.write(&opts.out_dir)?;
    println!("{}", report.markdown());
    eprintln!(
        "results in {}/ (results.json, results.md, plot.svg) after {:.0} s",
        opts.out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    down?;
    outcome
}

/// Failed measurements tolerated before a run gives up.
const MAX_FAILURES: usize = 10;

/// What `measure` looks at besides netperf (`probe`).
struct Probes<'a> {
    pause_agents: bool,
    bpf: Option<&'a probe::BpfStats>,
}

/// Every measurement of `plan`, appended to `samples` as it completes.
#[allow(clippy::too_many_arguments)]
fn measure(
    lab: &Lab,
    plan: &Plan,
    topo: &Topology,
    port_plan: &PortPlan,
    probes: &Probes<'_>,
    started: Instant,
    samples: &mut Vec<Sample>,
    failures: &mut Vec<report::Failure>,
) -> Result<()> {
    let cfg = lab.config();
    let mut ports = Ports::new(port_plan);
    let total: usize = plan
        .counts
        .iter()
        .map(|n| plan.order(*n, 0).len() * plan.tests.len() * plan.runs as usize)
        .sum();
    let node1 = cfg.node_netns(1);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    for &n in &plan.counts {
        // Scenarios without Services (`netpol`) run at the first count only.
        if plan.order(n, 0).is_empty() {
            continue;
        }
        let t0 = Instant::now();
        set_riptide_fillers(lab, n.saturating_sub(1))?;
        eprintln!(
            "==> {n} Services (riptide's maps programmed in {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        for run in 0..plan.runs {
            // Every path of a run on the same CPU, the next run on the next.
            let cpu = Some(run as usize % cpus);
            for (s, path) in plan.order(n, run) {
                let data_ports = plan
                    .tests
                    .iter()
                    .map(|_| ports.next(s, path))
                    .collect::<Result<Vec<u16>>>()?;
                if path.is_baseline_rules() {
                    let measured = measured_service(topo, s, path, &plan.tests, &data_ports);
                    let all = kubeproxy::services_with(n, &measured, topo.server_remote);
                    install(path, &node1, &all)?;
                }
                if path == DataPath::Policy {
                    netpol::install(lab)?;
                }
                for (test, &dp) in plan.tests.iter().zip(&data_ports) {
                    flush_conntrack(&[&node1, &cfg.node_netns(2)]);
                    let cmd = topo.command(client(s, path), "netperf")?;
                    let agents = probe::agent_pids(cfg);
                    let threads0 = probe::agent_threads(&agents);
                    let machine0 = probe::Machine::read();
                    let bpf0 = probes.bpf.map(probe::BpfStats::read).transpose()?;
                    let paused = probes.pause_agents.then(|| probe::Paused::new(agents.clone()));
                    let result = netperf::run_with(
                        cmd,
                        &target(topo, s, path, dp),
                        *test,
                        plan.seconds,
                        cpu,
                    );
                    drop(paused);
                    let machine = probe::Machine::read();
                    let threads = probe::delta(&threads0, &probe::agent_threads(&agents));
                    let bpf = match (probes.bpf, bpf0) {
                        (Some(b), Some(b0)) => probe::prog_delta(&b0, &b.read()?),
                        _ => Default::default(),
                    };
                    let m = match result {
                        Ok(m) => m,
                        Err(e) => {
                            // One failed measurement does not end an
                            // hour-long run: it is reported (results.md
                            // lists every failure) and the point keeps the
                            // runs that worked. Too many and the run stops.
                            let what = format!(
                                "{} {} {} at {n} Services, run {}",
                                s.name(),
                                path.name(),
                                test.name(),
                                run + 1
                            );
                            eprintln!("!!! {what} failed: {e:#}");
                            failures.push(report::Failure {
                                scenario: s,
                                path,
                                test: *test,
                                services: n,
                                run,
                                data_port: dp,
                                error: format!("{e:#}"),
                            });
                            ensure!(
                                failures.len() <= MAX_FAILURES,
                                "{} measurements failed, the last: {what}: {e:#}",
                                failures.len()
                            );
                            continue;
                        }
                    };
                    let units = units(*test, &m, plan.seconds);
                    let pr = Probe {
                        agent_cpu_us_per_unit: threads.values().sum::<u64>() as f64 / units,
                        agents_paused: probes.pause_agents,
                        bpf_per_unit: bpf
                            .iter()
                            .map(|(k, v)| (k.clone(), (v.run_time_ns as f64 / units, v.run_cnt as f64 / units)))
                            .collect(),
                        agent_threads_us: threads,
                        machine_busy_us_per_unit: machine.busy_us.saturating_sub(machine0.busy_us) as f64 / units,
                        softirq_us_per_unit: machine.softirq_us.saturating_sub(machine0.softirq_us) as f64 / units,
                        top_us: machine0.top(&machine, 6),
                    };
                    eprintln!(
                        "[{:>4}/{total} {:>5.0}s] {:<15} {:<12} {:<10} {:>5} svc run {}: {:>9.1} {:<7} p50 {:>5} µs p99 {:>5} µs cpu {:>6.1} agents {:>5.2}{}",
                        samples.len() + 1,
                        started.elapsed().as_secs_f64(),
                        s.name(),
                        path.name(),
                        test.name(),
                        n,
                        run + 1,
                        m.throughput,
                        test.unit(),
                        m.p50_us,
                        m.p99_us,
                        m.cpu_us_per_unit,
                        pr.agent_cpu_us_per_unit,
                        probe_line(&pr)
                    );
                    samples.push(Sample {
                        scenario: s,
                        path,
                        test: *test,
                        services: n,
                        run,
                        data_port: dp,
                        cpu,
                        m,
                        probe: Some(pr),
                    });
                }
                if path.is_baseline_rules() {
                    uninstall(path, &node1)?;
                }
                if path == DataPath::Policy {
                    netpol::uninstall(lab)?;
                }
            }
        }
    }
    Ok(())
}

/// Transactions (KB for streams) one measurement did.
fn units(test: Test, m: &netperf::Measurement, seconds: u32) -> f64 {
    let u = match test {
        Test::TcpStream => m.throughput * 1e6 / 8.0 / 1024.0 * f64::from(seconds),
        Test::TcpCrr => netperf::crr_transactions(seconds) as f64,
        _ => m.throughput * f64::from(seconds),
    };
    u.max(1.0)
}

/// The probe's per-transaction numbers on one line: busy agent threads and
/// eBPF ns per transaction by program.
fn probe_line(p: &Probe) -> String {
    let mut s = String::new();
    if p.agents_paused {
        s.push_str(" (paused)");
    }
    for (k, us) in p.agent_threads_us.iter().filter(|(_, us)| **us >= 10_000) {
        s.push_str(&format!(" {k}={:.0}ms", *us as f64 / 1e3));
    }
    s.push_str(&format!(" | machine {:.0} µs/trans, softirq {:.0}; top", p.machine_busy_us_per_unit, p.softirq_us_per_unit));
    for (k, us) in p.top_us.iter().take(4) {
        s.push_str(&format!(" {k}={:.0}ms", *us as f64 / 1e3));
    }
    if !p.bpf_per_unit.is_empty() {
        let total: f64 = p.bpf_per_unit.values().map(|v| v.0).sum();
        s.push_str(&format!(" | ebpf {total:.0} ns/trans:"));
        for (k, (ns, runs)) in &p.bpf_per_unit {
            s.push_str(&format!(" {k} {ns:.0}ns/{runs:.1}"));
        }
    }
    s
}

/// `--hold`: the cluster stays up for measurements by hand until Ctrl-C.
fn hold(mut lab: Lab, t: &Topology) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let c = lab.config();
    eprintln!("bench cluster up; Ctrl-C tears it down. Namespaces:");
    eprintln!(
        "  client pod   {} (cgroup {})",
        t.pod_netns,
        t.pod_cgroup.display()
    );
    eprintln!(
        "  plain pod    {} ({})",
        t.plain_netns(),
        topology::PLAIN_IP
    );
    eprintln!(
        "  nodes        {} {} ({} {}), outside {}",
        c.node_netns(1),
        c.node_netns(2),
        c.node_ip(1),
        c.node_ip(2),
        c.outside_netns()
    );
    eprintln!(
        "  servers      {} (node 2), {} (node 1); ClusterIPs {} {}",
        t.server_remote, t.server_local, t.cip_remote, t.cip_local
    );
    eprintln!(
        "  NodePorts    control {} (→ node 2's pod), {} (→ node 1's pod)",
        topology::control_node_port(Scenario::NodePort, DataPath::Riptide),
        topology::control_node_port(Scenario::NodePortLocal, DataPath::Riptide)
    );
    let _ = rx.recv();
    lab.down()
}

/// Makes riptide hold `n` filler Services (real endpoints: the netserver
/// pod), and waits until node 1's agent has them and their endpoints in
/// its maps.
fn set_riptide_fillers(lab: &Lab, n: usize) -> Result<()> {
    if n > 0 {
        // A multi-document stream (as users apply it); kubectl sends one
        // request per object.
        let mut yaml = String::with_capacity(n * 160);
        for i in 0..n {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: filler-{i}, labels: {{bench: filler}}}}\nspec:\n  selector: {{app: netserver}}\n  ports: [{{port: 80, targetPort: {CONTROL_PORT}}}]\n"
            ));
        }
        topology::apply(lab, "fillers.yaml", &yaml)?;
    }
    // Every Service port of the cluster (the fillers have one each), as
    // programmed in node 1's maps (`riptide status`: service ports applied).
    let c = lab.config();
    let svcs = e2e::kubectl_json(lab, &["get", "services", "-A"])?;
    let want: usize = svcs["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|s| s["spec"]["ports"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    ensure!(
        want > n,
        "the cluster lists {want} Service ports, fewer than the {n} fillers"
    );
    e2e::eventually(Duration::from_secs(600), || {
        let v = agent_status(c, 1)?;
        let have = v["service_ports"].as_u64().unwrap_or(0) as usize;
        ensure!(have >= want, "{have}/{want} service ports in node 1's maps");
        Ok(())
    })?;
    // And their endpoints: the controller writes each filler's slice after
    // the Service is stored, at 10 000 Services a minute or more after the
    // last one, and the agents program each as it comes. Measuring before
    // that measures the control plane and the agents catching up (it made
    // the direct path's CPU per transaction grow with the Service count).
    if n > 0 {
        e2e::eventually(Duration::from_secs(900), || {
            let slices = e2e::kubectl_json(lab, &["get", "endpointslices", "-l", "bench=filler"])?;
            let have = slices["items"].as_array().map_or(0, |items| {
                items.iter().filter(|s| s["endpoints"].as_array().is_some_and(|e| !e.is_empty())).count()
            });
            ensure!(have >= n, "{have}/{n} filler Services have endpoints");
            Ok(())
        })?;
    }
    // Node 1's backends no longer changing over a few polls (2 s).
    let mut last: Option<u64> = None;
    let mut same = 0;
    e2e::eventually(Duration::from_secs(300), || {
        let b = agent_status(c, 1)?["backends"].as_u64().unwrap_or(0);
        same = if last == Some(b) { same + 1 } else { 0 };
        last = Some(b);
        ensure!(same >= 4, "node 1's agent still programming backends ({b})");
        Ok(())
    })
}

/// `riptide status -o json` of node `node`'s agent.
fn agent_status(c: &crate::lab::LabConfig, node: u32) -> Result<serde_json::Value> {
    let out = Command::new(c.bin_dir.join("riptide"))
        .arg("--socket")
        .arg(c.agent_socket(node))
        .args(["status", "-o", "json"])
        .output()?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("riptide status: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The Service the baseline rules of `path` in `scenario` measure: the
/// control port and `data_ports` on the VIP (and as NodePorts in the
/// NodePort scenarios), the scenario's server as the endpoint.
fn measured_service(
    t: &Topology,
    s: Scenario,
    path: DataPath,
    tests: &[Test],
    data_ports: &[u16],
) -> Vec<SvcPort> {
    let server = t.server(s);
    let np = |port: u16| s.is_nodeport().then_some(port);
    let mut ports = vec![SvcPort {
        name: "bench/netperf:control".into(),
        vip: VIP,
        proto: Proto::Tcp,
        port: CONTROL_PORT,
        node_port: np(topology::control_node_port(s, path)),
        endpoints: vec![(server, CONTROL_PORT)],
    }];
    for (t, p) in tests.iter().zip(data_ports) {
        ports.push(SvcPort {
            name: format!("bench/netperf:data-{p}"),
            vip: VIP,
            proto: if t.is_udp() { Proto::Udp } else { Proto::Tcp },
            port: *p,
            node_port: np(*p),
            endpoints: vec![(server, *p)],
        });
    }
    ports
}

fn install(path: DataPath, ns: &str, services: &[SvcPort]) -> Result<()> {
    match path {
        DataPath::Iptables => pipe(
            ns,
            "iptables-restore",
            &[],
            &kubeproxy::iptables_restore(services),
        ),
        DataPath::Nftables => pipe(ns, "nft", &["-f", "-"], &kubeproxy::nft_script(services)),
        _ => Ok(()),
    }
}

fn uninstall(path: DataPath, ns: &str) -> Result<()> {
    match path {
        // An empty nat table, as `iptables-restore` of a flushed ruleset.
        DataPath::Iptables => pipe(ns, "iptables-restore", &[], "*nat\nCOMMIT\n"),
        DataPath::Nftables => pipe(ns, "nft", &["delete", "table", "ip", "kube-proxy"], ""),
        _ => Ok(()),
    }
}

fn pipe(ns: &str, prog: &str, args: &[&str], input: &str) -> Result<()> {
    riptide_test_support::netns::pipe(ns, prog, args, input).with_context(|| format!("{prog} in {ns}"))
}

fn flush_conntrack(namespaces: &[&str]) {
    for ns in namespaces {
        if let Ok(mut cmd) = netns::command(ns, "conntrack") {
            let _ = cmd
                .arg("-F")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
