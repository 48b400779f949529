//! The handler end to end on the message level: queries built and answers
//! parsed with hickory-proto, the response encoded the way hickory-server
//! encodes it for UDP (size limit from the response's EDNS, else 512).

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    time::Duration,
};

use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::{Edns, Message, Query},
        rr::{DNSClass, RData, rdata::A},
        serialize::binary::BinEncoder,
    },
    zone_handler::MessageResponse,
};

use super::*;
use crate::{
    forward::Forwarder,
    index::{Endpoint, Port, Proto, ServiceKind, ServiceSpec, SliceSpec},
    records::PodRecords,
};

#[path = "../tests/common/upstream.rs"]
mod upstream;
use upstream::Upstream;

/// Keeps the encoded response.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let max = response.edns().map_or(512, Edns::max_payload);
        let mut buf = Vec::new();
        let mut enc = BinEncoder::new(&mut buf);
        enc.set_max_size(max);
        let info = response.destructive_emit(&mut enc)?;
        *self.0.lock().unwrap() = buf;
        Ok(info)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn index() -> Index {
    let mut ix = Index::new(1);
    ix.apply_service(
        "default",
        "web",
        ServiceSpec { kind: ServiceKind::ClusterIp([ip("10.43.0.20")].into()), ports: [].into(), publish_not_ready: false },
    );
    ix.apply_service(
        "default",
        "ext",
        ServiceSpec { kind: ServiceKind::ExternalName(Name::from_ascii("www.example.").unwrap()), ports: [].into(), publish_not_ready: false },
    );
    // A headless Service with 100 endpoints: 1.6 kB of A records.
    ix.apply_service("default", "big", ServiceSpec { kind: ServiceKind::Headless, ports: [].into(), publish_not_ready: false });
    let endpoints: Vec<Endpoint> =
        (0..100u8).map(|i| Endpoint { addr: IpAddr::V4(Ipv4Addr::new(10, 42, 1, i)), hostname: None, ready: true }).collect();
    ix.apply_slice("default", "big", "big-1", SliceSpec { ports: [Port { name: "p".into(), proto: Proto::Tcp, port: 1 }].into(), endpoints: endpoints.into() });
    ix
}

fn handler(upstreams: Vec<std::net::SocketAddr>, budget: Duration) -> (Handler, Metrics) {
    let metrics = Metrics::new();
    let zone = Zone::new("cluster.local", 5, PodRecords::Insecure).unwrap();
    let fwd = Forwarder::new(upstreams, budget, 100, metrics.clone());
    (Handler::new(Arc::new(RwLock::new(index())), zone, fwd, metrics.clone()), metrics)
}

fn query(name: &str, t: RecordType, edns: Option<(u16, u8)>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some((size, version)) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size).set_version(version);
        m.set_edns(e);
    }
    m
}

async fn ask(h: &Handler, m: &Message) -> Message {
    let req = Request::from_bytes(m.to_vec().unwrap(), "127.0.0.1:5300".parse().unwrap(), Protocol::Udp).unwrap();
    let cap = Capture::default();
    h.handle_request::<_, TokioTime>(&req, cap.clone()).await;
    let bytes = cap.0.lock().unwrap().clone();
    let r = Message::from_vec(&bytes).unwrap();
    assert_eq!(r.metadata.id, m.metadata.id);
    r
}

#[tokio::test]
async fn zone_answers_are_authoritative_with_soa_on_negatives() {
    let (h, metrics) = handler(vec![], Duration::from_millis(100));
    let r = ask(&h, &query("web.default.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative && r.metadata.recursion_available);
    assert_eq!(r.answers[0].data, RData::A(A::new(10, 43, 0, 20)));
    assert!(r.authorities.is_empty());

    let nx = ask(&h, &query("nope.default.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative && nx.answers.is_empty());
    assert!(matches!(nx.authorities[..], [Record { data: RData::SOA(_), ttl: 5, .. }]), "{:?}", nx.authorities);
    assert_eq!(nx.authorities[0].name, Name::from_ascii("cluster.local.").unwrap());

    let nodata = ask(&h, &query("web.default.svc.cluster.local.", RecordType::AAAA, None)).await;
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
    assert!(matches!(nodata.authorities[..], [Record { data: RData::SOA(_), .. }]));

    let ent = ask(&h, &query("default.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!((ent.metadata.response_code, ent.answers.len()), (ResponseCode::NoError, 0), "an empty non-terminal");

    let text = metrics.encode();
    assert!(text.contains(r#"riptide_dns_requests_total{qtype="A",rcode="NXDOMAIN"} 1"#), "{text}");
    assert!(text.contains(r#"riptide_dns_requests_total{qtype="AAAA",rcode="NOERROR"} 1"#), "{text}");
}

#[tokio::test]
async fn large_answers_truncate_without_edns_and_fit_with_it() {
    let (h, _) = handler(vec![], Duration::from_millis(100));
    let r = ask(&h, &query("big.default.svc.cluster.local.", RecordType::A, None)).await;
    assert!(r.metadata.truncation, "100 A records do not fit in 512 bytes");
    assert!(r.answers.len() < 100);
    let r = ask(&h, &query("big.default.svc.cluster.local.", RecordType::A, Some((4096, 0)))).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 100);
    assert_eq!(r.edns.as_ref().map(Edns::max_payload), Some(4096), "EDNS answered with the client's size");
    // SRV with 100 additional A records: the answers are kept whole first.
    let r = ask(&h, &query("_p._tcp.big.default.svc.cluster.local.", RecordType::SRV, Some((1232, 0)))).await;
    assert!(r.metadata.truncation);
    let bad = ask(&h, &query("web.default.svc.cluster.local.", RecordType::A, Some((1232, 1)))).await;
    // BADVERS shares its code (16) with BADSIG, which the parser picks.
    assert_eq!(u16::from(bad.metadata.response_code), u16::from(ResponseCode::BADVERS));
}

#[tokio::test]
async fn other_names_are_forwarded_and_cached() {
    let up = Upstream::start("127.0.0.1", &[("www.example.", Ipv4Addr::new(192, 0, 2, 7), 60)]).await;
    let (h, metrics) = handler(vec![up.addr], Duration::from_secs(2));
    let r = ask(&h, &query("www.example.", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(!r.metadata.authoritative && r.metadata.recursion_available);
    assert_eq!(r.answers[0].data, RData::A(A::new(192, 0, 2, 7)));
    let again = ask(&h, &query("WWW.example.", RecordType::A, None)).await;
    assert_eq!(again.answers[0].data, RData::A(A::new(192, 0, 2, 7)));
    assert_eq!(up.queries(), 1, "the second answer came from the cache");

    let nx = ask(&h, &query("missing.example.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(nx.authorities[..], [Record { data: RData::SOA(_), .. }]));
    ask(&h, &query("missing.example.", RecordType::A, None)).await;
    assert_eq!(up.queries(), 2, "negative answers are cached too");
    let text = metrics.encode();
    assert!(text.contains("riptide_dns_cache_hits_total 2"), "{text}");
    assert!(text.contains("riptide_dns_cache_misses_total 2"), "{text}");

    // An ExternalName: CNAME, then the target's A from upstream.
    let r = ask(&h, &query("ext.default.svc.cluster.local.", RecordType::A, None)).await;
    let data: Vec<RData> = r.answers.iter().map(|r| r.data.clone()).collect();
    assert_eq!(data.len(), 2, "{data:?}");
    assert!(matches!(&data[0], RData::CNAME(c) if c.0 == Name::from_ascii("www.example.").unwrap()));
    assert_eq!(data[1], RData::A(A::new(192, 0, 2, 7)));
}

#[tokio::test]
async fn dead_upstreams_fail_fast_with_servfail() {
    // One upstream that never answers and one whose port is closed.
    let (_silent, quiet) = upstream::silent("127.0.0.1").await;
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (h, metrics) = handler(vec![closed, quiet], Duration::from_millis(400));
    let t = std::time::Instant::now();
    let r = ask(&h, &query("www.example.", RecordType::A, None)).await;
    let took = t.elapsed();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(took >= Duration::from_millis(350) && took < Duration::from_millis(900), "took {took:?}");
    assert!(metrics.encode().contains("riptide_dns_upstream_failures_total 1"));

    // A closed port alone fails at once (ICMP port unreachable).
    let (h, _) = handler(vec![closed], Duration::from_secs(2));
    let t = std::time::Instant::now();
    let r = ask(&h, &query("www.example.", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_millis(200), "took {:?}", t.elapsed());

    // No upstream at all.
    let (h, _) = handler(vec![], Duration::from_secs(2));
    assert_eq!(ask(&h, &query("www.example.", RecordType::A, None)).await.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn odd_requests() {
    let (h, _) = handler(vec![], Duration::from_millis(100));
    let mut chaos = query("version.bind.", RecordType::TXT, None);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(ask(&h, &chaos).await.metadata.response_code, ResponseCode::Refused);
    let axfr = query("cluster.local.", RecordType::AXFR, None);
    assert_eq!(ask(&h, &axfr).await.metadata.response_code, ResponseCode::Refused);
}
