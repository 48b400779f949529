//! Legacy (unaggregated) discovery documents: what kubectl, kube-rs and
//! the Python client read to map kinds to resources.

use serde_json::{Value, json};

use crate::registry::{self, RESOURCES, Resource};

pub const K8S_VERSION: &str = "v1.32.0";

pub fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": format!("{K8S_VERSION}+riptide"),
        "gitCommit": "riptide", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "rust", "compiler": "rustc", "platform": "linux/amd64",
    })
}

pub fn api_versions(server_address: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]})
}

/// Served group/versions: the stored resources' and the review groups'.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs = registry::group_versions();
    for r in super::reviews::REVIEWS {
        if !gvs.contains(&(r.group, "v1")) {
            gvs.push((r.group, "v1"));
        }
    }
    gvs
}

fn group_json(group: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    let preferred = versions.first().cloned().unwrap_or(Value::Null);
    json!({"name": group, "versions": versions, "preferredVersion": preferred})
}

pub fn api_group_list() -> Value {
    let mut groups: Vec<Value> = Vec::new();
    let mut seen = Vec::new();
    for (g, _) in group_versions() {
        if g.is_empty() || seen.contains(&g) {
            continue;
        }
        seen.push(g);
        groups.push(group_json(g));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    if !group_versions().iter().any(|(g, _)| *g == group) || group.is_empty() {
        return None;
    }
    let mut g = group_json(group);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

const VERBS: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

fn sub_entry(r: &Resource, sub: &str) -> Value {
    let name = format!("{}/{sub}", r.plural);
    match sub {
        "status" => json!({"name": name, "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}),
        "scale" => json!({"name": name, "singularName": "", "namespaced": r.namespaced, "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}),
        "log" => json!({"name": name, "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"]}),
        "exec" => json!({"name": name, "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]}),
        "attach" => json!({"name": name, "singularName": "", "namespaced": true, "kind": "PodAttachOptions", "verbs": ["create", "get"]}),
        "portforward" => json!({"name": name, "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}),
        "binding" => json!({"name": name, "singularName": "", "namespaced": true, "kind": "Binding", "verbs": ["create"]}),
        "finalize" => json!({"name": name, "singularName": "", "namespaced": false, "kind": "Namespace", "verbs": ["update"]}),
        "token" => json!({"name": name, "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}),
        _ => json!({"name": name, "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get"]}),
    }
}

pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let rs: Vec<&Resource> = RESOURCES.iter().filter(|r| r.group == group && r.version == version).collect();
    let mut list = if version == "v1" { super::reviews::discovery_entries(group) } else { Vec::new() };
    if rs.is_empty() && list.is_empty() {
        return None;
    }
    for r in rs {
        let mut e = json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": VERBS, "storageVersionHash": ""});
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        list.push(e);
        for s in r.subresources {
            list.push(sub_entry(r, s));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}))
}
