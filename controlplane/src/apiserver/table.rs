//! Server-side `Table` output for `kubectl get`, with the columns of
//! kubernetes `pkg/printers/internalversion/printers.go` (priority 1 =
//! only with `-o wide`).

use serde_json::{Value, json};

use super::{
    object::{self, age, str_at},
    selectors::LabelSelector,
};
use crate::registry::Resource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IncludeObject {
    None,
    #[default]
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

type Col = (&'static str, &'static str, u8);

fn columns(kind: &str) -> Vec<Col> {
    let name: Col = ("Name", "string", 0);
    let age: Col = ("Age", "string", 0);
    match kind {
        "Pod" => vec![name, ("Ready", "string", 0), ("Status", "string", 0), ("Restarts", "string", 0), age,
            ("IP", "string", 1), ("Node", "string", 1), ("Nominated Node", "string", 1), ("Readiness Gates", "string", 1)],
        "Service" => vec![name, ("Type", "string", 0), ("Cluster-IP", "string", 0), ("External-IP", "string", 0),
            ("Port(s)", "string", 0), age, ("Selector", "string", 1)],
        "Deployment" => vec![name, ("Ready", "string", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0), age,
            ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)],
        "ReplicaSet" => vec![name, ("Desired", "integer", 0), ("Current", "integer", 0), ("Ready", "integer", 0), age,
            ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)],
        "Node" => vec![name, ("Status", "string", 0), ("Roles", "string", 0), age, ("Version", "string", 0),
            ("Internal-IP", "string", 1), ("External-IP", "string", 1), ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1), ("Container-Runtime", "string", 1)],
        "Namespace" => vec![name, ("Status", "string", 0), age],
        "EndpointSlice" => vec![name, ("AddressType", "string", 0), ("Ports", "string", 0), ("Endpoints", "string", 0), age],
        "Endpoints" => vec![name, ("Endpoints", "string", 0), age],
        "Event" => vec![("Last Seen", "string", 0), ("Type", "string", 0), ("Reason", "string", 0), ("Object", "string", 0),
            ("Message", "string", 0)],
        "ConfigMap" => vec![name, ("Data", "integer", 0), age],
        "Secret" => vec![name, ("Type", "string", 0), ("Data", "integer", 0), age],
        "ServiceAccount" => vec![name, ("Secrets", "integer", 0), age],
        "Lease" => vec![name, ("Holder", "string", 0), age],
        "NetworkPolicy" => vec![name, ("Pod-Selector", "string", 0), age],
        "DaemonSet" => vec![name, ("Desired", "integer", 0), ("Current", "integer", 0), ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0), ("Available", "integer", 0), ("Node Selector", "string", 0), age,
            ("Containers", "string", 1), ("Images", "string", 1), ("Selector", "string", 1)],
        "ControllerRevision" => vec![name, ("Controller", "string", 0), ("Revision", "integer", 0), age],
        _ => vec![name, age],
    }
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn int(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn pod_status(p: &Value) -> String {
    if object::is_deleting(p) {
        return "Terminating".into();
    }
    let mut reason = str_at(p, "/status/reason").to_string();
    if reason.is_empty() {
        reason = str_at(p, "/status/phase").to_string();
    }
    // upstream printPod: the first init container not done names the state.
    let inits = arr(p, "/status/initContainerStatuses");
    let total = arr(p, "/spec/initContainers").len();
    for (i, cs) in inits.iter().enumerate() {
        let term = cs.pointer("/state/terminated");
        let waiting = cs.pointer("/state/waiting/reason").and_then(Value::as_str).filter(|r| !r.is_empty() && *r != "PodInitializing");
        reason = match (term, waiting) {
            (Some(t), _) if int(t, "/exitCode") == 0 => continue,
            (Some(t), _) if !str_at(t, "/reason").is_empty() => format!("Init:{}", str_at(t, "/reason")),
            (Some(t), _) if int(t, "/signal") != 0 => format!("Init:Signal:{}", int(t, "/signal")),
            (Some(t), _) => format!("Init:ExitCode:{}", int(t, "/exitCode")),
            (None, Some(w)) => format!("Init:{w}"),
            (None, None) => format!("Init:{i}/{total}"),
        };
        return reason;
    }
    for cs in arr(p, "/status/containerStatuses") {
        if let Some(r) = cs.pointer("/state/waiting/reason").and_then(Value::as_str) {
            reason = r.to_string();
        } else if let Some(r) = cs.pointer("/state/terminated/reason").and_then(Value::as_str) {
            reason = r.to_string();
        }
    }
    reason
}

fn containers_images(spec: &Value) -> (String, String) {
    let cs = spec.get("containers").and_then(Value::as_array).cloned().unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| str_at(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| str_at(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn selector_string(sel: Option<&Value>) -> String {
    sel.map(LabelSelector::from_object).map(|s| s.to_string_form()).unwrap_or_default()
}

fn cells(kind: &str, o: &Value) -> Vec<Value> {
    let name = json!(object::name(o));
    match kind {
        "Pod" => {
            let total = arr(o, "/spec/containers").len();
            let statuses = arr(o, "/status/containerStatuses");
            let ready = statuses.iter().filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true)).count();
            let restarts: i64 = statuses.iter().map(|c| c.get("restartCount").and_then(Value::as_i64).unwrap_or(0)).sum();
            let gates = arr(o, "/spec/readinessGates");
            vec![name, json!(format!("{ready}/{total}")), json!(pod_status(o)), json!(restarts.to_string()), json!(age(o)),
                json!(or_none(str_at(o, "/status/podIP").into())), json!(or_none(str_at(o, "/spec/nodeName").into())),
                json!(or_none(str_at(o, "/status/nominatedNodeName").into())),
                json!(if gates.is_empty() { "<none>".to_string() } else { format!("0/{}", gates.len()) })]
        }
        "Service" => {
            let ty = str_at(o, "/spec/type");
            let mut external: Vec<String> = arr(o, "/spec/externalIPs").iter().filter_map(|x| x.as_str().map(str::to_string)).collect();
            if ty == "LoadBalancer" {
                for i in arr(o, "/status/loadBalancer/ingress") {
                    let a = str_at(i, "/ip");
                    external.push(if a.is_empty() { str_at(i, "/hostname").to_string() } else { a.to_string() });
                }
                if external.is_empty() {
                    external.push("<pending>".into());
                }
            }
            if ty == "ExternalName" {
                external.push(str_at(o, "/spec/externalName").to_string());
            }
            let ports: Vec<String> = arr(o, "/spec/ports")
                .iter()
                .map(|p| {
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{}:{np}/{proto}", int(p, "/port")),
                        None => format!("{}/{proto}", int(p, "/port")),
                    }
                })
                .collect();
            let selector: Vec<String> = o.pointer("/spec/selector").and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            let cip = str_at(o, "/spec/clusterIP");
            vec![name, json!(ty), json!(if cip.is_empty() { "<none>" } else { cip }), json!(or_none(external.join(","))),
                json!(if ports.is_empty() { "<none>".into() } else { ports.join(",") }), json!(age(o)), json!(or_none(selector.join(",")))]
        }
        "Deployment" => {
            let (c, i) = containers_images(o.pointer("/spec/template/spec").unwrap_or(&Value::Null));
            vec![name, json!(format!("{}/{}", int(o, "/status/readyReplicas"), int(o, "/spec/replicas"))),
                json!(int(o, "/status/updatedReplicas")), json!(int(o, "/status/availableReplicas")), json!(age(o)),
                json!(c), json!(i), json!(selector_string(o.pointer("/spec/selector")))]
        }
        "ReplicaSet" => {
            let (c, i) = containers_images(o.pointer("/spec/template/spec").unwrap_or(&Value::Null));
            vec![name, json!(int(o, "/spec/replicas")), json!(int(o, "/status/replicas")), json!(int(o, "/status/readyReplicas")),
                json!(age(o)), json!(c), json!(i), json!(selector_string(o.pointer("/spec/selector")))]
        }
        "Node" => {
            let ready = arr(o, "/status/conditions").iter().find(|c| str_at(c, "/type") == "Ready").map(|c| str_at(c, "/status"));
            let mut status = match ready {
                Some("True") => "Ready".to_string(),
                Some("False") => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = object::labels(o)
                .map(|l| l.keys().filter_map(|k| k.strip_prefix("node-role.kubernetes.io/")).map(str::to_string).collect())
                .unwrap_or_default();
            let addr = |t: &str| arr(o, "/status/addresses").iter().find(|a| str_at(a, "/type") == t).map(|a| str_at(a, "/address").to_string()).unwrap_or_default();
            vec![name, json!(status), json!(or_none(roles.join(","))), json!(age(o)), json!(str_at(o, "/status/nodeInfo/kubeletVersion")),
                json!(or_none(addr("InternalIP"))), json!(or_none(addr("ExternalIP"))),
                json!(str_at(o, "/status/nodeInfo/osImage")), json!(str_at(o, "/status/nodeInfo/kernelVersion")),
                json!(str_at(o, "/status/nodeInfo/containerRuntimeVersion"))]
        }
        "Namespace" => vec![name, json!(str_at(o, "/status/phase")), json!(age(o))],
        "EndpointSlice" => {
            let ports: Vec<String> = arr(o, "/ports").iter().map(|p| int(p, "/port").to_string()).collect();
            let addrs: Vec<String> = arr(o, "/endpoints").iter().flat_map(|e| arr(e, "/addresses").iter().filter_map(|a| a.as_str().map(str::to_string))).collect();
            let shown = if addrs.len() > 3 { format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3) } else { addrs.join(",") };
            vec![name, json!(str_at(o, "/addressType")), json!(or_none(ports.join(","))), json!(or_none(shown)), json!(age(o))]
        }
        "Endpoints" => {
            let mut eps = Vec::new();
            for s in arr(o, "/subsets") {
                for a in arr(s, "/addresses") {
                    for p in arr(s, "/ports") {
                        eps.push(format!("{}:{}", str_at(a, "/ip"), int(p, "/port")));
                    }
                }
            }
            vec![name, json!(or_none(eps.join(","))), json!(age(o))]
        }
        "Event" => {
            let last = ["/lastTimestamp", "/eventTime", "/metadata/creationTimestamp"]
                .iter()
                .map(|p| str_at(o, p))
                .find(|s| !s.is_empty())
                .map(|s| object::human_duration(object::age_secs(s)))
                .unwrap_or_default();
            let obj = format!("{}/{}", str_at(o, "/involvedObject/kind").to_lowercase(), str_at(o, "/involvedObject/name"));
            vec![json!(last), json!(str_at(o, "/type")), json!(str_at(o, "/reason")), json!(obj), json!(str_at(o, "/message"))]
        }
        "ConfigMap" => {
            let n = o.get("data").and_then(Value::as_object).map_or(0, serde_json::Map::len)
                + o.get("binaryData").and_then(Value::as_object).map_or(0, serde_json::Map::len);
            vec![name, json!(n), json!(age(o))]
        }
        "Secret" => {
            let n = o.get("data").and_then(Value::as_object).map_or(0, serde_json::Map::len);
            vec![name, json!(str_at(o, "/type")), json!(n), json!(age(o))]
        }
        "ServiceAccount" => vec![name, json!(arr(o, "/secrets").len()), json!(age(o))],
        "Lease" => vec![name, json!(or_none(str_at(o, "/spec/holderIdentity").into())), json!(age(o))],
        "NetworkPolicy" => {
            let s = selector_string(o.pointer("/spec/podSelector"));
            vec![name, json!(if s.is_empty() { "<none>".into() } else { s }), json!(age(o))]
        }
        "DaemonSet" => {
            let (c, i) = containers_images(o.pointer("/spec/template/spec").unwrap_or(&Value::Null));
            let node_sel: Vec<String> = o
                .pointer("/spec/template/spec/nodeSelector")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            vec![name, json!(int(o, "/status/desiredNumberScheduled")), json!(int(o, "/status/currentNumberScheduled")),
                json!(int(o, "/status/numberReady")), json!(int(o, "/status/updatedNumberScheduled")),
                json!(int(o, "/status/numberAvailable")), json!(or_none(node_sel.join(","))), json!(age(o)),
                json!(c), json!(i), json!(selector_string(o.pointer("/spec/selector")))]
        }
        "ControllerRevision" => {
            let owner = arr(o, "/metadata/ownerReferences").iter().find(|r| r.get("controller") == Some(&json!(true))).map(|r| {
                let group = str_at(r, "/apiVersion").split_once('/').map(|(g, _)| g).unwrap_or("");
                let kind = str_at(r, "/kind").to_lowercase();
                if group.is_empty() { format!("{kind}/{}", str_at(r, "/name")) } else { format!("{kind}.{group}/{}", str_at(r, "/name")) }
            });
            vec![name, json!(or_none(owner.unwrap_or_default())), json!(int(o, "/revision")), json!(age(o))]
        }
        _ => vec![name, json!(age(o))],
    }
}

pub fn row(res: &Resource, o: &Value, include: IncludeObject) -> Value {
    let mut r = json!({"cells": cells(res.kind, o)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            r["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata").cloned().unwrap_or(json!({}))});
        }
        IncludeObject::Object => r["object"] = o.clone(),
    }
    r
}

pub fn table(res: &Resource, objs: &[Value], include: IncludeObject, rv: &str, cont: Option<&str>) -> Value {
    let defs: Vec<Value> = columns(res.kind)
        .into_iter()
        .map(|(n, t, p)| {
            let format = if n == "Name" { "name" } else { "" };
            json!({"name": n, "type": t, "format": format, "description": n, "priority": p})
        })
        .collect();
    let rows: Vec<Value> = objs.iter().map(|o| row(res, o, include)).collect();
    let mut meta = json!({"resourceVersion": rv});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta, "columnDefinitions": defs, "rows": rows})
}
