//! Command-line entry points of the workload components (`scheduler`,
//! `controllers`, `kubelet`, and the controllers+scheduler half of
//! `control-plane`), kept out of main.rs so it stays a dispatcher.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use kube::{Client, config::{KubeConfigOptions, Kubeconfig}};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, #[source] source: kube::config::KubeconfigError },
    #[error("building API client: {0}")]
    Client(#[from] kube::Error),
    #[error("{0}")]
    Controllers(#[from] crate::controllers::Error),
    #[error("{0}")]
    Kubelet(#[from] crate::kubelet::Error),
    #[error("invalid argument: {0}")]
    Arg(String),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("credentials: {0}")]
    Credentials(#[from] crate::apiserver::tls::TlsError),
}

/// Client from `path`, or the default chain (KUBECONFIG, in-cluster).
pub async fn client(path: Option<&PathBuf>) -> Result<Client, Error> {
    let Some(path) = path else { return Ok(Client::try_default().await?) };
    let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
    Ok(Client::try_from(cfg)?)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ControllersArgs {
    /// Pod range; each node gets one /24 of it.
    #[arg(long, default_value = "10.42.0.0/16", value_parser = crate::controllers::nodeipam::parse_cluster_cidr)]
    pub cluster_cidr: ipnetwork::Ipv4Network,
    /// A node whose kubelet is silent this long becomes NotReady/Unknown.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub node_monitor_grace_period: Duration,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct KubeletArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub node_name: String,
    /// The node's InternalIP; the kubelet's HTTP endpoint listens on it.
    #[arg(long)]
    pub node_ip: String,
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
    /// The kubelet API's serving certificate (PEM), signed by the cluster CA
    /// for --node-ip (`riptide-controlplane kubelet-credentials` issues it).
    #[arg(long)]
    pub tls_cert_file: PathBuf,
    #[arg(long)]
    pub tls_private_key_file: PathBuf,
    /// CA whose client certificates authenticate to the kubelet API (the
    /// apiserver's); other clients need a bearer token the apiserver accepts.
    #[arg(long)]
    pub client_ca_file: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's cgroup (pods get pod-<uid> under it).
    #[arg(long)]
    pub cgroup_root: PathBuf,
    /// Pod state and logs.
    #[arg(long, default_value = "/var/lib/riptide/kubelet")]
    pub root_dir: PathBuf,
    /// First container restart back-off (doubles up to 5m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub restart_backoff: Duration,
    /// Node lease renewal period.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Extra node labels, k=v, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// Taints to register with, key=value:Effect, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Vec<String>,
    /// Capacity overrides (default: the machine's).
    #[arg(long)]
    pub cpu: Option<String>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// Nameservers of ClusterFirst pods (the cluster DNS Service), comma
    /// separated or repeated.
    #[arg(long, value_delimiter = ',', default_value = "10.43.0.10")]
    pub cluster_dns: Vec<IpAddr>,
    /// The cluster's DNS domain: pods search `<ns>.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The node's resolver configuration, for `Default` pods and the
    /// search domains appended for ClusterFirst; "" for none.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// Image → binaries map (`image = /dir | pause | host` lines, see
    /// `kubelet::image`); default: pause images sleep, others run `command`
    /// from the node's filesystem.
    #[arg(long)]
    pub image_map: Option<PathBuf>,
    /// Resolve `hostPath` volumes under this directory (a per-node root, as
    /// kind's node containers have), except below --host-path-shared.
    #[arg(long)]
    pub host_path_root: Option<PathBuf>,
    /// hostPath prefixes that stay the machine's own under --host-path-root.
    #[arg(long, value_delimiter = ',', default_value = "/proc,/sys,/dev,/run/netns,/var/run/netns")]
    pub host_path_shared: Vec<PathBuf>,
    /// `FROM=TO,…`: a hostPath at or below FROM is that place below TO
    /// (before --host-path-root and --host-path-shared), e.g. a lab node's
    /// own cgroup for /sys/fs/cgroup.
    #[arg(long, value_delimiter = ',', value_parser = parse_path_map)]
    pub host_path_map: Vec<(PathBuf, PathBuf)>,
    /// Paths hidden from every pod that is not `privileged` (an empty
    /// read-only tmpfs over a directory, /dev/null over a file), besides
    /// the kubelet's own --root-dir, --kubeconfig and TLS files: the
    /// control plane's data directory, admin kubeconfigs. Comma separated or repeated.
    #[arg(long, value_delimiter = ',')]
    pub mask_path: Vec<PathBuf>,
    /// How long the kubelet API reuses a TokenReview answer (a revoked
    /// token keeps working this long).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub authentication_token_webhook_cache_ttl: Duration,
    /// How long an allowing SubjectAccessReview answer is reused.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub authorization_webhook_cache_authorized_ttl: Duration,
    /// How long a denying SubjectAccessReview answer is reused.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub authorization_webhook_cache_unauthorized_ttl: Duration,
}

fn parse_path_map(s: &str) -> Result<(PathBuf, PathBuf), String> {
    match s.split_once('=') {
        Some((from, to)) if from.starts_with('/') && to.starts_with('/') => Ok((from.into(), to.into())),
        _ => Err(format!("{s:?}: expected /from=/to")),
    }
}

/// `riptide-controlplane kubelet-credentials`: a node's kubelet identity
/// and serving certificate from a control plane's CA.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeletCredentialsArgs {
    /// The control plane's data directory (its CA is `pki/ca.{crt,key}`).
    #[arg(long, default_value = "/var/lib/riptide/controlplane")]
    pub data_dir: PathBuf,
    /// The apiserver URL written into the kubeconfig.
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub node_name: String,
    /// The node's InternalIP (the serving certificate's address).
    #[arg(long)]
    pub node_ip: String,
    /// Where to write kubelet.kubeconfig, kubelet.{crt,key} and ca.crt.
    #[arg(long)]
    pub out_dir: PathBuf,
}

pub fn kubelet_credentials(a: &KubeletCredentialsArgs) -> Result<crate::credentials::KubeletFiles, Error> {
    let pki = crate::apiserver::tls::Pki::load(&a.data_dir.join("pki"))?;
    Ok(crate::credentials::write_kubelet(&pki, &a.server, &a.node_name, &a.node_ip, &a.out_dir)?)
}

fn read_file(path: &PathBuf) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })
}

/// `10s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub async fn controllers(client: Client, a: &ControllersArgs) -> Result<(), Error> {
    let cfg = crate::controllers::Config {
        cluster_cidr: a.cluster_cidr,
        node_monitor_grace: a.node_monitor_grace_period,
        ..Default::default()
    };
    crate::controllers::run(client, cfg).await?;
    Ok(())
}

pub async fn scheduler(client: Client) -> Result<(), Error> {
    crate::scheduler::run(client).await;
    Ok(())
}

/// Controllers and scheduler together (what `control-plane` adds to the
/// apiserver), each with its own client.
pub async fn controllers_and_scheduler(controllers_client: Client, scheduler_client: Client, a: &ControllersArgs) -> Result<(), Error> {
    let (c, ()) = tokio::join!(controllers(controllers_client, a), crate::scheduler::run(scheduler_client));
    c
}

pub async fn kubelet(a: KubeletArgs) -> Result<(), Error> {
    let client = client(a.client.kubeconfig.as_ref()).await?;
    // The CA pods get as ca.crt: the one this kubelet trusts.
    let cluster_ca = match &a.client.kubeconfig {
        Some(path) => match Kubeconfig::read_from(path) {
            Ok(kc) => kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.ok(),
            Err(_) => None,
        },
        None => kube::Config::infer().await.ok(),
    }
    .and_then(|c| c.root_cert)
    .map(|ders| crate::kubelet::pem_bundle(&ders));
    let mut labels = BTreeMap::new();
    for l in a.node_labels.iter().filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once('=').ok_or_else(|| Error::Arg(format!("node label {l:?} is not k=v")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let taints = a
        .register_with_taints
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| crate::kubelet::node::parse_taint(t).ok_or_else(|| Error::Arg(format!("taint {t:?} is not key=value:Effect"))))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = crate::kubelet::server::ServingTls {
        cert_pem: read_file(&a.tls_cert_file)?,
        key_pem: read_file(&a.tls_private_key_file)?,
        client_ca_pem: read_file(&a.client_ca_file)?,
    };
    let masked_paths = [Some(&a.root_dir), a.client.kubeconfig.as_ref(), Some(&a.tls_cert_file), Some(&a.tls_private_key_file)]
        .into_iter()
        .flatten()
        .chain(&a.mask_path)
        .cloned()
        .collect();
    let cfg = crate::kubelet::Config {
        node_name: a.node_name,
        node_ip: a.node_ip,
        port: a.port,
        tls,
        root_dir: a.root_dir,
        cgroup_root: a.cgroup_root,
        cni_conf_dir: a.cni_conf_dir,
        cni_bin_dir: a.cni_bin_dir,
        backoff_base: a.restart_backoff,
        heartbeat: a.heartbeat_interval,
        node_labels: labels,
        register_taints: taints,
        cpu: a.cpu,
        memory: a.memory,
        max_pods: a.max_pods,
        cluster_dns: a.cluster_dns,
        cluster_domain: a.cluster_domain.trim_end_matches('.').to_string(),
        resolv_conf: (!a.resolv_conf.as_os_str().is_empty()).then_some(a.resolv_conf),
        image_map: a.image_map.as_deref().map(crate::kubelet::image::ImageMap::load).transpose()?.unwrap_or_default(),
        host_path_root: a.host_path_root,
        host_path_shared: a.host_path_shared,
        host_path_map: a.host_path_map,
        masked_paths,
        cluster_ca_pem: cluster_ca.filter(|c| !c.is_empty()),
        auth_cache: crate::kubelet::auth::CacheTtls {
            token: a.authentication_token_webhook_cache_ttl,
            allowed: a.authorization_webhook_cache_authorized_ttl,
            denied: a.authorization_webhook_cache_unauthorized_ttl,
        },
    };
    crate::kubelet::run(client, cfg).await?;
    Ok(())
}
