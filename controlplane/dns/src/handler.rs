//! What every query is answered with: questions about the cluster zone
//! (and reverse names of addresses the index owns) from the index,
//! everything else from the upstream resolvers.
//!
//! [`Handler::decide`] answers without waiting whatever the index (or the
//! request alone) answers; [`Handler::resolve`] finishes the rest, which
//! waits on upstreams. The UDP path ([`crate::udp`]) calls the two itself,
//! so an index answer costs no task; TCP goes through hickory-server, which
//! calls the [`RequestHandler`] impl.
//!
//! hickory-proto and hickory-server do the wire work: decoding, and on
//! encoding the UDP size limit (512 bytes, or the EDNS payload size the
//! response offers) with the TC bit on answers that do not fit. The
//! response's EDNS is set the way hickory's own catalog does (the client's
//! payload size, at least 512; BADVERS for EDNS versions above 0).

use std::{
    iter,
    sync::{Arc, RwLock},
    time::Instant,
};

use hickory_server::{
    net::runtime::Time,
    proto::{
        op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode},
        rr::{DNSClass, LowerName, Name, Record, RecordType},
        serialize::binary::BinEncoder,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder},
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

/// A response's content, owned, for any transport to encode.
#[derive(Debug)]
pub struct Response {
    rcode: ResponseCode,
    authoritative: bool,
    edns: Option<Edns>,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

/// What a request gets, decided without waiting.
#[derive(Debug)]
pub enum Decision {
    /// Answered from the index or from the request alone: the same request
    /// gets the same response while the index's serial stays `serial`.
    Now { response: Response, serial: u32 },
    /// Waits on upstream resolvers: [`Handler::resolve`].
    Later(Box<Pending>),
}

/// A question that needs upstream resolvers.
#[derive(Debug)]
pub struct Pending {
    edns: Option<Edns>,
    qtype: RecordType,
    kind: PendingKind,
}

#[derive(Debug)]
enum PendingKind {
    /// An ExternalName's CNAME and its target.
    Chase { cname: Box<Record>, target: Name },
    /// A name outside the zone.
    Forward { qname: Name },
}

impl Response {
    fn error(rcode: ResponseCode, edns: Option<Edns>) -> Self {
        Self { rcode, authoritative: false, edns, answers: Vec::new(), authorities: Vec::new(), additionals: Vec::new() }
    }

    fn authoritative(rcode: ResponseCode, edns: Option<Edns>, answers: Vec<Record>, authorities: Vec<Record>, additionals: Vec<Record>) -> Self {
        Self { rcode, authoritative: true, edns, answers, authorities, additionals }
    }

    pub fn rcode(&self) -> ResponseCode {
        self.rcode
    }

    /// The response to `request` as hickory-server encodes it.
    fn message<'a>(
        &'a self,
        request: &'a Request,
    ) -> MessageResponse<
        'a,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    > {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = self.authoritative;
        // Everything outside the zone is forwarded: recursion is available.
        metadata.recursion_available = true;
        metadata.response_code = self.rcode;
        MessageResponseBuilder::new(&request.queries, self.edns.as_ref()).build(
            metadata,
            self.answers.iter(),
            self.authorities.iter(),
            iter::empty(),
            self.additionals.iter(),
        )
    }

    /// The UDP datagram answering `request`, into `out`: at most 512
    /// bytes, or the EDNS payload size the response offers, with the TC
    /// bit on an answer cut short.
    pub fn encode_udp(&self, request: &Request, out: &mut Vec<u8>) {
        let max = self.edns.as_ref().map_or(512, Edns::max_payload);
        encode_udp(self.message(request), request.metadata.id, max, out);
    }
}

/// Encodes `message` within `max` bytes into `out`; a message that cannot
/// be encoded becomes a bare SERVFAIL, as hickory-server does.
pub fn encode_udp<'a>(
    message: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    id: u16,
    max: u16,
    out: &mut Vec<u8>,
) {
    out.clear();
    let mut enc = BinEncoder::new(out);
    enc.set_max_size(max);
    if let Err(e) = message.destructive_emit(&mut enc) {
        tracing::warn!(error = %e, "encoding a response failed: SERVFAIL");
        out.clear();
        let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
        metadata.response_code = ResponseCode::ServFail;
        let header = Header { metadata, counts: HeaderCounts::default() };
        let mut enc = BinEncoder::new(out);
        // A bare 12-byte header always fits.
        let _ = hickory_server::proto::serialize::binary::BinEncodable::emit(&header, &mut enc);
    }
}

impl Handler {
    pub fn new(index: Arc<RwLock<Index>>, zone: Zone, forwarder: Forwarder, metrics: Metrics) -> Self {
        Self { index, zone, forwarder, metrics }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn lookup(&self, qname: &Name, lower: &LowerName, qtype: RecordType) -> (Answer, u32) {
        let ix = self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.zone.lookup(&ix, qname, lower, qtype), ix.serial())
    }

    /// The index's serial: answers decided now stay right while it holds.
    pub fn serial(&self) -> u32 {
        self.index.read().unwrap_or_else(std::sync::PoisonError::into_inner).serial()
    }

    /// Answers `request` if that needs no upstream.
    pub fn decide(&self, request: &Request) -> Decision {
        let edns = match &request.edns {
            Some(req) => {
                let mut e = Edns::new();
                e.set_max_payload(req.max_payload().max(512));
                e.set_version(0);
                if req.version() > 0 {
                    return self.now(Response::error(ResponseCode::BADVERS, Some(e)));
                }
                Some(e)
            }
            None => None,
        };
        if request.metadata.op_code != OpCode::Query {
            return self.now(Response::error(ResponseCode::NotImp, edns));
        }
        let [q] = request.queries.queries() else {
            return self.now(Response::error(ResponseCode::FormErr, edns));
        };
        let (qname, lower, qtype) = (q.original().name(), q.name(), q.query_type());
        if q.query_class() != DNSClass::IN || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return self.now(Response::error(ResponseCode::Refused, edns));
        }

        let (answer, serial) = self.lookup(qname, lower, qtype);
        let soa = || vec![self.zone.soa(serial)];
        let response = match answer {
            Answer::Records { answers, additionals } => {
                Response::authoritative(ResponseCode::NoError, edns, answers, Vec::new(), additionals)
            }
            Answer::NoData => Response::authoritative(ResponseCode::NoError, edns, Vec::new(), soa(), Vec::new()),
            Answer::NxDomain => Response::authoritative(ResponseCode::NXDomain, edns, Vec::new(), soa(), Vec::new()),
            Answer::Alias { cname, target } => return Decision::Later(Box::new(Pending { edns, qtype, kind: PendingKind::Chase { cname: Box::new(cname), target } })),
            Answer::NotOurs => return Decision::Later(Box::new(Pending { edns, qtype, kind: PendingKind::Forward { qname: qname.clone() } })),
        };
        Decision::Now { response, serial }
    }

    fn now(&self, response: Response) -> Decision {
        Decision::Now { response, serial: self.serial() }
    }

    /// Answers what [`Self::decide`] left to upstreams.
    pub async fn resolve(&self, pending: Box<Pending>) -> Response {
        let Pending { edns, qtype, kind } = *pending;
        match kind {
            PendingKind::Chase { cname, target } => {
                let answers = self.chase(*cname, target, qtype).await;
                Response::authoritative(ResponseCode::NoError, edns, answers, Vec::new(), Vec::new())
            }
            PendingKind::Forward { qname } => match self.forwarder.resolve(&qname, qtype).await {
                Ok(f) => Response {
                    rcode: f.rcode,
                    authoritative: false,
                    edns,
                    answers: f.answers,
                    authorities: f.authorities,
                    additionals: f.additionals,
                },
                Err(e) => {
                    tracing::debug!(name = %qname, %qtype, error = %e, "forwarding failed");
                    Response::error(ResponseCode::ServFail, edns)
                }
            },
        }
    }

    /// [`Self::decide`], then [`Self::resolve`] if needed.
    pub async fn respond(&self, request: &Request) -> Response {
        match self.decide(request) {
            Decision::Now { response, .. } => response,
            Decision::Later(pending) => self.resolve(pending).await,
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

    /// Counts a request and its latency.
    pub fn observe(&self, request: &Request, rcode: ResponseCode, start: Instant) {
        self.metrics.observe(qtype(request), rcode, start.elapsed());
    }
}

/// The type a request asks for, as metrics label it.
pub fn qtype(request: &Request) -> RecordType {
    request.queries.queries().first().map_or(RecordType::ZERO, |q| q.query_type())
}

/// The handler as hickory-server's [`RequestHandler`]: TCP.
pub struct Tcp(pub Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Tcp {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut rh: R) -> ResponseInfo {
        let start = Instant::now();
        let response = self.0.respond(request).await;
        let info = match rh.send_response(response.message(request)).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(src = %request.src(), error = %e, "sending a response failed");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
            }
        };
        self.0.observe(request, info.response_code, start);
        info
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod tests;
