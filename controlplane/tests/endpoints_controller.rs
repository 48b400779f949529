//! The EndpointSlice controller against a real apiserver: every Service
//! with a selector gets its slice and legacy Endpoints with the pods of its
//! own namespace only, a slice that is already right is left alone, and
//! the slices of a Service that lost its selector go while slices the
//! controller does not manage stay.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Backend, TestServer, eventually};
use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use riptide_controlplane::controllers::endpoints::{MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
use serde_json::json;

async fn ready_pod(client: &kube::Client, ns: &str, name: &str, ip: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
    }))
    .unwrap();
    api.create(&PostParams::default(), &pod).await.unwrap();
    let st = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
}

async fn service(client: &kube::Client, ns: &str, name: &str) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns).create(&PostParams::default(), &svc).await.unwrap();
}

/// (slice name, resourceVersion, addresses) of the slices labelled for
/// Service `name` in `ns`.
async fn slices_of(client: &kube::Client, ns: &str, name: &str) -> Vec<(String, String, Vec<String>)> {
    let lp = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}"));
    let Ok(list) = Api::<EndpointSlice>::namespaced(client.clone(), ns).list(&lp).await else { return Vec::new() };
    list.items
        .into_iter()
        .map(|s| {
            let addrs = s.endpoints.iter().flat_map(|e| e.addresses.clone()).collect();
            (s.metadata.name.unwrap_or_default(), s.metadata.resource_version.unwrap_or_default(), addrs)
        })
        .collect()
}

async fn endpoint_ips(client: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let Ok(ep) = Api::<Endpoints>::namespaced(client.clone(), ns).get(name).await else { return Vec::new() };
    ep.subsets.unwrap_or_default().iter().flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_per_service_and_namespace_and_orphans_removed() {
    let s = TestServer::start(Backend::Embedded).await;
    let client = s.client().await;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "other"}})).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    ready_pod(&client, "default", "web-a", "10.42.0.10").await;
    ready_pod(&client, "other", "web-b", "10.42.0.20").await;
    for (ns, name) in [("default", "web"), ("default", "web2"), ("other", "web")] {
        service(&client, ns, name).await;
    }
    // A slice for web2 that another controller manages.
    let foreign: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web2-foreign", "labels": {SERVICE_NAME_LABEL: "web2", MANAGED_BY_LABEL: "someone-else"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.42.0.99"]}],
    }))
    .unwrap();
    Api::<EndpointSlice>::namespaced(client.clone(), "default").create(&PostParams::default(), &foreign).await.unwrap();
    let ctl = s.start_controllers().await;

    // Same selector in two namespaces: each Service gets its own pod only.
    let want = [("default", "web", "10.42.0.10"), ("default", "web2", "10.42.0.10"), ("other", "web", "10.42.0.20")];
    let settled = eventually(30, || async {
        for (ns, name, ip) in want {
            let mine: Vec<_> = slices_of(&client, ns, name).await.into_iter().filter(|s| s.0 != "web2-foreign").collect();
            if mine.len() != 1 || mine[0].2 != [ip] || endpoint_ips(&client, ns, name).await != [ip] {
                return false;
            }
        }
        true
    })
    .await;
    let mut seen = Vec::new();
    for (ns, name, _) in want {
        seen.push((ns, name, slices_of(&client, ns, name).await, endpoint_ips(&client, ns, name).await));
    }
    assert!(settled, "slices and Endpoints per Service: {seen:#?}");

    // Passes over Services that are already right write nothing.
    let before = slices_of(&client, "other", "web").await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert_eq!(slices_of(&client, "other", "web").await, before, "a resync rewrote a slice that was already right");

    // web2 loses its selector: its managed slice goes, the foreign one and
    // every other Service's stay.
    let patch = json!({"spec": {"selector": null}});
    Api::<Service>::namespaced(client.clone(), "default").patch("web2", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let gone = eventually(30, || async {
        slices_of(&client, "default", "web2").await.iter().map(|s| s.0.as_str()).eq(["web2-foreign"])
    })
    .await;
    assert!(gone, "web2's slices after losing its selector: {:?}", slices_of(&client, "default", "web2").await);
    assert_eq!(slices_of(&client, "default", "web").await.len(), 1, "default/web's slice went too");
    assert_eq!(slices_of(&client, "other", "web").await.len(), 1, "other/web's slice went too");
    ctl.abort();
    s.shutdown().await;
}
