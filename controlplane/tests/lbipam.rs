//! LoadBalancer IPAM and Service admission against a real apiserver with
//! the real controllers: addresses from the pools ConfigMap, requests
//! (annotation and `spec.loadBalancerIP`) honoured, conflicts and
//! exhaustion as Events, release on delete and on type change, other
//! classes left alone, `allocateLoadBalancerNodePorts: false`, and the
//! externalIPs allow list answering 403 with its reason, for `spec.externalIPs`
//! and for LoadBalancer ingress addresses written to `services/status`.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Backend, TestServer, eventually};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use riptide_controlplane::controllers::{self, lbipam};
use serde_json::json;

fn svc(name: &str, spec: serde_json::Value, annotations: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec,
    }))
    .unwrap()
}

fn lb() -> serde_json::Value {
    json!({"type": "LoadBalancer", "selector": {"app": "x"}, "ports": [{"port": 80}]})
}

async fn ingress(api: &Api<Service>, name: &str) -> Vec<String> {
    let Ok(s) = api.get(name).await else { return vec!["<gone>".into()] };
    s.status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| i.ip)
        .collect()
}

async fn has_event(events: &Api<Event>, object: &str, reason: &str, text: &str) -> bool {
    events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
        e.involved_object.name.as_deref() == Some(object)
            && e.reason.as_deref() == Some(reason)
            && e.message.as_deref().is_some_and(|m| m.contains(text))
    })
}

/// Waits until `name`'s ingress is `want`, printing what it saw otherwise.
async fn wait_ingress(api: &Api<Service>, name: &str, want: &[&str]) {
    let ok = eventually(20, || async { ingress(api, name).await == want }).await;
    assert!(ok, "{name}: ingress {:?}, want {want:?}", ingress(api, name).await);
}

async fn wait_event(events: &Api<Event>, object: &str, reason: &str, text: &str) {
    let ok = eventually(20, || has_event(events, object, reason, text)).await;
    let all: Vec<_> = events.list(&Default::default()).await.unwrap().items.into_iter().map(|e| (e.involved_object.name, e.reason, e.message)).collect();
    assert!(ok, "no {reason} event on {object} containing {text:?}; events: {all:#?}");
}

/// The pools ConfigMap with one pool, `default`.
async fn create_pool(client: &kube::Client, default: &str) {
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": lbipam::POOLS_CONFIGMAP, "namespace": lbipam::POOLS_NAMESPACE},
        "data": {"default": default},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), lbipam::POOLS_NAMESPACE).create(&PostParams::default(), &cm).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_ipam_allocates_honours_requests_reports_and_releases() {
    let s = TestServer::start(Backend::Embedded).await;
    let client = s.client().await;
    let ctl = tokio::spawn(controllers::run(client.clone(), controllers::Config::default()));
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    // No pool yet: a Warning says where pools come from.
    api.create(&pp, &svc("a", lb(), json!({}))).await.unwrap();
    wait_event(&events, "a", lbipam::REASON_NO_POOL, "kube-system/riptide-lb-pools").await;

    create_pool(&client, "198.51.100.10-198.51.100.13").await;
    wait_ingress(&api, "a", &["198.51.100.10"]).await;
    wait_event(&events, "a", lbipam::REASON_ALLOCATED, "assigned 198.51.100.10 from pool default").await;

    // A request for a held address: refused with an Event, nothing assigned.
    api.create(&pp, &svc("b", lb(), json!({(lbipam::ANNOTATION_IPS): "198.51.100.10"}))).await.unwrap();
    wait_event(&events, "b", lbipam::REASON_IN_USE, "requested 198.51.100.10 is already allocated to default/a").await;
    assert_eq!(ingress(&api, "b").await, Vec::<String>::new());
    // spec.loadBalancerIP is a request too; outside every pool is refused.
    let mut g = lb();
    g["loadBalancerIP"] = json!("198.51.100.13");
    api.create(&pp, &svc("g", g, json!({}))).await.unwrap();
    wait_ingress(&api, "g", &["198.51.100.13"]).await;
    api.create(&pp, &svc("out", lb(), json!({(lbipam::ANNOTATION_IPS): "203.0.113.9"}))).await.unwrap();
    wait_event(&events, "out", lbipam::REASON_NOT_IN_POOL, "203.0.113.9").await;

    // Another class is left alone entirely.
    let mut other = lb();
    other["loadBalancerClass"] = json!("example.com/other");
    api.create(&pp, &svc("other", other, json!({}))).await.unwrap();

    // The pool fills up: .11 and .12 go, the next one is told it is exhausted.
    api.create(&pp, &svc("c", lb(), json!({}))).await.unwrap();
    wait_ingress(&api, "c", &["198.51.100.11"]).await;
    api.create(&pp, &svc("d", lb(), json!({}))).await.unwrap();
    wait_ingress(&api, "d", &["198.51.100.12"]).await;
    api.create(&pp, &svc("h", lb(), json!({}))).await.unwrap();
    wait_event(&events, "h", lbipam::REASON_EXHAUSTED, "no free address left in pool(s) default").await;

    // Delete releases: b's request is honoured now.
    api.delete("a", &DeleteParams::default()).await.unwrap();
    wait_ingress(&api, "b", &["198.51.100.10"]).await;
    // A type change releases (status cleared through the status
    // subresource), and the waiting Service gets the address.
    let to_cip = json!({"spec": {"type": "ClusterIP", "allocateLoadBalancerNodePorts": null, "ports": [{"port": 80, "nodePort": null}]}});
    api.patch("c", &PatchParams::default(), &Patch::Merge(&to_cip)).await.unwrap();
    wait_ingress(&api, "c", &[]).await;
    wait_event(&events, "c", lbipam::REASON_RELEASED, "198.51.100.11").await;
    wait_ingress(&api, "h", &["198.51.100.11"]).await;

    assert_eq!(ingress(&api, "other").await, Vec::<String>::new());
    assert!(!events.list(&Default::default()).await.unwrap().items.iter().any(|e| e.involved_object.name.as_deref() == Some("other")));

    // A restarted controller keeps every assignment.
    ctl.abort();
    let _ = ctl.await;
    let ctl = tokio::spawn(controllers::run(client.clone(), controllers::Config::default()));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for (name, ip) in [("b", "198.51.100.10"), ("g", "198.51.100.13"), ("d", "198.51.100.12"), ("h", "198.51.100.11")] {
        assert_eq!(ingress(&api, name).await, vec![ip.to_string()], "{name} after a controller restart");
    }
    ctl.abort();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_load_balancer_node_ports_false_is_honoured() {
    let s = TestServer::start(Backend::Embedded).await;
    let api: Api<Service> = Api::namespaced(s.client().await, "default");
    let pp = PostParams::default();
    let mut spec = lb();
    spec["allocateLoadBalancerNodePorts"] = json!(false);
    let got = api.create(&pp, &svc("nonp", spec.clone(), json!({}))).await.unwrap();
    let ports = got.spec.unwrap().ports.unwrap();
    assert_eq!(ports[0].node_port, None, "no NodePort with allocateLoadBalancerNodePorts=false");
    // A port named explicitly is still reserved.
    spec["ports"] = json!([{"port": 80, "nodePort": 30500}]);
    let got = api.create(&pp, &svc("named", spec, json!({}))).await.unwrap();
    assert_eq!(got.spec.unwrap().ports.unwrap()[0].node_port, Some(30500));
    let np = json!({"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80, "nodePort": 30500}]});
    let err = api.create(&pp, &svc("clash", np, json!({}))).await.unwrap_err();
    assert!(err.to_string().contains("provided port is already allocated"), "{err}");
    // The default (true) gives one.
    let got = api.create(&pp, &svc("withnp", lb(), json!({}))).await.unwrap();
    assert!(got.spec.unwrap().ports.unwrap()[0].node_port.is_some());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ips_are_denied_by_default_and_allowed_by_range() {
    let spec = |ips: &[&str]| json!({"selector": {"app": "x"}, "externalIPs": ips, "ports": [{"port": 80}]});
    // Default: denied, 403 with the reason.
    let s = TestServer::start(Backend::Embedded).await;
    let api: Api<Service> = Api::namespaced(s.client().await, "default");
    let err = api.create(&PostParams::default(), &svc("x", spec(&["192.0.2.3"]), json!({}))).await.unwrap_err();
    let kube::Error::Api(st) = &err else { panic!("{err}") };
    assert_eq!((st.code, st.reason.as_str()), (403, "Forbidden"), "{st:?}");
    assert!(st.message.contains("spec.externalIPs[0]: 192.0.2.3 is not in a range the cluster allows") && st.message.contains("denied"), "{}", st.message);
    // kubectl shows it as such.
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: k}\nspec:\n  externalIPs: [192.0.2.4]\n  ports: [{port: 80}]\n";
    let (ok, _, stderr) = s.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await;
    assert!(!ok && stderr.contains("is forbidden") && stderr.contains("192.0.2.4"), "{stderr}");
    s.shutdown().await;

    // An allow list: inside admitted, outside refused, updates that add an
    // address outside refused too.
    let s = TestServer::start_with(Backend::Embedded, |c| {
        c.admission.external_ip_cidrs = vec!["192.0.2.0/28".parse().unwrap()];
    })
    .await;
    let api: Api<Service> = Api::namespaced(s.client().await, "default");
    api.create(&PostParams::default(), &svc("ok", spec(&["192.0.2.3"]), json!({}))).await.unwrap();
    let err = api.create(&PostParams::default(), &svc("no", spec(&["198.18.0.11"]), json!({}))).await.unwrap_err();
    assert!(err.to_string().contains("192.0.2.0/28"), "{err}");
    let add = json!({"spec": {"externalIPs": ["192.0.2.3", "10.0.0.1"]}});
    let err = api.patch("ok", &PatchParams::default(), &Patch::Merge(&add)).await.unwrap_err();
    assert!(err.to_string().contains("spec.externalIPs[1]: 10.0.0.1"), "{err}");
    s.shutdown().await;
}

/// What a status write of `ingress` answers: (HTTP code, reason, message).
async fn write_ingress(api: &Api<Service>, name: &str, ingress: serde_json::Value) -> (u16, String, String) {
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => (200, String::new(), String::new()),
        Err(kube::Error::Api(st)) => (st.code, st.reason.clone(), st.message.clone()),
        Err(e) => panic!("{name}: status write: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_ingress_status_writes_are_admitted_only_from_pools_or_the_allow_list() {
    // Default admission: no external IP ranges at all.
    let s = TestServer::start(Backend::Embedded).await;
    let client = s.client().await;
    let ctl = tokio::spawn(controllers::run(client.clone(), controllers::Config::default()));
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    create_pool(&client, "198.51.100.10-198.51.100.11").await;

    // The allocator's addresses pass: pools are allowed by construction.
    api.create(&pp, &svc("web", lb(), json!({}))).await.unwrap();
    wait_ingress(&api, "web", &["198.51.100.10"]).await;

    // A takeover through services/status: a node-like address outside every
    // pool and range is refused with 403 and the reason, and nothing changes.
    // (The controller is stopped so it cannot undo an accepted write before
    // the assertion looks.)
    ctl.abort();
    let _ = ctl.await;
    let (code, reason, msg) = write_ingress(&api, "web", json!([{"ip": "198.18.0.12", "ipMode": "VIP"}])).await;
    assert_eq!((code, reason.as_str()), (403, "Forbidden"), "{msg}");
    assert_eq!(
        msg,
        "services \"web\" is forbidden: status.loadBalancer.ingress[0].ip: 198.18.0.12 is not in a range the cluster allows for LoadBalancer addresses (--service-external-ip-cidrs: none: external IPs are denied; pools of kube-system/riptide-lb-pools: default (198.51.100.10-198.51.100.11))"
    );
    assert_eq!(ingress(&api, "web").await, vec!["198.51.100.10".to_string()]);
    // Not an address at all: 422 Invalid, as upstream's status validation.
    let (code, reason, msg) = write_ingress(&api, "web", json!([{"ip": "lb.example.com"}])).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{msg}");
    assert!(msg.contains("status.loadBalancer.ingress[0].ip: Invalid value: \"lb.example.com\": must be a valid IP address"), "{msg}");
    // kubectl sees the refusal as such (a JSON patch this time).
    let (ok, _, stderr) = s
        .kubectl(&["patch", "service", "web", "--subresource=status", "--type=json", "-p", r#"[{"op":"add","path":"/status/loadBalancer/ingress/-","value":{"ip":"127.0.0.1"}}]"#])
        .await;
    assert!(!ok && stderr.contains("is forbidden") && stderr.contains("ingress[1].ip: 127.0.0.1"), "{stderr}");
    // Another pool address by hand passes (whoever may write services/status
    // may move a Service inside the pools), keeping the held one too.
    let (code, _, msg) = write_ingress(&api, "web", json!([{"ip": "198.51.100.10"}, {"ip": "198.51.100.11"}])).await;
    assert_eq!(code, 200, "{msg}");
    // A pool shrunk under a held address: the Service keeps it on writes
    // that add nothing, but cannot get it back once dropped.
    let shrink = json!({"data": {"default": "198.51.100.10"}});
    Api::<ConfigMap>::namespaced(client.clone(), lbipam::POOLS_NAMESPACE)
        .patch(lbipam::POOLS_CONFIGMAP, &PatchParams::default(), &Patch::Merge(&shrink))
        .await
        .unwrap();
    let (code, _, msg) = write_ingress(&api, "web", json!([{"ip": "198.51.100.11"}])).await;
    assert_eq!(code, 200, "{msg}");
    let (code, _, msg) = write_ingress(&api, "web", json!([{"ip": "198.51.100.10"}, {"ip": "198.51.100.11"}])).await;
    assert_eq!(code, 200, "a held address may stay: {msg}");
    assert_eq!(write_ingress(&api, "web", json!([{"ip": "198.51.100.10"}])).await.0, 200);
    let (code, _, msg) = write_ingress(&api, "web", json!([{"ip": "198.51.100.10"}, {"ip": "198.51.100.11"}])).await;
    assert_eq!(code, 403, "{msg}");
    s.shutdown().await;

    // The allow list admits ingress addresses as well: another
    // implementation's (a foreign loadBalancerClass) go there.
    let s = TestServer::start_with(Backend::Embedded, |c| {
        c.admission.external_ip_cidrs = vec!["192.0.2.0/28".parse().unwrap()];
    })
    .await;
    let api: Api<Service> = Api::namespaced(s.client().await, "default");
    let mut other = lb();
    other["loadBalancerClass"] = json!("example.com/other");
    api.create(&PostParams::default(), &svc("metal", other, json!({}))).await.unwrap();
    let (code, _, msg) = write_ingress(&api, "metal", json!([{"ip": "192.0.2.5", "ipMode": "VIP"}])).await;
    assert_eq!(code, 200, "{msg}");
    let (code, _, msg) = write_ingress(&api, "metal", json!([{"ip": "192.0.2.5"}, {"ip": "192.0.2.16"}])).await;
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("ingress[1].ip: 192.0.2.16") && msg.contains("192.0.2.0/28") && msg.contains("pools of kube-system/riptide-lb-pools: none"), "{msg}");
    s.shutdown().await;
}
