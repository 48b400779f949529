//! Pod interface plumbing: the veth pair, the pod's address, default route
//! and gateway neighbour, and the node's route and neighbour to the pod.
//!
//! Design (see README): the pod gets `ip/32` on CNI_IFNAME, a default route
//! `via <gateway> onlink` and a permanent neighbour entry mapping the gateway
//! (the range's first address) to the host-side veth's MAC, so the pod never
//! ARPs. The node gets `ip/32 dev <host veth> scope link` and a permanent
//! neighbour entry for the pod's MAC, so it never ARPs either.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        RouteScope, RouteType,
    },
};

use crate::{
    netlink::{Netlink, link_mac},
    netns::NetNs,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}")]
    Netlink {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} is missing after creating it")]
    Vanished { what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn nl(action: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let action = action.into();
    move |source| Error::Netlink { action, source }
}

/// Prefix of host-side veth names; the rest is 11 hex digits.
pub const HOST_PREFIX: &str = "rt";

/// The host-side veth name of an attachment: `rt` + 11 hex digits of a
/// 64-bit FNV-1a hash of `containerID/ifname` (13 bytes, under IFNAMSIZ).
/// Deterministic, so DEL and GC find the link from the attachment alone,
/// even after a crash lost everything else.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{HOST_PREFIX}{:011x}", h >> 20)
}

/// Could `name` be a host-side veth made by [`host_ifname`]?
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == HOST_PREFIX.len() + 11
        && name.starts_with(HOST_PREFIX)
        && name[HOST_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What to build for one attachment.
#[derive(Debug, Clone)]
pub struct Plan {
    pub host: String,
    pub pod_ifname: String,
    pub mtu: u32,
    pub pod_ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

/// What was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wired {
    pub host_index: u32,
    pub host_mac: [u8; 6],
    pub pod_index: u32,
    pub pod_mac: [u8; 6],
}

fn up_header(m: &mut LinkMessage) {
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
}

/// Creates the veth pair with the pod end directly in the pod's namespace
/// under its final name (one RTM_NEWLINK; no move or rename step), then
/// addresses and routes both sides.
pub fn create(node: &mut Netlink, pod: &mut Netlink, pod_ns: &NetNs, plan: &Plan) -> Result<Wired> {
    use std::os::fd::AsRawFd as _;

    // The peer cannot be created up: veth_open() fails with ENOTCONN until
    // the pair is linked, which happens after the peer is configured. It is
    // brought up below, in the pod's namespace.
    let mut peer = LinkMessage::default();
    peer.attributes = vec![
        LinkAttribute::IfName(plan.pod_ifname.clone()),
        LinkAttribute::Mtu(plan.mtu),
        LinkAttribute::NetNsFd(pod_ns.file().as_raw_fd()),
    ];
    let mut veth = LinkMessage::default();
    up_header(&mut veth);
    veth.attributes = vec![
        LinkAttribute::IfName(plan.host.clone()),
        LinkAttribute::Mtu(plan.mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]),
    ];
    node.request(RouteNetlinkMessage::NewLink(veth), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(nl(format!(
            "creating veth {} <-> {} in {}",
            plan.host,
            plan.pod_ifname,
            pod_ns.path().display()
        )))?;

    let host = node
        .link_by_name(&plan.host)
        .map_err(nl(format!("reading link {}", plan.host)))?
        .ok_or_else(|| Error::Vanished { what: format!("host link {}", plan.host) })?;
    let pod_link = pod
        .link_by_name(&plan.pod_ifname)
        .map_err(nl(format!("reading pod link {}", plan.pod_ifname)))?
        .ok_or_else(|| Error::Vanished { what: format!("pod link {}", plan.pod_ifname) })?;
    let wired = Wired {
        host_index: host.header.index,
        host_mac: link_mac(&host).unwrap_or_default(),
        pod_index: pod_link.header.index,
        pod_mac: link_mac(&pod_link).unwrap_or_default(),
    };

    // Pod side.
    let what = |s: &str| format!("{s} in the pod ({} {})", plan.pod_ifname, plan.pod_ip);
    let mut up = LinkMessage::default();
    up.header.index = wired.pod_index;
    up_header(&mut up);
    pod.request(RouteNetlinkMessage::SetLink(up), 0)
        .map_err(nl(what("setting up")))?;
    pod.request(RouteNetlinkMessage::NewAddress(address_msg(wired.pod_index, plan.pod_ip)), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(nl(what("adding address")))?;
    pod.request(
        RouteNetlinkMessage::NewNeighbour(neigh_msg(wired.pod_index, plan.gateway, wired.host_mac)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(nl(what("adding gateway neighbour")))?;
    pod.request(RouteNetlinkMessage::NewRoute(default_route_msg(wired.pod_index, plan.gateway)), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(nl(what("adding default route")))?;

    // Node side.
    let what = |s: &str| format!("{s} on the node ({} -> {})", plan.host, plan.pod_ip);
    node.request(
        RouteNetlinkMessage::NewNeighbour(neigh_msg(wired.host_index, plan.pod_ip, wired.pod_mac)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(nl(what("adding pod neighbour")))?;
    node.request(RouteNetlinkMessage::NewRoute(host_route_msg(wired.host_index, plan.pod_ip)), NLM_F_CREATE | NLM_F_REPLACE)
        .map_err(nl(what("adding route")))?;
    // Packets from the pod to other nodes or outside are routed by the
    // node: forwarding is enabled on this interface only (IN_DEV_FORWARD
    // is checked on the input device), not namespace-wide.
    let sysctl = format!("/proc/sys/net/ipv4/conf/{}/forwarding", plan.host);
    std::fs::write(&sysctl, "1").map_err(nl(format!("writing {sysctl}")))?;
    Ok(wired)
}

/// Deletes the host-side veth (its peer in the pod goes with it). Success if
/// it is already gone.
pub fn remove(node: &mut Netlink, host: &str) -> Result<bool> {
    let Some(link) = node.link_by_name(host).map_err(nl(format!("reading link {host}")))? else {
        return Ok(false);
    };
    node.del_link(link.header.index)
        .map_err(nl(format!("deleting link {host}")))?;
    Ok(true)
}

fn address_msg(index: u32, ip: Ipv4Addr) -> AddressMessage {
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    a.header.prefix_len = 32;
    a.header.scope = AddressScope::Universe;
    a.header.index = index;
    a.attributes = vec![
        AddressAttribute::Local(ip.into()),
        AddressAttribute::Address(ip.into()),
    ];
    a
}

fn neigh_msg(index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Inet;
    n.header.ifindex = index;
    n.header.state = NeighbourState::Permanent;
    n.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ];
    n
}

fn route_base(index: u32, scope: RouteScope) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = AddressFamily::Inet;
    r.header.table = RouteHeader::RT_TABLE_MAIN;
    r.header.protocol = RouteProtocol::Static;
    r.header.scope = scope;
    r.header.kind = RouteType::Unicast;
    r.attributes.push(RouteAttribute::Oif(index));
    r
}

fn default_route_msg(index: u32, gateway: Ipv4Addr) -> RouteMessage {
    let mut r = route_base(index, RouteScope::Universe);
    // onlink: the gateway is not inside any prefix on eth0 (the pod has a
    // /32); the permanent neighbour entry makes it reachable.
    r.header.flags = RouteFlags::Onlink;
    r.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
    r
}

fn host_route_msg(index: u32, pod_ip: Ipv4Addr) -> RouteMessage {
    let mut r = route_base(index, RouteScope::Link);
    r.header.destination_prefix_length = 32;
    r.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(pod_ip)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_deterministic_and_recognisable() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert_eq!(a, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef", "eth1"));
        assert_ne!(a, host_ifname("0123456789abcdeg", "eth0"));
        assert_eq!(a.len(), 13);
        assert!(is_host_ifname(&a));
        assert!(!is_host_ifname("rtt1234-n1-ul"));
        assert!(!is_host_ifname("eth0"));
        assert!(!is_host_ifname("rt0123456789abc"));
    }
}
