//! The reconciler writing real datapath maps (needs root to load eBPF): the
//! difference logic against the datapath library, read back through the
//! same views the CLI shows.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddrV4;

use riptide_agent::{
    model::{Desired, Owner},
    reconcile::Reconciler,
    views,
};
use riptide_datapath::{
    Datapath, Pinning,
    service::{Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, TrafficPolicy},
};
use riptide_test_support::privileged;

fn be(addr: &str, state: BackendState, local: bool) -> Backend {
    Backend { addr: addr.parse::<SocketAddrV4>().unwrap(), state, local }
}

fn port(owner: &Owner, backends: Vec<Backend>, external_policy: TrafficPolicy) -> Service {
    Service {
        name: format!("{owner}:http"),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend { kind: FrontendKind::ClusterIp, addr: "10.43.0.10".parse().unwrap(), port: 80 },
            Frontend { kind: FrontendKind::NodePort, addr: "0.0.0.0".parse().unwrap(), port: 30080 },
        ],
        backends,
        affinity_timeout_s: None,
        external_policy,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

#[test]
fn kernel_reconciler_writes_and_shrinks_real_maps() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = Datapath::load(&Pinning::None).unwrap();
    let mut svc = dp.services().unwrap();
    let mut rec = Reconciler::new();
    let web = Owner::service("ns", "web");
    rec.set(&web, Desired {
        ports: vec![port(&web, vec![
            be("10.42.0.5:8080", BackendState::Active, true),
            be("10.42.1.5:8080", BackendState::Active, false),
            be("10.42.1.6:8080", BackendState::Terminating, false),
        ], TrafficPolicy::Local)],
        ..Desired::default()
    });
    let rep = rec.apply(&mut svc);
    assert!(rep.failed.is_empty(), "{rep:?}");
    let owners = views::owner_index(rec.applied().values().map(AsRef::as_ref));
    let views = views::frontend_views(&svc.dump_services(), &svc.dump_backends(), &owners);
    let summary: Vec<(String, String, usize)> = views.iter().map(|v| (v.frontend.clone(), v.scope.clone(), v.backends.len())).collect();
    assert_eq!(summary, vec![
        ("0.0.0.0:30080/TCP".into(), "external".into(), 1),
        ("0.0.0.0:30080/TCP".into(), "internal".into(), 2),
        ("10.43.0.10:80/TCP".into(), "external".into(), 2),
    ], "eTP=Local: external scope only the local backend");
    assert!(views.iter().all(|v| v.service.as_deref() == Some("ns/web:http")));
    assert_eq!(svc.dump_backends().len(), 3, "the terminating backend stays for existing flows");

    // The Service goes: nothing left behind.
    rec.set(&web, Desired::default());
    let rep = rec.apply(&mut svc);
    assert_eq!(rep.removed, 1);
    assert!(svc.dump_services().is_empty());
    assert!(svc.dump_backends().is_empty());
    assert!(svc.dump_revnat().is_empty());
}

/// A LoadBalancer Service's `loadBalancerSourceRanges`, from the API object
/// through the model and the reconciler into `rt_srcrange4_v1`, updated
/// and removed with the Service.
#[test]
fn kernel_source_ranges_follow_the_service_into_real_maps() {
    if !privileged("to load eBPF programs") {
        return;
    }
    use riptide_agent::model::{NodeContext, service_desired};
    let mut dp = Datapath::load(&Pinning::None).unwrap();
    let mut svc = dp.services().unwrap();
    let mut rec = Reconciler::new();
    let web = Owner::service("ns", "web");
    let ctx = NodeContext { node_name: "node-a".into(), ..NodeContext::default() };
    let object = |ranges: serde_json::Value| -> riptide_agent::slim::SlimService {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.43.0.10", "loadBalancerSourceRanges": ranges,
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}}
        }))
        .unwrap()
    };
    let prefixes = |svc: &riptide_datapath::service::Services| -> Vec<String> {
        svc.dump_source_ranges().iter().map(|(_, a, l)| format!("{a}/{l}")).collect()
    };

    rec.set(&web, service_desired(&object(serde_json::json!(["203.0.113.0/24", "oops"])), &[], &ctx));
    let rep = rec.apply(&mut svc);
    assert!(rep.failed.is_empty(), "{rep:?}");
    assert_eq!(prefixes(&svc), ["203.0.113.0/24"], "the valid range written, the invalid one skipped");

    rec.set(&web, service_desired(&object(serde_json::json!(["10.0.0.0/8", "198.51.100.7/32"])), &[], &ctx));
    let rep = rec.apply(&mut svc);
    assert!(rep.failed.is_empty(), "{rep:?}");
    assert_eq!(prefixes(&svc), ["10.0.0.0/8", "198.51.100.7/32"], "live update");

    rec.set(&web, service_desired(&object(serde_json::Value::Null), &[], &ctx));
    rec.apply(&mut svc);
    assert!(prefixes(&svc).is_empty(), "no field: open, no prefix left");

    rec.set(&web, Desired::default());
    rec.apply(&mut svc);
    assert!(svc.dump_services().is_empty());
}
