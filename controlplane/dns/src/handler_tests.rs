//! The handler end to end on the message level: queries built and answers
//! parsed with hickory-proto, served through the UDP path ([`Udp::serve`],
//! answer cache included) or hickory-server's [`RequestHandler`] (TCP).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
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
    udp::{Served, Udp},
};

#[path = "../tests/common/upstream.rs"]
mod upstream;
use upstream::Upstream;

/// Keeps the encoded response, as hickory-server encodes it for TCP.
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
        let mut buf = Vec::new();
        let info = response.destructive_emit(&mut BinEncoder::new(&mut buf))?;
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

/// A server's state: its index, handler, UDP path and metrics.
struct Server {
    index: Arc<RwLock<Index>>,
    handler: Arc<Handler>,
    udp: Udp,
    metrics: Metrics,
}

fn server(upstreams: Vec<SocketAddr>, budget: Duration) -> Server {
    let metrics = Metrics::new();
    let zone = Zone::new("cluster.local", 5, PodRecords::Insecure).unwrap();
    let fwd = Forwarder::new(upstreams, budget, 100, metrics.clone());
    let index = Arc::new(RwLock::new(index()));
    let handler = Arc::new(Handler::new(index.clone(), zone, fwd, metrics.clone()));
    Server { index, udp: Udp::new(handler.clone(), 100), handler, metrics }
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

const CLIENT: &str = "127.0.0.1:5300";

/// The UDP response to `datagram`, `None` when it gets none.
async fn serve(udp: &Udp, datagram: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match udp.serve(datagram, CLIENT.parse().unwrap(), &mut out) {
        Served::Now => Some(out),
        Served::Dropped => None,
        Served::Later(answer) => Some(answer.await),
    }
}

async fn ask(s: &Server, m: &Message) -> Message {
    let bytes = serve(&s.udp, &m.to_vec().unwrap()).await.expect("a response");
    let r = Message::from_vec(&bytes).unwrap();
    assert_eq!(r.metadata.id, m.metadata.id);
    r
}

async fn ask_tcp(s: &Server, m: &Message) -> Message {
    let req = Request::from_bytes(m.to_vec().unwrap(), CLIENT.parse().unwrap(), Protocol::Tcp).unwrap();
    let cap = Capture::default();
    Tcp(s.handler.clone()).handle_request::<_, TokioTime>(&req, cap.clone()).await;
    let bytes = cap.0.lock().unwrap().clone();
    Message::from_vec(&bytes).unwrap()
}

#[tokio::test]
async fn zone_answers_are_authoritative_with_soa_on_negatives() {
    let h = server(vec![], Duration::from_millis(100));
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

    let text = h.metrics.encode();
    assert!(text.contains(r#"riptide_dns_requests_total{qtype="A",rcode="NXDOMAIN"} 1"#), "{text}");
    assert!(text.contains(r#"riptide_dns_requests_total{qtype="AAAA",rcode="NOERROR"} 1"#), "{text}");
}

#[tokio::test]
async fn large_answers_truncate_without_edns_and_fit_with_it() {
    let h = server(vec![], Duration::from_millis(100));
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
    let h = server(vec![up.addr], Duration::from_secs(2));
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
    let text = h.metrics.encode();
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
    let h = server(vec![closed, quiet], Duration::from_millis(400));
    let t = std::time::Instant::now();
    let r = ask(&h, &query("www.example.", RecordType::A, None)).await;
    let took = t.elapsed();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(took >= Duration::from_millis(350) && took < Duration::from_millis(900), "took {took:?}");
    assert!(h.metrics.encode().contains("riptide_dns_upstream_failures_total 1"));

    // A closed port alone fails at once (ICMP port unreachable).
    let h = server(vec![closed], Duration::from_secs(2));
    let t = std::time::Instant::now();
    let r = ask(&h, &query("www.example.", RecordType::A, None)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(t.elapsed() < Duration::from_millis(200), "took {:?}", t.elapsed());

    // No upstream at all.
    let h = server(vec![], Duration::from_secs(2));
    assert_eq!(ask(&h, &query("www.example.", RecordType::A, None)).await.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn odd_requests() {
    let h = server(vec![], Duration::from_millis(100));
    let mut chaos = query("version.bind.", RecordType::TXT, None);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(ask(&h, &chaos).await.metadata.response_code, ResponseCode::Refused);
    let axfr = query("cluster.local.", RecordType::AXFR, None);
    assert_eq!(ask(&h, &axfr).await.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn tcp_answers_without_the_udp_size_limit() {
    let h = server(vec![], Duration::from_millis(100));
    let r = ask_tcp(&h, &query("big.default.svc.cluster.local.", RecordType::A, None)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 100);
    let nx = ask_tcp(&h, &query("nope.default.svc.cluster.local.", RecordType::A, None)).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(h.metrics.encode().contains(r#"riptide_dns_requests_total{qtype="A",rcode="NXDOMAIN"} 1"#));
}

#[tokio::test]
async fn cached_answers_are_the_full_answers_until_the_index_changes() {
    let h = server(vec![], Duration::from_millis(100));
    let mut q = query("web.default.svc.cluster.local.", RecordType::A, Some((1232, 0)));
    let first = serve(&h.udp, &q.to_vec().unwrap()).await.unwrap();
    q.metadata.id = q.metadata.id.wrapping_add(1);
    let hit = serve(&h.udp, &q.to_vec().unwrap()).await.unwrap();
    assert_eq!(hit[..2], q.metadata.id.to_be_bytes(), "the ID is the request's");
    assert_eq!(hit[2..], first[2..]);
    let text = h.metrics.encode();
    assert!(text.contains("riptide_dns_answer_cache_hits_total 1"), "{text}");
    assert!(text.contains(r#"riptide_dns_requests_total{qtype="A",rcode="NOERROR"} 2"#), "hits are counted: {text}");

    // Another spelling is another entry, answered as asked.
    let r = ask(&h, &query("WEB.default.svc.cluster.local.", RecordType::A, Some((1232, 0)))).await;
    assert_eq!(r.answers[0].name, Name::from_ascii("WEB.default.svc.cluster.local.").unwrap());

    // A watch event: the next answer is the new one.
    h.index.write().unwrap().apply_service(
        "default",
        "web",
        ServiceSpec { kind: ServiceKind::ClusterIp([ip("10.43.0.21")].into()), ports: [].into(), publish_not_ready: false },
    );
    let r = ask(&h, &q).await;
    assert_eq!(r.answers[0].data, RData::A(A::new(10, 43, 0, 21)));
    h.index.write().unwrap().delete_service("default", "web");
    assert_eq!(ask(&h, &q).await.metadata.response_code, ResponseCode::NXDomain);
}

/// splitmix64: a fixed sequence, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Every single-byte change and every truncation of a set of real queries,
/// and random datagrams: no panic, every response decodes and carries the
/// request's ID, and an answer from the cache is byte for byte what a
/// server with an empty cache sends.
#[tokio::test]
async fn mutated_datagrams_get_the_same_answers_from_the_cache() {
    let h = server(vec![], Duration::from_millis(20));
    let mut seeds: Vec<Vec<u8>> = [
        ("web.default.svc.cluster.local.", RecordType::A, None),
        ("web.default.svc.cluster.local.", RecordType::AAAA, Some((1232, 0))),
        ("big.default.svc.cluster.local.", RecordType::A, Some((4096, 0))),
        ("_p._tcp.big.default.svc.cluster.local.", RecordType::SRV, None),
        ("nope.default.svc.cluster.local.", RecordType::A, None),
        ("cluster.local.", RecordType::SOA, Some((512, 1))),
        ("dns-version.cluster.local.", RecordType::TXT, None),
        ("20.0.43.10.in-addr.arpa.", RecordType::PTR, None),
        ("1-2-3-4.default.pod.cluster.local.", RecordType::A, None),
        ("ext.default.svc.cluster.local.", RecordType::CNAME, None),
    ]
    .into_iter()
    .map(|(n, t, e)| query(n, t, e).to_vec().unwrap())
    .collect();
    let mut chaos = query("version.bind.", RecordType::TXT, None);
    chaos.queries[0].set_query_class(DNSClass::CH);
    seeds.push(chaos.to_vec().unwrap());

    let mut cases = Vec::new();
    for seed in &seeds {
        for i in 0..seed.len() {
            for f in [|_| 0u8, |_| 0xff, |b| b ^ 0x01, |b| b ^ 0x20, |b| b ^ 0x80, |b: u8| b.wrapping_add(1)] {
                let mut m = seed.clone();
                m[i] = f(m[i]);
                cases.push(m);
            }
        }
        cases.extend((0..seed.len()).map(|n| seed[..n].to_vec()));
        cases.push([seed.as_slice(), b"\x00\x01garbage"].concat());
    }
    let mut rng = Rng(17);
    for _ in 0..3000 {
        let mut m = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(m.len());
            m[i] = rng.next() as u8;
        }
        cases.push(m);
        cases.push((0..rng.below(80)).map(|_| rng.next() as u8).collect());
    }

    let mut hits = 0;
    for (n, m) in cases.iter().enumerate() {
        let first = serve(&h.udp, m).await;
        let mut again = m.clone();
        if let Some(id) = again.get_mut(..2) {
            id.copy_from_slice(&(n as u16).to_be_bytes());
        }
        let cached = serve(&h.udp, &again).await;
        let fresh = serve(&Udp::new(h.handler.clone(), 100), &again).await;
        assert_eq!(cached, fresh, "case {n}: {m:02x?}");
        assert_eq!(first.is_some(), cached.is_some(), "case {n}");
        if let Some(r) = &cached {
            let parsed = Message::from_vec(r).unwrap_or_else(|e| panic!("case {n}: {e}: {r:02x?}"));
            assert_eq!(parsed.metadata.id, n as u16, "case {n}");
        }
        hits += usize::from(crate::cache::key(m).is_some() && cached.is_some());
    }
    assert!(hits > 1000, "the cache took part: {hits}");
    let text = h.metrics.encode();
    assert!(!text.contains("riptide_dns_answer_cache_hits_total 0"), "{text}");
}
