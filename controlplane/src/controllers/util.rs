//! Pieces every workload loop shares: reflectors that wake a reconcile
//! loop, label selectors, pod predicates, owner references, timestamps,
//! error messages for events.

use std::{collections::BTreeMap, fmt::Debug, hash::Hash, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Pod, PodCondition},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// A counter bumped on every watch event; reconcile loops wait on it.
#[derive(Clone)]
pub struct Wake(Arc<watch::Sender<u64>>);

impl Default for Wake {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

impl Wake {
    pub fn bump(&self) {
        self.0.send_modify(|v| *v = v.wrapping_add(1));
    }
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Waits for the next wake-up or `resync`, whichever comes first, then a
/// short pause so a burst of events (a rollout, a node going away)
/// becomes one pass.
pub async fn next_pass(rx: &mut watch::Receiver<u64>, resync: Duration) {
    tokio::select! {
        r = rx.changed() => {
            if r.is_err() {
                // Every sender is gone: only the timer is left.
                tokio::time::sleep(resync).await;
            }
        }
        () = tokio::time::sleep(resync) => {}
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    rx.borrow_and_update();
}

/// Starts a reflector for `api` (all objects matching `cfg`) that bumps
/// `wake` on every event, and waits until its first list is in.
pub async fn reflect<K>(api: Api<K>, cfg: watcher::Config, wakes: Vec<Wake>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    for w in &wakes {
                        w.bump();
                    }
                }
                Err(e) => tracing::debug!(error = %e, kind = %K::kind(&K::DynamicType::default()), "watch error (retrying)"),
            }
        }
    });
    // A closed writer only happens when the task above ends; then the store
    // just stays empty and the loops keep running on the resync timer.
    let _ = reader.wait_until_ready().await;
    reader
}

/// `matchLabels` + `matchExpressions` against `labels` (an empty selector
/// matches everything, as for Deployments; callers that want "nothing"
/// for an empty Service selector check that themselves).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if let Some(ml) = &sel.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| vals.contains(v)),
            "NotIn" => have.is_none_or(|v| !vals.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    })
}

/// A Service-style equality selector.
pub fn map_selector_matches(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Seconds from `t` to now (negative if `t` is in the future).
pub fn age_secs(t: &Time) -> f64 {
    Timestamp::now().duration_since(t.0).as_secs_f64()
}

pub fn is_deleting(meta: &ObjectMeta) -> bool {
    meta.deletion_timestamp.is_some()
}

/// The controller owner reference, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true))
}

pub fn is_controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_of(meta).is_some_and(|o| o.uid == uid)
}

/// An owner reference (controller, blocking deletion) pointing at `owner`.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

pub fn pod_condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a PodCondition> {
    pod.status.as_ref()?.conditions.iter().flatten().find(|c| c.type_ == kind)
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod_condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

/// Ready for at least `min_ready` seconds (the ReplicaSet notion of
/// "available").
pub fn pod_available(pod: &Pod, min_ready: i32) -> bool {
    match pod_condition(pod, "Ready") {
        Some(c) if c.status == "True" => {
            min_ready <= 0 || c.last_transition_time.as_ref().is_none_or(|t| age_secs(t) >= f64::from(min_ready))
        }
        _ => false,
    }
}

pub fn pod_phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Succeeded or Failed: the pod will never run again.
pub fn pod_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// Counted by a ReplicaSet: not finished and not on its way out.
pub fn pod_active(pod: &Pod) -> bool {
    !pod_terminal(pod) && !is_deleting(&pod.metadata)
}

pub fn labels_of(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// `ns/name` for logs.
pub fn key<K: Resource>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// An API call's error as upstream's controllers print it in events: a
/// `Status`'s message alone (`pods "x" is forbidden: …`, client-go's
/// `StatusError.Error()`), anything else as it displays. kube-rs's own
/// Display appends a debug dump of the whole `Status`.
pub fn error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn label_selector_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement { key: "tier".into(), operator: "In".into(), values: Some(vec!["a".into(), "b".into()]) },
                LabelSelectorRequirement { key: "canary".into(), operator: "DoesNotExist".into(), values: None },
            ]),
        };
        assert!(selector_matches(&sel, &labels(&[("app", "web"), ("tier", "b")])));
        assert!(!selector_matches(&sel, &labels(&[("app", "web"), ("tier", "c")])));
        assert!(!selector_matches(&sel, &labels(&[("app", "web"), ("tier", "a"), ("canary", "1")])));
        assert!(!selector_matches(&sel, &labels(&[("app", "db"), ("tier", "a")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn error_message_is_the_status_message_alone() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": "pods \"web-\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true",
            "details": {"name": "web-", "kind": "pods"},
        }))
        .expect("status");
        let e = kube::Error::Api(Box::new(status));
        assert_eq!(format!("Error creating: {}", error_message(&e)), "Error creating: pods \"web-\" is forbidden: violates PodSecurity \"restricted:latest\": runAsNonRoot != true");
        assert!(e.to_string().contains("Status {"), "kube-rs's Display still dumps the Status: {e}");
        let empty: kube::core::Status = serde_json::from_value(serde_json::json!({"code": 500})).expect("status");
        assert!(!error_message(&kube::Error::Api(Box::new(empty))).is_empty());
        let other = kube::Error::LinesCodecMaxLineLengthExceeded;
        assert_eq!(error_message(&other), other.to_string());
    }
}
