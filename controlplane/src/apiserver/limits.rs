//! What keeps one client from taking the apiserver down: kube-apiserver's
//! request-body limit (3 MiB, `413 RequestEntityTooLarge`), decoding of
//! large bodies on the blocking pool instead of the async workers, and a
//! bound on the watches one identity holds open. The connection-level
//! limits (header-read and TLS-handshake timeouts, the connection cap) are
//! applied where connections are served (`super::serve`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::status::{ApiError, ApiResult};

/// The limits a server runs with; the defaults are kube-apiserver's where
/// it has one.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (kube-apiserver: 3 MiB).
    pub max_body_bytes: usize,
    /// A connection that has not sent a full request head in this time is
    /// closed (Go's `ReadHeaderTimeout` in kube-apiserver: 32 s).
    pub header_read_timeout: Duration,
    /// A TLS handshake not finished in this time closes the connection
    /// (Go's `tls.Conn` default in net/http: 10 s).
    pub tls_handshake_timeout: Duration,
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Watches one user may hold open at once (429 beyond).
    pub max_watches_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 3 << 20,
            header_read_timeout: Duration::from_secs(32),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 2048,
            max_watches_per_user: 512,
        }
    }
}

/// After an oversized body, this much more is read and thrown away (not
/// buffered) so the 413 reaches the client: closing a socket with unread
/// data makes the kernel answer with a reset that can destroy the response.
const DRAIN_BYTES: usize = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Bodies at least this large are decoded on the blocking pool.
pub const OFFLOAD_BYTES: usize = 64 << 10;

/// The request body, or 413 once it exceeds `limit` (never holding more
/// than `limit` bytes).
pub async fn read_body(mut body: Body, content_length: Option<u64>, limit: usize) -> ApiResult<Bytes> {
    if content_length.is_some_and(|n| n > limit as u64) {
        if content_length.is_some_and(|n| n <= DRAIN_BYTES as u64) {
            drain(body).await;
        }
        return Err(ApiError::too_large(limit));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            drain(body).await;
            return Err(ApiError::too_large(limit));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

async fn drain(mut body: Body) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, Bytes::len);
            if seen > DRAIN_BYTES {
                return;
            }
        }
    })
    .await;
}

/// Run CPU-heavy request work (decoding, patching) of `weight` bytes: on the
/// blocking pool when large, so a few big bodies cannot stall every
/// connection served by the async workers.
pub async fn offload<T: Send + 'static>(weight: usize, f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    if weight < OFFLOAD_BYTES {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("request worker: {e}")))
}

/// Open watches per user.
#[derive(Debug, Default)]
pub struct WatchBudget {
    per_user: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open watch; dropping it (the response body ends or the client
/// leaves) gives the slot back.
#[derive(Debug)]
pub struct WatchSlot {
    budget: Arc<WatchBudget>,
    user: String,
}

impl WatchBudget {
    pub fn new(per_user: usize) -> Arc<Self> {
        Arc::new(Self { per_user, open: Mutex::new(HashMap::new()) })
    }

    pub fn acquire(self: &Arc<Self>, user: &str) -> ApiResult<WatchSlot> {
        let mut open = self.open.lock().map_err(|_| ApiError::internal("watch budget lock poisoned"))?;
        let n = open.entry(user.to_string()).or_default();
        if *n >= self.per_user {
            return Err(ApiError::too_many_requests(format!(
                "too many watches open for user \"{user}\" (limit {}), please try again later",
                self.per_user
            )));
        }
        *n += 1;
        Ok(WatchSlot { budget: self.clone(), user: user.to_string() })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.budget.open.lock()
            && let Some(n) = open.get_mut(&self.user)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// A watch's event stream holding its slot: the slot is given back when
/// the response body is dropped.
pub struct Held<S> {
    inner: S,
    _slot: WatchSlot,
}

impl<S> Held<S> {
    pub fn new(inner: S, slot: WatchSlot) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: futures::Stream<Item = Bytes> + Unpin> futures::Stream for Held<S> {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx).map(|b| b.map(Ok))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn large_work_runs_off_the_async_worker() {
        // One worker thread: work done inline runs on it, offloaded work on
        // a blocking-pool thread.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let worker = std::thread::current().id();
        let small = rt.block_on(offload(OFFLOAD_BYTES - 1, || std::thread::current().id())).unwrap();
        let large = rt.block_on(offload(OFFLOAD_BYTES, || std::thread::current().id())).unwrap();
        assert_eq!(small, worker, "small bodies are decoded inline");
        assert_ne!(large, worker, "a body of {OFFLOAD_BYTES} bytes is decoded on the blocking pool");
    }

    #[test]
    fn watch_budget_is_per_user_and_returned_on_drop() {
        let b = WatchBudget::new(2);
        let a1 = b.acquire("a").unwrap();
        let _a2 = b.acquire("a").unwrap();
        assert_eq!(b.acquire("a").unwrap_err().code, 429);
        let _b1 = b.acquire("b").unwrap();
        drop(a1);
        assert!(b.acquire("a").is_ok());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413() {
        let big = Body::from(vec![b'x'; 1000]);
        assert_eq!(read_body(big, None, 999).await.unwrap_err().code, 413);
        let declared = Body::from(vec![b'x'; 10]);
        assert_eq!(read_body(declared, Some(1 << 40), 999).await.unwrap_err().code, 413);
        let fits = Body::from(vec![b'x'; 999]);
        assert_eq!(read_body(fits, Some(999), 999).await.unwrap().len(), 999);
    }
}
