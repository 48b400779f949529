#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};

use super::*;

const NODE: &str = "node-a";

fn ctx() -> NodeContext {
    let mut reserved = crate::reserved::Reserved::new("10.42.0.0/16".parse().unwrap(), "10.43.0.0/16".parse().unwrap());
    reserved.node_addrs.insert("198.18.0.11".parse().unwrap());
    NodeContext {
        node_name: NODE.into(),
        proxy_name: None,
        reserved,
        ..NodeContext::default()
    }
}

fn svc(v: Value) -> SlimService {
    let mut base = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}
    });
    merge(&mut base, v);
    serde_json::from_value(base).unwrap()
}

fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

fn slice(name: &str, ports: Value, endpoints: Value) -> SlimSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": name, "labels": {LABEL_SERVICE_NAME: "web"}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ep(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({"addresses": [ip], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn http_slice(endpoints: Value) -> SlimSlice {
    slice("web-1", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), endpoints)
}

fn addrs(v: &[&str]) -> Vec<SocketAddrV4> {
    v.iter().map(|s| s.parse().unwrap()).collect()
}

fn be_addrs(p: &lb::Service) -> Vec<SocketAddrV4> {
    p.backends.iter().map(|b| b.addr).collect()
}

fn one_port(d: &Desired) -> &lb::Service {
    assert_eq!(d.ports.len(), 1, "{:#?}", d.ports);
    &d.ports[0]
}

/// What new flows may pick: the function the map writer runs.
fn eligible(p: &lb::Service, kind: FrontendKind, external: bool) -> Vec<SocketAddrV4> {
    p.eligible(kind, external).iter().map(|b| b.addr).collect()
}

fn fe(kind: FrontendKind, ip: &str, port: u16) -> Frontend {
    Frontend { kind, addr: ip.parse().unwrap(), port }
}

#[test]
fn cluster_ip_port_with_target_port_from_slice() {
    let s = svc(json!({}));
    let sl = http_slice(json!([
        ep("10.42.1.5", "node-b", true, true, false),
        ep("10.42.0.5", NODE, true, true, false),
        ep("10.42.1.6", "node-b", false, false, false),
    ]));
    let d = service_desired(&s, &[&sl], &ctx());
    let p = one_port(&d);
    assert_eq!(p.name, "ns/web:http");
    assert_eq!(p.protocol, Protocol::Tcp);
    assert_eq!(p.frontends, vec![fe(FrontendKind::ClusterIp, "10.43.0.10", 80)]);
    assert_eq!(p.backends, vec![
        Backend { addr: "10.42.0.5:8080".parse().unwrap(), state: BackendState::Active, local: true },
        Backend { addr: "10.42.1.5:8080".parse().unwrap(), state: BackendState::Active, local: false },
        Backend { addr: "10.42.1.6:8080".parse().unwrap(), state: BackendState::Quarantined, local: false },
    ]);
    assert_eq!(eligible(p, FrontendKind::ClusterIp, false), addrs(&["10.42.0.5:8080", "10.42.1.5:8080"]));
    assert_eq!((p.external_policy, p.internal_policy), (TrafficPolicy::Cluster, TrafficPolicy::Cluster));
    assert!(p.affinity_timeout_s.is_none());
}

#[test]
fn named_target_port_resolved_per_slice() {
    // Two slices for the same Service whose pods expose "http" on different
    // container ports: each slice carries its own number.
    let s = svc(json!({}));
    let a = slice("web-a", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), json!([ep("10.42.0.5", NODE, true, true, false)]));
    let b = slice("web-b", json!([{"name": "http", "port": 9090, "protocol": "TCP"}]), json!([ep("10.42.1.5", "node-b", true, true, false)]));
    let d = service_desired(&s, &[&b, &a], &ctx());
    assert_eq!(be_addrs(one_port(&d)), addrs(&["10.42.0.5:8080", "10.42.1.5:9090"]));
}

#[test]
fn ports_matched_by_name_and_protocol() {
    let s = svc(json!({"spec": {"ports": [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    ]}}));
    let sl = slice("web-1", json!([
        {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
        // Same name as the UDP port but the wrong protocol: must not match.
        {"name": "dns", "port": 1, "protocol": "TCP"},
    ]), json!([ep("10.42.0.5", NODE, true, true, false)]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert_eq!(d.ports.len(), 2);
    let udp = d.ports.iter().find(|p| p.protocol == Protocol::Udp).unwrap();
    let tcp = d.ports.iter().find(|p| p.protocol == Protocol::Tcp).unwrap();
    assert_eq!(be_addrs(udp), addrs(&["10.42.0.5:5353"]));
    assert_eq!(be_addrs(tcp), addrs(&["10.42.0.5:5354"]));
    assert_ne!(udp.name, tcp.name);
}

#[test]
fn unnamed_port_matches_unnamed_slice_port() {
    let s = svc(json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}));
    let sl = slice("web-1", json!([{"port": 8080}]), json!([ep("10.42.0.5", NODE, true, true, false)]));
    let d = service_desired(&s, &[&sl], &ctx());
    let p = one_port(&d);
    assert_eq!(be_addrs(p), addrs(&["10.42.0.5:8080"]));
    assert_eq!(p.protocol, Protocol::Tcp, "protocol defaults to TCP");
    assert_eq!(p.name, "ns/web:80/TCP");
}

#[test]
fn non_ipv4_slices_and_portless_slices_ignored() {
    let s = svc(json!({}));
    let mut v6 = http_slice(json!([{"addresses": ["fd00::5"], "conditions": {"ready": true}}]));
    v6.address_type = "IPv6".into();
    let no_port = slice("web-2", json!([{"name": "http", "protocol": "TCP"}]), json!([ep("10.42.0.9", NODE, true, true, false)]));
    let d = service_desired(&s, &[&v6, &no_port], &ctx());
    assert!(one_port(&d).backends.is_empty());
}

#[test]
fn nil_conditions_mean_ready_not_terminating() {
    let s = svc(json!({}));
    let sl = http_slice(json!([{"addresses": ["10.42.0.5"]}]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert_eq!(one_port(&d).backends[0].state, BackendState::Active);
}

#[test]
fn terminating_kept_but_not_eligible_when_ready_exist() {
    let s = svc(json!({}));
    let sl = http_slice(json!([
        ep("10.42.0.5", NODE, true, true, false),
        ep("10.42.0.6", NODE, false, true, true),
        ep("10.42.0.7", NODE, false, false, true),
    ]));
    let d = service_desired(&s, &[&sl], &ctx());
    let p = one_port(&d);
    let states: Vec<BackendState> = p.backends.iter().map(|b| b.state).collect();
    assert_eq!(states, vec![BackendState::Active, BackendState::Terminating, BackendState::Quarantined]);
    assert_eq!(eligible(p, FrontendKind::ClusterIp, false), addrs(&["10.42.0.5:8080"]));
}

#[test]
fn kep_1669_falls_back_to_serving_terminating() {
    let s = svc(json!({}));
    let sl = http_slice(json!([
        ep("10.42.0.6", NODE, false, true, true),
        ep("10.42.0.7", NODE, false, false, true),
        ep("10.42.0.8", NODE, false, false, false),
    ]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert_eq!(eligible(one_port(&d), FrontendKind::ClusterIp, false), addrs(&["10.42.0.6:8080"]));
}

#[test]
fn no_endpoints_means_empty_backends_not_missing_frontend() {
    // The datapath must reject actively, so the port exists with no backends.
    let d = service_desired(&svc(json!({})), &[], &ctx());
    let p = one_port(&d);
    assert_eq!(p.frontends.len(), 1);
    assert!(p.backends.is_empty());
}

#[test]
fn duplicate_endpoint_across_slices_prefers_ready() {
    let s = svc(json!({}));
    let a = slice("web-a", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), json!([ep("10.42.0.5", NODE, false, false, false)]));
    let b = slice("web-b", json!([{"name": "http", "port": 8080, "protocol": "TCP"}]), json!([ep("10.42.0.5", NODE, true, true, false)]));
    let d = service_desired(&s, &[&a, &b], &ctx());
    let p = one_port(&d);
    assert_eq!(p.backends.len(), 1);
    assert_eq!(p.backends[0].state, BackendState::Active);
}

#[test]
fn nodeport_external_ips_and_lb_ingress() {
    let s = svc(json!({
        "spec": {"type": "LoadBalancer", "externalIPs": ["192.0.2.7"],
                 "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [
            {"ip": "192.0.2.100"},
            {"ip": "192.0.2.101", "ipMode": "Proxy"},
            {"hostname": "lb.example"},
        ]}}
    }));
    let d = service_desired(&s, &[], &ctx());
    assert_eq!(one_port(&d).frontends, vec![
        fe(FrontendKind::ClusterIp, "10.43.0.10", 80),
        fe(FrontendKind::NodePort, "0.0.0.0", 30080),
        fe(FrontendKind::ExternalIp, "192.0.2.7", 80),
        fe(FrontendKind::LoadBalancer, "192.0.2.100", 80),
    ]);
    assert!(d.health_check.is_none(), "eTP=Cluster has no health check");
}

#[test]
fn external_frontends_on_node_addresses_or_cluster_ranges_are_refused() {
    let s = svc(json!({
        "spec": {"type": "LoadBalancer", "externalIPs": ["198.18.0.11", "10.42.1.5", "192.0.2.7"]},
        "status": {"loadBalancer": {"ingress": [{"ip": "10.43.0.1"}, {"ip": "192.0.2.100"}]}}
    }));
    let d = service_desired(&s, &[], &ctx());
    assert_eq!(one_port(&d).frontends, vec![
        fe(FrontendKind::ClusterIp, "10.43.0.10", 80),
        fe(FrontendKind::ExternalIp, "192.0.2.7", 80),
        fe(FrontendKind::LoadBalancer, "192.0.2.100", 80),
    ]);
    let refused: Vec<String> = d.refused.iter().map(ToString::to_string).collect();
    assert_eq!(refused, ["198.18.0.11", "10.42.1.5", "10.43.0.1"]);
    assert!(d.notes.iter().any(|n| n == "externalIP 198.18.0.11 refused: it is a node's address"), "{:?}", d.notes);
    assert!(d.notes.iter().any(|n| n.contains("LoadBalancer ingress IP 10.43.0.1 refused: it is in the Service range")), "{:?}", d.notes);
}

#[test]
fn lb_ingress_ignored_unless_type_load_balancer() {
    let s = svc(json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}}}));
    let d = service_desired(&s, &[], &ctx());
    assert_eq!(one_port(&d).frontends, vec![fe(FrontendKind::ClusterIp, "10.43.0.10", 80)]);
}

#[test]
fn external_traffic_policy_local() {
    let s = svc(json!({"spec": {"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}}));
    let sl = http_slice(json!([
        ep("10.42.0.5", NODE, true, true, false),
        ep("10.42.1.5", "node-b", true, true, false),
    ]));
    let d = service_desired(&s, &[&sl], &ctx());
    let p = one_port(&d);
    assert_eq!((p.external_policy, p.internal_policy), (TrafficPolicy::Local, TrafficPolicy::Cluster));
    assert_eq!(eligible(p, FrontendKind::ClusterIp, false).len(), 2, "ClusterIP follows iTP (Cluster)");
    assert_eq!(eligible(p, FrontendKind::NodePort, true), addrs(&["10.42.0.5:8080"]));
    assert_eq!(eligible(p, FrontendKind::NodePort, false).len(), 2, "in-cluster traffic to the NodePort uses all");
    assert_eq!(d.health_check, Some(HealthCheck { port: 32000, owner: Owner::service("ns", "web"), local_endpoints: 1 }));
}

#[test]
fn etp_local_without_local_endpoints() {
    let s = svc(json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}}));
    let sl = http_slice(json!([ep("10.42.1.5", "node-b", true, true, false)]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert!(eligible(one_port(&d), FrontendKind::NodePort, true).is_empty());
    assert_eq!(d.health_check.unwrap().local_endpoints, 0);
}

#[test]
fn local_policy_fallback_looks_at_local_endpoints_only() {
    // A remote ready endpoint must not stop the local serving-terminating
    // fallback (kube-proxy hasLocalReadyEndpoints).
    let s = svc(json!({"spec": {"internalTrafficPolicy": "Local"}}));
    let sl = http_slice(json!([
        ep("10.42.0.6", NODE, false, true, true),
        ep("10.42.1.5", "node-b", true, true, false),
    ]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert_eq!(eligible(one_port(&d), FrontendKind::ClusterIp, false), addrs(&["10.42.0.6:8080"]));
}

#[test]
fn health_check_counts_distinct_ready_local_ips() {
    let s = svc(json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
        "ports": [{"name": "http", "port": 80, "nodePort": 30080}, {"name": "https", "port": 443, "nodePort": 30443}]}}));
    let sl = slice("web-1",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "https", "port": 8443, "protocol": "TCP"}]),
        json!([ep("10.42.0.5", NODE, true, true, false), ep("10.42.0.6", NODE, true, true, false),
               ep("10.42.0.7", NODE, false, true, true), ep("10.42.1.5", "node-b", true, true, false)]));
    let d = service_desired(&s, &[&sl], &ctx());
    assert_eq!(d.health_check.unwrap().local_endpoints, 2);
}

#[test]
fn session_affinity_client_ip() {
    let s = svc(json!({"spec": {"sessionAffinity": "ClientIP"}}));
    assert_eq!(one_port(&service_desired(&s, &[], &ctx())).affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT));
    let s = svc(json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}}));
    assert_eq!(one_port(&service_desired(&s, &[], &ctx())).affinity_timeout_s, Some(60));
    let s = svc(json!({"spec": {"sessionAffinity": "None"}}));
    assert_eq!(one_port(&service_desired(&s, &[], &ctx())).affinity_timeout_s, None);
}

#[test]
fn sctp_ports_skipped_with_a_note() {
    let s = svc(json!({"spec": {"ports": [{"name": "s", "port": 9, "protocol": "SCTP"}, {"name": "http", "port": 80}]}}));
    let d = service_desired(&s, &[], &ctx());
    assert_eq!(one_port(&d).frontends[0].port, 80);
    assert_eq!(d.notes.len(), 1);
    assert!(d.notes[0].contains("SCTP"));
}

#[test]
fn ignored_services() {
    let cases = [
        json!({"spec": {"type": "ExternalName", "externalName": "example.com", "clusterIP": null, "clusterIPs": null}}),
        json!({"spec": {"clusterIP": "None", "clusterIPs": ["None"]}}),
        json!({"spec": {"clusterIP": null, "clusterIPs": null, "externalIPs": ["192.0.2.7"]}}),
        json!({"metadata": {"labels": {LABEL_HEADLESS: ""}}}),
        json!({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: "other-proxy"}}}),
        json!({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: ""}}}),
    ];
    for case in cases {
        let s = svc(case.clone());
        assert!(skip_reason(&s, &ctx()).is_some(), "{case}");
        let d = service_desired(&s, &[&http_slice(json!([ep("10.42.0.5", NODE, true, true, false)]))], &ctx());
        assert!(d.ports.is_empty(), "{case}");
    }
    assert_eq!(skip_reason(&svc(json!({})), &ctx()), None);
}

#[test]
fn service_proxy_name_selects_when_configured() {
    let mut c = ctx();
    c.proxy_name = Some("riptide".into());
    let ours = svc(json!({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: "riptide"}}}));
    let other = svc(json!({"metadata": {"labels": {LABEL_SERVICE_PROXY_NAME: "kube-proxy"}}}));
    let unlabelled = svc(json!({}));
    assert_eq!(skip_reason(&ours, &c), None);
    assert!(skip_reason(&other, &c).is_some());
    assert!(skip_reason(&unlabelled, &c).is_some());
    assert!(skip_reason(&ours, &ctx()).is_some(), "without a name any value is foreign");
}

#[test]
fn dual_stack_keeps_ipv4_cluster_ip_only() {
    let s = svc(json!({"spec": {"clusterIPs": ["10.43.0.10", "fd00:43::10"], "ipFamilies": ["IPv4", "IPv6"]}}));
    let d = service_desired(&s, &[], &ctx());
    assert_eq!(one_port(&d).frontends, vec![fe(FrontendKind::ClusterIp, "10.43.0.10", 80)]);
}

fn pod(v: Value) -> SlimPod {
    let mut base = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "ns", "name": "p"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [
            {"name": "web", "containerPort": 80, "hostPort": 8081},
            {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "198.18.0.1"},
            {"containerPort": 9000},
        ]}]},
        "status": {"phase": "Running", "podIP": "10.42.0.9"}
    });
    merge(&mut base, v);
    serde_json::from_value(base).unwrap()
}

#[test]
fn host_ports_of_local_pods() {
    let d = pod_desired(&pod(json!({})), &ctx());
    let got: Vec<(Frontend, Protocol, Vec<SocketAddrV4>)> =
        d.ports.iter().map(|p| (p.frontends[0], p.protocol, be_addrs(p))).collect();
    assert_eq!(got, vec![
        (fe(FrontendKind::HostPort, "0.0.0.0", 8081), Protocol::Tcp, addrs(&["10.42.0.9:80"])),
        (fe(FrontendKind::HostPort, "198.18.0.1", 5353), Protocol::Udp, addrs(&["10.42.0.9:53"])),
    ]);
    assert!(d.ports.iter().all(|p| p.name.starts_with("pod/ns/p:") && p.backends[0].local));
    assert_ne!(d.ports[0].name, d.ports[1].name);
}

#[test]
fn host_ports_skipped_for_unready_foreign_or_host_network_pods() {
    for patch in [
        json!({"status": {"podIP": null}}),
        json!({"status": {"phase": "Succeeded"}}),
        json!({"spec": {"nodeName": "node-b"}}),
        json!({"spec": {"hostNetwork": true}}),
    ] {
        assert!(pod_desired(&pod(patch.clone()), &ctx()).ports.is_empty(), "{patch}");
    }
}

#[test]
fn load_balancer_source_ranges_reach_the_port_and_bad_entries_are_reported() {
    use riptide_datapath::service::SourceRanges;
    let s = svc(json!({
        "spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24", "bogus", "198.18.0.0/24"]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}}
    }));
    let mut c = ctx();
    c.node_ip = Some("198.18.0.11".parse().unwrap());
    let d = service_desired(&s, &[], &c);
    let SourceRanges::Only(nets) = &one_port(&d).source_ranges else {
        panic!("ranges expected: {:?}", one_port(&d).source_ranges);
    };
    let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
    // The node is in 198.18.0.0/24: the LB IP may be a source too.
    assert_eq!(nets, ["203.0.113.0/24", "198.18.0.0/24", "192.0.2.100/32"]);
    assert_eq!(d.invalid_source_ranges, ["bogus"]);
    assert!(d.notes.iter().any(|n| n.contains("\"bogus\"")), "{:?}", d.notes);
    // No field: open.
    let open = service_desired(&svc(json!({"spec": {"type": "LoadBalancer"}})), &[], &c);
    assert_eq!(one_port(&open).source_ranges, SourceRanges::Any);
    assert!(open.invalid_source_ranges.is_empty());
}
