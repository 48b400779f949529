//! Validation: typed decoding through k8s-openapi (wrong types → 400
//! BadRequest, unknown fields → strict-decoding errors) and the semantic
//! rules of pkg/apis/*/validation that clients depend on (→ 422 Invalid).

use k8s_openapi::api;
use serde_json::Value;

use super::{
    selectors::LabelSelector,
    status::{ApiError, Cause},
};
use crate::registry::Resource;

/// Decode into the k8s-openapi type and back; return the dotted paths of
/// fields the type does not know.
pub fn typed_check(res: &Resource, obj: &Value) -> Result<Vec<String>, ApiError> {
    macro_rules! rt {
        ($t:ty) => {{
            let typed: $t = serde_json::from_value(obj.clone()).map_err(|e| {
                ApiError::bad_request(format!(
                    "{} in version \"{}\" cannot be handled as a {}: {e}",
                    res.kind, res.version, res.kind
                ))
            })?;
            serde_json::to_value(typed).map_err(|e| ApiError::internal(e.to_string()))?
        }};
    }
    let back = match res.kind {
        "Namespace" => rt!(api::core::v1::Namespace),
        "Node" => rt!(api::core::v1::Node),
        "Pod" => rt!(api::core::v1::Pod),
        "Service" => rt!(api::core::v1::Service),
        "Endpoints" => rt!(api::core::v1::Endpoints),
        "ConfigMap" => rt!(api::core::v1::ConfigMap),
        "Secret" => rt!(api::core::v1::Secret),
        "Event" => rt!(api::core::v1::Event),
        "ServiceAccount" => rt!(api::core::v1::ServiceAccount),
        "Deployment" => rt!(api::apps::v1::Deployment),
        "ReplicaSet" => rt!(api::apps::v1::ReplicaSet),
        "EndpointSlice" => rt!(api::discovery::v1::EndpointSlice),
        "Lease" => rt!(api::coordination::v1::Lease),
        "NetworkPolicy" => rt!(api::networking::v1::NetworkPolicy),
        "DaemonSet" => rt!(api::apps::v1::DaemonSet),
        "ControllerRevision" => rt!(api::apps::v1::ControllerRevision),
        "ClusterRole" => rt!(api::rbac::v1::ClusterRole),
        "ClusterRoleBinding" => rt!(api::rbac::v1::ClusterRoleBinding),
        "Role" => rt!(api::rbac::v1::Role),
        "RoleBinding" => rt!(api::rbac::v1::RoleBinding),
        _ => return Ok(Vec::new()),
    };
    let mut unknown = Vec::new();
    diff_unknown(obj, &back, String::new(), &mut unknown);
    Ok(unknown)
}

fn diff_unknown(input: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(i), Value::Object(b)) => {
            for (k, v) in i {
                if v.is_null() {
                    continue;
                }
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match b.get(k) {
                    Some(bv) => diff_unknown(v, bv, p, out),
                    None => out.push(p),
                }
            }
        }
        (Value::Array(i), Value::Array(b)) => {
            for (idx, (iv, bv)) in i.iter().zip(b.iter()).enumerate() {
                diff_unknown(iv, bv, format!("{path}[{idx}]"), out);
            }
        }
        _ => {}
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns_label(s) && s.starts_with(|c: char| c.is_ascii_lowercase())
}

fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_qualified_name_part(name),
        None => is_qualified_name_part(s),
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_name_part(s)
}

const DNS1123_LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_MSG: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";

fn validate_meta(res: &Resource, obj: &Value, causes: &mut Vec<Cause>) {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        causes.push(Cause {
            field: "metadata.name".into(),
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
        });
    } else {
        let (ok, msg) = match res.kind {
            "Namespace" => (is_dns_label(name), DNS1123_LABEL_MSG),
            "Service" => (is_dns1035_label(name), DNS1035_MSG),
            // RBAC names are path segments (`system:node`, `system:aggregate-to-edit`).
            "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding" => (
                !matches!(name, "." | "..") && !name.contains(['/', '%']),
                "may not contain '/' or '%' and may not be '.' or '..'",
            ),
            _ => (is_dns_subdomain(name), DNS1123_SUBDOMAIN_MSG),
        };
        if !ok {
            causes.push(Cause::invalid("metadata.name", name, msg));
        }
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if !is_qualified_name(k) {
                causes.push(Cause::invalid("metadata.labels", k, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                _ => causes.push(Cause::invalid(
                    "metadata.labels".to_string(),
                    v.as_str().unwrap_or(&v.to_string()),
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                )),
            }
        }
    }
}

fn validate_pod_spec(spec: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    let Some(spec) = spec else {
        causes.push(Cause::required(path));
        return;
    };
    let containers = spec.get("containers").and_then(Value::as_array);
    match containers {
        None => causes.push(Cause::required(format!("{path}.containers"))),
        Some(cs) if cs.is_empty() => causes.push(Cause::required(format!("{path}.containers"))),
        Some(cs) => {
            let mut names = Vec::new();
            for (i, c) in cs.iter().enumerate() {
                let p = format!("{path}.containers[{i}]");
                let name = c.get("name").and_then(Value::as_str).unwrap_or("");
                if name.is_empty() {
                    causes.push(Cause::required(format!("{p}.name")));
                } else if !is_dns_label(name) {
                    causes.push(Cause::invalid(format!("{p}.name"), name, DNS1123_LABEL_MSG));
                } else if names.contains(&name) {
                    causes.push(Cause::duplicate(format!("{p}.name"), format!("\"{name}\"")));
                }
                names.push(name);
                if c.get("image").and_then(Value::as_str).unwrap_or("").is_empty() {
                    causes.push(Cause::required(format!("{p}.image")));
                }
                if let Some(ports) = c.get("ports").and_then(Value::as_array) {
                    for (j, port) in ports.iter().enumerate() {
                        let n = port.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                        if !(1..=65535).contains(&n) {
                            causes.push(Cause::invalid(format!("{p}.ports[{j}].containerPort"), n, "must be between 1 and 65535, inclusive"));
                        }
                    }
                }
            }
        }
    }
    for kind in ["initContainers", "containers"] {
        for (i, c) in spec.get(kind).and_then(Value::as_array).into_iter().flatten().enumerate() {
            validate_mount_propagation(c, &format!("{path}.{kind}[{i}]"), causes);
        }
    }
    if let Some(rp) = spec.get("restartPolicy").and_then(Value::as_str)
        && !["Always", "OnFailure", "Never"].contains(&rp)
    {
        causes.push(Cause::not_supported(format!("{path}.restartPolicy"), rp, &["Always", "OnFailure", "Never"]));
    }
}

/// upstream `validateMountPropagation`: a known mode, and `Bidirectional`
/// (mounts reaching the node) only for privileged containers.
fn validate_mount_propagation(c: &Value, path: &str, causes: &mut Vec<Cause>) {
    let privileged = c.pointer("/securityContext/privileged").and_then(Value::as_bool).unwrap_or(false);
    for (j, m) in c.get("volumeMounts").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let Some(mode) = m.get("mountPropagation").and_then(Value::as_str) else { continue };
        let field = format!("{path}.volumeMounts[{j}].mountPropagation");
        match mode {
            "Bidirectional" if !privileged => causes.push(Cause::forbidden(field, "Bidirectional mount propagation is available only to privileged containers")),
            "Bidirectional" | "HostToContainer" | "None" => {}
            other => causes.push(Cause::not_supported(field, other, &["Bidirectional", "HostToContainer", "None"])),
        }
    }
}

fn validate_workload(obj: &Value, causes: &mut Vec<Cause>) {
    let replicas = obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
    if replicas < 0 {
        causes.push(Cause::invalid("spec.replicas", replicas, "must be greater than or equal to 0"));
    }
    match obj.pointer("/spec/selector") {
        None | Some(Value::Null) => causes.push(Cause::required("spec.selector")),
        Some(sel) => {
            let s = LabelSelector::from_object(sel);
            if s.is_empty() {
                causes.push(Cause::invalid("spec.selector", "{}", "empty selector is invalid for deployment"));
            }
            let tmpl = obj.pointer("/spec/template").cloned().unwrap_or(Value::Null);
            if !s.matches(&tmpl) {
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    obj.pointer("/spec/template/metadata/labels").map(Value::to_string).unwrap_or_default(),
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
    validate_pod_spec(obj.pointer("/spec/template/spec"), "spec.template.spec", causes);
}

/// `ValidateDaemonSetSpec`: a known update strategy, a rolling update that
/// can make progress, pods that always restart.
fn validate_daemonset(obj: &Value, causes: &mut Vec<Cause>) {
    let ty = obj.pointer("/spec/updateStrategy/type").and_then(Value::as_str).unwrap_or("RollingUpdate");
    if !["RollingUpdate", "OnDelete"].contains(&ty) {
        causes.push(Cause::not_supported("spec.updateStrategy.type", ty, &["OnDelete", "RollingUpdate"]));
    }
    let zero = |ptr: &str| match obj.pointer(ptr) {
        None | Some(Value::Null) => ptr.ends_with("maxSurge"),
        Some(Value::Number(n)) => n.as_i64() == Some(0),
        Some(Value::String(s)) => s == "0" || s == "0%",
        Some(_) => false,
    };
    if ty == "RollingUpdate"
        && zero("/spec/updateStrategy/rollingUpdate/maxUnavailable")
        && zero("/spec/updateStrategy/rollingUpdate/maxSurge")
    {
        causes.push(Cause::invalid("spec.updateStrategy.rollingUpdate.maxUnavailable", 0, "may not be 0 when `maxSurge` is 0"));
    }
    let restart = obj.pointer("/spec/template/spec/restartPolicy").and_then(Value::as_str).unwrap_or("Always");
    if restart != "Always" {
        causes.push(Cause::not_supported("spec.template.spec.restartPolicy", restart, &["Always"]));
    }
}

const VALID_IP_MSG: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";

/// Upstream `ValidateService`'s externalIPs syntax and
/// `ValidateLoadBalancerStatus`: addresses parse (422 before admission
/// judges their range), ipMode is VIP or Proxy and only beside an ip, a
/// hostname is a DNS name and not an address.
fn validate_service_addresses(obj: &Value, causes: &mut Vec<Cause>) {
    let is_ip = |s: &str| s.parse::<std::net::IpAddr>().is_ok();
    let external = obj.pointer("/spec/externalIPs").and_then(Value::as_array).into_iter().flatten();
    for (i, ip) in external.enumerate() {
        let ip = ip.as_str().unwrap_or("");
        if !is_ip(ip) {
            causes.push(Cause::invalid(format!("spec.externalIPs[{i}]"), ip, VALID_IP_MSG));
        }
    }
    let ingress = obj.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).into_iter().flatten();
    for (i, e) in ingress.enumerate() {
        let path = format!("status.loadBalancer.ingress[{i}]");
        let ip = e.get("ip").and_then(Value::as_str).unwrap_or("");
        if !ip.is_empty() && !is_ip(ip) {
            causes.push(Cause::invalid(format!("{path}.ip"), ip, VALID_IP_MSG));
        }
        match e.get("ipMode").and_then(Value::as_str) {
            Some(_) if ip.is_empty() => causes.push(Cause::forbidden(format!("{path}.ipMode"), "may not be specified when `ip` is not")),
            Some(m) if !["VIP", "Proxy"].contains(&m) => causes.push(Cause::not_supported(format!("{path}.ipMode"), m, &["Proxy", "VIP"])),
            _ => {}
        }
        let host = e.get("hostname").and_then(Value::as_str).unwrap_or("");
        if is_ip(host) {
            causes.push(Cause::invalid(format!("{path}.hostname"), host, "must be a DNS name, not an IP address"));
        } else if !host.is_empty() && !is_dns_subdomain(host) {
            causes.push(Cause::invalid(format!("{path}.hostname"), host, DNS1123_SUBDOMAIN_MSG));
        }
    }
}

fn validate_service(obj: &Value, causes: &mut Vec<Cause>) {
    validate_service_addresses(obj, causes);
    let ty = obj.pointer("/spec/type").and_then(Value::as_str).unwrap_or("ClusterIP");
    const TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !TYPES.contains(&ty) {
        causes.push(Cause::not_supported("spec.type", ty, TYPES));
        return;
    }
    if ty == "ExternalName" {
        if obj.pointer("/spec/externalName").and_then(Value::as_str).unwrap_or("").is_empty() {
            causes.push(Cause::required("spec.externalName"));
        }
        return;
    }
    let headless = obj.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
    let ports = obj.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    if ports.is_empty() && !headless {
        causes.push(Cause::required("spec.ports"));
    }
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(format!("spec.ports[{i}].port"), port, "must be between 1 and 65535, inclusive"));
        }
        let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP").to_string();
        if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
            causes.push(Cause::not_supported(format!("spec.ports[{i}].protocol"), &proto, &["SCTP", "TCP", "UDP"]));
        }
        if seen.contains(&(port, proto.clone())) {
            causes.push(Cause::duplicate(format!("spec.ports[{i}]"), format!("{{\"{proto}\", {port}}}")));
        }
        seen.push((port, proto));
        let name = p.get("name").and_then(Value::as_str).unwrap_or("").to_string();
        if ports.len() > 1 && name.is_empty() {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        } else if !name.is_empty() && names.contains(&name) {
            causes.push(Cause::duplicate(format!("spec.ports[{i}].name"), format!("\"{name}\"")));
        }
        names.push(name);
        match p.get("targetPort") {
            Some(Value::Number(n)) => {
                let t = n.as_i64().unwrap_or(0);
                if !(1..=65535).contains(&t) {
                    causes.push(Cause::invalid(format!("spec.ports[{i}].targetPort"), t, "must be between 1 and 65535, inclusive"));
                }
            }
            Some(Value::String(s)) if s.is_empty() || s.len() > 15 => {
                causes.push(Cause::invalid(format!("spec.ports[{i}].targetPort"), s, "must be no more than 15 characters"));
            }
            _ => {}
        }
        if ty == "ClusterIP" && p.get("nodePort").and_then(Value::as_i64).unwrap_or(0) != 0 {
            causes.push(Cause::forbidden(format!("spec.ports[{i}].nodePort"), "may not be used when `type` is 'ClusterIP'"));
        }
    }
}

/// Semantic validation of a complete object (after defaulting).
pub fn validate(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    validate_meta(res, obj, &mut causes);
    match res.kind {
        "Pod" => validate_pod_spec(obj.get("spec"), "spec", &mut causes),
        "Deployment" | "ReplicaSet" => validate_workload(obj, &mut causes),
        "DaemonSet" => {
            validate_workload(obj, &mut causes);
            validate_daemonset(obj, &mut causes);
        }
        "ControllerRevision" => {
            let rev = obj.get("revision").and_then(Value::as_i64).unwrap_or(0);
            if rev < 0 {
                causes.push(Cause::invalid("revision", rev, "must be greater than or equal to 0"));
            }
        }
        "Service" => validate_service(obj, &mut causes),
        "EndpointSlice" => {
            let at = obj.get("addressType").and_then(Value::as_str).unwrap_or("");
            if at.is_empty() {
                causes.push(Cause::required("addressType"));
            } else if !["IPv4", "IPv6", "FQDN"].contains(&at) {
                causes.push(Cause::not_supported("addressType", at, &["IPv4", "IPv6", "FQDN"]));
            }
        }
        "Event" if obj.get("involvedObject").is_none_or(Value::is_null) => {
            causes.push(Cause::required("involvedObject"));
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
        Err(ApiError::invalid(res, name, &causes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addresses_as_upstream_validates_them() {
        let v = |o: serde_json::Value| {
            let mut c = Vec::new();
            validate_service_addresses(&o, &mut c);
            c.into_iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>()
        };
        let ok = serde_json::json!({"spec": {"externalIPs": ["192.0.2.1", "2001:db8::1"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9", "ipMode": "VIP"}, {"hostname": "lb.example.com"}]}}});
        assert_eq!(v(ok), Vec::<String>::new());
        let bad = serde_json::json!({"spec": {"externalIPs": ["192.0.2.300"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "lb"}, {"hostname": "h", "ipMode": "VIP"}, {"ip": "192.0.2.9", "ipMode": "Direct"}, {"hostname": "192.0.2.8"}]}}});
        assert_eq!(v(bad), vec![
            "spec.externalIPs[0]: Invalid value: \"192.0.2.300\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".to_owned(),
            "status.loadBalancer.ingress[0].ip: Invalid value: \"lb\": must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".to_owned(),
            "status.loadBalancer.ingress[1].ipMode: Forbidden: may not be specified when `ip` is not".to_owned(),
            "status.loadBalancer.ingress[2].ipMode: Unsupported value: \"Direct\": supported values: \"Proxy\", \"VIP\"".to_owned(),
            "status.loadBalancer.ingress[3].hostname: Invalid value: \"192.0.2.8\": must be a DNS name, not an IP address".to_owned(),
        ]);
    }
    #[test]
    fn bidirectional_propagation_only_for_privileged_containers() {
        let v = |spec: serde_json::Value| {
            let mut c = Vec::new();
            validate_pod_spec(Some(&spec), "spec", &mut c);
            c.into_iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>()
        };
        let mounts = serde_json::json!([{"name": "a", "mountPath": "/a", "mountPropagation": "Bidirectional"},
            {"name": "b", "mountPath": "/b", "mountPropagation": "HostToContainer"}, {"name": "c", "mountPath": "/c", "mountPropagation": "Sideways"}]);
        let ok = serde_json::json!({"containers": [{"name": "p", "image": "i", "securityContext": {"privileged": true}, "volumeMounts": mounts.as_array().unwrap()[..2]}]});
        assert_eq!(v(ok), Vec::<String>::new());
        let bad = serde_json::json!({"initContainers": [{"name": "i", "image": "i", "volumeMounts": mounts}],
            "containers": [{"name": "c", "image": "i", "securityContext": {"privileged": false}, "volumeMounts": mounts.as_array().unwrap()[..1]}]});
        assert_eq!(v(bad), vec![
            "spec.initContainers[0].volumeMounts[0].mountPropagation: Forbidden: Bidirectional mount propagation is available only to privileged containers".to_owned(),
            "spec.initContainers[0].volumeMounts[2].mountPropagation: Unsupported value: \"Sideways\": supported values: \"Bidirectional\", \"HostToContainer\", \"None\"".to_owned(),
            "spec.containers[0].volumeMounts[0].mountPropagation: Forbidden: Bidirectional mount propagation is available only to privileged containers".to_owned(),
        ]);
    }
    #[test]
    fn names() {
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns1035_label("1abc"));
        assert!(is_qualified_name("app.kubernetes.io/name"));
    }
}
