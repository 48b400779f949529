//! The apiserver driven by real kubectl v1.32, the kube-rs watcher and the
//! Python client, against both the embedded store and etcd.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Backend, TestServer, eventually};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt, watcher},
};

const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.25
        ports:
        - containerPort: 80
        env:
        - {name: A, value: \"1\"}
";

async fn kubectl_discovery_and_defaults(b: Backend) {
    let s = TestServer::start(b).await;
    let out = s.kubectl_ok(&["get", "ns"]).await;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(out.contains(ns), "{out}");
    }
    let out = s.kubectl_ok(&["get", "svc", "kubernetes", "-o", "wide"]).await;
    assert!(out.contains("10.43.0.1") && out.contains("443/TCP") && out.contains("SELECTOR"), "{out}");
    let out = s.kubectl_ok(&["api-resources"]).await;
    for want in ["deploy", "apps/v1", "endpointslices", "discovery.k8s.io/v1", "leases", "netpol", "cm", "ep", "po", "svc", "rs", "no"] {
        assert!(out.contains(want), "api-resources lacks {want}: {out}");
    }
    let out = s.kubectl_ok(&["api-resources", "--categories=all", "-o", "name"]).await;
    assert!(out.contains("deployments.apps") && out.contains("pods"), "{out}");
    s.kubectl_ok(&["version"]).await;
    s.shutdown().await;
}
both_stores!(kubectl_discovery_and_defaults);

async fn kubectl_apply_scale_expose_label(b: Backend) {
    let s = TestServer::start(b).await;
    let (ok, out, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(DEPLOY)).await;
    assert!(ok && out.contains("deployment.apps/web created"), "{out}{err}");
    let rv1 = s.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.metadata.resourceVersion}"]).await;
    let (ok, out, _) = s.kubectl_stdin(&["apply", "-f", "-"], Some(DEPLOY)).await;
    assert!(ok && out.contains("unchanged"), "{out}");
    let rv2 = s.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.metadata.resourceVersion}"]).await;
    assert_eq!(rv1, rv2, "a no-op apply must not write");
    let changed = DEPLOY.replace("replicas: 2", "replicas: 3").replace("nginx:1.25", "nginx:1.26");
    let (ok, out, _) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&changed)).await;
    assert!(ok && out.contains("configured"), "{out}");
    let out = s.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.metadata.generation}"]).await;
    assert_eq!(out, "3 nginx:1.26 2");
    let wide = s.kubectl_ok(&["get", "deploy", "-o", "wide"]).await;
    assert!(wide.contains("UP-TO-DATE") && wide.contains("CONTAINERS") && wide.contains("nginx:1.26") && wide.contains("app=web"), "{wide}");
    s.kubectl_ok(&["scale", "deploy", "web", "--replicas=5"]).await;
    assert_eq!(s.kubectl_ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]).await, "5");
    s.kubectl_ok(&["expose", "deploy", "web", "--port=80", "--target-port=8080", "--type=NodePort"]).await;
    let svc = s.kubectl_ok(&["get", "svc", "web"]).await;
    assert!(svc.contains("NodePort") && svc.contains("80:3"), "{svc}");
    s.kubectl_ok(&["label", "deploy", "web", "tier=fe"]).await;
    let out = s.kubectl_ok(&["get", "deploy", "--show-labels", "-A"]).await;
    assert!(out.contains("tier=fe") && out.contains("NAMESPACE"), "{out}");
    let out = s.kubectl_ok(&["get", "deploy", "-l", "tier=fe", "-o", "name"]).await;
    assert_eq!(out.trim(), "deployment.apps/web");
    let out = s.kubectl_ok(&["describe", "deploy", "web"]).await;
    assert!(out.contains("Replicas:") && out.contains("nginx:1.26") && out.contains("tier=fe"), "{out}");
    let out = s.kubectl_ok(&["get", "deploy", "web", "-o", "yaml"]).await;
    assert!(out.contains("kubectl.kubernetes.io/last-applied-configuration") && out.contains("uid:"), "{out}");
    s.kubectl_ok(&["delete", "deploy", "web"]).await;
    s.kubectl_ok(&["delete", "svc", "web"]).await;
    let out = s.kubectl_ok(&["get", "deploy,svc"]).await;
    assert!(!out.contains("web"), "{out}");
    s.shutdown().await;
}
both_stores!(kubectl_apply_scale_expose_label);

async fn kubectl_errors_are_statuses(b: Backend) {
    let s = TestServer::start(b).await;
    let bad = "apiVersion: v1\nkind: Pod\nmetadata: {name: BAD}\nspec: {containers: []}\n";
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(bad)).await;
    assert!(!ok && err.contains("is invalid") && err.contains("metadata.name") && err.contains("spec.containers: Required value"), "{err}");
    let unknown = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, bogus: 1}]}\n";
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(unknown)).await;
    assert!(!ok && err.contains("unknown field \"spec.containers[0].bogus\""), "{err}");
    let wrong_type = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x, ports: [{containerPort: \"x\"}]}]}\n";
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(wrong_type)).await;
    assert!(!ok && err.contains("BadRequest"), "{err}");
    let (ok, _, err) = s.kubectl(&["get", "pod", "nope"]).await;
    assert!(!ok && err.contains("NotFound") && err.contains("\"nope\" not found"), "{err}");
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: x}]}\n";
    s.kubectl_stdin(&["create", "-f", "-"], Some(pod)).await;
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(pod)).await;
    assert!(!ok && err.contains("AlreadyExists"), "{err}");
    // Unauthenticated requests get 401.
    let kc = std::fs::read_to_string(s.kubeconfig()).unwrap();
    let token = s.h().token.clone();
    let bad_kc = s.dir.path().join("bad.kubeconfig");
    std::fs::write(&bad_kc, kc.replace(&token, "wrong-token")).unwrap();
    let out = tokio::process::Command::new("kubectl")
        .args(["get", "pods", "--kubeconfig", bad_kc.to_str().unwrap(), "--cache-dir", s.cache.path().join("x").to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("must be logged in"), "{err}");
    s.shutdown().await;
}
both_stores!(kubectl_errors_are_statuses);

async fn kubectl_get_watch_and_tables(b: Backend) {
    let s = TestServer::start(b).await;
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p1, labels: {app: x}}\nspec: {nodeName: n1, containers: [{name: c, image: busybox}]}\n";
    let mut w = tokio::process::Command::new("kubectl")
        .args(["get", "pods", "-w", "--request-timeout=20s", "--cache-dir", s.cache.path().to_str().unwrap()])
        .env("KUBECONFIG", s.kubeconfig())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kubectl_stdin(&["create", "-f", "-"], Some(pod)).await;
    s.kubectl_ok(&["label", "pod", "p1", "x=y"]).await;
    let mut stdout = w.stdout.take().unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tokio::io::AsyncReadExt::read_buf(&mut stdout, &mut buf)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tokio::time::timeout(Duration::from_millis(500), tokio::io::AsyncReadExt::read_buf(&mut stdout, &mut buf)).await;
    let _ = w.kill().await;
    let seen = String::from_utf8_lossy(&buf);
    assert!(seen.contains("p1") && seen.contains("Pending"), "kubectl get -w saw: {seen}");
    let wide = s.kubectl_ok(&["get", "pods", "-o", "wide"]).await;
    assert!(wide.contains("NODE") && wide.contains("n1") && wide.contains("0/1"), "{wide}");
    let out = s.kubectl_ok(&["get", "pods", "--field-selector", "spec.nodeName=n1", "-o", "name"]).await;
    assert_eq!(out.trim(), "pod/p1");
    let out = s.kubectl_ok(&["get", "pods", "--field-selector", "spec.nodeName=n2", "-o", "name"]).await;
    assert_eq!(out.trim(), "");
    // Pods on a node terminate gracefully; grace 0 deletes at once.
    s.kubectl_ok(&["delete", "pod", "p1", "--grace-period=0", "--force"]).await;
    s.shutdown().await;
}
both_stores!(kubectl_get_watch_and_tables);

async fn kube_rs_watcher_and_resume(b: Backend) {
    let mut s = TestServer::start(b).await;
    let client = s.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mk = |n: &str| serde_json::from_value::<ConfigMap>(serde_json::json!({"metadata": {"name": n}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &mk("a")).await.unwrap();
    // The watcher (list then watch with bookmarks) sees existing and new objects.
    let stream = watcher(cms.clone(), watcher::Config::default()).applied_objects();
    futures::pin_mut!(stream);
    let first = tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("a"));
    cms.create(&PostParams::default(), &mk("b")).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.try_next()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.metadata.name.as_deref(), Some("b"));
    // Streaming list (sendInitialEvents) ends with the initial-events-end bookmark.
    let streaming = watcher(cms.clone(), watcher::Config::default().streaming_lists()).applied_objects();
    futures::pin_mut!(streaming);
    let mut names = Vec::new();
    for _ in 0..2 {
        let o = tokio::time::timeout(Duration::from_secs(10), streaming.try_next()).await.unwrap().unwrap().unwrap();
        names.push(o.metadata.name.unwrap());
    }
    names.sort();
    assert_eq!(names, ["a", "b"]);

    // Resume a watch from a resourceVersion across a restart.
    let rv = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    s.restart(|_| {}).await;
    let client = s.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(&PostParams::default(), &mk("c")).await.unwrap();
    let mut w = cms.watch(&WatchParams::default().timeout(5), &rv).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.metadata.name.as_deref(), Some("c")),
        other => panic!("expected ADDED c, got {other:?}"),
    }
    s.shutdown().await;
}
both_stores!(kube_rs_watcher_and_resume);

async fn watch_expired_then_relist(b: Backend) {
    // Embedded store with a tiny history: old revisions are compacted.
    let s = TestServer::start_with(b, |c| c.history_revisions = 5).await;
    let client = s.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let rv0 = cms.list(&ListParams::default()).await.unwrap().metadata.resource_version.unwrap();
    for i in 0..20 {
        let cm = serde_json::from_value::<ConfigMap>(serde_json::json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    if b == Backend::Etcd {
        // etcd compacts on its own schedule; ask it now.
        let mut c = etcd_client::Client::connect([s.etcd.as_ref().unwrap().endpoint.as_str()], None).await.unwrap();
        let rev = c.get("x", None).await.unwrap().header().unwrap().revision();
        c.compact(rev - 2, None).await.unwrap();
    }
    let mut w = cms.watch(&WatchParams::default().timeout(5), &rv0).await.unwrap().boxed();
    match tokio::time::timeout(Duration::from_secs(10), w.next()).await.unwrap().unwrap().unwrap() {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    // The kube-rs watcher re-lists on Expired and sees everything.
    let n = watcher(cms, watcher::Config::default()).applied_objects().take(20).try_collect::<Vec<_>>();
    assert_eq!(tokio::time::timeout(Duration::from_secs(15), n).await.unwrap().unwrap().len(), 20);
    s.shutdown().await;
}
both_stores!(watch_expired_then_relist);

async fn python_client(b: Backend) {
    let s = TestServer::start(b).await;
    let script = r#"
import sys
from kubernetes import client, config, watch
config.load_kube_config(sys.argv[1])
v1 = client.CoreV1Api()
apps = client.AppsV1Api()
names = [n.metadata.name for n in v1.list_namespace().items]
assert "kube-system" in names, names
v1.create_namespaced_config_map("default", {"metadata": {"name": "py", "labels": {"a": "b"}}, "data": {"x": "1"}})
v1.patch_namespaced_config_map("py", "default", {"data": {"y": "2"}})
cm = v1.read_namespaced_config_map("py", "default")
assert cm.data == {"x": "1", "y": "2"}, cm.data
dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
       "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
       "spec": {"containers": [{"name": "c", "image": "nginx", "env": [{"name": "E", "value": "1"}]}]}}}}
apps.create_namespaced_deployment("default", dep)
apps.patch_namespaced_deployment("d", "default", {"spec": {"template": {"spec": {"containers": [{"name": "c", "env": [{"name": "F", "value": "2"}]}]}}}})
d = apps.read_namespaced_deployment("d", "default")
envs = sorted(e.name for e in d.spec.template.spec.containers[0].env)
assert envs == ["E", "F"], envs
apps.patch_namespaced_deployment_scale("d", "default", {"spec": {"replicas": 4}})
assert apps.read_namespaced_deployment_scale("d", "default").spec.replicas == 4
lst = v1.list_namespaced_config_map("default", label_selector="a=b")
assert [c.metadata.name for c in lst.items] == ["py"]
w = watch.Watch()
seen = []
for ev in w.stream(v1.list_namespaced_config_map, "default", timeout_seconds=3):
    seen.append((ev["type"], ev["object"].metadata.name))
    if len(seen) >= 1:
        w.stop()
assert ("ADDED", "py") in seen, seen
try:
    v1.create_namespaced_config_map("default", {"metadata": {"name": "py"}})
    raise SystemExit("expected conflict")
except client.exceptions.ApiException as e:
    assert e.status == 409, e.status
print("python-ok")
"#;
    let out = tokio::process::Command::new("/usr/bin/python3")
        .args(["-c", script, s.kubeconfig().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && o.contains("python-ok"), "python client failed:\n{o}\n{e}");
    s.shutdown().await;
}
both_stores!(python_client);

async fn gc_and_namespace_deletion(b: Backend) {
    let s = TestServer::start(b).await;
    let client = s.client().await;
    let ns = "gc-test";
    s.kubectl_stdin(&["apply", "-f", "-"], Some(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"))).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let owner = cms.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner"}})).unwrap()).await.unwrap();
    let uid = owner.metadata.uid.clone().unwrap();
    for name in ["dep1", "dep2"] {
        let dep = serde_json::json!({"metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
        cms.create(&PostParams::default(), &serde_json::from_value(dep).unwrap()).await.unwrap();
    }
    // Orphan keeps dependents (without the reference).
    s.kubectl_ok(&["delete", "cm", "owner", "-n", ns, "--cascade=orphan"]).await;
    assert!(eventually(10, || async { cms.get_opt("owner").await.unwrap().is_none() }).await);
    let d1 = cms.get("dep1").await.unwrap();
    assert!(d1.metadata.owner_references.unwrap_or_default().is_empty());
    // Background deletes dependents.
    let owner = cms.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner2"}})).unwrap()).await.unwrap();
    let dep = serde_json::json!({"metadata": {"name": "dep3", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner2", "uid": owner.metadata.uid.unwrap()}]}});
    cms.create(&PostParams::default(), &serde_json::from_value(dep).unwrap()).await.unwrap();
    s.kubectl_ok(&["delete", "cm", "owner2", "-n", ns]).await;
    assert!(eventually(10, || async { cms.get_opt("dep3").await.unwrap().is_none() }).await, "dependent not collected");
    // Foreground: owner waits for its dependents.
    let owner = cms.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "owner3"}})).unwrap()).await.unwrap();
    let dep = serde_json::json!({"metadata": {"name": "dep4", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner3", "uid": owner.metadata.uid.unwrap(), "blockOwnerDeletion": true}]}});
    cms.create(&PostParams::default(), &serde_json::from_value(dep).unwrap()).await.unwrap();
    s.kubectl_ok(&["delete", "cm", "owner3", "-n", ns, "--cascade=foreground"]).await;
    assert!(cms.get_opt("owner3").await.unwrap().is_none() && cms.get_opt("dep4").await.unwrap().is_none());
    // Namespace deletion removes its contents, then the namespace.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})).unwrap()).await.unwrap();
    s.kubectl_ok(&["delete", "ns", ns, "--timeout=20s"]).await;
    let (ok, _, err) = s.kubectl(&["get", "ns", ns]).await;
    assert!(!ok && err.contains("NotFound"), "{err}");
    assert!(cms.list(&ListParams::default()).await.unwrap().items.is_empty());
    s.shutdown().await;
}
both_stores!(gc_and_namespace_deletion);

async fn service_allocation(b: Backend) {
    let s = TestServer::start(b).await;
    let svc = |name: &str, extra: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  selector: {{app: x}}\n  ports: [{{port: 80{extra}}}]\n");
    s.kubectl_stdin(&["create", "-f", "-"], Some(&svc("a", ", nodePort: 30080"))).await;
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&svc("b", ", nodePort: 30080"))).await;
    assert!(!ok && err.contains("is invalid") && err.contains("spec.ports[0].nodePort") && err.contains("already allocated"), "{err}");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&svc("c", ", nodePort: 40000"))).await;
    assert!(!ok && err.contains("not in the valid range"), "{err}");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&svc("d", "}]\n  clusterIP: 10.43.0.1\n  x: [{a: 1"))).await;
    assert!(!ok, "{err}");
    let out = s.kubectl_ok(&["get", "svc", "a", "-o", "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}"]).await;
    assert!(out.starts_with("10.43.") && out.ends_with(" 30080") && !out.starts_with("10.43.0.1 "), "{out}");
    s.kubectl_ok(&["delete", "svc", "a"]).await;
    // Released on delete: the port can be taken again.
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&svc("b", ", nodePort: 30080"))).await;
    assert!(ok, "{err}");
    // LoadBalancer with externalTrafficPolicy=Local gets a healthCheckNodePort.
    let lb = "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  ports: [{port: 80}]\n";
    s.kubectl_stdin(&["create", "-f", "-"], Some(lb)).await;
    let out = s.kubectl_ok(&["get", "svc", "lb", "-o", "jsonpath={.spec.healthCheckNodePort} {.spec.ports[0].nodePort}"]).await;
    let ports: Vec<u32> = out.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert!(ports.len() == 2 && ports[0] != ports[1] && ports.iter().all(|p| (30000..=32767).contains(p)), "{out}");
    // Many services: no duplicate ClusterIPs or NodePorts.
    let client = s.client().await;
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client, "default");
    for i in 0..20 {
        let svc = serde_json::json!({"metadata": {"name": format!("s{i}")}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        api.create(&PostParams::default(), &serde_json::from_value(svc).unwrap()).await.unwrap();
    }
    let all = api.list(&ListParams::default()).await.unwrap().items;
    let mut ips: Vec<String> = all.iter().map(|s| s.spec.as_ref().unwrap().cluster_ip.clone().unwrap()).collect();
    let mut nps: Vec<i32> = all.iter().flat_map(|s| s.spec.as_ref().unwrap().ports.clone().unwrap_or_default()).filter_map(|p| p.node_port).collect();
    let (n_ip, n_np) = (ips.len(), nps.len());
    ips.sort();
    ips.dedup();
    nps.sort_unstable();
    nps.dedup();
    assert_eq!((ips.len(), nps.len()), (n_ip, n_np));
    s.shutdown().await;
}
both_stores!(service_allocation);

async fn kubectl_create_generators_protobuf(b: Backend) {
    // Typed kubectl commands send protobuf bodies.
    let s = TestServer::start(b).await;
    s.kubectl_ok(&["create", "ns", "gen"]).await;
    s.kubectl_ok(&["create", "cm", "c1", "--from-literal=a=b", "-n", "gen"]).await;
    s.kubectl_ok(&["create", "secret", "generic", "s1", "--from-literal=x=y", "-n", "gen"]).await;
    s.kubectl_ok(&["create", "deployment", "d1", "--image=nginx:1.25", "--replicas=2", "--port=80", "-n", "gen"]).await;
    s.kubectl_ok(&["create", "service", "nodeport", "sv", "--tcp=80:8080", "-n", "gen"]).await;
    s.kubectl_ok(&["run", "p1", "--image=busybox", "-n", "gen", "--", "sleep", "10"]).await;
    let out = s.kubectl_ok(&["get", "deploy", "d1", "-n", "gen", "-o", "jsonpath={.spec.replicas} {.spec.selector.matchLabels.app} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"]).await;
    assert_eq!(out, "2 d1 nginx:1.25 80");
    let out = s.kubectl_ok(&["get", "cm", "c1", "-n", "gen", "-o", "jsonpath={.data.a}"]).await;
    assert_eq!(out, "b");
    let out = s.kubectl_ok(&["get", "secret", "s1", "-n", "gen", "-o", "jsonpath={.type} {.data.x}"]).await;
    assert_eq!(out, "Opaque eQ==");
    let out = s.kubectl_ok(&["get", "svc", "sv", "-n", "gen", "-o", "jsonpath={.spec.type} {.spec.ports[0].targetPort}"]).await;
    assert_eq!(out, "NodePort 8080");
    let out = s.kubectl_ok(&["get", "pod", "p1", "-n", "gen", "-o", "jsonpath={.spec.containers[0].args}"]).await;
    assert!(out.contains("sleep"), "{out}");
    s.shutdown().await;
}
both_stores!(kubectl_create_generators_protobuf);

/// kube-apiserver's endpoint reconciler: the `kubernetes` Service points at
/// the advertised address and secure port, and a deleted or edited
/// EndpointSlice is repaired; without a reachable address, no endpoints.
async fn kubernetes_service_endpoints(b: Backend) {
    let s = TestServer::start_with(b, |c| c.advertise_address = Some("198.18.0.1".parse().unwrap())).await;
    let port = s.h().addr.port();
    let want = format!("198.18.0.1 {port}");
    let slice = || s.kubectl(&["get", "endpointslice", "kubernetes", "-o", "jsonpath={.endpoints[0].addresses[0]} {.ports[0].port}"]);
    assert!(eventually(10, || async { slice().await.1 == want }).await, "slice: {:?}", slice().await);
    let ep = s.kubectl_ok(&["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[0].addresses[0].ip} {.subsets[0].ports[0].port}"]).await;
    assert_eq!(ep, want);
    let labels = s.kubectl_ok(&["get", "endpointslice", "kubernetes", "-o", "jsonpath={.metadata.labels.kubernetes\\.io/service-name} {.addressType} {.endpoints[0].conditions.ready}"]).await;
    assert_eq!(labels, "kubernetes IPv4 true");
    let target = s.kubectl_ok(&["get", "svc", "kubernetes", "-o", "jsonpath={.spec.ports[0].port} {.spec.ports[0].targetPort}"]).await;
    assert_eq!(target, format!("443 {port}"));
    // Deleted, then edited: both repaired by the next pass (every 10 s).
    s.kubectl_ok(&["delete", "endpointslice", "kubernetes"]).await;
    s.kubectl_ok(&["patch", "endpoints", "kubernetes", "--type=json", "-p", r#"[{"op":"replace","path":"/subsets/0/addresses/0/ip","value":"198.18.0.99"}]"#]).await;
    let ep = || s.kubectl(&["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[0].addresses[0].ip} {.subsets[0].ports[0].port}"]);
    assert!(eventually(25, || async { slice().await.1 == want && ep().await.1 == want }).await, "not repaired: {:?} {:?}", slice().await, ep().await);
    s.shutdown().await;

    // Loopback only (the default test server): nothing pods could reach.
    let s = TestServer::start(b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, _, err) = s.kubectl(&["get", "endpointslice", "kubernetes"]).await;
    assert!(!ok && err.contains("NotFound"), "{err}");
    s.shutdown().await;
}
both_stores!(kubernetes_service_endpoints);

/// kube-apiserver's `kubernetes.io/metadata.name` label (KEP-2161): set on
/// every Namespace, the start-up ones included, and kept equal to the name
/// whatever a client sends, because NetworkPolicy namespaceSelectors select
/// namespaces by name with it.
async fn namespace_name_label(b: Backend) {
    let s = TestServer::start(b).await;
    const LABEL: &str = "kubernetes.io/metadata.name";
    async fn label_of(s: &TestServer, ns: &str) -> String {
        s.kubectl_ok(&["get", "ns", ns, "-o", "jsonpath={.metadata.labels.kubernetes\\.io/metadata\\.name}"]).await
    }
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert_eq!(label_of(&s, ns).await, ns);
    }
    s.kubectl_ok(&["create", "ns", "x"]).await;
    let out = s.kubectl_ok(&["get", "ns", "x", "--show-labels"]).await;
    assert!(out.contains(&format!("{LABEL}=x")), "{out}");
    assert_eq!(s.kubectl_ok(&["get", "ns", "-l", &format!("{LABEL}=x"), "-o", "name"]).await.trim(), "namespace/x");
    // Removing it (a patch), overwriting it, and an apply without it: the
    // label stays equal to the name; other labels change as asked.
    s.kubectl_ok(&["label", "ns", "x", &format!("{LABEL}-"), "team=a"]).await;
    assert_eq!(label_of(&s, "x").await, "x");
    s.kubectl_ok(&["label", "ns", "x", &format!("{LABEL}=y"), "--overwrite"]).await;
    assert_eq!(label_of(&s, "x").await, "x");
    let (ok, out, err) = s.kubectl_stdin(&["replace", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: b}}\n")).await;
    assert!(ok, "{out}{err}");
    let out = s.kubectl_ok(&["get", "ns", "x", "--show-labels"]).await;
    assert!(out.contains(&format!("{LABEL}=x")) && out.contains("team=b"), "{out}");
    let (ok, out, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: applied, labels: {kubernetes.io/metadata.name: other}}\n")).await;
    assert!(ok, "{out}{err}");
    assert_eq!(label_of(&s, "applied").await, "applied");
    s.shutdown().await;
}
both_stores!(namespace_name_label);

/// A pod its kubelet is stopping stays in the API through status updates
/// and the removal of its last finalizer; only the kubelet's final delete
/// (gracePeriodSeconds=0) removes it, as upstream's shouldDeleteDuringUpdate.
/// Deleting it on any update cut the grace period of the pod's other
/// containers short.
async fn graceful_pod_delete_outlives_updates(b: Backend) {
    let s = TestServer::start(b).await;
    let (ok, out, err) = s
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(concat!(
                "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\n",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, finalizers: [example.com/hold]}\n",
                "spec: {nodeName: n1, terminationGracePeriodSeconds: 30, containers: [{name: c, image: x}]}\n",
            )),
        )
        .await;
    assert!(ok, "{out}{err}");
    s.kubectl_ok(&["delete", "pod", "p", "--wait=false"]).await;
    let grace = s.kubectl_ok(&["get", "pod", "p", "-o", "jsonpath={.metadata.deletionGracePeriodSeconds}"]).await;
    assert_eq!(grace.trim(), "30");
    s.kubectl_ok(&["patch", "pod", "p", "--subresource=status", "--type=merge", "-p", r#"{"status":{"phase":"Running"}}"#]).await;
    s.kubectl_ok(&["patch", "pod", "p", "--type=json", "-p", r#"[{"op":"remove","path":"/metadata/finalizers"}]"#]).await;
    let phase = s.kubectl_ok(&["get", "pod", "p", "-o", "jsonpath={.status.phase}"]).await;
    assert_eq!(phase.trim(), "Running", "the pod must outlive updates inside its grace period");
    s.kubectl_ok(&["delete", "pod", "p", "--grace-period=0", "--force"]).await;
    let (ok, out, err) = s.kubectl_stdin(&["get", "pod", "p"], None).await;
    assert!(!ok && err.contains("NotFound"), "{out}{err}");
}
both_stores!(graceful_pod_delete_outlives_updates);
