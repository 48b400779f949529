//! The kubelet's API (`<node-ip>:10250`): HTTPS with a serving
//! certificate from the cluster CA, every request authenticated and
//! authorized ([`super::auth`]). `GET /containerLogs/{ns}/{pod}/{container}`
//! with `follow`, `tailLines`, `previous`, `limitBytes` — the path the
//! apiserver's pods/log proxy calls — `/exec/…` (mounted by the kubelet from
//! [`crate::exec`]) and `/healthz`.

use std::{collections::HashMap, io::SeekFrom, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::{Shared, auth::KubeletAuth, state::log_path};
use crate::apiserver::{Limits, tls};

/// The kubelet's serving certificate and key (PEM) and the CA whose
/// client certificates are identities (`--tls-cert-file`,
/// `--tls-private-key-file`, `--client-ca-file`).
#[derive(Clone)]
pub struct ServingTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

impl std::fmt::Debug for ServingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingTls").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// Serves `routes` on `listener` over HTTPS, each request first through
/// `auth`, with the apiserver's connection limits (handshake and
/// header-read timeouts, a connection cap). The task runs until aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    serving: &ServingTls,
    routes: Router,
    auth: Arc<KubeletAuth>,
) -> Result<tokio::task::JoinHandle<()>, tls::TlsError> {
    let cfg = tls::serving_config(&serving.cert_pem, &serving.key_pem, &serving.client_ca_pem)?;
    let app = routes.layer(axum::middleware::from_fn_with_state(auth, super::auth::require));
    let (keep_open, shutdown) = tokio::sync::watch::channel(false);
    Ok(tokio::spawn(async move {
        let _keep_open = keep_open;
        crate::apiserver::serve(listener, Some(tokio_rustls::TlsAcceptor::from(cfg)), app, Limits::default(), shutdown).await;
    }))
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containerLogs/{ns}/{pod}/{container}", get(logs))
        .with_state(shared)
}

fn err(code: StatusCode, msg: String) -> Response {
    (code, msg).into_response()
}

/// Last `n` lines of `data`.
pub fn tail(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let mut seen = 0;
    let end = if data.ends_with(b"\n") { data.len() - 1 } else { data.len() };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

fn current(shared: &Shared, ns: &str, pod: &str, container: &str) -> Option<(String, i32, Option<i32>)> {
    let r = shared.registry.lock().ok()?;
    let reg = r.get(&(ns.to_string(), pod.to_string()))?;
    let (restart, pid) = reg.containers.get(container)?;
    Some((reg.uid.clone(), *restart, *pid))
}

async fn logs(
    State(shared): State<Arc<Shared>>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1" || v.is_empty());
    let Some((uid, restart, _)) = current(&shared, &ns, &pod, &container) else {
        return err(StatusCode::NOT_FOUND, format!("container {container} of pod {ns}/{pod} is not running on this node"));
    };
    let previous = flag("previous");
    let restart = if previous {
        if restart == 0 {
            return err(StatusCode::BAD_REQUEST, format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"));
        }
        restart - 1
    } else {
        restart
    };
    let path: PathBuf = log_path(&shared.cfg.root_dir, &uid, &container, restart);
    let data = tokio::fs::read(&path).await.unwrap_or_default();
    let mut body: Vec<u8> = match q.get("tailLines").and_then(|t| t.parse::<i64>().ok()) {
        Some(n) if n >= 0 => tail(&data, usize::try_from(n).unwrap_or(usize::MAX)).to_vec(),
        _ => data.clone(),
    };
    if let Some(limit) = q.get("limitBytes").and_then(|l| l.parse::<usize>().ok()) {
        body.truncate(limit);
    }
    if !flag("follow") || previous {
        return (StatusCode::OK, [("content-type", "text/plain")], body).into_response();
    }
    // Follow: what is there, then whatever gets appended, until the
    // container restarts or the pod goes away.
    let offset = data.len() as u64;
    let first = Some(bytes::Bytes::from(body));
    let stream = futures::stream::unfold((first, offset, shared, ns, pod, container, uid, restart), |(first, mut off, shared, ns, pod, container, uid, restart)| async move {
        if let Some(b) = first {
            return Some((Ok::<_, std::io::Error>(b), (None, off, shared, ns, pod, container, uid, restart)));
        }
        let path = log_path(&shared.cfg.root_dir, &uid, &container, restart);
        loop {
            let mut buf = Vec::new();
            if let Ok(mut f) = tokio::fs::File::open(&path).await
                && f.seek(SeekFrom::Start(off)).await.is_ok()
            {
                let _ = f.read_to_end(&mut buf).await;
            }
            if !buf.is_empty() {
                off += buf.len() as u64;
                return Some((Ok(bytes::Bytes::from(buf)), (None, off, shared, ns, pod, container, uid, restart)));
            }
            match current(&shared, &ns, &pod, &container) {
                Some((u, r, Some(_))) if u == uid && r == restart => {}
                _ => return None,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"a\nb\n", 0), b"");
    }
}
