//! The apiserver benchmark of `cargo xtask bench` (see `bench.rs` for what it
//! measures), printed as JSON on stdout:
//!
//! ```text
//! cargo build --release -p riptide-controlplane --bins
//! cargo run --release -p riptide-controlplane --example apiserver_bench -- [--quick|--tiny] [--out FILE]
//! ```
mod bench;
mod error;
mod processes;

use std::path::PathBuf;

use anyhow::Context as _;
use bench::BenchOptions;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "apiserver_bench", about)]
struct Args {
    /// 1k pods and fewer samples (about half a minute) instead of 10k.
    #[arg(long)]
    quick: bool,
    /// 60 pods, 6 watchers: proves every measurement runs (seconds, even
    /// with debug binaries); the numbers mean nothing.
    #[arg(long, conflicts_with = "quick")]
    tiny: bool,
    /// The riptide-controlplane binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    riptide_controlplane::init_tracing();
    let args = Args::parse();
    let bin = match args.server_bin {
        Some(b) => b,
        None => processes::find_server_bin()?,
    };
    let mut opts = BenchOptions::new(args.quick, bin);
    if args.tiny {
        opts = BenchOptions { pods: 60, concurrency: 8, watch_samples: 5, fanout_watchers: 6, fanout_events: 10, ..opts };
    }
    let report = bench::run_with(&opts).await?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{json}");
    Ok(())
}
