//! Watch-store types that hold only what the agent reads, decoded straight
//! from the API's JSON: serde skips every other field without allocating
//! it. A k8s-openapi `EndpointSlice` keeps hundreds of bytes inline per
//! endpoint however much is trimmed after decoding (target references,
//! hints, topology maps), and a cluster has an endpoint per pod behind a
//! Service.
//!
//! The same holds for Services: a k8s-openapi `Service` is 840 bytes inline
//! before its strings, and its selector, IP-family fields and conditions
//! are never read; [`SlimService`] keeps what `model`, `lb_algorithm`,
//! `lb_mode`, `l2announce` and `kube_events` read.
//!
//! An endpoint keeps its first address as an `Ipv4Addr` (kube-proxy uses
//! the first; the rest are fungible) and its node's name shared with every
//! other endpoint on that node: with 50,000 endpoints, three small
//! allocations each cost more in malloc's per-chunk overhead than in data.
//!
//! Pods and Nodes are watched cluster-wide. A [`SlimPod`] keeps its name,
//! labels, node, phase, IPv4 address and the ports of containers that
//! declare any (NetworkPolicy identities and named ports, hostPort
//! entries); a [`SlimNode`] its addresses, podCIDRs, taint keys and the
//! podCIDR claim. Strings that repeat across objects are shared: node
//! names, phases, port names and protocols, and a pod's whole label set (a
//! Deployment's replicas carry the same one).
//!
//! None of them carries an `ObjectMeta` (hundreds of bytes inline however
//! empty): an object keeps its name and namespace as an [`ObjKey`] (the
//! namespace interned, both shared with its store's key) and the few other
//! metadata it needs as fields of its own. kube's `Api` and watcher decode
//! each kind as a [`Wire`] of it, which adds the `ObjectMeta` the watcher
//! reads (the resourceVersion it resumes from) for the time of one event;
//! `Wire<T>` implements k8s-openapi's `Resource` with the real kind's group,
//! version and kind. Spec and status field names and types follow
//! k8s-openapi's, so the code reads both alike.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    ops::Deref,
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    api::{
        core::v1::{LoadBalancerStatus, Node, NodeAddress, Pod, Service, SessionAffinityConfig},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{DeserializeOwned, IgnoredAny, SeqAccess, Visitor},
};

pub use crate::store::ObjKey;
use crate::store::Keyed;

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The annotation the EndpointSlice controller stamps with the time of the
/// change that caused a slice's last update (kube-proxy's network
/// programming latency starts there).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A compact type's wire form: what it decodes from (its `metadata` as
/// [`Meta`]), and how that splits into the resourceVersion and itself.
pub trait Decoded: Sized {
    type Raw: DeserializeOwned;

    /// The object and the resourceVersion it was decoded at.
    fn decode(raw: Self::Raw) -> (Option<String>, Self);
}

/// One object as kube's watcher takes it: the compact `object`, and an
/// `ObjectMeta` holding only its resourceVersion (all the watcher reads).
/// Dropped as soon as the object is in its store.
#[derive(Clone, Debug, PartialEq)]
pub struct Wire<T> {
    pub metadata: ObjectMeta,
    pub object: T,
}

impl<'de, T: Decoded> Deserialize<'de> for Wire<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (resource_version, object) = T::decode(T::Raw::deserialize(d)?);
        Ok(Self { metadata: ObjectMeta { resource_version, ..ObjectMeta::default() }, object })
    }
}

/// `namespace/name` of `m` as the store key (namespaces interned).
fn key_of(m: &Meta) -> ObjKey {
    let namespace = Interned::from(m.namespace.as_deref().unwrap_or(""));
    ObjKey::new(namespace.0, m.name.as_deref().unwrap_or(""))
}

/// Name and namespace accessors of the compact types, their store key,
/// and their decoding from the raw form (`serde(from)`).
macro_rules! keyed {
    ($t:ty, $raw:ty) => {
        impl From<$raw> for $t {
            fn from(raw: $raw) -> Self {
                <$t as Decoded>::decode(raw).1
            }
        }

        impl $t {
            pub fn name(&self) -> &str {
                &self.key.name
            }

            /// Empty for cluster-scoped kinds.
            pub fn namespace(&self) -> &str {
                &self.key.namespace
            }
        }

        impl Keyed for $t {
            fn key(&self) -> ObjKey {
                self.key.clone()
            }
        }
    };
}

/// A `discovery.k8s.io/v1` EndpointSlice as the agent stores it. Field names
/// and types follow k8s-openapi's, so the model reads both alike.
///
/// The one label and the one annotation read are fields of their own: a
/// map of one entry allocates a whole B-tree node (536 bytes), twice per
/// slice.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "RawSlice")]
pub struct SlimSlice {
    pub key: ObjKey,
    /// The [`LABEL_SERVICE_NAME`] label: the slice's Service (shared with
    /// the agent's slice index).
    pub service_name: Option<Arc<str>>,
    /// The [`TRIGGER_TIME_ANNOTATION`].
    pub trigger_time: Option<String>,
    pub address_type: Interned,
    pub ports: Option<Vec<SlicePort>>,
    pub endpoints: Box<[SliceEndpoint]>,
}

keyed!(SlimSlice, RawSlice);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSlice {
    metadata: Meta,
    address_type: Interned,
    #[serde(default)]
    ports: Option<Vec<SlicePort>>,
    /// Go marshals an empty list as `null`.
    #[serde(default, deserialize_with = "null_is_empty")]
    endpoints: Box<[SliceEndpoint]>,
}

impl Decoded for SlimSlice {
    type Raw = RawSlice;

    fn decode(raw: RawSlice) -> (Option<String>, Self) {
        let m = raw.metadata;
        let slice = Self {
            key: key_of(&m),
            service_name: m.labels.and_then(|mut l| l.remove(LABEL_SERVICE_NAME)).map(Arc::from),
            trigger_time: m.annotations.and_then(|mut a| a.remove(TRIGGER_TIME_ANNOTATION)),
            address_type: raw.address_type,
            ports: raw.ports,
            endpoints: raw.endpoints,
        };
        (m.resource_version, slice)
    }
}

/// One endpoint: its address, conditions and node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    /// The first of `addresses`, when it is IPv4.
    #[serde(default, rename = "addresses", deserialize_with = "first_v4")]
    pub address: Option<Ipv4Addr>,
    #[serde(default)]
    pub conditions: Option<Conditions>,
    #[serde(default, deserialize_with = "interned")]
    pub node_name: Option<Arc<str>>,
}

/// The first address of a list (or `null`), parsed as IPv4; the rest are
/// skipped without being decoded into anything.
fn first_v4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    struct First;
    impl<'de> Visitor<'de> for First {
        type Value = Option<Ipv4Addr>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of addresses")
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_seq(self)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first: Option<String> = seq.next_element()?;
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(first.and_then(|a| a.parse().ok()))
        }
    }
    d.deserialize_option(First)
}

/// One shared allocation per distinct value: values no object holds any
/// more are dropped once the set has doubled since the last sweep, so a
/// relist of 50,000 objects sweeps a few times, not once per new value.
struct Interner<T: ?Sized + Ord> {
    set: BTreeSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized + Ord> Interner<T> {
    const fn new() -> Self {
        Self { set: BTreeSet::new(), sweep_at: 64 }
    }

    fn intern<V: Borrow<T> + Into<Arc<T>>>(this: &Mutex<Self>, v: V) -> Arc<T> {
        let mut i = this.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = i.set.get(v.borrow()) {
            return Arc::clone(known);
        }
        if i.set.len() >= i.sweep_at {
            i.set.retain(|k| Arc::strong_count(k) > 1);
            i.sweep_at = (i.set.len() * 2).max(64);
        }
        let v: Arc<T> = v.into();
        i.set.insert(Arc::clone(&v));
        v
    }
}

/// Node names, phases, port names and protocols.
static STRINGS: Mutex<Interner<str>> = Mutex::new(Interner::new());

/// A string many objects hold (a node's name, a phase, a port name), one
/// allocation for all of them. Derefs to `str`, so `Option<Interned>`
/// reads as k8s-openapi's `Option<String>` does (`.as_deref()`).
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interned(Arc<str>);

impl Interned {
    pub fn new(s: impl Into<String>) -> Self {
        Self(Interner::intern(&STRINGS, s.into()))
    }

    /// The shared allocation.
    pub fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl Deref for Interned {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Interned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq<&str> for Interned {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl From<&str> for Interned {
    fn from(s: &str) -> Self {
        Self(Interner::intern(&STRINGS, s))
    }
}

impl<'de> Deserialize<'de> for Interned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

impl Serialize for Interned {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    Ok(Option::<Interned>::deserialize(d)?.map(|i| i.0))
}

/// `EndpointConditions`; `None` keeps the API's meaning of an unset field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// `EndpointPort`, its strings shared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<Interned>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<Interned>,
}

/// The part of an `ObjectMeta` that is decoded; labels and annotations
/// are filtered by each kind to the keys it reads.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    deletion_timestamp: Option<Time>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// A `v1` Service as the agent stores it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "RawService")]
pub struct SlimService {
    pub key: ObjKey,
    /// UID and resourceVersion: Events name the object.
    pub uid: Option<Uid>,
    pub resource_version: Option<String>,
    /// The two labels that make a Service someone else's
    /// ([`LABEL_SERVICE_PROXY_NAME`], [`LABEL_HEADLESS`]); `None` when it
    /// has neither.
    pub labels: Option<BTreeMap<String, String>>,
    /// The [`SERVICE_ANNOTATION_PREFIX`] annotations; `None` when none.
    pub annotations: Option<BTreeMap<String, String>>,
    pub spec: Option<SlimServiceSpec>,
    pub status: Option<SlimServiceStatus>,
}

keyed!(SlimService, RawService);

#[derive(Deserialize)]
pub struct RawService {
    metadata: Meta,
    #[serde(default)]
    spec: Option<SlimServiceSpec>,
    #[serde(default)]
    status: Option<SlimServiceStatus>,
}

impl Decoded for SlimService {
    type Raw = RawService;

    fn decode(raw: RawService) -> (Option<String>, Self) {
        let m = raw.metadata;
        let keep = |map: Option<BTreeMap<String, String>>, want: &dyn Fn(&str) -> bool| {
            map.map(|mut m| {
                m.retain(|k, _| want(k));
                m
            })
            .filter(|m| !m.is_empty())
        };
        let mut spec = raw.spec;
        if let Some(s) = spec.as_mut()
            && s.cluster_ips.as_deref() == s.cluster_ip.as_ref().map(std::slice::from_ref)
        {
            // The usual single-stack Service: `clusterIPs` repeats
            // `clusterIP`, which the model reads as well.
            s.cluster_ips = None;
        }
        let svc = Self {
            key: key_of(&m),
            uid: m.uid.map(Uid::from),
            resource_version: m.resource_version.clone(),
            labels: keep(m.labels, &|k| k == LABEL_SERVICE_PROXY_NAME || k == LABEL_HEADLESS),
            annotations: keep(m.annotations, &|k| k.starts_with(SERVICE_ANNOTATION_PREFIX)),
            spec,
            status: raw.status,
        };
        (m.resource_version, svc)
    }
}

/// The `ServiceSpec` fields the model reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<Interned>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    #[serde(default)]
    pub external_traffic_policy: Option<Interned>,
    #[serde(default)]
    pub internal_traffic_policy: Option<Interned>,
    #[serde(default)]
    pub health_check_node_port: Option<i32>,
    #[serde(default)]
    pub session_affinity: Option<Interned>,
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default)]
    pub load_balancer_source_ranges: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Option<Vec<SlimServicePort>>,
}

/// `ServicePort` without `targetPort` (EndpointSlices carry the resolved
/// port) and `appProtocol`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimServicePort {
    #[serde(default)]
    pub name: Option<Interned>,
    #[serde(default)]
    pub protocol: Option<Interned>,
    pub port: i32,
    #[serde(default)]
    pub node_port: Option<i32>,
}

/// `ServiceStatus` without its conditions.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimServiceStatus {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerStatus>,
}

/// Label that marks a Service as handled by another proxy (kube-proxy's
/// `service.kubernetes.io/service-proxy-name`): a set label means "not ours"
/// unless it names us.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that makes kube-proxy ignore a Service (`service.kubernetes.io/headless`).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Prefix of the Service annotations the agent reads (`lb_algorithm`'s and
/// `lb_mode`'s); the Service watch keeps only these.
pub const SERVICE_ANNOTATION_PREFIX: &str = "service.riptide.io/";

fn null_is_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Box<[T]>, D::Error> {
    Ok(Option::<Box<[T]>>::deserialize(d)?.unwrap_or_default())
}

/// A pod's labels: one allocation per distinct set, shared by every pod
/// that has it.
pub type Labels = Arc<BTreeMap<String, String>>;

static LABEL_SETS: Mutex<Interner<BTreeMap<String, String>>> = Mutex::new(Interner::new());

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// A `v1` Pod as the agent stores it.
///
/// Its labels are shared between pods: read them with [`SlimPod::labels`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "RawPod")]
pub struct SlimPod {
    pub key: ObjKey,
    pub uid: Option<Uid>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    pub labels: Option<Labels>,
    pub spec: Option<SlimPodSpec>,
    pub status: Option<SlimPodStatus>,
}

keyed!(SlimPod, RawPod);

impl SlimPod {
    /// The pod's labels (empty when it has none).
    pub fn labels(&self) -> &BTreeMap<String, String> {
        self.labels.as_deref().unwrap_or(&NO_LABELS)
    }

    /// Replaces the pod's labels (shared with other pods that have them).
    pub fn set_labels(&mut self, labels: BTreeMap<String, String>) {
        self.labels = (!labels.is_empty()).then(|| Interner::intern(&LABEL_SETS, labels));
    }
}

#[derive(Deserialize)]
pub struct RawPod {
    #[serde(default)]
    metadata: Option<Meta>,
    #[serde(default)]
    spec: Option<SlimPodSpec>,
    #[serde(default)]
    status: Option<RawPodStatus>,
}

impl Decoded for SlimPod {
    type Raw = RawPod;

    fn decode(raw: RawPod) -> (Option<String>, Self) {
        let m = raw.metadata.unwrap_or_default();
        let mut pod = Self {
            key: key_of(&m),
            uid: m.uid.map(Uid::from),
            deleting: m.deletion_timestamp.is_some(),
            labels: None,
            spec: raw.spec,
            status: raw.status.map(SlimPodStatus::from),
        };
        pod.set_labels(m.labels.unwrap_or_default());
        (m.resource_version, pod)
    }
}

/// An object's UID: a UUID (what apiservers hand out) in 16 bytes, any
/// other string as it is. Displays as it was written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl From<String> for Uid {
    fn from(s: String) -> Self {
        parse_uuid(&s).map_or_else(|| Self::Other(s.into()), Self::Uuid)
    }
}

/// The 16 bytes of a lowercase hyphenated UUID (`8-4-4-4-12` hex digits),
/// only when they print back to the same string.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let mut digits = b.iter().enumerate().filter(|(i, _)| ![8, 13, 18, 23].contains(i)).map(|(_, c)| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    });
    let mut out = [0u8; 16];
    for byte in &mut out {
        *byte = (digits.next()?? << 4) | digits.next()??;
    }
    Some(out)
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uuid(b) => {
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        f.write_str("-")?;
                    }
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
            Self::Other(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Serialize for Uid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The `PodSpec` fields the agent reads. Containers without ports are not
/// kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(default)]
    pub node_name: Option<Interned>,
    #[serde(default)]
    pub host_network: Option<bool>,
    /// Shared between pods with the same containers' ports.
    #[serde(default, deserialize_with = "with_ports", serialize_with = "as_slice")]
    pub containers: Arc<[SlimContainer]>,
    /// Init containers include restartable sidecars, whose ports count.
    #[serde(default, deserialize_with = "with_ports_opt")]
    pub init_containers: Option<Vec<SlimContainer>>,
}

/// A container as far as its ports go.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SlimContainer {
    #[serde(default)]
    pub ports: Option<Vec<SlimContainerPort>>,
}

/// `ContainerPort`, its strings shared.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimContainerPort {
    #[serde(default)]
    pub name: Option<Interned>,
    pub container_port: i32,
    #[serde(default)]
    pub protocol: Option<Interned>,
    #[serde(default)]
    pub host_port: Option<i32>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<Interned>,
}

static CONTAINER_SETS: Mutex<Interner<[SlimContainer]>> = Mutex::new(Interner::new());

/// Containers that declare ports, one allocation per distinct list (a
/// Deployment's replicas share theirs).
fn with_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[SlimContainer]>, D::Error> {
    Ok(Interner::intern(&CONTAINER_SETS, with_ports_opt(d)?.unwrap_or_default()))
}

fn as_slice<S: Serializer, T: Serialize>(v: &Arc<[T]>, s: S) -> Result<S::Ok, S::Error> {
    v.as_ref().serialize(s)
}

fn with_ports_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SlimContainer>>, D::Error> {
    let Some(mut cs) = Option::<Vec<SlimContainer>>::deserialize(d)? else {
        return Ok(None);
    };
    cs.retain(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()));
    for c in &mut cs {
        if let Some(p) = c.ports.as_mut() {
            p.shrink_to_fit();
        }
    }
    cs.shrink_to_fit();
    Ok((!cs.is_empty()).then_some(cs))
}

/// The `PodStatus` fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlimPodStatus {
    pub phase: Option<Interned>,
    /// The first IPv4 address of `podIPs`, else `podIP` when it is IPv4.
    pub pod_ip: Option<Ipv4Addr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(default)]
    phase: Option<Interned>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Option<Vec<RawPodIp>>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

impl From<RawPodStatus> for SlimPodStatus {
    fn from(raw: RawPodStatus) -> Self {
        let pod_ip = raw.pod_ips.iter().flatten().map(|p| p.ip.as_str()).chain(raw.pod_ip.as_deref()).find_map(|s| s.parse().ok());
        Self { phase: raw.phase, pod_ip }
    }
}

/// The annotation holding an agent-claimed range on its Node
/// ([`crate::podcidr`] writes it).
pub const POD_CIDR_ANNOTATION: &str = "riptide.io/pod-cidr";

/// A `v1` Node as the agent stores it: heartbeats rewrite its conditions
/// and images every few seconds, and none of that is read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "RawNode")]
pub struct SlimNode {
    /// Name (the namespace is empty).
    pub key: ObjKey,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// The [`POD_CIDR_ANNOTATION`] claim.
    pub pod_cidr_claim: Option<String>,
    pub spec: Option<SlimNodeSpec>,
    pub status: Option<SlimNodeStatus>,
}

keyed!(SlimNode, RawNode);

#[derive(Deserialize)]
pub struct RawNode {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Option<SlimNodeSpec>,
    #[serde(default)]
    status: Option<SlimNodeStatus>,
}

impl Decoded for SlimNode {
    type Raw = RawNode;

    fn decode(raw: RawNode) -> (Option<String>, Self) {
        let m = raw.metadata;
        let node = Self {
            key: key_of(&m),
            deleting: m.deletion_timestamp.is_some(),
            pod_cidr_claim: m.annotations.and_then(|mut a| a.remove(POD_CIDR_ANNOTATION)),
            spec: raw.spec,
            status: raw.status,
        };
        (m.resource_version, node)
    }
}

/// The `NodeSpec` fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimNodeSpec {
    #[serde(default, rename = "podCIDR")]
    pub pod_cidr: Option<String>,
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Option<Vec<String>>,
    #[serde(default)]
    pub taints: Option<Vec<SlimTaint>>,
}

/// A taint's key (KEP-3836 looks for the autoscaler's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlimTaint {
    pub key: String,
}

/// The `NodeStatus` fields the agent reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlimNodeStatus {
    #[serde(default)]
    pub addresses: Option<Vec<NodeAddress>>,
}

/// `Resource` and `Metadata` for a slim type's [`Wire`] form, with the
/// group, version, kind and scope of the k8s-openapi type it stands for.
macro_rules! watched_as {
    ($slim:ty, $real:ty, $scope:ty) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$real as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$real as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$real as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$real as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$real as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = $scope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

watched_as!(Wire<SlimService>, Service, NamespaceResourceScope);
watched_as!(Wire<SlimSlice>, EndpointSlice, NamespaceResourceScope);
watched_as!(Wire<SlimPod>, Pod, NamespaceResourceScope);
watched_as!(Wire<SlimNode>, Node, ClusterResourceScope);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_what_the_model_reads() {
        let s: SlimSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc", "namespace": "ns", "uid": "u", "resourceVersion": "7", "generateName": "web-",
                "labels": {LABEL_SERVICE_NAME: "web", "endpointslice.kubernetes.io/managed-by": "c"},
                "annotations": {TRIGGER_TIME_ANNOTATION: "2026-12-07T00:00:00Z", "other": "x"},
                "managedFields": [{"manager": "c"}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
            "endpoints": [{
                "addresses": ["10.42.0.5"], "nodeName": "n1", "zone": "z", "hostname": "h",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": "p"}, "hints": {"forZones": [{"name": "z"}]},
            }, {"addresses": ["10.42.0.6"]}],
        }))
        .unwrap();
        let want = SlimSlice {
            key: ObjKey::new("ns", "web-abc"),
            service_name: Some("web".into()),
            trigger_time: Some("2026-12-07T00:00:00Z".into()),
            address_type: "IPv4".into(),
            ports: Some(vec![SlicePort { name: Some("http".into()), port: Some(8080), protocol: Some("TCP".into()) }]),
            endpoints: [
                SliceEndpoint {
                    address: Some(Ipv4Addr::new(10, 42, 0, 5)),
                    conditions: Some(Conditions { ready: Some(true), serving: Some(true), terminating: Some(false) }),
                    node_name: Some("n1".into()),
                },
                SliceEndpoint { address: Some(Ipv4Addr::new(10, 42, 0, 6)), conditions: None, node_name: None },
            ]
            .into(),
        };
        assert_eq!(s, want);
    }

    /// The apiserver writes a slice without endpoints (every pod of a
    /// Service gone) as `"endpoints": null`, and omits unset lists.
    #[test]
    fn null_and_missing_lists_are_empty() {
        let s: SlimSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "ns"},
            "addressType": "IPv4", "ports": null, "endpoints": null,
        }))
        .unwrap();
        assert!(s.endpoints.is_empty() && s.ports.is_none());
        let s: SlimSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc"}, "addressType": "IPv4",
            "endpoints": [{"addresses": null, "conditions": null, "nodeName": null}],
        }))
        .unwrap();
        assert_eq!(&*s.endpoints, &[SliceEndpoint::default()]);
    }

    /// kube-proxy uses an endpoint's first address; an IPv6 or malformed
    /// first address is no IPv4 backend.
    #[test]
    fn the_first_address_counts_and_node_names_are_shared() {
        let s: SlimSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc"}, "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.42.0.7", "10.42.0.8"], "nodeName": "n-shared"},
                {"addresses": ["fd00::1", "10.42.0.9"], "nodeName": "n-shared"},
                {"addresses": ["nonsense"]},
                {"addresses": []},
            ],
        }))
        .unwrap();
        let addrs: Vec<_> = s.endpoints.iter().map(|e| e.address).collect();
        assert_eq!(addrs, [Some(Ipv4Addr::new(10, 42, 0, 7)), None, None, None]);
        let (a, b) = (s.endpoints[0].node_name.as_ref().unwrap(), s.endpoints[1].node_name.as_ref().unwrap());
        assert!(Arc::ptr_eq(a, b), "one allocation per node name");
        assert_eq!(&**a, "n-shared");
    }

    #[test]
    fn a_service_keeps_only_what_the_agent_reads() {
        let s: SlimService = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "ns", "uid": "u1", "resourceVersion": "9",
                "labels": {"app": "web", LABEL_HEADLESS: ""},
                "annotations": {"service.riptide.io/lb-mode": "dsr", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.43.0.10", "clusterIPs": ["10.43.0.10"],
                "selector": {"app": "web"}, "ipFamilies": ["IPv4"], "externalTrafficPolicy": "Local",
                "healthCheckNodePort": 30001, "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP", "appProtocol": "h2c"}],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "VIP"}]}, "conditions": [{"type": "x"}]},
        }))
        .unwrap();
        assert_eq!((s.namespace(), s.name()), ("ns", "web"));
        assert_eq!(s.uid.as_ref().map(ToString::to_string).as_deref(), Some("u1"));
        assert_eq!(s.resource_version.as_deref(), Some("9"));
        assert_eq!(s.labels, Some([(LABEL_HEADLESS.to_owned(), String::new())].into()));
        assert_eq!(s.annotations, Some([("service.riptide.io/lb-mode".to_owned(), "dsr".to_owned())].into()));
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.health_check_node_port, Some(30001));
        assert_eq!(spec.session_affinity_config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds), Some(60));
        assert_eq!(
            spec.ports.unwrap(),
            [SlimServicePort { name: Some("http".into()), protocol: Some("TCP".into()), port: 80, node_port: Some(30080) }]
        );
        let ingress = s.status.and_then(|st| st.load_balancer).and_then(|lb| lb.ingress).unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("198.51.100.7"));
        // Only unread labels and annotations: none kept at all.
        let bare: SlimService =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a", "labels": {"app": "a"}, "annotations": {"x": "y"}}}))
                .unwrap();
        assert_eq!((bare.labels, bare.annotations, bare.spec), (None, None, None));
    }

    #[test]
    fn a_pod_keeps_what_policy_and_host_ports_read() {
        let pod = |name: &str, ip: &str| -> SlimPod {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": name, "namespace": "ns", "uid": "u1", "resourceVersion": "5",
                    "deletionTimestamp": "2026-12-07T00:00:00Z",
                    "labels": {"app": "web", "pod-template-hash": "abc"}, "annotations": {"a": "b"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc", "uid": "r"}],
                },
                "spec": {
                    "nodeName": "n1", "hostNetwork": false, "serviceAccountName": "default",
                    "containers": [
                        {"name": "app", "image": "i", "env": [{"name": "A", "value": "1"}],
                         "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP", "hostPort": 80, "hostIP": "198.18.0.1"}]},
                        {"name": "sidecar", "image": "j"},
                    ],
                    "initContainers": [{"name": "init", "image": "k"}],
                },
                "status": {"phase": "Running", "podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": ip}], "hostIP": "198.18.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap()
        };
        let p = pod("web-1", "10.42.0.5");
        assert_eq!((p.name(), p.namespace()), ("web-1", "ns"));
        assert_eq!(p.uid.as_ref().map(ToString::to_string).as_deref(), Some("u1"));
        assert!(p.deleting);
        assert_eq!(p.labels().get("app").map(String::as_str), Some("web"));
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.containers.len(), 1, "containers without ports are not kept");
        assert!(spec.init_containers.is_none());
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port, port.protocol.as_deref()), (Some("http"), 8080, Some("TCP")));
        assert_eq!((port.host_port, port.host_ip.as_deref()), (Some(80), Some("198.18.0.1")));
        let status = p.status.as_ref().unwrap();
        assert_eq!((status.phase.as_deref(), status.pod_ip), (Some("Running"), Some(Ipv4Addr::new(10, 42, 0, 5))));
        // A replica of the same Deployment shares the label set, node
        // name, phase and port strings.
        let q = pod("web-2", "10.42.0.6");
        assert!(Arc::ptr_eq(p.labels.as_ref().unwrap(), q.labels.as_ref().unwrap()));
        let q_spec = q.spec.as_ref().unwrap();
        assert!(Arc::ptr_eq(spec.node_name.as_ref().unwrap().as_arc(), q_spec.node_name.as_ref().unwrap().as_arc()));
        assert!(Arc::ptr_eq(
            port.name.as_ref().unwrap().as_arc(),
            q_spec.containers[0].ports.as_ref().unwrap()[0].name.as_ref().unwrap().as_arc()
        ));
        // Relabelling one pod leaves the other's labels alone.
        let mut r = q.clone();
        r.set_labels([("app".to_owned(), "db".to_owned())].into());
        assert_eq!((p.labels()["app"].as_str(), r.labels()["app"].as_str()), ("web", "db"));
        // No labels, no status, podIP only.
        let bare: SlimPod = serde_json::from_value(serde_json::json!({"metadata": {"name": "b"}, "status": {"podIP": "10.42.0.7"}})).unwrap();
        assert!(bare.labels().is_empty() && bare.labels.is_none() && bare.spec.is_none());
        assert_eq!(bare.status.unwrap().pod_ip, Some(Ipv4Addr::new(10, 42, 0, 7)));
    }

    #[test]
    fn a_node_keeps_addresses_cidrs_taints_and_the_claim() {
        let n: SlimNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "uid": "u", "resourceVersion": "3", "labels": {"kubernetes.io/os": "linux"},
                         "annotations": {POD_CIDR_ANNOTATION: "10.42.9.0/24", "node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": "10.42.1.0/24", "podCIDRs": ["10.42.1.0/24"], "providerID": "p",
                     "taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule", "value": "1"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.2"}],
                       "images": [{"names": ["i"], "sizeBytes": 1}], "conditions": [{"type": "Ready", "status": "True"}],
                       "nodeInfo": {"kubeletVersion": "v1"}},
        }))
        .unwrap();
        assert_eq!((n.name(), n.namespace()), ("n1", ""));
        assert_eq!(n.pod_cidr_claim.as_deref(), Some("10.42.9.0/24"));
        let spec = n.spec.unwrap();
        assert_eq!(spec.pod_cidrs, Some(vec!["10.42.1.0/24".to_owned()]));
        assert_eq!(spec.taints.unwrap()[0].key, "ToBeDeletedByClusterAutoscaler");
        assert_eq!(n.status.unwrap().addresses.unwrap()[0].address, "198.18.0.2");
    }

    /// The watcher reads the resourceVersion of what it decodes; the
    /// compact object keeps its key, namespaces shared between objects.
    #[test]
    fn the_wire_form_carries_the_resource_version() {
        let w: Wire<SlimPod> = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns-shared", "resourceVersion": "42", "labels": {"a": "b"}},
        }))
        .unwrap();
        assert_eq!(w.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!((w.object.namespace(), w.object.name()), ("ns-shared", "p"));
        let q: SlimPod = serde_json::from_value(serde_json::json!({"metadata": {"name": "q", "namespace": "ns-shared"}})).unwrap();
        assert!(Arc::ptr_eq(&w.object.key.namespace, &q.key.namespace), "one allocation per namespace");
    }

    #[test]
    fn uids_print_as_written() {
        for s in ["0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9", "0F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F9", "not-a-uuid", "", "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f"] {
            let uid = Uid::from(s.to_owned());
            assert_eq!(uid.to_string(), s);
        }
        assert!(matches!(Uid::from("0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".to_owned()), Uid::Uuid(_)));
        assert!(matches!(Uid::from("0F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F9".to_owned()), Uid::Other(_)));
    }

    #[test]
    fn watches_as_an_endpointslice() {
        use kube::Resource as _;
        assert_eq!(Wire::<SlimSlice>::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(Wire::<SlimSlice>::plural(&()), "endpointslices");
        assert_eq!(Wire::<SlimSlice>::url_path(&(), Some("ns")), "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices");
        assert_eq!(Wire::<SlimService>::url_path(&(), Some("ns")), "/api/v1/namespaces/ns/services");
        assert_eq!(Wire::<SlimPod>::url_path(&(), None), "/api/v1/pods");
        assert_eq!(Wire::<SlimNode>::url_path(&(), None), "/api/v1/nodes");
    }
}
