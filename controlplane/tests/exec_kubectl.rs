//! `kubectl exec` end to end: real kubectl → the apiserver's `pods/exec`
//! upgrade proxy → (HTTPS, the apiserver's client certificate) the
//! kubelet's API server with its authentication and authorization in
//! front of `exec::router` (the same code the kubelet mounts) → real
//! processes. The endpoint's spawner runs the command on the host (the
//! kubelet's places it in the pod). Also: who the kubelet API refuses.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Backend, TestServer};
use futures::{SinkExt as _, StreamExt as _};
use riptide_controlplane::{
    apiserver::api::WriteOptions,
    credentials,
    exec::{self, ExecError, ExecRequest},
    kubelet::{
        self,
        auth::{CacheTtls, KubeletAuth},
        server::ServingTls,
    },
    registry,
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest as _, http::HeaderValue};

const NODE: &str = "exec-node";
const POD: &str = "shell";

/// The kubelet side: the kubelet's own API server (`kubelet::server::serve`:
/// HTTPS with a serving certificate the cluster CA issued for 127.0.0.1,
/// every request authenticated and authorized through the apiserver with
/// the node's own identity) on loopback, serving `exec::router` and a
/// `/containerLogs` route for the pod `POD` (containers "main" and "side")
/// in namespace default.
struct Kubelet {
    port: u16,
    _creds: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

async fn kubelet_endpoint(s: &TestServer) -> Kubelet {
    let spawner = exec::spawner_fn(|req: &ExecRequest| {
        if req.namespace != "default" || req.pod != POD {
            return Err(ExecError::NotFound(format!("pod {}/{} is not running on this node", req.namespace, req.pod)));
        }
        if req.container != "main" && req.container != "side" {
            return Err(ExecError::NotFound(format!("container {} is not running", req.container)));
        }
        let mut cmd = std::process::Command::new(&req.command[0]);
        cmd.args(&req.command[1..]).env("EXEC_CONTAINER", &req.container);
        Ok(cmd)
    });
    let logs = axum::routing::get(|axum::extract::Path((ns, pod, c)): axum::extract::Path<(String, String, String)>| async move {
        format!("log of {ns}/{pod}/{c}\n")
    });
    let app: axum::Router = exec::router(spawner)
        .route("/containerLogs/{ns}/{pod}/{container}", logs)
        .route("/healthz", axum::routing::get(|| async { "ok" }));

    let h = s.h();
    let creds = tempfile::tempdir().unwrap();
    let files = credentials::write_kubelet(h.pki.as_ref().unwrap(), &h.url, NODE, "127.0.0.1", creds.path()).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&files.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    // Denials cached briefly, so a grant shows within the test's wait.
    let ttls = CacheTtls { denied: std::time::Duration::from_secs(1), ..CacheTtls::default() };
    let auth = Arc::new(KubeletAuth::new(kube::Client::try_from(cfg).unwrap(), NODE.into(), ttls).unwrap());
    let serving = ServingTls {
        cert_pem: std::fs::read_to_string(&files.cert).unwrap(),
        key_pem: std::fs::read_to_string(&files.key).unwrap(),
        client_ca_pem: std::fs::read_to_string(&files.ca).unwrap(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = kubelet::server::serve(listener, &serving, app, auth).unwrap();
    Kubelet { port, _creds: creds, _task: task }
}

/// An apiserver with a Node advertising the endpoint and a Pod bound to it.
async fn setup() -> (TestServer, Kubelet) {
    let s = TestServer::start(Backend::Embedded).await;
    let kubelet = kubelet_endpoint(&s).await;
    let port = kubelet.port;
    let api = &s.h().api;
    let nodes = registry::find("", "v1", "nodes").unwrap();
    let pods = registry::find("", "v1", "pods").unwrap();
    api.create(
        nodes,
        None,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}}),
        &WriteOptions::default(),
    )
    .await
    .unwrap();
    api.create(
        pods,
        Some("default"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD},
            "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "busybox"}, {"name": "side", "image": "busybox"}]}}),
        &WriteOptions::default(),
    )
    .await
    .unwrap();
    // Running, as the kubelet would report it (kubectl port-forward checks).
    api.mutate(pods, Some("default"), POD, Some("status"), |p| {
        p["status"] = json!({"phase": "Running"});
        Ok(true)
    })
    .await
    .unwrap();
    (s, kubelet)
}

/// kubectl with its exit code.
async fn kubectl(s: &TestServer, args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--cache-dir")
        .arg(s.cache.path())
        .args(args)
        .env("KUBECONFIG", s.kubeconfig())
        .env("HOME", s.cache.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("kubectl must be installed");
    let mut si = child.stdin.take().unwrap();
    let input = stdin.map(<[u8]>::to_vec);
    let feeder = tokio::spawn(async move {
        if let Some(b) = input {
            let _ = si.write_all(&b).await;
        }
        drop(si);
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("kubectl timed out").unwrap();
    feeder.await.unwrap();
    let code = out.status.code().unwrap_or(-1);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("$ kubectl {} → {code}\n{}{err}", args.join(" "), String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(2000)]));
    (code, out.stdout, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stdout_stderr_and_exit_code() {
    let (s, _k) = setup().await;
    let (code, out, err) = kubectl(&s, &["exec", POD, "--", "sh", "-c", "echo out; echo err >&2; exit 3"], None).await;
    assert_eq!(code, 3, "kubectl passes the command's exit code through: {err}");
    assert_eq!(String::from_utf8_lossy(&out), "out\n");
    assert!(err.lines().any(|l| l == "err"), "stderr arrives on its own channel: {err:?}");

    let (code, out, _) = kubectl(&s, &["exec", POD, "--", "sh", "-c", "printf 'a b'; echo \"$0\" \"$EXEC_CONTAINER\"", "zero"], None).await;
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "a bzero main\n", "argv passes through unchanged; default container is the first");

    let (code, out, _) = kubectl(&s, &["exec", POD, "-c", "side", "--", "sh", "-c", "echo $EXEC_CONTAINER"], None).await;
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "side\n");

    // Killed by a signal: 128 + 9, like the container runtimes report it.
    let (code, _, _) = kubectl(&s, &["exec", POD, "--", "sh", "-c", "kill -9 $$"], None).await;
    assert_eq!(code, 137);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stdin() {
    let (s, _k) = setup().await;
    let (code, out, err) = kubectl(&s, &["exec", "-i", POD, "--", "cat"], Some(b"hello\nworld\n")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "hello\nworld\n");

    // 1 MiB of binary data through cat and back, byte for byte (many
    // frames each way, pipe back-pressure on both sides).
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (code, out, err) = kubectl(&s, &["exec", "-i", POD, "--", "cat"], Some(&data)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out == data, "round trip changed the data ({} bytes back)", out.len());

    // stdin closed (v5 close frame) lets a reader finish; its exit code still counts.
    let (code, out, _) = kubectl(&s, &["exec", "-i", POD, "--", "sh", "-c", "wc -l; exit 5"], Some(b"1\n2\n3\n")).await;
    assert_eq!(code, 5);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "3");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_errors_are_statuses() {
    let (s, _k) = setup().await;
    // kubectl looks the pod up first.
    let (code, _, err) = kubectl(&s, &["exec", "nosuch", "--", "true"], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("NotFound") && err.contains("pods \"nosuch\" not found"), "{err}");
    // The exec endpoint itself answers a missing pod with a 404 Status before upgrading.
    let (status, body) = ws_refused(&s, "/api/v1/namespaces/default/pods/nosuch/exec?command=true&stdout=true").await;
    assert_eq!(status, 404);
    assert_eq!((body["kind"].as_str(), body["reason"].as_str()), (Some("Status"), Some("NotFound")), "{body}");

    // Unknown container: 400 from the apiserver.
    let (code, _, err) = kubectl(&s, &["exec", POD, "-c", "nosuch", "--", "true"], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("container nosuch is not valid for pod shell"), "{err}");

    // A command that cannot start: an InternalError Status on channel 3.
    let (code, _, err) = kubectl(&s, &["exec", POD, "--", "/nonexistent/binary"], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/binary") && err.contains("No such file"), "{err}");

    // A pod without a node.
    let pods = registry::find("", "v1", "pods").unwrap();
    s.h().api
        .create(pods, Some("default"), json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pending"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}), &WriteOptions::default())
        .await
        .unwrap();
    let (code, _, err) = kubectl(&s, &["exec", "pending", "--", "true"], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("does not have a host assigned"), "{err}");

    // attach and port-forward: clear 501 Statuses.
    let (code, _, err) = kubectl(&s, &["attach", POD], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("pods/attach is not supported by riptide"), "{err}");
    let (code, _, err) = kubectl(&s, &["port-forward", &format!("pod/{POD}"), "0:80"], None).await;
    assert_ne!(code, 0);
    assert!(err.contains("pods/portforward is not supported by riptide"), "{err}");

    // Discovery lists the subresources.
    let (_, out, _) = kubectl(&s, &["get", "--raw", "/api/v1"], None).await;
    let doc: Value = serde_json::from_slice(&out).unwrap();
    let names: Vec<&str> = doc["resources"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
    for sub in ["pods/exec", "pods/attach", "pods/portforward", "pods/log"] {
        assert!(names.contains(&sub), "{sub} missing from {names:?}");
    }
    s.shutdown().await;
}

/// One request straight to the kubelet API over HTTPS (trusting the
/// cluster CA, no client certificate): its status and body.
async fn kubelet_request(s: &TestServer, port: u16, path: &str, token: Option<&str>, upgrade: bool) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(tls_config(s.h().ca_pem.as_deref().unwrap())).connect(name, tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, axum::body::Body>(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req = axum::http::Request::get(path).header("host", format!("127.0.0.1:{port}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if upgrade {
        req = req
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-protocol", "v5.channel.k8s.io");
    }
    let resp = send.send_request(req.body(axum::body::Body::empty()).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_api_authenticates_and_authorizes() {
    let (s, k) = setup().await;
    // Through the apiserver (its kubelet client certificate): both work.
    let (code, out, err) = kubectl(&s, &["logs", POD, "-c", "side"], None).await;
    assert_eq!((code, String::from_utf8_lossy(&out).as_ref()), (0, "log of default/shell/side\n"), "{err}");
    let (code, out, err) = kubectl(&s, &["exec", POD, "--", "sh", "-c", "echo hi"], None).await;
    assert_eq!((code, String::from_utf8_lossy(&out).as_ref()), (0, "hi\n"), "{err}");

    let logs = format!("/containerLogs/default/{POD}/main");
    let exec = format!("/exec/default/{POD}/main?command=id&stdout=true");
    // No credentials: 401, for logs, exec and health alike.
    for (path, up) in [(logs.as_str(), false), (exec.as_str(), true), ("/healthz", false)] {
        assert_eq!(kubelet_request(&s, k.port, path, None, up).await, (401, "Unauthorized".into()), "{path}");
        assert_eq!(kubelet_request(&s, k.port, path, Some("not-a-token"), up).await.0, 401, "{path} with a bad token");
    }

    // A ServiceAccount token is a valid identity (TokenReview) without
    // rights on the node: 403 naming the user, verb and subresource.
    s.kubectl_ok(&["create", "serviceaccount", "app"]).await;
    let token = s.kubectl_ok(&["create", "token", "app"]).await.trim().to_string();
    let user = "system:serviceaccount:default:app";
    assert_eq!(
        kubelet_request(&s, k.port, &logs, Some(&token), false).await,
        (403, format!("Forbidden (user={user}, verb=get, resource=nodes, subresource=proxy)"))
    );
    assert_eq!(
        kubelet_request(&s, k.port, &exec, Some(&token), true).await,
        (403, format!("Forbidden (user={user}, verb=create, resource=nodes, subresource=proxy)")),
        "a WebSocket exec asks for create"
    );
    // Granted nodes/proxy, the same token gets in.
    let grant = b"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: node-proxy}
rules: [{apiGroups: [''], resources: [nodes/proxy], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: app-node-proxy}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-proxy}
subjects: [{kind: ServiceAccount, name: app, namespace: default}]
";
    let (code, _, err) = kubectl(&s, &["apply", "-f", "-"], Some(grant)).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        common::eventually(10, || async { kubelet_request(&s, k.port, &logs, Some(&token), false).await == (200, "log of default/shell/main\n".into()) }).await,
        "nodes/proxy get lets the token read logs"
    );
    assert_eq!(kubelet_request(&s, k.port, &exec, Some(&token), true).await.0, 403, "but not exec (create)");
    // The admin token (system:masters) may do anything.
    assert_eq!(kubelet_request(&s, k.port, "/healthz", Some(&s.h().token), false).await, (200, "ok".into()));
    s.shutdown().await;
}

// ---- A raw WebSocket client (TLS to the apiserver, like kubectl). ----

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn tls_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn ws_connect(s: &TestServer, path: &str, protocols: &str) -> Result<(Ws, Option<String>), tungstenite::Error> {
    let h = s.h();
    let tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(h.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls_config(h.ca_pem.as_deref().unwrap())).connect(name, tcp).await.unwrap();
    let mut req = format!("wss://{}{path}", h.addr).into_client_request().unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {}", h.token)).unwrap());
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(protocols).unwrap());
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await?;
    let proto = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok((ws, proto))
}

/// A refused upgrade: its HTTP status and Status body.
async fn ws_refused(s: &TestServer, path: &str) -> (u16, Value) {
    match ws_connect(s, path, "v5.channel.k8s.io").await {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("upgrade to {path} succeeded"),
    }
}

/// Everything the server sends until it closes: data per channel, the
/// status (channel 3), and whether a pong arrived.
#[derive(Default, Debug)]
struct Session {
    out: Vec<u8>,
    err: Vec<u8>,
    status: Option<Value>,
    pongs: usize,
    closed_normally: bool,
}

async fn collect(ws: &mut Ws) -> Session {
    let mut s = Session::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(Some(m)) = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), ws.next()).await {
        match m.unwrap() {
            Message::Binary(b) => match b.first() {
                Some(1) => s.out.extend_from_slice(&b[1..]),
                Some(2) => s.err.extend_from_slice(&b[1..]),
                Some(3) => s.status = Some(serde_json::from_slice(&b[1..]).unwrap()),
                other => panic!("unexpected channel {other:?}"),
            },
            Message::Pong(_) => s.pongs += 1,
            Message::Close(f) => {
                s.closed_normally = f.is_some_and(|f| f.code == tungstenite::protocol::frame::coding::CloseCode::Normal);
            }
            _ => {}
        }
    }
    s
}

fn bin(ch: u8, data: &[u8]) -> Message {
    let mut v = vec![ch];
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

const EXEC: &str = "/api/v1/namespaces/default/pods/shell/exec";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_websocket_protocol() {
    let (s, _k) = setup().await;

    // v5 through the proxy: the kubelet's subprotocol comes back, pings are
    // answered, the status ends the session with a normal close.
    let (mut ws, proto) =
        ws_connect(&s, &format!("{EXEC}?command=sh&command=-c&command=sleep+0.5%3B+echo+done&stdout=true&stderr=true"), "v5.channel.k8s.io")
            .await
            .unwrap();
    assert_eq!(proto.as_deref(), Some("v5.channel.k8s.io"));
    ws.send(Message::Ping(Bytes::from_static(b"hb"))).await.unwrap();
    let r = collect(&mut ws).await;
    assert_eq!(r.out, b"done\n");
    assert_eq!(r.status.as_ref().unwrap()["status"], "Success", "{r:?}");
    assert!(r.pongs >= 1, "ping not answered: {r:?}");
    assert!(r.closed_normally, "{r:?}");

    // v4 still works (no stream close frames in v4, so no stdin here).
    let (mut ws, proto) =
        ws_connect(&s, &format!("{EXEC}?command=sh&command=-c&command=echo+v4%3B+exit+7&stdout=true"), "v4.channel.k8s.io").await.unwrap();
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    let r = collect(&mut ws).await;
    assert_eq!(r.out, b"v4\n");
    let st = r.status.unwrap();
    assert_eq!((st["status"].as_str(), st["reason"].as_str()), (Some("Failure"), Some("NonZeroExitCode")));
    assert_eq!(st["details"]["causes"][0], json!({"reason": "ExitCode", "message": "7"}));

    // No supported subprotocol: a 400 Status from the kubelet side, passed through.
    let (code, body) = match ws_connect(&s, &format!("{EXEC}?command=true&stdout=true"), "channel.k8s.io").await {
        Err(tungstenite::Error::Http(resp)) => {
            (resp.status().as_u16(), serde_json::from_slice::<Value>(&resp.body().clone().unwrap_or_default()).unwrap())
        }
        other => panic!("expected a refused upgrade, got {:?}", other.map(|x| x.1)),
    };
    assert_eq!(code, 400);
    assert!(body["message"].as_str().unwrap().contains("v5.channel.k8s.io"), "{body}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_and_resize() {
    let (s, _k) = setup().await;
    // The shell waits for a line, so the resize (sent first) is applied
    // before `stty size` runs.
    let cmd = "read x; stty size; tty; echo got:$x";
    let q = format!("{EXEC}?command=sh&command=-c&command={}&stdin=true&stdout=true&stderr=true&tty=true", urlencode(cmd));
    let (mut ws, _) = ws_connect(&s, &q, "v5.channel.k8s.io").await.unwrap();
    ws.send(bin(4, br#"{"Width":101,"Height":42}"#)).await.unwrap();
    ws.send(bin(0, b"hi\r")).await.unwrap();
    let r = collect(&mut ws).await;
    let out = String::from_utf8_lossy(&r.out);
    assert!(out.contains("42 101\r\n"), "terminal size not applied: {out:?}");
    assert!(out.contains("/dev/pts/"), "not a terminal: {out:?}");
    assert!(out.contains("got:hi\r\n"), "{out:?}");
    assert!(r.err.is_empty(), "a terminal has no separate stderr");
    assert_eq!(r.status.unwrap()["status"], "Success");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_kubectl() {
    // kubectl -it needs a terminal of its own: script(1) gives it one.
    let (s, _k) = setup().await;
    let line = format!(
        "kubectl --cache-dir {} exec -it {POD} -- sh -c 'tty; stty size; exit 4'",
        s.cache.path().display()
    );
    let out = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("KUBECONFIG", s.kubeconfig())
        .env("HOME", s.cache.path())
        .env("COLUMNS", "90")
        .env("LINES", "30")
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert_eq!(out.status.code(), Some(4), "{text:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_client_gone_kills_the_process() {
    let (s, _k) = setup().await;
    let (mut ws, _) =
        ws_connect(&s, &format!("{EXEC}?command=sh&command=-c&command=echo+%24%24%3B+exec+sleep+300&stdout=true"), "v5.channel.k8s.io")
            .await
            .unwrap();
    let pid: i32 = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Binary(b) if b.first() == Some(&1) => break String::from_utf8_lossy(&b[1..]).trim().parse().unwrap(),
            _ => {}
        }
    };
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(ws);
    let gone = common::eventually(15, || async move { !std::path::Path::new(&format!("/proc/{pid}")).exists() }).await;
    assert!(gone, "process {pid} still running after the client went away");
    s.shutdown().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A kubelet API impostor on 127.0.0.2: serves `/containerLogs` and counts
/// the requests that got through TLS and authentication.
async fn impostor(s: &TestServer, cert_pem: String, key_pem: String) -> (u16, Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    let app: axum::Router = axum::Router::new().route(
        "/containerLogs/{ns}/{pod}/{container}",
        axum::routing::get(move || {
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { "stolen\n" }
        }),
    );
    let serving = ServingTls { cert_pem, key_pem, client_ca_pem: s.h().ca_pem.clone().unwrap() };
    let auth = Arc::new(KubeletAuth::new(s.client().await, "impostor".into(), CacheTtls::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (port, hits, kubelet::server::serve(listener, &serving, app, auth).unwrap())
}

/// The apiserver dials a kubelet only when its certificate is the cluster
/// CA's and names the Node's InternalIP: a Node pointed at another
/// listener (an impostor with a real kubelet certificate for another
/// address, or a self-signed one for the right address) gets no logs, no
/// exec, and no apiserver client certificate handshake completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_refuses_kubelets_whose_certificate_is_not_for_the_node() {
    let (s, _k) = setup().await;
    let api = &s.h().api;
    let (nodes, pods) = (registry::find("", "v1", "nodes").unwrap(), registry::find("", "v1", "pods").unwrap());
    let creds = tempfile::tempdir().unwrap();
    // A certificate the CA really issued, for 127.0.0.1 (another node's address).
    let other = credentials::write_kubelet(s.h().pki.as_ref().unwrap(), &s.h().url, "other", "127.0.0.1", creds.path()).unwrap();
    let wrong_ip = (std::fs::read_to_string(&other.cert).unwrap(), std::fs::read_to_string(&other.key).unwrap());
    // A certificate for the right address that the CA never saw.
    let own = rcgen::generate_simple_self_signed(vec!["127.0.0.2".to_string()]).unwrap();
    let self_signed = (own.cert.pem(), own.key_pair.serialize_pem());
    for (node, (cert, key)) in [("wrong-ip", wrong_ip), ("self-signed", self_signed)] {
        let (port, hits, task) = impostor(&s, cert, key).await;
        let node_obj = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.2"}], "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}});
        api.create(nodes, None, node_obj, &WriteOptions::default()).await.unwrap();
        let pod = format!("on-{node}");
        let pod_obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]}});
        api.create(pods, Some("default"), pod_obj, &WriteOptions::default()).await.unwrap();
        api.mutate(pods, Some("default"), &pod, Some("status"), |p| {
            p["status"] = json!({"phase": "Running"});
            Ok(true)
        })
        .await
        .unwrap();
        let (code, out, err) = kubectl(&s, &["logs", &pod], None).await;
        assert_ne!(code, 0, "{node}: logs from an impostor: {}", String::from_utf8_lossy(&out));
        assert!(err.contains("127.0.0.2") && err.to_lowercase().contains("certificate"), "{node}: {err}");
        let (code, _, err) = kubectl(&s, &["exec", &pod, "--", "true"], None).await;
        assert_ne!(code, 0, "{node}: exec through an impostor: {err}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "{node}: the impostor was reached");
        task.abort();
    }
    // The real kubelet at the same time still answers.
    let (code, out, err) = kubectl(&s, &["logs", POD], None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), format!("log of default/{POD}/main\n"));
    s.shutdown().await;
}
