//! The specification's examples (kubernetes/dns docs/specification.md),
//! answered from an index holding the objects they describe.

use std::{net::IpAddr, sync::Arc};

use hickory_proto::rr::{
    LowerName, Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SRV, TXT},
};

use super::*;
use crate::index::{Endpoint, Port, ServiceSpec, SliceSpec};

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn zone() -> Zone {
    Zone::new("cluster.local", 5, PodRecords::Insecure).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn port(n: &str, proto: Proto, p: u16) -> Port {
    Port { name: n.into(), proto, port: p }
}

fn ep(addr: &str, host: Option<&str>, ready: bool) -> Endpoint {
    Endpoint { addr: ip(addr), hostname: host.map(Arc::from), ready }
}

/// The spec's cluster: `kubernetes` (ClusterIP 10.3.0.1, port https/443),
/// `headless` (my-pet, my-pet-2, one endpoint without hostname, one not
/// ready), `foo` (ExternalName www.example.com), `empty` (headless, no
/// ready endpoint), `v6` (an IPv6 ClusterIP).
fn index() -> Index {
    let mut ix = Index::new(42);
    ix.apply_service(
        "default",
        "kubernetes",
        ServiceSpec {
            kind: ServiceKind::ClusterIp([ip("10.3.0.1")].into()),
            ports: [port("https", Proto::Tcp, 443)].into(),
            publish_not_ready: false,
        },
    );
    let headless = ServiceSpec { kind: ServiceKind::Headless, ports: [port("https", Proto::Tcp, 443)].into(), publish_not_ready: false };
    ix.apply_service("default", "headless", headless.clone());
    ix.apply_slice(
        "default",
        "headless",
        "headless-a",
        SliceSpec {
            ports: [port("https", Proto::Tcp, 8443)].into(),
            endpoints: [
                ep("10.3.0.100", Some("my-pet"), true),
                ep("10.3.0.101", Some("my-pet-2"), true),
                ep("10.3.0.102", None, true),
                ep("10.3.0.103", Some("sick"), false),
            ]
            .into(),
        },
    );
    ix.apply_service(
        "default",
        "foo",
        ServiceSpec { kind: ServiceKind::ExternalName(name("www.example.com.")), ports: [].into(), publish_not_ready: false },
    );
    ix.apply_service("default", "empty", headless);
    ix.apply_slice("default", "empty", "empty-a", SliceSpec { ports: [].into(), endpoints: [ep("10.3.0.200", None, false)].into() });
    ix.apply_service(
        "other",
        "v6",
        ServiceSpec { kind: ServiceKind::ClusterIp([ip("fd00:43::5")].into()), ports: [].into(), publish_not_ready: false },
    );
    ix
}

fn ask(ix: &Index, q: &str, t: RecordType) -> Answer {
    let n = name(q);
    zone().lookup(ix, &n, &LowerName::new(&n), t)
}

fn answers(a: Answer) -> (Vec<Record>, Vec<Record>) {
    match a {
        Answer::Records { answers, additionals } => (answers, additionals),
        other => panic!("expected records, got {other:?}"),
    }
}

fn data(a: Answer) -> Vec<RData> {
    answers(a).0.into_iter().map(|r| r.data).collect()
}

#[test]
fn schema_version_txt() {
    // 2.2: `dns-version.cluster.local. IN TXT` → the schema version.
    let (rs, _) = answers(ask(&index(), "dns-version.cluster.local.", RecordType::TXT));
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].data, RData::TXT(TXT::new(vec!["1.1.0".into()])));
    assert_eq!(rs[0].ttl, 5);
    assert_eq!(ask(&index(), "dns-version.cluster.local.", RecordType::A), Answer::NoData);
}

#[test]
fn cluster_ip_a_srv_ptr() {
    let ix = index();
    // 2.3.1
    assert_eq!(data(ask(&ix, "kubernetes.default.svc.cluster.local.", RecordType::A)), [RData::A(A::new(10, 3, 0, 1))]);
    assert_eq!(ask(&ix, "kubernetes.default.svc.cluster.local.", RecordType::AAAA), Answer::NoData);
    // 2.3.2: `_https._tcp.kubernetes…` SRV → the Service name, its A in the additional section.
    let (rs, add) = answers(ask(&ix, "_https._tcp.kubernetes.default.svc.cluster.local.", RecordType::SRV));
    assert_eq!(rs.iter().map(|r| r.data.clone()).collect::<Vec<_>>(), [RData::SRV(SRV::new(10, 100, 443, name("kubernetes.default.svc.cluster.local.")))]);
    assert_eq!(add.len(), 1);
    assert_eq!((add[0].name.clone(), add[0].data.clone()), (name("kubernetes.default.svc.cluster.local."), RData::A(A::new(10, 3, 0, 1))));
    // Unnamed or absent ports have no SRV; the name does not exist.
    assert_eq!(ask(&ix, "_http._tcp.kubernetes.default.svc.cluster.local.", RecordType::SRV), Answer::NxDomain);
    assert_eq!(ask(&ix, "_https._udp.kubernetes.default.svc.cluster.local.", RecordType::SRV), Answer::NxDomain);
    // 2.3.3: `1.0.3.10.in-addr.arpa. IN PTR`.
    assert_eq!(data(ask(&ix, "1.0.3.10.in-addr.arpa.", RecordType::PTR)), [RData::PTR(PTR(name("kubernetes.default.svc.cluster.local.")))]);
}

#[test]
fn headless_a_hostnames_srv_ptr() {
    let ix = index();
    // 2.4.1: one A per ready endpoint.
    let mut got = data(ask(&ix, "headless.default.svc.cluster.local.", RecordType::A));
    got.sort_by_key(|d| d.to_string());
    let want: Vec<RData> = ["10.3.0.100", "10.3.0.101", "10.3.0.102"].iter().map(|a| RData::A(A(a.parse().unwrap()))).collect();
    assert_eq!(got, want, "the not-ready endpoint is left out");
    assert_eq!(data(ask(&ix, "my-pet.headless.default.svc.cluster.local.", RecordType::A)), [RData::A(A::new(10, 3, 0, 100))]);
    // The endpoint without a hostname is named after its address.
    assert_eq!(data(ask(&ix, "10-3-0-102.headless.default.svc.cluster.local.", RecordType::A)), [RData::A(A::new(10, 3, 0, 102))]);
    assert_eq!(ask(&ix, "sick.headless.default.svc.cluster.local.", RecordType::A), Answer::NxDomain, "not ready");
    assert_eq!(ask(&ix, "my-pet.headless.default.svc.cluster.local.", RecordType::AAAA), Answer::NoData);
    // 2.4.2: one SRV per ready endpoint, the endpoints' port, hostname targets.
    let (rs, add) = answers(ask(&ix, "_https._tcp.headless.default.svc.cluster.local.", RecordType::SRV));
    let mut targets: Vec<String> = rs
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => {
                assert_eq!((s.priority, s.weight, s.port), (10, 100, 8443));
                s.target.to_string()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "10-3-0-102.headless.default.svc.cluster.local.",
            "my-pet-2.headless.default.svc.cluster.local.",
            "my-pet.headless.default.svc.cluster.local."
        ]
    );
    assert_eq!(add.len(), 3, "each target's A in the additional section");
    // 2.4.3
    assert_eq!(data(ask(&ix, "100.0.3.10.in-addr.arpa.", RecordType::PTR)), [RData::PTR(PTR(name("my-pet.headless.default.svc.cluster.local.")))]);
    assert_eq!(ask(&ix, "103.0.3.10.in-addr.arpa.", RecordType::PTR), Answer::NotOurs, "a not-ready endpoint has no PTR");
    // 2.4.1: "If there are no ready endpoints for the headless Service, the answer should be NXDOMAIN."
    assert_eq!(ask(&ix, "empty.default.svc.cluster.local.", RecordType::A), Answer::NxDomain);
}

#[test]
fn publish_not_ready_addresses_publishes_every_endpoint() {
    let mut ix = index();
    let spec = ServiceSpec { kind: ServiceKind::Headless, ports: [].into(), publish_not_ready: true };
    ix.apply_service("default", "empty", spec);
    assert_eq!(data(ask(&ix, "empty.default.svc.cluster.local.", RecordType::A)), [RData::A(A::new(10, 3, 0, 200))]);
}

#[test]
fn external_name_is_a_cname() {
    let ix = index();
    // 2.5: `foo.default.svc.cluster.local. IN A` → CNAME www.example.com, then its A.
    match ask(&ix, "foo.default.svc.cluster.local.", RecordType::A) {
        Answer::Alias { cname, target } => {
            assert_eq!(cname.data, RData::CNAME(CNAME(name("www.example.com."))));
            assert_eq!(target, name("www.example.com."));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(data(ask(&ix, "foo.default.svc.cluster.local.", RecordType::CNAME)), [RData::CNAME(CNAME(name("www.example.com.")))]);
}

#[test]
fn pod_records() {
    let ix = index();
    // 2.6: `<a>-<b>-<c>-<d>.<ns>.pod.<zone>. IN A <a>.<b>.<c>.<d>`, any values.
    assert_eq!(data(ask(&ix, "10-42-1-7.anything.pod.cluster.local.", RecordType::A)), [RData::A(A::new(10, 42, 1, 7))]);
    assert_eq!(data(ask(&ix, "fd00-42--7.default.pod.cluster.local.", RecordType::AAAA)), [RData::AAAA(AAAA("fd00:42::7".parse().unwrap()))]);
    assert_eq!(ask(&ix, "10-42-1-7.default.pod.cluster.local.", RecordType::AAAA), Answer::NoData);
    assert_eq!(ask(&ix, "10-42-1-300.default.pod.cluster.local.", RecordType::A), Answer::NxDomain);
    assert_eq!(ask(&ix, "web.default.pod.cluster.local.", RecordType::A), Answer::NxDomain);
    let off = Zone::new("cluster.local", 5, PodRecords::Disabled).unwrap();
    let n = name("10-42-1-7.default.pod.cluster.local.");
    assert_eq!(off.lookup(&ix, &n, &LowerName::new(&n), RecordType::A), Answer::NxDomain);
}

#[test]
fn nxdomain_versus_nodata() {
    let ix = index();
    // Names that exist without data of the asked type: NODATA.
    for (q, t) in [
        ("cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
        ("pod.cluster.local.", RecordType::A),
        ("default.svc.cluster.local.", RecordType::A),
        ("kubernetes.default.svc.cluster.local.", RecordType::TXT),
        ("_tcp.kubernetes.default.svc.cluster.local.", RecordType::SRV),
        ("_https._tcp.kubernetes.default.svc.cluster.local.", RecordType::A),
        ("_tcp.headless.default.svc.cluster.local.", RecordType::A),
        ("default.pod.cluster.local.", RecordType::A),
        ("1.0.3.10.in-addr.arpa.", RecordType::A),
    ] {
        assert_eq!(ask(&ix, q, t), Answer::NoData, "{q} {t}");
    }
    // Names that do not exist: NXDOMAIN.
    for q in [
        "missing.default.svc.cluster.local.",
        "nowhere.svc.cluster.local.",
        "kubernetes.nowhere.svc.cluster.local.",
        "x.kubernetes.default.svc.cluster.local.",
        "_udp.kubernetes.default.svc.cluster.local.",
        "a.b.c.d.e.f.default.svc.cluster.local.",
        "nothing.cluster.local.",
        "dns-version.x.cluster.local.",
    ] {
        assert_eq!(ask(&ix, q, RecordType::A), Answer::NxDomain, "{q}");
    }
    // Outside the zone, and reverse names of unknown addresses: forwarded.
    assert_eq!(ask(&ix, "www.example.com.", RecordType::A), Answer::NotOurs);
    assert_eq!(ask(&ix, "9.9.3.10.in-addr.arpa.", RecordType::PTR), Answer::NotOurs);
    assert_eq!(ask(&ix, "3.10.in-addr.arpa.", RecordType::PTR), Answer::NotOurs);
}

#[test]
fn zone_apex_soa() {
    let ix = index();
    let (rs, _) = answers(ask(&ix, "cluster.local.", RecordType::SOA));
    match &rs[0].data {
        RData::SOA(soa) => {
            assert_eq!(soa.serial, ix.serial());
            assert_eq!(soa.minimum, 5, "negative answers are cached for the TTL");
            assert_eq!(soa.mname, name("ns.dns.cluster.local."));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn case_insensitive_and_case_preserving() {
    let ix = index();
    let q = name("KUBERNETES.Default.SVC.cluster.LOCAL.");
    let (rs, _) = answers(zone().lookup(&ix, &q, &LowerName::new(&q), RecordType::A));
    assert_eq!(rs[0].data, RData::A(A::new(10, 3, 0, 1)));
    assert_eq!(rs[0].name.to_string(), "KUBERNETES.Default.SVC.cluster.LOCAL.");
}

#[test]
fn ipv6_cluster_ip_and_reverse() {
    let ix = index();
    assert_eq!(data(ask(&ix, "v6.other.svc.cluster.local.", RecordType::AAAA)), [RData::AAAA(AAAA("fd00:43::5".parse().unwrap()))]);
    assert_eq!(ask(&ix, "v6.other.svc.cluster.local.", RecordType::A), Answer::NoData);
    let rev = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.3.4.0.0.0.0.d.f.ip6.arpa.";
    assert_eq!(data(ask(&ix, rev, RecordType::PTR)), [RData::PTR(PTR(name("v6.other.svc.cluster.local.")))]);
}

#[test]
fn other_zones() {
    let ix = index();
    let z = Zone::new("k8s.example", 30, PodRecords::Insecure).unwrap();
    let q = name("kubernetes.default.svc.k8s.example.");
    let (rs, _) = answers(z.lookup(&ix, &q, &LowerName::new(&q), RecordType::A));
    assert_eq!(rs[0].ttl, 30);
    let q = name("kubernetes.default.svc.cluster.local.");
    assert_eq!(z.lookup(&ix, &q, &LowerName::new(&q), RecordType::A), Answer::NotOurs);
}
