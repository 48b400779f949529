//! riptide-dns: cluster DNS per the Kubernetes DNS-Based Service Discovery
//! specification 1.1.0, served with hickory-server from an index that
//! watches of Services and EndpointSlices keep current.
//!
//! - [`index`]: the compact record index, changed in place per event.
//! - [`records`]: question → answer over the index (the spec's records,
//!   NXDOMAIN versus NODATA).
//! - [`handler`]: hickory-server's request handler (EDNS, forwarding).
//! - [`forward`]: upstream resolvers and the forwarding cache.
//! - [`watch`]: the watches feeding the index.
//! - [`metrics`]: Prometheus metrics, `/healthz`, `/ready`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod forward;
pub mod handler;
pub mod index;
pub mod metrics;
pub mod records;
pub mod watch;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

use crate::{
    forward::Forwarder,
    handler::Handler,
    index::Index,
    metrics::{Metrics, Readiness},
    records::Zone,
};

/// Idle TCP connections are closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Entries in the forwarding cache.
const CACHE_CAPACITY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS server stopped: {0}")]
    Server(#[source] hickory_server::net::NetError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What [`run`] serves.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub zone: Zone,
    pub upstreams: Vec<SocketAddr>,
    pub upstream_timeout: Duration,
}

/// Binds the DNS (UDP + TCP) and metrics listeners, starts the watches and
/// serves until `shutdown` completes.
pub async fn run(client: kube::Client, cfg: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let metrics = Metrics::new();
    let ready = Readiness::default();
    // The SOA serial starts at the wall clock so a restarted server's
    // serial does not go back.
    let serial = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| u32::try_from(d.as_secs()).unwrap_or(1));
    let index = Arc::new(RwLock::new(Index::new(serial)));

    let bind = |proto, source| Error::Bind { proto, addr: cfg.listen, source };
    let udp = UdpSocket::bind(cfg.listen).await.map_err(|e| bind("udp", e))?;
    let tcp = TcpListener::bind(cfg.listen).await.map_err(|e| bind("tcp", e))?;
    let http = TcpListener::bind(cfg.metrics).await.map_err(|source| Error::Bind { proto: "tcp", addr: cfg.metrics, source })?;

    let forwarder = Forwarder::new(cfg.upstreams.clone(), cfg.upstream_timeout, CACHE_CAPACITY, metrics.clone());
    let handler = Handler::new(index.clone(), cfg.zone.clone(), forwarder, metrics.clone());
    let mut server = Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    tracing::info!(
        listen = %cfg.listen,
        metrics = %cfg.metrics,
        zone = %cfg.zone.name(),
        upstreams = ?cfg.upstreams,
        ttl = cfg.zone.ttl(),
        "serving DNS"
    );

    let http_task = tokio::spawn({
        let (metrics, ready) = (metrics.clone(), ready.clone());
        async move {
            if let Err(e) = metrics::serve(http, metrics, ready).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        }
    });
    let watches = watch::start(&client, &index, &metrics, &ready);

    let result = tokio::select! {
        r = server.block_until_done() => r.map_err(Error::Server),
        () = shutdown => {
            tracing::info!("shutting down");
            server.shutdown_gracefully().await.map_err(Error::Server)
        }
    };
    http_task.abort();
    for w in watches {
        w.abort();
    }
    result
}
