//! Authentication and RBAC end to end with real kubectl: static tokens,
//! a client certificate and a ServiceAccount token from `kubectl create
//! token`, each run through the same operations (anonymous requests are
//! sent by kube-rs, as kubectl prompts for a password instead); the
//! allow/deny outcome is compared with the expected matrix (printed whole
//! on a mismatch). Also `kubectl auth whoami`, `auth can-i`, TokenReview,
//! the exact Forbidden message, and a token that dies with its
//! ServiceAccount.
#![allow(clippy::unwrap_used)]

mod common;

use std::{fmt::Write as _, path::PathBuf, process::Stdio, time::Duration};

use common::{Backend, TestServer};
use riptide_controlplane::apiserver::tls;

struct Identity {
    name: &'static str,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
}

async fn kubectl(id: &Identity, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("kubectl")
        .args(args)
        .arg("--kubeconfig")
        .arg(&id.kubeconfig)
        .arg("--cache-dir")
        .arg(id.cache.path())
        .env("HOME", id.cache.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl must be installed");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).await.unwrap();
    }
    drop(child.stdin.take());
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("kubectl timed out").unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const SETUP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot, namespace: team}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: seed, namespace: team}
data: {a: b}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: editors, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
subjects: [{kind: User, name: ed, apiGroup: rbac.authorization.k8s.io}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects:
- {kind: User, name: vi, apiGroup: rbac.authorization.k8s.io}
- {kind: Group, name: cert-viewers, apiGroup: rbac.authorization.k8s.io}
- {kind: ServiceAccount, name: robot}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_with_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "admin-token,admin,admin,\"system:masters\"\ned-token,ed,ed-uid\nvi-token,vi,vi-uid,\"team-viewers\"\n").unwrap();
    let t = tokens.clone();
    let s = TestServer::start_with(Backend::Embedded, move |c| c.token_file = Some(t)).await;
    let h = s.h();
    let ca = h.ca_pem.clone().unwrap();
    let write = |name: &'static str, content: String| {
        let p = dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&p, content).unwrap();
        Identity { name, kubeconfig: p, cache: tempfile::tempdir().unwrap() }
    };
    let admin = write("admin", tls::kubeconfig(&h.url, Some(&ca), "admin-token"));
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", "-"], Some(SETUP)).await;
    assert!(ok, "setup: {out}{err}");

    // The ServiceAccount's token through TokenRequest (protobuf from kubectl).
    let (ok, sa_token, err) = kubectl(&admin, &["create", "token", "robot", "-n", "team", "--duration=1h"], None).await;
    assert!(ok, "kubectl create token: {err}");
    let sa_token = sa_token.trim().to_string();
    assert_eq!(sa_token.split('.').count(), 3, "a JWT: {sa_token}");
    let cert = h.pki.as_ref().unwrap().issue_client_cert("carol", &["cert-viewers"]).unwrap();
    let ids = [
        admin,
        write("editor", tls::kubeconfig(&h.url, Some(&ca), "ed-token")),
        write("viewer", tls::kubeconfig(&h.url, Some(&ca), "vi-token")),
        write("sa", tls::kubeconfig(&h.url, Some(&ca), &sa_token)),
        write("cert", tls::kubeconfig_with_cert(&h.url, &ca, "carol", &cert)),
    ];

    // Who is who.
    for (id, want) in [(&ids[1], "ed"), (&ids[3], "system:serviceaccount:team:robot"), (&ids[4], "carol")] {
        let (ok, out, err) = kubectl(id, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"], None).await;
        assert!(ok && out.starts_with(&format!("{want} ")), "whoami as {}: {out}{err}", id.name);
    }
    let (_, out, _) = kubectl(&ids[3], &["auth", "whoami", "-o", "jsonpath={.status.userInfo.groups}"], None).await;
    assert!(out.contains("system:serviceaccounts:team") && out.contains("system:authenticated"), "{out}");

    let ops: &[(&str, &[&str])] = &[
        ("list pods in team", &["get", "pods", "-n", "team"]),
        ("get configmap in team", &["get", "configmap", "seed", "-n", "team"]),
        ("list secrets in team", &["get", "secrets", "-n", "team"]),
        ("create configmap in team", &["create", "configmap", "x", "--from-literal=a=b", "-n", "team", "--dry-run=server"]),
        ("delete configmap in team", &["delete", "configmap", "seed", "-n", "team", "--dry-run=server"]),
        ("list pods in default", &["get", "pods", "-n", "default"]),
        ("list nodes", &["get", "nodes"]),
        ("create token in team", &["create", "token", "robot", "-n", "team"]),
        ("list rolebindings in team", &["get", "rolebindings", "-n", "team"]),
        ("can-i create pods/exec in team", &["auth", "can-i", "create", "pods", "--subresource=exec", "-n", "team"]),
        ("can-i list secrets cluster-wide", &["auth", "can-i", "list", "secrets", "-A"]),
    ];
    //                 admin  editor viewer sa     cert
    let want: &[[bool; 5]] = &[
        [true, true, true, true, true],
        [true, true, true, true, true],
        [true, true, false, false, false],
        [true, true, false, false, false],
        [true, true, false, false, false],
        [true, false, false, false, false],
        [true, false, false, false, false],
        [true, true, false, false, false],
        [true, false, false, false, false],
        [true, true, false, false, false],
        [true, false, false, false, false],
    ];
    let mut got = vec![[false; 5]; ops.len()];
    let mut log = String::new();
    for (i, (_, args)) in ops.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            let (ok, out, err) = kubectl(id, args, None).await;
            got[i][j] = ok;
            if ok != want[i][j] {
                let _ = writeln!(log, "{} `kubectl {}`: {}{}", id.name, args.join(" "), out.trim(), err.trim());
            }
        }
    }
    if got.iter().zip(want).any(|(g, w)| g != w) {
        let mut table = format!("{:34}", "");
        for id in &ids {
            let _ = write!(table, "{:>10}", id.name);
        }
        for (i, (name, _)) in ops.iter().enumerate() {
            let _ = write!(table, "\n{name:34}");
            for j in 0..ids.len() {
                let cell = match (got[i][j], want[i][j]) {
                    (true, true) => "allow",
                    (false, false) => "deny",
                    (true, false) => "ALLOW!",
                    (false, true) => "DENY!",
                };
                let _ = write!(table, "{cell:>10}");
            }
        }
        panic!("authorization matrix differs (ALLOW!/DENY! = unexpected):\n{table}\n\n{log}");
    }

    // Upstream's exact Forbidden message, and anonymous gets 401.
    let (_, _, err) = kubectl(&ids[2], &["get", "secrets", "-n", "team"], None).await;
    assert!(
        err.contains(r#"secrets is forbidden: User "vi" cannot list resource "secrets" in API group "" in the namespace "team""#),
        "{err}"
    );
    let (_, _, err) = kubectl(&ids[1], &["get", "configmap", "seed", "-n", "default"], None).await;
    assert!(
        err.contains(r#"configmaps "seed" is forbidden: User "ed" cannot get resource "configmaps" in API group "" in the namespace "default""#),
        "{err}"
    );
    // Anonymous (no credentials at all; kubectl would prompt for a password
    // instead of sending such a request, so kube-rs sends them): 401 except
    // the health and version endpoints.
    let anon = {
        let kc = kube::config::Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n",
            h.url,
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &ca)
        ))
        .unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
        kube::Client::try_from(cfg).unwrap()
    };
    for (method, path) in [("GET", "/api"), ("GET", "/apis"), ("GET", "/openapi/v3"), ("GET", "/api/v1/namespaces/team/pods"), ("GET", "/api/v1/nodes"),
        ("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews"), ("POST", "/api/v1/namespaces/team/serviceaccounts/robot/token")]
    {
        let req = axum::http::Request::builder().method(method).uri(path).header("content-type", "application/json").body(b"{}".to_vec()).unwrap();
        match anon.request_text(req).await {
            Err(kube::Error::Api(e)) if e.code == 401 => {}
            other => panic!("anonymous {method} {path}: {other:?}"),
        }
    }
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let req = axum::http::Request::get(path).body(Vec::new()).unwrap();
        assert!(anon.request_text(req).await.is_ok(), "anonymous GET {path}");
    }

    // TokenReview of the ServiceAccount token.
    let review = format!("{{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenReview\",\"spec\":{{\"token\":\"{sa_token}\"}}}}");
    let (ok, out, err) = kubectl(&ids[0], &["create", "--validate=false", "-f", "-", "-o", "jsonpath={.status.authenticated} {.status.user.username}"], Some(&review)).await;
    assert!(ok && out == "true system:serviceaccount:team:robot", "{out}{err}");
    let (ok, _, _) = kubectl(&ids[2], &["create", "--validate=false", "-f", "-", "-o", "json"], Some(&review)).await;
    assert!(!ok, "a viewer may not review tokens");

    // The token dies with its ServiceAccount.
    let (ok, _, err) = kubectl(&ids[0], &["delete", "serviceaccount", "robot", "-n", "team"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&ids[3], &["get", "pods", "-n", "team"], None).await;
    assert!(!ok && (err.contains("must be logged in") || err.contains("Unauthorized")), "{err}");
    s.shutdown().await;
}
