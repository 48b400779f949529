//! Kernel tests (need root): drop events in `rt_events_v1`, rate limited
//! per CPU so a flood never becomes per-packet logging.
#![allow(clippy::unwrap_used)]

mod common;

use std::{net::Ipv4Addr, time::Instant};

use common::*;
use riptide_common::{
    CFG_F_DROP_NO_BACKEND, Config, EV_SRC_FROM_POD, capacity, names, proto, stats,
};
use riptide_datapath::{
    Datapath, Pinning,
    service::{Algorithm, Frontend, FrontendKind, Protocol, Service, TrafficPolicy},
};
use riptide_test_support::privileged;

#[test]
fn drops_are_reported_as_events_at_a_bounded_rate() {
    if !privileged("to load eBPF programs") {
        return;
    }
    let mut dp = Datapath::load(&Pinning::None).unwrap();
    dp.set_config(&Config {
        flags: CFG_F_DROP_NO_BACKEND,
        ..Default::default()
    })
    .unwrap();
    let mut events = dp.events().unwrap();
    let mut svcs = dp.services().unwrap();
    // A service without endpoints, configured to drop (not reject).
    svcs.upsert(&Service {
        name: "default/empty:http".into(),
        protocol: Protocol::Tcp,
        frontends: vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: ip("10.43.0.99"),
            port: 80,
        }],
        backends: Vec::new(),
        affinity_timeout_s: None,
        external_policy: TrafficPolicy::Cluster,
        internal_policy: TrafficPolicy::Cluster,
        source_ranges: Default::default(),
        algorithm: Algorithm::Random,
        lb_mode: riptide_datapath::service::LbMode::Snat,
    })
    .unwrap();

    let started = Instant::now();
    let n = 500u16;
    for i in 0..n {
        let (verdict, _) = run(
            &mut dp,
            names::PROG_FROM_POD,
            &syn((ip("10.42.0.5"), 30000 + i), (ip("10.43.0.99"), 80)),
        );
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    let elapsed_s = started.elapsed().as_secs() + 1;
    let got = events.drain();
    let st = dp.stats().unwrap();
    assert_eq!(
        st.get(stats::DROP_NO_BACKEND),
        u64::from(n),
        "every drop counted"
    );

    // At most EVENTS_PER_CPU_PER_S per CPU per (started) second, at least one.
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let bound = capacity::EVENTS_PER_CPU_PER_S * cpus * elapsed_s;
    assert!(!got.is_empty(), "drops reported");
    assert!(
        (got.len() as u64) <= bound,
        "{} events for {n} drops (bound {bound})",
        got.len()
    );
    assert_eq!(
        got.len() as u64 + st.get(stats::EVENTS_SUPPRESSED),
        u64::from(n),
        "every drop is either an event or counted as suppressed"
    );
    for e in &got {
        assert_eq!(e.reason(), "drop_no_backend");
        assert_eq!(e.raw.source, EV_SRC_FROM_POD);
        assert_eq!(e.raw.proto, proto::TCP);
        assert_eq!(*e.dst().ip(), Ipv4Addr::new(10, 43, 0, 99));
        assert_eq!(e.dst().port(), 80);
        assert_eq!(*e.src().ip(), Ipv4Addr::new(10, 42, 0, 5));
        assert!((30000..30000 + n).contains(&e.src().port()));
        assert_ne!(e.raw.ts_ns, 0);
    }
    // Drained: nothing left.
    assert!(events.drain().is_empty());
}
