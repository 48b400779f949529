//! The default ClusterRoles and ClusterRoleBindings every cluster starts
//! with, after kube-apiserver's `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go`,
//! trimmed to the resources this apiserver serves. `admin`, `edit` and
//! `view` are aggregated from the `system:aggregate-to-*` roles exactly as
//! upstream, so a ClusterRole labelled `rbac.authorization.k8s.io/aggregate-to-edit`
//! extends them. Each carries `rbac.authorization.kubernetes.io/autoupdate: "true"`:
//! the apiserver repairs them at start unless that is set to "false".

use serde_json::{Value, json};

const RO: &[&str] = &["get", "list", "watch"];
const RW: &[&str] = &["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"];
const WRITE: &[&str] = &["create", "update", "patch", "delete", "deletecollection"];

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn urls(paths: &[&str], verbs: &[&str]) -> Value {
    json!({"nonResourceURLs": paths, "verbs": verbs})
}

fn meta(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = serde_json::Map::new();
    l.insert("kubernetes.io/bootstrapping".into(), json!("rbac-defaults"));
    for (k, v) in labels {
        l.insert((*k).into(), json!(v));
    }
    json!({"name": name, "labels": l, "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}})
}

fn cluster_role(name: &str, labels: &[(&str, &str)], rules: Vec<Value>) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name, labels), "rules": rules})
}

fn aggregated(name: &str, labels: &[(&str, &str)], selector_label: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta(name, labels),
        "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {selector_label: "true"}}]}, "rules": []})
}

fn binding(name: &str, role: &str, subjects: &[(&str, &str)]) -> Value {
    let subjects: Vec<Value> = subjects
        .iter()
        .map(|(kind, n)| json!({"kind": kind, "apiGroup": "rbac.authorization.k8s.io", "name": n}))
        .collect();
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": meta(name, &[]),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}, "subjects": subjects})
}

/// The kubelets' ClusterRole, which the Node authorizer evaluates.
pub const NODE_ROLE: &str = "system:node";

const AGG_ADMIN: &str = "rbac.authorization.k8s.io/aggregate-to-admin";
const AGG_EDIT: &str = "rbac.authorization.k8s.io/aggregate-to-edit";
const AGG_VIEW: &str = "rbac.authorization.k8s.io/aggregate-to-view";

pub fn cluster_roles() -> Vec<Value> {
    vec![
        cluster_role("cluster-admin", &[], vec![rule(&["*"], &["*"], &["*"]), urls(&["*"], &["*"])]),
        aggregated("admin", &[], AGG_ADMIN),
        aggregated("edit", &[(AGG_ADMIN, "true")], AGG_EDIT),
        aggregated("view", &[(AGG_EDIT, "true")], AGG_VIEW),
        cluster_role("system:aggregate-to-admin", &[(AGG_ADMIN, "true")], vec![
            rule(&["authorization.k8s.io"], &["localsubjectaccessreviews"], &["create"]),
            rule(&["rbac.authorization.k8s.io"], &["roles", "rolebindings"], RW),
        ]),
        cluster_role("system:aggregate-to-edit", &[(AGG_EDIT, "true")], vec![
            rule(&[""], &["pods/attach", "pods/proxy", "pods/exec", "pods/portforward"], &["create", "get", "update", "patch", "delete"]),
            rule(&[""], &["pods", "services", "services/proxy", "endpoints", "configmaps", "secrets", "serviceaccounts", "events"], WRITE),
            rule(&[""], &["secrets"], RO),
            rule(&[""], &["serviceaccounts/token"], &["create"]),
            rule(&["apps"], &["daemonsets", "deployments", "deployments/rollback", "deployments/scale", "replicasets", "replicasets/scale"], WRITE),
            rule(&["networking.k8s.io"], &["networkpolicies"], WRITE),
        ]),
        cluster_role("system:aggregate-to-view", &[(AGG_VIEW, "true")], vec![
            rule(&[""], &["pods", "services", "services/status", "endpoints", "configmaps", "serviceaccounts"], RO),
            rule(&[""], &["events", "pods/status", "pods/log", "namespaces", "namespaces/status"], RO),
            rule(&["apps"], &["controllerrevisions", "daemonsets", "daemonsets/status", "deployments", "deployments/scale", "deployments/status", "replicasets", "replicasets/scale", "replicasets/status"], RO),
            rule(&["discovery.k8s.io"], &["endpointslices"], RO),
            rule(&["networking.k8s.io"], &["networkpolicies"], RO),
        ]),
        cluster_role("system:discovery", &[], vec![urls(
            &["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/version", "/version/", "/openapi", "/openapi/*"],
            &["get"],
        )]),
        cluster_role("system:public-info-viewer", &[], vec![urls(&["/healthz", "/livez", "/readyz", "/version", "/version/"], &["get"])]),
        cluster_role("system:basic-user", &[], vec![
            rule(&["authorization.k8s.io"], &["selfsubjectaccessreviews", "selfsubjectrulesreviews"], &["create"]),
            rule(&["authentication.k8s.io"], &["selfsubjectreviews"], &["create"]),
        ]),
        cluster_role("system:auth-delegator", &[], vec![
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            rule(&["authorization.k8s.io"], &["subjectaccessreviews"], &["create"]),
        ]),
        cluster_role("system:kube-scheduler", &[], vec![
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch", "update"]),
            rule(&["coordination.k8s.io"], &["leases"], &["create", "get", "update"]),
            rule(&[""], &["nodes", "namespaces", "services", "configmaps"], RO),
            rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
            rule(&[""], &["bindings", "pods/binding"], &["create"]),
            rule(&[""], &["pods/status"], &["patch", "update"]),
            rule(&["apps"], &["replicasets"], RO),
        ]),
        cluster_role("system:kube-controller-manager", &[], vec![
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch", "update"]),
            rule(&["coordination.k8s.io"], &["leases"], &["create", "get", "update", "list", "watch"]),
            rule(&[""], &["pods", "endpoints", "services", "configmaps", "secrets", "serviceaccounts", "namespaces", "nodes"], RW),
            rule(&[""], &["pods/status", "services/status", "nodes/status", "namespaces/status", "namespaces/finalize"], &["get", "update", "patch"]),
            rule(&[""], &["serviceaccounts/token"], &["create"]),
            rule(&["apps"], &["deployments", "replicasets", "daemonsets", "controllerrevisions"], RW),
            rule(&["apps"], &["deployments/status", "replicasets/status", "daemonsets/status", "deployments/scale", "replicasets/scale"], &["get", "update", "patch"]),
            rule(&["discovery.k8s.io"], &["endpointslices"], RW),
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            rule(&["authorization.k8s.io"], &["subjectaccessreviews"], &["create"]),
        ]),
        // Full use of the kubelet API (exec, logs, stats), for the
        // apiserver's kubelet client certificate.
        cluster_role("system:kubelet-api-admin", &[], vec![
            rule(&[""], &["nodes"], &["get", "list", "watch", "proxy"]),
            rule(&[""], &["nodes/proxy", "nodes/log", "nodes/stats", "nodes/metrics", "nodes/spec"], &["*"]),
        ]),
        // What a kubelet may do where the Node authorizer (`node_authz.rs`)
        // does not subdivide by its pods; bound to nobody, as upstream.
        cluster_role(NODE_ROLE, &[], vec![
            rule(&[""], &["nodes"], &["create", "get", "list", "watch", "update", "patch"]),
            rule(&[""], &["nodes/status"], &["patch", "update"]),
            rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
            rule(&[""], &["pods/status"], &["patch", "update"]),
            rule(&[""], &["services", "endpoints"], RO),
            rule(&[""], &["configmaps", "secrets"], &["get", "list", "watch"]),
            rule(&[""], &["serviceaccounts/token"], &["create"]),
            rule(&["", "events.k8s.io"], &["events"], &["create", "patch", "update"]),
            rule(&["coordination.k8s.io"], &["leases"], &["create", "delete", "get", "patch", "update"]),
            rule(&["discovery.k8s.io"], &["endpointslices"], RO),
            rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            rule(&["authorization.k8s.io"], &["subjectaccessreviews"], &["create"]),
        ]),
    ]
}

pub fn cluster_role_bindings() -> Vec<Value> {
    vec![
        binding("cluster-admin", "cluster-admin", &[("Group", "system:masters")]),
        binding("system:discovery", "system:discovery", &[("Group", "system:authenticated")]),
        binding("system:basic-user", "system:basic-user", &[("Group", "system:authenticated")]),
        binding("system:public-info-viewer", "system:public-info-viewer", &[("Group", "system:authenticated"), ("Group", "system:unauthenticated")]),
        binding("system:kube-scheduler", "system:kube-scheduler", &[("User", "system:kube-scheduler")]),
        binding("system:kube-controller-manager", "system:kube-controller-manager", &[("User", "system:kube-controller-manager")]),
        // Kubelets get their rights from the Node authorizer, not from this.
        binding(NODE_ROLE, NODE_ROLE, &[]),
        binding("kube-apiserver-kubelet-client", "system:kubelet-api-admin", &[("User", super::tls::KUBELET_CLIENT_USER)]),
    ]
}
