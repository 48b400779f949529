//! A tiny upstream resolver for tests, on a loopback UDP socket: A records
//! for the names it is given, NXDOMAIN with an SOA for the rest; it counts
//! the questions it gets. Built on hickory-proto like the server.
//! (Shared by the unit tests, through `#[path]`, and the integration test.)
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, Record, rdata::SOA},
};
use tokio::{net::UdpSocket, task::JoinHandle};

pub struct Upstream {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Serves `records` (name, address, TTL) on `ip`, a random port.
    pub async fn start(ip: &str, records: &[(&str, Ipv4Addr, u32)]) -> Self {
        let sock = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let records: Vec<(Name, Ipv4Addr, u32)> = records.iter().map(|(n, a, t)| (Name::from_ascii(n).unwrap(), *a, *t)).collect();
        let queries = Arc::new(AtomicUsize::new(0));
        let count = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
                r.metadata.recursion_desired = q.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                let qname = q.queries[0].name().clone();
                let hits: Vec<Record> = records
                    .iter()
                    .filter(|(n, _, _)| *n == qname)
                    .map(|(n, a, t)| Record::from_rdata(n.clone(), *t, RData::A((*a).into())))
                    .collect();
                if hits.is_empty() {
                    r.metadata.response_code = ResponseCode::NXDomain;
                    let zone = Name::from_ascii("example.").unwrap();
                    r.add_authority(Record::from_rdata(zone.clone(), 60, RData::SOA(SOA::new(zone.clone(), zone, 1, 1, 1, 1, 60))));
                } else {
                    r.add_answers(hits);
                }
                let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        Self { addr, queries, task }
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A bound UDP socket that never answers: an upstream that is down
/// without telling (no ICMP port unreachable).
pub async fn silent(ip: &str) -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind((ip, 0)).await.unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}
