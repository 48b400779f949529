//! The desired state of the node's Service maps, computed from Kubernetes
//! objects. Pure functions only: no I/O, no clocks, so every Kubernetes rule
//! here has a unit test.
//!
//! One Service port yields one [`lb::Service`] (the datapath library's
//! vocabulary, written to the maps as it is) with a [`Frontend`] per address
//! it is reachable on (ClusterIPs, the NodePort on every node address,
//! externalIPs, load-balancer ingress IPs); local Pods with `hostPort` yield
//! one per port too. Its backends are every endpoint worth an entry; which
//! of them new connections may use is [`lb::Service::eligible`], the
//! function the map writer runs.
//!
//! The rules follow kube-proxy (`pkg/proxy/topology.go`,
//! `pkg/proxy/endpointslicecache.go`, `pkg/proxy/servicechangetracker.go`),
//! which is what "Kubernetes semantics" means in practice.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use riptide_datapath::service::{
    self as lb, Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, TrafficPolicy,
};
use serde::{Deserialize, Serialize};

use crate::{
    reserved::Reserved,
    slim::{Conditions, SlimPod, SlimService, SlimSlice},
};

pub use crate::slim::{LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Who asked for a frontend. Ordering decides conflicts (two owners claiming
/// the same address:port): Services before Pods, then by namespace/name.
/// The names are the watch store's own strings where the owner comes from
/// an object in a store (the reconciler keeps an owner per Service and one
/// in each of its claims), so a clone copies no string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "PascalCase")]
pub enum Owner {
    Service {
        #[serde(with = "arc_str")]
        namespace: Arc<str>,
        #[serde(with = "arc_str")]
        name: Arc<str>,
    },
    Pod {
        #[serde(with = "arc_str")]
        namespace: Arc<str>,
        #[serde(with = "arc_str")]
        name: Arc<str>,
    },
}

impl Owner {
    pub fn service(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self::Service { namespace: namespace.into(), name: name.into() }
    }

    pub fn pod(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self::Pod { namespace: namespace.into(), name: name.into() }
    }
}

/// `Arc<str>` as a plain string (serde's `rc` feature is not enabled).
mod arc_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(d).map(Arc::from)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Pod { namespace, name } => write!(f, "pod/{namespace}/{name}"),
        }
    }
}

/// `healthCheckNodePort` of a Service with `externalTrafficPolicy: Local`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub port: u16,
    pub owner: Owner,
    /// Distinct ready endpoint IPs on this node, over all ports (kube-proxy
    /// `EndpointsMap.LocalReadyEndpoints`).
    pub local_endpoints: usize,
}

/// What one owner (Service or Pod) wants in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub ports: Vec<lb::Service>,
    pub health_check: Option<HealthCheck>,
    /// Things deliberately left out, worth one log line when they change.
    pub notes: Vec<String>,
    /// External frontend addresses refused ([`crate::reserved`]).
    pub refused: Vec<Ipv4Addr>,
    /// `loadBalancerSourceRanges` entries that do not parse (skipped).
    pub invalid_source_ranges: Vec<String>,
}

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
    /// `--service-proxy-name`: Services labelled with exactly this value are
    /// ours; with `None`, any value of the label means "not ours".
    pub proxy_name: Option<String>,
    /// Addresses no externalIP or LoadBalancer frontend may take.
    pub reserved: Reserved,
    /// Backend selection of Services without the annotation.
    pub lb: crate::lb_algorithm::Defaults,
    /// This node's address, when known at start (kube-proxy's
    /// `allowFromNode` rule of [`crate::source_ranges`]).
    pub node_ip: Option<Ipv4Addr>,
}

/// Why a Service gets no frontends at all (`None` = it is ours).
pub fn skip_reason(svc: &SlimService, ctx: &NodeContext) -> Option<&'static str> {
    let labels = svc.labels.as_ref();
    if let Some(v) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
        // kube-proxy selects `service-proxy-name DoesNotExist` (or `= name`
        // when started with one): any set value means another proxy owns it.
        if ctx.proxy_name.as_deref() != Some(v.as_str()) {
            return Some("labelled for another service proxy");
        }
    } else if ctx.proxy_name.is_some() {
        return Some("not labelled for this service proxy");
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Some("labelled service.kubernetes.io/headless");
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Some("no spec");
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some("type ExternalName");
    }
    // kube-proxy ShouldSkipService: no ClusterIP (headless "None" or unset)
    // means no VIP, even when externalIPs are set.
    match spec.cluster_ip.as_deref() {
        None | Some("" | "None") => Some("headless (no ClusterIP)"),
        Some(_) => None,
    }
}

/// Endpoints of the Service port named `port_name` with `protocol`, from all
/// of the Service's IPv4 slices. The port number comes from the slice port of
/// the same name and protocol: that is how a named `targetPort` is resolved,
/// per slice, by the EndpointSlice controller. Sorted by address.
fn endpoints_for_port(
    slices: &[&SlimSlice],
    port_name: &str,
    protocol: Protocol,
    node: &str,
) -> Vec<(Backend, bool)> {
    // (backend, ready-for-the-health-check)
    let mut by_addr: BTreeMap<SocketAddrV4, Backend> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && protocol_of(p.protocol.as_deref()) == Ok(protocol)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for ep in &*slice.endpoints {
            // Addresses of one endpoint are fungible; kube-proxy uses the
            // first (`address` holds it when it is IPv4).
            let Some(ip) = ep.address else {
                continue;
            };
            let new = Backend {
                addr: SocketAddrV4::new(ip, port),
                state: state_of(ep.conditions.as_ref()),
                local: ep.node_name.as_deref() == Some(node),
            };
            // The same address can sit in two slices while a pod moves
            // between them; the better condition wins.
            by_addr
                .entry(new.addr)
                .and_modify(|old| {
                    if new.state < old.state {
                        *old = new;
                    }
                })
                .or_insert(new);
        }
    }
    by_addr
        .into_values()
        .map(|b| (b, b.state == BackendState::Active))
        .collect()
}

/// Endpoint conditions → backend state. API: "ready: nil should be
/// interpreted as true"; "serving: if nil, consumers should defer to the
/// ready condition"; "terminating: nil should be interpreted as false".
fn state_of(cond: Option<&Conditions>) -> BackendState {
    let ready = cond.and_then(|c| c.ready).unwrap_or(true);
    let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
    if ready {
        BackendState::Active
    } else if serving && terminating {
        BackendState::Terminating
    } else {
        BackendState::Quarantined
    }
}

/// A Kubernetes protocol name (`None` means TCP, the API default); `Err`
/// carries an unsupported name.
fn protocol_of(p: Option<&str>) -> Result<Protocol, String> {
    p.unwrap_or("TCP").parse()
}

fn parse_v4(s: &str) -> Option<Ipv4Addr> {
    s.parse().ok()
}

/// The name the datapath knows a Service port by.
fn port_key(owner: &Owner, port_name: &str, port: u16, protocol: Protocol) -> String {
    if port_name.is_empty() {
        format!("{owner}:{port}/{protocol}")
    } else {
        format!("{owner}:{port_name}")
    }
}

/// The Service ports of one Service, given the EndpointSlices labelled with
/// its name (any order; slices of other Services must not be passed).
pub fn service_desired(svc: &SlimService, slices: &[&SlimSlice], ctx: &NodeContext) -> Desired {
    let mut out = Desired::default();
    if skip_reason(svc, ctx).is_some() {
        return out;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let namespace = Some(svc.namespace()).filter(|ns| !ns.is_empty()).unwrap_or("default");
    let name = svc.name();
    let owner = Owner::service(namespace, name);

    // Deterministic order whatever order the store hands slices in.
    let mut slices: Vec<&SlimSlice> = slices.to_vec();
    slices.sort_by(|a, b| a.name().cmp(b.name()));

    let mut cluster_ips: Vec<Ipv4Addr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|s| parse_v4(s))
        .collect();
    dedup(&mut cluster_ips);
    let mut external_ips: Vec<Ipv4Addr> =
        spec.external_ips.iter().flatten().filter_map(|s| parse_v4(s)).collect();
    dedup(&mut external_ips);
    let mut lb_ips: Vec<Ipv4Addr> = if spec.type_.as_deref() == Some("LoadBalancer") {
        svc.status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            // KEP-1860: ipMode Proxy means the load balancer delivers to the
            // node address, so the ingress IP must not be captured.
            .filter(|ing| ing.ip_mode.as_deref().unwrap_or("VIP") == "VIP")
            .filter_map(|ing| ing.ip.as_deref().and_then(parse_v4))
            .collect()
    } else {
        Vec::new()
    };
    dedup(&mut lb_ips);
    // Whatever the apiserver admitted: an external frontend on a node's
    // address or inside the cluster's ranges would capture traffic that
    // belongs to the node or the cluster.
    for (what, ips) in [("externalIP", &mut external_ips), ("LoadBalancer ingress IP", &mut lb_ips)] {
        ips.retain(|ip| match ctx.reserved.refusal(*ip) {
            Some(why) => {
                out.notes.push(format!("{what} {ip} refused: {why}"));
                out.refused.push(*ip);
                false
            }
            None => true,
        });
    }

    let policy = |p: Option<&str>| {
        if p.is_some_and(|p| p == "Local") {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        }
    };
    let external_policy = policy(spec.external_traffic_policy.as_deref());
    let internal_policy = policy(spec.internal_traffic_policy.as_deref());
    let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    let (algorithm, note) = crate::lb_algorithm::for_service(svc, ctx.lb);
    out.notes.extend(note);
    let (lb_mode, note) = crate::lb_mode::for_service(svc, ctx.lb.lb_mode);
    out.notes.extend(note);
    let ranges = crate::source_ranges::parse(
        spec.load_balancer_source_ranges.as_deref().unwrap_or_default(),
        &lb_ips,
        ctx.node_ip,
    );
    for bad in &ranges.invalid {
        out.notes.push(format!("loadBalancerSourceRanges entry {bad:?} skipped: not a CIDR"));
    }
    out.invalid_source_ranges = ranges.invalid;

    let mut local_ready_ips: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let port_name = sp.name.clone().unwrap_or_default();
        let protocol = match protocol_of(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(other) => {
                out.notes.push(format!(
                    "port {port_name:?} ({}/{other}) skipped: protocol not supported",
                    sp.port
                ));
                continue;
            }
        };
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let eps = endpoints_for_port(&slices, &port_name, protocol, &ctx.node_name);
        local_ready_ips.extend(eps.iter().filter(|(b, ready)| *ready && b.local).map(|(b, _)| *b.addr.ip()));

        let mut frontends = Vec::new();
        let mut push = |kind, addr, port| frontends.push(Frontend { kind, addr, port });
        for ip in &cluster_ips {
            push(FrontendKind::ClusterIp, *ip, port);
        }
        // kube-proxy programs a NodePort whenever the port has one (the
        // apiserver clears it when the type no longer allows it).
        if let Some(node_port) = sp.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
            push(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, node_port);
        }
        for ip in &external_ips {
            push(FrontendKind::ExternalIp, *ip, port);
        }
        for ip in &lb_ips {
            push(FrontendKind::LoadBalancer, *ip, port);
        }
        out.ports.push(lb::Service {
            name: port_key(&owner, &port_name, port, protocol),
            protocol,
            frontends,
            backends: eps.into_iter().map(|(b, _)| b).collect(),
            affinity_timeout_s,
            external_policy,
            internal_policy,
            algorithm,
            source_ranges: ranges.ranges.clone(),
            lb_mode,
        });
    }

    let needs_hc = external_policy == TrafficPolicy::Local && matches!(spec.type_.as_deref(), Some("LoadBalancer" | "NodePort"));
    if let Some(port) = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| needs_hc && *p != 0)
    {
        out.health_check = Some(HealthCheck {
            port,
            owner,
            local_endpoints: local_ready_ips.len(),
        });
    }
    out
}

/// hostPort entries of one Pod on this node: `hostIP:hostPort` (node-wide
/// when hostIP is unset or 0.0.0.0) → `podIP:containerPort`.
pub fn pod_desired(pod: &SlimPod, ctx: &NodeContext) -> Desired {
    let mut out = Desired::default();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    // With host networking the container already listens on the host port.
    if spec.host_network == Some(true) || spec.node_name.as_deref() != Some(ctx.node_name.as_str()) {
        return out;
    }
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return out;
    }
    let Some(pod_ip) = status.and_then(|s| s.pod_ip) else {
        return out;
    };
    let namespace = Some(pod.namespace()).filter(|ns| !ns.is_empty()).unwrap_or("default");
    let name = pod.name();
    let owner = Owner::pod(namespace, name);
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(host_port) = port.host_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        let Ok(container_port) = u16::try_from(port.container_port) else {
            continue;
        };
        let protocol = match protocol_of(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(other) => {
                out.notes.push(format!("hostPort {host_port}/{other} skipped: protocol not supported"));
                continue;
            }
        };
        let ip = port
            .host_ip
            .as_deref()
            .and_then(parse_v4)
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        out.ports.push(lb::Service {
            name: format!("{owner}:{ip}:{host_port}/{protocol}"),
            protocol,
            frontends: vec![Frontend {
                kind: FrontendKind::HostPort,
                addr: ip,
                port: host_port,
            }],
            backends: vec![Backend {
                addr: SocketAddrV4::new(pod_ip, container_port),
                state: BackendState::Active,
                local: true,
            }],
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: riptide_datapath::service::LbMode::Snat,
        });
    }
    out
}

/// Removes duplicates, keeping first occurrences in order.
fn dedup<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen = Vec::with_capacity(v.len());
    v.retain(|x| {
        if seen.contains(x) {
            false
        } else {
            seen.push(*x);
            true
        }
    });
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
