//! VXLAN overlay between nodes (`--tunnel vxlan`), the way flannel's
//! `vxlan` backend does it: one kernel vxlan device per node and, per remote
//! node, a route, a permanent ARP entry and a permanent FDB entry.
//!
//! ```text
//! riptide.vxlan  vxlan id <vni> dstport <port> local <node ip> dev <uplink> nolearning
//!                mtu <uplink mtu - 50>, mac mac_of(<node ip>), 10.42.N.0/32
//! route  <remote podCIDR> via <remote podCIDR>.0 dev riptide.vxlan onlink   (proto 201, routes.rs)
//! neigh  <remote podCIDR>.0 lladdr mac_of(<remote ip>) dev riptide.vxlan    permanent
//! fdb    mac_of(<remote ip>) dev riptide.vxlan dst <remote ip>              self permanent
//! ```
//!
//! Why the kernel device and not a collect-md device driven from eBPF: the
//! kernel does encapsulation, checksum offload, GRO and PMTU for us, the
//! datapath stays the same programs on one more Ethernet device, and `ip`,
//! `bridge` and tcpdump show what happens. The MAC of every node is derived
//! from its address (`0e:72:<ip>`), so nothing has to be exchanged through
//! Node annotations the way flannel's `backend-data` does.
//!
//! Everything on `riptide.vxlan` is riptide's: a sync deletes any address,
//! neighbour or FDB entry on it that is not wanted.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt as _;
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
};

/// Name of the node's vxlan device (≤ 15 bytes, IFNAMSIZ).
pub const DEVICE: &str = "riptide.vxlan";
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const OVERHEAD: u32 = 50;
/// IANA VXLAN port (flannel uses the Linux default 8472; we use the standard).
pub const DEFAULT_PORT: u16 = 4789;
pub const DEFAULT_VNI: u32 = 1;
/// Routing table of the return path (see [`Tunnel::sync_peers`]).
pub const TABLE: u32 = 201;
/// Priority of the rule `from <own podCIDR> lookup TABLE` (before `main`, 32766).
pub const RULE_PRIORITY: u32 = 10_201;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("uplink {name} not found")]
    NoUplink { name: String },
    #[error("{action} {DEVICE}")]
    Netlink {
        action: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
}

/// `--tunnel vxlan` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
        }
    }
}

/// The MAC of a node's vxlan device: locally administered, unicast
/// (`0e`: bits 0x02 set, 0x01 clear), then the node's IPv4 address, so
/// every node computes every other node's MAC from its InternalIP.
pub fn mac_of(node_ip: Ipv4Addr) -> [u8; 6] {
    let o = node_ip.octets();
    [0x0e, 0x72, o[0], o[1], o[2], o[3]]
}

/// The address of a node's vxlan device and the next hop of its podCIDR
/// (`<podCIDR network>.0`, as flannel).
pub fn gateway_of(pod_cidr: Ipv4Network) -> Ipv4Addr {
    pod_cidr.network()
}

fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One remote node's tunnel entries, for `riptide status`.
pub fn describe_peer(cidr: Ipv4Network, node_ip: Ipv4Addr) -> String {
    format!(
        "{cidr} via {} dev {DEVICE} onlink, lladdr {}, fdb dst {node_ip}",
        gateway_of(cidr),
        fmt_mac(&mac_of(node_ip))
    )
}

/// The device as wanted on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    vni: u32,
    port: u16,
    local: Ipv4Addr,
    uplink: u32,
    mtu: u32,
}

impl Spec {
    /// True when the existing device `m` was created with these parameters
    /// (MTU and MAC are fixed up in place, the rest needs a new device).
    fn matches(&self, m: &LinkMessage) -> bool {
        let mut kind_ok = false;
        let (mut vni, mut port, mut local, mut link, mut learning) = (None, None, None, None, None);
        for a in &m.attributes {
            let LinkAttribute::LinkInfo(infos) = a else {
                continue;
            };
            for i in infos {
                match i {
                    LinkInfo::Kind(InfoKind::Vxlan) => kind_ok = true,
                    LinkInfo::Data(InfoData::Vxlan(d)) => {
                        for x in d {
                            match x {
                                InfoVxlan::Id(v) => vni = Some(*v),
                                InfoVxlan::Port(p) => port = Some(*p),
                                InfoVxlan::Local(l) => local = Some(*l),
                                InfoVxlan::Link(l) => link = Some(*l),
                                InfoVxlan::Learning(l) => learning = Some(*l),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        kind_ok
            && vni == Some(self.vni)
            && port == Some(self.port)
            && local == Some(self.local)
            && link == Some(self.uplink)
            && learning == Some(false)
    }
}

/// What a peer sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub added: Vec<Ipv4Addr>,
    pub removed: usize,
    /// Entries that could not be written; retried on the next sync.
    pub failed: Vec<(Ipv4Addr, String)>,
}

/// The node's vxlan device and its per-peer entries, in the netns the
/// connection was opened in.
pub struct Tunnel {
    handle: Handle,
    cfg: VxlanConfig,
    ifindex: Option<u32>,
}

fn nl(action: &'static str) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { action, source }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

impl Tunnel {
    /// Opens a netlink connection in the calling thread's network namespace
    /// and drives it on the current tokio runtime.
    pub fn new(cfg: VxlanConfig) -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            cfg,
            ifindex: None,
        })
    }

    /// The device's ifindex once [`Tunnel::ensure_device`] succeeded.
    pub fn ifindex(&self) -> Option<u32> {
        self.ifindex
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, Error> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::Netlink {
                action: "looking up links for",
                source: e,
            }),
        }
    }

    /// Makes `riptide.vxlan` exist with this node's parameters, its address
    /// `<pod_cidr>.0/32`, and up. Reuses a device left by an earlier run when
    /// its parameters match, else replaces it. Returns the ifindex and
    /// whether the device is new (its tc programs must be attached again).
    pub async fn ensure_device(
        &mut self,
        local: Ipv4Addr,
        uplink: &str,
        pod_cidr: Ipv4Network,
    ) -> Result<(u32, bool), Error> {
        let up = self
            .link_by_name(uplink)
            .await?
            .ok_or_else(|| Error::NoUplink {
                name: uplink.to_owned(),
            })?;
        let up_mtu = up
            .attributes
            .iter()
            .find_map(|a| {
                if let LinkAttribute::Mtu(m) = a {
                    Some(*m)
                } else {
                    None
                }
            })
            .unwrap_or(1500);
        let spec = Spec {
            vni: self.cfg.vni,
            port: self.cfg.port,
            local,
            uplink: up.header.index,
            mtu: up_mtu.saturating_sub(OVERHEAD),
        };
        let mac = mac_of(local).to_vec();
        let mut created = false;
        let existing = self.link_by_name(DEVICE).await?;
        let index = match existing {
            Some(m) if spec.matches(&m) => m.header.index,
            other => {
                if let Some(m) = other {
                    tracing::info!(
                        device = DEVICE,
                        "parameters changed; recreating the vxlan device"
                    );
                    self.handle
                        .link()
                        .del(m.header.index)
                        .execute()
                        .await
                        .map_err(nl("deleting"))?;
                }
                let msg = LinkVxlan::new(DEVICE, spec.vni)
                    .port(spec.port)
                    .local(spec.local)
                    .dev(spec.uplink)
                    .learning(false)
                    .mtu(spec.mtu)
                    .address(mac.clone())
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(nl("creating"))?;
                created = true;
                let m = self.link_by_name(DEVICE).await?.ok_or(Error::Netlink {
                    action: "finding the new",
                    source: rtnetlink::Error::RequestFailed,
                })?;
                tracing::info!(device = DEVICE, vni = spec.vni, port = spec.port, local = %spec.local, uplink, mtu = spec.mtu, "vxlan device created");
                m.header.index
            }
        };
        // MTU and MAC may be changed in place (e.g. the uplink MTU changed).
        let cur = self.link_by_name(DEVICE).await?;
        let needs_set = cur.as_ref().is_none_or(|m| {
            let mtu_ok = m
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Mtu(x) if *x == spec.mtu));
            let mac_ok = m
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Address(x) if *x == mac));
            !(mtu_ok && mac_ok && m.header.flags.contains(LinkFlags::Up))
        });
        if needs_set {
            let msg = LinkUnspec::new_with_index(index)
                .mtu(spec.mtu)
                .address(mac)
                .up()
                .build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(nl("configuring"))?;
        }
        self.ensure_address(index, gateway_of(pod_cidr)).await?;
        self.ensure_rule(pod_cidr).await?;
        self.ifindex = Some(index);
        Ok((index, created))
    }

    /// Exactly one address on the device: `gw/32`.
    async fn ensure_address(&self, index: u32, gw: Ipv4Addr) -> Result<(), Error> {
        let mut have = false;
        let mut stale: Vec<AddressMessage> = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing addresses of"))? {
            if m.header.index != index {
                continue;
            }
            let addr = m.attributes.iter().find_map(|a| {
                if let AddressAttribute::Address(a) = a {
                    Some(*a)
                } else {
                    None
                }
            });
            if addr == Some(IpAddr::V4(gw)) && m.header.prefix_len == 32 {
                have = true;
            } else if addr.is_some_and(|a| a.is_ipv4()) {
                stale.push(m);
            }
        }
        for m in stale {
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .map_err(nl("removing a stale address of"))?;
        }
        if !have {
            self.handle
                .address()
                .add(index, IpAddr::V4(gw), 32)
                .replace()
                .execute()
                .await
                .map_err(nl("adding the address of"))?;
        }
        Ok(())
    }

    /// The return path: pod-sourced packets to other nodes' addresses go
    /// through the tunnel too (`from <own podCIDR> lookup TABLE`). A backend
    /// of a NodePort flow another node source-NATed answers that node's
    /// address; through the uplink that reply would carry the pod's
    /// address over the underlay, which routers with anti-spoofing and
    /// clouds with source checks drop.
    async fn ensure_rule(&self, pod_cidr: Ipv4Network) -> Result<(), Error> {
        let mut have = false;
        let mut stale = Vec::new();
        let mut s = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing rules for"))? {
            if !m
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PRIORITY))
            {
                continue;
            }
            let src = m.attributes.iter().find_map(|a| {
                if let RuleAttribute::Source(IpAddr::V4(ip)) = a {
                    Some(*ip)
                } else {
                    None
                }
            });
            let table = m
                .attributes
                .iter()
                .find_map(|a| {
                    if let RuleAttribute::Table(t) = a {
                        Some(*t)
                    } else {
                        None
                    }
                })
                .unwrap_or(u32::from(m.header.table));
            if src == Some(pod_cidr.network())
                && m.header.src_len == pod_cidr.prefix()
                && table == TABLE
                && !have
            {
                have = true;
            } else {
                stale.push(m);
            }
        }
        for m in stale {
            self.handle
                .rule()
                .del(m)
                .execute()
                .await
                .map_err(nl("removing a stale rule for"))?;
        }
        if !have {
            self.handle
                .rule()
                .add()
                .v4()
                .source_prefix(pod_cidr.network(), pod_cidr.prefix())
                .table_id(TABLE)
                .priority(RULE_PRIORITY)
                .action(RuleAction::ToTable)
                .execute()
                .await
                .map_err(nl("adding the return-path rule for"))?;
        }
        Ok(())
    }

    /// riptide's routes in [`TABLE`]: peer node IP → next hop.
    async fn list_table(&self) -> Result<BTreeMap<Ipv4Addr, (Ipv4Addr, RouteMessage)>, Error> {
        let mut out = BTreeMap::new();
        let mut s = self
            .handle
            .route()
            .get(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(TABLE)
                    .build(),
            )
            .execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(nl("listing return-path routes for"))?
        {
            let table = m
                .attributes
                .iter()
                .find_map(|a| {
                    if let RouteAttribute::Table(t) = a {
                        Some(*t)
                    } else {
                        None
                    }
                })
                .unwrap_or(u32::from(m.header.table));
            if table != TABLE
                || m.header.protocol != RouteProtocol::Other(crate::routes::RTPROT_RIPTIDE)
                || m.header.destination_prefix_length != 32
            {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gw = Some(*ip),
                    _ => {}
                }
            }
            if let (Some(d), Some(g)) = (dst, gw) {
                out.insert(d, (g, m));
            }
        }
        Ok(out)
    }

    /// Makes the ARP and FDB entries on the device exactly those of `peers`
    /// (remote podCIDR → remote node IP), and the return-path routes (peer
    /// node IP → its tunnel address, in [`TABLE`]). The podCIDR routes are
    /// [`crate::routes`]'.
    pub async fn sync_peers(
        &self,
        peers: &BTreeMap<Ipv4Network, Ipv4Addr>,
    ) -> Result<Report, Error> {
        let mut report = Report::default();
        let Some(index) = self.ifindex else {
            return Ok(report);
        };
        self.sync_table(index, peers, &mut report).await?;
        // Wanted: gateway → MAC, MAC → remote.
        let want_neigh: BTreeMap<Ipv4Addr, [u8; 6]> = peers
            .iter()
            .map(|(c, ip)| (gateway_of(*c), mac_of(*ip)))
            .collect();
        let want_fdb: BTreeMap<[u8; 6], Ipv4Addr> =
            peers.values().map(|ip| (mac_of(*ip), *ip)).collect();

        let (neigh, fdb) = self.list_entries(index).await?;
        for (gw, mac) in &neigh {
            if want_neigh.get(gw).map(<[u8; 6]>::as_slice) != Some(mac.as_slice()) {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*gw)));
                self.handle
                    .neighbours()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl("removing a neighbour of"))?;
                report.removed += 1;
            }
        }
        for (mac, dst) in &fdb {
            let keep = <[u8; 6]>::try_from(mac.as_slice())
                .ok()
                .and_then(|k| want_fdb.get(&k))
                .is_some_and(|d| Some(*d) == *dst);
            if !keep {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = index;
                m.header.flags = NeighbourFlags::Own;
                m.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.clone()));
                if let Some(d) = dst {
                    m.attributes
                        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*d)));
                }
                self.handle
                    .neighbours()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl("removing an FDB entry of"))?;
                report.removed += 1;
            }
        }
        for ip in peers.values() {
            let mac = mac_of(*ip);
            if fdb
                .iter()
                .any(|(m, d)| m.as_slice() == mac && *d == Some(*ip))
            {
                continue;
            }
            let r = self
                .handle
                .neighbours()
                .add_bridge(index, &mac)
                .destination(IpAddr::V4(*ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .kind(RouteType::Unspec)
                .replace()
                .execute()
                .await;
            match r {
                Ok(()) => report.added.push(*ip),
                Err(e) => report.failed.push((*ip, format!("fdb entry: {e}"))),
            }
        }
        for (gw, mac) in &want_neigh {
            if neigh.get(gw).map(Vec::as_slice) == Some(mac.as_slice()) {
                continue;
            }
            let r = self
                .handle
                .neighbours()
                .add(index, IpAddr::V4(*gw))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await;
            if let Err(e) = r {
                report.failed.push((*gw, format!("neighbour entry: {e}")));
            }
        }
        for (ip, e) in &report.failed {
            tracing::warn!(peer = %ip, error = %e, "tunnel entry not written; retried on the next sync");
        }
        if !report.added.is_empty() || report.removed > 0 {
            tracing::info!(added = ?report.added, removed = report.removed, "tunnel peers synced");
        }
        Ok(report)
    }

    async fn sync_table(
        &self,
        index: u32,
        peers: &BTreeMap<Ipv4Network, Ipv4Addr>,
        report: &mut Report,
    ) -> Result<(), Error> {
        let want: BTreeMap<Ipv4Addr, Ipv4Addr> =
            peers.iter().map(|(c, ip)| (*ip, gateway_of(*c))).collect();
        let have = self.list_table().await?;
        for (dst, (gw, m)) in have.iter() {
            if want.get(dst) != Some(gw) {
                self.handle
                    .route()
                    .del(m.clone())
                    .execute()
                    .await
                    .map_err(nl("removing a return-path route for"))?;
                report.removed += 1;
            }
        }
        for (dst, gw) in &want {
            if have.get(dst).map(|(g, _)| g) == Some(gw) {
                continue;
            }
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(*dst, 32)
                .gateway(*gw)
                .output_interface(index)
                .onlink()
                .table_id(TABLE)
                .protocol(RouteProtocol::Other(crate::routes::RTPROT_RIPTIDE))
                .build();
            if let Err(e) = self.handle.route().add(msg).replace().execute().await {
                report
                    .failed
                    .push((*dst, format!("return-path route: {e}")));
            }
        }
        Ok(())
    }

    /// Permanent IPv4 neighbours (gateway → MAC) and FDB entries (MAC →
    /// remote) on the device.
    async fn list_entries(
        &self,
        index: u32,
    ) -> Result<
        (
            BTreeMap<Ipv4Addr, Vec<u8>>,
            Vec<(Vec<u8>, Option<Ipv4Addr>)>,
        ),
        Error,
    > {
        let mut neigh = BTreeMap::new();
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing neighbours of"))? {
            if m.header.ifindex != index {
                continue;
            }
            let mut dst = None;
            let mut ll = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                    NeighbourAttribute::LinkLayerAddress(l) => ll = Some(l.clone()),
                    _ => {}
                }
            }
            if let Some(d) = dst {
                neigh.insert(d, ll.unwrap_or_default());
            }
        }
        let mut fdb = Vec::new();
        let mut s = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing FDB entries of"))? {
            if m.header.ifindex != index {
                continue;
            }
            let mut dst = None;
            let mut ll = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                    // AF_BRIDGE messages: the parser cannot tell the remote's
                    // family from the header, so NDA_DST comes as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => ll = Some(l.clone()),
                    _ => {}
                }
            }
            if let Some(l) = ll {
                fdb.push((l, dst));
            }
        }
        Ok((neigh, fdb))
    }

    /// Removes the device (with it go its routes, neighbours and FDB
    /// entries) and the return-path rule. Idempotent.
    pub async fn remove_device(&mut self) -> Result<bool, Error> {
        self.ifindex = None;
        let mut rules = Vec::new();
        let mut s = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(m) = s.try_next().await.map_err(nl("listing rules for"))? {
            if m.attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Priority(p) if *p == RULE_PRIORITY))
            {
                rules.push(m);
            }
        }
        for m in rules {
            self.handle
                .rule()
                .del(m)
                .execute()
                .await
                .map_err(nl("removing the return-path rule for"))?;
        }
        match self.link_by_name(DEVICE).await? {
            Some(m) => {
                self.handle
                    .link()
                    .del(m.header.index)
                    .execute()
                    .await
                    .map_err(nl("deleting"))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_local_unicast_and_distinct() {
        let a = mac_of(Ipv4Addr::new(198, 18, 5, 11));
        let b = mac_of(Ipv4Addr::new(198, 18, 5, 12));
        assert_eq!(a, [0x0e, 0x72, 198, 18, 5, 11]);
        assert_ne!(a, b);
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
        assert!(DEVICE.len() <= 15);
    }

    #[test]
    fn peer_description_names_every_entry() {
        let d = describe_peer(
            "10.42.2.0/24".parse().unwrap(),
            Ipv4Addr::new(198, 18, 5, 12),
        );
        assert_eq!(
            d,
            "10.42.2.0/24 via 10.42.2.0 dev riptide.vxlan onlink, lladdr 0e:72:c6:12:05:0c, fdb dst 198.18.5.12"
        );
    }
}
