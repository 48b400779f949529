//! The operator surface: a local HTTP/JSON API on a unix socket for the
//! `riptide` CLI, and `/metrics`, `/healthz`, `/readyz` on TCP.
//!
//! Every view of the maps is read from the maps themselves at request time
//! (not from what the agent believes it wrote), so the CLI shows what the
//! datapath really does.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use axum::{Json, Router, extract::{Query, State}, http::StatusCode, response::IntoResponse, routing::get};
use riptide_datapath::service::Service;
use serde::{Deserialize, Serialize};

use crate::{
    map_usage::{self, MapUsage},
    policy::Peer,
    shared::{GcStatus, Shared, lock},
    tunnel,
    views::{self, CtView, EndpointView, FrontendView, PolicyCheckView, PolicyEndpointView},
};

/// `riptide status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    pub ready: bool,
    /// Connected to an apiserver (false: datapath only).
    pub kubernetes: bool,
    pub pin_dir: Option<String>,
    pub service_ports: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Both conntrack tables together.
    pub conntrack_entries: usize,
    /// Entries per conntrack table, by map name.
    #[serde(default)]
    pub conntrack_tables: BTreeMap<String, usize>,
    /// Both NAT tables together.
    #[serde(default)]
    pub nat_entries: usize,
    /// Entries per NAT table (TCP, the rest), by map name.
    #[serde(default)]
    pub nat_tables: BTreeMap<String, usize>,
    pub syncs: u64,
    pub last_sync_ms: Option<f64>,
    pub routes: BTreeMap<String, String>,
    pub pod_cidr: Option<String>,
    pub node_ip: Option<String>,
    pub health_check_ports: Vec<u16>,
    /// Frontends claimed by more than one owner: `frontend → [owners]`.
    pub conflicts: BTreeMap<String, Vec<String>>,
    pub attachments: Vec<String>,
    /// `native` (routes via node addresses) or `vxlan`.
    #[serde(default)]
    pub routing_mode: String,
    /// `--tunnel vxlan`: the device, once it exists.
    #[serde(default)]
    pub tunnel: Option<String>,
    /// `--tunnel vxlan`: per remote node, its route, neighbour and FDB entry.
    #[serde(default)]
    pub tunnel_peers: Vec<String>,
    /// Conntrack/affinity GC and stale-UDP cleanup.
    #[serde(default)]
    pub gc: GcStatus,
    /// NetworkPolicy enforcement.
    #[serde(default)]
    pub policy: PolicyStatusView,
    /// Services (`namespace/name`) with a port whose map write failed, and
    /// the error; retried every second. The other Services are served.
    #[serde(default)]
    pub failing_services: BTreeMap<String, String>,
    /// Services whose backends were cut to `--max-backends-per-service`.
    #[serde(default)]
    pub truncated_services: Vec<TruncatedView>,
    /// Set while the apiserver has been unreachable for longer than
    /// `--stale-after-s`: what is stale and since when. The maps keep
    /// serving the last view.
    #[serde(default)]
    pub stale: Option<String>,
    /// Why the agent is not ready (empty when ready).
    #[serde(default)]
    pub not_ready: Vec<String>,
}

/// A Service whose backends were cut to the per-Service cap.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TruncatedView {
    pub service: String,
    /// Backends the EndpointSlices list (largest port).
    pub backends: usize,
    /// Backends written.
    pub kept: usize,
}

/// The NetworkPolicy part of `riptide status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatusView {
    /// The first pass wrote everything.
    pub synced: bool,
    /// `CFG_F_POLICY` is set: some local pod is isolated.
    pub enforcing: bool,
    /// Local pods isolated or audited (entries in `rt_polep4_v1`).
    pub endpoints: usize,
    pub rules: usize,
    pub identities: usize,
    pub policies: usize,
    /// Local pods denying all but node and self because a write failed.
    pub fail_closed: Vec<String>,
    /// Failed writes of the last pass (retried every second).
    pub errors: Vec<String>,
    /// Policy parts not compiled as written (invalid selectors, ports).
    pub warnings: Vec<String>,
    pub passes: u64,
    pub last_pass_ms: Option<f64>,
}

/// `riptide drops`: a datapath counter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterView {
    pub reason: String,
    pub count: u64,
}

type S = Arc<Shared>;

fn internal(e: &(dyn std::error::Error + 'static)) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, crate::reconcile::error_chain(e))
}

/// Entries of each of `tables` from the map sampler's last snapshot;
/// before the first sample, what the GC's last pass left (`gc`).
fn sampled_tables(maps: &map_usage::MapSnapshot, tables: [&str; 2], gc: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    let sampled = tables.map(|t| maps.entries(t).map(|n| (t.to_owned(), usize::try_from(n).unwrap_or(usize::MAX))));
    sampled.into_iter().collect::<Option<_>>().unwrap_or_else(|| gc.clone())
}

pub fn status(s: &Shared) -> StatusView {
    let st = lock(&s.status).clone();
    let gc = lock(&s.gc_status).clone();
    let (frontends, backends) = {
        let svc = lock(&s.services);
        (svc.dump_services().iter().filter(|(k, _)| k.slot == 0).count(), svc.dump_backends().len())
    };
    // Sampled off the request path: a full conntrack table is too big to
    // walk per request.
    let (conntrack_tables, nat_tables) = {
        let maps = lock(&s.maps);
        (
            sampled_tables(&maps, riptide_datapath::gc::CT_TABLES, &gc.conntrack_tables),
            sampled_tables(&maps, riptide_datapath::gc::NAT_TABLES, &gc.nat_tables),
        )
    };
    let conntrack_entries = if conntrack_tables.is_empty() { gc.conntrack_entries } else { conntrack_tables.values().sum() };
    let nat_entries = if nat_tables.is_empty() { gc.nat_entries } else { nat_tables.values().sum() };
    let rec = lock(&s.reconciler);
    StatusView {
        node: s.node.clone(),
        ready: s.ready.load(Ordering::Relaxed),
        kubernetes: st.kubernetes,
        pin_dir: st.pin_dir,
        service_ports: rec.applied().len(),
        frontends,
        backends,
        conntrack_entries,
        conntrack_tables,
        nat_entries,
        nat_tables,
        syncs: st.syncs,
        last_sync_ms: st.last_sync_ms,
        routes: st.routes.iter().map(|(c, v)| (c.to_string(), v.to_string())).collect(),
        pod_cidr: st.pod_cidr.map(|c| c.to_string()),
        node_ip: st.node_ip.map(|i| i.to_string()),
        health_check_ports: st.health_check_ports,
        conflicts: rec
            .conflicts()
            .into_iter()
            .map(|(id, owners)| (id.to_string(), owners))
            .collect(),
        attachments: st.attachments,
        routing_mode: if st.tunnel_mode { "vxlan" } else { "native" }.to_owned(),
        tunnel: st.tunnel,
        tunnel_peers: if st.tunnel_mode {
            st.routes.iter().map(|(c, ip)| tunnel::describe_peer(*c, *ip)).collect()
        } else {
            Vec::new()
        },
        gc,
        policy: policy_status(s),
        failing_services: st.failing_services,
        truncated_services: st
            .truncated
            .iter()
            .map(|(service, (backends, kept))| TruncatedView { service: service.clone(), backends: *backends, kept: *kept })
            .collect(),
        stale: st.stale,
        not_ready: st.not_ready,
    }
}

fn policy_status(s: &Shared) -> PolicyStatusView {
    let p = lock(&s.policy).clone();
    let name = |ip: &std::net::Ipv4Addr| {
        p.local_pod_name(*ip)
            .map_or_else(|| ip.to_string(), |n| format!("{n} ({ip})"))
    };
    PolicyStatusView {
        synced: p.synced,
        enforcing: p.enforcing,
        endpoints: p.compiled.endpoints.len(),
        rules: p.compiled.rules.len(),
        identities: p.compiled.identities.len(),
        policies: p.compiled.policies.iter().flatten().count(),
        fail_closed: p.fail_closed.iter().map(name).collect(),
        errors: p.errors,
        warnings: p.compiled.warnings.clone(),
        passes: p.passes,
        last_pass_ms: p.last_pass_ms,
    }
}

pub fn services(s: &Shared) -> Vec<FrontendView> {
    let owners = views::owner_index(lock(&s.reconciler).applied().values().map(AsRef::as_ref));
    let svc = lock(&s.services);
    views::frontend_views(&svc.dump_services(), &svc.dump_backends(), &owners)
}

fn ports(s: &Shared) -> Vec<Service> {
    lock(&s.reconciler).applied().values().map(|p| Service::clone(p)).collect()
}

/// Runs `f` on the blocking pool: map walks and waits on the run loop's
/// locks never stall an async worker (the metrics and health listeners
/// share them).
async fn blocking<T: Send + 'static>(s: S, f: impl FnOnce(&Shared) -> T + Send + 'static) -> Result<T, (StatusCode, String)> {
    tokio::task::spawn_blocking(move || f(&s)).await.map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn get_status(State(s): State<S>) -> Result<Json<StatusView>, (StatusCode, String)> {
    blocking(s, status).await.map(Json)
}

async fn get_services(State(s): State<S>) -> Result<Json<Vec<FrontendView>>, (StatusCode, String)> {
    blocking(s, services).await.map(Json)
}

/// `riptide map list`: a fresh sample of every map of the node.
async fn get_maps(State(s): State<S>) -> Result<Json<Vec<MapUsage>>, (StatusCode, String)> {
    let dir = lock(&s.status).pin_dir.clone();
    let snap = match dir {
        Some(dir) => tokio::task::spawn_blocking(move || map_usage::sample(Path::new(&dir)))
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => lock(&s.maps).clone(),
    };
    Ok(Json(snap.maps))
}

async fn get_ports(State(s): State<S>) -> Json<Vec<Service>> {
    Json(ports(&s))
}

async fn get_ct(State(s): State<S>) -> Result<Json<Vec<CtView>>, (StatusCode, String)> {
    let entries = blocking(s, |s| lock(&s.dp).conntrack()).await?.map_err(|e| internal(&e))?;
    Ok(Json(views::ct_views(&entries, riptide_datapath::clock::monotonic_ns())))
}

/// `riptide bpf nat list`: both SNAT/masquerade tables.
async fn get_nat(State(s): State<S>) -> Result<Json<Vec<views::NatView>>, (StatusCode, String)> {
    let entries = blocking(s, |s| lock(&s.dp).nat()).await?.map_err(|e| internal(&e))?;
    Ok(Json(views::nat_views(&entries, riptide_datapath::clock::monotonic_ns())))
}

/// `riptide node list`: the Nodes the agent routes to, with what it wrote
/// for each (route via, `rt_node4_v1`).
async fn get_nodes(State(s): State<S>) -> Json<Vec<views::NodeView>> {
    Json(lock(&s.status).nodes.clone())
}

async fn get_affinity(State(s): State<S>) -> Result<Json<Vec<views::AffinityView>>, (StatusCode, String)> {
    let entries = lock(&s.dp).affinity().map_err(|e| internal(&e))?;
    let (revnat, backends) = {
        let svc = lock(&s.services);
        (svc.dump_revnat(), svc.dump_backends())
    };
    Ok(Json(views::affinity_views(&entries, &revnat, &backends, riptide_datapath::clock::monotonic_ns())))
}

async fn get_endpoints(State(s): State<S>) -> Result<Json<Vec<EndpointView>>, (StatusCode, String)> {
    let mut dp = lock(&s.dp);
    let list = dp.endpoints().map_err(|e| internal(&e))?.list();
    Ok(Json(views::endpoint_views(&list)))
}

async fn get_drops(State(s): State<S>) -> Result<Json<Vec<CounterView>>, (StatusCode, String)> {
    let stats = lock(&s.dp).stats().map_err(|e| internal(&e))?;
    Ok(Json(
        stats
            .named()
            .map(|(reason, count)| CounterView { reason: reason.to_owned(), count })
            .collect(),
    ))
}

/// `?since=SEQ`: only events with a sequence number of at least SEQ.
#[derive(Debug, Default, Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
}

async fn get_events(
    State(s): State<S>,
    Query(q): Query<Since>,
) -> Json<Vec<crate::events::EventView>> {
    let pods = crate::policy::names_by_ip(&s.pods());
    Json(s.events.since(q.since, &services(&s), &pods))
}

/// `riptide policy list`: the last compile's local pods, with their
/// `rt_polep4_v1` entries as the map holds them now.
async fn get_policy(State(s): State<S>) -> Result<Json<Vec<PolicyEndpointView>>, (StatusCode, String)> {
    let compiled = lock(&s.policy).compiled.clone();
    let in_map = lock(&s.dp).policy().and_then(|m| m.list_endpoints()).map_err(|e| internal(&e))?;
    Ok(Json(views::policy_endpoint_views(&compiled, &in_map)))
}

/// `?from=ns/pod|IP&to=ns/pod|IP&port=80/TCP` (protocol defaults to TCP).
#[derive(Debug, Deserialize)]
struct CheckQuery {
    from: String,
    to: String,
    port: String,
}

/// `80/TCP` → (80, (6, "TCP")).
fn parse_port(s: &str) -> Result<(u16, (u8, String)), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port.parse().map_err(|_| format!("port {port:?} is not a number in 0..=65535"))?;
    let upper = proto.to_ascii_uppercase();
    let number = crate::policy::protocol_number(Some(&upper)).map_err(|e| format!("protocol {proto:?}: {e}"))?;
    Ok((port, (number, upper)))
}

async fn get_policy_check(State(s): State<S>, Query(q): Query<CheckQuery>) -> Result<Json<PolicyCheckView>, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let from: Peer = q.from.parse().map_err(|e: crate::policy::CheckError| bad(e.to_string()))?;
    let to: Peer = q.to.parse().map_err(|e: crate::policy::CheckError| bad(e.to_string()))?;
    let (port, (proto, name)) = parse_port(&q.port).map_err(bad)?;
    let compiled = lock(&s.policy).compiled.clone();
    views::policy_check_view(&compiled, &s.pods(), &from, &to, port, (proto, &name))
        .map(Json)
        .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when ready; the body names Services that failed to be written
/// (served by every other Service, so they do not make the node unready).
/// 503 names why not: not synced yet, NetworkPolicy, a stale watch.
async fn readyz(State(s): State<S>) -> impl IntoResponse {
    let st = lock(&s.status);
    let mut body = String::new();
    let code = if s.ready.load(Ordering::Relaxed) {
        body.push_str("ready\n");
        StatusCode::OK
    } else {
        body.push_str("not ready\n");
        if st.not_ready.is_empty() {
            body.push_str("  not synced yet\n");
        }
        for r in &st.not_ready {
            body.push_str(&format!("  {r}\n"));
        }
        StatusCode::SERVICE_UNAVAILABLE
    };
    for (svc, err) in &st.failing_services {
        body.push_str(&format!("  service {svc} not written: {err}\n"));
    }
    for (svc, (all, kept)) in &st.truncated {
        body.push_str(&format!("  service {svc} truncated: {kept} of {all} backends\n"));
    }
    (code, body)
}

/// Encodes what the run loop, the GC and the map sampler published: a
/// scrape walks no map and waits on no lock the run loop holds.
async fn metrics(State(s): State<S>) -> impl IntoResponse {
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.encode(),
    )
}

/// Routes of the unix-socket API.
pub fn local_router(s: S) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/services", get(get_services))
        .route("/v1/ports", get(get_ports))
        .route("/v1/ct", get(get_ct))
        .route("/v1/nat", get(get_nat))
        .route("/v1/maps", get(get_maps))
        .route("/v1/nodes", get(get_nodes))
        .route("/v1/affinity", get(get_affinity))
        .route("/v1/endpoints", get(get_endpoints))
        .route("/v1/drops", get(get_drops))
        .route("/v1/events", get(get_events))
        .route("/v1/policy", get(get_policy))
        .route("/v1/policy/check", get(get_policy_check))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(s)
}

/// Routes of the TCP metrics/health listener.
pub fn metrics_router(s: S) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(s)
}

/// Serves the local API on `path` (replacing a stale socket).
pub fn serve_unix(path: &Path, s: S) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    let app = local_router(s);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "local API server failed");
        }
    }))
}

/// Serves metrics and health on `addr`.
pub async fn serve_metrics(addr: SocketAddr, s: S) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = metrics_router(s);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server failed");
        }
    }))
}
