//! `healthCheckNodePort` servers for Services with
//! `externalTrafficPolicy: Local`: HTTP 200 while this node has a ready local
//! endpoint, 503 otherwise, so an external load balancer only sends traffic
//! to nodes that can serve it without a second hop. The body matches
//! kube-proxy's (`{"service":{…},"localEndpoints":n,…}`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

use crate::model::{HealthCheck, Owner};

struct Server {
    state: watch::Sender<(Owner, usize)>,
    task: JoinHandle<()>,
}

/// The running health-check listeners, by port.
#[derive(Default)]
pub struct HealthServers {
    bind_ip: Option<Ipv4Addr>,
    servers: BTreeMap<u16, Server>,
}

impl HealthServers {
    /// Listeners bind `bind_ip` (default 0.0.0.0: every node address).
    pub fn new(bind_ip: Option<Ipv4Addr>) -> Self {
        Self { bind_ip, servers: BTreeMap::new() }
    }

    /// Starts, updates and stops listeners to match `checks`. A port that
    /// cannot be bound is logged and tried again on the next update.
    pub async fn update(&mut self, checks: &BTreeMap<Owner, HealthCheck>) {
        let wanted: BTreeMap<u16, &HealthCheck> = checks.values().map(|h| (h.port, h)).collect();
        let gone: Vec<u16> = self.servers.keys().filter(|p| !wanted.contains_key(p)).copied().collect();
        for port in gone {
            if let Some(s) = self.servers.remove(&port) {
                s.task.abort();
                tracing::info!(port, "health check server stopped");
            }
        }
        for (port, hc) in wanted {
            let value = (hc.owner.clone(), hc.local_endpoints);
            if let Some(s) = self.servers.get(&port) {
                s.state.send_if_modified(|cur| {
                    let changed = *cur != value;
                    *cur = value.clone();
                    changed
                });
                continue;
            }
            let addr = SocketAddr::from((self.bind_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(port, owner = %hc.owner, error = %e, "cannot listen for healthCheckNodePort");
                    continue;
                }
            };
            let (tx, rx) = watch::channel(value);
            let app = Router::new().fallback(answer).with_state(rx);
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::warn!(port, error = %e, "health check server failed");
                }
            });
            tracing::info!(port, owner = %hc.owner, local_endpoints = hc.local_endpoints, "health check server started");
            self.servers.insert(port, Server { state: tx, task });
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for s in self.servers.values() {
            s.task.abort();
        }
    }
}

async fn answer(State(rx): State<watch::Receiver<(Owner, usize)>>) -> impl IntoResponse {
    let (owner, n) = rx.borrow().clone();
    let (namespace, name) = match &owner {
        Owner::Service { namespace, name } | Owner::Pod { namespace, name } => (namespace.to_string(), name.to_string()),
    };
    let code = if n > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        code,
        Json(json!({
            "service": {"namespace": namespace, "name": name},
            "localEndpoints": n,
            "serviceProxyHealthy": true,
        })),
    )
}

/// The node's own health as kube-proxy serves it on `--healthz-bind-address`
/// (`:10256`), for load balancers that health-check nodes rather than
/// Services (`pkg/proxy/healthcheck/proxier_health.go`).
///
/// `/healthz` and `/livez` answer `{"lastUpdated": …, "currentTime": …,
/// "nodeEligible": …}` (times in RFC 3339). Healthy means the run loop is
/// keeping up: the first full sync is done and no change has waited longer
/// than `timeout` for a sync pass to finish (kube-proxy's
/// `healthTimeout`). A Service whose write fails does not count against it
/// (the pass finishes and every other Service is served), nor does an
/// unreachable apiserver (the maps keep serving the last view; readiness
/// says so instead). `/healthz` is also 503 when the node is not eligible
/// for load-balancer traffic (being deleted, or tainted
/// `ToBeDeletedByClusterAutoscaler`, KEP-3836); `/livez` ignores that.
#[derive(Debug)]
pub struct NodeHealth {
    timeout: std::time::Duration,
    state: std::sync::Mutex<NodeHealthState>,
}

#[derive(Debug, Clone, Copy)]
struct NodeHealthState {
    synced: bool,
    last_updated: Option<std::time::SystemTime>,
    /// The oldest change not yet handled by a finished pass.
    queued_since: Option<std::time::SystemTime>,
    eligible: bool,
}

impl NodeHealth {
    pub fn new(timeout: std::time::Duration) -> Self {
        Self {
            timeout,
            state: std::sync::Mutex::new(NodeHealthState { synced: false, last_updated: None, queued_since: None, eligible: true }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut NodeHealthState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// A change arrived (kube-proxy's `QueuedUpdate`).
    pub fn queued(&self) {
        self.with(|s| {
            s.queued_since.get_or_insert_with(std::time::SystemTime::now);
        });
    }

    /// A pass finished; `synced` once the first full sync is done
    /// (kube-proxy's `Updated`).
    pub fn updated(&self, synced: bool) {
        self.with(|s| {
            s.synced |= synced;
            s.last_updated = Some(std::time::SystemTime::now());
            s.queued_since = None;
        });
    }

    /// Whether the own Node may receive load-balancer traffic.
    pub fn set_eligible(&self, eligible: bool) {
        self.with(|s| s.eligible = eligible);
    }

    /// (healthy ignoring eligibility, eligible, JSON body) at `now`.
    pub fn report(&self, now: std::time::SystemTime) -> (bool, bool, String) {
        let s = self.with(|s| *s);
        let late = s.queued_since.is_some_and(|q| now.duration_since(q).unwrap_or_default() > self.timeout);
        let healthy = s.synced && !late;
        let ts = |t: std::time::SystemTime| {
            let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            k8s_openapi::jiff::Timestamp::new(i64::try_from(d.as_secs()).unwrap_or(0), i32::try_from(d.subsec_nanos()).unwrap_or(0))
                .map_or_else(|_| String::new(), |t| t.to_string())
        };
        let body = json!({
            "lastUpdated": s.last_updated.map(ts).unwrap_or_default(),
            "currentTime": ts(now),
            "nodeEligible": s.eligible,
        });
        (healthy, s.eligible, body.to_string())
    }
}

async fn node_healthz(State(h): State<std::sync::Arc<NodeHealth>>) -> impl IntoResponse {
    let (healthy, eligible, body) = h.report(std::time::SystemTime::now());
    let code = if healthy && eligible { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [("content-type", "application/json"), ("x-content-type-options", "nosniff")], body)
}

async fn node_livez(State(h): State<std::sync::Arc<NodeHealth>>) -> impl IntoResponse {
    let (healthy, _, body) = h.report(std::time::SystemTime::now());
    let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [("content-type", "application/json"), ("x-content-type-options", "nosniff")], body)
}

/// Serves `/healthz` and `/livez` of `health` on `addr` (kube-proxy's
/// `:10256`).
pub async fn serve_node_health(addr: SocketAddr, health: std::sync::Arc<NodeHealth>) -> std::io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/healthz", axum::routing::get(node_healthz))
        .route("/livez", axum::routing::get(node_livez))
        .with_state(health);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(%addr, error = %e, "node health server failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    fn get(port: u16) -> (u16, serde_json::Value) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        let code = buf[9..12].parse().unwrap();
        let body = buf.split("\r\n\r\n").nth(1).unwrap();
        (code, serde_json::from_str(body).unwrap())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_200_with_local_endpoints_and_503_without() {
        let port = free_port();
        let owner = Owner::service("ns", "web");
        let mut hs = HealthServers::new(Some(Ipv4Addr::LOCALHOST));
        let mut checks = BTreeMap::from([(owner.clone(), HealthCheck { port, owner: owner.clone(), local_endpoints: 2 })]);
        hs.update(&checks).await;
        let (code, body) = tokio::task::spawn_blocking(move || get(port)).await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(body["localEndpoints"], 2);
        assert_eq!(body["service"]["name"], "web");

        checks.get_mut(&owner).unwrap().local_endpoints = 0;
        hs.update(&checks).await;
        let (code, body) = tokio::task::spawn_blocking(move || get(port)).await.unwrap();
        assert_eq!(code, 503);
        assert_eq!(body["localEndpoints"], 0);

        hs.update(&BTreeMap::new()).await;
        assert!(hs.ports().is_empty());
        // The listener is gone once the task is aborted.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn node_health_follows_kube_proxy_semantics() {
        use std::time::{Duration, SystemTime};
        let h = NodeHealth::new(Duration::from_secs(60));
        let t0 = SystemTime::now();
        let (healthy, eligible, body) = h.report(t0);
        assert!(!healthy && eligible, "unhealthy before the first sync: {body}");
        h.queued();
        h.updated(true);
        let (healthy, _, body) = h.report(t0 + Duration::from_secs(1));
        assert!(healthy, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')), "{v}");
        assert!(v["currentTime"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        assert_eq!(v["nodeEligible"], true);
        // Quiet for long is fine; a change waiting past the timeout is not.
        assert!(h.report(t0 + Duration::from_secs(3600)).0);
        h.queued();
        assert!(h.report(SystemTime::now() + Duration::from_secs(30)).0);
        assert!(!h.report(SystemTime::now() + Duration::from_secs(61)).0);
        h.updated(true);
        h.set_eligible(false);
        let (healthy, eligible, body) = h.report(SystemTime::now());
        assert!(healthy && !eligible, "{body}");
        assert!(body.contains("\"nodeEligible\":false"), "{body}");
    }

}

