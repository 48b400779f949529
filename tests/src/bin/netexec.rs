//! `riptide-netexec`: the test server pods run (agnhost netexec-compatible),
//! and with `--keepalive-client` the long-lived-connection client the
//! end-to-end suite drives over stdin/stdout.
use std::net::SocketAddr;

use clap::Parser;
use riptide_tests::netexec::{Config, keepalive_client, serve};

#[derive(Parser)]
#[command(name = "riptide-netexec", version, about = "agnhost-netexec-compatible test server")]
struct Args {
    /// HTTP port.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// UDP port (0 disables).
    #[arg(long, default_value_t = 8081)]
    udp_port: u16,
    /// Instead of serving: keep one HTTP/1.1 connection to ADDR open and
    /// send a GET per stdin line (a path), printing `ok <body>` per answer.
    #[arg(long, value_name = "ADDR")]
    keepalive_client: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(target) = args.keepalive_client {
        return tokio::task::spawn_blocking(move || keepalive_client(target, std::io::stdin().lock(), std::io::stdout().lock())).await?;
    }
    serve(Config {
        http_port: args.http_port,
        udp_port: args.udp_port,
    })
    .await
}
