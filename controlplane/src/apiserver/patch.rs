//! Patches: strategic merge (what kubectl's client-side apply and the
//! Python client send), JSON merge (RFC 7386), JSON patch (RFC 6902) and
//! server-side apply (approximated as a strategic merge of the applied
//! configuration, without field ownership).
//!
//! Strategic merge needs each list's merge key; kube-apiserver reads them
//! from Go struct tags (`patchMergeKey`/`patchStrategy`). The table in
//! [`list_strategy`] carries the tags of the types we serve.

use serde_json::{Map, Value};

use super::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Some(Self::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListStrategy<'a> {
    /// Replace the whole list (no patch strategy).
    Replace,
    /// Merge elements by this key.
    MergeKey(&'a str),
    /// Union of primitives.
    Primitive,
}

/// The merge strategy of the list at `path` (field names, no indices).
fn list_strategy(kind: &str, path: &[String]) -> ListStrategy<'static> {
    let n = path.len();
    let last = path.last().map_or("", String::as_str);
    let parent = if n >= 2 { path[n - 2].as_str() } else { "" };
    let is_container_list = |f: &str| matches!(f, "containers" | "initContainers" | "ephemeralContainers");
    match last {
        "containers" | "initContainers" | "ephemeralContainers" => ListStrategy::MergeKey("name"),
        "ports" if is_container_list(parent) => ListStrategy::MergeKey("containerPort"),
        "ports" if kind == "Service" && path.len() == 2 && parent == "spec" => ListStrategy::MergeKey("port"),
        "env" if is_container_list(parent) => ListStrategy::MergeKey("name"),
        "volumeMounts" => ListStrategy::MergeKey("mountPath"),
        "volumeDevices" => ListStrategy::MergeKey("devicePath"),
        "volumes" if parent == "spec" => ListStrategy::MergeKey("name"),
        "imagePullSecrets" => ListStrategy::MergeKey("name"),
        "hostAliases" => ListStrategy::MergeKey("ip"),
        "topologySpreadConstraints" => ListStrategy::MergeKey("topologyKey"),
        "resourceClaims" | "schedulingGates" => ListStrategy::MergeKey("name"),
        "ownerReferences" if parent == "metadata" => ListStrategy::MergeKey("uid"),
        "finalizers" if parent == "metadata" => ListStrategy::Primitive,
        "conditions" if parent == "status" => ListStrategy::MergeKey("type"),
        "addresses" if parent == "status" && kind == "Node" => ListStrategy::MergeKey("type"),
        _ => ListStrategy::Replace,
    }
}

/// Apply a strategic merge patch to `original` of `kind`.
pub fn strategic_merge(kind: &str, original: &Value, patch: &Value) -> Result<Value, ApiError> {
    let Value::Object(p) = patch else {
        return Err(ApiError::bad_request("strategic merge patch must be a JSON object"));
    };
    let mut out = original.clone();
    if !out.is_object() {
        out = Value::Object(Map::new());
    }
    let mut path = Vec::new();
    merge_map(kind, &mut out, p, &mut path)?;
    Ok(out)
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_map(kind: &str, orig: &mut Value, patch: &Map<String, Value>, path: &mut Vec<String>) -> Result<(), ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *orig = strip_directives(&Value::Object(patch.clone()));
            return Ok(());
        }
        Some("delete") => {
            *orig = Value::Null;
            return Ok(());
        }
        Some(other) if other != "merge" => {
            return Err(ApiError::bad_request(format!("unknown patch type: {other}")));
        }
        _ => {}
    }
    if !orig.is_object() {
        *orig = Value::Object(Map::new());
    }
    let Value::Object(o) = orig else { unreachable!("made an object above") };
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if let Value::Array(a) = v {
                orders.push((field.to_string(), a.clone()));
            }
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Value::Array(del)) = (o.get_mut(field), v) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        path.push(k.clone());
        match v {
            Value::Null => {
                o.remove(k);
            }
            Value::Object(pm) => {
                let entry = o.entry(k.clone()).or_insert(Value::Null);
                merge_map(kind, entry, pm, path)?;
                if entry.is_null() {
                    o.remove(k);
                }
            }
            Value::Array(pa) => {
                let strategy = list_strategy(kind, path);
                let cur = o.remove(k);
                let merged = match (strategy, cur) {
                    (ListStrategy::MergeKey(key), Some(Value::Array(ca))) => merge_list(kind, ca, pa, key, path)?,
                    (ListStrategy::MergeKey(key), _) => merge_list(kind, Vec::new(), pa, key, path)?,
                    (ListStrategy::Primitive, Some(Value::Array(mut ca))) => {
                        for x in pa {
                            if !ca.contains(x) {
                                ca.push(x.clone());
                            }
                        }
                        ca
                    }
                    _ => pa.iter().map(strip_directives).collect(),
                };
                o.insert(k.clone(), Value::Array(merged));
            }
            other => {
                o.insert(k.clone(), other.clone());
            }
        }
        path.pop();
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        o.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (field, order) in orders {
        path.push(field.clone());
        let strategy = list_strategy(kind, path);
        path.pop();
        if let Some(Value::Array(list)) = o.get_mut(&field) {
            reorder(list, &order, strategy);
        }
    }
    Ok(())
}

fn key_of<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
}

fn merge_list(
    kind: &str,
    mut cur: Vec<Value>,
    patch: &[Value],
    key: &str,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, ApiError> {
    if patch.iter().any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return Ok(patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(strip_directives)
            .collect());
    }
    for pe in patch {
        let Value::Object(pm) = pe else {
            // Primitive element in a keyed list: append if new.
            if !cur.contains(pe) {
                cur.push(pe.clone());
            }
            continue;
        };
        let Some(kv) = key_of(pe, key) else {
            return Err(ApiError::bad_request(format!(
                "map: {pe} does not contain declared merge key: {key}"
            )));
        };
        let pos = cur.iter().position(|c| key_of(c, key) == Some(kv));
        if pm.get("$patch").and_then(Value::as_str) == Some("delete") {
            cur.retain(|c| key_of(c, key) != Some(kv));
            continue;
        }
        match pos {
            Some(i) => {
                merge_map(kind, &mut cur[i], pm, path)?;
            }
            None => cur.push(strip_directives(pe)),
        }
    }
    Ok(cur)
}

fn reorder(list: &mut Vec<Value>, order: &[Value], strategy: ListStrategy<'_>) {
    let ident = |v: &Value| -> Value {
        match strategy {
            ListStrategy::MergeKey(k) => v.get(k).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let wanted: Vec<Value> = order.iter().map(ident).collect();
    let mut sorted: Vec<Value> = Vec::with_capacity(list.len());
    for w in &wanted {
        if let Some(pos) = list.iter().position(|e| &ident(e) == w) {
            sorted.push(list.remove(pos));
        }
    }
    sorted.append(list);
    *list = sorted;
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(original: &Value, patch: &Value) -> Value {
    let mut out = original.clone();
    json_patch::merge(&mut out, patch);
    out
}

/// kube-apiserver's bounds on a JSON patch: its operation count, and the
/// bytes its `copy` operations may duplicate in total (each copy can double
/// the document, so a small patch could otherwise build a huge one).
const MAX_JSON_PATCH_OPS: usize = 10_000;
const MAX_JSON_PATCH_COPY_BYTES: usize = 3 << 20;

/// RFC 6902 JSON patch.
pub fn json_patch(original: &Value, patch: &Value) -> Result<Value, ApiError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    if ops.0.len() > MAX_JSON_PATCH_OPS {
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: The allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPS}, got {}", ops.0.len()),
        ));
    }
    let rejected = |e: &dyn std::fmt::Display| {
        ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"))
    };
    let mut out = original.clone();
    let mut copied = 0usize;
    for op in &ops.0 {
        if let json_patch::PatchOperation::Copy(c) = op {
            copied += out.pointer(c.from.as_str()).map_or(0, |v| serde_json::to_vec(v).map_or(0, |b| b.len()));
            if copied > MAX_JSON_PATCH_COPY_BYTES {
                return Err(rejected(&format_args!(
                    "copy operations would duplicate more than {MAX_JSON_PATCH_COPY_BYTES} bytes"
                )));
            }
        }
        // One at a time, so each copy is measured on the document it copies from.
        json_patch::patch(&mut out, std::slice::from_ref(op)).map_err(|e| rejected(&e))?;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn containers_merge_by_name_and_env_by_name() {
        let orig = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "E", "value": "1"}, {"name": "F", "value": "2"}],
             "ports": [{"containerPort": 80}, {"containerPort": 81}]},
            {"name": "b", "image": "y:1"}]}}}});
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "x:2",
                "env": [{"name": "F", "$patch": "delete"}],
                "ports": [{"containerPort": 81, "protocol": "UDP"}]}]}}}});
        let out = strategic_merge("Deployment", &orig, &patch).unwrap();
        let cs = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["name"], "b");
        assert_eq!(cs[1]["image"], "x:2");
        assert_eq!(cs[1]["env"], json!([{"name": "E", "value": "1"}]));
        assert_eq!(cs[1]["ports"][1]["protocol"], "UDP");
    }

    #[test]
    fn null_deletes_and_retain_keys_and_primitive_lists() {
        let orig = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
            "spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"metadata": {"labels": {"a": null}, "$deleteFromPrimitiveList/finalizers": ["x"], "finalizers": ["z"]},
            "spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}});
        let out = strategic_merge("Deployment", &orig, &patch).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["y", "z"]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn json_patch_copies_cannot_blow_up_the_document() {
        let orig = json!({"a": "x".repeat(1 << 20)});
        let doubling: Vec<_> = (0..8).map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")})).collect();
        assert_eq!(json_patch(&orig, &json!(doubling)).unwrap_err().code, 422);
        let ok = json!([{"op": "copy", "from": "/a", "path": "/b"}]);
        assert_eq!(json_patch(&orig, &ok).unwrap()["b"].as_str().map(str::len), Some(1 << 20));
        let many: Vec<_> = (0..10_001).map(|_| json!({"op": "test", "path": "/a", "value": 1})).collect();
        assert_eq!(json_patch(&orig, &json!(many)).unwrap_err().code, 413);
    }

    #[test]
    fn service_ports_merge_by_port_and_replace_directive() {
        let orig = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}], "selector": {"a": "b"}}});
        let p = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}], "selector": {"$patch": "replace", "c": "d"}}});
        let out = strategic_merge("Service", &orig, &p).unwrap();
        assert_eq!(out["spec"]["ports"][0], json!({"port": 80, "name": "http", "targetPort": 8080}));
        assert_eq!(out["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(out["spec"]["selector"], json!({"c": "d"}));
    }
}
