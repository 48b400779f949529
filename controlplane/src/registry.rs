//! The resources the apiserver serves, described once.
//!
//! Discovery, OpenAPI, routing, tables and storage keys are all derived
//! from this table, so adding a resource is one entry here (plus, if it
//! wants them, a printer in `apiserver/table.rs` and validation rules).

/// One served resource.
#[derive(Debug, Clone, Copy)]
pub struct Resource {
    /// API group ("" = core).
    pub group: &'static str,
    pub version: &'static str,
    /// Plural resource name as in URLs.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources served under `<plural>/<name>/<sub>`.
    pub subresources: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Storage key prefix for all objects of this resource.
    pub fn prefix(&self) -> String {
        let g = if self.group.is_empty() { "core" } else { self.group };
        format!("/{g}/{}/", self.plural)
    }

    /// Storage key prefix for one namespace (or all, if `ns` is None).
    pub fn ns_prefix(&self, ns: Option<&str>) -> String {
        match (self.namespaced, ns) {
            (true, Some(ns)) => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    pub fn key(&self, ns: Option<&str>, name: &str) -> String {
        if self.namespaced {
            format!("{}{}/{name}", self.prefix(), ns.unwrap_or("default"))
        } else {
            format!("{}{name}", self.prefix())
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }

    pub fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

const ALL: &[&str] = &["all"];

pub const RESOURCES: &[Resource] = &[
    Resource { group: "", version: "v1", plural: "namespaces", singular: "namespace", kind: "Namespace", namespaced: false, short_names: &["ns"], categories: &[], subresources: &["status", "finalize"] },
    Resource { group: "", version: "v1", plural: "nodes", singular: "node", kind: "Node", namespaced: false, short_names: &["no"], categories: &[], subresources: &["status"] },
    Resource { group: "", version: "v1", plural: "pods", singular: "pod", kind: "Pod", namespaced: true, short_names: &["po"], categories: ALL, subresources: &["status", "log", "exec", "attach", "portforward", "binding"] },
    Resource { group: "", version: "v1", plural: "services", singular: "service", kind: "Service", namespaced: true, short_names: &["svc"], categories: ALL, subresources: &["status"] },
    Resource { group: "", version: "v1", plural: "endpoints", singular: "endpoints", kind: "Endpoints", namespaced: true, short_names: &["ep"], categories: &[], subresources: &[] },
    Resource { group: "", version: "v1", plural: "configmaps", singular: "configmap", kind: "ConfigMap", namespaced: true, short_names: &["cm"], categories: &[], subresources: &[] },
    Resource { group: "", version: "v1", plural: "secrets", singular: "secret", kind: "Secret", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "", version: "v1", plural: "events", singular: "event", kind: "Event", namespaced: true, short_names: &["ev"], categories: &[], subresources: &[] },
    Resource { group: "", version: "v1", plural: "serviceaccounts", singular: "serviceaccount", kind: "ServiceAccount", namespaced: true, short_names: &["sa"], categories: &[], subresources: &["token"] },
    Resource { group: "apps", version: "v1", plural: "deployments", singular: "deployment", kind: "Deployment", namespaced: true, short_names: &["deploy"], categories: ALL, subresources: &["status", "scale"] },
    Resource { group: "apps", version: "v1", plural: "replicasets", singular: "replicaset", kind: "ReplicaSet", namespaced: true, short_names: &["rs"], categories: ALL, subresources: &["status", "scale"] },
    Resource { group: "discovery.k8s.io", version: "v1", plural: "endpointslices", singular: "endpointslice", kind: "EndpointSlice", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "coordination.k8s.io", version: "v1", plural: "leases", singular: "lease", kind: "Lease", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "networking.k8s.io", version: "v1", plural: "networkpolicies", singular: "networkpolicy", kind: "NetworkPolicy", namespaced: true, short_names: &["netpol"], categories: &[], subresources: &[] },
    // DaemonSets run through `controllers/daemonset.rs`, which keeps their
    // template history in ControllerRevisions (what `kubectl rollout
    // history|undo daemonset` reads). The RBAC kinds are what the
    // authorizer evaluates.
    Resource { group: "apps", version: "v1", plural: "daemonsets", singular: "daemonset", kind: "DaemonSet", namespaced: true, short_names: &["ds"], categories: ALL, subresources: &["status"] },
    Resource { group: "apps", version: "v1", plural: "controllerrevisions", singular: "controllerrevision", kind: "ControllerRevision", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "rbac.authorization.k8s.io", version: "v1", plural: "clusterroles", singular: "clusterrole", kind: "ClusterRole", namespaced: false, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "rbac.authorization.k8s.io", version: "v1", plural: "clusterrolebindings", singular: "clusterrolebinding", kind: "ClusterRoleBinding", namespaced: false, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "rbac.authorization.k8s.io", version: "v1", plural: "roles", singular: "role", kind: "Role", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
    Resource { group: "rbac.authorization.k8s.io", version: "v1", plural: "rolebindings", singular: "rolebinding", kind: "RoleBinding", namespaced: true, short_names: &[], categories: &[], subresources: &[] },
];

/// Group/versions in discovery order (core first).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES {
        if !out.contains(&(r.group, r.version)) {
            out.push((r.group, r.version));
        }
    }
    out
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.kind == kind && r.api_version() == api_version)
}

/// The resource a storage key belongs to, with namespace and name.
pub fn parse_key(key: &str) -> Option<(&'static Resource, Option<String>, String)> {
    let rest = key.strip_prefix('/')?;
    let mut parts = rest.splitn(4, '/');
    let group = parts.next()?;
    let plural = parts.next()?;
    let group = if group == "core" { "" } else { group };
    let res = RESOURCES.iter().find(|r| r.group == group && r.plural == plural)?;
    if res.namespaced {
        let ns = parts.next()?.to_string();
        let name = parts.next()?.to_string();
        Some((res, Some(ns), name))
    } else {
        let name = parts.next()?.to_string();
        Some((res, None, name))
    }
}
