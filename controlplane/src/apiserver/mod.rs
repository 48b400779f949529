//! A Kubernetes-compatible apiserver: REST over HTTPS with JSON,
//! discovery, OpenAPI v3 (enough for kubectl), Tables, watch, patches,
//! garbage collection, Service IP/port allocation, authentication (tokens,
//! client certificates, ServiceAccount JWTs), RBAC, and the limits that keep
//! one client from taking it down.
//!
//! Start it in-process with [`Server::start`]; the returned handle knows
//! the bound address and the admin kubeconfig it wrote.

pub mod admission;
pub mod allocator;
pub mod api;
pub mod authn;
pub mod authz;
pub mod bootstrap_policy;
pub mod defaults;
pub mod discovery;
pub mod escalation;
pub mod gc;
pub mod handlers;
pub mod limits;
pub mod node_authz;
pub mod object;
pub mod openapi;
pub mod patch;
pub mod pod_security;
pub mod protobuf;
pub mod proxy;
pub mod rbac;
pub mod reviews;
pub mod selectors;
pub mod status;
pub mod table;
pub mod tls;
pub mod validation;
pub mod watch;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch as tokio_watch},
    task::JoinHandle,
};

pub use self::{api::Api, limits::Limits, proxy::PodProxy};
use crate::storage::{EmbeddedStore, EtcdStore, Store, StorageError};

/// Which store to use.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    /// redb file `<data_dir>/state.redb`.
    Embedded,
    /// etcd v3 endpoints, keys under `prefix`.
    Etcd { endpoints: Vec<String>, prefix: String },
}

#[derive(Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Bearer tokens file; when None, `<data_dir>/tokens.csv` is created
    /// with a random admin token.
    pub token_file: Option<PathBuf>,
    /// Serve HTTPS (default). Plain HTTP is for loopback tests only.
    pub tls: bool,
    /// Extra names/IPs for the serving certificate.
    pub tls_sans: Vec<String>,
    /// Server URL written into the kubeconfig (default: from the bound address).
    pub advertise_url: Option<String>,
    /// The address the `kubernetes` Service's endpoints name (kube-apiserver's
    /// `--advertise-address`; default: the advertised URL's host if it is an
    /// IPv4 address, else the bound address).
    pub advertise_address: Option<std::net::Ipv4Addr>,
    /// Kubeconfig path (default `<data_dir>/admin.kubeconfig`).
    pub kubeconfig_path: Option<PathBuf>,
    pub storage: StorageConfig,
    /// Revisions of change history kept for watchers.
    pub history_revisions: u64,
    pub bookmark_interval: Duration,
    pub pod_proxy: Option<Arc<dyn PodProxy>>,
    pub limits: Limits,
    /// Configurable admission rules (`externalIPs` allow list).
    pub admission: admission::Admission,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            token_file: None,
            tls: true,
            tls_sans: Vec::new(),
            advertise_url: None,
            advertise_address: None,
            kubeconfig_path: None,
            storage: StorageConfig::Embedded,
            history_revisions: 1000,
            bookmark_interval: Duration::from_secs(60),
            pod_proxy: None,
            limits: Limits::default(),
            admission: admission::Admission::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("creating data directory {path}: {source}")]
    DataDir { path: PathBuf, #[source] source: std::io::Error },
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, #[source] source: std::io::Error },
    #[error("opening storage: {0}")]
    Storage(#[from] StorageError),
    #[error("credentials: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("initialising the API: {0}")]
    Init(#[from] status::ApiError),
}

/// A running apiserver.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub token: String,
    pub ca_pem: Option<String>,
    /// The cluster CA (TLS servers only): issues client certificates.
    pub pki: Option<Arc<tls::Pki>>,
    pub api: Arc<Api>,
    shutdown: tokio_watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// Stop accepting, close connections and background tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Wait until the server stops (it only stops through `shutdown`).
    pub async fn wait(mut self) {
        if let Some(t) = self.tasks.pop() {
            let _ = t.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct Server;

impl Server {
    pub async fn start(config: Config) -> Result<ServerHandle, ServerError> {
        let dir = config.data_dir.clone();
        // Database, keys, tokens and kubeconfigs live here: owner-only.
        tls::create_private_dir(&dir).map_err(|source| ServerError::DataDir { path: dir.clone(), source })?;
        let store: Arc<dyn Store> = match &config.storage {
            StorageConfig::Embedded => {
                let path = dir.join("state.redb");
                let h = config.history_revisions;
                Arc::new(
                    tokio::task::spawn_blocking(move || EmbeddedStore::open(&path, h))
                        .await
                        .map_err(|e| StorageError::Task(e.to_string()))??,
                )
            }
            StorageConfig::Etcd { endpoints, prefix } => {
                Arc::new(EtcdStore::connect(endpoints, prefix, config.history_revisions).await?)
            }
        };
        tracing::info!(storage = store.name(), "storage ready");
        let api = Api::new(store, config.admission.clone()).await?;
        authz::ensure_bootstrap_policy(&api).await?;

        let token_file = match &config.token_file {
            Some(p) => p.clone(),
            None => {
                let p = dir.join("tokens.csv");
                tls::ensure_token_file(&p)?;
                p
            }
        };
        let tokens = authn::load_token_file(&token_file).map_err(tls::TlsError::from)?;
        // The admin kubeconfig carries the first cluster-admin token.
        let token = tokens
            .iter()
            .find(|(_, u)| u.groups.iter().any(|g| g == authn::MASTERS))
            .or(tokens.first())
            .map(|(t, _)| t.clone())
            .unwrap_or_default();
        let pki_dir = dir.join("pki");
        tls::create_private_dir(&pki_dir).map_err(|source| ServerError::DataDir { path: pki_dir.clone(), source })?;
        let (sa_private, sa_public) = tls::Pki::service_account_key(&pki_dir)?;
        let sa_tokens = authn::ServiceAccountTokens::new(&sa_private, &sa_public)
            .map_err(|e| tls::TlsError::Pem(format!("service account key: {e}")))?;

        let listener = TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
        let scheme = if config.tls { "https" } else { "http" };
        let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let url = config.advertise_url.clone().unwrap_or_else(|| format!("{scheme}://{host}:{}", addr.port()));

        let (acceptor, pki) = if config.tls {
            let mut sans = config.tls_sans.clone();
            sans.push(addr.ip().to_string());
            let pki = tls::ensure_pki(&pki_dir, &sans)?;
            let cfg = tls::server_config(&pki)?;
            (Some(tokio_rustls::TlsAcceptor::from(cfg)), Some(Arc::new(pki)))
        } else {
            (None, None)
        };
        let ca_pem = pki.as_ref().map(|p| p.ca_pem.clone());
        // The identity this apiserver presents to kubelets (re-issued at
        // each start, like the serving certificate; held in memory only).
        let kubelet_tls = match &pki {
            Some(pki) => {
                let cert = pki.issue_client_cert(tls::KUBELET_CLIENT_USER, &[])?;
                Some(tls::client_config(&pki.ca_pem, &cert)?)
            }
            None => None,
        };
        let kubeconfig = config.kubeconfig_path.clone().unwrap_or_else(|| dir.join("admin.kubeconfig"));
        tls::write_kubeconfig(&kubeconfig, &tls::kubeconfig(&url, ca_pem.as_deref(), &token))?;

        let authz = authz::Authorizer::new();
        let state = Arc::new(handlers::AppState {
            api: api.clone(),
            authn: authn::Authenticator::new(tokens, Some(sa_tokens)),
            authz: authz.clone(),
            limits: config.limits.clone(),
            watches: limits::WatchBudget::new(config.limits.max_watches_per_user),
            proxy: config.pod_proxy.clone().unwrap_or_else(|| Arc::new(proxy::KubeletProxy::new(kubelet_tls))),
            bookmark_interval: config.bookmark_interval,
            server_address: format!("{host}:{}", addr.port()),
        });
        let app = Router::new().fallback(handlers::handle).with_state(state);
        let (shutdown, shutdown_rx) = tokio_watch::channel(false);
        let gc = tokio::spawn(gc::run(api.clone()));
        let mut tasks = vec![gc, tokio::spawn(authz.watch(api.clone()))];
        let endpoint = match config.advertise_address {
            Some(ip) => Some((ip, addr.port())),
            None => kubernetes_endpoint(&url, addr),
        };
        match endpoint {
            Some((ip, port)) => tasks.push(tokio::spawn(publish_kubernetes_endpoints(api.clone(), ip, port))),
            None => tracing::info!(%url, "the kubernetes Service gets no endpoints: the apiserver's address is not one pods can reach (loopback or unspecified); set --advertise-url"),
        }
        tasks.push(tokio::spawn(serve(listener, acceptor, app, config.limits.clone(), shutdown_rx)));
        tracing::info!(%addr, %url, kubeconfig = %kubeconfig.display(), "apiserver listening");
        Ok(ServerHandle { addr, url, kubeconfig, token, ca_pem, pki, api, shutdown, tasks })
    }
}

/// The address pods reach this apiserver at: the advertised URL's host
/// when it is an IPv4 literal, else the bound address; None when that is
/// loopback or unspecified (kube-apiserver refuses those as well).
fn kubernetes_endpoint(url: &str, bound: SocketAddr) -> Option<(std::net::Ipv4Addr, u16)> {
    let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or_default();
    let from_url = authority.rsplit_once(':').and_then(|(h, p)| Some((h.parse::<std::net::Ipv4Addr>().ok()?, p.parse::<u16>().ok()?)));
    let (ip, port) = match (from_url, bound) {
        (Some(x), _) => x,
        (None, SocketAddr::V4(a)) => (*a.ip(), a.port()),
        (None, SocketAddr::V6(_)) => return None,
    };
    (!ip.is_loopback() && !ip.is_unspecified()).then_some((ip, port))
}

/// kube-apiserver's endpoint reconciler, every 10 s: the `kubernetes`
/// Service's endpoints are this apiserver.
async fn publish_kubernetes_endpoints(api: Arc<Api>, ip: std::net::Ipv4Addr, port: u16) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut failing = false;
    loop {
        tick.tick().await;
        match api.publish_kubernetes_endpoints(ip, port).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e.message, "publishing the kubernetes Service's endpoints (retrying every 10 s)");
            }
            Err(_) => {}
        }
    }
}

/// Serves `app` on `listener` (TLS when `acceptor` is set, each request
/// carrying its connection's client-certificate identity as an
/// [`authn::Connection`]) within `limits`, until `shutdown`. The kubelet's
/// API is served the same way.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: Limits,
    mut shutdown: tokio_watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    // At the cap the loop stops accepting: new clients wait in the kernel's
    // listen backlog instead of costing a task and buffers each.
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s,
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slot else { break };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        conns.spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // hyper only enforces the header-read timeout with a timer set.
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            builder.http2().timer(TokioTimer::new());
            let result = match acceptor {
                Some(acc) => match tokio::time::timeout(limits.tls_handshake_timeout, acc.accept(sock)).await {
                    Ok(Ok(tls)) => {
                        // rustls verified the chain to the cluster CA; the leaf names the user.
                        let cert_user = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| authn::cert_user(c.as_ref()));
                        let svc = with_connection(app, authn::Connection { cert_user });
                        builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "tls handshake timed out");
                        return;
                    }
                },
                None => builder.serve_connection_with_upgrades(TokioIo::new(sock), with_connection(app, authn::Connection::default())).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
}

/// The app as a hyper service whose requests carry `conn`.
fn with_connection(
    app: Router,
    conn: authn::Connection,
) -> TowerToHyperService<impl tower::Service<axum::http::Request<hyper::body::Incoming>, Response = axum::response::Response, Error = std::convert::Infallible, Future: Send> + Clone> {
    TowerToHyperService::new(tower::ServiceExt::map_request(app, move |mut r: axum::http::Request<hyper::body::Incoming>| {
        r.extensions_mut().insert(conn.clone());
        r
    }))
}

/// Path of the kubeconfig a server started on `data_dir` writes by default.
pub fn default_kubeconfig(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.kubeconfig")
}

#[cfg(test)]
mod tests {
    use super::kubernetes_endpoint;

    #[test]
    fn kubernetes_endpoint_is_a_reachable_ipv4_address() {
        let bound = "0.0.0.0:6443".parse().unwrap();
        assert_eq!(kubernetes_endpoint("https://198.18.0.1:6443", bound), Some(("198.18.0.1".parse().unwrap(), 6443)));
        assert_eq!(kubernetes_endpoint("https://198.18.0.1:7443/", bound), Some(("198.18.0.1".parse().unwrap(), 7443)));
        assert_eq!(kubernetes_endpoint("https://127.0.0.1:6443", bound), None, "loopback");
        assert_eq!(kubernetes_endpoint("https://api.example:6443", bound), None, "a name, bound to 0.0.0.0");
        assert_eq!(
            kubernetes_endpoint("https://api.example:6443", "10.0.0.5:6443".parse().unwrap()),
            Some(("10.0.0.5".parse().unwrap(), 6443)),
            "a name: the bound address"
        );
        assert_eq!(kubernetes_endpoint("https://[::1]:6443", "[::1]:6443".parse().unwrap()), None);
    }
}
