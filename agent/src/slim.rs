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
//! Both implement k8s-openapi's `Resource` and `Metadata` (with the real
//! kind's group, version and kind), so kube's `Api`, watcher and reflector
//! take them as they take the generated types. Field names and types follow
//! k8s-openapi's, so the code reads both alike.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
};

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        core::v1::{LoadBalancerStatus, Service, SessionAffinityConfig},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, SeqAccess, Visitor},
};

/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The annotation the EndpointSlice controller stamps with the time of the
/// change that caused a slice's last update (kube-proxy's network
/// programming latency starts there).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A `discovery.k8s.io/v1` EndpointSlice as the agent stores it. Field names
/// and types follow k8s-openapi's, so the model reads both alike.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimSlice {
    /// Name, namespace, resourceVersion (the watcher resumes from it), the
    /// `kubernetes.io/service-name` label and the trigger-time annotation.
    #[serde(deserialize_with = "slice_meta")]
    pub metadata: ObjectMeta,
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
    /// Go marshals an empty list as `null`.
    #[serde(default, deserialize_with = "null_is_empty")]
    pub endpoints: Box<[SliceEndpoint]>,
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

/// Node names, one allocation per node however many endpoints name it.
/// Names no endpoint holds any more go when a new name arrives.
static NODE_NAMES: Mutex<BTreeSet<Arc<str>>> = Mutex::new(BTreeSet::new());

fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    let Some(name) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let mut names = NODE_NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(known) = names.get(name.as_str()) {
        return Ok(Some(Arc::clone(known)));
    }
    names.retain(|n| Arc::strong_count(n) > 1);
    let name: Arc<str> = name.into();
    names.insert(Arc::clone(&name));
    Ok(Some(name))
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

/// `EndpointPort`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The part of an `ObjectMeta` that is decoded; labels and annotations
/// are filtered by each kind to the keys it reads.
#[derive(Deserialize)]
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
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// A `v1` Service as the agent stores it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct SlimService {
    /// Name, namespace, uid and resourceVersion (Events name the object),
    /// the two labels that make a Service someone else's, and the
    /// `service.riptide.io/*` annotations.
    #[serde(deserialize_with = "service_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimServiceSpec>,
    #[serde(default)]
    pub status: Option<SlimServiceStatus>,
}

/// The `ServiceSpec` fields the model reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    #[serde(default)]
    pub external_traffic_policy: Option<String>,
    #[serde(default)]
    pub internal_traffic_policy: Option<String>,
    #[serde(default)]
    pub health_check_node_port: Option<i32>,
    #[serde(default)]
    pub session_affinity: Option<String>,
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
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
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

fn service_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = Meta::deserialize(d)?;
    let keep = |map: Option<BTreeMap<String, String>>, want: &dyn Fn(&str) -> bool| {
        map.map(|mut m| {
            m.retain(|k, _| want(k));
            m
        })
        .filter(|m| !m.is_empty())
    };
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: keep(m.labels, &|k| k == LABEL_SERVICE_PROXY_NAME || k == LABEL_HEADLESS),
        annotations: keep(m.annotations, &|k| k.starts_with(SERVICE_ANNOTATION_PREFIX)),
        ..ObjectMeta::default()
    })
}

fn slice_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    fn only(map: Option<BTreeMap<String, String>>, key: &str) -> Option<BTreeMap<String, String>> {
        map.and_then(|mut m| m.remove_entry(key)).map(|kv| [kv].into())
    }
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        labels: only(m.labels, LABEL_SERVICE_NAME),
        annotations: only(m.annotations, TRIGGER_TIME_ANNOTATION),
        ..ObjectMeta::default()
    })
}

fn null_is_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Box<[T]>, D::Error> {
    Ok(Option::<Box<[T]>>::deserialize(d)?.unwrap_or_default())
}

/// `Resource` and `Metadata` for a slim type, with the group, version and
/// kind of the k8s-openapi type it stands for.
macro_rules! watched_as {
    ($slim:ty, $real:ty) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$real as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$real as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$real as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$real as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$real as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = NamespaceResourceScope;
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

watched_as!(SlimService, Service);
watched_as!(SlimSlice, EndpointSlice);

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
            metadata: ObjectMeta {
                name: Some("web-abc".into()),
                namespace: Some("ns".into()),
                resource_version: Some("7".into()),
                labels: Some([(LABEL_SERVICE_NAME.to_owned(), "web".to_owned())].into()),
                annotations: Some([(TRIGGER_TIME_ANNOTATION.to_owned(), "2026-12-07T00:00:00Z".to_owned())].into()),
                ..ObjectMeta::default()
            },
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
        assert_eq!(s.metadata.name.as_deref(), Some("web"));
        assert_eq!(s.metadata.uid.as_deref(), Some("u1"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("9"));
        assert_eq!(s.metadata.labels, Some([(LABEL_HEADLESS.to_owned(), String::new())].into()));
        assert_eq!(s.metadata.annotations, Some([("service.riptide.io/lb-mode".to_owned(), "dsr".to_owned())].into()));
        assert!(s.metadata.managed_fields.is_none());
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
        assert_eq!((bare.metadata.labels, bare.metadata.annotations, bare.spec), (None, None, None));
    }

    #[test]
    fn watches_as_an_endpointslice() {
        use kube::Resource as _;
        assert_eq!(SlimSlice::api_version(&()), "discovery.k8s.io/v1");
        assert_eq!(SlimSlice::plural(&()), "endpointslices");
        assert_eq!(SlimSlice::url_path(&(), Some("ns")), "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices");
        assert_eq!(SlimService::url_path(&(), Some("ns")), "/api/v1/namespaces/ns/services");
    }
}
