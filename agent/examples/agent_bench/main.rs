//! The agent benchmark as a program: prints one JSON report.
//!
//! ```text
//! cargo build --release -p riptide-agent -p riptide-controlplane --bins --examples
//! sudo target/release/examples/agent_bench [--quick] [--services N] [--samples N]
//!     [--iptables-runs N] [--baseline-agent PATH]
//! sudo target/release/examples/agent_bench --policy [--quick] [--samples N]
//! ```
//! `--policy`: NetworkPolicy programming latency at 1,000 policies / 5,000
//! pods (`policy`) instead of the Service part.
//! The binaries are looked up next to the example (or set
//! `RIPTIDE_AGENT_BIN` / `RIPTIDE_CONTROLPLANE_BIN`).
mod bench;
mod policy;

use anyhow::Context as _;
use bench::{Options, run_with};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| -> anyhow::Result<Option<usize>> {
        match args.iter().position(|a| a == flag) {
            Some(i) => Ok(Some(args.get(i + 1).with_context(|| format!("{flag} needs a value"))?.parse()?)),
            None => Ok(None),
        }
    };
    if args.iter().any(|a| a == "--policy") {
        let mut opts = policy::PolicyOptions::new(quick);
        if let Some(n) = value("--samples")? {
            opts.samples = n;
        }
        let report = policy::run(&opts, quick).context("agent NetworkPolicy benchmark")?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut opts = Options::new(quick);
    if let Some(n) = value("--services")? {
        opts.services = n;
    }
    if let Some(n) = value("--samples")? {
        opts.latency_samples = n;
    }
    if let Some(n) = value("--iptables-runs")? {
        opts.iptables_runs = n;
    }
    if let Some(i) = args.iter().position(|a| a == "--baseline-agent") {
        opts.baseline_agent = Some(args.get(i + 1).context("--baseline-agent needs a path")?.into());
    }
    let report = run_with(&opts, quick).context("agent benchmark")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
