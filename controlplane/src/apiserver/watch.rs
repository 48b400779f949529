//! Watch, with kube-apiserver's resourceVersion semantics: RV unset/"0"
//! (or `sendInitialEvents=true`) starts with synthetic ADDED events for the
//! current state; otherwise events strictly after the RV; a compacted RV
//! gets one `ERROR` event carrying a 410 Expired `Status` on a 200 stream
//! (an HTTP 410 would make kube-rs retry forever instead of re-listing).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    api::{Api, ListQuery, decode_event_value},
    selectors::{FieldSelector, LabelSelector},
    status::ApiError,
    table::{self, IncludeObject},
};
use crate::{
    registry::Resource,
    storage::{EventKind, StorageError},
};

#[derive(Debug, Clone)]
pub struct WatchParams {
    pub resource_version: Option<String>,
    pub send_initial_events: Option<bool>,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub as_table: Option<IncludeObject>,
    pub bookmark_interval: Duration,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_line(e: &ApiError) -> Bytes {
    line("ERROR", &e.to_status())
}

/// Start a watch; returns the channel the response body streams from.
pub async fn start(
    api: Arc<Api>,
    res: &'static Resource,
    ns: Option<String>,
    p: WatchParams,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let rv = p.resource_version.clone().unwrap_or_default();
    let initial = p.send_initial_events.unwrap_or(rv.is_empty() || rv == "0");
    let start_rev: i64;
    let mut first: Vec<Bytes> = Vec::new();
    let render = {
        let p = p.clone();
        move |o: &Value| -> Value {
            match p.as_table {
                Some(inc) => table::table(res, std::slice::from_ref(o), inc, super::object::str_at(o, "/metadata/resourceVersion"), None),
                None => o.clone(),
            }
        }
    };
    if initial {
        let q = ListQuery { labels: p.labels.clone(), fields: p.fields.clone(), limit: 0, continue_token: None };
        let list = api.list(res, ns.as_deref(), &q).await?;
        for o in &list.items {
            first.push(line("ADDED", &render(o)));
        }
        start_rev = list.revision;
        if p.send_initial_events == Some(true) && p.bookmarks {
            first.push(line("BOOKMARK", &json!({"kind": res.kind, "apiVersion": res.api_version(),
                "metadata": {"resourceVersion": start_rev.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}}})));
        }
    } else if rv.is_empty() {
        start_rev = api.store.current_revision().await?;
    } else {
        start_rev = rv
            .parse::<i64>()
            .ok()
            .filter(|r| *r >= 0)
            .ok_or_else(|| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
    }
    let prefix = res.ns_prefix(ns.as_deref());
    let stream = match api.store.watch(&prefix, start_rev).await {
        Ok(s) => Some(s),
        Err(StorageError::Compacted { requested, compacted }) => {
            let e = ApiError::expired(format!("too old resource version: {requested} ({compacted})"));
            let _ = tx.send(error_line(&e)).await;
            None
        }
        Err(e) => return Err(e.into()),
    };
    let Some(mut stream) = stream else { return Ok(rx) };
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        // `timeoutSeconds` is the client's number: too large means no deadline, not an overflow.
        let deadline = p.timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        let mut last_rev = start_rev;
        let mut ticker = tokio::time::interval(p.bookmark_interval);
        ticker.tick().await;
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => return,
                () = tx.closed() => return,
                _ = ticker.tick() => {
                    if p.bookmarks {
                        let bm = json!({"kind": res.kind, "apiVersion": res.api_version(),
                            "metadata": {"resourceVersion": last_rev.to_string()}});
                        if tx.send(line("BOOKMARK", &bm)).await.is_err() { return; }
                    }
                }
                ev = stream.next() => {
                    let ev = match ev {
                        None => return,
                        Some(Ok(ev)) => ev,
                        Some(Err(StorageError::Compacted { requested, compacted })) => {
                            let e = ApiError::expired(format!("too old resource version: {requested} ({compacted})"));
                            let _ = tx.send(error_line(&e)).await;
                            return;
                        }
                        Some(Err(StorageError::WatcherLagged)) => {
                            let e = ApiError::expired("watch fell behind; re-list".to_string());
                            let _ = tx.send(error_line(&e)).await;
                            return;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(error_line(&ApiError::internal(e.to_string()))).await;
                            return;
                        }
                    };
                    last_rev = ev.revision;
                    let Ok(obj) = decode_event_value(&ev.value, ev.revision) else { continue };
                    let prev = ev.prev.as_deref().and_then(|pv| serde_json::from_slice::<Value>(pv).ok());
                    let matches = |o: &Value| p.labels.matches(o) && p.fields.matches(o);
                    let kind = match ev.kind {
                        EventKind::Delete => if matches(&obj) { Some("DELETED") } else { None },
                        EventKind::Put => {
                            let now = matches(&obj);
                            let before = !ev.created && prev.as_ref().is_some_and(matches);
                            match (before, now) {
                                (_, true) if ev.created || !before => Some("ADDED"),
                                (true, true) => Some("MODIFIED"),
                                (true, false) => Some("DELETED"),
                                _ => None,
                            }
                        }
                    };
                    if let Some(kind) = kind
                        && tx.send(line(kind, &render(&obj))).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}
