//! riptide-dns as a process against a real riptide apiserver: the binary
//! watches the API through a kubeconfig and serves on loopback; questions
//! go over real UDP and TCP sockets, built and parsed with hickory-proto.
//! Upstream resolvers are tiny loopback servers started here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/common/mod.rs"]
mod cp;
mod common {
    pub mod upstream;
}

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::upstream::{self, Upstream};
use hickory_proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

/// The riptide-dns process, killed on drop; its log is printed when a test
/// fails so a failure shows what the server saw.
struct Dns {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Dns {
    fn start(kubeconfig: &std::path::Path, upstreams: &[SocketAddr], extra: &[&str]) -> Self {
        let addr: SocketAddr = ("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), cp::free_port()).into();
        let metrics: SocketAddr = ("127.0.0.1".parse::<std::net::IpAddr>().unwrap(), cp::free_port()).into();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_riptide-dns"));
        cmd.arg("--kubeconfig").arg(kubeconfig).args(["--listen", &addr.to_string(), "--metrics", &metrics.to_string()]);
        for u in upstreams {
            cmd.args(["--upstream", &u.to_string()]);
        }
        // No upstream flag: an empty resolv.conf, never the host's.
        cmd.args(["--resolv-conf", "/dev/null"]).args(extra);
        let child = cmd
            .env("RUST_LOG", "info,riptide_dns=debug,hickory_server=warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Self { child, addr, metrics, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// HTTP GET on the metrics port: (status, body).
    fn http(&self, path: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(self.metrics).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.get(9..12)?.parse().ok()?;
        Some((code, buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()))
    }

    async fn wait_ready(&self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if self.http("/ready").is_some_and(|(c, _)| c == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("riptide-dns not ready after 20 s; log:\n{}", self.log());
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- riptide-dns log ---\n{}", self.log());
        }
    }
}

fn query(name: &str, t: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m
}

async fn udp(server: SocketAddr, name: &str, t: RecordType, edns: bool) -> Message {
    let q = query(name, t, edns);
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf)).await.expect("no UDP answer within 5 s").unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    r
}

async fn tcp(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let q = query(name, t, false).to_vec().unwrap();
    let mut s = TcpStream::connect(server).await.unwrap();
    s.write_all(&u16::try_from(q.len()).unwrap().to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let n = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> BTreeSet<String> {
    addrs_of(&m.answers)
}

fn addrs_of(records: &[hickory_proto::rr::Record]) -> BTreeSet<String> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Polls until `f` accepts an answer to `name`/`t`; returns the time taken.
async fn until(server: SocketAddr, name: &str, t: RecordType, secs: u64, f: impl Fn(&Message) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let m = udp(server, name, t, true).await;
        if f(&m) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{name} {t}: still {m:?} after {secs} s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn slice(name: &str, service: &str, eps: &[(&str, Option<&str>, bool)]) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(a, h, ready)| {
            let mut e = json!({"addresses": [a], "conditions": {"ready": ready}});
            if let Some(h) = h {
                e["hostname"] = json!(h);
            }
            e
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn svc(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_cluster_zone_from_a_real_apiserver() {
    let api = cp::TestServer::start(cp::Backend::Embedded).await;
    let up = Upstream::start("127.0.0.1", &[("www.example.", Ipv4Addr::new(192, 0, 2, 7), 60)]).await;
    let dns = Dns::start(&api.kubeconfig(), &[up.addr], &[]);
    dns.wait_ready().await;
    assert_eq!(dns.http("/healthz").map(|(c, _)| c), Some(200));
    let at = dns.addr;
    let client = api.client().await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let pp = PostParams::default();

    // A Service created → resolvable within 2 s, at the ClusterIP the API gave it.
    let web = svc(json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": "web"}}}));
    services.create(&pp, &web).await.unwrap();
    let took = until(at, "web.default.svc.cluster.local.", RecordType::A, 2, |m| !m.answers.is_empty()).await;
    let ip = services.get("web").await.unwrap().spec.unwrap().cluster_ip.unwrap();
    let a = udp(at, "web.default.svc.cluster.local.", RecordType::A, false).await;
    assert_eq!(addrs(&a), set(&[&ip]));
    assert!(a.metadata.authoritative);
    eprintln!("Service created → answerable in {took:?}");

    // SRV for the named port, the Service's A as an additional.
    let srv = udp(at, "_http._tcp.web.default.svc.cluster.local.", RecordType::SRV, true).await;
    match &srv.answers[..] {
        [r] => match &r.data {
            RData::SRV(s) => assert_eq!((s.port, s.target.to_string().as_str()), (80, "web.default.svc.cluster.local.")),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(addrs_of(&srv.additionals), set(&[&ip]));
    // PTR of the ClusterIP.
    let o: Vec<&str> = ip.split('.').rev().collect();
    let ptr = udp(at, &format!("{}.in-addr.arpa.", o.join(".")), RecordType::PTR, false).await;
    assert!(matches!(&ptr.answers[0].data, RData::PTR(p) if p.0.to_string() == "web.default.svc.cluster.local."), "{ptr:?}");

    // NODATA versus NXDOMAIN, each with the zone's SOA.
    let nodata = udp(at, "web.default.svc.cluster.local.", RecordType::AAAA, false).await;
    assert_eq!((nodata.metadata.response_code, nodata.answers.len()), (ResponseCode::NoError, 0));
    assert!(matches!(nodata.authorities[0].data, RData::SOA(_)));
    let ent = udp(at, "default.svc.cluster.local.", RecordType::A, false).await;
    assert_eq!((ent.metadata.response_code, ent.answers.len()), (ResponseCode::NoError, 0), "empty non-terminal");
    let nx = udp(at, "missing.default.svc.cluster.local.", RecordType::A, false).await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(nx.authorities[0].data, RData::SOA(_)));
    let txt = udp(at, "dns-version.cluster.local.", RecordType::TXT, false).await;
    assert!(matches!(&txt.answers[0].data, RData::TXT(t) if t.to_string() == "1.1.0"), "{txt:?}");

    // A headless Service: the A set follows its endpoints.
    let db = svc(json!({"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}));
    services.create(&pp, &db).await.unwrap();
    slices.create(&pp, &slice("db-1", "db", &[("10.42.0.10", Some("db-0"), true), ("10.42.0.11", Some("db-1"), true)])).await.unwrap();
    until(at, "db.default.svc.cluster.local.", RecordType::A, 2, |m| addrs(m) == set(&["10.42.0.10", "10.42.0.11"])).await;
    let scale_up = slice("db-1", "db", &[("10.42.0.10", Some("db-0"), true), ("10.42.0.11", Some("db-1"), true), ("10.42.0.12", Some("db-2"), true)]);
    let ssa = PatchParams::apply("dns-test").force();
    slices.patch("db-1", &ssa, &Patch::Apply(&scale_up)).await.unwrap();
    until(at, "db.default.svc.cluster.local.", RecordType::A, 2, |m| addrs(m).len() == 3).await;
    let not_ready = slice("db-1", "db", &[("10.42.0.10", Some("db-0"), true), ("10.42.0.11", Some("db-1"), false), ("10.42.0.12", Some("db-2"), true)]);
    slices.patch("db-1", &ssa, &Patch::Apply(&not_ready)).await.unwrap();
    until(at, "db.default.svc.cluster.local.", RecordType::A, 2, |m| addrs(m) == set(&["10.42.0.10", "10.42.0.12"])).await;
    let host = udp(at, "db-2.db.default.svc.cluster.local.", RecordType::A, false).await;
    assert_eq!(addrs(&host), set(&["10.42.0.12"]));
    let srv = udp(at, "_pg._tcp.db.default.svc.cluster.local.", RecordType::SRV, true).await;
    let targets: BTreeSet<String> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(format!("{} {}", s.port, s.target)),
            _ => None,
        })
        .collect();
    assert_eq!(targets, set(&["5432 db-0.db.default.svc.cluster.local.", "5432 db-2.db.default.svc.cluster.local."]));

    // A large headless answer: truncated over UDP without EDNS, whole over TCP.
    let big = svc(json!({"metadata": {"name": "big"}, "spec": {"clusterIP": "None"}}));
    services.create(&pp, &big).await.unwrap();
    let many: Vec<(String, Option<&str>, bool)> = (0..60).map(|i| (format!("10.42.3.{i}"), None, true)).collect();
    let many: Vec<(&str, Option<&str>, bool)> = many.iter().map(|(a, h, r)| (a.as_str(), *h, *r)).collect();
    slices.create(&pp, &slice("big-1", "big", &many)).await.unwrap();
    until(at, "big.default.svc.cluster.local.", RecordType::A, 2, |m| m.answers.len() == 60).await;
    let cut = udp(at, "big.default.svc.cluster.local.", RecordType::A, false).await;
    assert!(cut.metadata.truncation && cut.answers.len() < 60, "60 A records do not fit in 512 bytes");
    let whole = tcp(at, "big.default.svc.cluster.local.", RecordType::A).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 60);

    // ExternalName: a CNAME, chased upstream.
    let ext = svc(json!({"metadata": {"name": "ext"}, "spec": {"type": "ExternalName", "externalName": "www.example"}}));
    services.create(&pp, &ext).await.unwrap();
    let m = {
        until(at, "ext.default.svc.cluster.local.", RecordType::A, 2, |m| !m.answers.is_empty()).await;
        udp(at, "ext.default.svc.cluster.local.", RecordType::A, false).await
    };
    assert!(matches!(&m.answers[0].data, RData::CNAME(c) if c.0.to_string() == "www.example."), "{m:?}");
    assert_eq!(addrs(&m), set(&["192.0.2.7"]));

    // Forwarding outside the zone.
    let fwd = udp(at, "www.example.", RecordType::A, false).await;
    assert_eq!(addrs(&fwd), set(&["192.0.2.7"]));
    assert!(!fwd.metadata.authoritative);
    assert_eq!(udp(at, "nothing.example.", RecordType::A, false).await.metadata.response_code, ResponseCode::NXDomain);

    // A deleted Service disappears.
    services.delete("web", &DeleteParams::default()).await.unwrap();
    until(at, "web.default.svc.cluster.local.", RecordType::A, 2, |m| m.metadata.response_code == ResponseCode::NXDomain).await;

    let (code, body) = dns.http("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains(r#"riptide_dns_requests_total{qtype="SRV",rcode="NOERROR"}"#), "{body}");
    assert!(body.contains("riptide_dns_services 4") || body.contains("riptide_dns_services 5"), "{body}");
    drop(dns);
    api.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_is_a_fast_servfail_and_the_zone_still_answers() {
    let api = cp::TestServer::start(cp::Backend::Embedded).await;
    let (_quiet, quiet) = upstream::silent("127.0.0.1").await;
    let dns = Dns::start(&api.kubeconfig(), &[quiet], &["--upstream-timeout", "1000"]);
    dns.wait_ready().await;
    let t = Instant::now();
    let m = udp(dns.addr, "www.example.", RecordType::A, false).await;
    let took = t.elapsed();
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(1500), "took {took:?}");
    // The zone does not wait for upstreams.
    let t = Instant::now();
    let m = udp(dns.addr, "dns-version.cluster.local.", RecordType::TXT, false).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(t.elapsed() < Duration::from_millis(100));
    drop(dns);
    api.shutdown().await;
}
