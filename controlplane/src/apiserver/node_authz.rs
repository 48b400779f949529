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
//! [`admit_create`] is NodeRestriction's part for creates, where the name
//! is in the body the authorizer does not see: a kubelet creates only its
//! own Node and its own Lease.
//!
//! Not yet: NodeRestriction's label rules (a kubelet setting labels under
//! `node-restriction.kubernetes.io/` or outside the allowed kubelet
//! prefixes), and the selector-aware pod/node reads of
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
    fn node_rules_come_from_the_bootstrap_role() {
        assert!(!node_rules().is_empty());
    }
}
