//! EndpointSlices (discovery.k8s.io/v1) and the legacy Endpoints object for
//! every Service with a selector. Endpoint conditions follow KEP-1672:
//! `ready` = pod Ready and not terminating, `serving` = pod Ready,
//! `terminating` = pod has a deletionTimestamp. Named target ports are
//! resolved per pod from its container ports, so pods that name a port
//! differently land in different slices (one slice per distinct port set).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};

use super::util::{is_deleting, key, map_selector_matches, owner_ref, pod_ready, pod_terminal};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

pub struct Ctx {
    pub client: Client,
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    pub slices: Store<EndpointSlice>,
    pub endpoints: Store<Endpoints>,
}

/// `targetPort` of `sp` on `pod`: a number as is; a name looked up among the
/// pod's container ports (with the Service port's protocol). None when
/// the pod does not expose that name: the pod is left out for that port.
pub fn resolve_port(sp: &ServicePort, pod: &Pod) -> Option<i32> {
    match sp.target_port.as_ref() {
        None => Some(sp.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => {
            if let Ok(p) = name.parse::<i32>() {
                return Some(p);
            }
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec.as_ref()?.containers.iter().flat_map(|c| c.ports.iter().flatten()).find_map(|cp| {
                (cp.name.as_deref() == Some(name.as_str()) && cp.protocol.as_deref().unwrap_or("TCP") == proto)
                    .then_some(cp.container_port)
            })
        }
    }
}

pub fn conditions(pod: &Pod) -> EndpointConditions {
    let terminating = is_deleting(&pod.metadata);
    let ready = pod_ready(pod);
    EndpointConditions { ready: Some(ready && !terminating), serving: Some(ready), terminating: Some(terminating) }
}

/// Pods a Service selects that have an address and are not finished.
pub fn selected_pods<'a>(svc: &Service, pods: impl Iterator<Item = &'a Pod>) -> Vec<&'a Pod> {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let ns = svc.namespace();
    let mut out: Vec<&Pod> = pods
        .filter(|p| p.namespace() == ns && map_selector_matches(sel, p.labels()) && !pod_terminal(p))
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some_and(|ip| !ip.is_empty()))
        .collect();
    out.sort_by_key(|p| p.name_any());
    out
}

fn target_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        name: Some(pod.name_any()),
        namespace: pod.namespace(),
        uid: pod.uid(),
        ..Default::default()
    }
}

/// The slices a Service should have: (port set, endpoints), keyed by the
/// resolved ports so the result is deterministic.
pub fn desired_slices(svc: &Service, pods: &[&Pod]) -> BTreeMap<Vec<(String, i32, String)>, Vec<Endpoint>> {
    let ports: Vec<ServicePort> = svc.spec.as_ref().and_then(|s| s.ports.clone()).unwrap_or_default();
    let mut groups: BTreeMap<Vec<(String, i32, String)>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let resolved: Vec<(String, i32, String)> = ports
            .iter()
            .filter_map(|sp| {
                resolve_port(sp, pod).map(|p| (sp.name.clone().unwrap_or_default(), p, sp.protocol.clone().unwrap_or_else(|| "TCP".into())))
            })
            .collect();
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let status = pod.status.as_ref();
        let ep = Endpoint {
            addresses: vec![status.and_then(|s| s.pod_ip.clone()).unwrap_or_default()],
            conditions: Some(conditions(pod)),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(target_ref(pod)),
            hostname: pod.spec.as_ref().and_then(|s| s.hostname.clone()),
            ..Default::default()
        };
        groups.entry(resolved).or_default().push(ep);
    }
    // A Service whose pods all went away still gets one (empty) slice, so
    // consumers can tell "no endpoints" from "not processed yet".
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    groups
}

fn slice_ports(ports: &[(String, i32, String)]) -> Vec<SlicePort> {
    ports
        .iter()
        .map(|(name, port, proto)| SlicePort { name: Some(name.clone()), port: Some(*port), protocol: Some(proto.clone()), app_protocol: None })
        .collect()
}

/// The legacy Endpoints subsets: ready addresses and not-ready ones;
/// terminating pods are left out, as kube-controller-manager does.
pub fn desired_subsets(svc: &Service, pods: &[&Pod]) -> Vec<EndpointSubset> {
    let mut out = Vec::new();
    for (ports, eps) in desired_slices(svc, pods) {
        let mut ready = Vec::new();
        let mut not_ready = Vec::new();
        for ep in eps {
            let c = ep.conditions.clone().unwrap_or_default();
            if c.terminating == Some(true) {
                continue;
            }
            let addr = EndpointAddress {
                ip: ep.addresses.first().cloned().unwrap_or_default(),
                node_name: ep.node_name.clone(),
                target_ref: ep.target_ref.clone(),
                hostname: ep.hostname.clone(),
            };
            if c.ready == Some(true) { ready.push(addr) } else { not_ready.push(addr) }
        }
        if ready.is_empty() && not_ready.is_empty() {
            continue;
        }
        out.push(EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, proto)| EndpointPort {
                        name: (!name.is_empty()).then(|| name.clone()),
                        port: *port,
                        protocol: Some(proto.clone()),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        });
    }
    out
}

/// Deterministic slice name per (service, port set), within 63 chars.
fn slice_name(svc: &str, ports: &[(String, i32, String)]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("{ports:?}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let base: String = svc.chars().take(54).collect();
    format!("{base}-{h:08x}")
}

/// The slices this controller manages, by (namespace, Service name), from
/// one walk of the cache: a pass looks each Service's slices up here
/// instead of walking every slice once per Service, which made a pass
/// quadratic in the Service count (at 10 000 Services a debug build spent
/// a whole core on it and starved the apiserver sharing its runtime).
pub fn managed_slices_by_service(slices: Vec<Arc<EndpointSlice>>) -> HashMap<(String, String), Vec<Arc<EndpointSlice>>> {
    let mut by: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
    for s in slices {
        if s.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
            continue;
        }
        let Some(svc) = s.labels().get(SERVICE_NAME_LABEL).cloned() else { continue };
        by.entry((s.namespace().unwrap_or_default(), svc)).or_default().push(s);
    }
    by
}

pub async fn reconcile_all(ctx: &Ctx) {
    let pods = ctx.pods.state();
    // Selectors only match pods of the Service's own namespace.
    let mut pods_by_ns: HashMap<String, Vec<&Pod>> = HashMap::new();
    for p in &pods {
        pods_by_ns.entry(p.namespace().unwrap_or_default()).or_default().push(p);
    }
    // What is left here after the Services are done belongs to none of
    // them (the Service is gone or lost its selector).
    let mut slices = managed_slices_by_service(ctx.slices.state());
    for svc in ctx.services.state() {
        let has_selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty());
        if !has_selector || is_deleting(&svc.metadata) {
            continue;
        }
        let ns = svc.namespace().unwrap_or_default();
        // As the cache has them now (a long pass's snapshot may be stale).
        let existing: Vec<Arc<EndpointSlice>> = slices
            .remove(&(ns.clone(), svc.name_any()))
            .unwrap_or_default()
            .iter()
            .filter_map(|s| ctx.slices.get(&ObjectRef::from_obj(s.as_ref())))
            .collect();
        let pods = pods_by_ns.get(&ns).map(Vec::as_slice).unwrap_or_default();
        if let Err(e) = reconcile(ctx, &svc, pods, &existing).await {
            tracing::warn!(service = %key(svc.as_ref()), error = %e, "reconciling endpoints");
        }
        // A pass over thousands of unchanged Services awaits nothing: let
        // the apiserver's tasks on the same runtime in now and then.
        tokio::task::coop::consume_budget().await;
    }
    // Slices of Services that are gone (the GC also does this through the
    // ownerReference; this covers a Service that lost its selector).
    for ((ns, _), orphans) in slices {
        for s in orphans {
            let _ = Api::<EndpointSlice>::namespaced(ctx.client.clone(), &ns).delete(&s.name_any(), &DeleteParams::default()).await;
        }
    }
}

#[tracing::instrument(skip_all, fields(service = %key(svc)))]
async fn reconcile(ctx: &Ctx, svc: &Service, pods: &[&Pod], existing: &[Arc<EndpointSlice>]) -> kube::Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let selected = selected_pods(svc, pods.iter().copied());
    let slices_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let mut keep = BTreeSet::new();
    for (ports, eps) in desired_slices(svc, &selected) {
        let sname = slice_name(&name, &ports);
        keep.insert(sname.clone());
        let mut labels = svc.labels().clone();
        labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        let want = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(sname.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                owner_references: Some(vec![owner_ref(svc)]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps,
            ports: Some(slice_ports(&ports)),
        };
        match existing.iter().find(|s| s.name_any() == sname) {
            Some(cur) if cur.endpoints == want.endpoints && cur.ports == want.ports && cur.labels() == want.labels() => {}
            Some(cur) => {
                let mut upd = want.clone();
                upd.metadata.resource_version = cur.resource_version();
                slices_api.replace(&sname, &PostParams::default(), &upd).await?;
            }
            None => match slices_api.create(&PostParams::default(), &want).await {
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let cur = slices_api.get(&sname).await?;
                    let mut upd = want.clone();
                    upd.metadata.resource_version = cur.resource_version();
                    slices_api.replace(&sname, &PostParams::default(), &upd).await?;
                }
                r => {
                    r?;
                }
            },
        }
    }
    for s in existing.iter().filter(|s| !keep.contains(&s.name_any())) {
        let _ = slices_api.delete(&s.name_any(), &DeleteParams::default()).await;
    }

    // Legacy Endpoints, same name as the Service.
    let subsets = desired_subsets(svc, &selected);
    let ep_api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let want = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(svc.labels().clone()),
            owner_references: Some(vec![owner_ref(svc)]),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };
    let cur = ctx.endpoints.get(&ObjectRef::new(&name).within(&ns));
    match cur {
        Some(c) if c.subsets == want.subsets => {}
        Some(c) => {
            let mut upd = want;
            upd.metadata.resource_version = c.resource_version();
            ep_api.replace(&name, &PostParams::default(), &upd).await?;
        }
        None => match ep_api.create(&PostParams::default(), &want).await {
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let c = ep_api.get(&name).await?;
                let mut upd = want;
                upd.metadata.resource_version = c.resource_version();
                ep_api.replace(&name, &PostParams::default(), &upd).await?;
            }
            r => {
                r?;
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, deleting: bool, port_name: &str, port: i32) -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z".into();
        }
        serde_json::from_value(v).expect("pod")
    }

    fn svc() -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}
        }))
        .expect("svc")
    }

    #[test]
    fn conditions_follow_readiness_and_termination() {
        let c = conditions(&pod("a", "10.42.0.2", true, false, "http", 8080));
        assert_eq!((c.ready, c.serving, c.terminating), (Some(true), Some(true), Some(false)));
        let c = conditions(&pod("a", "10.42.0.2", false, false, "http", 8080));
        assert_eq!((c.ready, c.serving, c.terminating), (Some(false), Some(false), Some(false)));
        let c = conditions(&pod("a", "10.42.0.2", true, true, "http", 8080));
        assert_eq!((c.ready, c.serving, c.terminating), (Some(false), Some(true), Some(true)));
    }

    #[test]
    fn named_ports_split_slices_and_subsets_skip_terminating() {
        let pods = [
            pod("a", "10.42.0.2", true, false, "http", 8080),
            pod("b", "10.42.1.2", false, false, "http", 9090),
            pod("c", "10.42.2.2", true, true, "http", 8080),
            pod("d", "10.42.2.3", true, false, "other", 8080),
        ];
        let s = svc();
        let sel = selected_pods(&s, pods.iter());
        let slices = desired_slices(&s, &sel);
        assert_eq!(slices.len(), 2, "{slices:?}");
        let p8080 = &slices[&vec![("http".to_string(), 8080, "TCP".to_string())]];
        assert_eq!(p8080.len(), 2);
        let subsets = desired_subsets(&s, &sel);
        let ready: Vec<String> = subsets.iter().flat_map(|s| s.addresses.iter().flatten()).map(|a| a.ip.clone()).collect();
        let not_ready: Vec<String> = subsets.iter().flat_map(|s| s.not_ready_addresses.iter().flatten()).map(|a| a.ip.clone()).collect();
        assert_eq!(ready, vec!["10.42.0.2"]);
        assert_eq!(not_ready, vec!["10.42.1.2"]);
    }

    fn slice(ns: &str, name: &str, labels: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "addressType": "IPv4", "endpoints": [],
            }))
            .expect("slice"),
        )
    }

    #[test]
    fn managed_slices_are_grouped_by_namespace_and_service() {
        let ours = |svc: &str| serde_json::json!({SERVICE_NAME_LABEL: svc, MANAGED_BY_LABEL: MANAGED_BY});
        let by = managed_slices_by_service(vec![
            slice("default", "web-1", ours("web")),
            slice("default", "web-2", ours("web")),
            slice("other", "web-1", ours("web")),
            slice("default", "api-1", ours("api")),
            slice("default", "web-foreign", serde_json::json!({SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: "someone-else"})),
            slice("default", "unnamed", serde_json::json!({MANAGED_BY_LABEL: MANAGED_BY})),
        ]);
        let names = |ns: &str, svc: &str| -> Vec<String> {
            by.get(&(ns.to_owned(), svc.to_owned())).into_iter().flatten().map(|s| s.name_any()).collect()
        };
        assert_eq!(names("default", "web"), ["web-1", "web-2"]);
        assert_eq!(names("other", "web"), ["web-1"]);
        assert_eq!(names("default", "api"), ["api-1"]);
        assert_eq!(by.len(), 3, "unmanaged and unlabelled slices are left out: {:?}", by.keys().collect::<Vec<_>>());
    }
}
