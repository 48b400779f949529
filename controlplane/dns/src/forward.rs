//! Forwarding of names outside the cluster zone to upstream resolvers, with
//! a small cache that honours the answers' TTLs (RFC 2308 for negative
//! ones).
//!
//! One question goes to the upstreams in order, each with its share of one
//! total budget (default 2 s), so a dead upstream costs its share and all
//! dead costs the budget, never more: the caller answers SERVFAIL then. UDP
//! first from a fresh socket (random source port and ID), TCP when the
//! answer comes back truncated. Messages are built and parsed with
//! hickory-proto.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Query, ResponseCode},
    rr::{DNSClass, LowerName, Name, RData, Record, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use crate::metrics::Metrics;

/// EDNS payload size offered upstream (the DNS Flag Day 2020 value).
const UPSTREAM_PAYLOAD: u16 = 1232;
/// Cached answers are kept at most this long, whatever their TTL.
const MAX_CACHE_TTL: u32 = 3600;
/// Negative answers without an SOA are cached this long.
const NEGATIVE_TTL_WITHOUT_SOA: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream {upstream}: malformed answer: {source}")]
    Malformed {
        upstream: SocketAddr,
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("upstream {upstream} answered {rcode}")]
    Failed { upstream: SocketAddr, rcode: ResponseCode },
    #[error("encoding the upstream query: {0}")]
    Encode(#[source] hickory_proto::ProtoError),
    #[error("reading {path}: {source}")]
    ResolvConf {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// An upstream's answer, as relayed to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Forwarded {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

struct Cached {
    answer: Arc<Forwarded>,
    stored: Instant,
    ttl: u32,
}

pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    budget: Duration,
    cache: Mutex<HashMap<(LowerName, RecordType), Cached>>,
    capacity: usize,
    metrics: Metrics,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, budget: Duration, capacity: usize, metrics: Metrics) -> Self {
        Self { upstreams, budget, cache: Mutex::new(HashMap::new()), capacity, metrics }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Resolves `name`/`qtype` (class IN) from the cache or the upstreams.
    pub async fn resolve(&self, name: &Name, qtype: RecordType) -> Result<Forwarded, ForwardError> {
        let key = (LowerName::new(name), qtype);
        if let Some(hit) = self.cached(&key) {
            self.metrics.cache_hits.inc();
            return Ok(hit);
        }
        self.metrics.cache_misses.inc();
        let answer = self.query(name, qtype).await.inspect_err(|_| {
            self.metrics.upstream_failures.inc();
        })?;
        if let Some(ttl) = cache_ttl(&answer) {
            self.store(key, answer.clone(), ttl);
        }
        Ok(answer)
    }

    fn cached(&self, key: &(LowerName, RecordType)) -> Option<Forwarded> {
        let cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = cache.get(key)?;
        let age = u32::try_from(c.stored.elapsed().as_secs()).unwrap_or(u32::MAX);
        if age >= c.ttl {
            return None;
        }
        let mut a = (*c.answer).clone();
        for r in a.answers.iter_mut().chain(&mut a.authorities).chain(&mut a.additionals) {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(a)
    }

    fn store(&self, key: (LowerName, RecordType), answer: Forwarded, ttl: u32) {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= self.capacity {
            cache.retain(|_, c| c.stored.elapsed().as_secs() < u64::from(c.ttl));
        }
        if cache.len() >= self.capacity {
            // Still full of live entries: drop an arbitrary one (HashMap
            // order), which is as good as any for a small forwarding cache.
            if let Some(k) = cache.keys().next().cloned() {
                cache.remove(&k);
            }
        }
        cache.insert(key, Cached { answer: Arc::new(answer), stored: Instant::now(), ttl });
        self.metrics.cache_entries.set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
    }

    async fn query(&self, name: &Name, qtype: RecordType) -> Result<Forwarded, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let deadline = tokio::time::Instant::now() + self.budget;
        let share = self.budget / u32::try_from(self.upstreams.len()).unwrap_or(u32::MAX);
        let mut last = ForwardError::Timeout(self.budget);
        for (i, up) in self.upstreams.iter().enumerate() {
            // The last upstream gets whatever is left.
            let until = if i + 1 == self.upstreams.len() { deadline } else { (tokio::time::Instant::now() + share).min(deadline) };
            match tokio::time::timeout_at(until, exchange(*up, name, qtype)).await {
                Ok(Ok(m)) if matches!(m.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => {
                    return Ok(Forwarded {
                        rcode: m.metadata.response_code,
                        answers: m.answers,
                        authorities: m.authorities,
                        additionals: m.additionals,
                    });
                }
                Ok(Ok(m)) => last = ForwardError::Failed { upstream: *up, rcode: m.metadata.response_code },
                Ok(Err(e)) => last = e,
                Err(_) => last = ForwardError::Timeout(self.budget),
            }
            tracing::debug!(upstream = %up, %name, %qtype, error = %last, "upstream failed");
        }
        Err(last)
    }
}

/// How long an answer may be cached: the smallest TTL of its answers, or
/// for a negative answer the SOA's TTL capped by its MINIMUM (RFC 2308 §5).
fn cache_ttl(a: &Forwarded) -> Option<u32> {
    let ttl = if a.answers.is_empty() {
        a.authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .unwrap_or(NEGATIVE_TTL_WITHOUT_SOA)
    } else {
        a.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
    };
    (ttl > 0).then_some(ttl.min(MAX_CACHE_TTL))
}

/// One question to one upstream: UDP, then TCP if truncated.
async fn exchange(upstream: SocketAddr, name: &Name, qtype: RecordType) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { upstream, source };
    // A random ID (hickory's generator).
    let mut q = Message::query();
    let id = q.metadata.id;
    q.metadata.recursion_desired = true;
    let mut query = Query::query(name.clone(), qtype);
    query.set_query_class(DNSClass::IN);
    q.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_PAYLOAD);
    q.set_edns(edns);
    let bytes = q.to_vec().map_err(ForwardError::Encode)?;

    let local: SocketAddr = match upstream.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel drops datagrams from anyone else, and an ICMP
    // port unreachable fails the receive at once (a dead upstream on a
    // live host costs nothing).
    sock.connect(upstream).await.map_err(io)?;
    sock.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(UPSTREAM_PAYLOAD).max(4096)];
    let reply = loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        let Ok(m) = Message::from_vec(&buf[..n]) else { continue };
        // Anything but the answer to this question is ignored (spoofing).
        if m.metadata.id == id && m.metadata.message_type == MessageType::Response && m.queries.first() == Some(&query) {
            break m;
        }
    };
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    let mut tcp = TcpStream::connect(upstream).await.map_err(io)?;
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&bytes);
    tcp.write_all(&framed).await.map_err(io)?;
    let n = tcp.read_u16().await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(n)];
    tcp.read_exact(&mut buf).await.map_err(io)?;
    Message::from_vec(&buf).map_err(|e| ForwardError::Malformed { upstream, source: e.into() })
}

/// Upstreams from a resolv.conf: its `nameserver` lines on port 53, minus
/// `own` (this server's listen address, so it never forwards to itself;
/// with an unspecified listen address, every loopback address on its port).
pub fn from_resolv_conf(path: &Path, own: SocketAddr) -> Result<Vec<SocketAddr>, ForwardError> {
    let text = std::fs::read_to_string(path).map_err(|source| ForwardError::ResolvConf { path: path.display().to_string(), source })?;
    Ok(parse_resolv_conf(&text, own))
}

fn parse_resolv_conf(text: &str, own: SocketAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next())?
        })
        // A scoped IPv6 address (fe80::1%eth0) is kept out: SocketAddr
        // cannot carry the scope by name.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| *a != own && !(own.ip().is_unspecified() && a.ip().is_loopback() && a.port() == own.port()))
        .collect()
}

/// `IP` or `IP:PORT` (`[v6]:PORT`), port 53 by default.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)).map_err(|_| format!("{s:?} is not IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::rdata::{A, SOA};

    use super::*;

    #[test]
    fn resolv_conf_nameservers_without_this_server() {
        let text = "# generated\nsearch x.svc.cluster.local\nnameserver 10.43.0.10\nnameserver 192.0.2.1\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions ndots:5\n";
        let own: SocketAddr = "10.43.0.10:53".parse().unwrap();
        assert_eq!(parse_resolv_conf(text, own), ["192.0.2.1:53".parse().unwrap(), "127.0.0.53:53".parse::<SocketAddr>().unwrap()]);
        let any: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert_eq!(parse_resolv_conf(text, any).len(), 2, "127.0.0.53:53 would be this server");
    }

    #[test]
    fn upstream_flag_forms() {
        assert_eq!(parse_upstream("192.0.2.1").unwrap(), "192.0.2.1:53".parse().unwrap());
        assert_eq!(parse_upstream("127.0.0.9:5353").unwrap(), "127.0.0.9:5353".parse().unwrap());
        assert_eq!(parse_upstream("[::1]:54").unwrap(), "[::1]:54".parse().unwrap());
        assert_eq!(parse_upstream("2001:db8::1").unwrap(), "[2001:db8::1]:53".parse().unwrap());
        assert!(parse_upstream("dns.example").is_err());
    }

    #[test]
    fn cache_ttls_positive_negative_and_zero() {
        let name = Name::from_ascii("example.com.").unwrap();
        let a = |ttl| Record::from_rdata(name.clone(), ttl, RData::A(A::new(192, 0, 2, 1)));
        let pos = Forwarded { rcode: ResponseCode::NoError, answers: vec![a(300), a(60)], authorities: vec![], additionals: vec![] };
        assert_eq!(cache_ttl(&pos), Some(60));
        let soa = Record::from_rdata(name.clone(), 900, RData::SOA(SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, 30)));
        let neg = Forwarded { rcode: ResponseCode::NXDomain, answers: vec![], authorities: vec![soa], additionals: vec![] };
        assert_eq!(cache_ttl(&neg), Some(30));
        let zero = Forwarded { answers: vec![a(0)], ..pos.clone() };
        assert_eq!(cache_ttl(&zero), None, "TTL 0 is not cached");
        let long = Forwarded { answers: vec![a(86400)], ..pos };
        assert_eq!(cache_ttl(&long), Some(MAX_CACHE_TTL));
    }
}
