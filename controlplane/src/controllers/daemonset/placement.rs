//! Which nodes a DaemonSet's pods belong on, and the pod it puts there:
//! kubernetes `pkg/controller/daemon/daemon_controller.go`
//! (`NodeShouldRunDaemonPod`, `predicates`) and `util/daemonset_util.go`
//! (`AddOrUpdateDaemonPodTolerations`, `CreatePodTemplate`,
//! `ReplaceDaemonSetPodNodeNameNodeAffinity`, `GetTargetNodeName`,
//! `IsPodUpdated`). Pure functions over API objects.

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Toleration},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt as _;

use crate::{
    controllers::util::owner_ref,
    scheduler::predicates::{matches_node_selector, taints, tolerates, tolerations},
};

/// Pod (and ControllerRevision) label naming the template's revision.
pub const REVISION_HASH: &str = "controller-revision-hash";
/// Pod label holding the DaemonSet's `metadata.generation` at creation.
pub const TEMPLATE_GENERATION: &str = "pod-template-generation";

const NODE_NAME_FIELD: &str = "metadata.name";

/// The tolerations every daemon pod gets, so a node's conditions never
/// evict or starve it (`AddOrUpdateDaemonPodTolerations`). `not-ready` and
/// `unreachable` are tolerated for NoExecute only: a node that is NotReady
/// from the start still needs the DaemonSet to tolerate its NoSchedule
/// taint, as upstream (the manifest's agent tolerates everything).
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let mut out: Vec<(&str, &str)> = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        out.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    out.into_iter()
        .map(|(k, e)| Toleration { key: Some(k.into()), operator: Some("Exists".into()), effect: Some(e.into()), ..Default::default() })
        .collect()
}

/// `AddOrUpdateTolerationInPodSpec`: a toleration with the same key,
/// operator, value and effect is replaced (so a user's
/// `tolerationSeconds` on not-ready cannot get the pod evicted), others
/// are appended.
pub fn add_daemon_tolerations(spec: &mut PodSpec) {
    let host_network = spec.host_network.unwrap_or(false);
    let list = spec.tolerations.get_or_insert_default();
    for t in daemon_tolerations(host_network) {
        let same = |o: &Toleration| {
            o.key == t.key
                && o.effect == t.effect
                && o.operator.as_deref().unwrap_or("Equal") == t.operator.as_deref().unwrap_or("Equal")
                && o.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or("")
        };
        match list.iter_mut().find(|o| same(o)) {
            Some(o) => *o = t,
            None => list.push(t),
        }
    }
}

/// The template's pod with the daemon tolerations: what the eligibility
/// predicates judge (upstream's `NewPod`).
fn template_pod(ds: &DaemonSet) -> Pod {
    let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut spec = template.spec.unwrap_or_default();
    add_daemon_tolerations(&mut spec);
    Pod { metadata: template.metadata.unwrap_or_default(), spec: Some(spec), status: None }
}

/// Whether a daemon pod should run on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// A pod should be created here if there is none.
    pub should_run: bool,
    /// A pod already here may stay (false: delete it).
    pub should_continue: bool,
}

/// `NodeShouldRunDaemonPod`: the template's nodeName, nodeSelector and
/// required node affinity must match, else no pod at all; an untolerated
/// NoSchedule taint only stops new pods, an untolerated NoExecute taint
/// also removes the running one.
pub fn node_fit(ds: &DaemonSet, node: &Node) -> Fit {
    let pod = template_pod(ds);
    let name = node.name_any();
    let none = Fit { should_run: false, should_continue: false };
    if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty() && n != name) {
        return none;
    }
    if !matches_node_selector(&pod, node) {
        return none;
    }
    let untolerated = |effect: &str| {
        taints(node).iter().any(|t| t.effect == effect && !tolerations(&pod).iter().any(|tol| tolerates(tol, t)))
    };
    let no_execute = untolerated("NoExecute");
    if no_execute || untolerated("NoSchedule") {
        return Fit { should_run: false, should_continue: !no_execute };
    }
    Fit { should_run: true, should_continue: true }
}

/// A new daemon pod for `node`: the template with the revision labels, the
/// daemon tolerations, a controller reference, the upstream node pin
/// (required affinity replaced by `matchFields metadata.name In [node]`)
/// and `spec.nodeName` set, because our scheduler keeps pods off NotReady
/// nodes whatever they tolerate (see the module docs of `daemonset`).
pub fn new_pod(ds: &DaemonSet, node: &str, hash: &str) -> Pod {
    let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    let labels = meta.labels.get_or_insert_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    labels.insert(TEMPLATE_GENERATION.into(), ds.metadata.generation.unwrap_or(0).to_string());
    let meta = ObjectMeta {
        name: None,
        generate_name: Some(format!("{}-", ds.name_any())),
        namespace: ds.namespace(),
        owner_references: Some(vec![owner_ref(ds)]),
        ..meta
    };
    let mut spec = template.spec.unwrap_or_default();
    add_daemon_tolerations(&mut spec);
    pin_to_node(&mut spec, node);
    spec.node_name = Some(node.into());
    Pod { metadata: meta, spec: Some(spec), status: None }
}

/// `ReplaceDaemonSetPodNodeNameNodeAffinity`: the required terms become one
/// term naming the node (the others already matched it).
fn pin_to_node(spec: &mut PodSpec, node: &str) {
    let term = NodeSelectorTerm {
        match_expressions: None,
        match_fields: Some(vec![NodeSelectorRequirement {
            key: NODE_NAME_FIELD.into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector { node_selector_terms: vec![term] });
}

/// `GetTargetNodeName`: the bound node, else the node the affinity pins.
pub fn target_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(n.into());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().flat_map(|t| t.match_fields.iter().flatten()).find_map(|r| {
        let vals = r.values.as_deref().unwrap_or_default();
        (r.key == NODE_NAME_FIELD && r.operator == "In" && vals.len() == 1).then(|| vals[0].clone())
    })
}

/// `IsPodUpdated`: the pod carries the current revision hash, or was
/// created at the DaemonSet's current generation.
pub fn is_updated(pod: &Pod, hash: &str, generation: Option<i64>) -> bool {
    let labels = pod.labels();
    let by_hash = !hash.is_empty() && labels.get(REVISION_HASH).is_some_and(|h| h == hash);
    let by_generation = generation.is_some_and(|g| labels.get(TEMPLATE_GENERATION).is_some_and(|v| *v == g.to_string()));
    by_hash || by_generation
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ds(spec: serde_json::Value) -> DaemonSet {
        let mut pod_spec = spec;
        pod_spec["containers"] = json!([{"name": "c", "image": "x"}]);
        serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "u1", "generation": 3},
            "spec": {"selector": {"matchLabels": {"app": "a"}},
                     "template": {"metadata": {"labels": {"app": "a"}}, "spec": pod_spec}}
        }))
        .expect("daemonset")
    }

    fn node(name: &str, labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}})).expect("node")
    }

    const RUN: Fit = Fit { should_run: true, should_continue: true };
    const STAY: Fit = Fit { should_run: false, should_continue: true };
    const NONE: Fit = Fit { should_run: false, should_continue: false };

    #[test]
    fn eligibility_follows_selector_affinity_and_taints() {
        let plain = ds(json!({}));
        assert_eq!(node_fit(&plain, &node("a", json!({}), json!([]))), RUN);
        let sel = ds(json!({"nodeSelector": {"role": "edge"}}));
        assert_eq!(node_fit(&sel, &node("a", json!({"role": "edge"}), json!([]))), RUN);
        assert_eq!(node_fit(&sel, &node("a", json!({}), json!([]))), NONE);
        let aff = ds(json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["z9"]}]}]}}}}));
        assert_eq!(node_fit(&aff, &node("a", json!({"zone": "z9"}), json!([]))), NONE);
        assert_eq!(node_fit(&aff, &node("a", json!({"zone": "z1"}), json!([]))), RUN);
        // NoSchedule keeps new pods off but lets a running one stay;
        // NoExecute removes it.
        assert_eq!(node_fit(&plain, &node("a", json!({}), json!([{"key": "k", "effect": "NoSchedule"}]))), STAY);
        assert_eq!(node_fit(&plain, &node("a", json!({}), json!([{"key": "k", "effect": "NoExecute"}]))), NONE);
        let tol = ds(json!({"tolerations": [{"key": "k", "operator": "Exists"}]}));
        assert_eq!(node_fit(&tol, &node("a", json!({}), json!([{"key": "k", "effect": "NoExecute"}]))), RUN);
        // Daemon tolerations: a NotReady/unreachable node keeps its pod, a
        // cordoned node gets one.
        let not_ready = json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
                               {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]);
        assert_eq!(node_fit(&plain, &node("a", json!({}), not_ready.clone())), STAY);
        let all = ds(json!({"tolerations": [{"operator": "Exists"}]}));
        assert_eq!(node_fit(&all, &node("a", json!({}), not_ready)), RUN);
        let cordoned = json!([{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]);
        assert_eq!(node_fit(&plain, &node("a", json!({}), cordoned)), RUN);
        let net = json!([{"key": "node.kubernetes.io/network-unavailable", "effect": "NoSchedule"}]);
        assert_eq!(node_fit(&plain, &node("a", json!({}), net.clone())), STAY);
        assert_eq!(node_fit(&ds(json!({"hostNetwork": true})), &node("a", json!({}), net)), RUN);
        // A template nodeName limits the set to that node.
        let named = ds(json!({"nodeName": "b"}));
        assert_eq!(node_fit(&named, &node("a", json!({}), json!([]))), NONE);
        assert_eq!(node_fit(&named, &node("b", json!({}), json!([]))), RUN);
    }

    #[test]
    fn new_pod_is_pinned_labelled_and_tolerant() {
        let d = ds(json!({
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}]}}}}));
        let p = new_pod(&d, "n1", "abc");
        assert_eq!(p.metadata.generate_name.as_deref(), Some("agent-"));
        assert_eq!(p.labels().get(REVISION_HASH).map(String::as_str), Some("abc"));
        assert_eq!(p.labels().get(TEMPLATE_GENERATION).map(String::as_str), Some("3"));
        assert_eq!(p.labels().get("app").map(String::as_str), Some("a"));
        assert_eq!(p.owner_references()[0].uid, "u1");
        assert_eq!(target_node(&p).as_deref(), Some("n1"));
        let mut unbound = p.clone();
        if let Some(s) = unbound.spec.as_mut() {
            s.node_name = None;
        }
        assert_eq!(target_node(&unbound).as_deref(), Some("n1"));
        let v = serde_json::to_value(&p).expect("pod json");
        assert_eq!(
            v.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution"),
            Some(&json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}))
        );
        let tols = tolerations(&p);
        // The user's not-ready toleration with a timeout was replaced.
        let nr: Vec<_> = tols.iter().filter(|t| t.key.as_deref() == Some("node.kubernetes.io/not-ready")).collect();
        assert_eq!(nr.len(), 1);
        assert_eq!(nr[0].toleration_seconds, None);
        assert_eq!(tols.len(), 6);
        assert!(!tols.iter().any(|t| t.key.as_deref() == Some("node.kubernetes.io/network-unavailable")));
        assert!(is_updated(&p, "abc", None));
        assert!(is_updated(&p, "zzz", Some(3)));
        assert!(!is_updated(&p, "zzz", Some(4)));
    }
}
