//! `riptide-grpc-health`: the gRPC health server probe tests run as a pod,
//! after agnhost's `grpc-health-checking`: grpc.health.v1 `Health` on
//! `--port`, reporting SERVING for `--service` (and for "", the server as a
//! whole) until told otherwise over HTTP on `--http-port`:
//! `/make-not-serving` and `/make-serving` set both statuses.
use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use axum::{Router, extract::State, routing::get};
use clap::Parser;
use tonic_health::{ServingStatus, server::HealthReporter};

#[derive(Parser)]
#[command(name = "riptide-grpc-health", version, about = "grpc.health.v1 server with an HTTP switch")]
struct Args {
    /// gRPC port.
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// HTTP port of /make-serving and /make-not-serving.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// The service name the health status is reported for (besides "").
    #[arg(long, default_value = "")]
    service: String,
}

#[derive(Clone)]
struct Switch {
    reporter: HealthReporter,
    service: String,
}

impl Switch {
    async fn set(&self, status: ServingStatus) -> String {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(&self.service, status).await;
        eprintln!("health: {status}");
        format!("{status}\n")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (reporter, health) = tonic_health::server::health_reporter();
    let switch = Switch { reporter, service: args.service };
    switch.set(ServingStatus::Serving).await;
    let http = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, args.http_port))
        .await
        .with_context(|| format!("binding HTTP port {}", args.http_port))?;
    let router = Router::new()
        .route("/make-serving", get(|State(s): State<Switch>| async move { s.set(ServingStatus::Serving).await }))
        .route("/make-not-serving", get(|State(s): State<Switch>| async move { s.set(ServingStatus::NotServing).await }))
        .with_state(switch);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, router).await {
            eprintln!("serving HTTP: {e}");
        }
    });
    // As a pod's PID 1 the kernel ignores a SIGTERM nobody handles; stop
    // at once as a Go gRPC server would instead of waiting out the grace.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing SIGTERM handler")?;
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_shutdown(SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port)), async move {
            term.recv().await;
        })
        .await
        .context("serving gRPC")
}
