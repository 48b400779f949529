//! The Service vocabulary: what a Kubernetes service port is, in the terms
//! the agent's model computes, its reconciler diffs, its CLI shows and the
//! [`Services`](super::Services) writer turns into map entries (Cilium keeps
//! one such vocabulary in `pkg/loadbalancer`).

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use ipnetwork::Ipv4Network;
use riptide_common::proto;
use serde::{Deserialize, Serialize};

use crate::maglev::TableSize;

/// L4 protocol of a service port. SCTP is not supported by the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number the maps key by.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

/// Parses a Kubernetes protocol name (`TCP`, `UDP`); `Err` carries the
/// unsupported name.
impl FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
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
    /// Answers on every node address: the frontend's `addr` is ignored.
    NodePort,
    ExternalIp,
    LoadBalancer,
    /// A Pod's hostPort: `addr` is the hostIP, or `0.0.0.0` for every node
    /// address.
    HostPort,
}

impl FrontendKind {
    /// Whether traffic to this frontend is "external" in the sense of
    /// `externalTrafficPolicy` (NodePort, externalIPs, load-balancer IPs);
    /// the ClusterIP obeys `internalTrafficPolicy` instead.
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

/// One address:port a service port answers on (its protocol is the
/// service's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl Frontend {
    /// The frontend's identity in the maps. Node-wide frontends (NodePorts,
    /// hostPorts without a hostIP) are keyed by `0.0.0.0`.
    pub fn id(&self, protocol: Protocol) -> FrontendId {
        let addr = match self.kind {
            FrontendKind::NodePort => Ipv4Addr::UNSPECIFIED,
            _ => self.addr,
        };
        FrontendId {
            addr,
            port: self.port,
            protocol,
        }
    }
}

/// A frontend's identity (what `rt_svc4_v1` is keyed by): two services must
/// never share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendId {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// Endpoint conditions reduced to what the datapath needs. The order is the
/// preference: a better state sorts first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// `ready`: used for new flows.
    Active,
    /// `serving && terminating`: used for new flows only when no backend is
    /// ready (KEP-1669); existing flows keep it.
    Terminating,
    /// Neither ready nor serving-terminating: kept only so established flows
    /// are not cut while the endpoint still exists.
    Quarantined,
}

/// One endpoint of a service port, with the target port resolved (named
/// ports per EndpointSlice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddrV4,
    pub state: BackendState,
    /// Runs on this node.
    pub local: bool,
}

/// A backend's identity: services share a backend entry by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: SocketAddrV4,
    pub protocol: Protocol,
}

/// externalTrafficPolicy / internalTrafficPolicy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// How a service picks a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Algorithm {
    /// A random slot (kube-proxy's behaviour).
    #[default]
    Random,
    /// Maglev consistent hashing of the 5-tuple (`rt_maglev4_v2`) on every
    /// frontend: every node picks the same backend for a flow and a backend
    /// change moves few flows. Socket LB still picks at random (no 5-tuple
    /// at connect time, and a local choice needs no agreement between
    /// nodes).
    Maglev(TableSize),
    /// Maglev on the frontends outside clients reach (NodePort, externalIPs,
    /// load-balancer IPs), where an upstream router may send one flow to
    /// different nodes; random on the ClusterIP and hostPorts, which only
    /// this node's clients reach (Cilium applies Maglev to north-south
    /// traffic only, for the same reason). The agent's cluster default.
    MaglevExternal(TableSize),
}

impl Algorithm {
    /// The Maglev table size a `kind` frontend uses; `None`: random.
    pub fn maglev(self, kind: FrontendKind) -> Option<TableSize> {
        match self {
            Self::Random => None,
            Self::Maglev(m) => Some(m),
            Self::MaglevExternal(m) => kind.is_external().then_some(m),
        }
    }
}

/// How a flow from outside to an external frontend (NodePort, externalIP,
/// load-balancer IP) reaches a backend on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LbMode {
    /// Source NAT to the node address: the reply comes back through the
    /// entry node, the backend sees the node (kube-proxy's behaviour).
    #[default]
    Snat,
    /// Direct Server Return: the packet keeps the client's address and
    /// carries the frontend in an IPv4 option; the backend's node answers
    /// the client directly. Per flow, the datapath falls back to source
    /// NAT where the option cannot go (MTU, tunnel routing).
    Dsr,
}

/// One Kubernetes service port (or one Pod hostPort): its frontends share
/// one backend list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Stable identity, e.g. `default/web:http`. Upserting the same name
    /// replaces the previous version.
    pub name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
    /// Every endpoint worth a backend entry (new flows use only the
    /// [eligible](Service::eligible) ones).
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` with `timeoutSeconds`.
    pub affinity_timeout_s: Option<u32>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// Backend selection for new flows.
    pub algorithm: Algorithm,
    /// `loadBalancerSourceRanges`: who may open flows to the
    /// [`FrontendKind::LoadBalancer`] frontends.
    pub source_ranges: SourceRanges,
    /// How outside clients of the external frontends reach a backend on
    /// another node.
    #[serde(default)]
    pub lb_mode: LbMode,
}

/// `spec.loadBalancerSourceRanges` of a service port. As kube-proxy, it
/// filters the load-balancer ingress IPs only; the NodePort, externalIPs
/// and ClusterIP stay open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceRanges {
    /// No ranges: every source.
    #[default]
    Any,
    /// Only sources inside one of these prefixes. Empty denies every
    /// source (a Service whose every range was invalid: never open by
    /// mistake).
    Only(Vec<Ipv4Network>),
}

impl SourceRanges {
    /// The prefixes normalized to (network address, length), deduplicated;
    /// `None` for [`SourceRanges::Any`].
    pub fn prefixes(&self) -> Option<BTreeSet<(Ipv4Addr, u8)>> {
        match self {
            Self::Any => None,
            Self::Only(v) => Some(v.iter().map(|n| (n.network(), n.prefix())).collect()),
        }
    }
}

impl Service {
    pub fn frontend_ids(&self) -> impl Iterator<Item = FrontendId> + '_ {
        self.frontends.iter().map(|f| f.id(self.protocol))
    }

    pub fn backend_addr(&self, b: &Backend) -> BackendAddr {
        BackendAddr {
            addr: b.addr,
            protocol: self.protocol,
        }
    }

    /// Whether new flows to a `kind` frontend may only use backends on this
    /// node: from outside the cluster (`external`) under
    /// `externalTrafficPolicy: Local`, to the ClusterIP under
    /// `internalTrafficPolicy: Local`. In-cluster traffic to an external
    /// frontend of an eTP=Local service uses every endpoint (kube-proxy
    /// jumps to the cluster policy chain).
    pub fn local_only(&self, kind: FrontendKind, external: bool) -> bool {
        match kind {
            FrontendKind::ClusterIp => self.internal_policy == TrafficPolicy::Local,
            FrontendKind::HostPort => false,
            _ => external && self.external_policy == TrafficPolicy::Local,
        }
    }

    /// The backends new flows to a `kind` frontend may pick, from outside
    /// the cluster (`external`) or from inside, sorted by address.
    pub fn eligible(&self, kind: FrontendKind, external: bool) -> Vec<&Backend> {
        eligible(&self.backends, self.local_only(kind, external))
    }
}

/// The backends new flows may pick (kube-proxy `CategorizeEndpoints`): ready
/// ones; when none is ready, serving-and-terminating ones (KEP-1669). With
/// `local_only`, only backends on this node, and the fallback looks at local
/// ones only (a remote ready backend does not block it). Sorted and
/// deduplicated by address, so the same endpoints always give the same slots.
pub fn eligible(backends: &[Backend], local_only: bool) -> Vec<&Backend> {
    let mut candidates: Vec<&Backend> = backends.iter().collect();
    candidates.sort_by_key(|b| b.addr);
    candidates.dedup_by_key(|b| b.addr);
    candidates.retain(|b| !local_only || b.local);
    let ready: Vec<&Backend> = candidates
        .iter()
        .copied()
        .filter(|b| b.state == BackendState::Active)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates
        .into_iter()
        .filter(|b| b.state == BackendState::Terminating)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn be(addr: &str, state: BackendState, local: bool) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            state,
            local,
        }
    }

    fn addrs(v: Vec<&Backend>) -> Vec<String> {
        v.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn ready_backends_win_sorted_and_deduplicated() {
        let bs = [
            be("10.42.1.5:80", BackendState::Active, false),
            be("10.42.0.9:80", BackendState::Terminating, true),
            be("10.42.0.5:80", BackendState::Active, true),
            be("10.42.0.5:80", BackendState::Active, true),
            be("10.42.0.7:80", BackendState::Quarantined, true),
        ];
        assert_eq!(
            addrs(eligible(&bs, false)),
            ["10.42.0.5:80", "10.42.1.5:80"]
        );
        assert_eq!(addrs(eligible(&bs, true)), ["10.42.0.5:80"]);
    }

    #[test]
    fn kep_1669_falls_back_to_serving_terminating_per_candidate_set() {
        let bs = [
            be("10.42.1.5:80", BackendState::Active, false),
            be("10.42.0.9:80", BackendState::Terminating, true),
            be("10.42.0.7:80", BackendState::Quarantined, true),
        ];
        // A remote ready backend does not block the local fallback.
        assert_eq!(addrs(eligible(&bs, true)), ["10.42.0.9:80"]);
        assert_eq!(addrs(eligible(&bs[1..], false)), ["10.42.0.9:80"]);
        assert!(eligible(&bs[2..], false).is_empty());
    }

    #[test]
    fn traffic_policies_pick_the_local_only_frontends() {
        let mut s = Service {
            name: "ns/web:http".into(),
            protocol: Protocol::Tcp,
            frontends: Vec::new(),
            backends: Vec::new(),
            affinity_timeout_s: None,
            external_policy: TrafficPolicy::Local,
            internal_policy: TrafficPolicy::Cluster,
            source_ranges: Default::default(),
            algorithm: Algorithm::Random,
            lb_mode: crate::service::LbMode::Snat,
        };
        assert!(s.local_only(FrontendKind::NodePort, true));
        assert!(s.local_only(FrontendKind::LoadBalancer, true));
        assert!(
            !s.local_only(FrontendKind::NodePort, false),
            "in-cluster traffic uses all"
        );
        assert!(
            !s.local_only(FrontendKind::ClusterIp, true),
            "the ClusterIP follows iTP"
        );
        s.internal_policy = TrafficPolicy::Local;
        assert!(s.local_only(FrontendKind::ClusterIp, false));
        assert!(!s.local_only(FrontendKind::HostPort, false));
    }

    #[test]
    fn maglev_external_applies_to_the_frontends_outside_clients_reach() {
        let m = TableSize::new(1021).unwrap();
        for (kind, want) in [
            (FrontendKind::ClusterIp, None),
            (FrontendKind::HostPort, None),
            (FrontendKind::NodePort, Some(m)),
            (FrontendKind::ExternalIp, Some(m)),
            (FrontendKind::LoadBalancer, Some(m)),
        ] {
            assert_eq!(Algorithm::MaglevExternal(m).maglev(kind), want, "{kind}");
            assert_eq!(Algorithm::Maglev(m).maglev(kind), Some(m), "{kind}");
            assert_eq!(Algorithm::Random.maglev(kind), None, "{kind}");
        }
    }

    #[test]
    fn node_wide_frontends_are_keyed_by_the_unspecified_address() {
        let np = Frontend {
            kind: FrontendKind::NodePort,
            addr: "198.18.0.1".parse().unwrap(),
            port: 30080,
        };
        assert_eq!(np.id(Protocol::Udp).to_string(), "0.0.0.0:30080/UDP");
        let ext = Frontend {
            kind: FrontendKind::ExternalIp,
            ..np
        };
        assert_eq!(ext.id(Protocol::Tcp).to_string(), "198.18.0.1:30080/TCP");
    }
}
