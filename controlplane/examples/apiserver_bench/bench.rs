//! The apiserver benchmark of `cargo xtask bench` (issue 5, Performance):
//! the server runs as a subprocess (`riptide-controlplane apiserver`, so
//! its peak RSS is its own: `VmHWM` from /proc), once on the embedded store
//! and once on a real etcd started on loopback with a temporary data dir.
//! A kube-rs client (TLS, bearer token from the generated kubeconfig, as
//! every real client) measures, per store:
//!
//! - **create**: `pods` pods (10k; 1k with `quick`) POSTed by `concurrency`
//!   workers: throughput and per-request latency p50/p99/max;
//! - **watch under load**: one watch open during those creates: time from a
//!   POST being sent to its ADDED event arriving (p50/p99);
//! - **watch idle**: the same with one create at a time;
//! - **list**: all pods in one request (median of 3; time, bytes) and
//!   kubectl-style pages of 500;
//! - **fan-out**: `fanout_watchers` (100) watches on one namespace, then
//!   `fanout_events` creates: every watcher must get every event; time until
//!   the last delivery, deliveries/s, per-delivery latency p50/p99;
//! - **rss**: the apiserver's VmHWM/VmRSS at the end (and etcd's, which the
//!   etcd setup needs on top).
//!
//! Client and server share the machine, so the client's work (TLS, reading
//! 100 streams) is part of the numbers; watch events are matched by a
//! substring search for the pod name rather than a full JSON parse to keep
//! that share small. Numbers from a debug build of the server are much
//! slower than release; the report names the binary it ran.

use std::{
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::http::Request;
use futures::{AsyncBufReadExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};

use crate::{
    error::{BenchError, Result, kerr},
    processes::{Etcd, Rss, Server, rss},
};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub quick: bool,
    /// The `riptide-controlplane` binary.
    pub server_bin: PathBuf,
    /// etcd (Debian `etcd-server`).
    pub etcd_bin: PathBuf,
    pub pods: usize,
    pub concurrency: usize,
    pub watch_samples: usize,
    pub fanout_watchers: usize,
    pub fanout_events: usize,
}

impl BenchOptions {
    pub fn new(quick: bool, server_bin: PathBuf) -> Self {
        Self {
            quick,
            server_bin,
            etcd_bin: PathBuf::from("etcd"),
            pods: if quick { 1000 } else { 10_000 },
            concurrency: 32,
            watch_samples: if quick { 50 } else { 200 },
            fanout_watchers: 100,
            fanout_events: if quick { 50 } else { 500 },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((ms.len() - 1) as f64 * q).round() as usize;
            round3(ms[i.min(ms.len() - 1)])
        };
        Self { samples: ms.len(), p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateReport {
    pub pods: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
    /// Send → ADDED on a watch open during the creates.
    pub watch_latency: Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListReport {
    pub items: usize,
    /// One request for everything (median of 3).
    pub full_ms: f64,
    pub full_bytes: usize,
    /// `limit=500` pages following `continue`, like kubectl.
    pub paged_ms: f64,
    pub pages: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    pub watchers: usize,
    pub events: usize,
    /// First create sent → last event delivered to the last watcher.
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// Create sent → event received, over every (watcher, event).
    pub latency: Latency,
    /// Deliveries that never arrived (must be 0).
    pub missing: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreReport {
    /// "embedded" or "etcd".
    pub store: String,
    pub create: CreateReport,
    /// Send → ADDED with one create at a time.
    pub watch_idle: Latency,
    pub list: ListReport,
    pub fanout: FanoutReport,
    pub server_rss: Rss,
    pub etcd_rss: Option<Rss>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiBenchReport {
    pub quick: bool,
    pub server_binary: String,
    pub stores: Vec<StoreReport>,
    pub seconds: f64,
}

pub async fn run_with(opts: &BenchOptions) -> Result<ApiBenchReport> {
    let t0 = Instant::now();
    let mut stores = Vec::new();
    for etcd in [false, true] {
        stores.push(bench_store(opts, etcd).await?);
    }
    Ok(ApiBenchReport {
        quick: opts.quick,
        server_binary: opts.server_bin.display().to_string(),
        stores,
        seconds: round3(t0.elapsed().as_secs_f64()),
    })
}

async fn bench_store(opts: &BenchOptions, use_etcd: bool) -> Result<StoreReport> {
    let store = if use_etcd { "etcd" } else { "embedded" };
    let etcd = if use_etcd { Some(Etcd::start(&opts.etcd_bin).await?) } else { None };
    let server = Server::start(&opts.server_bin, etcd.as_ref().map(|e| e.endpoint.as_str())).await?;
    let c = &server.client;
    for ns in ["bench", "bench-idle", "bench-fanout"] {
        let body = serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
            .unwrap_or_default();
        c.request_text(post("/api/v1/namespaces", body)?).await.map_err(kerr(format!("creating namespace {ns}")))?;
    }
    tracing::info!(store, "bench: creates");
    let create = creates(c, "bench", opts.pods, opts.concurrency).await?;
    tracing::info!(store, "bench: idle watch");
    let watch_idle = idle_watch(c, "bench-idle", opts.watch_samples).await?;
    tracing::info!(store, "bench: list");
    let list = list(c, "bench").await?;
    tracing::info!(store, "bench: fan-out");
    let fanout = fanout(c, "bench-fanout", opts.fanout_watchers, opts.fanout_events, opts.concurrency).await?;
    let server_rss = rss(server.pid);
    let etcd_rss = etcd.as_ref().map(|e| rss(e.pid));
    server.stop().await;
    drop(etcd);
    Ok(StoreReport { store: store.into(), create, watch_idle, list, fanout, server_rss, etcd_rss })
}

fn post(path: &str, body: Vec<u8>) -> Result<Request<Vec<u8>>> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body)
        .map_err(|e| BenchError::Failed(format!("building POST {path}: {e}")))
}

fn get(path: &str) -> Result<Request<Vec<u8>>> {
    Request::get(path).body(Vec::new()).map_err(|e| BenchError::Failed(format!("building GET {path}: {e}")))
}

/// A pod like a small Deployment's: labels, one container with command,
/// env, ports, resources. Names are `bp-<i>`; nothing else in the object
/// starts with that, which the watch readers rely on.
fn pod(ns: &str, i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("bp-{i}"), "namespace": ns,
            "labels": {"app": "bench", "tier": "backend", "pod-template-hash": "5d8f7c9b6"}},
        "spec": {
            "containers": [{
                "name": "app", "image": "registry.example/bench/app:1.2.3",
                "command": ["/usr/bin/sleep"], "args": ["infinity"],
                "env": [{"name": "MODE", "value": "bench"}, {"name": "INDEX", "value": i.to_string()}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5}
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 5
        }
    }))
    .unwrap_or_default()
}

/// The `bp-<i>` index of a watch event line (ADDED only).
fn event_index(line: &str) -> Option<usize> {
    if !line.contains("\"type\":\"ADDED\"") {
        return None;
    }
    let at = line.find("\"name\":\"bp-")? + "\"name\":\"bp-".len();
    let rest = &line[at..];
    rest[..rest.find('"')?].parse().ok()
}

/// Send times, by pod index.
type Sent = Arc<Vec<OnceLock<Instant>>>;

fn sent_table(n: usize) -> Sent {
    Arc::new((0..n).map(|_| OnceLock::new()).collect())
}

/// Opens a watch on `ns` (returns once the server answered, i.e. the watch
/// is registered) and collects, for `expect` ADDED events, the delay since
/// their send time.
async fn open_watch(
    c: &kube::Client,
    ns: &str,
    expect: usize,
    sent: Sent,
    deadline: Duration,
) -> Result<tokio::task::JoinHandle<Vec<f64>>> {
    let req = get(&format!("/api/v1/namespaces/{ns}/pods?watch=true&timeoutSeconds={}", deadline.as_secs() + 5))?;
    let stream = c.request_stream(req).await.map_err(kerr(format!("watching pods in {ns}")))?;
    Ok(tokio::spawn(async move {
        let mut lines = Box::pin(stream.lines());
        let mut out = Vec::with_capacity(expect);
        let end = tokio::time::Instant::now() + deadline;
        while out.len() < expect {
            let Ok(Some(Ok(line))) = tokio::time::timeout_at(end, lines.next()).await else { break };
            let now = Instant::now();
            if let Some(t) = event_index(&line).and_then(|i| sent.get(i)).and_then(OnceLock::get) {
                out.push(ms(now - *t));
            }
        }
        out
    }))
}

/// Creates `n` pods `bp-0…` in `ns` with `conc` workers; returns the
/// wall time and per-request latencies.
async fn create_many(c: &kube::Client, ns: &str, n: usize, conc: usize, sent: &Sent) -> Result<(Duration, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..conc.max(1) {
        let (c, next, sent, ns) = (c.clone(), next.clone(), sent.clone(), ns.to_string());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok(lat);
                }
                let req = post(&format!("/api/v1/namespaces/{ns}/pods"), pod(&ns, i))?;
                let t = Instant::now();
                let _ = sent[i].set(t);
                c.request_text(req).await.map_err(kerr(format!("creating pod bp-{i}")))?;
                lat.push(ms(t.elapsed()));
            }
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for w in workers {
        let l: Result<Vec<f64>> = w.await.map_err(|e| BenchError::Failed(format!("create worker: {e}")))?;
        lat.extend(l?);
    }
    Ok((t0.elapsed(), lat))
}

async fn creates(c: &kube::Client, ns: &str, n: usize, conc: usize) -> Result<CreateReport> {
    let sent = sent_table(n);
    let watch = open_watch(c, ns, n, sent.clone(), Duration::from_secs(600)).await?;
    let (wall, lat) = create_many(c, ns, n, conc, &sent).await?;
    let seen = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .map_err(|_| BenchError::Failed("the watch did not deliver every create".into()))?
        .map_err(|e| BenchError::Failed(format!("watch task: {e}")))?;
    Ok(CreateReport {
        pods: n,
        concurrency: conc,
        seconds: round3(wall.as_secs_f64()),
        per_second: round3(n as f64 / wall.as_secs_f64()),
        latency: Latency::of(lat),
        watch_latency: Latency::of(seen),
    })
}

async fn idle_watch(c: &kube::Client, ns: &str, n: usize) -> Result<Latency> {
    let sent = sent_table(n);
    let watch = open_watch(c, ns, n, sent.clone(), Duration::from_secs(300)).await?;
    // One create at a time, with a pause, so the server is otherwise idle.
    for i in 0..n {
        create_one(c, ns, i, &sent).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .map_err(|_| BenchError::Failed("the idle watch did not deliver every create".into()))?
        .map_err(|e| BenchError::Failed(format!("watch task: {e}")))?;
    Ok(Latency::of(seen))
}

async fn create_one(c: &kube::Client, ns: &str, i: usize, sent: &Sent) -> Result<()> {
    let req = post(&format!("/api/v1/namespaces/{ns}/pods"), pod(ns, i))?;
    let _ = sent[i].set(Instant::now());
    c.request_text(req).await.map_err(kerr(format!("creating pod bp-{i}")))?;
    Ok(())
}

async fn list(c: &kube::Client, ns: &str) -> Result<ListReport> {
    let mut times = Vec::new();
    let mut bytes = 0;
    let mut items = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let body = c.request_text(get(&format!("/api/v1/namespaces/{ns}/pods"))?).await.map_err(kerr("listing pods"))?;
        times.push(ms(t.elapsed()));
        bytes = body.len();
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| BenchError::Failed(format!("decoding the list: {e}")))?;
        items = v["items"].as_array().map_or(0, Vec::len);
    }
    times.sort_by(f64::total_cmp);
    let t = Instant::now();
    let mut pages = 0;
    let mut cont = String::new();
    loop {
        let mut path = format!("/api/v1/namespaces/{ns}/pods?limit=500");
        if !cont.is_empty() {
            path.push_str(&format!("&continue={cont}"));
        }
        let body = c.request_text(get(&path)?).await.map_err(kerr("listing a page of pods"))?;
        pages += 1;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| BenchError::Failed(format!("decoding a page: {e}")))?;
        cont = v.pointer("/metadata/continue").and_then(|c| c.as_str()).unwrap_or("").to_string();
        if cont.is_empty() || pages > 10_000 {
            break;
        }
    }
    Ok(ListReport { items, full_ms: round3(times[times.len() / 2]), full_bytes: bytes, paged_ms: round3(ms(t.elapsed())), pages })
}

async fn fanout(c: &kube::Client, ns: &str, watchers: usize, events: usize, conc: usize) -> Result<FanoutReport> {
    let sent = sent_table(events);
    let mut handles = Vec::new();
    for _ in 0..watchers {
        handles.push(open_watch(c, ns, events, sent.clone(), Duration::from_secs(300)).await?);
    }
    let t0 = Instant::now();
    create_many(c, ns, events, conc, &sent).await?;
    let mut all = Vec::with_capacity(watchers * events);
    for h in handles {
        all.extend(h.await.map_err(|e| BenchError::Failed(format!("watch task: {e}")))?);
    }
    let wall = t0.elapsed();
    let missing = watchers * events - all.len();
    Ok(FanoutReport {
        watchers,
        events,
        seconds: round3(wall.as_secs_f64()),
        deliveries_per_second: round3(all.len() as f64 / wall.as_secs_f64()),
        latency: Latency::of(all),
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_and_percentiles() {
        let l = r#"{"type":"ADDED","object":{"apiVersion":"v1","kind":"Pod","metadata":{"labels":{"app":"bench"},"name":"bp-42","namespace":"x"}}}"#;
        assert_eq!(event_index(l), Some(42));
        assert_eq!(event_index(&l.replace("ADDED", "MODIFIED")), None);
        let lat = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!((lat.samples, lat.p50_ms, lat.p99_ms, lat.max_ms), (100, 51.0, 99.0, 100.0));
        assert_eq!(Latency::of(Vec::new()).samples, 0);
    }
}
