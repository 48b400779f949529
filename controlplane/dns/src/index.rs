//! The record index: every fact the zone is answered from, kept in one
//! compact structure and changed in place per watch event (no rebuild).
//!
//! Only what DNS needs is kept, converted from the API objects before the
//! index lock is taken: per Service its kind (ClusterIPs, headless,
//! ExternalName target), named ports and `publishNotReadyAddresses`; per
//! EndpointSlice its named ports and, per endpoint, one address, the
//! hostname and readiness. Names are `Arc<str>` shared between the forward
//! maps and the reverse (PTR) map, so nothing is held twice. Addresses are
//! `IpAddr` throughout: IPv4 and IPv6 take the same paths.
//!
//! Relists follow the reflector protocol (`Init`, `InitApply`…,
//! `InitDone`): entries applied during a relist carry the new generation,
//! and `InitDone` sweeps what the relist did not mention. The old state
//! keeps answering until then.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::IpAddr,
    sync::Arc,
};

use hickory_proto::rr::Name;

/// Transport protocol of a port, as SRV names spell it (`_tcp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// From a Kubernetes `protocol` field (absent = TCP).
    pub fn from_k8s(p: Option<&str>) -> Option<Self> {
        match p.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// From an SRV label without its underscore (`tcp`), case-insensitive.
    pub fn from_label(l: &[u8]) -> Option<Self> {
        if l.eq_ignore_ascii_case(b"tcp") {
            Some(Self::Tcp)
        } else if l.eq_ignore_ascii_case(b"udp") {
            Some(Self::Udp)
        } else if l.eq_ignore_ascii_case(b"sctp") {
            Some(Self::Sctp)
        } else {
            None
        }
    }
}

/// A named port: only named ports have SRV records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: Box<str>,
    pub proto: Proto,
    pub port: u16,
}

/// What a Service's own name resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// Its ClusterIPs (empty while not allocated yet).
    ClusterIp(Box<[IpAddr]>),
    /// `clusterIP: None`: the endpoints' addresses.
    Headless,
    /// `type: ExternalName`: a CNAME to this (fully qualified) name.
    ExternalName(Name),
}

/// The DNS-relevant part of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub kind: ServiceKind,
    pub ports: Box<[Port]>,
    pub publish_not_ready: bool,
}

/// One endpoint of a slice: its first address (the API allows clients to
/// use only that one), its hostname and whether it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub hostname: Option<Arc<str>>,
    pub ready: bool,
}

/// The DNS-relevant part of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub ports: Box<[Port]>,
    pub endpoints: Box<[Endpoint]>,
}

#[derive(Debug)]
struct Slice {
    name: Box<str>,
    generation: u32,
    spec: SliceSpec,
}

/// A Service and its slices. Slices may arrive before their Service (two
/// independent watches), so the entry exists while either does.
#[derive(Debug, Default)]
pub struct ServiceEntry {
    spec: Option<ServiceSpec>,
    generation: u32,
    slices: Vec<Slice>,
}

impl ServiceEntry {
    pub fn spec(&self) -> Option<&ServiceSpec> {
        self.spec.as_ref()
    }

    /// Endpoints whose addresses are published: ready ones, or all with
    /// `publishNotReadyAddresses`. Each address once (during a controller
    /// update the same address can sit in two slices).
    pub fn published(&self) -> Vec<(&Endpoint, &[Port])> {
        let all = self.spec.as_ref().is_some_and(|s| s.publish_not_ready);
        let eps = self
            .slices
            .iter()
            .flat_map(|s| s.spec.endpoints.iter().map(move |e| (e, &*s.spec.ports)))
            .filter(|(e, _)| all || e.ready);
        if self.slices.len() <= 1 {
            return eps.collect();
        }
        let mut seen = std::collections::HashSet::new();
        eps.filter(|(e, _)| seen.insert(e.addr)).collect()
    }
}

#[derive(Debug, Default)]
struct Namespace {
    services: HashMap<Arc<str>, ServiceEntry>,
}

/// Who owns an address, for PTR: a Service (its ClusterIP) or an endpoint
/// hostname of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtrOwner {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    pub hostname: Option<Arc<str>>,
}

/// Which watch an entry came from, for relists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    Slice,
}

/// Object counts, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub services: usize,
    pub endpoints: usize,
}

#[derive(Debug)]
pub struct Index {
    namespaces: HashMap<Arc<str>, Namespace>,
    ptr: HashMap<IpAddr, Vec<PtrOwner>>,
    service_gen: u32,
    slice_gen: u32,
    serial: u32,
    counts: Counts,
}

impl Default for Index {
    fn default() -> Self {
        Self::new(1)
    }
}

impl Index {
    /// `serial` seeds the SOA serial; every change increments it.
    pub fn new(serial: u32) -> Self {
        Self {
            namespaces: HashMap::new(),
            ptr: HashMap::new(),
            service_gen: 0,
            slice_gen: 0,
            serial,
            counts: Counts::default(),
        }
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// A Service of `namespace`, or an entry that only has slices so far.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceEntry> {
        self.namespaces.get(namespace)?.services.get(name)
    }

    /// Whether `<namespace>.svc.<zone>` has any name under it.
    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.get(namespace).is_some_and(|n| n.services.values().any(|e| e.spec.is_some()))
    }

    /// Owners of `addr` (ClusterIPs, endpoint hostnames).
    pub fn ptr(&self, addr: &IpAddr) -> &[PtrOwner] {
        self.ptr.get(addr).map_or(&[], Vec::as_slice)
    }

    /// A relist of `kind` begins: what it applies gets a new generation.
    pub fn begin_relist(&mut self, kind: Kind) {
        match kind {
            Kind::Service => self.service_gen = self.service_gen.wrapping_add(1),
            Kind::Slice => self.slice_gen = self.slice_gen.wrapping_add(1),
        }
    }

    /// A relist of `kind` is complete: drop what it did not mention.
    pub fn end_relist(&mut self, kind: Kind) {
        let mut gone_services = Vec::new();
        let mut gone_slices = Vec::new();
        for (ns, n) in &self.namespaces {
            for (name, e) in &n.services {
                match kind {
                    Kind::Service if e.spec.is_some() && e.generation != self.service_gen => {
                        gone_services.push((ns.clone(), name.clone()));
                    }
                    Kind::Slice => {
                        for s in e.slices.iter().filter(|s| s.generation != self.slice_gen) {
                            gone_slices.push((ns.clone(), name.clone(), s.name.clone()));
                        }
                    }
                    Kind::Service => {}
                }
            }
        }
        for (ns, name) in gone_services {
            self.delete_service(&ns, &name);
        }
        for (ns, service, slice) in gone_slices {
            self.delete_slice(&ns, &service, &slice);
        }
    }

    fn entry(&mut self, namespace: &str, service: &str) -> (Arc<str>, Arc<str>, &mut ServiceEntry) {
        let ns_key: Arc<str> = match self.namespaces.get_key_value(namespace) {
            Some((k, _)) => k.clone(),
            None => Arc::from(namespace),
        };
        let ns = self.namespaces.entry(ns_key.clone()).or_default();
        let svc_key: Arc<str> = match ns.services.get_key_value(service) {
            Some((k, _)) => k.clone(),
            None => Arc::from(service),
        };
        let e = ns.services.entry(svc_key.clone()).or_default();
        (ns_key, svc_key, e)
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, namespace: &str, name: &str, spec: ServiceSpec) {
        let generation = self.service_gen;
        let (ns, svc, e) = self.entry(namespace, name);
        e.generation = generation;
        if e.spec.as_ref() == Some(&spec) {
            return;
        }
        let new_ips = cluster_ips(Some(&spec)).to_vec();
        let old = e.spec.replace(spec);
        let old_ips = cluster_ips(old.as_ref());
        if old.is_none() {
            self.counts.services += 1;
        }
        let owner = PtrOwner { namespace: ns, service: svc, hostname: None };
        for ip in old_ips.iter().filter(|ip| !new_ips.contains(ip)) {
            remove_ptr(&mut self.ptr, ip, &owner);
        }
        for ip in new_ips.iter().filter(|ip| !old_ips.contains(ip)) {
            self.ptr.entry(*ip).or_default().push(owner.clone());
        }
        self.serial = self.serial.wrapping_add(1);
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let Some(n) = self.namespaces.get_mut(namespace) else { return };
        let Some(svc) = n.services.get_key_value(name).map(|(k, _)| k.clone()) else { return };
        let Some(old) = n.services.get_mut(name).and_then(|e| e.spec.take()) else { return };
        self.counts.services -= 1;
        let owner = PtrOwner { namespace: Arc::from(namespace), service: svc.clone(), hostname: None };
        for ip in cluster_ips(Some(&old)).iter() {
            remove_ptr(&mut self.ptr, ip, &owner);
        }
        self.prune(namespace, name);
        self.serial = self.serial.wrapping_add(1);
    }

    /// Adds or replaces slice `slice` of Service `service`.
    pub fn apply_slice(&mut self, namespace: &str, service: &str, slice: &str, spec: SliceSpec) {
        let generation = self.slice_gen;
        let (ns, svc, e) = self.entry(namespace, service);
        let old = match e.slices.iter_mut().find(|s| &*s.name == slice) {
            Some(s) => {
                s.generation = generation;
                if s.spec == spec {
                    return;
                }
                Some(std::mem::replace(&mut s.spec, spec))
            }
            None => {
                e.slices.push(Slice { name: slice.into(), generation, spec });
                None
            }
        };
        let new = e.slices.iter().find(|s| &*s.name == slice).map(|s| s.spec.clone());
        self.update_slice_ptrs(&ns, &svc, old.as_ref(), new.as_ref());
        self.counts.endpoints -= old.map_or(0, |o| o.endpoints.len());
        self.counts.endpoints += new.map_or(0, |n| n.endpoints.len());
        self.serial = self.serial.wrapping_add(1);
    }

    pub fn delete_slice(&mut self, namespace: &str, service: &str, slice: &str) {
        let Some(n) = self.namespaces.get_mut(namespace) else { return };
        let Some(svc) = n.services.get_key_value(service).map(|(k, _)| k.clone()) else { return };
        let Some(e) = n.services.get_mut(service) else { return };
        let Some(i) = e.slices.iter().position(|s| &*s.name == slice) else { return };
        let old = e.slices.swap_remove(i);
        let ns = Arc::from(namespace);
        self.update_slice_ptrs(&ns, &svc, Some(&old.spec), None);
        self.counts.endpoints -= old.spec.endpoints.len();
        self.prune(namespace, service);
        self.serial = self.serial.wrapping_add(1);
    }

    /// PTRs of endpoint hostnames: all endpoints with a hostname get one;
    /// readiness is checked when answering, so a readiness flip costs no
    /// reverse-map work.
    fn update_slice_ptrs(&mut self, ns: &Arc<str>, svc: &Arc<str>, old: Option<&SliceSpec>, new: Option<&SliceSpec>) {
        let named = |s: Option<&SliceSpec>| -> Vec<(IpAddr, Arc<str>)> {
            s.map(|s| s.endpoints.iter().filter_map(|e| Some((e.addr, e.hostname.clone()?))).collect()).unwrap_or_default()
        };
        let (old, new) = (named(old), named(new));
        for (ip, host) in old.iter().filter(|o| !new.contains(o)) {
            let owner = PtrOwner { namespace: ns.clone(), service: svc.clone(), hostname: Some(host.clone()) };
            remove_ptr(&mut self.ptr, ip, &owner);
        }
        for (ip, host) in new.into_iter().filter(|n| !old.contains(n)) {
            let owner = PtrOwner { namespace: ns.clone(), service: svc.clone(), hostname: Some(host) };
            let owners = self.ptr.entry(ip).or_default();
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
    }

    /// Drops a Service entry with neither spec nor slices, and an empty
    /// namespace.
    fn prune(&mut self, namespace: &str, service: &str) {
        let Some(n) = self.namespaces.get_mut(namespace) else { return };
        if let Entry::Occupied(o) = n.services.entry(Arc::from(service))
            && o.get().spec.is_none()
            && o.get().slices.is_empty()
        {
            o.remove();
        }
        if n.services.is_empty() {
            self.namespaces.remove(namespace);
        }
    }
}

fn cluster_ips(spec: Option<&ServiceSpec>) -> &[IpAddr] {
    match spec.map(|s| &s.kind) {
        Some(ServiceKind::ClusterIp(ips)) => ips,
        _ => &[],
    }
}

fn remove_ptr(ptr: &mut HashMap<IpAddr, Vec<PtrOwner>>, ip: &IpAddr, owner: &PtrOwner) {
    if let Entry::Occupied(mut o) = ptr.entry(*ip) {
        o.get_mut().retain(|x| x != owner);
        if o.get().is_empty() {
            o.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cluster_ip(addr: &str) -> ServiceSpec {
        ServiceSpec { kind: ServiceKind::ClusterIp([ip(addr)].into()), ports: [].into(), publish_not_ready: false }
    }

    fn ep(addr: &str, host: Option<&str>, ready: bool) -> Endpoint {
        Endpoint { addr: ip(addr), hostname: host.map(Arc::from), ready }
    }

    fn slice(eps: Vec<Endpoint>) -> SliceSpec {
        SliceSpec { ports: [].into(), endpoints: eps.into() }
    }

    #[test]
    fn cluster_ip_ptr_follows_the_service() {
        let mut ix = Index::new(1);
        ix.apply_service("ns", "web", cluster_ip("10.43.0.5"));
        assert_eq!(ix.ptr(&ip("10.43.0.5"))[0].service.as_ref(), "web");
        ix.apply_service("ns", "web", cluster_ip("10.43.0.6"));
        assert!(ix.ptr(&ip("10.43.0.5")).is_empty());
        assert_eq!(ix.ptr(&ip("10.43.0.6")).len(), 1);
        ix.delete_service("ns", "web");
        assert!(ix.ptr(&ip("10.43.0.6")).is_empty());
        assert!(ix.namespaces.is_empty(), "nothing left behind");
        assert_eq!(ix.counts(), Counts::default());
    }

    #[test]
    fn slices_before_their_service_and_after_it() {
        let mut ix = Index::new(1);
        ix.apply_slice("ns", "db", "db-abc", slice(vec![ep("10.42.0.7", Some("db-0"), true)]));
        assert!(!ix.has_namespace("ns"), "a slice alone makes no name");
        assert_eq!(ix.ptr(&ip("10.42.0.7"))[0].hostname.as_deref(), Some("db-0"));
        let headless = ServiceSpec { kind: ServiceKind::Headless, ports: [].into(), publish_not_ready: false };
        ix.apply_service("ns", "db", headless);
        assert!(ix.has_namespace("ns"));
        ix.delete_service("ns", "db");
        assert!(ix.service("ns", "db").is_some(), "the slice keeps the entry");
        ix.delete_slice("ns", "db", "db-abc");
        assert!(ix.service("ns", "db").is_none());
        assert!(ix.ptr(&ip("10.42.0.7")).is_empty());
    }

    #[test]
    fn published_endpoints_honour_readiness_and_dedupe() {
        let mut ix = Index::new(1);
        let mut spec = ServiceSpec { kind: ServiceKind::Headless, ports: [].into(), publish_not_ready: false };
        ix.apply_service("ns", "h", spec.clone());
        ix.apply_slice("ns", "h", "a", slice(vec![ep("10.42.0.1", None, true), ep("10.42.0.2", None, false)]));
        ix.apply_slice("ns", "h", "b", slice(vec![ep("10.42.0.1", None, true)]));
        let addrs = |ix: &Index| -> Vec<IpAddr> { ix.service("ns", "h").unwrap().published().iter().map(|(e, _)| e.addr).collect() };
        assert_eq!(addrs(&ix), [IpAddr::V4(Ipv4Addr::new(10, 42, 0, 1))]);
        spec.publish_not_ready = true;
        ix.apply_service("ns", "h", spec);
        assert_eq!(addrs(&ix), [ip("10.42.0.1"), ip("10.42.0.2")]);
        assert_eq!(ix.counts(), Counts { services: 1, endpoints: 3 });
    }

    #[test]
    fn a_relist_sweeps_what_it_did_not_mention() {
        let mut ix = Index::new(1);
        ix.apply_service("ns", "keep", cluster_ip("10.43.0.1"));
        ix.apply_service("ns", "gone", cluster_ip("10.43.0.2"));
        ix.apply_slice("ns", "keep", "keep-1", slice(vec![ep("10.42.0.1", Some("k"), true)]));
        ix.apply_slice("ns", "keep", "keep-2", slice(vec![ep("10.42.0.2", Some("k2"), true)]));
        ix.begin_relist(Kind::Service);
        ix.apply_service("ns", "keep", cluster_ip("10.43.0.1"));
        assert!(ix.service("ns", "gone").is_some(), "old state answers until the relist is done");
        ix.end_relist(Kind::Service);
        assert!(ix.service("ns", "gone").is_none());
        assert!(ix.ptr(&ip("10.43.0.2")).is_empty());
        ix.begin_relist(Kind::Slice);
        ix.apply_slice("ns", "keep", "keep-1", slice(vec![ep("10.42.0.1", Some("k"), true)]));
        ix.end_relist(Kind::Slice);
        assert!(ix.ptr(&ip("10.42.0.2")).is_empty());
        assert_eq!(ix.ptr(&ip("10.42.0.1")).len(), 1);
        assert_eq!(ix.counts(), Counts { services: 1, endpoints: 1 });
    }

    #[test]
    fn every_change_bumps_the_serial_and_no_change_does_not() {
        let mut ix = Index::new(7);
        ix.apply_service("ns", "a", cluster_ip("10.43.0.1"));
        assert_eq!(ix.serial(), 8);
        ix.apply_service("ns", "a", cluster_ip("10.43.0.1"));
        assert_eq!(ix.serial(), 8);
    }
}
