//! The desired state of the node's Service maps, computed from Kubernetes
//! objects. Pure functions only: no I/O, no clocks, so every Kubernetes rule
//! here has a unit test.
//!
//! One Service port yields one [`Frontend`] per address it is reachable on
//! (ClusterIPs, this node's IPs for the NodePort, externalIPs, load-balancer
//! ingress IPs); local Pods with `hostPort` yield frontends too. Each
//! frontend carries the backends new connections may use and the
//! terminating backends that existing connections may still be using.
//!
//! The rules follow kube-proxy (`pkg/proxy/topology.go`,
//! `pkg/proxy/endpointslicecache.go`, `pkg/proxy/servicechangetracker.go`),
//! which is what "Kubernetes semantics" means in practice.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::{Deserialize, Serialize};

/// Label that marks a Service as handled by another proxy (kube-proxy's
/// `service.kubernetes.io/service-proxy-name`): a set label means "not ours"
/// unless it names us.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that makes kube-proxy ignore a Service (`service.kubernetes.io/headless`).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// L4 protocol of a frontend. SCTP is not supported by the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Parses a Kubernetes protocol (`None` means TCP, the API default).
    /// `Err` carries the unsupported name.
    pub fn parse(p: Option<&str>) -> Result<Self, String> {
        match p.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(other.to_owned()),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// Where a frontend address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
    HostPort,
}

impl FrontendKind {
    /// Whether traffic to this frontend is "external" in the sense of
    /// `externalTrafficPolicy` (NodePort, externalIPs, load-balancer IPs).
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp | Self::HostPort)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
            Self::LoadBalancer => "LoadBalancer",
            Self::HostPort => "HostPort",
        })
    }
}

/// Who asked for a frontend. Ordering decides conflicts (two owners claiming
/// the same address:port): Services before Pods, then by namespace/name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "PascalCase")]
pub enum Owner {
    Service { namespace: String, name: String },
    Pod { namespace: String, name: String },
}

impl Owner {
    pub fn service(namespace: &str, name: &str) -> Self {
        Self::Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    pub fn pod(namespace: &str, name: &str) -> Self {
        Self::Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
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

/// One address:port a Service port answers on. NodePorts (and hostPorts
/// without a hostIP) answer on every node address: their `ip` is
/// `0.0.0.0`, which is how the datapath keys node-wide frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// A frontend's identity in the maps: two owners must never share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendId {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

/// Endpoint conditions reduced to what the datapath needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// `ready`: used for new flows.
    Active,
    /// `serving && terminating`: used for new flows only when no backend of
    /// the set is ready (KEP-1669); existing flows keep it.
    Terminating,
    /// Neither ready nor serving-terminating: only kept so flows already
    /// established to it are not cut while the endpoint exists.
    Quarantined,
}

/// One endpoint of a Service port, with the target port resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddrV4,
    pub state: BackendState,
    /// `nodeName` is this node.
    pub local: bool,
}

/// One Kubernetes Service port (or one Pod hostPort): the unit the datapath
/// library writes (`riptide_datapath::services::Service`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    /// Stable identity, e.g. `default/web:http`.
    pub name: String,
    pub owner: Owner,
    /// Service port name (container port name for hostPorts); may be empty.
    pub port_name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
    /// Every endpoint worth a backend entry, sorted by address.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
}

impl ServicePort {
    pub fn frontend_ids(&self) -> impl Iterator<Item = FrontendId> + '_ {
        self.frontends.iter().map(|f| FrontendId {
            ip: f.ip,
            port: f.port,
            protocol: self.protocol,
        })
    }

    /// Backends new connections may pick for traffic to `frontend`, for
    /// traffic from outside the cluster (`external`) or from inside.
    pub fn eligible(&self, kind: FrontendKind, external: bool) -> Vec<SocketAddrV4> {
        let local = match (kind.is_external(), external) {
            (true, true) => self.external_local,
            // In-cluster traffic to an external frontend of an eTP=Local
            // Service short-circuits to the cluster-wide endpoints
            // (kube-proxy jumps to the cluster policy chain).
            (true, false) => false,
            (false, _) => self.internal_local,
        };
        select(&self.backends, local)
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
    pub ports: Vec<ServicePort>,
    pub health_check: Option<HealthCheck>,
    /// Things deliberately left out, worth one log line when they change.
    pub notes: Vec<String>,
}

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub node_name: String,
    /// `--service-proxy-name`: Services labelled with exactly this value are
    /// ours; with `None`, any value of the label means "not ours".
    pub proxy_name: Option<String>,
}

/// Why a Service gets no frontends at all (`None` = it is ours).
pub fn skip_reason(svc: &Service, ctx: &NodeContext) -> Option<&'static str> {
    let labels = svc.metadata.labels.as_ref();
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
    slices: &[&EndpointSlice],
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
                && Protocol::parse(p.protocol.as_deref()) == Ok(protocol)
        }) else {
            continue;
        };
        let Some(port) = port.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            // Addresses of one endpoint are fungible; kube-proxy uses the first.
            let Some(ip) = ep.addresses.first().and_then(|a| parse_v4(a)) else {
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
fn state_of(cond: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>) -> BackendState {
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

/// The backends new connections may pick (kube-proxy `CategorizeEndpoints`):
/// ready ones; when none is ready, serving-and-terminating ones (KEP-1669).
/// With `local`, only endpoints on this node, and the fallback looks at
/// local endpoints only (a remote ready endpoint does not block it).
pub fn select(backends: &[Backend], local: bool) -> Vec<SocketAddrV4> {
    let candidates = || backends.iter().filter(move |b| !local || b.local);
    let ready: Vec<SocketAddrV4> = candidates()
        .filter(|b| b.state == BackendState::Active)
        .map(|b| b.addr)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates()
        .filter(|b| b.state == BackendState::Terminating)
        .map(|b| b.addr)
        .collect()
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
pub fn service_desired(svc: &Service, slices: &[&EndpointSlice], ctx: &NodeContext) -> Desired {
    let mut out = Desired::default();
    if skip_reason(svc, ctx).is_some() {
        return out;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    let name = svc.metadata.name.as_deref().unwrap_or("");
    let owner = Owner::service(namespace, name);

    // Deterministic order whatever order the store hands slices in.
    let mut slices: Vec<&EndpointSlice> = slices.to_vec();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

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

    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });

    let mut local_ready_ips: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let port_name = sp.name.clone().unwrap_or_default();
        let protocol = match Protocol::parse(sp.protocol.as_deref()) {
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
        let mut push = |kind, ip, port| frontends.push(Frontend { kind, ip, port });
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
        out.ports.push(ServicePort {
            name: port_key(&owner, &port_name, port, protocol),
            owner: owner.clone(),
            port_name,
            protocol,
            frontends,
            backends: eps.into_iter().map(|(b, _)| b).collect(),
            affinity_timeout,
            external_local,
            internal_local,
        });
    }

    let needs_hc = external_local && matches!(spec.type_.as_deref(), Some("LoadBalancer" | "NodePort"));
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
pub fn pod_desired(pod: &Pod, ctx: &NodeContext) -> Desired {
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
    let Some(pod_ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(parse_v4) else {
        return out;
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let owner = Owner::pod(namespace, name);
    let containers = spec.containers.iter().chain(spec.init_containers.iter().flatten());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(host_port) = port.host_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        let Ok(container_port) = u16::try_from(port.container_port) else {
            continue;
        };
        let protocol = match Protocol::parse(port.protocol.as_deref()) {
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
        out.ports.push(ServicePort {
            name: format!("{owner}:{ip}:{host_port}/{protocol}"),
            owner: owner.clone(),
            port_name: port.name.clone().unwrap_or_default(),
            protocol,
            frontends: vec![Frontend {
                kind: FrontendKind::HostPort,
                ip,
                port: host_port,
            }],
            backends: vec![Backend {
                addr: SocketAddrV4::new(pod_ip, container_port),
                state: BackendState::Active,
                local: true,
            }],
            affinity_timeout: None,
            external_local: false,
            internal_local: false,
        });
    }
    out
}

/// This node's IPv4 addresses from its Node object: InternalIP first, then
/// ExternalIP.
pub fn node_ips(node: &Node) -> Vec<Ipv4Addr> {
    let addrs: Vec<_> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .collect();
    let mut ips: Vec<Ipv4Addr> = ["InternalIP", "ExternalIP"]
        .iter()
        .flat_map(|t| addrs.iter().filter(move |a| a.type_ == *t))
        .filter_map(|a| parse_v4(&a.address))
        .collect();
    dedup(&mut ips);
    ips
}

/// A node's InternalIP (the address other nodes route its podCIDR to).
pub fn node_internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| parse_v4(&a.address))
}

/// A node's IPv4 podCIDR (`spec.podCIDRs` first, then `spec.podCIDR`, then
/// the range its agent claimed itself when the cluster has no node IPAM,
/// see [`crate::podcidr`]).
pub fn node_pod_cidr(node: &Node) -> Option<ipnetwork::Ipv4Network> {
    node_spec_pod_cidr(node).or_else(|| crate::podcidr::claimed(node))
}

/// The podCIDR cluster IPAM assigned (`spec.podCIDRs`, then `spec.podCIDR`).
pub fn node_spec_pod_cidr(node: &Node) -> Option<ipnetwork::Ipv4Network> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidrs
        .iter()
        .flatten()
        .chain(spec.pod_cidr.iter())
        .find_map(|c| riptide_cidr::parse("podCIDR", c).ok())
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
