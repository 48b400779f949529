//! riptide-dns: cluster DNS per the Kubernetes DNS-Based Service Discovery
//! specification 1.1.0, served with hickory-server from an index that
//! watches of Services and EndpointSlices keep current.
//!
//! - [`index`]: the compact record index, changed in place per event.
//! - [`records`]: question → answer over the index (the spec's records,
//!   NXDOMAIN versus NODATA).
//! - [`handler`]: what each request is answered with (EDNS, forwarding);
//!   hickory-server's request handler for TCP.
//! - [`udp`]: UDP serving, a thread per core; [`cache`]: its answer cache;
//!   [`batch`]: its recvmmsg/sendmmsg batches.
//! - [`forward`]: upstream resolvers and the forwarding cache.
//! - [`watch`]: the watches feeding the index.
//! - [`metrics`]: Prometheus metrics, `/healthz`, `/ready`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
pub mod cache;
pub mod forward;
pub mod handler;
pub mod index;
pub mod metrics;
pub mod records;
pub mod udp;
pub mod watch;

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hickory_server::Server;
use tokio::net::TcpListener;

use crate::{
    forward::Forwarder,
    handler::Handler,
    index::Index,
    metrics::{Metrics, Readiness},
    records::Zone,
    udp::Udp,
};

/// Idle TCP connections are closed after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Entries in the forwarding cache.
const CACHE_CAPACITY: usize = 10_000;
/// Entries in the UDP answer cache: every Service name of a 10,000-Service
/// cluster with room for other questions; ~150 bytes each.
const ANSWER_CACHE_CAPACITY: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the UDP threads: {0}")]
    Threads(#[source] std::io::Error),
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
    /// Threads (and sockets) serving UDP.
    pub udp_workers: usize,
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
    let udp = udp::bind(cfg.listen, cfg.udp_workers).map_err(|e| bind("udp", e))?;
    let tcp = TcpListener::bind(cfg.listen).await.map_err(|e| bind("tcp", e))?;
    let http = TcpListener::bind(cfg.metrics).await.map_err(|source| Error::Bind { proto: "tcp", addr: cfg.metrics, source })?;

    let forwarder = Forwarder::new(cfg.upstreams.clone(), cfg.upstream_timeout, CACHE_CAPACITY, metrics.clone());
    let handler = Arc::new(Handler::new(index.clone(), cfg.zone.clone(), forwarder, metrics.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let udp_threads = udp::spawn(&Arc::new(Udp::new(handler.clone(), ANSWER_CACHE_CAPACITY)), udp, &tokio::runtime::Handle::current(), &stop)
        .map_err(Error::Threads)?;
    let mut server = Server::new(handler::Tcp(handler));
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    tracing::info!(
        listen = %cfg.listen,
        metrics = %cfg.metrics,
        zone = %cfg.zone.name(),
        upstreams = ?cfg.upstreams,
        ttl = cfg.zone.ttl(),
        udp_workers = udp_threads.len(),
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
    // The UDP threads see the flag within their receive timeout; they
    // hold nothing that needs a clean stop, so they are not joined.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    http_task.abort();
    for w in watches {
        w.abort();
    }
    result
}
