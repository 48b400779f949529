//! A container's environment: Kubernetes' service variables (for every
//! Service of the pod's namespace, plus `kubernetes` from `default`), then
//! the container's `env` (with `valueFrom` fieldRef / configMapKeyRef /
//! secretKeyRef), with `$(VAR)` references expanded like the kubelet does.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use kube::{Api, Client, ResourceExt as _};

/// `my-svc` → `MY_SVC`.
fn var_name(s: &str) -> String {
    s.to_uppercase().replace('-', "_")
}

/// The docker-links style variables kubelet sets for one Service.
pub fn service_env(svc: &Service) -> Vec<(String, String)> {
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else { return Vec::new() };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let Some(first) = ports.first() else { return Vec::new() };
    let n = var_name(&svc.name_any());
    let mut out = vec![(format!("{n}_SERVICE_HOST"), ip.to_string()), (format!("{n}_SERVICE_PORT"), first.port.to_string())];
    for p in ports {
        if let Some(name) = p.name.as_deref().filter(|s| !s.is_empty()) {
            out.push((format!("{n}_SERVICE_PORT_{}", var_name(name)), p.port.to_string()));
        }
    }
    let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    out.push((format!("{n}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)));
    for p in ports {
        let pr = proto(p);
        let base = format!("{n}_PORT_{}_{}", p.port, pr.to_uppercase());
        out.push((base.clone(), format!("{}://{ip}:{}", pr.to_lowercase(), p.port)));
        out.push((format!("{base}_PROTO"), pr.to_lowercase()));
        out.push((format!("{base}_PORT"), p.port.to_string()));
        out.push((format!("{base}_ADDR"), ip.to_string()));
    }
    out
}

pub(super) fn field_ref(pod: &Pod, path: &str, node_ip: &str) -> String {
    let m = &pod.metadata;
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" => pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => node_ip.to_string(),
        p => {
            if let Some(k) = p.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']")) {
                return pod.labels().get(k).cloned().unwrap_or_default();
            }
            if let Some(k) = p.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']")) {
                return pod.annotations().get(k).cloned().unwrap_or_default();
            }
            String::new()
        }
    }
}

/// Expands `$(NAME)` from `vars`; `$$` escapes, unknown names stay as is.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
            && let Some(v) = vars.get(&body[..end])
        {
            out.push_str(v);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The full environment of `c`, and its argv with references expanded.
pub async fn build(
    client: &Client,
    pod: &Pod,
    c: &Container,
    services: &[std::sync::Arc<Service>],
    pod_ip: &str,
    node_ip: &str,
) -> (Vec<(String, String)>, Vec<String>) {
    let ns = pod.namespace().unwrap_or_default();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    vars.insert("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    vars.insert("HOSTNAME".into(), pod.name_any());
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    for s in services {
        let s_ns = s.namespace().unwrap_or_default();
        let is_kubernetes = s_ns == "default" && s.name_any() == "kubernetes";
        if (links && s_ns == ns) || is_kubernetes {
            vars.extend(service_env(s));
        }
    }
    let mut pod_with_ip = pod.clone();
    pod_with_ip.status.get_or_insert_default().pod_ip = Some(pod_ip.to_string());
    for e in c.env.iter().flatten() {
        let v = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(&pod_with_ip, &f.field_path, node_ip)
            } else if let Some(k) = &from.config_map_key_ref {
                let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get_opt(&k.name).await.ok().flatten();
                cm.and_then(|cm| cm.data?.get(&k.key).cloned()).unwrap_or_default()
            } else if let Some(k) = &from.secret_key_ref {
                let s = Api::<Secret>::namespaced(client.clone(), &ns).get_opt(&k.name).await.ok().flatten();
                s.and_then(|s| s.data?.get(&k.key).map(|b| String::from_utf8_lossy(&b.0).into_owned())).unwrap_or_default()
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        vars.insert(e.name.clone(), v);
    }
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    let argv = argv.iter().map(|a| expand(a, &vars)).collect();
    (vars.into_iter().collect(), argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_variables_like_kubelet() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-app", "namespace": "default"},
            "spec": {"clusterIP": "10.43.0.7", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .expect("svc");
        let env: BTreeMap<String, String> = service_env(&svc).into_iter().collect();
        assert_eq!(env["WEB_APP_SERVICE_HOST"], "10.43.0.7");
        assert_eq!(env["WEB_APP_SERVICE_PORT"], "80");
        assert_eq!(env["WEB_APP_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["WEB_APP_PORT"], "tcp://10.43.0.7:80");
        assert_eq!(env["WEB_APP_PORT_80_TCP_ADDR"], "10.43.0.7");
    }

    #[test]
    fn expansion() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("$(A)-$(B)-$$(A)", &vars), "x-$(B)-$(A)");
    }
}
