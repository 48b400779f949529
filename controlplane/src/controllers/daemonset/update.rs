//! The decisions of a DaemonSet pass as pure functions over the pods found
//! per node: kubernetes `pkg/controller/daemon/daemon_controller.go`
//! (`podsShouldBeOnNode`, `updateDaemonSetStatus`) and `update.go`
//! (`rollingUpdate`, `findUpdatedPodsOnNode`, `updatedDesiredNodeCounts`).

use std::cmp::Ordering;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::util::intstr::IntOrString};
use kube::ResourceExt as _;

use super::placement::{Fit, REVISION_HASH, is_updated};
use crate::controllers::{
    rollout::scaled_value,
    util::{is_deleting, pod_available, pod_phase, pod_ready},
};

/// How a pass judges pods: the current revision and readiness rules.
#[derive(Debug, Clone)]
pub struct Judge {
    pub hash: String,
    pub generation: Option<i64>,
    pub min_ready: i32,
}

impl Judge {
    pub fn updated(&self, p: &Pod) -> bool {
        is_updated(p, &self.hash, self.generation)
    }
    pub fn available(&self, p: &Pod) -> bool {
        pod_available(p, self.min_ready)
    }
}

/// `podByCreationTimestampAndPhase`: bound pods first, then oldest.
pub fn oldest_first(a: &Pod, b: &Pod) -> Ordering {
    let bound = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
    bound(b)
        .cmp(&bound(a))
        .then_with(|| {
            let t = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            t(a).cmp(&t(b))
        })
        .then_with(|| a.name_any().cmp(&b.name_any()))
}

/// What to do on one node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeAction {
    pub create: bool,
    /// Pod names to delete.
    pub delete: Vec<String>,
    /// Failed pods among `delete` (worth a warning event and a backoff).
    pub failed: Vec<String>,
}

/// `podsShouldBeOnNode`: `pods` are this DaemonSet's pods on the node
/// (deleting ones included, terminal-and-deleting ones not). Without
/// surge a node holds one pod: the oldest running one stays and a
/// replacement waits until a deleted pod is really gone. With surge, one
/// old and one new pod may overlap until the new one is available.
pub fn manage_node(fit: Fit, pods: &[&Pod], surge: bool, judge: &Judge) -> NodeAction {
    let mut out = NodeAction::default();
    if fit.should_run && pods.is_empty() {
        out.create = true;
        return out;
    }
    if !fit.should_continue {
        out.delete = pods.iter().filter(|p| !is_deleting(&p.metadata)).map(|p| p.name_any()).collect();
        return out;
    }
    let mut running: Vec<&Pod> = Vec::new();
    for p in pods.iter().copied().filter(|p| !is_deleting(&p.metadata)) {
        match pod_phase(p) {
            "Failed" => {
                out.delete.push(p.name_any());
                out.failed.push(p.name_any());
            }
            "Succeeded" => out.delete.push(p.name_any()),
            _ => running.push(p),
        }
    }
    running.sort_by(|a, b| oldest_first(a, b));
    if !surge {
        out.delete.extend(running.iter().skip(1).map(|p| p.name_any()));
        return out;
    }
    if running.len() <= 1 {
        out.create = running.is_empty() && fit.should_run;
        return out;
    }
    // Surge: keep the oldest new and the oldest old pod; the old one goes
    // once it is not ready or the new one is available.
    let (mut new, mut old): (Option<&Pod>, Option<&Pod>) = (None, None);
    for p in running {
        let slot = if p.labels().get(REVISION_HASH) == Some(&judge.hash) { &mut new } else { &mut old };
        if slot.is_none() {
            *slot = Some(p);
        } else {
            out.delete.push(p.name_any());
        }
    }
    if let (Some(n), Some(o)) = (new, old)
        && (!pod_ready(o) || judge.available(n))
    {
        out.delete.push(o.name_any());
    }
    out
}

/// (maxSurge, maxUnavailable) for `desired` nodes, percentages rounded up
/// (`SurgeCount`, `UnavailableCount`); both 0 would stall, so
/// unavailable becomes 1.
pub fn fenceposts(surge: Option<&IntOrString>, unavailable: Option<&IntOrString>, desired: i32) -> (i32, i32) {
    let s = scaled_value(surge, desired, "0", true);
    let mut u = scaled_value(unavailable, desired, "1", true);
    if desired > 0 && s == 0 && u == 0 {
        u = 1;
    }
    (s, u)
}

/// One node as the rolling update sees it.
#[derive(Debug, Clone)]
pub struct Slot<'a> {
    pub node: String,
    pub should_run: bool,
    /// This DaemonSet's pods on the node that are not being deleted.
    pub pods: Vec<&'a Pod>,
}

/// `findUpdatedPodsOnNode`: (new, old), or None with two of either kind
/// (the manage step prunes those first).
fn split<'a>(pods: &[&'a Pod], judge: &Judge) -> Option<(Option<&'a Pod>, Option<&'a Pod>)> {
    let (mut new, mut old) = (None, None);
    for p in pods {
        let slot = if judge.updated(p) { &mut new } else { &mut old };
        if slot.is_some() {
            return None;
        }
        *slot = Some(*p);
    }
    Some((new, old))
}

/// Without surge: delete old pods while no more than `max_unavailable`
/// nodes are without an available pod; old pods that are unavailable
/// anyway go at once. Returns pod names to delete (the manage step
/// creates their replacements).
pub fn roll_without_surge(slots: &[Slot<'_>], max_unavailable: i32, judge: &Judge) -> Vec<String> {
    let mut unavailable = 0;
    let mut replace: Vec<String> = Vec::new();
    let mut candidates: Vec<String> = Vec::new();
    for s in slots {
        let Some((new, old)) = split(&s.pods, judge) else {
            unavailable += 1;
            continue;
        };
        match (new, old) {
            (None, None) | (Some(_), Some(_)) => unavailable += 1,
            (Some(n), None) => {
                if !judge.available(n) {
                    unavailable += 1;
                }
            }
            (None, Some(o)) => {
                if !judge.available(o) {
                    replace.push(o.name_any());
                } else if unavailable < max_unavailable {
                    candidates.push(o.name_any());
                }
            }
        }
    }
    let room = usize::try_from((max_unavailable - unavailable).max(0)).unwrap_or(0).min(candidates.len());
    replace.extend(candidates.into_iter().take(room));
    replace
}

/// With surge: start a new pod next to an available old one on at most
/// `max_surge` nodes at a time, delete the old pod once the new one is
/// available; an unavailable old pod is replaced at once. Old pods on
/// nodes that no longer fit go only while more than `desired` pods are
/// available. Returns (pod names to delete, nodes to create a pod on).
pub fn roll_with_surge(slots: &[Slot<'_>], max_surge: i32, desired: i32, judge: &Judge) -> (Vec<String>, Vec<String>) {
    let mut delete: Vec<String> = Vec::new();
    let mut not_fitting: Vec<String> = Vec::new();
    let mut allowed: Vec<String> = Vec::new();
    let mut candidates: Vec<String> = Vec::new();
    let (mut surging, mut available) = (0, 0);
    for s in slots {
        let Some((new, old)) = split(&s.pods, judge) else {
            surging += 1;
            continue;
        };
        if old.or(new).is_some_and(|p| judge.available(p)) {
            available += 1;
        }
        match (new, old) {
            (_, None) => {}
            (None, Some(o)) if !judge.available(o) => {
                if s.should_run {
                    allowed.push(s.node.clone());
                } else {
                    delete.push(o.name_any());
                }
            }
            (None, Some(o)) => {
                if !s.should_run {
                    not_fitting.push(o.name_any());
                } else if surging < max_surge {
                    candidates.push(s.node.clone());
                }
            }
            (Some(n), Some(o)) => {
                if judge.available(n) {
                    delete.push(o.name_any());
                } else {
                    surging += 1;
                }
            }
        }
    }
    let deletable = usize::try_from((available - desired).max(0)).unwrap_or(0).min(not_fitting.len());
    delete.extend(not_fitting.into_iter().take(deletable));
    let room = usize::try_from((max_surge - surging).max(0)).unwrap_or(0).min(candidates.len());
    allowed.extend(candidates.into_iter().take(room));
    (delete, allowed)
}

/// The counters of `DaemonSetStatus`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub desired: i32,
    pub current: i32,
    pub ready: i32,
    pub available: i32,
    pub updated: i32,
    pub misscheduled: i32,
}

/// `updateDaemonSetStatus`: per node, whether it should run a pod and the
/// DaemonSet's pods there; the oldest pod speaks for the node.
pub fn counts<'a>(nodes: impl IntoIterator<Item = (bool, Vec<&'a Pod>)>, judge: &Judge) -> Counts {
    let mut c = Counts::default();
    for (should_run, mut pods) in nodes {
        if !should_run {
            if !pods.is_empty() {
                c.misscheduled += 1;
            }
            continue;
        }
        c.desired += 1;
        pods.sort_by(|a, b| oldest_first(a, b));
        let Some(p) = pods.first() else { continue };
        c.current += 1;
        if pod_ready(p) {
            c.ready += 1;
            if judge.available(p) {
                c.available += 1;
            }
        }
        if judge.updated(p) {
            c.updated += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const RUN: Fit = Fit { should_run: true, should_continue: true };

    fn judge() -> Judge {
        Judge { hash: "new".into(), generation: Some(2), min_ready: 0 }
    }

    /// A bound pod of revision `rev`, created `age` seconds ago.
    fn pod(name: &str, rev: &str, ready: bool, age: i64) -> Pod {
        let created = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age);
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created.to_string(),
                         "labels": {REVISION_HASH: rev, "pod-template-generation": if rev == "new" { "2" } else { "1" }}},
            "spec": {"nodeName": "n", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                       "lastTransitionTime": created.to_string()}]}
        }))
        .expect("pod")
    }

    #[test]
    fn manage_creates_prunes_and_replaces_failed() {
        let j = judge();
        assert_eq!(manage_node(RUN, &[], false, &j), NodeAction { create: true, ..Default::default() });
        let (a, b) = (pod("a", "new", true, 20), pod("b", "new", true, 10));
        assert_eq!(manage_node(RUN, &[&b, &a], false, &j).delete, vec!["b".to_string()]);
        let mut failed = pod("f", "new", false, 5);
        failed.status.as_mut().expect("status").phase = Some("Failed".into());
        let act = manage_node(RUN, &[&failed], false, &j);
        assert_eq!((act.create, act.delete.clone(), act.failed.clone()), (false, vec!["f".into()], vec!["f".into()]));
        // An untolerated NoExecute taint removes everything.
        let gone = Fit { should_run: false, should_continue: false };
        assert_eq!(manage_node(gone, &[&a], false, &j).delete, vec!["a".to_string()]);
        // Surge: old ready + new not yet available both stay; once the
        // new one is available the old one goes.
        let (old, fresh) = (pod("o", "old", true, 60), pod("n", "new", false, 1));
        assert!(manage_node(RUN, &[&old, &fresh], true, &j).delete.is_empty());
        let ready_new = pod("n", "new", true, 1);
        assert_eq!(manage_node(RUN, &[&old, &ready_new], true, &j).delete, vec!["o".to_string()]);
    }

    fn slots(pods: Vec<Vec<&Pod>>) -> Vec<Slot<'_>> {
        pods.into_iter().enumerate().map(|(i, p)| Slot { node: format!("n{i}"), should_run: true, pods: p }).collect()
    }

    #[test]
    fn rolling_without_surge_respects_max_unavailable() {
        let j = judge();
        let olds: Vec<Pod> = (0..4).map(|i| pod(&format!("o{i}"), "old", true, 60)).collect();
        // All old and available: exactly maxUnavailable go.
        let s = slots(olds.iter().map(|p| vec![p]).collect());
        assert_eq!(roll_without_surge(&s, 1, &j), vec!["o0".to_string()]);
        assert_eq!(roll_without_surge(&s, 2, &j).len(), 2);
        // One node waiting for its new pod: nothing more may go.
        let s = slots(vec![vec![], vec![&olds[1]], vec![&olds[2]], vec![&olds[3]]]);
        assert!(roll_without_surge(&s, 1, &j).is_empty());
        // A new pod not yet ready counts as unavailable.
        let unready = pod("n0", "new", false, 1);
        let s = slots(vec![vec![&unready], vec![&olds[1]]]);
        assert!(roll_without_surge(&s, 1, &j).is_empty());
        // An unavailable old pod is replaced regardless.
        let broken = pod("b", "old", false, 60);
        let s = slots(vec![vec![&unready], vec![&broken], vec![&olds[2]]]);
        assert_eq!(roll_without_surge(&s, 1, &j), vec!["b".to_string()]);
    }

    #[test]
    fn rolling_with_surge_never_lowers_availability() {
        let j = judge();
        let olds: Vec<Pod> = (0..3).map(|i| pod(&format!("o{i}"), "old", true, 60)).collect();
        let s = slots(olds.iter().map(|p| vec![p]).collect());
        assert_eq!(roll_with_surge(&s, 1, 3, &j), (vec![], vec!["n0".to_string()]));
        // Surging on n0 (new not available): no second node starts.
        let unready = pod("x", "new", false, 1);
        let s = slots(vec![vec![&olds[0], &unready], vec![&olds[1]], vec![&olds[2]]]);
        assert_eq!(roll_with_surge(&s, 1, 3, &j), (vec![], vec![]));
        // New pod available: its old pod goes, the next node may surge.
        let ready = pod("x", "new", true, 1);
        let s = slots(vec![vec![&olds[0], &ready], vec![&olds[1]], vec![&olds[2]]]);
        assert_eq!(roll_with_surge(&s, 1, 3, &j), (vec!["o0".to_string()], vec!["n1".to_string()]));
    }

    #[test]
    fn fenceposts_round_up_and_never_stall() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(fenceposts(None, None, 5), (0, 1));
        assert_eq!(fenceposts(None, Some(&pct("30%")), 5), (0, 2));
        assert_eq!(fenceposts(Some(&pct("10%")), Some(&IntOrString::Int(0)), 5), (1, 0));
        assert_eq!(fenceposts(Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0)), 5), (0, 1));
    }

    #[test]
    fn status_counts_the_oldest_pod_per_node() {
        let j = judge();
        let (a, b, c) = (pod("a", "new", true, 60), pod("b", "old", false, 60), pod("c", "new", true, 1));
        let got = counts(vec![(true, vec![&a]), (true, vec![&c, &b]), (true, vec![]), (false, vec![&c])], &j);
        assert_eq!(got, Counts { desired: 3, current: 2, ready: 1, available: 1, updated: 1, misscheduled: 1 });
    }
}
