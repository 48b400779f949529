//! `riptide-bench`: the benchmarks behind `cargo xtask bench`.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use riptide_tests::bench::{DataPath, Options, Scenario, netperf::Test, run};

#[derive(Parser)]
#[command(name = "riptide-bench", version, about = "riptide benchmarks")]
struct Args {
    /// Smoke run: fewer points, shorter runs (under 3 minutes).
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and plot.svg go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Build the bench cluster, print where everything is and wait for
    /// Ctrl-C instead of measuring (to look at a path by hand).
    #[arg(long)]
    hold: bool,
    /// Measure only this scenario (repeatable): clusterip, clusterip-local,
    /// nodeport, nodeport-local, netpol, netpol-local.
    #[arg(long, value_parser = scenario)]
    scenario: Vec<Scenario>,
    /// Measure only this path (repeatable, e.g. riptide-tc, policy) and the
    /// direct path it is compared with.
    #[arg(long, value_parser = path)]
    path: Vec<DataPath>,
    /// Only this netperf test (repeatable): TCP_RR, TCP_CRR, TCP_STREAM,
    /// UDP_RR.
    #[arg(long, value_parser = test)]
    test: Vec<Test>,
    /// Only this Service count (repeatable; the full plan: 1, 1000, 10000).
    #[arg(long)]
    services: Vec<usize>,
    /// Runs per point instead of the plan's (6, `--quick` 1).
    #[arg(long)]
    runs: Option<u32>,
    /// Stop both agents (SIGSTOP) while netperf runs: what the agents'
    /// own work costs a path.
    #[arg(long)]
    pause_agents: bool,
    /// Time riptide's eBPF programs per transaction (turns
    /// kernel.bpf_stats_enabled on for the run; needs bpftool).
    #[arg(long)]
    bpf_stats: bool,
    /// Measure nothing: render results.md and plot.svg into --out again
    /// from the samples of an earlier run's results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    report: Option<PathBuf>,
}

/// The item of `all` called `name` (a clap value parser's error otherwise).
fn one_of<T: Copy, const N: usize>(all: [T; N], name_of: fn(T) -> &'static str, what: &str, name: &str) -> Result<T, String> {
    all.into_iter().find(|x| name_of(*x) == name).ok_or_else(|| {
        let names: Vec<_> = all.iter().map(|x| name_of(*x)).collect();
        format!("unknown {what} {name:?} (one of {})", names.join(", "))
    })
}

fn scenario(name: &str) -> Result<Scenario, String> {
    one_of(Scenario::ALL, Scenario::name, "scenario", name)
}

fn path(name: &str) -> Result<DataPath, String> {
    one_of(DataPath::ALL, DataPath::name, "path", name)
}

fn test(name: &str) -> Result<Test, String> {
    one_of(Test::ALL, Test::name, "test", name)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(json) = &args.report {
        let report = riptide_tests::bench::report::Report::load(json)?;
        std::fs::create_dir_all(&args.out)?;
        report.render(&args.out)?;
        println!("{}", report.markdown());
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating riptide-bench")?;
    // The bench lab lives under --out and hands paths below it to kubelets,
    // which take only absolute ones.
    let out_dir = std::path::absolute(&args.out).with_context(|| format!("resolving {}", args.out.display()))?;
    run(&Options {
        quick: args.quick,
        hold: args.hold,
        scenarios: args.scenario,
        paths: args.path,
        tests: args.test,
        counts: args.services,
        runs: args.runs,
        pause_agents: args.pause_agents,
        bpf_stats: args.bpf_stats,
        out_dir,
        bin_dir: exe.parent().context("no bin dir")?.to_path_buf(),
    })
}
