//! What is measured: scenarios (who talks to what, where the server is) and
//! the data paths compared within each.
//!
//! Every ratio is taken inside one scenario against the direct path whose
//! client sits where the measured path's client sits, so the ratio isolates
//! what the Service translation costs:
//! - riptide's paths run in a pod wired by riptide's CNI, against `direct`
//!   from that pod;
//! - the kube-proxy-shaped baselines run in a pod wired like the reference
//!   `ptp` plugin (veth, /32 routes, no eBPF: what a kube-proxy cluster's
//!   CNI gives a pod), against `direct-plain` from that pod;
//! - NodePort paths run from the outside namespace. With the backend on
//!   node 1, against `direct` (outside → the pod's IP through node 1). With
//!   the backend on node 2, against `direct-sym`: outside → the pod's IP
//!   through node 1 with the reply routed back through node 1 too, the hops
//!   a NodePort with eTP=Cluster takes (its SNAT brings the reply back to
//!   node 1); `direct` there (the reply straight from node 2 to the client)
//!   is the limit no NodePort to a remote backend can reach.
//! - NetworkPolicy paths (`netpol`, `netpol-local`) run from riptide's
//!   client pod to the server pod's IP with 100 NetworkPolicies selecting
//!   the server (one of them allows the client), against `direct` measured
//!   while no policy exists: what enforcement costs a pod → pod flow.

use serde::{Deserialize, Serialize};

/// Who the client is and where the server pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scenario {
    /// Pod on node 1 → Service → pod on node 2.
    #[serde(rename = "clusterip")]
    ClusterIp,
    /// Pod on node 1 → Service → pod on node 1.
    #[serde(rename = "clusterip-local")]
    ClusterIpLocal,
    /// Outside client → node 1's address:NodePort → pod on node 2.
    #[serde(rename = "nodeport")]
    NodePort,
    /// Outside client → node 1's address:NodePort → pod on node 1.
    #[serde(rename = "nodeport-local")]
    NodePortLocal,
    /// Pod on node 1 → pod on node 2, with and without NetworkPolicy.
    #[serde(rename = "netpol")]
    NetPol,
    /// Pod on node 1 → pod on node 1, with and without NetworkPolicy.
    #[serde(rename = "netpol-local")]
    NetPolLocal,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::ClusterIp,
        Scenario::ClusterIpLocal,
        Scenario::NodePort,
        Scenario::NodePortLocal,
        Scenario::NetPol,
        Scenario::NetPolLocal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::ClusterIp => "clusterip",
            Scenario::ClusterIpLocal => "clusterip-local",
            Scenario::NodePort => "nodeport",
            Scenario::NodePortLocal => "nodeport-local",
            Scenario::NetPol => "netpol",
            Scenario::NetPolLocal => "netpol-local",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Scenario::ClusterIp => "pod → ClusterIP → pod on the other node",
            Scenario::ClusterIpLocal => "pod → ClusterIP → pod on the same node",
            Scenario::NodePort => "outside → NodePort on node 1 → pod on node 2",
            Scenario::NodePortLocal => "outside → NodePort on node 1 → pod on node 1",
            Scenario::NetPol => "pod → pod on the other node, 100 NetworkPolicies on the server",
            Scenario::NetPolLocal => "pod → pod on the same node, 100 NetworkPolicies on the server",
        }
    }

    /// The backend is the netserver pod on node 2 (else the one on node 1).
    pub fn remote_server(self) -> bool {
        matches!(
            self,
            Scenario::ClusterIp | Scenario::NodePort | Scenario::NetPol
        )
    }

    pub fn is_nodeport(self) -> bool {
        matches!(self, Scenario::NodePort | Scenario::NodePortLocal)
    }

    /// Whether the paths are measured at every Service count (no Service is
    /// on a NetworkPolicy path, so those run at the first count only).
    pub fn per_count(self) -> bool {
        !matches!(self, Scenario::NetPol | Scenario::NetPolLocal)
    }

    /// The paths measured in this scenario, the direct ones first.
    pub fn paths(self) -> &'static [DataPath] {
        match self {
            Scenario::ClusterIp => &[
                DataPath::Direct,
                DataPath::DirectPlain,
                DataPath::DirectNode,
                DataPath::RiptideSock,
                DataPath::RiptideTc,
                DataPath::Iptables,
                DataPath::Nftables,
            ],
            Scenario::ClusterIpLocal => &[
                DataPath::Direct,
                DataPath::DirectPlain,
                DataPath::RiptideSock,
                DataPath::RiptideTc,
                DataPath::Iptables,
                DataPath::Nftables,
            ],
            Scenario::NodePort => &[
                DataPath::Direct,
                DataPath::DirectSym,
                DataPath::Riptide,
                DataPath::Iptables,
                DataPath::Nftables,
            ],
            Scenario::NodePortLocal => &[
                DataPath::Direct,
                DataPath::Riptide,
                DataPath::Iptables,
                DataPath::Nftables,
            ],
            Scenario::NetPol | Scenario::NetPolLocal => &[DataPath::Direct, DataPath::Policy],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// No Service: the server pod's IP (ClusterIP scenarios: from riptide's
    /// client pod; NodePort scenarios: from outside, routed via node 1).
    Direct,
    /// No Service, from the plain-veth pod (the baselines' limit).
    DirectPlain,
    /// No Service, outside → pod on node 2 with both directions through
    /// node 1 (the hops of a NodePort to a remote backend).
    DirectSym,
    /// Node 1 → node 2's host network (reference: what the pod wiring costs).
    DirectNode,
    /// ClusterIP through riptide's socket LB (client in the pod's cgroup).
    RiptideSock,
    /// ClusterIP through riptide's per-packet tc path (client outside the
    /// pod's cgroup, so connect() is untouched).
    RiptideTc,
    /// NodePort through riptide (tc on node 1's uplink).
    Riptide,
    /// kube-proxy iptables-mode rules in node 1's namespace.
    Iptables,
    /// kube-proxy nftables-mode rules in node 1's namespace.
    Nftables,
    /// The direct path (server pod's IP from riptide's client pod) with 100
    /// NetworkPolicies selecting the server, installed only while measured.
    Policy,
}

impl DataPath {
    pub const ALL: [DataPath; 10] = [
        DataPath::Direct,
        DataPath::DirectPlain,
        DataPath::DirectSym,
        DataPath::DirectNode,
        DataPath::RiptideSock,
        DataPath::RiptideTc,
        DataPath::Riptide,
        DataPath::Iptables,
        DataPath::Nftables,
        DataPath::Policy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataPath::Direct => "direct",
            DataPath::DirectPlain => "direct-plain",
            DataPath::DirectSym => "direct-sym",
            DataPath::DirectNode => "direct-node",
            DataPath::RiptideSock => "riptide-sock",
            DataPath::RiptideTc => "riptide-tc",
            DataPath::Riptide => "riptide",
            DataPath::Iptables => "iptables",
            DataPath::Nftables => "nftables",
            DataPath::Policy => "policy",
        }
    }

    pub fn is_baseline_rules(self) -> bool {
        matches!(self, DataPath::Iptables | DataPath::Nftables)
    }

    /// The direct path a ratio is taken against (see the module doc), or
    /// `None` for the direct paths themselves. `direct-plain` is compared
    /// with `direct`: how riptide's pod wiring compares with a plain veth.
    pub fn baseline(self, scenario: Scenario) -> Option<DataPath> {
        match self {
            DataPath::Direct | DataPath::DirectNode => None,
            DataPath::DirectPlain
            | DataPath::DirectSym
            | DataPath::RiptideSock
            | DataPath::RiptideTc
            | DataPath::Policy => Some(DataPath::Direct),
            DataPath::Riptide | DataPath::Iptables | DataPath::Nftables
                if scenario == Scenario::NodePort =>
            {
                Some(DataPath::DirectSym)
            }
            DataPath::Riptide => Some(DataPath::Direct),
            DataPath::Iptables | DataPath::Nftables if scenario.is_nodeport() => {
                Some(DataPath::Direct)
            }
            DataPath::Iptables | DataPath::Nftables => Some(DataPath::DirectPlain),
        }
    }

    /// Whether this path is measured at every Service count, or only at the
    /// first (paths no Service count can affect: references).
    pub fn per_count(self) -> bool {
        !matches!(self, DataPath::DirectNode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_compared_path_has_its_baseline_in_the_scenario() {
        for s in Scenario::ALL {
            for p in s.paths() {
                if let Some(b) = p.baseline(s) {
                    assert!(
                        s.paths().contains(&b),
                        "{} {}: {} not measured",
                        s.name(),
                        p.name(),
                        b.name()
                    );
                }
            }
        }
    }
}
