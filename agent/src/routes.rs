//! Native routing between nodes: one route per remote node's podCIDR via
//! that node's InternalIP, in the agent's network namespace (rtnetlink).
//!
//! The agent's routes carry their own protocol number ([`RTPROT_RIPTIDE`]),
//! so a sync can tell them from everyone else's: it only ever deletes routes
//! with that protocol, and only ever adds routes inside the cluster's pod
//! range (`--cluster-cidr`), so it cannot clobber the host's routing.

use std::{collections::BTreeMap, net::Ipv4Addr};

use futures::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol},
};

/// `rtm_protocol` of riptide's routes (`ip route show proto 201`); unused by
/// iproute2's `rt_protos`.
pub const RTPROT_RIPTIDE: u8 = 201;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("listing routes")]
    List(#[source] rtnetlink::Error),
    #[error("adding route {cidr} via {via}")]
    Add {
        cidr: Ipv4Network,
        via: Ipv4Addr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("deleting route {cidr}")]
    Delete {
        cidr: Ipv4Network,
        #[source]
        source: rtnetlink::Error,
    },
}

/// What a sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub added: Vec<(Ipv4Network, Ipv4Addr)>,
    pub removed: Vec<Ipv4Network>,
    /// Desired routes refused because they lie outside the cluster range.
    pub refused: Vec<Ipv4Network>,
    /// Routes that could not be written (e.g. gateway not on a local link);
    /// retried on the next sync.
    pub failed: Vec<(Ipv4Network, String)>,
}

/// Programs the routes of the netns the connection was opened in.
pub struct Routes {
    handle: Handle,
    cluster: Ipv4Network,
    /// `--tunnel vxlan`: routes leave through this device with `onlink`
    /// (their gateway is the remote vxlan address, not on any subnet).
    oif: Option<u32>,
}

impl Routes {
    /// Opens a netlink connection in the calling thread's network namespace
    /// (the socket stays bound to it) and drives it on the current tokio
    /// runtime.
    pub fn new(cluster: Ipv4Network) -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle, cluster, oif: None })
    }

    /// Routes added from now on go through device `oif` with `onlink`
    /// (the tunnel), or through the kernel's choice (`None`: native).
    pub fn set_device(&mut self, oif: Option<u32>) {
        self.oif = oif;
    }

    /// riptide's routes in the main table: podCIDR → gateway.
    pub async fn list(&self) -> Result<BTreeMap<Ipv4Network, Ipv4Addr>, Error> {
        let mut out = BTreeMap::new();
        let mut stream = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = stream.try_next().await.map_err(Error::List)? {
            if let Some((cidr, via)) = ours(&msg) {
                out.insert(cidr, via);
            }
        }
        Ok(out)
    }

    /// Makes riptide's routes exactly `desired` (routes outside the cluster
    /// range are refused).
    pub async fn sync(&self, desired: &BTreeMap<Ipv4Network, Ipv4Addr>) -> Result<Report, Error> {
        let mut report = Report::default();
        let current = self.list().await?;
        for (cidr, via) in &current {
            if desired.get(cidr) != Some(via) {
                let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(cidr.network(), cidr.prefix())
                    .gateway(*via)
                    .protocol(RouteProtocol::Other(RTPROT_RIPTIDE))
                    .build();
                match self.handle.route().del(msg).execute().await {
                    Ok(()) => {
                        tracing::info!(cidr = %cidr, via = %via, "route removed");
                        report.removed.push(*cidr);
                    }
                    Err(source) => return Err(Error::Delete { cidr: *cidr, source }),
                }
            }
        }
        for (cidr, via) in desired {
            if !cidr.is_subnet_of(self.cluster) {
                report.refused.push(*cidr);
                continue;
            }
            if current.get(cidr) == Some(via) {
                continue;
            }
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(cidr.network(), cidr.prefix())
                .gateway(*via)
                .protocol(RouteProtocol::Other(RTPROT_RIPTIDE));
            if let Some(oif) = self.oif {
                b = b.output_interface(oif).onlink();
            }
            let msg = b.build();
            match self.handle.route().add(msg).replace().execute().await {
                Ok(()) => {
                    tracing::info!(cidr = %cidr, via = %via, "route added");
                    report.added.push((*cidr, *via));
                }
                Err(source) => {
                    let e = Error::Add { cidr: *cidr, via: *via, source };
                    report.failed.push((*cidr, crate::reconcile::error_chain(&e)));
                }
            }
        }
        for cidr in &report.refused {
            tracing::warn!(cidr = %cidr, cluster = %self.cluster, "not routing a podCIDR outside the cluster range");
        }
        Ok(report)
    }
}

/// `(dst, gateway)` of one of riptide's main-table routes.
fn ours(msg: &RouteMessage) -> Option<(Ipv4Network, Ipv4Addr)> {
    let h = &msg.header;
    if h.protocol != RouteProtocol::Other(RTPROT_RIPTIDE) || h.table != RouteHeader::RT_TABLE_MAIN {
        return None;
    }
    let mut dst = None;
    let mut gw = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
            _ => {}
        }
    }
    let cidr = Ipv4Network::new(dst?, h.destination_prefix_length).ok()?;
    Some((cidr, gw?))
}

/// Remote podCIDRs wanted on `self_name`: every other node with an IPv4
/// podCIDR inside `cluster` and an InternalIP. These feed the routes, the
/// node map (`rt_node4_v1`, where a podCIDR means "no masquerade towards
/// it") and the tunnel peers, so a podCIDR outside the cluster range (a
/// typo, a hostile claim annotation, `0.0.0.0/1`) is refused here, once for
/// all three, and returned with its Node's name for the warning.
pub fn desired_routes<'a>(
    self_name: &str,
    cluster: Ipv4Network,
    nodes: impl Iterator<Item = &'a crate::slim::SlimNode>,
) -> (BTreeMap<Ipv4Network, Ipv4Addr>, Vec<(String, Ipv4Network)>) {
    let mut refused = Vec::new();
    let desired = nodes
        .filter(|n| n.name() != self_name)
        .filter_map(|n| Some((n, crate::node::pod_cidr(n)?, crate::node::internal_ip(n)?)))
        .filter_map(|(n, cidr, ip)| {
            if cidr.is_subnet_of(cluster) {
                Some((cidr, ip))
            } else {
                refused.push((n.name().to_owned(), cidr));
                None
            }
        })
        .collect();
    (desired, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_skips_self_and_incomplete_nodes() {
        let node = |name: &str, cidr: Option<&str>, ip: Option<&str>| -> crate::slim::SlimNode {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"podCIDR": cidr},
                "status": {"addresses": ip.map(|ip| vec![serde_json::json!({"type": "InternalIP", "address": ip})]).unwrap_or_default()},
            }))
            .unwrap()
        };
        let nodes = [
            node("a", Some("10.42.0.0/24"), Some("198.18.0.1")),
            node("b", Some("10.42.1.0/24"), Some("198.18.0.2")),
            node("c", None, Some("198.18.0.3")),
            node("d", Some("10.42.3.0/24"), None),
        ];
        let (d, refused) = desired_routes("a", "10.42.0.0/16".parse().unwrap(), nodes.iter());
        assert_eq!(d, BTreeMap::from([("10.42.1.0/24".parse().unwrap(), "198.18.0.2".parse().unwrap())]));
        assert!(refused.is_empty());
    }

    #[test]
    fn desired_refuses_pod_cidrs_outside_the_cluster_range() {
        let node = |name: &str, cidr: &str, ip: &str| -> crate::slim::SlimNode {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"podCIDR": cidr},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
            }))
            .unwrap()
        };
        let nodes = [
            node("in", "10.42.1.0/24", "198.18.0.2"),
            node("half-the-internet", "0.0.0.0/1", "198.18.0.3"),
            node("overlapping", "10.0.0.0/8", "198.18.0.4"),
            node("elsewhere", "192.168.5.0/24", "198.18.0.5"),
        ];
        let (d, refused) = desired_routes("a", "10.42.0.0/16".parse().unwrap(), nodes.iter());
        assert_eq!(d.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.42.1.0/24"]);
        assert_eq!(
            refused.iter().map(|(n, c)| format!("{n} {c}")).collect::<Vec<_>>(),
            ["half-the-internet 0.0.0.0/1", "overlapping 10.0.0.0/8", "elsewhere 192.168.5.0/24"]
        );
    }
}
