//! riptide's companion control plane.
//!
//! - [`apiserver`]: the Kubernetes-compatible API server.
//! - [`storage`]: the storage trait with the embedded (redb) and etcd engines.
//! - [`registry`]: the served resources, described once.
//! - [`exec`]: `kubectl exec` — the WebSocket channel protocol (kubelet side) and the apiserver's upgrade proxy.
//! - [`credentials`]: each component's own certificate identity, issued by the cluster CA.
//! - [`lb_pools`]: LoadBalancer address pools, read by LB IPAM and by Service admission.
//!
//! The scheduler, controllers and kubelet will live next to these modules.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apiserver;
pub mod credentials;
pub mod exec;
pub mod lb_pools;
pub mod registry;
pub mod storage;

// Workloads: scheduler, controllers, kubelet.
pub mod components;
pub mod controllers;
pub mod kubelet;
pub mod scheduler;

/// Logs to stderr at `RUST_LOG`'s filter (`info` when unset), the way every
/// control-plane binary and benchmark starts.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}
