//! `riptide-agent`: one per node. Loads and pins the node's datapath, then
//! keeps its maps, routes and podCIDR file in step with the cluster until
//! SIGTERM/SIGINT. Pinned maps and links stay, so a restart keeps flows.
use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use ipnetwork::Ipv4Network;
use riptide_agent::agent::{self, Config};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(name = "riptide-agent", version, about)]
struct Args {
    /// Name of this node (its Node object; pins live under /sys/fs/bpf/riptide/<node>/).
    #[arg(long, env = "RIPTIDE_NODE_NAME")]
    node_name: String,
    /// kubeconfig to reach the apiserver. Default: KUBECONFIG, ~/.kube/config,
    /// then in-cluster config; with none of them the agent runs the datapath only.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's address (default: the Node's InternalIP).
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// The cluster's pod range; routes are only ever written inside it.
    #[arg(long, default_value = "10.42.0.0/16", value_parser = |s: &str| riptide_cidr::parse("cluster-cidr", s))]
    cluster_cidr: Ipv4Network,
    /// The cluster's Service range; never accepted as an externalIP or
    /// LoadBalancer address.
    #[arg(long, default_value = "10.43.0.0/16", value_parser = |s: &str| riptide_cidr::parse("service-cidr", s))]
    service_cidr: Ipv4Network,
    /// Answer ARP on --uplink for LoadBalancer and external IPs, one node
    /// per Service chosen by a Lease (Cilium's L2 announcements).
    #[arg(long)]
    l2_announcements: bool,
    /// Seconds an L2 announcement Lease outlives its last renewal before
    /// another node takes over.
    #[arg(long, default_value_t = 10)]
    l2_lease_duration_s: u64,
    /// Unix socket of the local API (the `riptide` CLI). Default: /run/riptide/<node>/agent.sock
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:9962")]
    metrics_addr: String,
    /// File the node's podCIDR is written to for the CNI (`podCIDRFile`).
    /// Default: /run/riptide/<node>/podcidr
    #[arg(long)]
    pod_cidr_file: Option<PathBuf>,
    /// Handle only Services labelled service.kubernetes.io/service-proxy-name=<this>
    /// (default: only Services without the label, like kube-proxy).
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// cgroup v2 directory to attach socket load balancing to (e.g. the node's cgroup).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Uplink interface for NodePort/externalIP/SNAT tc programs.
    #[arg(long)]
    uplink: Option<String>,
    /// Do not program routes to other nodes' podCIDRs.
    #[arg(long)]
    no_routes: bool,
    /// Reach other nodes' pods through an overlay instead of routes via
    /// their addresses: `vxlan` (device riptide.vxlan on --uplink; for nodes
    /// not on one L2 segment). Default: native routing.
    #[arg(long, value_parser = ["vxlan"])]
    tunnel: Option<String>,
    /// VXLAN network identifier (--tunnel vxlan).
    #[arg(long, default_value_t = riptide_agent::tunnel::DEFAULT_VNI)]
    vxlan_vni: u32,
    /// VXLAN UDP port (--tunnel vxlan).
    #[arg(long, default_value_t = riptide_agent::tunnel::DEFAULT_PORT)]
    vxlan_port: u16,
    /// Do not masquerade pod traffic leaving the cluster range.
    #[arg(long)]
    no_masquerade: bool,
    /// Source address of hairpin flows (a pod reaching itself through a Service).
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_ip: Ipv4Addr,
    /// Address healthCheckNodePort servers bind (default: all).
    #[arg(long)]
    health_bind: Option<Ipv4Addr>,
    /// Quiet time (ms) that ends a batch of cluster changes.
    #[arg(long, default_value_t = 5)]
    debounce_ms: u64,
    /// Longest (ms) a batch keeps collecting under constant churn.
    #[arg(long, default_value_t = 100)]
    max_batch_ms: u64,
    /// Seconds between conntrack/NAT/affinity GC passes.
    #[arg(long, default_value_t = 30)]
    ct_gc_interval_s: u64,
    /// Idle seconds after which a TCP conntrack/NAT entry is deleted.
    #[arg(long, default_value_t = 21_600)]
    ct_tcp_timeout_s: u64,
    /// Idle seconds after which a TCP entry that saw a FIN or RST is deleted.
    #[arg(long, default_value_t = 10)]
    ct_tcp_close_timeout_s: u64,
    /// Idle seconds after which a UDP (or other) conntrack/NAT entry is deleted.
    #[arg(long, default_value_t = 60)]
    ct_udp_timeout_s: u64,
    /// Load and pin the datapath, then exit.
    #[arg(long)]
    once: bool,
    /// Write at most this many backends per Service port (0: no cap). A
    /// Service with more is cut (ready endpoints first), gets a
    /// BackendsTruncated Event and shows in `riptide status`.
    #[arg(long, default_value_t = 0)]
    max_backends_per_service: usize,
    /// Seconds the apiserver may be unreachable before the watch counts as
    /// stale (not ready; the maps keep serving).
    #[arg(long, default_value_t = 30)]
    stale_after_s: u64,
    /// kube-proxy's node health server (/healthz, /livez) for load
    /// balancers ("off" to disable).
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: String,
    /// Seconds a cluster change may wait for a sync before /healthz says 503.
    #[arg(long, default_value_t = 60)]
    health_timeout_s: u64,
    /// Seconds between counts of every map's entries (map pressure).
    #[arg(long, default_value_t = 10)]
    map_sample_interval_s: u64,
    /// Map capacities for maps this start creates, `name=entries,…` (e.g.
    /// `rt_ct4_v3=1048576,rt_be4_v1=131072`; `riptide map list` shows the
    /// names and sizes). Pinned maps keep theirs.
    #[arg(long, default_value = "")]
    map_sizes: String,
    /// Backend selection of Services without the
    /// `service.riptide.io/lb-algorithm` annotation: `maglev` (Maglev on
    /// NodePort, externalIP and LoadBalancer frontends) or `random`.
    #[arg(long, default_value = "maglev")]
    lb_algorithm: riptide_agent::lb_algorithm::Name,
    /// Maglev table size, the same on every node: 251, 1021, 4093, 16381
    /// or 65521 (≥ 100× a Service's backends for ≈ 1 % imbalance).
    #[arg(long, default_value = "16381")]
    maglev_table_size: riptide_datapath::maglev::TableSize,
    /// How outside clients of NodePort, externalIP and LoadBalancer
    /// frontends reach a backend on another node, for Services without the
    /// `service.riptide.io/lb-mode` annotation: `snat` (the reply returns
    /// through the entry node) or `dsr` (Direct Server Return: the backend
    /// sees the client and answers it directly; native routing only).
    #[arg(long, default_value = "snat")]
    lb_mode: riptide_agent::lb_mode::Name,
    /// XDP NodePort acceleration on --uplink: native (generic if the driver
    /// cannot), generic or disabled (the default, see `XdpSetting`). From a
    /// ConfigMap dir, changes of its `xdp` key apply live.
    #[arg(long, default_value = "disabled")]
    xdp: riptide_datapath::xdp::XdpSetting,
    /// Without a podCIDR from cluster IPAM for this many seconds, claim a
    /// /24 of --cluster-cidr on the own Node (0: never; see podcidr.rs).
    #[arg(long, default_value_t = 0)]
    pod_cidr_fallback_after: u64,
}

fn main() -> anyhow::Result<()> {
    riptide_agent::memory::configure_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    // `install-cni` / `uninstall` (install.rs); else the agent, with its
    // settings optionally from a ConfigMap dir (config_dir.rs).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(sub) = riptide_agent::install::Subcommand::from_argv(&argv) {
        return sub.unwrap_or_else(|e| e.exit()).run().await.context("riptide-agent");
    }
    let xdp_watch = riptide_agent::config_dir::dir(&argv).map(|d| d.join("xdp"));
    let a = Args::parse_from(riptide_agent::config_dir::expand(argv).context("--config-dir")?);
    if a.once {
        let dp = riptide_datapath::Datapath::load(&riptide_datapath::Pinning::Node(a.node_name.clone()))
            .with_context(|| format!("loading datapath for node {}", a.node_name))?;
        tracing::info!(node = %a.node_name, pins = ?dp.pin_dir(), "datapath loaded");
        return Ok(());
    }
    let run_dir = PathBuf::from("/run/riptide").join(&a.node_name);
    let metrics_addr = match a.metrics_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--metrics-addr {s}"))?),
    };
    let mut map_sizes = riptide_datapath::MapSizes::default();
    for item in a.map_sizes.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = item.split_once('=').with_context(|| format!("--map-sizes {item}: expected name=entries"))?;
        let n: u32 = n.trim().parse().with_context(|| format!("--map-sizes {item}: entries is not a number"))?;
        map_sizes.set(name.trim(), n).with_context(|| format!("--map-sizes {item}"))?;
    }
    let healthz_addr = match a.healthz_addr.as_str() {
        "off" | "" => None,
        s => Some(s.parse::<SocketAddr>().with_context(|| format!("--healthz-addr {s}"))?),
    };
    let tunnel = match a.tunnel.as_deref() {
        Some("vxlan") => {
            anyhow::ensure!(a.uplink.is_some(), "--tunnel vxlan needs --uplink (the device the vxlan packets leave through)");
            anyhow::ensure!(!a.no_routes, "--tunnel vxlan and --no-routes exclude each other");
            Some(riptide_agent::tunnel::VxlanConfig { vni: a.vxlan_vni, port: a.vxlan_port })
        }
        _ => None,
    };
    let l2 = if a.l2_announcements {
        let uplink = a.uplink.clone().context("--l2-announcements needs --uplink (the device to answer ARP on)")?;
        let lease_duration = Duration::from_secs(a.l2_lease_duration_s.max(2));
        Some(riptide_agent::l2announce::Config { uplink, lease_duration, renew_every: (lease_duration / 5).max(Duration::from_secs(1)) })
    } else {
        None
    };
    let cfg = Config {
        tunnel,
        kubeconfig: a.kubeconfig,
        node_ip: a.node_ip,
        cluster_cidr: a.cluster_cidr,
        service_cidr: a.service_cidr,
        l2_announce: l2,
        api_socket: a.api_socket.unwrap_or_else(|| run_dir.join("agent.sock")),
        metrics_addr,
        pod_cidr_file: a.pod_cidr_file.unwrap_or_else(|| run_dir.join("podcidr")),
        proxy_name: a.service_proxy_name,
        lb: riptide_agent::lb_algorithm::Defaults {
            algorithm: a.lb_algorithm,
            maglev_table_size: a.maglev_table_size,
            lb_mode: a.lb_mode.0,
        },
        xdp: a.xdp,
        xdp_watch,
        cgroup: a.cgroup,
        uplink: a.uplink,
        routes: !a.no_routes,
        masquerade: !a.no_masquerade,
        hairpin_ip: a.hairpin_ip,
        health_bind: a.health_bind,
        debounce: Duration::from_millis(a.debounce_ms),
        max_batch: Duration::from_millis(a.max_batch_ms),
        pod_cidr_fallback_after: (a.pod_cidr_fallback_after > 0).then(|| Duration::from_secs(a.pod_cidr_fallback_after)),
        gc: riptide_agent::gc::GcConfig {
            interval: Duration::from_secs(a.ct_gc_interval_s.max(1)),
            tcp_timeout: Duration::from_secs(a.ct_tcp_timeout_s),
            tcp_close_timeout: Duration::from_secs(a.ct_tcp_close_timeout_s),
            other_timeout: Duration::from_secs(a.ct_udp_timeout_s),
            ..riptide_agent::gc::GcConfig::default()
        },
        max_backends_per_service: (a.max_backends_per_service > 0).then_some(a.max_backends_per_service),
        stale_after: Duration::from_secs(a.stale_after_s.max(1)),
        healthz_addr,
        health_timeout: Duration::from_secs(a.health_timeout_s.max(1)),
        map_sample_interval: Duration::from_secs(a.map_sample_interval_s.max(1)),
        map_sizes,
        node_name: a.node_name,
    };
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    agent::run(cfg, shutdown).await.context("riptide-agent")?;
    Ok(())
}
