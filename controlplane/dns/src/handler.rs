//! The request handler hickory-server calls for every query: questions
//! about the cluster zone (and reverse names of addresses the index owns)
//! are answered from the index, everything else is forwarded.
//!
//! hickory-server does the wire work around it: decoding, FORMERR for
//! undecodable messages, dropping responses, and on encoding the UDP size
//! limit (512 bytes, or the EDNS payload size the response offers) with the
//! TC bit on answers that do not fit. This handler sets the response's EDNS
//! the way hickory's own catalog does (the client's payload size, at least
//! 512; BADVERS for EDNS versions above 0).

use std::{
    iter,
    sync::{Arc, RwLock},
    time::Instant,
};

use hickory_server::{
    net::runtime::Time,
    proto::{
        op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode},
        rr::{DNSClass, LowerName, Name, Record, RecordType},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

use crate::{
    forward::Forwarder,
    index::Index,
    metrics::Metrics,
    records::{Answer, Zone},
};

/// CNAME hops followed inside the zone (ExternalName → ExternalName …).
const MAX_CHASE: usize = 8;

pub struct Handler {
    index: Arc<RwLock<Index>>,
    zone: Zone,
    forwarder: Forwarder,
    metrics: Metrics,
}

/// A response's sections, borrowed by the encoder.
struct Sections<'a> {
    rcode: ResponseCode,
    authoritative: bool,
    answers: &'a [Record],
    authorities: &'a [Record],
    additionals: &'a [Record],
}

impl<'a> Sections<'a> {
    fn error(rcode: ResponseCode) -> Self {
        Self { rcode, authoritative: false, answers: &[], authorities: &[], additionals: &[] }
    }

    fn authoritative(rcode: ResponseCode, answers: &'a [Record], authorities: &'a [Record], additionals: &'a [Record]) -> Self {
        Self { rcode, authoritative: true, answers, authorities, additionals }
    }
}

impl Handler {
    pub fn new(index: Arc<RwLock<Index>>, zone: Zone, forwarder: Forwarder, metrics: Metrics) -> Self {
        Self { index, zone, forwarder, metrics }
    }

    fn lookup(&self, qname: &Name, lower: &LowerName, qtype: RecordType) -> (Answer, u32) {
        let ix = self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.zone.lookup(&ix, qname, lower, qtype), ix.serial())
    }

    async fn respond<R: ResponseHandler>(&self, request: &Request, rh: R) -> ResponseInfo {
        let resp_edns;
        let edns = match &request.edns {
            Some(req) => {
                let mut e = Edns::new();
                e.set_max_payload(req.max_payload().max(512));
                e.set_version(0);
                resp_edns = e;
                if req.version() > 0 {
                    return send(request, rh, Some(&resp_edns), Sections::error(ResponseCode::BADVERS)).await;
                }
                Some(&resp_edns)
            }
            None => None,
        };
        if request.metadata.op_code != OpCode::Query {
            return send(request, rh, edns, Sections::error(ResponseCode::NotImp)).await;
        }
        let [q] = request.queries.queries() else {
            return send(request, rh, edns, Sections::error(ResponseCode::FormErr)).await;
        };
        let (qname, lower, qtype) = (q.original().name(), q.name(), q.query_type());
        if q.query_class() != DNSClass::IN || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return send(request, rh, edns, Sections::error(ResponseCode::Refused)).await;
        }

        let (answer, serial) = self.lookup(qname, lower, qtype);
        let soa = [self.zone.soa(serial)];
        match answer {
            Answer::Records { answers, additionals } => {
                send(request, rh, edns, Sections::authoritative(ResponseCode::NoError, &answers, &[], &additionals)).await
            }
            Answer::NoData => send(request, rh, edns, Sections::authoritative(ResponseCode::NoError, &[], &soa, &[])).await,
            Answer::NxDomain => send(request, rh, edns, Sections::authoritative(ResponseCode::NXDomain, &[], &soa, &[])).await,
            Answer::Alias { cname, target } => {
                let answers = self.chase(cname, target, qtype).await;
                send(request, rh, edns, Sections::authoritative(ResponseCode::NoError, &answers, &[], &[])).await
            }
            Answer::NotOurs => match self.forwarder.resolve(qname, qtype).await {
                Ok(f) => {
                    let s = Sections {
                        rcode: f.rcode,
                        authoritative: false,
                        answers: &f.answers,
                        authorities: &f.authorities,
                        additionals: &f.additionals,
                    };
                    send(request, rh, edns, s).await
                }
                Err(e) => {
                    tracing::debug!(name = %qname, %qtype, error = %e, "forwarding failed");
                    send(request, rh, edns, Sections::error(ResponseCode::ServFail)).await
                }
            },
        }
    }

    /// An ExternalName's CNAME followed by the target's records of `qtype`
    /// (2.5's answer example): from the index while the chain stays in the
    /// zone, then from upstream. A target that cannot be resolved leaves
    /// just the CNAME chain, for the client to follow.
    async fn chase(&self, cname: Record, mut target: Name, qtype: RecordType) -> Vec<Record> {
        let mut answers = vec![cname];
        for _ in 0..MAX_CHASE {
            let lower = LowerName::new(&target);
            if !self.zone.contains(&lower) {
                if let Ok(f) = self.forwarder.resolve(&target, qtype).await
                    && f.rcode == ResponseCode::NoError
                {
                    answers.extend(f.answers);
                }
                break;
            }
            match self.lookup(&target, &lower, qtype).0 {
                Answer::Records { answers: more, .. } => {
                    answers.extend(more);
                    break;
                }
                Answer::Alias { cname, target: next } => {
                    answers.push(cname);
                    target = next;
                }
                _ => break,
            }
        }
        answers
    }
}

async fn send<R: ResponseHandler>(request: &Request, mut rh: R, edns: Option<&Edns>, s: Sections<'_>) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = s.authoritative;
    // Everything outside the zone is forwarded: recursion is available.
    metadata.recursion_available = true;
    metadata.response_code = s.rcode;
    let response = MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        s.answers.iter(),
        s.authorities.iter(),
        iter::empty(),
        s.additionals.iter(),
    );
    match rh.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(src = %request.src(), error = %e, "sending a response failed");
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        let start = Instant::now();
        let info = self.respond(request, response_handle).await;
        let qtype = request.queries.queries().first().map_or(RecordType::ZERO, |q| q.query_type());
        self.metrics.observe(qtype, info.response_code, start.elapsed());
        info
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
