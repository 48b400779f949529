//! ControllerRevisions of a DaemonSet (kubernetes
//! `pkg/controller/daemon/update.go`: `constructHistory`, `snapshot`,
//! `dedupCurHistories`, `cleanupHistory`). Each distinct pod template is
//! one revision named `<ds>-<hash>`, labelled with the template's labels
//! plus `controller-revision-hash`, whose `data` is the strategic-merge
//! patch `{"spec":{"template":{…,"$patch":"replace"}}}` — exactly what
//! `kubectl rollout undo daemonset` sends back to the DaemonSet, and what
//! `kubectl rollout history` lists (by the DaemonSet's selector, owned by
//! it). A template that returns (undo) reuses its revision and gets the
//! next revision number.

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::{
    api::{
        apps::v1::{ControllerRevision, DaemonSet},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, runtime::RawExtension},
};
use kube::{
    Api, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::{Ctx, placement::REVISION_HASH};
use crate::controllers::{
    rollout::{canonical_template, template_hash},
    util::{is_controlled_by, is_deleting, owner_ref},
};

fn template(ds: &DaemonSet) -> PodTemplateSpec {
    ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default()
}

/// The revision's `data`: a patch that replaces the DaemonSet's template.
pub fn revision_data(ds: &DaemonSet) -> Value {
    let mut t = serde_json::to_value(template(ds)).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut t {
        m.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// The template a revision holds, canonical for comparison.
fn revision_template(rev: &ControllerRevision) -> Option<Value> {
    let mut t = rev.data.as_ref()?.0.pointer("/spec/template")?.clone();
    if let Value::Object(m) = &mut t {
        m.remove("$patch");
    }
    let t: PodTemplateSpec = serde_json::from_value(t).ok()?;
    Some(canonical_template(&t))
}

pub fn matches(rev: &ControllerRevision, ds: &DaemonSet) -> bool {
    revision_template(rev).is_some_and(|t| t == canonical_template(&template(ds)))
}

pub fn hash_of(rev: &ControllerRevision) -> String {
    rev.labels().get(REVISION_HASH).cloned().unwrap_or_default()
}

/// Revisions `ds` controls, orphans its selector matches adopted.
async fn owned(ctx: &Ctx, ds: &DaemonSet) -> Vec<Arc<ControllerRevision>> {
    let mut all = super::claim(&ctx.client, ds, ctx.revisions.state()).await;
    all.retain(|r| !is_deleting(&r.metadata));
    all
}

/// The current revision (created or renumbered as needed) and the old ones.
pub async fn sync(ctx: &Ctx, ds: &DaemonSet) -> kube::Result<(ControllerRevision, Vec<Arc<ControllerRevision>>)> {
    let ns = ds.namespace().unwrap_or_default();
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    let all = owned(ctx, ds).await;
    let max = all.iter().map(|r| r.revision).max().unwrap_or(0);
    let (mut current, old): (Vec<Arc<ControllerRevision>>, Vec<Arc<ControllerRevision>>) =
        all.into_iter().partition(|r| matches(r, ds));
    // Duplicates of the current template (a crash between create and
    // cleanup): keep the newest.
    current.sort_by_key(|r| std::cmp::Reverse(r.revision));
    for dup in current.iter().skip(1) {
        let _ = api.delete(&dup.name_any(), &DeleteParams::default()).await;
    }
    let cur = match current.first() {
        Some(r) if r.revision < max => {
            let p = json!({"revision": max + 1});
            api.patch(&r.name_any(), &PatchParams::default(), &Patch::Merge(&p)).await?
        }
        Some(r) => r.as_ref().clone(),
        None => create(ctx, ds, &api, max + 1).await?,
    };
    Ok((cur, old))
}

/// `snapshot`: a new revision; a name taken by a different template bumps
/// `status.collisionCount` and fails this pass (the next one hashes anew).
async fn create(ctx: &Ctx, ds: &DaemonSet, api: &Api<ControllerRevision>, revision: i64) -> kube::Result<ControllerRevision> {
    let collisions = ds.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
    let t = template(ds);
    let hash = template_hash(&t, collisions);
    let mut labels = t.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    labels.insert(REVISION_HASH.into(), hash.clone());
    let name = format!("{}-{hash}", ds.name_any());
    let rev = ControllerRevision {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: ds.namespace(),
            labels: Some(labels),
            annotations: ds.metadata.annotations.clone(),
            owner_references: Some(vec![owner_ref(ds)]),
            ..Default::default()
        },
        data: Some(RawExtension(revision_data(ds))),
        revision,
    };
    match api.create(&PostParams::default(), &rev).await {
        Ok(r) => Ok(r),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&name).await?;
            if is_controlled_by(&existing.metadata, &ds.uid().unwrap_or_default()) && matches(&existing, ds) {
                return Ok(existing);
            }
            let p = json!({"status": {"collisionCount": collisions + 1}});
            Api::<DaemonSet>::namespaced(ctx.client.clone(), &ds.namespace().unwrap_or_default())
                .patch_status(&ds.name_any(), &PatchParams::default(), &Patch::Merge(&p))
                .await?;
            Err(kube::Error::Api(e))
        }
        Err(e) => Err(e),
    }
}

/// `cleanupHistory`: beyond `revisionHistoryLimit` old revisions, the
/// oldest go unless a live pod still runs their template.
pub async fn cleanup(ctx: &Ctx, ds: &DaemonSet, old: &[Arc<ControllerRevision>], live_hashes: &BTreeSet<String>) {
    let limit = ds.spec.as_ref().and_then(|s| s.revision_history_limit).unwrap_or(10).max(0);
    let mut excess = old.len().saturating_sub(usize::try_from(limit).unwrap_or(0));
    if excess == 0 {
        return;
    }
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ds.namespace().unwrap_or_default());
    let mut by_rev: Vec<&Arc<ControllerRevision>> = old.iter().collect();
    by_rev.sort_by_key(|r| r.revision);
    for r in by_rev {
        if excess == 0 {
            break;
        }
        if live_hashes.contains(&hash_of(r)) {
            continue;
        }
        match api.delete(&r.name_any(), &DeleteParams::default()).await {
            Ok(_) => excess -= 1,
            Err(e) => tracing::debug!(revision = %r.name_any(), error = %e, "deleting old controllerrevision"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_data_round_trips_the_template() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent", "uid": "u"},
            "spec": {"selector": {"matchLabels": {"app": "a"}},
                     "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}}
        }))
        .expect("daemonset");
        let data = revision_data(&ds);
        assert_eq!(data.pointer("/spec/template/$patch"), Some(&json!("replace")));
        let rev = ControllerRevision { data: Some(RawExtension(data)), ..Default::default() };
        assert!(matches(&rev, &ds));
        let mut changed = ds.clone();
        if let Some(s) = changed.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
            s.containers[0].image = Some("x:2".into());
        }
        assert!(!matches(&rev, &changed));
    }
}
