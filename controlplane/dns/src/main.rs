//! riptide-dns: cluster DNS server (Kubernetes DNS-Based Service Discovery).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use riptide_dns::{
    Config, forward,
    records::{PodRecords, Zone},
};
use tracing_subscriber::EnvFilter;

/// Serves the cluster zone from the API server's Services and
/// EndpointSlices and forwards every other name upstream.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kubeconfig of the API server to watch (default: in-cluster config,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// UDP and TCP address to serve DNS on.
    #[arg(long, default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// HTTP address for /metrics, /healthz and /ready.
    #[arg(long, default_value = "0.0.0.0:9153")]
    metrics: SocketAddr,
    /// The cluster zone.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Upstream resolver for names outside the zone, IP or IP:PORT
    /// (repeatable; default: the nameservers of --resolv-conf).
    #[arg(long = "upstream", value_parser = forward::parse_upstream)]
    upstreams: Vec<SocketAddr>,
    /// Where the default upstreams come from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// TTL (seconds) of the zone's records.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Total time (milliseconds) a forwarded question may take over all
    /// upstreams before the client gets SERVFAIL.
    #[arg(long, default_value_t = 2000)]
    upstream_timeout: u64,
    /// Threads serving UDP, each on its own socket (default: one per CPU
    /// this process may use).
    #[arg(long)]
    udp_workers: Option<usize>,
    /// Records `a-b-c-d.<ns>.pod.<zone>`.
    #[arg(long, value_enum, default_value = "insecure")]
    pod_records: PodRecords,
}

fn main() -> Result<()> {
    one_malloc_arena();
    tokio::runtime::Runtime::new().context("starting the tokio runtime")?.block_on(serve())
}

/// glibc gives every thread that allocates its own arena (up to 8 per
/// core), each holding freed memory of its own. riptide-dns allocates
/// little once the index is built, and the UDP threads' cache hits not
/// at all, so one arena costs no contention and saves its RSS.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: called before any other thread exists; M_ARENA_MAX only
    // bounds how many arenas later allocations may create.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

async fn serve() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // hickory-server logs every request at info.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn")),
        )
        .init();
    let args = Args::parse();
    let zone = Zone::new(&args.cluster_domain, args.ttl, args.pod_records)?;
    let upstreams = if args.upstreams.is_empty() {
        forward::from_resolv_conf(&args.resolv_conf, args.listen).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no upstream resolvers: names outside the zone get SERVFAIL");
            Vec::new()
        })
    } else {
        args.upstreams
    };
    let client = client(args.kubeconfig.as_deref()).await?;
    let udp_workers = args.udp_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let cfg = Config {
        listen: args.listen,
        metrics: args.metrics,
        zone,
        upstreams,
        upstream_timeout: Duration::from_millis(args.upstream_timeout),
        udp_workers,
    };
    riptide_dns::run(client, cfg, shutdown()).await?;
    Ok(())
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let cfg = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no in-cluster config and no kubeconfig")?,
    };
    kube::Client::try_from(cfg).context("building the API client")
}

/// SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
