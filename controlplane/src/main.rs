//! `riptide-controlplane`: runs the control plane components.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use riptide_controlplane::{
    apiserver::{Config, Server, StorageConfig},
    components, credentials,
};

#[derive(Parser, Debug)]
#[command(name = "riptide-controlplane", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct ApiserverArgs {
    /// Data directory (database, PKI, tokens, kubeconfig).
    #[arg(long, default_value = "/var/lib/riptide/controlplane")]
    data_dir: PathBuf,
    /// Address to listen on (port 0 = pick one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Static token file (`token,user,uid,"groups"` lines); default: generated in the data dir.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// etcd endpoints (comma separated), e.g. http://127.0.0.1:2379; default: embedded store.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, default_value = "/riptide")]
    etcd_prefix: String,
    /// Extra DNS names / IPs for the serving certificate.
    #[arg(long = "tls-san", value_delimiter = ',')]
    tls_sans: Vec<String>,
    /// Serve plain HTTP (loopback testing only).
    #[arg(long)]
    insecure_http: bool,
    /// Server URL to write into the kubeconfig.
    #[arg(long)]
    advertise_url: Option<String>,
    /// Address the `kubernetes` Service's endpoints point pods at (default:
    /// the --advertise-url host if it is an IPv4 address, else --listen;
    /// none when that is loopback or unspecified).
    #[arg(long)]
    advertise_address: Option<std::net::Ipv4Addr>,
    /// Where to write the admin kubeconfig (default <data-dir>/admin.kubeconfig).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Revisions of history kept for watchers.
    #[arg(long, default_value_t = 1000)]
    history_revisions: u64,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 60)]
    bookmark_interval: u64,
    /// Connections served at once (more wait in the listen backlog).
    #[arg(long, default_value_t = riptide_controlplane::apiserver::Limits::default().max_connections)]
    max_connections: usize,
    /// Watches one user may hold open at once (429 beyond).
    #[arg(long, default_value_t = riptide_controlplane::apiserver::Limits::default().max_watches_per_user)]
    max_watches_per_user: usize,
    /// CIDRs Services may name in `spec.externalIPs` (comma separated).
    /// Empty (the default) denies external IPs, like upstream's
    /// DenyServiceExternalIPs admission plugin (CVE-2020-8554).
    #[arg(long, value_delimiter = ',', value_parser = |s: &str| riptide_cidr::parse("service-external-ip-cidrs", s))]
    service_external_ip_cidrs: Vec<ipnetwork::Ipv4Network>,
    /// Pod Security level (`level` or `level:version`, e.g.
    /// `restricted:latest`) enforced in namespaces without a
    /// `pod-security.kubernetes.io/enforce` label.
    #[arg(long, default_value = "privileged")]
    pod_security_default_enforce: riptide_controlplane::apiserver::pod_security::LevelVersion,
    /// Default Pod Security level for warnings (`Warning` headers).
    #[arg(long, default_value = "privileged")]
    pod_security_default_warn: riptide_controlplane::apiserver::pod_security::LevelVersion,
    /// Default Pod Security level for audit (logged: no audit log yet).
    #[arg(long, default_value = "privileged")]
    pod_security_default_audit: riptide_controlplane::apiserver::pod_security::LevelVersion,
    /// Namespaces Pod Security never judges (comma separated).
    #[arg(long, value_delimiter = ',')]
    pod_security_exempt_namespaces: Vec<String>,
    /// Users whose requests Pod Security never judges (comma separated).
    #[arg(long, value_delimiter = ',')]
    pod_security_exempt_users: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Kubernetes-compatible apiserver.
    Apiserver(ApiserverArgs),
    /// Apiserver + controllers + scheduler in one process.
    #[command(alias = "all-in-one")]
    ControlPlane {
        #[command(flatten)]
        api: ApiserverArgs,
        #[command(flatten)]
        controllers: components::ControllersArgs,
    },
    /// Deployment, ReplicaSet, EndpointSlice, node IPAM and lifecycle controllers.
    Controllers {
        #[command(flatten)]
        client: components::ClientArgs,
        #[command(flatten)]
        controllers: components::ControllersArgs,
    },
    /// The pod scheduler.
    Scheduler(components::ClientArgs),
    /// The node agent that runs pods as processes in network namespaces.
    Kubelet(components::KubeletArgs),
    /// Issue a node's kubelet kubeconfig and serving certificate from the
    /// control plane's CA.
    KubeletCredentials(components::KubeletCredentialsArgs),
    /// PID 1 of a pod's shared PID namespace (started by the kubelet).
    #[command(hide = true)]
    Pause,
    /// Undo what a stopped kubelet leaves on the node when its directory is
    /// about to go: the node mounts it made shared for pods' volumes
    /// (`mountPropagation`) and its pods' pinned mount namespaces.
    KubeletRelease {
        /// The stopped kubelet's `--root-dir`.
        #[arg(long)]
        root_dir: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    riptide_controlplane::init_tracing();
    let args = Args::parse();
    let (a, with_controllers) = match args.command {
        Command::Apiserver(a) => (a, None),
        Command::ControlPlane { api, controllers } => (api, Some(controllers)),
        Command::Controllers { client, controllers } => {
            let c = components::client(client.kubeconfig.as_ref()).await?;
            return Ok(components::controllers(c, &controllers).await?);
        }
        Command::Scheduler(client) => {
            let c = components::client(client.kubeconfig.as_ref()).await?;
            return Ok(components::scheduler(c).await?);
        }
        Command::Kubelet(k) => return Ok(components::kubelet(k).await?),
        Command::Pause => riptide_controlplane::kubelet::pause::run(),
        Command::KubeletRelease { root_dir } => {
            return Ok(riptide_controlplane::kubelet::mntns::release_all(&root_dir)?);
        }
        Command::KubeletCredentials(k) => {
            let files = components::kubelet_credentials(&k)?;
            println!("kubeconfig {}", files.kubeconfig.display());
            return Ok(());
        }
    };
    {
        {
            let data_dir = a.data_dir.clone();
            let mut cfg = Config::new(a.data_dir, a.listen);
            cfg.token_file = a.token_file;
            cfg.tls = !a.insecure_http;
            cfg.tls_sans = a.tls_sans;
            cfg.advertise_url = a.advertise_url;
            cfg.advertise_address = a.advertise_address;
            cfg.kubeconfig_path = a.kubeconfig;
            cfg.history_revisions = a.history_revisions;
            cfg.bookmark_interval = Duration::from_secs(a.bookmark_interval.max(1));
            cfg.limits.max_connections = a.max_connections;
            cfg.limits.max_watches_per_user = a.max_watches_per_user;
            cfg.admission.external_ip_cidrs = a.service_external_ip_cidrs;
            cfg.admission.pod_security = riptide_controlplane::apiserver::pod_security::PodSecurity {
                defaults: riptide_controlplane::apiserver::pod_security::Policy {
                    enforce: a.pod_security_default_enforce,
                    audit: a.pod_security_default_audit,
                    warn: a.pod_security_default_warn,
                },
                exempt_namespaces: a.pod_security_exempt_namespaces,
                exempt_users: a.pod_security_exempt_users,
            };
            if !a.etcd.is_empty() {
                cfg.storage = StorageConfig::Etcd { endpoints: a.etcd, prefix: a.etcd_prefix };
            }
            let handle = Server::start(cfg).await.context("starting apiserver")?;
            // Machine-readable lines for whoever started us (tests, the lab).
            println!("listening {}", handle.addr);
            println!("kubeconfig {}", handle.kubeconfig.display());
            if let Some(ctl) = with_controllers {
                // Each with its own identity (kubeadm's controller-manager.conf
                // and scheduler.conf); a plain-HTTP server has no CA to issue one.
                let (cm, sched) = match &handle.pki {
                    Some(pki) => {
                        let cm = data_dir.join("controller-manager.kubeconfig");
                        let sched = data_dir.join("scheduler.kubeconfig");
                        credentials::write_kubeconfig(pki, &handle.url, credentials::CONTROLLER_MANAGER_USER, &[], &cm)?;
                        credentials::write_kubeconfig(pki, &handle.url, credentials::SCHEDULER_USER, &[], &sched)?;
                        (cm, sched)
                    }
                    None => (handle.kubeconfig.clone(), handle.kubeconfig.clone()),
                };
                let cm = components::client(Some(&cm)).await?;
                let sched = components::client(Some(&sched)).await?;
                tokio::spawn(async move {
                    if let Err(e) = components::controllers_and_scheduler(cm, sched, &ctl).await {
                        tracing::error!(error = %e, "controllers");
                    }
                });
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = sigterm() => {}
            }
            handle.shutdown().await;
            Ok(())
        }
    }
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => futures_pending().await,
    }
}

async fn futures_pending() {
    std::future::pending::<()>().await;
}
