//! Authentication and RBAC end to end with real kubectl: static tokens
//! (admin, a namespace editor, a viewer), a client certificate, a
//! ServiceAccount token from `kubectl create token`, a kubelet's
//! certificate (`system:node:n1`, the Node authorizer), the agent's
//! ServiceAccount under `manifests/riptide.yaml`'s ClusterRole, a client
//! without credentials, and the token of a real pod's `default`
//! ServiceAccount bound to that pod (which upstream gives nothing beyond
//! discovery, `whoami` and `can-i`), each run through the same operations;
//! the allow/deny outcome is compared with the expected matrix (printed
//! whole on a mismatch). Also `kubectl auth whoami`, `auth can-i`,
//! TokenReview, the exact Forbidden message, and tokens that die with
//! their pod and their ServiceAccount. Verbs: get, list, watch, create,
//! patch, delete, deletecollection (writes as server-side dry runs) and a
//! `services/status` write, which upstream grants not even `edit`.
//!
//! The ServiceAccount controller and admission on both stores: every
//! namespace gets `default` (again after a delete), pods run as it when
//! they name no account, and a pod naming a missing account is refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::{fmt::Write as _, path::PathBuf, process::Stdio, time::Duration};

use common::{Backend, TestServer, eventually};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::{Api, api::PostParams};
use riptide_controlplane::{apiserver::tls, credentials};

struct Identity {
    name: &'static str,
    kubeconfig: PathBuf,
    cache: tempfile::TempDir,
    /// Requests without credentials: kubectl cannot send them (it asks for
    /// a user name and password instead), so kube-rs sends each operation's
    /// request as kubectl would.
    anonymous: Option<kube::Client>,
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

/// The agent's Namespace, ServiceAccount, ClusterRole and binding, as
/// `manifests/riptide.yaml` ships them.
fn agent_rbac() -> String {
    let docs = include_str!("../../manifests/riptide.yaml").split("\n---");
    let wanted = ["kind: Namespace", "kind: ServiceAccount", "kind: ClusterRole\n", "kind: ClusterRoleBinding"];
    docs.filter(|d| wanted.iter().any(|k| d.contains(k))).collect::<Vec<_>>().join("\n---")
}

/// A kubeconfig that trusts the CA and presents no credentials.
fn anonymous_kubeconfig(url: &str, ca: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ca)
    )
}

async fn anonymous_client(url: &str, ca: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&anonymous_kubeconfig(url, ca)).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    kube::Client::try_from(cfg).unwrap()
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
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: team}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: team}
spec:
  selector: {app: web}
  ports: [{port: 80}]
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

/// An apiserver (embedded store) whose static token file is `tokens`
/// (upstream's csv format), written into `dir`.
async fn start_with_tokens(dir: &std::path::Path, tokens: &str) -> TestServer {
    let path = dir.join("tokens.csv");
    std::fs::write(&path, tokens).unwrap();
    TestServer::start_with(Backend::Embedded, move |c| c.token_file = Some(path)).await
}

/// A kubectl identity with its own kubeconfig (in `dir`) and cache.
fn identity(dir: &std::path::Path, name: &'static str, kubeconfig: String) -> Identity {
    let p = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&p, kubeconfig).unwrap();
    Identity { name, kubeconfig: p, cache: tempfile::tempdir().unwrap(), anonymous: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_with_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with_tokens(dir.path(), "admin-token,admin,admin,\"system:masters\"\ned-token,ed,ed-uid\nvi-token,vi,vi-uid,\"team-viewers\"\n").await;
    let h = s.h();
    let ca = h.ca_pem.clone().unwrap();
    let write = |name: &'static str, content: String| identity(dir.path(), name, content);
    let admin = write("admin", tls::kubeconfig(&h.url, Some(&ca), "admin-token"));
    // The ServiceAccount controller makes `team`'s `default` for the pod.
    let controllers = s.start_controllers().await;
    let client = s.client().await;
    let ready = eventually(20, || async { Api::<ServiceAccount>::namespaced(client.clone(), "kube-system").get_opt("default").await.ok().flatten().is_some() }).await;
    assert!(ready, "no ServiceAccount kube-system/default from the controller");
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", "-"], Some(SETUP)).await;
    assert!(ok, "setup: {out}{err}");
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", "-"], Some(&agent_rbac())).await;
    assert!(ok, "agent RBAC from manifests/riptide.yaml: {out}{err}");

    // The ServiceAccount's token through TokenRequest (protobuf from kubectl).
    let (ok, sa_token, err) = kubectl(&admin, &["create", "token", "robot", "-n", "team", "--duration=1h"], None).await;
    assert!(ok, "kubectl create token: {err}");
    let sa_token = sa_token.trim().to_string();
    assert_eq!(sa_token.split('.').count(), 3, "a JWT: {sa_token}");
    let (ok, agent_token, err) = kubectl(&admin, &["create", "token", "riptide-agent", "-n", "riptide-system"], None).await;
    assert!(ok, "agent token: {err}");
    // The pod's own token, as its kubelet asks for it: bound to the pod.
    let (ok, pod_token, err) =
        kubectl(&admin, &["create", "token", "default", "-n", "team", "--bound-object-kind=Pod", "--bound-object-name=web"], None).await;
    assert!(ok, "pod-bound token: {err}");
    let (ok, _, err) =
        kubectl(&admin, &["create", "token", "robot", "-n", "team", "--bound-object-kind=Pod", "--bound-object-name=web"], None).await;
    assert!(!ok && err.contains("pod running with different serviceaccount name"), "a token for another account bound to the pod: {err}");
    let cert = h.pki.as_ref().unwrap().issue_client_cert("carol", &["cert-viewers"]).unwrap();
    let kubelet = credentials::write_kubelet(h.pki.as_ref().unwrap(), &h.url, "n1", "127.0.0.1", &dir.path().join("kubelet")).unwrap();
    let ids = [
        admin,
        write("editor", tls::kubeconfig(&h.url, Some(&ca), "ed-token")),
        write("viewer", tls::kubeconfig(&h.url, Some(&ca), "vi-token")),
        write("sa", tls::kubeconfig(&h.url, Some(&ca), &sa_token)),
        write("cert", tls::kubeconfig_with_cert(&h.url, &ca, "carol", &cert)),
        Identity { name: "kubelet", kubeconfig: kubelet.kubeconfig.clone(), cache: tempfile::tempdir().unwrap(), anonymous: None },
        write("agent", tls::kubeconfig(&h.url, Some(&ca), agent_token.trim())),
        Identity { anonymous: Some(anonymous_client(&h.url, &ca).await), ..write("anonymous", anonymous_kubeconfig(&h.url, &ca)) },
        write("pod-sa", tls::kubeconfig(&h.url, Some(&ca), pod_token.trim())),
    ];

    // Who is who.
    for (id, want) in [
        (&ids[1], "ed"),
        (&ids[3], "system:serviceaccount:team:robot"),
        (&ids[4], "carol"),
        (&ids[5], "system:node:n1"),
        (&ids[6], "system:serviceaccount:riptide-system:riptide-agent"),
        (&ids[8], "system:serviceaccount:team:default"),
    ] {
        let (ok, out, err) = kubectl(id, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"], None).await;
        assert!(ok && out.starts_with(&format!("{want} ")), "whoami as {}: {out}{err}", id.name);
    }
    let (_, out, _) = kubectl(&ids[3], &["auth", "whoami", "-o", "jsonpath={.status.userInfo.groups}"], None).await;
    assert!(out.contains("system:serviceaccounts:team") && out.contains("system:authenticated"), "{out}");

    const SSAR: (&str, &str) = ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews");
    // (name, kubectl arguments, the request for kube-rs)
    let ops: &[(&str, &[&str], (&str, &str))] = &[
        ("list pods in team", &["get", "pods", "-n", "team"], ("GET", "/api/v1/namespaces/team/pods")),
        ("get configmap in team", &["get", "configmap", "seed", "-n", "team"], ("GET", "/api/v1/namespaces/team/configmaps/seed")),
        ("list secrets in team", &["get", "secrets", "-n", "team"], ("GET", "/api/v1/namespaces/team/secrets")),
        (
            "create configmap in team",
            &["create", "configmap", "x", "--from-literal=a=b", "-n", "team", "--dry-run=server"],
            ("POST", "/api/v1/namespaces/team/configmaps?dryRun=All"),
        ),
        (
            "delete configmap in team",
            &["delete", "configmap", "seed", "-n", "team", "--dry-run=server"],
            ("DELETE", "/api/v1/namespaces/team/configmaps/seed?dryRun=All"),
        ),
        (
            "watch pods in team",
            &["get", "--raw", "/api/v1/namespaces/team/pods?watch=1&timeoutSeconds=1"],
            ("GET", "/api/v1/namespaces/team/pods?watch=1&timeoutSeconds=1"),
        ),
        (
            "patch configmap in team",
            &["patch", "configmap", "seed", "-n", "team", "-p", r#"{"data":{"a":"c"}}"#, "--dry-run=server"],
            ("PATCH", "/api/v1/namespaces/team/configmaps/seed?dryRun=All"),
        ),
        (
            "deletecollection configmaps in team",
            &["delete", "--raw", "/api/v1/namespaces/team/configmaps?dryRun=All"],
            ("DELETE", "/api/v1/namespaces/team/configmaps?dryRun=All"),
        ),
        (
            "patch services/status in team",
            &["patch", "service", "front", "-n", "team", "--subresource=status", "-p", r#"{"status":{"loadBalancer":{}}}"#, "--dry-run=server"],
            ("PATCH", "/api/v1/namespaces/team/services/front/status?dryRun=All"),
        ),
        ("list pods in default", &["get", "pods", "-n", "default"], ("GET", "/api/v1/namespaces/default/pods")),
        ("list nodes", &["get", "nodes"], ("GET", "/api/v1/nodes")),
        ("create token in team", &["create", "token", "robot", "-n", "team"], ("POST", "/api/v1/namespaces/team/serviceaccounts/robot/token")),
        ("list rolebindings in team", &["get", "rolebindings", "-n", "team"], ("GET", "/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings")),
        ("can-i create pods/exec in team", &["auth", "can-i", "create", "pods", "--subresource=exec", "-n", "team"], SSAR),
        ("can-i list secrets cluster-wide", &["auth", "can-i", "list", "secrets", "-A"], SSAR),
        ("get pod web in team", &["get", "pod", "web", "-n", "team"], ("GET", "/api/v1/namespaces/team/pods/web")),
        ("whoami", &["auth", "whoami"], ("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews")),
        ("discovery (/apis)", &["get", "--raw", "/apis"], ("GET", "/apis")),
        ("version", &["get", "--raw", "/version"], ("GET", "/version")),
    ];
    const T: bool = true;
    const F: bool = false;
    //          admin editor viewer sa  cert kubelet agent anon pod-sa
    let want: &[[bool; 9]] = &[
        [T, T, T, T, T, T, T, F, F], // list pods in team
        [T, T, T, T, T, F, F, F, F], // get configmap: the kubelet only what its pods use
        [T, T, F, F, F, F, F, F, F], // list secrets
        [T, T, F, F, F, F, F, F, F], // create configmap
        [T, T, F, F, F, F, F, F, F], // delete configmap
        [T, T, T, T, T, T, T, F, F], // watch pods in team
        [T, T, F, F, F, F, F, F, F], // patch configmap
        [T, T, F, F, F, F, F, F, F], // deletecollection configmaps (edit has it, view not)
        [T, F, F, F, F, F, F, F, F], // patch services/status: not even edit (upstream), only controllers
        [T, F, F, F, F, T, T, F, F], // list pods in default
        [T, F, F, F, F, T, T, F, F], // list nodes
        [T, T, F, F, F, F, F, F, F], // create token: the kubelet only for its pods' accounts
        [T, F, F, F, F, F, F, F, F], // list rolebindings
        [T, T, F, F, F, F, F, F, F], // can-i pods/exec
        [T, F, F, F, F, F, F, F, F], // can-i list secrets -A
        [T, T, T, T, T, T, F, F, F], // get pod: the agent only lists and watches
        [T, T, T, T, T, T, T, F, T], // whoami (system:basic-user)
        [T, T, T, T, T, T, T, F, T], // discovery (system:discovery)
        [T, T, T, T, T, T, T, T, T], // version (system:public-info-viewer)
    ];
    let mut got = vec![[false; 9]; ops.len()];
    let mut log = String::new();
    for (i, (_, args, (method, path))) in ops.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            let (ok, out, err) = match &id.anonymous {
                None => kubectl(id, args, None).await,
                Some(c) => {
                    let req = axum::http::Request::builder().method(*method).uri(*path).header("content-type", "application/json");
                    match c.request_text(req.body(br#"{"metadata":{"name":"x"}}"#.to_vec()).unwrap()).await {
                        Ok(body) => (true, body, String::new()),
                        Err(e) => (false, String::new(), e.to_string()),
                    }
                }
            };
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
        for (i, (name, ..)) in ops.iter().enumerate() {
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

    // The dry-run writes of the matrix changed nothing.
    let (ok, out, err) = kubectl(&ids[0], &["get", "configmap", "seed", "-n", "team", "-o", "jsonpath={.data.a}"], None).await;
    assert!(ok && out == "b", "seed after dry-run patch and deletecollection: {out}{err}");

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
    // Anonymous through kube-rs too, for the raw paths and methods kubectl
    // does not send: 401 except the health and version endpoints.
    let anon = anonymous_client(&h.url, &ca).await;
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

    // The pod's token dies with its pod.
    let (ok, _, err) = kubectl(&ids[0], &["delete", "pod", "web", "-n", "team", "--wait=false"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = kubectl(&ids[8], &["auth", "whoami"], None).await;
    assert!(!ok && (err.contains("must be logged in") || err.contains("Unauthorized")), "token of a deleted pod: {err}");
    controllers.abort();

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

/// The ServiceAccount controller and admission, on `backend`.
async fn service_accounts(backend: Backend) {
    let s = TestServer::start(backend).await;
    let client = s.client().await;
    let pod = |name: &str, sa: Option<&str>| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "main", "image": "busybox"}]},
        }))
        .unwrap()
    };
    let pods = |ns: &str| Api::<Pod>::namespaced(client.clone(), ns);
    let sa_of = |p: &Pod| p.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default();
    let forbidden = |r: kube::Result<Pod>, sa: &str| match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            let want = format!("error looking up service account default/{sa}: serviceaccount \"{sa}\" not found");
            assert!(e.message.contains(&want), "{}", e.message);
        }
        other => panic!("a pod naming a missing account was admitted: {other:?}"),
    };

    // No controller manager yet, so no `default` anywhere: a pod naming
    // none is admitted all the same (see admission.rs), one naming a
    // missing account is not.
    let p = pods("default").create(&PostParams::default(), &pod("early", None)).await.unwrap();
    assert_eq!(sa_of(&p), "default");
    forbidden(pods("default").create(&PostParams::default(), &pod("ghost", Some("ghost"))).await, "ghost");

    let controllers = s.start_controllers().await;
    let accounts = |ns: &str| Api::<ServiceAccount>::namespaced(client.clone(), ns);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let made = eventually(20, || async { accounts(ns).get_opt("default").await.ok().flatten().is_some() }).await;
        assert!(made, "no ServiceAccount {ns}/default");
    }
    // A pod right after its namespace: admission waits for the controller.
    s.kubectl_ok(&["create", "namespace", "fresh"]).await;
    let p = pods("fresh").create(&PostParams::default(), &pod("first", None)).await.unwrap();
    assert_eq!(sa_of(&p), "default");
    assert!(accounts("fresh").get_opt("default").await.unwrap().is_some());
    // Now that the controller runs, a missing `default` is refused too.
    forbidden(pods("default").create(&PostParams::default(), &pod("ghost", Some("ghost"))).await, "ghost");
    s.kubectl_ok(&["create", "serviceaccount", "ghost"]).await;
    let p = pods("default").create(&PostParams::default(), &pod("ghost", Some("ghost"))).await.unwrap();
    assert_eq!(sa_of(&p), "ghost");

    // Deleted, made again (a new object).
    let old_uid = accounts("fresh").get("default").await.unwrap().metadata.uid;
    s.kubectl_ok(&["delete", "serviceaccount", "default", "-n", "fresh"]).await;
    let again = eventually(20, || async {
        accounts("fresh").get_opt("default").await.ok().flatten().is_some_and(|a| a.metadata.uid != old_uid)
    })
    .await;
    assert!(again, "ServiceAccount fresh/default not recreated");
    controllers.abort();
    s.shutdown().await;
}
both_stores!(service_accounts);

/// The bootstrap roles and bindings at start: a deleted one is made again,
/// an edited one repaired, one annotated `autoupdate: "false"` left as the
/// operator made it (upstream's RBAC reconciliation), on `backend`.
async fn bootstrap_policy_repaired_at_start(backend: Backend) {
    async fn rules(s: &TestServer, role: &str) -> String {
        s.kubectl_ok(&["get", "clusterrole", role, "-o", "jsonpath={.rules}"]).await
    }
    let mut s = TestServer::start(backend).await;
    let scheduler_rules = rules(&s, "system:kube-scheduler").await;
    assert!(scheduler_rules.contains("bindings"), "{scheduler_rules}");
    let basic = rules(&s, "system:basic-user").await;
    s.kubectl_ok(&["delete", "clusterrolebinding", "system:discovery"]).await;
    s.kubectl_ok(&["delete", "clusterrole", "system:public-info-viewer"]).await;
    s.kubectl_ok(&["patch", "clusterrole", "system:kube-scheduler", "--type=merge", "-p", r#"{"rules":[]}"#]).await;
    s.kubectl_ok(&["annotate", "clusterrole", "system:basic-user", "rbac.authorization.kubernetes.io/autoupdate=false", "--overwrite"]).await;
    let narrowed = r#"{"rules":[{"apiGroups":["authorization.k8s.io"],"resources":["selfsubjectaccessreviews"],"verbs":["create"]}]}"#;
    s.kubectl_ok(&["patch", "clusterrole", "system:basic-user", "--type=merge", "-p", narrowed]).await;
    let mine = rules(&s, "system:basic-user").await;
    assert_ne!(mine, basic);

    s.restart(|_| {}).await;
    assert_eq!(rules(&s, "system:kube-scheduler").await, scheduler_rules, "edited bootstrap role repaired");
    assert_eq!(rules(&s, "system:basic-user").await, mine, "autoupdate=false: the operator's rules stay");
    let (ok, out, err) = s.kubectl(&["get", "clusterrolebinding", "system:discovery", "-o", "jsonpath={.roleRef.name}"]).await;
    assert!(ok && out == "system:discovery", "deleted binding made again: {out}{err}");
    let (ok, _, err) = s.kubectl(&["get", "clusterrole", "system:public-info-viewer"]).await;
    assert!(ok, "deleted role made again: {err}");
    s.shutdown().await;
}
both_stores!(bootstrap_policy_repaired_at_start);

/// Reviews about other users and rule lists, as clients send them:
/// `kubectl auth can-i --list` (SelfSubjectRulesReview), SubjectAccessReview
/// (what a webhook caller such as the kubelet asks) and
/// LocalSubjectAccessReview (namespace admins), and who may ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_for_other_users_and_rule_lists() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = "admin-token,admin,admin,\"system:masters\"\ned-token,ed,ed-uid\nvi-token,vi,vi-uid\nboss-token,boss,boss-uid\n";
    let s = start_with_tokens(dir.path(), tokens).await;
    let h = s.h();
    let ca = h.ca_pem.clone().unwrap();
    let id = |name: &'static str, token: &str| identity(dir.path(), name, tls::kubeconfig(&h.url, Some(&ca), token));
    let (admin, ed, vi, boss) = (id("admin", "admin-token"), id("ed", "ed-token"), id("vi", "vi-token"), id("boss", "boss-token"));
    let bindings = format!(
        "{SETUP}---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: admins, namespace: team}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}}
subjects: [{{kind: User, name: boss, apiGroup: rbac.authorization.k8s.io}}]
"
    );
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", "-"], Some(&bindings)).await;
    assert!(ok, "setup: {out}{err}");

    // can-i --list: the editor may create ConfigMaps in team, the viewer only read them.
    let line = |out: &str, res: &str| out.lines().find(|l| l.split_whitespace().next() == Some(res)).unwrap_or("").to_string();
    let (ok, out, err) = kubectl(&ed, &["auth", "can-i", "--list", "-n", "team"], None).await;
    assert!(ok, "{err}");
    let cm = line(&out, "configmaps");
    assert!(cm.contains("create") && cm.contains("deletecollection"), "editor's configmaps rule: {cm:?}\n{out}");
    let (ok, out, err) = kubectl(&vi, &["auth", "can-i", "--list", "-n", "team"], None).await;
    assert!(ok, "{err}");
    let cm = line(&out, "configmaps");
    assert!(cm.contains("get") && cm.contains("watch") && !cm.contains("create"), "viewer's configmaps rule: {cm:?}\n{out}");
    assert!(line(&out, "secrets").is_empty(), "view does not read secrets:\n{out}");
    let (_, out, _) = kubectl(&vi, &["auth", "can-i", "--list", "-n", "default"], None).await;
    assert!(line(&out, "configmaps").is_empty(), "nothing granted in default:\n{out}");

    // SubjectAccessReview about another user, cluster-scoped.
    let sar = |kind: &str, ns: &str, user: &str, verb: &str, res: &str| {
        let meta = if ns.is_empty() { String::new() } else { format!(r#""metadata":{{"namespace":"{ns}"}},"#) };
        format!(
            r#"{{"apiVersion":"authorization.k8s.io/v1","kind":"{kind}",{meta}"spec":{{"user":"{user}","resourceAttributes":{{"namespace":"{ns2}","verb":"{verb}","resource":"{res}"}}}}}}"#,
            ns2 = if ns.is_empty() { "team" } else { ns }
        )
    };
    async fn ask(who: &Identity, body: String) -> (bool, String, String) {
        kubectl(who, &["create", "--validate=false", "-f", "-", "-o", "jsonpath={.status.allowed}"], Some(&body)).await
    }
    for (user, verb, res, want) in [("vi", "get", "pods", "true"), ("vi", "create", "configmaps", "false"), ("ed", "create", "configmaps", "true"), ("nobody", "get", "pods", "false")] {
        let (ok, out, err) = ask(&admin, sar("SubjectAccessReview", "", user, verb, res)).await;
        assert!(ok && out == want, "SubjectAccessReview {user} {verb} {res} in team: {out}{err}");
    }
    // Namespace admins ask in their namespace (LocalSubjectAccessReview); a
    // viewer may ask neither kind, an admin of team not cluster-wide.
    let (ok, out, err) = ask(&boss, sar("LocalSubjectAccessReview", "team", "ed", "create", "configmaps")).await;
    assert!(ok && out == "true", "LocalSubjectAccessReview by team's admin: {out}{err}");
    let (ok, _, err) = ask(&boss, sar("LocalSubjectAccessReview", "default", "ed", "create", "configmaps")).await;
    assert!(!ok && err.contains("forbidden"), "team's admin asking in default: {err}");
    let (ok, _, err) = ask(&boss, sar("SubjectAccessReview", "", "ed", "create", "configmaps")).await;
    assert!(!ok && err.contains("forbidden"), "team's admin asking cluster-wide: {err}");
    let (ok, _, err) = ask(&vi, sar("SubjectAccessReview", "", "ed", "get", "pods")).await;
    assert!(!ok && err.contains("forbidden"), "a viewer reviewing others: {err}");
    // A review about nobody is invalid, as upstream says it.
    let empty = r#"{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{"resourceAttributes":{"verb":"get","resource":"pods"}}}"#;
    let (ok, _, err) = kubectl(&admin, &["create", "--validate=false", "-f", "-", "-o", "json"], Some(empty)).await;
    assert!(!ok && err.contains("at least one of user or group must be specified"), "{err}");
    s.shutdown().await;
}
