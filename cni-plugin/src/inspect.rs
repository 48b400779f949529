//! Reading an attachment back for CHECK: both ends of the veth up with the
//! configured MTU, the pod's address, default route and gateway neighbour,
//! the node's route to the pod, and the pod's tc programs on the host side
//! (what [`crate::link::create`] and [`crate::datapath::attach`] built).

use std::io;

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::LinkFlags,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};

use crate::{
    link::{Plan, Result, Wired, nl},
    netlink::{Netlink, fmt_mac, link_mac, link_mtu, link_name},
};

/// The state CHECK compares against.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub plan: &'a Plan,
    /// Pod MAC from prevResult, when it names one.
    pub pod_mac: Option<[u8; 6]>,
}

/// Verifies both sides of an attachment; returns what is wrong, or the
/// links found.
pub fn verify(node: &mut Netlink, pod: &mut Netlink, want: &Expect<'_>) -> Result<Result<Wired, String>> {
    let plan = want.plan;
    let Some(pod_link) = pod
        .link_by_name(&plan.pod_ifname)
        .map_err(nl("reading the pod's links"))?
    else {
        return Ok(Err(format!("interface {} is missing in the container", plan.pod_ifname)));
    };
    let Some(host) = node
        .link_by_name(&plan.host)
        .map_err(nl("reading the node's links"))?
    else {
        return Ok(Err(format!("host interface {} is missing", plan.host)));
    };
    let wired = Wired {
        host_index: host.header.index,
        host_mac: link_mac(&host).unwrap_or_default(),
        pod_index: pod_link.header.index,
        pod_mac: link_mac(&pod_link).unwrap_or_default(),
    };
    if let Some(mac) = want.pod_mac
        && mac != wired.pod_mac
    {
        return Ok(Err(format!(
            "{} has MAC {}, prevResult says {}",
            plan.pod_ifname,
            fmt_mac(wired.pod_mac),
            fmt_mac(mac)
        )));
    }
    for (l, side) in [(&pod_link, "container"), (&host, "node")] {
        let name = link_name(l).unwrap_or("?");
        if !l.header.flags.contains(LinkFlags::Up) {
            return Ok(Err(format!("{name} ({side}) is down")));
        }
        if link_mtu(l) != Some(plan.mtu) {
            return Ok(Err(format!("{name} ({side}) has MTU {:?}, config says {}", link_mtu(l), plan.mtu)));
        }
    }
    // Address.
    let addrs = pod
        .request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)
        .map_err(nl("listing the pod's addresses"))?;
    let has_addr = addrs.iter().any(|m| match m {
        RouteNetlinkMessage::NewAddress(a) => {
            a.header.index == wired.pod_index
                && a.header.prefix_len == 32
                && a.attributes
                    .iter()
                    .any(|x| matches!(x, AddressAttribute::Local(ip) if *ip == plan.pod_ip))
        }
        _ => false,
    });
    if !has_addr {
        return Ok(Err(format!("{} lacks address {}/32", plan.pod_ifname, plan.pod_ip)));
    }
    // Default route in the pod, route to the pod on the node.
    let pod_routes = routes(pod).map_err(nl("listing the pod's routes"))?;
    if !pod_routes.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && has_oif(r, wired.pod_index)
            && r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == plan.gateway))
    }) {
        return Ok(Err(format!("no default route via {} on {}", plan.gateway, plan.pod_ifname)));
    }
    let node_routes = routes(node).map_err(nl("listing the node's routes"))?;
    if !node_routes.iter().any(|r| {
        r.header.destination_prefix_length == 32
            && has_oif(r, wired.host_index)
            && r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == plan.pod_ip))
    }) {
        return Ok(Err(format!("no route to {} via {} on the node", plan.pod_ip, plan.host)));
    }
    // Gateway neighbour in the pod.
    let neighs = pod
        .request(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), NLM_F_DUMP)
        .map_err(nl("listing the pod's neighbours"))?;
    let gw_ok = neighs.iter().any(|m| match m {
        RouteNetlinkMessage::NewNeighbour(n) => {
            n.header.ifindex == wired.pod_index
                && n.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) if *ip == plan.gateway))
                && n.attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(m) if m.as_slice() == wired.host_mac))
        }
        _ => false,
    });
    if !gw_ok {
        return Ok(Err(format!(
            "no neighbour entry {} -> {} in the container",
            plan.gateway,
            fmt_mac(wired.host_mac)
        )));
    }
    // The pod's tc programs at ingress and egress of the host side.
    for (parent, hook) in [(CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")] {
        if !has_bpf_filter(node, wired.host_index, parent).map_err(nl(format!("listing tc filters on {}", plan.host)))? {
            return Ok(Err(format!("no bpf tc filter at {hook} of {}", plan.host)));
        }
    }
    Ok(Ok(wired))
}

fn has_oif(r: &RouteMessage, index: u32) -> bool {
    r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
}

fn routes(n: &mut Netlink) -> io::Result<Vec<RouteMessage>> {
    let mut q = RouteMessage::default();
    q.header.address_family = AddressFamily::Inet;
    Ok(n.request(RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) if r.header.table == RouteHeader::RT_TABLE_MAIN => Some(r),
            _ => None,
        })
        .collect())
}

/// clsact ingress: TC_H_CLSACT major, TC_H_MIN_INGRESS minor.
pub const CLSACT_INGRESS: TcHandle = TcHandle { major: 0xffff, minor: 0xfff2 };
/// clsact egress: TC_H_CLSACT major, TC_H_MIN_EGRESS minor.
pub const CLSACT_EGRESS: TcHandle = TcHandle { major: 0xffff, minor: 0xfff3 };

/// Is a `bpf` classifier attached under `parent` ([`CLSACT_INGRESS`] or
/// [`CLSACT_EGRESS`]) of `index`?
pub fn has_bpf_filter(n: &mut Netlink, index: u32, parent: TcHandle) -> io::Result<bool> {
    let mut q = TcMessage::default();
    q.header.index = i32::try_from(index).unwrap_or(i32::MAX);
    q.header.parent = parent;
    Ok(n.request(RouteNetlinkMessage::GetTrafficFilter(q), NLM_F_DUMP)?
        .iter()
        .any(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => f
                .attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf")),
            _ => false,
        }))
}
