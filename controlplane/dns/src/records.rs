//! Record building: what a question about the cluster zone (or a reverse
//! name the index owns) is answered with, per the Kubernetes DNS-Based
//! Service Discovery specification 1.1.0 (kubernetes/dns
//! `docs/specification.md`). Pure: an [`Index`] and a question in, an
//! [`Answer`] out.
//!
//! Names under the zone, right to left:
//! - `<zone>`: SOA; `dns-version.<zone>`: TXT (2.2).
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of the ClusterIPs (2.3.1), of the
//!   published endpoints of a headless Service (2.4.1; none → NXDOMAIN), or
//!   a CNAME for an ExternalName Service (2.5).
//! - `<host>.<svc>.<ns>.svc.<zone>`: A/AAAA of the headless endpoints with
//!   that hostname (2.4.1); endpoints without one are named after their
//!   address (`10-42-0-7`), the spec's "system-assigned identifier".
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV (2.3.2, 2.4.2), targets'
//!   addresses in the additional section.
//! - `<a-b-c-d>.<ns>.pod.<zone>`: A (2.6, deprecated but required).
//! - `svc.<zone>`, `pod.<zone>`, `<ns>.svc.<zone>`, `_<proto>.<svc>…`:
//!   empty non-terminals, NODATA while something exists below them.
//!
//! A name that exists without data of the asked type is NODATA (NOERROR,
//! no answer); a name that does not exist is NXDOMAIN; both carry the
//! zone's SOA (RFC 2308).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::{
    LowerName, Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
};

use crate::index::{Index, Proto, ServiceEntry, ServiceKind};

/// The schema version the `dns-version` TXT record announces.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// SRV priority and weight: the spec's examples (`SRV 10 100 …`); it
/// prescribes no values.
const SRV_PRIORITY: u16 = 10;
const SRV_WEIGHT: u16 = 100;

/// How `a-b-c-d.<ns>.pod.<zone>` is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodRecords {
    /// Any well-formed address in any namespace, as the spec requires.
    Insecure,
    /// No pod records (NXDOMAIN).
    Disabled,
}

/// The cluster zone and the answering policy.
#[derive(Clone, Debug)]
pub struct Zone {
    name: Name,
    lower: LowerName,
    labels: usize,
    ttl: u32,
    pods: PodRecords,
}

/// How a question is answered (short-lived: built and sent per query).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// NOERROR with data (`additionals` may be empty).
    Records { answers: Vec<Record>, additionals: Vec<Record> },
    /// An ExternalName: this CNAME, and the target still to resolve for
    /// the asked type.
    Alias { cname: Record, target: Name },
    /// The name exists, nothing of the asked type: NOERROR + SOA.
    NoData,
    /// The name does not exist: NXDOMAIN + SOA.
    NxDomain,
    /// Not the index's to answer (a reverse name it does not own): forward.
    NotOurs,
}

impl Answer {
    fn records(answers: Vec<Record>) -> Self {
        if answers.is_empty() { Self::NoData } else { Self::Records { answers, additionals: Vec::new() } }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid cluster domain {domain:?}")]
pub struct InvalidZone {
    pub domain: String,
    #[source]
    pub source: hickory_proto::ProtoError,
}

impl Zone {
    pub fn new(domain: &str, ttl: u32, pods: PodRecords) -> Result<Self, InvalidZone> {
        let mut name = Name::from_ascii(domain).map_err(|source| InvalidZone { domain: domain.to_owned(), source })?;
        name.set_fqdn(true);
        let name = name.to_lowercase();
        let lower = LowerName::new(&name);
        Ok(Self { labels: name.iter().count(), name, lower, ttl, pods })
    }

    pub fn name(&self) -> &Name {
        &self.name
    }

    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// Whether `qname` is the zone or below it.
    pub fn contains(&self, qname: &LowerName) -> bool {
        self.lower.zone_of(qname)
    }

    /// The zone's SOA, for the authority section of negative answers.
    pub fn soa(&self, serial: u32) -> Record {
        let mname = Name::from_labels([&b"ns"[..], b"dns"]).and_then(|n| n.append_domain(&self.name));
        let rname = Name::from_labels([&b"hostmaster"[..]]).and_then(|n| n.append_domain(&self.name));
        let (mname, rname) = match (mname, rname) {
            (Ok(m), Ok(r)) => (m, r),
            // Only when the zone is within 15 bytes of the 255-byte limit.
            _ => (self.name.clone(), self.name.clone()),
        };
        Record::from_rdata(self.name.clone(), self.ttl, RData::SOA(SOA::new(mname, rname, serial, 7200, 1800, 86400, self.ttl)))
    }

    /// Answers `qname`/`qtype`. `qname` is the question's name as asked
    /// (its case is kept in the answers); `lower` its lowercase form.
    pub fn lookup(&self, index: &Index, qname: &Name, lower: &LowerName, qtype: RecordType) -> Answer {
        if !self.contains(lower) {
            return match reverse_addr(lower) {
                Some(addr) => self.ptr(index, qname, addr, qtype),
                None => Answer::NotOurs,
            };
        }
        // Labels below the zone, leftmost first (`num_labels` would not
        // count a `*`).
        let all: Vec<&[u8]> = lower.iter().collect();
        let n = all.len().saturating_sub(self.labels);
        let rel = &all[..n];
        let mut r = rel.iter().rev().copied();
        let l = |i: usize| rel[n - 1 - i];
        match (r.next(), n) {
            (None, _) => match qtype {
                RecordType::SOA | RecordType::ANY => {
                    let mut soa = self.soa(index.serial());
                    soa.name = qname.clone();
                    Answer::records(vec![soa])
                }
                _ => Answer::NoData,
            },
            (Some(b"dns-version"), 1) => match qtype {
                RecordType::TXT | RecordType::ANY => {
                    Answer::records(vec![self.record(qname, RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_owned()])))])
                }
                _ => Answer::NoData,
            },
            (Some(b"svc"), 1) | (Some(b"pod"), 1) => Answer::NoData,
            (Some(b"svc"), 2) => match utf8(l(1)) {
                Some(ns) if index.has_namespace(ns) => Answer::NoData,
                _ => Answer::NxDomain,
            },
            (Some(b"svc"), 3..=5) => {
                let (Some(ns), Some(svc)) = (utf8(l(1)), utf8(l(2))) else { return Answer::NxDomain };
                match index.service(ns, svc) {
                    Some(e) if e.spec().is_some() => self.service(e, qname, &rel[..n - 3], qtype, (ns, svc)),
                    _ => Answer::NxDomain,
                }
            }
            (Some(b"pod"), 2) => match self.pods {
                PodRecords::Insecure => Answer::NoData,
                PodRecords::Disabled => Answer::NxDomain,
            },
            (Some(b"pod"), 3) => match (self.pods, dashed_addr(l(2))) {
                (PodRecords::Insecure, Some(addr)) => Answer::records(self.addr_records(qname, [addr], qtype)),
                _ => Answer::NxDomain,
            },
            _ => Answer::NxDomain,
        }
    }

    /// Names at and below `<svc>.<ns>.svc.<zone>`; `below` are the labels
    /// left of the Service name, leftmost first.
    fn service(&self, e: &ServiceEntry, qname: &Name, below: &[&[u8]], qtype: RecordType, (ns, svc): (&str, &str)) -> Answer {
        let Some(spec) = e.spec() else { return Answer::NxDomain };
        let headless = spec.kind == ServiceKind::Headless;
        match below {
            [] => match &spec.kind {
                ServiceKind::ClusterIp(ips) => Answer::records(self.addr_records(qname, ips.iter().copied(), qtype)),
                ServiceKind::Headless => {
                    let eps = e.published();
                    // 2.4.1: no ready endpoints → NXDOMAIN.
                    if eps.is_empty() {
                        return Answer::NxDomain;
                    }
                    Answer::records(self.addr_records(qname, eps.iter().map(|(ep, _)| ep.addr), qtype))
                }
                ServiceKind::ExternalName(target) => {
                    let cname = self.record(qname, RData::CNAME(CNAME(target.clone())));
                    if matches!(qtype, RecordType::CNAME | RecordType::ANY) {
                        Answer::records(vec![cname])
                    } else {
                        Answer::Alias { cname, target: target.clone() }
                    }
                }
            },
            // `_<proto>.<svc>…`: an empty non-terminal while a named port of
            // that protocol exists.
            [p] if p.first() == Some(&b'_') => {
                let Some(proto) = Proto::from_label(&p[1..]) else { return Answer::NxDomain };
                let exists = if headless {
                    e.published().iter().any(|(_, ports)| ports.iter().any(|x| x.proto == proto))
                } else {
                    spec.ports.iter().any(|x| x.proto == proto)
                };
                if exists { Answer::NoData } else { Answer::NxDomain }
            }
            [host] if headless => {
                let addrs: Vec<IpAddr> = e.published().iter().filter(|(ep, _)| endpoint_named(ep, host)).map(|(ep, _)| ep.addr).collect();
                if addrs.is_empty() {
                    return Answer::NxDomain;
                }
                Answer::records(self.addr_records(qname, addrs, qtype))
            }
            [port, p] if port.first() == Some(&b'_') && p.first() == Some(&b'_') => {
                let (Some(proto), Some(port)) = (Proto::from_label(&p[1..]), utf8(&port[1..])) else { return Answer::NxDomain };
                self.srv(e, qname, port, proto, qtype, (ns, svc))
            }
            _ => Answer::NxDomain,
        }
    }

    fn srv(&self, e: &ServiceEntry, qname: &Name, port: &str, proto: Proto, qtype: RecordType, (ns, svc): (&str, &str)) -> Answer {
        let Some(spec) = e.spec() else { return Answer::NxDomain };
        let Ok(svc_name) = self.service_name(ns, svc) else { return Answer::NxDomain };
        let wants = matches!(qtype, RecordType::SRV | RecordType::ANY);
        let srv = |port: u16, target: Name| self.record(qname, RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target)));
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match &spec.kind {
            ServiceKind::Headless => {
                for (ep, ports) in e.published() {
                    let Some(p) = ports.iter().find(|x| x.proto == proto && x.name.eq_ignore_ascii_case(port)) else { continue };
                    let host = ep.hostname.as_deref().map_or_else(|| dashed(ep.addr), str::to_owned);
                    let Ok(target) = Name::from_labels([host.as_bytes()]).and_then(|h| h.append_domain(&svc_name)) else { continue };
                    additionals.extend(self.addr_records(&target, [ep.addr], RecordType::ANY));
                    answers.push(srv(p.port, target));
                }
            }
            ServiceKind::ClusterIp(ips) => {
                if let Some(p) = spec.ports.iter().find(|x| x.proto == proto && x.name.eq_ignore_ascii_case(port)) {
                    additionals.extend(self.addr_records(&svc_name, ips.iter().copied(), RecordType::ANY));
                    answers.push(srv(p.port, svc_name));
                }
            }
            ServiceKind::ExternalName(_) => {}
        }
        match (answers.is_empty(), wants) {
            (true, _) => Answer::NxDomain,
            (false, false) => Answer::NoData,
            (false, true) => Answer::Records { answers, additionals },
        }
    }

    /// PTR for an address the index owns (2.3.3, 2.4.3); anything else is
    /// forwarded.
    fn ptr(&self, index: &Index, qname: &Name, addr: IpAddr, qtype: RecordType) -> Answer {
        let mut answers = Vec::new();
        for o in index.ptr(&addr) {
            let Ok(svc_name) = self.service_name(&o.namespace, &o.service) else { continue };
            let target = match &o.hostname {
                None => svc_name,
                Some(host) => {
                    // Only while that endpoint is published.
                    let Some(e) = index.service(&o.namespace, &o.service) else { continue };
                    let live = e.published().iter().any(|(ep, _)| ep.addr == addr && ep.hostname.as_ref() == Some(host));
                    match Name::from_labels([host.as_bytes()]).and_then(|h| h.append_domain(&svc_name)) {
                        Ok(t) if live => t,
                        _ => continue,
                    }
                }
            };
            answers.push(self.record(qname, RData::PTR(PTR(target))));
        }
        match (answers.is_empty(), qtype) {
            (true, _) => Answer::NotOurs,
            (false, RecordType::PTR | RecordType::ANY) => Answer::Records { answers, additionals: Vec::new() },
            (false, _) => Answer::NoData,
        }
    }

    /// `<svc>.<ns>.svc.<zone>.`
    pub fn service_name(&self, ns: &str, svc: &str) -> Result<Name, hickory_proto::ProtoError> {
        Name::from_labels([svc.as_bytes(), ns.as_bytes(), b"svc"])?.append_domain(&self.name)
    }

    fn record(&self, name: &Name, data: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, data)
    }

    /// A records for `qtype` A, AAAA for AAAA, both for ANY.
    fn addr_records(&self, name: &Name, addrs: impl IntoIterator<Item = IpAddr>, qtype: RecordType) -> Vec<Record> {
        addrs
            .into_iter()
            .filter_map(|a| match (a, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(v6))),
                _ => None,
            })
            .map(|d| self.record(name, d))
            .collect()
    }
}

fn utf8(l: &[u8]) -> Option<&str> {
    std::str::from_utf8(l).ok()
}

/// An address as one DNS label: `10-42-0-7`, `fd00--7`.
pub fn dashed(addr: IpAddr) -> String {
    addr.to_string().replace(['.', ':'], "-")
}

/// The inverse of [`dashed`].
fn dashed_addr(label: &[u8]) -> Option<IpAddr> {
    let s = utf8(label)?;
    if let Ok(v4) = s.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    s.replace('-', ":").parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// Whether `label` names this endpoint: its hostname, or its dashed
/// address when it has none.
fn endpoint_named(ep: &crate::index::Endpoint, label: &[u8]) -> bool {
    match &ep.hostname {
        Some(h) => h.as_bytes().eq_ignore_ascii_case(label),
        None => dashed_addr(label) == Some(ep.addr),
    }
}

/// The address of `d.c.b.a.in-addr.arpa.` or of a full-length
/// `….ip6.arpa.` name.
pub fn reverse_addr(name: &LowerName) -> Option<IpAddr> {
    let labels: Vec<&[u8]> = name.iter().collect();
    match labels.as_slice() {
        [d, c, b, a, in_addr, arpa] if *in_addr == b"in-addr" && *arpa == b"arpa" => {
            let o = |l: &[u8]| utf8(l)?.parse::<u8>().ok();
            Some(IpAddr::V4(Ipv4Addr::new(o(a)?, o(b)?, o(c)?, o(d)?)))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && *ip6 == b"ip6" && *arpa == b"arpa" => {
            let mut v: u128 = 0;
            for l in nibbles.iter().rev() {
                let [c] = l else { return None };
                v = (v << 4) | u128::from(char::from(*c).to_digit(16)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
