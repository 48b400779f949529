//! DaemonSet: one pod per eligible node, kubernetes
//! `pkg/controller/daemon` semantics.
//!
//! A pass per DaemonSet: claim its pods (adopt orphans its selector
//! matches, release owned pods it no longer matches), bring its
//! ControllerRevisions up to date ([`history`]), then — once the pod
//! cache shows the previous pass's writes (the ReplicaSet controller's
//! expectations) — create the missing pod on every node that should run
//! one and delete pods that should not run where they are ([`update`]
//! `manage_node`: nodeSelector, required node affinity, NoSchedule vs
//! NoExecute taints, the daemon tolerations of [`placement`]), delete
//! failed pods with a per-node backoff, force-delete pods of nodes that
//! no longer exist (upstream's pod GC would), and, if nothing else had to
//! change, take the next RollingUpdate step (`maxUnavailable` without
//! surge, `maxSurge` with it). OnDelete leaves old pods alone: a deleted
//! one comes back from the new template. Status carries the counters
//! `kubectl get ds` and `kubectl rollout status` read.
//!
//! Placement: pods are pinned the upstream way (required node affinity
//! `matchFields metadata.name In [node]`) *and* created with
//! `spec.nodeName` set, bypassing our scheduler: it keeps every pod off a
//! NotReady node whatever the pod tolerates, while a CNI/agent DaemonSet
//! must run exactly there. As a consequence node resources (cpu, memory,
//! max pods) are not checked for daemon pods; the kubelet admits them.
//!
//! Not yet: upstream's slow-start batches of creates (one call per node
//! here), DaemonSet conditions, forgetting a node's failed-pod backoff once
//! its pod runs, and per-pod expectations (a count per DaemonSet is kept,
//! so a pod deleted by someone else while our own write is in flight holds
//! the next pass back for up to 15 s).

mod history;
pub mod placement;
pub mod update;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet},
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use self::{
    placement::{new_pod, node_fit, target_node},
    update::{Judge, Slot, counts, fenceposts, manage_node, roll_with_surge, roll_without_surge},
};
use super::{
    events::Recorder,
    replicaset::Expectations,
    rollout::scaled_value,
    util::{controller_of, error_message, is_controlled_by, is_deleting, key, owner_ref, pod_terminal, selector_matches},
};

pub struct Ctx {
    pub client: Client,
    pub daemonsets: Store<DaemonSet>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub revisions: Store<ControllerRevision>,
    pub recorder: Recorder,
    pub expectations: Expectations,
    pub failed_backoff: Backoff,
}

impl Ctx {
    pub fn new(
        client: Client,
        daemonsets: Store<DaemonSet>,
        pods: Store<Pod>,
        nodes: Store<Node>,
        revisions: Store<ControllerRevision>,
        recorder: Recorder,
    ) -> Self {
        Self { client, daemonsets, pods, nodes, revisions, recorder, expectations: Expectations::default(), failed_backoff: Backoff::default() }
    }
}

/// Per (DaemonSet, node) delay between deletions of failed pods, 1 s
/// doubling to 15 min as upstream, so a kubelet that keeps rejecting a
/// pod is not fought in a hot loop.
#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, (Instant, Duration)>>);

impl Backoff {
    fn allow(&self, key: &str) -> bool {
        let Ok(mut m) = self.0.lock() else { return true };
        let now = Instant::now();
        match m.get(key).copied() {
            Some((next, _)) if now < next => false,
            prev => {
                let delay = prev.map_or(Duration::from_secs(1), |(_, d)| (d * 2).min(Duration::from_secs(900)));
                m.insert(key.to_string(), (now + delay, delay));
                true
            }
        }
    }
}

pub async fn reconcile_all(ctx: &Ctx) {
    for ds in ctx.daemonsets.state() {
        if is_deleting(&ds.metadata) {
            continue;
        }
        if let Err(e) = reconcile(ctx, &ds).await {
            tracing::warn!(daemonset = %key(ds.as_ref()), error = %e, "reconciling daemonset");
        }
    }
}

fn rolling(ds: &DaemonSet) -> bool {
    ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.type_.as_deref()).unwrap_or("RollingUpdate") == "RollingUpdate"
}

/// `AllowsSurge`: a RollingUpdate whose maxSurge is not zero.
fn allows_surge(ds: &DaemonSet) -> bool {
    let ru = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.rolling_update.as_ref());
    rolling(ds) && scaled_value(ru.and_then(|r| r.max_surge.as_ref()), 1, "0", true) != 0
}

#[tracing::instrument(skip_all, fields(daemonset = %key(ds)))]
async fn reconcile(ctx: &Ctx, ds: &DaemonSet) -> kube::Result<()> {
    let uid = ds.uid().unwrap_or_default();
    let nodes = ctx.nodes.state();
    let pods = claim(&ctx.client, ds, ctx.pods.state()).await;
    let (cur, old) = history::sync(ctx, ds).await?;
    let hash = history::hash_of(&cur);
    let min_ready = ds.spec.as_ref().and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let judge = Judge { hash, generation: ds.metadata.generation, min_ready };

    // Pods per target node; terminal pods already on their way out are
    // nothing to act on.
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    let mut unplaced: Vec<&Pod> = Vec::new();
    for p in pods.iter().map(AsRef::as_ref).filter(|p| !(pod_terminal(p) && is_deleting(&p.metadata))) {
        match target_node(p) {
            Some(n) => by_node.entry(n).or_default().push(p),
            None => unplaced.push(p),
        }
    }
    let live = i32::try_from(pods.iter().filter(|p| !is_deleting(&p.metadata)).count()).unwrap_or(i32::MAX);
    let satisfied = ctx.expectations.satisfied(&uid, live);
    if satisfied {
        let mut plan = manage(ctx, ds, &nodes, &by_node, &unplaced, &judge);
        if plan.is_empty() && rolling(ds) {
            plan = rolling_update(ds, &nodes, &by_node, &judge);
        }
        if !plan.is_empty() {
            let (created, deleted) = sync_nodes(ctx, ds, &plan, &judge.hash).await;
            ctx.expectations.expect(&uid, live + created - deleted);
        }
        let live_hashes: BTreeSet<String> =
            pods.iter().filter_map(|p| p.labels().get(placement::REVISION_HASH).cloned()).collect();
        history::cleanup(ctx, ds, &old, &live_hashes).await;
    }
    sync_status(ctx, ds, &nodes, &by_node, &judge, satisfied).await
}

/// What a pass writes.
#[derive(Debug, Default)]
struct Plan {
    create_on: Vec<String>,
    /// (pod, grace 0: its node is gone, no kubelet will finish the delete)
    delete: Vec<(String, bool)>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.create_on.is_empty() && self.delete.is_empty()
    }
}

/// `manage` + `podsShouldBeOnNode` over every node, plus pods whose node
/// is gone or that name no node.
fn manage(ctx: &Ctx, ds: &DaemonSet, nodes: &[Arc<Node>], by_node: &BTreeMap<String, Vec<&Pod>>, unplaced: &[&Pod], judge: &Judge) -> Plan {
    let surge = allows_surge(ds);
    let uid = ds.uid().unwrap_or_default();
    let mut plan = Plan::default();
    for node in nodes {
        let name = node.name_any();
        let here = by_node.get(&name).map(Vec::as_slice).unwrap_or_default();
        let act = manage_node(node_fit(ds, node), here, surge, judge);
        if act.create {
            plan.create_on.push(name.clone());
        }
        for p in act.delete {
            if act.failed.contains(&p) && !ctx.failed_backoff.allow(&format!("{uid}/{name}")) {
                continue;
            }
            plan.delete.push((p, false));
        }
    }
    let known: BTreeSet<String> = nodes.iter().map(|n| n.name_any()).collect();
    for (node, pods) in by_node.iter().filter(|(n, _)| !known.contains(*n)) {
        for p in pods.iter().filter(|p| p.metadata.deletion_grace_period_seconds != Some(0)) {
            tracing::info!(pod = %p.name_any(), node = %node, "node is gone, deleting its daemon pod");
            plan.delete.push((p.name_any(), true));
        }
    }
    plan.delete.extend(unplaced.iter().filter(|p| !is_deleting(&p.metadata)).map(|p| (p.name_any(), false)));
    plan
}

/// The next RollingUpdate step.
fn rolling_update(ds: &DaemonSet, nodes: &[Arc<Node>], by_node: &BTreeMap<String, Vec<&Pod>>, judge: &Judge) -> Plan {
    let mut slots: Vec<Slot<'_>> = Vec::new();
    for node in nodes {
        let name = node.name_any();
        let should_run = node_fit(ds, node).should_run;
        let pods: Vec<&Pod> = by_node.get(&name).into_iter().flatten().copied().filter(|p| !is_deleting(&p.metadata)).collect();
        if should_run || !pods.is_empty() {
            slots.push(Slot { node: name, should_run, pods });
        }
    }
    let desired = i32::try_from(slots.iter().filter(|s| s.should_run).count()).unwrap_or(i32::MAX);
    let ru = ds.spec.as_ref().and_then(|s| s.update_strategy.as_ref()).and_then(|u| u.rolling_update.as_ref());
    let (max_surge, max_unavailable) = fenceposts(ru.and_then(|r| r.max_surge.as_ref()), ru.and_then(|r| r.max_unavailable.as_ref()), desired);
    if max_surge == 0 {
        let delete = roll_without_surge(&slots, max_unavailable, judge);
        Plan { create_on: Vec::new(), delete: delete.into_iter().map(|p| (p, false)).collect() }
    } else {
        let (delete, create_on) = roll_with_surge(&slots, max_surge, desired, judge);
        Plan { create_on, delete: delete.into_iter().map(|p| (p, false)).collect() }
    }
}

/// Carries out `plan`; returns (pods created, live pods deleted).
async fn sync_nodes(ctx: &Ctx, ds: &DaemonSet, plan: &Plan, hash: &str) -> (i32, i32) {
    let ns = ds.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let (mut created, mut deleted) = (0, 0);
    for node in &plan.create_on {
        match api.create(&PostParams::default(), &new_pod(ds, node, hash)).await {
            Ok(p) => {
                created += 1;
                ctx.recorder.normal(ds, "SuccessfulCreate", &format!("Created pod: {}", p.name_any())).await;
            }
            Err(e) => {
                ctx.recorder.warning(ds, "FailedCreate", &format!("Error creating: {}", error_message(&e))).await;
            }
        }
    }
    for (name, force) in &plan.delete {
        let was_live = ctx
            .pods
            .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && p.name_any() == *name)
            .is_some_and(|p| !is_deleting(&p.metadata));
        let failed = ctx
            .pods
            .find(|p| p.namespace().as_deref() == Some(ns.as_str()) && p.name_any() == *name)
            .filter(|p| super::util::pod_phase(p) == "Failed");
        if let Some(p) = failed {
            let node = target_node(&p).unwrap_or_default();
            let msg = format!("Found failed daemon pod {ns}/{name} on node {node}, will try to kill it");
            ctx.recorder.warning(ds, "FailedDaemonPod", &msg).await;
        }
        let dp = if *force { DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() } } else { DeleteParams::default() };
        match api.delete(name, &dp).await {
            Ok(_) => {
                deleted += i32::from(was_live);
                ctx.recorder.normal(ds, "SuccessfulDelete", &format!("Deleted pod: {name}")).await;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => deleted += i32::from(was_live),
            Err(e) => {
                ctx.recorder.warning(ds, "FailedDelete", &format!("Error deleting: {}", error_message(&e))).await;
            }
        }
    }
    (created, deleted)
}

/// The pods `ds` controls after adoption and release, like upstream's
/// `ControllerRefManager`: an orphan its selector matches is adopted
/// (ownerReference added by a strategic-merge patch keyed by uid), an
/// owned pod it no longer matches is released. An empty selector claims
/// nothing new.
async fn claim<K>(client: &Client, ds: &DaemonSet, objs: Vec<Arc<K>>) -> Vec<Arc<K>>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + Debug,
{
    let uid = ds.uid().unwrap_or_default();
    let ns = ds.namespace().unwrap_or_default();
    let selector = ds.spec.as_ref().map(|s| s.selector.clone()).unwrap_or_default();
    let empty = selector.match_labels.as_ref().is_none_or(BTreeMap::is_empty) && selector.match_expressions.as_ref().is_none_or(Vec::is_empty);
    let selects = |o: &K| selector_matches(&selector, o.labels());
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    for o in objs.into_iter().filter(|o| o.namespace().as_deref() == Some(ns.as_str())) {
        let ours = is_controlled_by(o.meta(), &uid);
        if ours && (empty || selects(&o)) {
            out.push(o);
        } else if ours {
            let p = json!({"metadata": {"ownerReferences": [{"$patch": "delete", "uid": uid}]}});
            if let Err(e) = api.patch(&o.name_any(), &PatchParams::default(), &Patch::Strategic(&p)).await {
                tracing::debug!(object = %o.name_any(), error = %e, "releasing");
            }
        } else if !empty && controller_of(o.meta()).is_none() && !is_deleting(o.meta()) && selects(&o) {
            let p = json!({"metadata": {"ownerReferences": [owner_ref(ds)]}});
            match api.patch(&o.name_any(), &PatchParams::default(), &Patch::Strategic(&p)).await {
                Ok(adopted) => {
                    tracing::info!(object = %o.name_any(), "adopted");
                    out.push(Arc::new(adopted));
                }
                Err(e) => tracing::debug!(object = %o.name_any(), error = %e, "adopting"),
            }
        }
    }
    out
}

async fn sync_status(
    ctx: &Ctx,
    ds: &DaemonSet,
    nodes: &[Arc<Node>],
    by_node: &BTreeMap<String, Vec<&Pod>>,
    judge: &Judge,
    observed: bool,
) -> kube::Result<()> {
    let c = counts(
        nodes.iter().map(|n| (node_fit(ds, n).should_run, by_node.get(&n.name_any()).cloned().unwrap_or_default())),
        judge,
    );
    let cur = ds.status.clone().unwrap_or_default();
    let generation = if observed { ds.metadata.generation.unwrap_or(0) } else { cur.observed_generation.unwrap_or(0) };
    let status = json!({
        "desiredNumberScheduled": c.desired,
        "currentNumberScheduled": c.current,
        "numberReady": c.ready,
        "numberAvailable": c.available,
        "numberUnavailable": c.desired - c.available,
        "updatedNumberScheduled": c.updated,
        "numberMisscheduled": c.misscheduled,
        "observedGeneration": generation,
    });
    let before = serde_json::to_value(&cur).unwrap_or_default();
    let same = status
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| before.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0) == v.as_i64().unwrap_or(0)));
    if !same {
        Api::<DaemonSet>::namespaced(ctx.client.clone(), &ds.namespace().unwrap_or_default())
            .patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await?;
    }
    Ok(())
}
