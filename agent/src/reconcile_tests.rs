#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use riptide_datapath::service::{Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, TrafficPolicy};

/// Records writes and, like the datapath writer, refuses a frontend that
/// another installed port holds.
#[derive(Default)]
struct Recorder {
    installed: BTreeMap<String, Service>,
    log: Vec<String>,
    fail_next: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RecErr(String);

impl ServiceWriter for Recorder {
    type Error = RecErr;
    fn upsert(&mut self, p: &Service) -> Result<(), RecErr> {
        if self.fail_next.as_deref() == Some(p.name.as_str()) {
            self.fail_next = None;
            return Err(RecErr("injected".into()));
        }
        for (name, other) in &self.installed {
            if name != &p.name && other.frontend_ids().any(|id| p.frontend_ids().any(|x| x == id)) {
                return Err(RecErr(format!("{} shares a frontend with {name}", p.name)));
            }
        }
        self.log.push(format!("upsert {}", p.name));
        self.installed.insert(p.name.clone(), p.clone());
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<(), RecErr> {
        self.log.push(format!("remove {name}"));
        self.installed.remove(name);
        Ok(())
    }
    fn finish_resync(&mut self, _keep: &std::collections::HashSet<riptide_datapath::service::FrontendId>) -> Result<usize, RecErr> {
        Ok(0)
    }
}

fn port(owner: &Owner, name: &str, ips: &[&str], backends: &[&str]) -> Service {
    Service {
        name: format!("{owner}:{name}"),
        protocol: Protocol::Tcp,
        frontends: ips
            .iter()
            .map(|ip| Frontend { kind: FrontendKind::ExternalIp, addr: ip.parse::<Ipv4Addr>().unwrap(), port: 80 })
            .collect(),
        backends: backends
            .iter()
            .map(|b| Backend { addr: b.parse::<SocketAddrV4>().unwrap(), state: BackendState::Active, local: false })
            .collect(),
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

fn desired(ports: Vec<Service>) -> Desired {
    Desired { ports, ..Desired::default() }
}

#[test]
fn writes_only_the_difference() {
    let a = Owner::service("ns", "a");
    let b = Owner::service("ns", "b");
    let mut r = Reconciler::new();
    let mut w = Recorder::default();
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &["10.42.0.1:80"])]));
    r.set(&b, desired(vec![port(&b, "http", &["10.43.0.2"], &["10.42.0.2:80"])]));
    let rep = r.apply(&mut w);
    assert_eq!((rep.upserted, rep.removed), (2, 0));
    assert!(!r.is_dirty());

    // Same content again: nothing written.
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &["10.42.0.1:80"])]));
    assert_eq!(r.apply(&mut w), ApplyReport::default());

    // One backend more for a: one upsert of a only.
    w.log.clear();
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &["10.42.0.1:80", "10.42.0.3:80"])]));
    r.apply(&mut w);
    assert_eq!(w.log, vec!["upsert ns/a:http"]);
    assert_eq!(w.installed["ns/a:http"].backends.len(), 2);

    // b goes away.
    w.log.clear();
    r.set(&b, Desired::default());
    r.apply(&mut w);
    assert_eq!(w.log, vec!["remove ns/b:http"]);
    assert_eq!(r.applied().keys().map(|k| &**k).collect::<Vec<_>>(), vec!["ns/a:http"]);
}

#[test]
fn port_renames_remove_the_old_name() {
    let a = Owner::service("ns", "a");
    let mut r = Reconciler::new();
    let mut w = Recorder::default();
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &[])]));
    r.apply(&mut w);
    r.set(&a, desired(vec![port(&a, "web", &["10.43.0.1"], &[])]));
    let rep = r.apply(&mut w);
    assert!(rep.failed.is_empty(), "{rep:?}");
    assert_eq!(w.installed.keys().collect::<Vec<_>>(), vec!["ns/a:web"]);
}

#[test]
fn conflicting_frontend_goes_to_the_first_owner_and_moves_on_delete() {
    let a = Owner::service("ns", "a");
    let z = Owner::service("ns", "z");
    let pod = Owner::pod("ns", "p");
    let mut r = Reconciler::new();
    let mut w = Recorder::default();
    // z first, then a claims the same external IP: a wins (name order).
    r.set(&z, desired(vec![port(&z, "http", &["10.43.0.26", "192.0.2.7"], &["10.42.0.26:80"])]));
    r.apply(&mut w);
    assert_eq!(w.installed["ns/z:http"].frontends.len(), 2);
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1", "192.0.2.7"], &["10.42.0.1:80"])]));
    r.set(&pod, desired(vec![port(&pod, "hp", &["192.0.2.7"], &["10.42.0.9:80"])]));
    let rep = r.apply(&mut w);
    assert!(rep.failed.is_empty(), "writer saw a shared frontend: {rep:?}");
    assert_eq!(w.installed["ns/a:http"].frontends.len(), 2);
    assert_eq!(w.installed["ns/z:http"].frontends.len(), 1, "z lost 192.0.2.7");
    assert!(w.installed["pod/ns/p:hp"].frontends.is_empty(), "Services beat hostPorts");
    assert_eq!(r.conflicts().len(), 1);

    // a goes: z gets the address back, the pod still loses to z.
    r.set(&a, Desired::default());
    let rep = r.apply(&mut w);
    assert!(rep.failed.is_empty(), "{rep:?}");
    assert_eq!(w.installed["ns/z:http"].frontends.len(), 2);
    assert!(w.installed["pod/ns/p:hp"].frontends.is_empty());
}

#[test]
fn failed_writes_are_retried() {
    let a = Owner::service("ns", "a");
    let mut r = Reconciler::new();
    let mut w = Recorder { fail_next: Some("ns/a:http".into()), ..Recorder::default() };
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &[])]));
    let rep = r.apply(&mut w);
    assert_eq!(rep.failed.len(), 1);
    assert!(r.is_dirty());
    assert!(r.applied().is_empty());
    let rep = r.apply(&mut w);
    assert_eq!((rep.upserted, rep.failed.len()), (1, 0));
    assert!(w.installed.contains_key("ns/a:http"));
}

#[test]
fn retain_owners_drops_vanished_ones() {
    let a = Owner::service("ns", "a");
    let b = Owner::service("ns", "b");
    let mut r = Reconciler::new();
    let mut w = Recorder::default();
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &[])]));
    r.set(&b, Desired {
        ports: vec![port(&b, "http", &["10.43.0.2"], &[])],
        health_check: Some(HealthCheck { port: 32000, owner: b.clone(), local_endpoints: 0 }),
        notes: vec![],
        ..Desired::default()
    });
    r.apply(&mut w);
    assert_eq!(r.health_checks().len(), 1);
    r.retain_owners(|o| *o == a);
    r.apply(&mut w);
    assert_eq!(w.installed.keys().collect::<Vec<_>>(), vec!["ns/a:http"]);
    assert!(r.health_checks().is_empty());
}

#[test]
fn cap_keeps_ready_local_backends_first_and_reports_the_cut() {
    use riptide_datapath::service::{Backend, BackendState};
    let o = Owner::service("ns", "big");
    let mut p = port(&o, "http", &["10.43.0.9"], &[]);
    let be = |a: &str, state, local| Backend { addr: a.parse().unwrap(), state, local };
    p.backends = vec![
        be("10.42.0.5:80", BackendState::Quarantined, true),
        be("10.42.0.4:80", BackendState::Terminating, true),
        be("10.42.0.3:80", BackendState::Active, false),
        be("10.42.0.2:80", BackendState::Active, true),
        be("10.42.0.1:80", BackendState::Active, false),
    ];
    let mut d = desired(vec![p.clone()]);
    assert_eq!(crate::reconcile::cap_backends(&mut d, 3), Some((5, 3)));
    let kept: Vec<String> = d.ports[0].backends.iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(kept, ["10.42.0.2:80", "10.42.0.1:80", "10.42.0.3:80"]);
    let mut fits = desired(vec![p]);
    assert_eq!(crate::reconcile::cap_backends(&mut fits, 5), None);
    assert_eq!(fits.ports[0].backends.len(), 5);
}

#[test]
fn failing_ports_are_named_by_owner_and_cleared_by_a_successful_retry() {
    let mut r = Reconciler::new();
    let a = Owner::service("ns", "a");
    let b = Owner::service("ns", "b");
    r.set(&a, desired(vec![port(&a, "http", &["10.43.0.1"], &["10.42.0.1:80"])]));
    r.set(&b, desired(vec![port(&b, "http", &["10.43.0.2"], &["10.42.0.2:80"])]));
    let mut w = Recorder { fail_next: Some("ns/a:http".into()), ..Recorder::default() };
    let rep = r.apply(&mut w);
    assert_eq!(rep.upserted, 1, "b is written although a failed");
    let failing = r.failing();
    assert_eq!(failing.keys().collect::<Vec<_>>(), ["ns/a"]);
    assert!(failing["ns/a"].contains("injected"), "{failing:?}");
    assert_eq!(r.failing_frontends().len(), 1);
    r.apply(&mut w);
    assert!(r.failing().is_empty() && r.failing_frontends().is_empty());
}
