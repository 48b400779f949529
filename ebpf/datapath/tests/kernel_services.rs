//! Kernel tests (need root) of the service map writer against real maps:
//! refcounted shared backends, shrinking, scope changes, and ids that
//! survive a restarted writer through the pinned maps.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::ip;
use riptide_common::{
    BackendKey, BackendValue, MaglevKey, RevNatKey, RevNatValue, SCOPE_EXT, SCOPE_INT, SvcKey,
    SvcValue, names,
};
use riptide_datapath::{
    Datapath, MapSizes, Pinning,
    service::{
        Algorithm, Backend, BackendAddr, BackendState, Frontend, FrontendKind, Protocol, Service,
        Services, TrafficPolicy,
    },
    unpin_node,
};
use riptide_test_support::privileged;

fn svc(name: &str, vip: &str, backends: &[(&str, bool)]) -> Service {
    Service {
        name: name.into(),
        protocol: Protocol::Tcp,
        frontends: vec![
            Frontend {
                kind: FrontendKind::ClusterIp,
                addr: ip(vip),
                port: 80,
            },
            Frontend {
                kind: FrontendKind::NodePort,
                addr: Ipv4Addr::UNSPECIFIED,
                port: 30000 + u16::from(ip(vip).octets()[3]),
            },
        ],
        backends: backends
            .iter()
            .map(|(a, local)| Backend {
                addr: SocketAddrV4::new(ip(a), 8080),
                state: BackendState::Active,
                local: *local,
            })
            .collect(),
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    }
}

fn private() -> Services {
    let mut dp = Datapath::load(&Pinning::None).expect("load");
    dp.services().expect("services")
}

fn entries(s: &Services, vip: &str, scope: u8) -> Vec<(SvcKey, SvcValue)> {
    let vip_be = u32::from(ip(vip)).to_be();
    let mut v: Vec<_> = s
        .dump_services()
        .into_iter()
        .filter(|(k, _)| k.vip_be == vip_be && k.scope == scope)
        .collect();
    v.sort_by_key(|(k, _)| k.slot);
    v
}

fn addr(a: &str) -> BackendAddr {
    BackendAddr {
        addr: SocketAddrV4::new(ip(a), 8080),
        protocol: Protocol::Tcp,
    }
}

#[test]
fn kernel_shared_backend_is_refcounted_and_removed_with_its_last_service() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut s = private();
    s.upsert(&svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.5", true), ("10.42.1.5", false)],
    ))
    .unwrap();
    s.upsert(&svc("b", "10.43.0.2", &[("10.42.0.5", true)]))
        .unwrap();
    let shared = s.backend_id_of(&addr("10.42.0.5")).unwrap();
    assert_eq!(s.backend_refs(shared), 2);
    assert_eq!(s.dump_backends().len(), 2, "one entry per backend address");
    let slots_b = entries(&s, "10.43.0.2", SCOPE_EXT);
    assert_eq!(
        slots_b[1].1.backend_id, shared,
        "b's slot names the shared id"
    );

    s.remove("a").unwrap();
    assert_eq!(s.backend_refs(shared), 1);
    assert_eq!(s.dump_backends().len(), 1, "a's own backend is gone");
    assert!(
        entries(&s, "10.43.0.1", SCOPE_EXT).is_empty(),
        "no orphan slot"
    );
    assert_eq!(
        s.backend_id_of(&addr("10.42.0.5")),
        Some(shared),
        "id unchanged"
    );

    s.remove("b").unwrap();
    assert!(s.dump_backends().is_empty());
    assert!(s.dump_services().is_empty());
    assert!(s.dump_revnat().is_empty());
    s.remove("b").unwrap(); // idempotent
}

#[test]
fn kernel_shrinking_and_growing_rewrites_slots_and_count() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut s = private();
    s.upsert(&svc(
        "a",
        "10.43.0.1",
        &[
            ("10.42.0.5", true),
            ("10.42.0.6", true),
            ("10.42.0.7", true),
        ],
    ))
    .unwrap();
    let e = entries(&s, "10.43.0.1", SCOPE_EXT);
    assert_eq!(e.len(), 4, "master + 3 slots");
    assert_eq!(e[0].1.count, 3);
    s.upsert(&svc("a", "10.43.0.1", &[("10.42.0.6", true)]))
        .unwrap();
    let e = entries(&s, "10.43.0.1", SCOPE_EXT);
    assert_eq!(e.len(), 2, "slots 2 and 3 deleted: {e:?}");
    assert_eq!(e[0].1.count, 1);
    assert_eq!(
        e[1].1.backend_id,
        s.backend_id_of(&addr("10.42.0.6")).unwrap()
    );
    assert_eq!(s.dump_backends().len(), 1, "dropped backends released");
    // All backends gone: the master stays with count 0 (reject, not "no service").
    s.upsert(&svc("a", "10.43.0.1", &[])).unwrap();
    let e = entries(&s, "10.43.0.1", SCOPE_EXT);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].1.count, 0);
}

#[test]
fn kernel_traffic_policy_change_adds_and_removes_the_internal_scope() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut s = private();
    let mut a = svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.5", true), ("10.42.1.5", false)],
    );
    a.external_policy = TrafficPolicy::Local;
    s.upsert(&a).unwrap();
    let np_int: Vec<_> = s
        .dump_services()
        .into_iter()
        .filter(|(k, _)| k.vip_be == 0 && k.scope == SCOPE_INT)
        .collect();
    assert_eq!(np_int.len(), 3, "INT master + 2 slots");
    a.external_policy = TrafficPolicy::Cluster;
    s.upsert(&a).unwrap();
    let np: Vec<_> = s
        .dump_services()
        .into_iter()
        .filter(|(k, _)| k.vip_be == 0)
        .collect();
    assert!(np.iter().all(|(k, _)| k.scope == SCOPE_EXT), "{np:?}");
    assert_eq!(np.len(), 3);
}

#[test]
fn kernel_frontend_cannot_belong_to_two_services() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut s = private();
    s.upsert(&svc("a", "10.43.0.1", &[])).unwrap();
    assert!(s.upsert(&svc("b", "10.43.0.1", &[])).is_err());
}

/// Removes the node's pins even when the test fails.
struct PinGuard(String);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = unpin_node(&self.0);
    }
}

#[test]
fn kernel_restarted_writer_keeps_ids_from_the_pinned_maps() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let node = format!("svc-test-{}.lab", std::process::id());
    let _guard = PinGuard(node.clone());
    let a = svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.5", true), ("10.42.1.5", false)],
    );
    let gone = svc("gone", "10.43.0.9", &[("10.42.9.9", false)]);
    let (be_ids, revnat) = {
        let mut dp = Datapath::load(&Pinning::Node(node.clone())).expect("load pinned");
        let mut s = dp.services().unwrap();
        s.upsert(&a).unwrap();
        s.upsert(&gone).unwrap();
        (
            [
                s.backend_id_of(&addr("10.42.0.5")).unwrap(),
                s.backend_id_of(&addr("10.42.1.5")).unwrap(),
            ],
            s.revnat_id_of(&a.frontends[0].id(a.protocol)).unwrap(),
        )
    };
    // "Restart": a new load finds the pinned maps; the writer reads ids back.
    let dp = Datapath::load(&Pinning::Node(node.clone())).expect("reload");
    let mut s = Services::open_pinned(&node).expect("open pinned");
    assert_eq!(s.backend_id_of(&addr("10.42.0.5")), Some(be_ids[0]));
    s.upsert(&a).unwrap();
    assert_eq!(
        s.backend_id_of(&addr("10.42.0.5")),
        Some(be_ids[0]),
        "same backend id"
    );
    assert_eq!(s.backend_id_of(&addr("10.42.1.5")), Some(be_ids[1]));
    assert_eq!(
        s.revnat_id_of(&a.frontends[0].id(a.protocol)),
        Some(revnat),
        "same reverse-NAT id"
    );
    // The service deleted while we were down goes after the resync.
    let (fe, be) = s.remove_unclaimed().unwrap();
    assert_eq!((fe, be), (2, 1), "gone's two frontends and its backend");
    assert!(entries(&s, "10.43.0.9", SCOPE_EXT).is_empty());
    assert_eq!(s.dump_backends().len(), 2);
    assert_eq!(
        entries(&s, "10.43.0.1", SCOPE_EXT)[0].1.count,
        2,
        "a untouched"
    );
    drop(dp);
}

/// A writer over maps created with `sizes` (`(map name, max_entries)`).
fn tiny(sizes: &[(&str, u32)]) -> Services {
    let mut ms = MapSizes::default();
    for (name, n) in sizes {
        ms.set(name, *n).expect("map size");
    }
    let mut dp = Datapath::load_sized(&Pinning::None, &ms).expect("load");
    dp.services().expect("services")
}

/// Everything the writer put into the maps, sorted, for before/after checks.
#[derive(Debug, PartialEq)]
struct Snapshot {
    svc: Vec<(SvcKey, SvcValue)>,
    be: Vec<(BackendKey, BackendValue)>,
    revnat: Vec<(RevNatKey, RevNatValue)>,
    maglev: Vec<MaglevKey>,
}

fn snapshot(s: &Services) -> Snapshot {
    let mut svc = s.dump_services();
    svc.sort_by_key(|(k, _)| (k.vip_be, k.port_be, k.proto, k.scope, k.slot));
    let mut be = s.dump_backends();
    be.sort_by_key(|(k, _)| k.id);
    let mut revnat = s.dump_revnat();
    revnat.sort_by_key(|(k, _)| k.id);
    let mut maglev = s.dump_maglev();
    maglev.sort_by_key(|k| (k.revnat_id, k.scope));
    Snapshot {
        svc,
        be,
        revnat,
        maglev,
    }
}

#[test]
fn kernel_upsert_failing_on_a_full_backend_map_leaves_the_maps_as_they_were() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut s = tiny(&[(names::BE4, 4)]);
    s.upsert(&svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.1", true), ("10.42.0.2", true)],
    ))
    .unwrap();
    s.upsert(&svc("b", "10.43.0.2", &[("10.42.0.2", true)]))
        .unwrap();
    let shared = s.backend_id_of(&addr("10.42.0.2")).unwrap();
    let before = snapshot(&s);

    // Three new backends next to the two in use: the fifth does not fit.
    let grown = svc(
        "a",
        "10.43.0.1",
        &[
            ("10.42.0.1", true),
            ("10.42.0.3", true),
            ("10.42.0.4", true),
            ("10.42.0.5", true),
        ],
    );
    let err = s.upsert(&grown).expect_err("the backend map is full");
    assert!(format!("{err}").contains(names::BE4), "{err}");
    assert_eq!(snapshot(&s), before, "maps as before the failed upsert");
    assert_eq!(s.backend_refs(shared), 2, "refcount unchanged");
    assert_eq!(s.backend_id_of(&addr("10.42.0.3")), None, "no id leaked");

    // Delete after a failed write removes everything a owned.
    s.remove("a").unwrap();
    assert!(entries(&s, "10.43.0.1", SCOPE_EXT).is_empty(), "a's VIP is gone");
    assert_eq!(s.dump_backends().len(), 1, "only b's backend stays");
    assert_eq!(s.backend_refs(shared), 1);

    // With room freed the same kind of write succeeds, refcounts exact.
    let regrown = svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.2", true), ("10.42.0.3", true), ("10.42.0.4", true)],
    );
    s.upsert(&regrown).unwrap();
    assert_eq!(s.backend_refs(shared), 2);
    for a in ["10.42.0.3", "10.42.0.4"] {
        assert_eq!(s.backend_refs(s.backend_id_of(&addr(a)).unwrap()), 1, "{a}");
    }
    assert_eq!(s.dump_backends().len(), 3);
    assert_eq!(entries(&s, "10.43.0.1", SCOPE_EXT)[0].1.count, 3);
}

#[test]
fn kernel_upsert_failing_midway_through_the_slots_rolls_back_masters_and_backends() {
    if !privileged("to load eBPF programs") {
        return;
    }
    // a (two frontends × master + 2 slots) and b (two empty masters): 8 of 10.
    let mut s = tiny(&[(names::SVC4, 10)]);
    s.upsert(&svc(
        "a",
        "10.43.0.1",
        &[("10.42.0.1", true), ("10.42.0.2", true)],
    ))
    .unwrap();
    s.upsert(&svc("b", "10.43.0.2", &[])).unwrap();
    let before = snapshot(&s);
    let four = svc(
        "a",
        "10.43.0.1",
        &[
            ("10.42.0.1", true),
            ("10.42.0.2", true),
            ("10.42.0.3", true),
            ("10.42.0.4", true),
        ],
    );
    // The ClusterIP frontend grows to 4 slots (its master says 4), then the
    // NodePort frontend's third slot finds the map full.
    let err = s.upsert(&four).expect_err("the service map is full");
    assert!(format!("{err}").contains(names::SVC4), "{err}");
    assert_eq!(snapshot(&s), before, "masters, slots and backends as before");
    assert_eq!(s.backend_id_of(&addr("10.42.0.3")), None);

    // A Service that never got in: nothing of it stays, remove is a no-op.
    let err = s.upsert(&svc("c", "10.43.0.3", &[("10.42.0.9", true)]));
    assert!(err.is_err(), "c does not fit either");
    assert_eq!(snapshot(&s), before);
    assert!(!s.names().any(|n| n == "c"));
    s.remove("c").unwrap();

    s.remove("b").unwrap();
    s.upsert(&four).unwrap();
    assert_eq!(entries(&s, "10.43.0.1", SCOPE_EXT)[0].1.count, 4);
    assert_eq!(s.dump_backends().len(), 4);
    for a in ["10.42.0.1", "10.42.0.2", "10.42.0.3", "10.42.0.4"] {
        assert_eq!(s.backend_refs(s.backend_id_of(&addr(a)).unwrap()), 1, "{a}");
    }
    s.remove("a").unwrap();
    assert!(s.dump_services().is_empty(), "{:?}", s.dump_services());
    assert!(s.dump_backends().is_empty());
    assert!(s.dump_revnat().is_empty());
}
