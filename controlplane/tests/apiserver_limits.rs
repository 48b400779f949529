//! Denial of service and bad input, over real sockets: a client that
//! never finishes its request head or TLS handshake is disconnected,
//! bodies over 3 MiB get 413, objects over 1.5 MiB get 422 (both stores),
//! unknown selector operators and crafted resourceVersions get 400, and
//! the connection and per-user watch caps hold.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{Backend, TestServer};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, ObjectMeta, PostParams, WatchParams};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn kube_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Read until EOF (or `limit`); Err when the server kept the connection open.
async fn read_to_eof(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return Err(out),
        }
    }
}

fn plain_http(cfg: &mut riptide_controlplane::apiserver::Config) {
    cfg.tls = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_client_is_disconnected() {
    let s = TestServer::start_with(Backend::Embedded, |c| {
        plain_http(c);
        c.limits.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = s.h().addr;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let t0 = std::time::Instant::now();
    let got = read_to_eof(&mut slow, Duration::from_secs(10)).await;
    assert!(got.is_ok(), "a client that never finished its headers was still connected after 10 s");
    assert!(t0.elapsed() < Duration::from_secs(5), "disconnected only after {:?}", t0.elapsed());
    // A prompt client on the same server is served.
    let mut fine = TcpStream::connect(addr).await.unwrap();
    fine.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let resp = read_to_eof(&mut fine, Duration::from_secs(10)).await.unwrap();
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_client_is_disconnected() {
    let s = TestServer::start_with(Backend::Embedded, |c| c.limits.tls_handshake_timeout = Duration::from_secs(1)).await;
    let mut silent = TcpStream::connect(s.h().addr).await.unwrap();
    let t0 = std::time::Instant::now();
    assert!(read_to_eof(&mut silent, Duration::from_secs(10)).await.is_ok(), "a silent TLS client was kept for 10 s");
    assert!(t0.elapsed() < Duration::from_secs(5), "disconnected only after {:?}", t0.elapsed());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_queues_extra_clients() {
    let s = TestServer::start_with(Backend::Embedded, |c| {
        plain_http(c);
        c.limits.max_connections = 2;
    })
    .await;
    let addr = s.h().addr;
    let token = s.h().token.clone();
    let request = format!("GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    let hold1 = TcpStream::connect(addr).await.unwrap();
    let hold2 = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection was served while two were held with a cap of 2");
    drop(hold1);
    let resp = read_to_eof(&mut third, Duration::from_secs(10)).await.unwrap();
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));
    drop(hold2);
    s.shutdown().await;
}

async fn big_bodies_and_objects(b: Backend) {
    let s = TestServer::start(b).await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client().await, "default");
    let cm = |name: &str, bytes: usize| ConfigMap {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(BTreeMap::from([("blob".to_string(), "x".repeat(bytes))])),
        ..Default::default()
    };
    // 4 MiB request body: 413 before it is stored or even fully buffered.
    let e = cms.create(&PostParams::default(), &cm("huge", 4 << 20)).await.unwrap_err();
    assert_eq!(kube_code(&e), Some(413), "{e:?}");
    assert!(e.to_string().contains("Request entity too large"), "{e}");
    // 2 MiB object: under the body limit, over the store's value limit: 422.
    let e = cms.create(&PostParams::default(), &cm("big", 2 << 20)).await.unwrap_err();
    assert_eq!(kube_code(&e), Some(422), "{e:?}");
    assert!(e.to_string().contains("ConfigMap \"big\" is invalid") && e.to_string().contains("Too long"), "{e}");
    // Growing a stored object past the limit by update is refused the same way.
    cms.create(&PostParams::default(), &cm("grows", 1 << 20)).await.unwrap();
    let mut grown = cms.get("grows").await.unwrap();
    grown.data = cm("grows", 2 << 20).data;
    let e = cms.replace("grows", &PostParams::default(), &grown).await.unwrap_err();
    assert_eq!(kube_code(&e), Some(422), "{e:?}");
    // kubectl shows the message.
    let manifest = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: viakubectl}}\ndata: {{blob: {}}}\n", "y".repeat(2 << 20));
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&manifest)).await;
    assert!(!ok && err.contains("is invalid") && err.contains("Too long"), "{}", &err[..err.len().min(500)]);
    s.shutdown().await;
}
both_stores!(big_bodies_and_objects);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_selectors_and_resource_versions_are_400() {
    let s = TestServer::start(Backend::Embedded).await;
    let pods: Api<Pod> = Api::namespaced(s.client().await, "default");
    for sel in ["app~=web", "app>=1", "app in web", "a b"] {
        let e = pods.list(&ListParams::default().labels(sel)).await.unwrap_err();
        assert_eq!(kube_code(&e), Some(400), "labelSelector {sel}: {e:?}");
    }
    for sel in ["metadata.name>=a", "status.phase"] {
        let e = pods.list(&ListParams::default().fields(sel)).await.unwrap_err();
        assert_eq!(kube_code(&e), Some(400), "fieldSelector {sel}: {e:?}");
    }
    let (ok, _, err) = s.kubectl(&["get", "pods", "-l", "app~=web"]).await;
    assert!(!ok && err.contains("BadRequest") || err.contains("unable to parse requirement"), "{err}");
    for rv in ["99999999999999999999999", "-5", "12abc"] {
        let e = pods.watch(&WatchParams::default(), rv).await.err();
        assert_eq!(e.as_ref().and_then(kube_code), Some(400), "resourceVersion {rv}: {e:?}");
    }
    // An absurd timeoutSeconds is no deadline, not a crash.
    let client = s.client().await;
    let req = axum::http::Request::get("/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=18446744073709551615")
        .body(Vec::new())
        .unwrap();
    let w = client.request_stream(req).await.unwrap();
    let mut line = String::new();
    let mut w = Box::pin(w);
    let ended = tokio::time::timeout(Duration::from_millis(1500), futures::AsyncBufReadExt::read_line(&mut w, &mut line)).await;
    assert!(ended.is_err(), "the watch ended at once ({ended:?}, {line:?})");
    let (ok, _, _) = s.kubectl(&["get", "ns", "default"]).await;
    assert!(ok, "the server survived");
    s.shutdown().await;
}

/// Open a watch over plain HTTP; returns the connection and the status line.
async fn raw_watch(addr: std::net::SocketAddr, token: &str) -> (TcpStream, String) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), c.read(&mut b)).await.unwrap().unwrap(), 1, "connection closed");
        head.push(b[0]);
    }
    (c, String::from_utf8_lossy(&head).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_per_user_are_bounded() {
    // Raw HTTP: kube-rs would retry a 429 until a slot frees.
    let s = TestServer::start_with(Backend::Embedded, |c| {
        plain_http(c);
        c.limits.max_watches_per_user = 2;
    })
    .await;
    let (addr, token) = (s.h().addr, s.h().token.clone());
    let (w1, st1) = raw_watch(addr, &token).await;
    let (_w2, st2) = raw_watch(addr, &token).await;
    assert!(st1.contains(" 200") && st2.contains(" 200"), "{st1} / {st2}");
    let (_w3, st3) = raw_watch(addr, &token).await;
    assert!(st3.contains(" 429"), "third watch: {st3}");
    drop(w1);
    // The slot comes back once the server sees the stream gone.
    let mut last = String::new();
    for _ in 0..50 {
        let (w, st) = raw_watch(addr, &token).await;
        if st.contains(" 200") {
            drop(w);
            s.shutdown().await;
            return;
        }
        last = st;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("closing a watch did not free its slot: {last}");
}
