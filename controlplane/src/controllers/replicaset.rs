//! ReplicaSet: keep `spec.replicas` active pods that the set controls, and
//! report counts in status. Pods are created from the template with a
//! controller ownerReference; surplus pods go least-valuable first
//! (unscheduled, pending, not ready, youngest), like `getPodsToDelete`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{
    events::Recorder,
    util::{error_message, is_controlled_by, is_deleting, key, labels_of, owner_ref, pod_active, pod_available, pod_ready},
};

/// What a pass created/deleted and has not yet seen in the pod cache:
/// without this, a slow watch makes the next pass create duplicates.
#[derive(Default)]
pub struct Expectations {
    pending: Mutex<HashMap<String, (i32, Instant)>>,
}

impl Expectations {
    /// True when the cache is believed to reflect our last writes.
    pub fn satisfied(&self, uid: &str, observed_total: i32) -> bool {
        let Ok(mut m) = self.pending.lock() else { return true };
        match m.get(uid) {
            Some((want, at)) if *want != observed_total && at.elapsed() < Duration::from_secs(15) => false,
            _ => {
                m.remove(uid);
                true
            }
        }
    }
    pub fn expect(&self, uid: &str, total: i32) {
        if let Ok(mut m) = self.pending.lock() {
            m.insert(uid.to_string(), (total, Instant::now()));
        }
    }
}

pub struct Ctx {
    pub client: Client,
    pub pods: Store<Pod>,
    pub sets: Store<ReplicaSet>,
    pub recorder: Recorder,
    pub expectations: Expectations,
}

/// Pods (all states) controlled by `rs`.
pub fn owned_pods(pods: &Store<Pod>, rs: &ReplicaSet) -> Vec<std::sync::Arc<Pod>> {
    let uid = rs.uid().unwrap_or_default();
    let ns = rs.namespace();
    pods.state()
        .into_iter()
        .filter(|p| p.namespace() == ns && is_controlled_by(&p.metadata, &uid))
        .collect()
}

pub async fn reconcile_all(ctx: &Ctx) {
    for rs in ctx.sets.state() {
        if is_deleting(&rs.metadata) {
            continue;
        }
        if let Err(e) = reconcile(ctx, &rs).await {
            tracing::warn!(replicaset = %key(rs.as_ref()), error = %e, "reconciling replicaset");
        }
    }
}

/// Lower rank = deleted first.
fn deletion_rank(p: &Pod) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some_and(|n| !n.is_empty());
    let running = super::util::pod_phase(p) == "Running";
    let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    (u8::from(scheduled), u8::from(running), u8::from(pod_ready(p)), std::cmp::Reverse(created))
}

#[tracing::instrument(skip_all, fields(replicaset = %key(rs)))]
async fn reconcile(ctx: &Ctx, rs: &ReplicaSet) -> kube::Result<()> {
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let want = spec.replicas.unwrap_or(1).max(0);
    let all = owned_pods(&ctx.pods, rs);
    let mut active: Vec<&Pod> = all.iter().map(AsRef::as_ref).filter(|p| pod_active(p)).collect();
    let n = i32::try_from(active.len()).unwrap_or(i32::MAX);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);

    if ctx.expectations.satisfied(&uid, n) && n != want {
        if n < want {
            let template = spec.template.clone().unwrap_or_default();
            let missing = want - n;
            let mut created = 0;
            for _ in 0..missing {
                let mut meta = template.metadata.clone().unwrap_or_default();
                meta.name = None;
                meta.generate_name = Some(format!("{}-", rs.name_any()));
                meta.namespace = Some(ns.clone());
                meta.owner_references = Some(vec![owner_ref(rs)]);
                let pod = Pod { metadata: meta, spec: template.spec.clone(), status: None };
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(p) => {
                        created += 1;
                        ctx.recorder.normal(rs, "SuccessfulCreate", &format!("Created pod: {}", p.name_any())).await;
                    }
                    Err(e) => {
                        ctx.recorder.warning(rs, "FailedCreate", &format!("Error creating: {}", error_message(&e))).await;
                        break;
                    }
                }
            }
            ctx.expectations.expect(&uid, n + created);
        } else {
            active.sort_by_key(|p| deletion_rank(p));
            let surplus = usize::try_from(n - want).unwrap_or(0);
            let mut deleted = 0;
            for p in active.iter().take(surplus) {
                match pods.delete(&p.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {
                        deleted += 1;
                        ctx.recorder.normal(rs, "SuccessfulDelete", &format!("Deleted pod: {}", p.name_any())).await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => deleted += 1,
                    Err(e) => tracing::warn!(pod = %p.name_any(), error = %e, "deleting surplus pod"),
                }
            }
            ctx.expectations.expect(&uid, n - deleted);
        }
    }

    // Status from what the cache shows now.
    let active: Vec<&Pod> = all.iter().map(AsRef::as_ref).filter(|p| pod_active(p)).collect();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let tmpl_labels = spec.template.as_ref().and_then(|t| t.metadata.as_ref()).map(labels_of).unwrap_or_default();
    let fully = active.iter().filter(|p| tmpl_labels.iter().all(|(k, v)| p.labels().get(k) == Some(v))).count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully,
        "readyReplicas": active.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| pod_available(p, min_ready)).count(),
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let cur = serde_json::to_value(&rs.status).unwrap_or_default();
    let same = ["replicas", "fullyLabeledReplicas", "readyReplicas", "availableReplicas", "observedGeneration"]
        .iter()
        .all(|k| cur.get(*k).and_then(serde_json::Value::as_i64).unwrap_or(0) == status[*k].as_i64().unwrap_or(0));
    if !same {
        Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&rs.name_any(), &PatchParams::default(), &Patch::Merge(json!({"status": status})))
            .await?;
    }
    Ok(())
}
