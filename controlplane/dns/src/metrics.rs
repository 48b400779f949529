//! Prometheus metrics and the HTTP endpoints CoreDNS offers on its metrics
//! port: `/metrics`, `/healthz` (the process answers) and `/ready` (200 once
//! every watch has listed its objects, 503 before).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use hickory_proto::{op::ResponseCode, rr::RecordType};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub qtype: &'static str,
    pub rcode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// Every metric riptide-dns exports; cheap to clone (all handles are Arcs).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_entries: Gauge,
    pub answer_cache_hits: Counter,
    pub answer_cache_misses: Counter,
    pub upstream_failures: Counter,
    pub watch_errors: Family<KindLabel, Counter>,
    pub services: Gauge,
    pub endpoints: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("riptide_dns");
        // 25 µs … ~3.3 s: in-zone answers sit in the first buckets,
        // forwarded ones and the SERVFAIL budget in the last.
        let m = Self {
            registry: Arc::new(Registry::default()),
            requests: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_025, 2.0, 18)),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            answer_cache_hits: Counter::default(),
            answer_cache_misses: Counter::default(),
            upstream_failures: Counter::default(),
            watch_errors: Family::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
        };
        r.register("requests", "DNS requests by query type and response code", m.requests.clone());
        r.register("request_duration_seconds", "Time from a request to its response", m.duration.clone());
        r.register("cache_hits", "Forwarded questions answered from the cache", m.cache_hits.clone());
        r.register("cache_misses", "Forwarded questions sent upstream", m.cache_misses.clone());
        r.register("cache_entries", "Entries in the forwarding cache", m.cache_entries.clone());
        r.register("answer_cache_hits", "UDP queries answered from the answer cache", m.answer_cache_hits.clone());
        r.register("answer_cache_misses", "Cacheable UDP queries not in the answer cache", m.answer_cache_misses.clone());
        r.register("upstream_failures", "Forwarded questions no upstream answered (SERVFAIL)", m.upstream_failures.clone());
        r.register("watch_errors", "Watch stream errors by kind", m.watch_errors.clone());
        r.register("services", "Services in the index", m.services.clone());
        r.register("endpoints", "Endpoints in the index", m.endpoints.clone());
        Self { registry: Arc::new(r), ..m }
    }

    pub fn observe(&self, qtype: RecordType, rcode: ResponseCode, took: Duration) {
        self.requests(qtype, rcode).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// The request counter of `qtype` and `rcode`, for callers that count
    /// the same kind of request again and again.
    pub fn requests(&self, qtype: RecordType, rcode: ResponseCode) -> Counter {
        self.requests.get_or_create(&RequestLabels { qtype: qtype_label(qtype), rcode: rcode_label(rcode) }).clone()
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// A bounded label set: the common types by name, the rest as `other`.
fn qtype_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::PTR => "PTR",
        RecordType::CNAME => "CNAME",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::MX => "MX",
        RecordType::HTTPS => "HTTPS",
        RecordType::ANY => "ANY",
        _ => "other",
    }
}

fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

/// Set once every watch has listed its objects.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    ready: Readiness,
}

/// Serves `/metrics`, `/healthz` and `/ready` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics, ready: Readiness) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move {
                ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
            }),
        )
        .route("/healthz", get(|| async { "OK" }))
        .route(
            "/ready",
            get(|State(s): State<HttpState>| async move {
                if s.ready.is_ready() { (StatusCode::OK, "OK") } else { (StatusCode::SERVICE_UNAVAILABLE, "not synced") }
            }),
        )
        .with_state(HttpState { metrics, ready });
    axum::serve(listener, app).await
}
