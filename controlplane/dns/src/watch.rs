//! Watches of Services and EndpointSlices feeding the [`Index`].
//!
//! `watcher(..).default_backoff()` as controller-rs does, but into the
//! index itself rather than a `reflector` store: a store would keep every
//! object a second time (the full API object next to the few fields DNS
//! answers from), which at 10,000 Services / 50,000 endpoints is most of
//! the memory budget. Each event is converted to the index's types before
//! the write lock is taken, so the lock is held for a few map operations;
//! relists follow the reflector's protocol ([`Index::begin_relist`]).

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
};

use futures::StreamExt as _;
use hickory_proto::rr::Name;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::{sync::oneshot, task::JoinHandle};

use crate::{
    index::{Endpoint, Index, Kind, Port, Proto, ServiceKind, ServiceSpec, SliceSpec},
    metrics::{KindLabel, Metrics, Readiness},
};

/// The label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Every API call riptide-dns makes (for the manifest's ClusterRole).
pub const API_ACCESS: &[(&str, &str, &[&str])] =
    &[("", "services", &["list", "watch"]), ("discovery.k8s.io", "endpointslices", &["list", "watch"])];

/// One watch event, converted.
#[derive(Debug, PartialEq)]
pub enum Change {
    /// `spec: None`: gone, or nothing DNS can serve.
    Service { namespace: String, name: String, spec: Option<ServiceSpec> },
    /// `service: None`: a slice without the service-name label (ignored).
    Slice { namespace: String, service: Option<String>, name: String, spec: Option<SliceSpec> },
}

impl Change {
    pub fn apply(self, ix: &mut Index) {
        match self {
            Self::Service { namespace, name, spec: Some(spec) } => ix.apply_service(&namespace, &name, spec),
            Self::Service { namespace, name, spec: None } => ix.delete_service(&namespace, &name),
            Self::Slice { namespace, service: Some(svc), name, spec: Some(spec) } => ix.apply_slice(&namespace, &svc, &name, spec),
            Self::Slice { namespace, service: Some(svc), name, spec: None } => ix.delete_slice(&namespace, &svc, &name),
            Self::Slice { service: None, .. } => {}
        }
    }

    fn deleted(self) -> Self {
        match self {
            Self::Service { namespace, name, .. } => Self::Service { namespace, name, spec: None },
            Self::Slice { namespace, service, name, .. } => Self::Slice { namespace, service, name, spec: None },
        }
    }
}

/// The DNS view of a Service (`None`: nothing to serve).
pub fn service_change(s: &Service) -> Change {
    Change::Service { namespace: s.namespace().unwrap_or_default(), name: s.name_any(), spec: service_spec(s) }
}

fn service_spec(s: &Service) -> Option<ServiceSpec> {
    let spec = s.spec.as_ref()?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let ext = spec.external_name.as_deref()?;
        match Name::from_ascii(ext) {
            Ok(mut n) => {
                n.set_fqdn(true);
                ServiceKind::ExternalName(n)
            }
            Err(e) => {
                tracing::warn!(service = %s.name_any(), external_name = ext, error = %e, "ExternalName is no DNS name; no CNAME");
                return None;
            }
        }
    } else {
        let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(v), _) if !v.is_empty() => v.iter().map(String::as_str).collect(),
            (_, Some(one)) if !one.is_empty() => vec![one.as_str()],
            _ => Vec::new(),
        };
        if ips.first() == Some(&"None") {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterIp(ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()).collect())
        }
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
        .collect();
    Some(ServiceSpec { kind, ports, publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false) })
}

fn named_port(name: Option<&str>, protocol: Option<&str>, port: Option<i32>) -> Option<Port> {
    let name = name.filter(|n| !n.is_empty())?;
    Some(Port { name: name.into(), proto: Proto::from_k8s(protocol)?, port: u16::try_from(port?).ok()? })
}

/// The DNS view of an EndpointSlice.
pub fn slice_change(s: &EndpointSlice) -> Change {
    Change::Slice {
        namespace: s.namespace().unwrap_or_default(),
        service: s.labels().get(LABEL_SERVICE_NAME).cloned(),
        name: s.name_any(),
        spec: slice_spec(s),
    }
}

fn slice_spec(s: &EndpointSlice) -> Option<SliceSpec> {
    // FQDN slices name hosts, not addresses: nothing for A/AAAA/SRV.
    if s.address_type == "FQDN" {
        return None;
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .filter_map(|e| {
            Some(Endpoint {
                addr: e.addresses.first()?.parse().ok()?,
                hostname: e.hostname.as_deref().filter(|h| !h.is_empty()).map(Arc::from),
                // "nil should be interpreted as true" (EndpointConditions).
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
        })
        .collect();
    Some(SliceSpec { ports, endpoints })
}

/// Starts the watches; `ready` is set once both have listed everything.
pub fn start(client: &Client, index: &Arc<RwLock<Index>>, metrics: &Metrics, ready: &Readiness) -> Vec<JoinHandle<()>> {
    let (svc_tx, svc_rx) = oneshot::channel();
    let (slice_tx, slice_rx) = oneshot::channel();
    let mut tasks = vec![
        spawn(Api::<Service>::all(client.clone()), Kind::Service, index.clone(), metrics.clone(), svc_tx, service_change),
        spawn(Api::<EndpointSlice>::all(client.clone()), Kind::Slice, index.clone(), metrics.clone(), slice_tx, slice_change),
    ];
    let ready = ready.clone();
    tasks.push(tokio::spawn(async move {
        if svc_rx.await.is_ok() && slice_rx.await.is_ok() {
            ready.set();
            tracing::info!("services and endpointslices listed: ready");
            release_list_memory();
        }
    }));
    tasks
}

/// The first lists decode every Service and EndpointSlice at once; once
/// they are in the index that memory is free but glibc keeps it in the
/// heap. `malloc_trim` hands the free pages back (a few MiB at 10,000
/// Services, against a 32 MiB budget).
fn release_list_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::Slice => "endpointslices",
    }
}

fn spawn<K>(
    api: Api<K>,
    kind: Kind,
    index: Arc<RwLock<Index>>,
    metrics: Metrics,
    synced: oneshot::Sender<()>,
    convert: fn(&K) -> Change,
) -> JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut synced = Some(synced);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let change = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => Some(convert(&o)),
                Ok(watcher::Event::Delete(o)) => Some(convert(&o).deleted()),
                Ok(watcher::Event::Init) => {
                    write(&index).begin_relist(kind);
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    write(&index).end_relist(kind);
                    if let Some(tx) = synced.take() {
                        let _ = tx.send(());
                    }
                    None
                }
                Err(e) => {
                    metrics.watch_errors.get_or_create(&KindLabel { kind: kind_label(kind) }).inc();
                    tracing::warn!(kind = kind_label(kind), error = %e, "watch failed; retrying with backoff");
                    continue;
                }
            };
            let counts = {
                let mut ix = write(&index);
                if let Some(c) = change {
                    c.apply(&mut ix);
                }
                ix.counts()
            };
            metrics.services.set(i64::try_from(counts.services).unwrap_or(i64::MAX));
            metrics.endpoints.set(i64::try_from(counts.endpoints).unwrap_or(i64::MAX));
        }
    })
}

fn write(index: &RwLock<Index>) -> std::sync::RwLockWriteGuard<'_, Index> {
    index.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{ServicePort, ServiceSpec as K8sServiceSpec},
            discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn services_become_their_dns_kind() {
        let svc = |spec: K8sServiceSpec| Service { metadata: meta("web", &[]), spec: Some(spec), status: None };
        let port = |name: &str, proto: Option<&str>, port| ServicePort {
            name: Some(name.into()),
            protocol: proto.map(Into::into),
            port,
            ..Default::default()
        };
        let c = service_spec(&svc(K8sServiceSpec {
            cluster_ip: Some("10.43.0.5".into()),
            cluster_ips: Some(vec!["10.43.0.5".into(), "fd00:43::5".into()]),
            ports: Some(vec![port("http", None, 80), port("", None, 81), port("dns", Some("UDP"), 53)]),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(c.kind, ServiceKind::ClusterIp(["10.43.0.5".parse().unwrap(), "fd00:43::5".parse().unwrap()].into()));
        assert_eq!(
            &*c.ports,
            [Port { name: "http".into(), proto: Proto::Tcp, port: 80 }, Port { name: "dns".into(), proto: Proto::Udp, port: 53 }],
            "unnamed ports have no SRV"
        );
        let h = service_spec(&svc(K8sServiceSpec { cluster_ip: Some("None".into()), publish_not_ready_addresses: Some(true), ..Default::default() })).unwrap();
        assert_eq!(h.kind, ServiceKind::Headless);
        assert!(h.publish_not_ready);
        let e = service_spec(&svc(K8sServiceSpec {
            type_: Some("ExternalName".into()),
            external_name: Some("www.example.com".into()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(e.kind, ServiceKind::ExternalName(Name::from_ascii("www.example.com.").unwrap()));
        let pending = service_spec(&svc(K8sServiceSpec::default())).unwrap();
        assert_eq!(pending.kind, ServiceKind::ClusterIp([].into()), "no ClusterIP yet: the name exists, no A");
    }

    #[test]
    fn slices_keep_first_address_hostname_and_readiness() {
        let ep = |addrs: &[&str], host: Option<&str>, ready: Option<bool>| K8sEndpoint {
            addresses: addrs.iter().map(|a| (*a).to_owned()).collect(),
            hostname: host.map(Into::into),
            conditions: Some(EndpointConditions { ready, ..Default::default() }),
            ..Default::default()
        };
        let s = EndpointSlice {
            metadata: meta("db-x1", &[(LABEL_SERVICE_NAME, "db")]),
            address_type: "IPv4".into(),
            endpoints: vec![ep(&["10.42.0.5", "10.42.0.6"], Some("db-0"), Some(true)), ep(&["10.42.1.5"], None, None), ep(&["10.42.2.5"], None, Some(false))],
            ports: Some(vec![EndpointPort { name: Some("pg".into()), port: Some(5432), ..Default::default() }]),
        };
        let Change::Slice { service, name, spec: Some(spec), .. } = slice_change(&s) else { panic!() };
        assert_eq!((service.as_deref(), name.as_str()), (Some("db"), "db-x1"));
        assert_eq!(&*spec.ports, [Port { name: "pg".into(), proto: Proto::Tcp, port: 5432 }]);
        let got: Vec<(String, Option<&str>, bool)> =
            spec.endpoints.iter().map(|e| (e.addr.to_string(), e.hostname.as_deref(), e.ready)).collect();
        assert_eq!(
            got,
            [("10.42.0.5".into(), Some("db-0"), true), ("10.42.1.5".into(), None, true), ("10.42.2.5".into(), None, false)]
        );
        let fqdn = EndpointSlice { address_type: "FQDN".into(), ..s };
        assert!(matches!(slice_change(&fqdn), Change::Slice { spec: None, .. }));
    }
}
