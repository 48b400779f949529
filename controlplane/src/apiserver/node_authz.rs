//! The Node authorizer (kube-apiserver's `plugin/pkg/auth/authorizer/node`):
//! what a kubelet — user `system:node:<name>` in `system:nodes` — may do,
//! decided from its pods rather than from RBAC bindings. Like upstream it
//! runs before RBAC and only ever allows (or has no opinion, leaving the
//! request to RBAC, where the `system:node` ClusterRole is bound to nobody):
//!
//! - Secrets and ConfigMaps: `get` of one that a pod bound to the node
//!   references (env, envFrom, volumes, projected sources, imagePullSecrets);
//!   never list or watch.
//! - `serviceaccounts/token` create for a ServiceAccount one of its pods runs as.
//! - Leases in `kube-node-lease`: its own (by name; create is allowed by
//!   name-less RBAC as upstream, the name is the body's).
//! - Nodes: read any; update, patch, delete (and `nodes/status`) only its own.
//! - Pods: read (list/watch as the kubelet's reflector does); delete and
//!   `pods/status` update/patch only for pods bound to it.
//! - Everything else: the `system:node` rules (events, Services, Endpoints,
//!   EndpointSlices, TokenReview/SubjectAccessReview for its API).
//!
//! NodeRestriction admission: [`admit_create`] for creates, where the name
//! is in the body the authorizer does not see (a kubelet creates only its
//! own Node and its own Lease); [`admit_node_write`] for what a kubelet
//! writes into its Node, so it cannot steer workloads to itself: no label
//! under `node-restriction.kubernetes.io/`, no `kubernetes.io`/`k8s.io`
//! label outside the kubelet's own set, and no change of its taints.
//!
//! Not yet: the selector-aware pod/node reads of
//! `AuthorizeNodeWithSelectors`.

use std::sync::OnceLock;

use serde_json::Value;

use super::{
    Api,
    api::ListQuery,
    authn::UserInfo,
    bootstrap_policy,
    object::str_at,
    rbac::{Attributes, Rule},
    status::{ApiError, ApiResult},
};
use crate::registry;

pub const NODES_GROUP: &str = "system:nodes";
const NODE_PREFIX: &str = "system:node:";
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// The node a user is the kubelet of: `system:node:<name>` in `system:nodes`.
pub fn node_of(user: &UserInfo) -> Option<&str> {
    let name = user.name.strip_prefix(NODE_PREFIX).filter(|n| !n.is_empty())?;
    user.groups.iter().any(|g| g == NODES_GROUP).then_some(name)
}

/// The `system:node` ClusterRole's rules, for what is not subdivided.
fn node_rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        bootstrap_policy::cluster_roles()
            .iter()
            .filter(|r| str_at(r, "/metadata/name") == bootstrap_policy::NODE_ROLE)
            .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| Rule::from_json(&r))
            .collect()
    })
}

fn resource(plural: &str) -> ApiResult<&'static registry::Resource> {
    registry::find("", "v1", plural).ok_or_else(|| ApiError::internal(format!("{plural} not served")))
}

/// Pods in `ns` bound to `node`.
async fn pods_on(api: &Api, node: &str, ns: &str) -> ApiResult<Vec<Value>> {
    let pods = api.list(resource("pods")?, Some(ns), &ListQuery::default()).await?.items;
    Ok(pods.into_iter().filter(|p| str_at(p, "/spec/nodeName") == node).collect())
}

/// Names of the `kind` ("secret", "configmap", "serviceaccount") objects a pod uses.
pub fn references(pod: &Value, kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |v: Option<&Value>| {
        if let Some(n) = v.and_then(Value::as_str).filter(|n| !n.is_empty()) {
            out.push(n.to_string());
        }
    };
    let spec = &pod["spec"];
    if kind == "serviceaccount" {
        push(Some(spec.get("serviceAccountName").unwrap_or(&Value::String("default".into()))));
        return out;
    }
    let (key_ref, from_ref, volume, volume_name) = match kind {
        "secret" => ("secretKeyRef", "secretRef", "secret", "secretName"),
        _ => ("configMapKeyRef", "configMapRef", "configMap", "name"),
    };
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                push(e.pointer(&format!("/valueFrom/{key_ref}/name")));
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                push(e.pointer(&format!("/{from_ref}/name")));
            }
        }
    }
    for v in spec["volumes"].as_array().into_iter().flatten() {
        push(v.get(volume).and_then(|x| x.get(volume_name)));
        for s in v.pointer("/projected/sources").and_then(Value::as_array).into_iter().flatten() {
            push(s.get(volume).and_then(|x| x.get("name")));
        }
    }
    if kind == "secret" {
        for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
            push(s.get("name"));
        }
    }
    out
}

async fn pod_bound_to(api: &Api, node: &str, ns: &str, name: &str) -> ApiResult<bool> {
    match api.get(resource("pods")?, Some(ns), name).await {
        Ok(p) => Ok(str_at(&p, "/spec/nodeName") == node),
        Err(e) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// NodeRestriction admission of a create by `user` of `obj` (as `res`
/// in `group`): 403, worded as upstream, when a kubelet creates a Node or
/// a node Lease under another node's name.
pub fn admit_create(user: &UserInfo, group: &str, plural: &str, obj: &Value) -> ApiResult<()> {
    let Some(node) = node_of(user) else { return Ok(()) };
    let name = str_at(obj, "/metadata/name");
    match (group, plural) {
        ("", "nodes") if name != node => {
            Err(ApiError::forbidden(format!("nodes \"{name}\" is forbidden: node \"{node}\" is not allowed to modify node \"{name}\"")))
        }
        ("coordination.k8s.io", "leases") if name != node => Err(ApiError::forbidden(format!(
            "leases.coordination.k8s.io \"{name}\" is forbidden: can only access node lease with the same name as the requesting node"
        ))),
        _ => Ok(()),
    }
}

/// The labels a kubelet may set outside its own namespaces (upstream
/// `kubeletapis.IsKubeletLabel`).
const KUBELET_LABELS: &[&str] = &[
    "kubernetes.io/hostname",
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
    "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    "beta.kubernetes.io/os",
    "beta.kubernetes.io/arch",
];

fn in_namespace(namespace: &str, domain: &str) -> bool {
    namespace == domain || namespace.strip_suffix(domain).is_some_and(|p| p.ends_with('.'))
}

/// upstream `getForbiddenLabels`: the labels of `modified` a kubelet may
/// not set.
fn forbidden_labels<'a>(modified: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = modified
        .filter(|label| {
            let namespace = label.split_once('/').map_or("", |(ns, _)| ns);
            let kubernetes = in_namespace(namespace, "kubernetes.io") || in_namespace(namespace, "k8s.io");
            let kubelet = KUBELET_LABELS.contains(label)
                || in_namespace(namespace, "kubelet.kubernetes.io")
                || in_namespace(namespace, "node.kubernetes.io");
            in_namespace(namespace, "node-restriction.kubernetes.io") || (kubernetes && !kubelet)
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// NodeRestriction for a kubelet's write of its Node (`old` absent on
/// create): labels outside the allowed set are refused on create and on
/// change, taints may not change. Anyone else passes.
pub fn admit_node_write(user: &UserInfo, old: Option<&Value>, new: &Value) -> ApiResult<()> {
    let Some(node) = node_of(user) else { return Ok(()) };
    let name = str_at(new, "/metadata/name");
    let labels = |v: Option<&Value>| -> serde_json::Map<String, Value> {
        v.and_then(|v| v.pointer("/metadata/labels")).and_then(Value::as_object).cloned().unwrap_or_default()
    };
    let (before, after) = (labels(old), labels(Some(new)));
    let modified = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.as_str())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).map(String::as_str));
    let forbidden = forbidden_labels(modified);
    let refuse = |why: String| Err(ApiError::forbidden(format!("nodes \"{name}\" is forbidden: {why}")));
    match old {
        None if !forbidden.is_empty() => {
            refuse(format!("node \"{node}\" is not allowed to set the following labels: {}", forbidden.join(", ")))
        }
        Some(old) if old.pointer("/spec/taints") != new.pointer("/spec/taints") => {
            refuse(format!("node \"{node}\" is not allowed to modify taints"))
        }
        Some(_) if !forbidden.is_empty() => refuse(format!("is not allowed to modify labels: {}", forbidden.join(", "))),
        _ => Ok(()),
    }
}

/// Whether the Node authorizer allows `a`; false means "no opinion" (RBAC
/// decides).
pub async fn allows(api: &Api, node: &str, a: &Attributes) -> ApiResult<bool> {
    let rules_allow = || node_rules().iter().any(|r| r.allows(a));
    if !a.resource_request {
        return Ok(rules_allow());
    }
    let sub = a.subresource.as_str();
    match (a.api_group.as_str(), a.resource.as_str()) {
        ("", kind @ ("secrets" | "configmaps")) if sub.is_empty() => {
            if a.verb != "get" || a.name.is_empty() {
                return Ok(false);
            }
            let kind = if kind == "secrets" { "secret" } else { "configmap" };
            Ok(pods_on(api, node, &a.namespace).await?.iter().any(|p| references(p, kind).contains(&a.name)))
        }
        ("", "serviceaccounts") if sub == "token" => {
            Ok(a.verb == "create"
                && pods_on(api, node, &a.namespace).await?.iter().any(|p| references(p, "serviceaccount").contains(&a.name)))
        }
        ("coordination.k8s.io", "leases") => {
            Ok(a.namespace == LEASE_NAMESPACE && (a.name == node || (a.verb == "create" && a.name.is_empty())) && rules_allow())
        }
        ("", "nodes") => match a.verb.as_str() {
            "get" | "list" | "watch" | "create" => Ok(rules_allow()),
            _ => Ok(a.name == node && rules_allow()),
        },
        ("", "pods") if sub == "status" || (sub.is_empty() && a.verb == "delete") => {
            Ok(rules_allow() && pod_bound_to(api, node, &a.namespace, &a.name).await?)
        }
        _ => Ok(rules_allow()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn node_users() {
        let u = |name: &str, groups: &[&str]| UserInfo { name: name.into(), groups: groups.iter().map(|g| (*g).to_string()).collect(), ..UserInfo::default() };
        assert_eq!(node_of(&u("system:node:n1", &["system:nodes", "system:authenticated"])), Some("n1"));
        assert_eq!(node_of(&u("system:node:n1", &["system:authenticated"])), None, "the group is required");
        assert_eq!(node_of(&u("system:node:", &["system:nodes"])), None);
        assert_eq!(node_of(&u("alice", &["system:nodes"])), None);
    }

    #[test]
    fn pod_references() {
        let pod = json!({"spec": {
            "serviceAccountName": "app",
            "imagePullSecrets": [{"name": "pull"}],
            "containers": [{"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}},
                                    {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c-env", "key": "k"}}}],
                            "envFrom": [{"secretRef": {"name": "s-from"}}, {"configMapRef": {"name": "c-from"}}]}],
            "initContainers": [{"envFrom": [{"secretRef": {"name": "s-init"}}]}],
            "volumes": [{"secret": {"secretName": "s-vol"}}, {"configMap": {"name": "c-vol"}},
                        {"projected": {"sources": [{"secret": {"name": "s-proj"}}, {"configMap": {"name": "c-proj"}}]}}]}});
        assert_eq!(references(&pod, "secret"), ["s-env", "s-from", "s-init", "s-vol", "s-proj", "pull"]);
        assert_eq!(references(&pod, "configmap"), ["c-env", "c-from", "c-vol", "c-proj"]);
        assert_eq!(references(&pod, "serviceaccount"), ["app"]);
        assert_eq!(references(&json!({"spec": {}}), "serviceaccount"), ["default"]);
    }

    #[test]
    fn kubelets_create_only_their_own_node_and_lease() {
        let n1 = UserInfo { name: "system:node:n1".into(), groups: vec![NODES_GROUP.into()], ..UserInfo::default() };
        let named = |n: &str| json!({"metadata": {"name": n}});
        assert!(admit_create(&n1, "", "nodes", &named("n1")).is_ok());
        let e = admit_create(&n1, "", "nodes", &named("n2")).unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (403, "nodes \"n2\" is forbidden: node \"n1\" is not allowed to modify node \"n2\""));
        assert!(admit_create(&n1, "coordination.k8s.io", "leases", &named("n1")).is_ok());
        assert_eq!(admit_create(&n1, "coordination.k8s.io", "leases", &named("n2")).unwrap_err().code, 403);
        assert!(admit_create(&n1, "", "configmaps", &named("x")).is_ok());
        let admin = UserInfo { name: "admin".into(), ..UserInfo::default() };
        assert!(admit_create(&admin, "", "nodes", &named("n2")).is_ok());
    }

    #[test]
    fn kubelets_set_only_kubelet_labels_and_never_change_taints() {
        let n1 = UserInfo { name: "system:node:n1".into(), groups: vec![NODES_GROUP.into()], ..UserInfo::default() };
        let node = |labels: Value, taints: Value| json!({"metadata": {"name": "n1", "labels": labels}, "spec": {"taints": taints}});
        let own = json!({"kubernetes.io/hostname": "n1", "node.kubernetes.io/exclude-from-external-load-balancers": "",
            "kubelet.kubernetes.io/x": "1", "example.com/team": "a"});
        assert!(admit_node_write(&n1, None, &node(own.clone(), json!([]))).is_ok());
        let bad = json!({"node-restriction.kubernetes.io/secure": "true", "node-role.kubernetes.io/control-plane": "",
            "kubernetes.io/hostname": "n1"});
        let e = admit_node_write(&n1, None, &node(bad, json!([]))).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (403, "nodes \"n1\" is forbidden: node \"n1\" is not allowed to set the following labels: node-restriction.kubernetes.io/secure, node-role.kubernetes.io/control-plane")
        );
        let old = node(own.clone(), json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]));
        let e = admit_node_write(&n1, Some(&old), &node(own.clone(), json!([]))).unwrap_err();
        assert_eq!(e.message, "nodes \"n1\" is forbidden: node \"n1\" is not allowed to modify taints");
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"]["example.k8s.io/tier"] = json!("gold");
        relabelled["metadata"]["labels"]["example.com/team"] = json!("b");
        let e = admit_node_write(&n1, Some(&old), &relabelled).unwrap_err();
        assert_eq!(e.message, "nodes \"n1\" is forbidden: is not allowed to modify labels: example.k8s.io/tier");
        // Removing a restricted label is a modification too; an unchanged one is not.
        let mut held = old.clone();
        held["metadata"]["labels"]["node-restriction.kubernetes.io/pool"] = json!("a");
        assert!(admit_node_write(&n1, Some(&held), &held).is_ok());
        let mut dropped = held.clone();
        dropped["metadata"]["labels"].as_object_mut().unwrap().remove("node-restriction.kubernetes.io/pool");
        assert!(admit_node_write(&n1, Some(&held), &dropped).is_err());
        let admin = UserInfo { name: "admin".into(), ..UserInfo::default() };
        assert!(admit_node_write(&admin, Some(&old), &node(json!({"node-role.kubernetes.io/x": ""}), json!([]))).is_ok());
    }

    #[test]
    fn node_rules_come_from_the_bootstrap_role() {
        assert!(!node_rules().is_empty());
    }
}
