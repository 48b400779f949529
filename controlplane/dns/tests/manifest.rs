//! manifests/riptide-dns.yaml against riptide's apiserver with real
//! kubectl: a server-side dry run, then for real, then again unchanged; the
//! stored objects carry what the add-on needs (kube-dns at 10.43.0.10 on TCP
//! and UDP 53, RBAC exactly `watch::API_ACCESS`, probes on the endpoints the
//! binary serves, flags the binary accepts, Pod Security "restricted").
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod cp;

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use serde_json::Value;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../manifests/riptide-dns.yaml")
}

fn permissions(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules.as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    out.insert((g.as_str().unwrap().to_owned(), res.as_str().unwrap().to_owned(), v.as_str().unwrap().to_owned()));
                }
            }
        }
    }
    out
}

/// `kubectl get <args> -o json`.
async fn get(api: &cp::TestServer, args: &[&str]) -> Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&api.kubectl_ok(&a).await).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_manifest_applies_and_comes_back_complete() {
    let api = cp::TestServer::start(cp::Backend::Embedded).await;
    let file = manifest();
    let file = file.to_str().unwrap();

    let dry: Value = serde_json::from_str(&api.kubectl_ok(&["apply", "--dry-run=server", "-f", file, "-o", "json"]).await).unwrap();
    let kinds: Vec<&str> = dry["items"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]);

    // The add-on runs under Pod Security "restricted": with kube-system
    // enforcing it, applying warns about nothing and a pod made from the
    // template is admitted.
    api.kubectl_ok(&["label", "namespace", "kube-system", "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted"])
        .await;
    let (ok, out, err) = api.kubectl(&["apply", "-f", file]).await;
    assert!(ok, "{out}{err}");
    assert!(!err.contains("PodSecurity"), "{err}");
    assert_eq!(out.matches(" created").count(), 5, "{out}");
    let svc = get(&api, &["service", "kube-dns", "-n", "kube-system"]).await;
    assert_eq!(svc["spec"]["clusterIP"], "10.43.0.10");
    let ports: BTreeSet<(String, u64)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["protocol"].as_str().unwrap().to_owned(), p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports, [("TCP".to_owned(), 53), ("UDP".to_owned(), 53), ("TCP".to_owned(), 9153)].into_iter().collect());

    let role = get(&api, &["clusterrole", "riptide-dns"]).await;
    let want: BTreeSet<(String, String, String)> = riptide_dns::watch::API_ACCESS
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned())))
        .collect();
    assert_eq!(permissions(&role["rules"]), want, "the ClusterRole grants exactly what riptide-dns calls");
    let binding = get(&api, &["clusterrolebinding", "riptide-dns"]).await;
    assert_eq!(binding["subjects"][0]["namespace"], "kube-system");

    let deploy = get(&api, &["deployment", "riptide-dns", "-n", "kube-system"]).await;
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "riptide-dns");
    assert_eq!(deploy["spec"]["template"]["metadata"]["labels"]["k8s-app"], svc["spec"]["selector"]["k8s-app"]);
    let from_template = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "riptide-dns-restricted", "namespace": "kube-system"},
        "spec": pod,
    });
    let (ok, out, err) = api.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], Some(&from_template.to_string())).await;
    assert!(ok && !err.contains("PodSecurity"), "a pod of the DNS template under enforce=restricted: {out}{err}");
    let bad = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "riptide-dns-root", "namespace": "kube-system"},
        "spec": {"containers": [{"name": "c", "image": "localhost/riptide:0.1.0"}]},
    });
    let (ok, _, err) = api.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], Some(&bad.to_string())).await;
    assert!(!ok && err.contains("violates PodSecurity \"restricted:latest\""), "the namespace enforces restricted: {err}");
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 9153);

    // The binary accepts the manifest's command line: with an unreadable
    // kubeconfig it gets past flag parsing and fails on the kubeconfig.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--metrics=0.0.0.0:9153") && args.contains(&"--listen=0.0.0.0:53"), "{args:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_riptide-dns")).args(&args).args(["--kubeconfig", "/nonexistent/kubeconfig"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reading kubeconfig /nonexistent/kubeconfig"), "{err}");

    let again = api.kubectl_ok(&["apply", "-f", file]).await;
    assert_eq!(again.matches(" unchanged").count(), 5, "{again}");
    api.kubectl_ok(&["delete", "-f", file]).await;
    assert!(!api.kubectl(&["get", "service", "kube-dns", "-n", "kube-system"]).await.0);
    api.shutdown().await;
}
