//! `riptide-netexec`: the test server pods run (agnhost netexec-compatible),
//! and with `--keepalive-client` the long-lived-connection client the
//! end-to-end suite drives over stdin/stdout; with `--probe` the
//! reachability client of the NetworkPolicy suite.
use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use riptide_tests::netexec::{Config, Probe, keepalive_client, probe_all, serve};

#[derive(Parser)]
#[command(name = "riptide-netexec", version, about = "agnhost-netexec-compatible test server")]
struct Args {
    /// HTTP port.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// UDP port (0 disables).
    #[arg(long, default_value_t = 8081)]
    udp_port: u16,
    /// SCTP port, served from a raw socket (0 disables; needs CAP_NET_RAW).
    #[arg(long, default_value_t = 0)]
    sctp_port: u16,
    /// Instead of serving: keep one HTTP/1.1 connection to ADDR open and
    /// send a GET per stdin line (a path), printing `ok <body>` per answer.
    #[arg(long, value_name = "ADDR")]
    keepalive_client: Option<SocketAddr>,
    /// Instead of serving: ask each target for its hostname (TCP: HTTP
    /// GET /hostname, UDP and SCTP: `hostname`) and print `<probe> ok <answer>` or
    /// `<probe> fail <error>` per target, in order.
    #[arg(long, num_args = 1.., value_name = "tcp|udp|sctp:IP:PORT[:TRIES]")]
    probe: Vec<Probe>,
    /// Bound of one probe attempt (connect and answer).
    #[arg(long, default_value_t = 1000)]
    probe_timeout_ms: u64,
    /// Probes in flight at once.
    #[arg(long, default_value_t = 8)]
    probe_parallel: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(target) = args.keepalive_client {
        return tokio::task::spawn_blocking(move || keepalive_client(target, std::io::stdin().lock(), std::io::stdout().lock())).await?;
    }
    if !args.probe.is_empty() {
        return probe_all(args.probe, Duration::from_millis(args.probe_timeout_ms), args.probe_parallel, std::io::stdout().lock()).await;
    }
    // As a pod's PID 1 the kernel ignores a SIGTERM nobody handles, so the
    // kubelet would wait out the grace period; agnhost (Go) exits on it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        served = serve(Config {
            http_port: args.http_port,
            udp_port: args.udp_port,
            sctp_port: args.sctp_port,
        }) => served,
        _ = term.recv() => Ok(()),
    }
}
