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
    let owners = views::owner_index(rec.applied().values());
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
