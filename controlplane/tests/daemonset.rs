//! The DaemonSet controller against the real apiserver, with real kubectl.
//! Nodes are API objects without kubelets; the test plays their kubelets
//! the way a kubelet talks to the API (pod status through the status
//! subresource, a deleted pod finished with grace 0), so readiness and
//! termination are under the test's control. Each test has its own
//! apiserver and controllers, so the tests of this file run side by side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Backend, TestServer, eventually};
use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet},
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use riptide_controlplane::controllers;
use serde_json::{Value, json};

const NS: &str = "default";

struct Cluster {
    srv: TestServer,
    client: Client,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Nodes whose (fake) kubelet does not make pods ready.
    stalled: Arc<Mutex<BTreeSet<String>>>,
}

impl Cluster {
    /// Apiserver + controllers (no scheduler: daemon pods are bound at
    /// creation) + the fake kubelets, which make a pod Ready
    /// `ready_after` after it appears.
    async fn start(ready_after: Duration) -> Self {
        Self::start_on(Backend::Embedded, ready_after).await
    }

    async fn start_on(backend: Backend, ready_after: Duration) -> Self {
        let srv = TestServer::start(backend).await;
        let client = srv.client().await;
        let cfg = controllers::Config {
            // The fake nodes never heartbeat; their readiness is set by hand.
            node_monitor_grace: Duration::from_secs(3600),
            resync: Duration::from_secs(1),
            ..Default::default()
        };
        let c = client.clone();
        let ctl = tokio::spawn(async move {
            if let Err(e) = controllers::run(c, cfg).await {
                eprintln!("controllers ended: {e}");
            }
        });
        let stalled: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let kubelets = tokio::spawn(fake_kubelets(client.clone(), ready_after, stalled.clone()));
        Self { srv, client, tasks: vec![ctl, kubelets], stalled }
    }

    async fn node(&self, name: &str, labels: Value, taints: Value, ready: bool) {
        let n: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}})).unwrap();
        Api::<Node>::all(self.client.clone()).create(&PostParams::default(), &n).await.unwrap();
        self.set_ready(name, ready).await;
    }

    async fn set_ready(&self, name: &str, ready: bool) {
        let t = k8s_openapi::jiff::Timestamp::now().to_string();
        let st = json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
            "reason": if ready { "KubeletReady" } else { "KubeletNotReady" }, "lastHeartbeatTime": t, "lastTransitionTime": t}]}});
        Api::<Node>::all(self.client.clone()).patch_status(name, &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
    }

    async fn patch_node(&self, name: &str, p: Value) {
        Api::<Node>::all(self.client.clone()).patch(name, &PatchParams::default(), &Patch::Merge(&p)).await.unwrap();
    }

    async fn apply(&self, yaml: &str) {
        let (ok, out, err) = self.srv.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await;
        assert!(ok, "kubectl apply: {out}{err}");
    }

    /// Pods of `ds` not being deleted, by node.
    async fn pods_by_node(&self, ds: &str) -> BTreeMap<String, Vec<Pod>> {
        let lp = ListParams::default().labels(&format!("app={ds}"));
        let mut out: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
        for p in Api::<Pod>::namespaced(self.client.clone(), NS).list(&lp).await.unwrap() {
            if p.metadata.deletion_timestamp.is_none() {
                out.entry(p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()).or_default().push(p);
            }
        }
        out
    }

    /// Pods on `nodes` stop (or, with an empty list, resume) turning Ready.
    fn stall(&self, nodes: &[&str]) {
        *self.stalled.lock().unwrap() = nodes.iter().map(ToString::to_string).collect();
    }

    /// Live pods of `ds` by revision hash.
    async fn by_hash(&self, ds: &str) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for p in self.pods_by_node(ds).await.into_values().flatten() {
            *out.entry(p.labels().get("controller-revision-hash").cloned().unwrap_or_default()).or_default() += 1;
        }
        out
    }

    /// Waits until the live pods of `ds` sit exactly on `nodes`, one each.
    async fn expect_nodes(&self, ds: &str, nodes: &[&str]) {
        let want: Vec<String> = nodes.iter().map(ToString::to_string).collect();
        let ok = eventually(30, || async { let m = self.pods_by_node(ds).await; m.keys().cloned().collect::<Vec<_>>() == want && m.values().all(|v| v.len() == 1) }).await;
        assert!(ok, "{ds}: want pods on {want:?}, have {:?}", self.pods_by_node(ds).await.iter().map(|(n, p)| (n.clone(), p.len())).collect::<Vec<_>>());
    }

    async fn ds(&self, name: &str) -> DaemonSet {
        Api::<DaemonSet>::namespaced(self.client.clone(), NS).get(name).await.unwrap()
    }

    async fn status(&self, name: &str) -> Value {
        serde_json::to_value(self.ds(name).await.status).unwrap()
    }

    /// Waits until every status field in `want` has its value.
    async fn expect_status(&self, name: &str, want: Value) {
        let ok = eventually(30, || async {
            let st = self.status(name).await;
            want.as_object().unwrap().iter().all(|(k, v)| st.get(k).unwrap_or(&json!(0)) == v)
        })
        .await;
        assert!(ok, "{name}: want status {want}, have {}", self.status(name).await);
    }

    async fn revisions(&self, ds: &str) -> Vec<(i64, String)> {
        let lp = ListParams::default().labels(&format!("app={ds}"));
        let mut v: Vec<(i64, String)> = Api::<ControllerRevision>::namespaced(self.client.clone(), NS)
            .list(&lp)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.revision, r.labels().get("controller-revision-hash").cloned().unwrap_or_default()))
            .collect();
        v.sort();
        v
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        self.srv.shutdown().await;
    }
}

/// The kubelets of all fake nodes: bound pods become Running and Ready
/// `ready_after` after creation (not on stalled nodes), deleted pods are
/// removed (grace 0) once seen, as after their containers stopped.
async fn fake_kubelets(client: Client, ready_after: Duration, stalled: Arc<Mutex<BTreeSet<String>>>) {
    let api: Api<Pod> = Api::namespaced(client, NS);
    loop {
        if let Ok(list) = api.list(&ListParams::default()).await {
            for p in list {
                let name = p.name_any();
                if p.metadata.deletion_timestamp.is_some() {
                    let _ = api.delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await;
                    continue;
                }
                let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else { continue };
                let ready = p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let age = p.metadata.creation_timestamp.as_ref().map_or(Duration::ZERO, |t| {
                    k8s_openapi::jiff::Timestamp::now().duration_since(t.0).unsigned_abs()
                });
                if ready || age < ready_after || stalled.lock().unwrap().contains(&node) {
                    continue;
                }
                let t = k8s_openapi::jiff::Timestamp::now().to_string();
                let st = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": t},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": t}]}});
                let _ = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&st)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn daemonset(name: &str, spec_extra: &str, pod_extra: &str) -> String {
    format!(
        r"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {name}
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: {name}
{spec_extra}
  template:
    metadata:
      labels:
        app: {name}
    spec:
{pod_extra}
      containers:
        - name: agent
          image: localhost/riptide:0.1.0
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_selector_affinity_taints_and_nodes() {
    let c = Cluster::start(Duration::from_millis(200)).await;
    c.node("n1", json!({"role": "edge", "zone": "a"}), json!([]), true).await;
    c.node("n2", json!({"role": "edge", "zone": "a"}), json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]), true).await;
    c.node("n3", json!({"role": "core", "zone": "a"}), json!([]), true).await;
    c.node("n4", json!({"role": "edge", "zone": "b"}), json!([]), true).await;
    c.apply(&daemonset(
        "edge",
        "",
        r"      nodeSelector:
        role: edge
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions:
                  - {key: zone, operator: NotIn, values: [b]}",
    ))
    .await;
    // n2's NoSchedule taint, n3's label and n4's zone keep pods off.
    c.expect_nodes("edge", &["n1"]).await;
    let pod = c.pods_by_node("edge").await.remove("n1").unwrap().remove(0);
    let pj = serde_json::to_value(&pod).unwrap();
    assert_eq!(
        pj.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution"),
        Some(&json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]})),
        "pinned the upstream way: {pj}"
    );
    let ds = c.ds("edge").await;
    assert_eq!(pod.labels().get("pod-template-generation"), Some(&ds.metadata.generation.unwrap().to_string()));
    let revs = c.revisions("edge").await;
    assert_eq!(revs.len(), 1, "{revs:?}");
    assert_eq!(pod.labels().get("controller-revision-hash"), Some(&revs[0].1));
    assert_eq!(pod.owner_references()[0].uid, ds.uid().unwrap());
    let tols: Vec<String> = pod.spec.as_ref().unwrap().tolerations.iter().flatten()
        .map(|t| format!("{}:{}", t.key.clone().unwrap_or_default(), t.effect.clone().unwrap_or_default())).collect();
    for want in ["node.kubernetes.io/not-ready:NoExecute", "node.kubernetes.io/unreachable:NoExecute",
                 "node.kubernetes.io/disk-pressure:NoSchedule", "node.kubernetes.io/memory-pressure:NoSchedule",
                 "node.kubernetes.io/pid-pressure:NoSchedule", "node.kubernetes.io/unschedulable:NoSchedule"] {
        assert!(tols.contains(&want.to_string()), "{want} missing from {tols:?}");
    }
    c.expect_status("edge", json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberReady": 1,
        "numberAvailable": 1, "updatedNumberScheduled": 1, "numberMisscheduled": 0, "numberUnavailable": 0})).await;

    // A node added later, and a node relabelled into the set, get pods.
    c.node("n5", json!({"role": "edge", "zone": "a"}), json!([]), true).await;
    c.patch_node("n3", json!({"metadata": {"labels": {"role": "edge"}}})).await;
    c.expect_nodes("edge", &["n1", "n3", "n5"]).await;
    // Cordoning keeps the pod (daemon pods tolerate unschedulable).
    c.patch_node("n5", json!({"spec": {"unschedulable": true}})).await;
    // A NoSchedule taint after the fact leaves the pod running, counted
    // as misscheduled.
    c.patch_node("n1", json!({"spec": {"taints": [{"key": "maint", "effect": "NoSchedule"}]}})).await;
    c.expect_status("edge", json!({"desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberMisscheduled": 1})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.expect_nodes("edge", &["n1", "n3", "n5"]).await;
    // Relabelled out of the set: removed. Deleted node: its pod goes.
    c.patch_node("n3", json!({"metadata": {"labels": {"role": "core"}}})).await;
    Api::<Node>::all(c.client.clone()).delete("n5", &DeleteParams::default()).await.unwrap();
    c.expect_nodes("edge", &["n1"]).await;
    c.expect_status("edge", json!({"desiredNumberScheduled": 0, "currentNumberScheduled": 0, "numberMisscheduled": 1})).await;

    // kubectl's columns.
    let out = c.srv.kubectl_ok(&["get", "ds", "edge", "--no-headers"]).await;
    let cols: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&cols[..7], &["edge", "0", "0", "0", "0", "0", "role=edge"], "{out}");
    let out = c.srv.kubectl_ok(&["get", "controllerrevisions"]).await;
    assert!(out.contains("daemonset.apps/edge"), "{out}");
    let out = c.srv.kubectl_ok(&["describe", "ds", "edge"]).await;
    assert!(out.contains("Desired Number of Nodes Scheduled: 0") && out.contains("Number of Nodes Misscheduled: 1"), "{out}");
    assert!(out.contains("SuccessfulCreate"), "events missing: {out}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_execute_evicts_and_not_ready_nodes_keep_their_agents() {
    let c = Cluster::start(Duration::from_millis(200)).await;
    for n in ["n1", "n2", "n3"] {
        c.node(n, json!({}), json!([]), true).await;
    }
    c.apply(&daemonset("plain", "", "")).await;
    c.apply(&daemonset("agent", "", "      hostNetwork: true\n      tolerations:\n        - operator: Exists")).await;
    c.expect_nodes("plain", &["n1", "n2", "n3"]).await;
    c.expect_nodes("agent", &["n1", "n2", "n3"]).await;

    // An untolerated NoExecute taint removes the pod.
    c.patch_node("n1", json!({"spec": {"taints": [{"key": "evict", "effect": "NoExecute"}]}})).await;
    c.expect_nodes("plain", &["n2", "n3"]).await;
    // A node going NotReady gets the not-ready taints from the node
    // lifecycle controller; daemon pods tolerate the NoExecute one, so
    // they are neither evicted nor deleted.
    c.set_ready("n2", false).await;
    let tainted = eventually(20, || async {
        let n = Api::<Node>::all(c.client.clone()).get("n2").await.unwrap();
        n.spec.and_then(|s| s.taints).unwrap_or_default().iter().any(|t| t.key == "node.kubernetes.io/not-ready" && t.effect == "NoExecute")
    })
    .await;
    assert!(tainted, "node lifecycle controller did not taint n2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.expect_nodes("plain", &["n2", "n3"]).await;
    // A node NotReady from the start: the NoSchedule not-ready taint keeps
    // a plain DaemonSet off, one that tolerates everything (the riptide
    // agent) lands there.
    c.node("n4", json!({}), json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                                   {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]), false).await;
    c.expect_nodes("agent", &["n1", "n2", "n3", "n4"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.expect_nodes("plain", &["n2", "n3"]).await;
    c.expect_status("plain", json!({"desiredNumberScheduled": 1, "currentNumberScheduled": 1, "numberMisscheduled": 1})).await;
    c.expect_status("agent", json!({"desiredNumberScheduled": 4, "currentNumberScheduled": 4})).await;
    // hostNetwork pods also tolerate network-unavailable.
    let p = c.pods_by_node("agent").await.remove("n4").unwrap().remove(0);
    assert!(p.spec.unwrap().tolerations.unwrap().iter().any(|t| t.key.as_deref() == Some("node.kubernetes.io/network-unavailable")));
    c.stop().await;
}

/// Samples the live pods of `ds` until `done` is set: the fewest nodes
/// with an available pod and the most live pods seen.
fn sample(c: &Cluster, ds: &'static str, done: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<(usize, usize)> {
    let api: Api<Pod> = Api::namespaced(c.client.clone(), NS);
    tokio::spawn(async move {
        let (mut min_avail, mut max_live) = (usize::MAX, 0);
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let pods = api.list(&ListParams::default().labels(&format!("app={ds}"))).await.unwrap();
            let live: Vec<&Pod> = pods.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            let avail: BTreeSet<String> = live
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect();
            min_avail = min_avail.min(avail.len());
            max_live = max_live.max(live.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (min_avail, max_live)
    })
}

/// Runs `change` and waits for `kubectl rollout status`; with `stalled`,
/// new pods first do not turn Ready, and `check` sees the rollout stuck
/// after its first step. Returns what the sampler saw.
async fn rollout<F, Fut>(c: &Cluster, ds: &'static str, change: &[&str], stalled: &[&str], check: F) -> (usize, usize)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = sample(c, ds, done.clone());
    c.stall(stalled);
    c.srv.kubectl_ok(change).await;
    check().await;
    c.stall(&[]);
    let out = c.srv.kubectl_ok(&["rollout", "status", &format!("ds/{ds}"), "--timeout=90s"]).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(out.contains("successfully rolled out"), "{out}");
    s.await.unwrap()
}

// Against both stores: the rollout leans on watch order and
// resourceVersions more than any other test here.
both_stores!(rolling_update_max_unavailable_history_and_undo);
async fn rolling_update_max_unavailable_history_and_undo(backend: Backend) {
    let c = Cluster::start_on(backend, Duration::from_millis(1500)).await;
    for n in ["n1", "n2", "n3", "n4"] {
        c.node(n, json!({}), json!([]), true).await;
    }
    c.apply(&daemonset("web", "  updateStrategy:\n    type: RollingUpdate\n    rollingUpdate:\n      maxUnavailable: 1", "")).await;
    let first = c.srv.kubectl_ok(&["rollout", "status", "ds/web", "--timeout=60s"]).await;
    assert!(first.contains("successfully rolled out"), "{first}");
    let old_hash = c.revisions("web").await[0].1.clone();
    let stuck = || async {
        // New pods never turn Ready: the rollout replaces one node and waits.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let h = c.by_hash("web").await;
        assert_eq!(h.get(&old_hash), Some(&3), "maxUnavailable=1 with an unready new pod: {h:?}");
        assert_eq!(h.values().sum::<usize>(), 4, "{h:?}");
    };
    let all = ["n1", "n2", "n3", "n4"];
    let (min_avail, max_live) = rollout(&c, "web", &["set", "image", "ds/web", "agent=localhost/riptide:0.2.0"], &all, stuck).await;
    assert_eq!(min_avail, 3, "maxUnavailable=1: one node at a time without an available pod, saw {min_avail} of 4 available");
    assert!(max_live <= 4, "no surge configured, yet {max_live} live pods");
    let revs = c.revisions("web").await;
    assert_eq!(revs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2], "{revs:?}");
    for (node, pods) in c.pods_by_node("web").await {
        assert_eq!(pods[0].labels().get("controller-revision-hash"), Some(&revs[1].1), "{node} not updated");
    }
    let generation = c.ds("web").await.metadata.generation.unwrap();
    c.expect_status("web", json!({"observedGeneration": generation, "desiredNumberScheduled": 4, "updatedNumberScheduled": 4,
        "numberAvailable": 4, "numberReady": 4, "numberUnavailable": 0})).await;

    // kubectl rollout history / undo read and write through the revisions.
    let hist = c.srv.kubectl_ok(&["rollout", "history", "ds/web"]).await;
    assert!(hist.lines().any(|l| l.starts_with("1 ")) && hist.lines().any(|l| l.starts_with("2 ")), "{hist}");
    let one = c.srv.kubectl_ok(&["rollout", "history", "ds/web", "--revision=1"]).await;
    assert!(one.contains("localhost/riptide:0.1.0"), "{one}");
    let (min_avail, _) = rollout(&c, "web", &["rollout", "undo", "ds/web"], &[], || async {}).await;
    assert!(min_avail >= 3, "undo: {min_avail} of 4 available");
    let image = c.ds("web").await.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("localhost/riptide:0.1.0"));
    // The old revision is reused under the next number.
    let after = c.revisions("web").await;
    assert_eq!(after, vec![(2, revs[1].1.clone()), (3, revs[0].1.clone())]);
    for (node, pods) in c.pods_by_node("web").await {
        assert_eq!(pods[0].labels().get("controller-revision-hash"), Some(&revs[0].1), "{node} not rolled back");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_max_surge_keeps_every_node_available() {
    let c = Cluster::start(Duration::from_millis(1500)).await;
    for n in ["n1", "n2", "n3", "n4"] {
        c.node(n, json!({}), json!([]), true).await;
    }
    c.apply(&daemonset("agent", "  updateStrategy:\n    type: RollingUpdate\n    rollingUpdate:\n      maxUnavailable: 0\n      maxSurge: 1", "")).await;
    c.srv.kubectl_ok(&["rollout", "status", "ds/agent", "--timeout=60s"]).await;
    let before = c.revisions("agent").await;
    let old_hash = before[0].1.clone();
    let stuck = || async {
        // The surged pod never turns Ready: every old pod stays, one extra.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let h = c.by_hash("agent").await;
        assert_eq!(h.get(&old_hash), Some(&4), "an old pod went before its replacement was available: {h:?}");
        assert_eq!(h.values().sum::<usize>(), 5, "maxSurge=1: {h:?}");
    };
    let all = ["n1", "n2", "n3", "n4"];
    let (min_avail, max_live) = rollout(&c, "agent", &["rollout", "restart", "ds/agent"], &all, stuck).await;
    assert_eq!(min_avail, 4, "a node lost its available pod during a surge rollout");
    assert!(max_live <= 5, "more than maxSurge=1 extra pod: {max_live}");
    assert!(max_live == 5, "the surge never happened (max {max_live} live pods)");
    let ds = c.ds("agent").await;
    let ann = ds.spec.unwrap().template.metadata.unwrap().annotations.unwrap_or_default();
    assert!(ann.contains_key("kubectl.kubernetes.io/restartedAt"), "{ann:?}");
    let after = c.revisions("agent").await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_ne!(after[1].1, before[0].1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_min_ready_and_history_limit() {
    let c = Cluster::start(Duration::from_millis(300)).await;
    for n in ["n1", "n2"] {
        c.node(n, json!({}), json!([]), true).await;
    }
    c.apply(&daemonset("od", "  revisionHistoryLimit: 1\n  minReadySeconds: 3\n  updateStrategy:\n    type: OnDelete", "")).await;
    c.expect_nodes("od", &["n1", "n2"]).await;
    // Ready at once, available only after minReadySeconds.
    c.expect_status("od", json!({"numberReady": 2, "numberAvailable": 0, "numberUnavailable": 2})).await;
    c.expect_status("od", json!({"numberReady": 2, "numberAvailable": 2, "numberUnavailable": 0})).await;
    let old_hash = c.revisions("od").await[0].1.clone();

    c.srv.kubectl_ok(&["set", "image", "ds/od", "agent=localhost/riptide:0.2.0"]).await;
    let generation = c.ds("od").await.metadata.generation.unwrap();
    c.expect_status("od", json!({"observedGeneration": generation, "updatedNumberScheduled": 0, "currentNumberScheduled": 2})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for pods in c.pods_by_node("od").await.values() {
        assert_eq!(pods[0].labels().get("controller-revision-hash"), Some(&old_hash), "OnDelete replaced a pod by itself");
    }
    // A deleted pod comes back from the new template.
    let victim = c.pods_by_node("od").await.remove("n1").unwrap().remove(0).name_any();
    c.srv.kubectl_ok(&["delete", "pod", &victim]).await;
    c.expect_status("od", json!({"updatedNumberScheduled": 1, "currentNumberScheduled": 2})).await;
    let new_hash = c.pods_by_node("od").await.remove("n1").unwrap()[0].labels().get("controller-revision-hash").cloned();
    assert_ne!(new_hash.as_deref(), Some(old_hash.as_str()));

    // revisionHistoryLimit 1: a third template drops the oldest revision
    // once no pod runs it (n2 still does until deleted).
    c.srv.kubectl_ok(&["set", "image", "ds/od", "agent=localhost/riptide:0.3.0"]).await;
    let three = eventually(20, || async { c.revisions("od").await.len() == 3 }).await;
    assert!(three, "a revision still used by a pod was deleted: {:?}", c.revisions("od").await);
    let n2 = c.pods_by_node("od").await.remove("n2").unwrap().remove(0).name_any();
    c.srv.kubectl_ok(&["delete", "pod", &n2]).await;
    let trimmed = eventually(30, || async {
        let r = c.revisions("od").await;
        r.len() == 2 && !r.iter().any(|(_, h)| *h == old_hash)
    })
    .await;
    assert!(trimmed, "history not trimmed: {:?}", c.revisions("od").await);
    c.stop().await;
}

/// The user's install path as far as the control plane goes: the real
/// `manifests/riptide.yaml` puts one agent pod on every node, NotReady
/// ones included (they stay NotReady until the agent installs the CNI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_agent_lands_on_every_node() {
    let c = Cluster::start(Duration::from_millis(200)).await;
    c.node("n1", json!({}), json!([]), true).await;
    c.node("n2", json!({}), json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                                   {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]), false).await;
    c.node("n3", json!({}), json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]), true).await;
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/riptide.yaml");
    c.srv.kubectl_ok(&["apply", "-f", manifest.to_str().unwrap()]).await;
    let api: Api<Pod> = Api::namespaced(c.client.clone(), "riptide-system");
    let lp = ListParams::default().labels("app.kubernetes.io/name=riptide-agent");
    let ok = eventually(30, || async {
        let nodes: BTreeSet<String> =
            api.list(&lp).await.unwrap().into_iter().filter_map(|p| p.spec.and_then(|s| s.node_name)).collect();
        nodes.into_iter().collect::<Vec<_>>() == ["n1", "n2", "n3"]
    })
    .await;
    let pods: Vec<String> = api.list(&lp).await.unwrap().into_iter().map(|p| format!("{} on {:?}", p.name_any(), p.spec.and_then(|s| s.node_name))).collect();
    assert!(ok, "agent pods: {pods:?}");
    let out = c.srv.kubectl_ok(&["-n", "riptide-system", "get", "ds", "riptide-agent", "--no-headers"]).await;
    assert!(out.starts_with("riptide-agent"), "{out}");
    assert_eq!(out.split_whitespace().nth(1), Some("3"), "desired: {out}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_update_strategies_are_refused() {
    let srv = TestServer::start(Backend::Embedded).await;
    let stuck = daemonset("stuck", "  updateStrategy:\n    type: RollingUpdate\n    rollingUpdate:\n      maxUnavailable: 0", "");
    let (ok, out, err) = srv.kubectl_stdin(&["apply", "-f", "-"], Some(&stuck)).await;
    assert!(!ok && err.contains("may not be 0 when `maxSurge` is 0"), "{out}{err}");
    let never = daemonset("never", "", "      restartPolicy: Never");
    let (ok, out, err) = srv.kubectl_stdin(&["apply", "-f", "-"], Some(&never)).await;
    assert!(!ok && err.contains("spec.template.spec.restartPolicy"), "{out}{err}");
    let surge = daemonset("surge", "  updateStrategy:\n    rollingUpdate:\n      maxUnavailable: 0\n      maxSurge: 10%", "");
    let (ok, out, err) = srv.kubectl_stdin(&["apply", "-f", "-"], Some(&surge)).await;
    assert!(ok, "{out}{err}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_adopted_and_failed_pods_replaced() {
    let c = Cluster::start(Duration::from_millis(200)).await;
    for n in ["n1", "n2"] {
        c.node(n, json!({}), json!([]), true).await;
    }
    c.apply(&daemonset("adopt", "", "")).await;
    c.expect_nodes("adopt", &["n1", "n2"]).await;
    let names = |m: BTreeMap<String, Vec<Pod>>| m.into_values().flatten().map(|p| p.name_any()).collect::<BTreeSet<_>>();
    let before = names(c.pods_by_node("adopt").await);
    let revs = c.revisions("adopt").await;

    // Orphaned pods and revisions are taken back by a new DaemonSet with
    // the same selector: no pod is recreated, no revision added.
    c.srv.kubectl_ok(&["delete", "ds", "adopt", "--cascade=orphan"]).await;
    let orphaned = eventually(20, || async {
        let pods = c.pods_by_node("adopt").await;
        pods.values().flatten().all(|p| p.owner_references().is_empty()) && pods.len() == 2
    })
    .await;
    assert!(orphaned, "pods were not orphaned");
    c.apply(&daemonset("adopt", "", "")).await;
    let uid = c.ds("adopt").await.uid().unwrap();
    let adopted = eventually(20, || async {
        c.pods_by_node("adopt").await.values().flatten().all(|p| p.owner_references().iter().any(|o| o.uid == uid))
    })
    .await;
    assert!(adopted, "orphans not adopted");
    c.expect_status("adopt", json!({"desiredNumberScheduled": 2, "currentNumberScheduled": 2, "updatedNumberScheduled": 2})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(names(c.pods_by_node("adopt").await), before, "adoption recreated pods");
    assert_eq!(c.revisions("adopt").await, revs);

    // A pod the kubelet reports Failed is deleted and replaced.
    let failed = c.pods_by_node("adopt").await.remove("n1").unwrap().remove(0).name_any();
    Api::<Pod>::namespaced(c.client.clone(), NS)
        .patch_status(&failed, &PatchParams::default(), &Patch::Merge(&json!({"status": {"phase": "Failed"}})))
        .await
        .unwrap();
    let replaced = eventually(30, || async {
        c.pods_by_node("adopt").await.get("n1").is_some_and(|p| p.len() == 1 && p[0].name_any() != failed)
    })
    .await;
    assert!(replaced, "failed pod {failed} not replaced: {:?}", names(c.pods_by_node("adopt").await));
    let events = c.srv.kubectl_ok(&["get", "events", "-o", "jsonpath={.items[*].reason}"]).await;
    assert!(events.split_whitespace().any(|r| r == "FailedDaemonPod"), "no FailedDaemonPod event: {events}");
    c.stop().await;
}

/// `control-plane` runs the controllers as system:kube-controller-manager;
/// its bootstrap role must allow what this controller writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_manager_may_run_daemonsets() {
    let srv = TestServer::start(Backend::Embedded).await;
    for (verb, what) in [("create", "controllerrevisions.apps"), ("patch", "controllerrevisions.apps"), ("delete", "controllerrevisions.apps"),
                         ("watch", "daemonsets.apps"), ("patch", "daemonsets.apps/status"), ("create", "pods"), ("patch", "pods"), ("delete", "pods")] {
        let (what, sub) = what.split_once('/').map_or((what, None), |(w, s)| (w, Some(s)));
        let mut args = vec!["auth", "can-i", verb, what, "--as", "system:kube-controller-manager"];
        if let Some(s) = sub {
            args.extend(["--subresource", s]);
        }
        let (ok, out, err) = srv.kubectl(&args).await;
        assert!(ok && out.trim() == "yes", "controller-manager may not {verb} {what} {sub:?}: {out}{err}");
    }
    let (_, out, _) = srv.kubectl(&["auth", "can-i", "list", "controllerrevisions.apps", "--as", "jane", "--as-group", "system:authenticated"]).await;
    assert_eq!(out.trim(), "no");
    srv.shutdown().await;
}
