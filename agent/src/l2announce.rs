//! L2 announcements, as Cilium's `l2announcements` do it: for every
//! Service with LoadBalancer ingress IPs or externalIPs, exactly one node
//! answers ARP for those addresses on its uplink, so a client on the same
//! L2 segment reaches them with no route. Which node is decided by a
//! `coordination.k8s.io` Lease per Service (`kube-system/riptide-l2-<ns>-<name>`,
//! leader election as client-go does it): the holder renews it every
//! [`Config::renew_every`]; when the holder's agent or node goes away the
//! Lease stops being renewed and, once [`Config::lease_duration`] has passed
//! without a change, another node takes it over and sends a gratuitous ARP
//! so clients move at once instead of when their neighbour entry expires.
//!
//! The addresses are the same the datapath serves (`model::service_desired`
//! frontends of kind externalIP / LoadBalancer), so an address the agent
//! refuses as a frontend ([`crate::reserved`]) is never announced either.
//!
//! ARP goes through an `AF_PACKET` socket bound to the uplink in the
//! agent's network namespace: the kernel does not answer for addresses it
//! does not hold, and no eBPF is involved. Every node still serves the
//! addresses (the uplink programs match them on any node); the announcer
//! only decides where the segment delivers them.
//!
//! Every node is a candidate, except for a Service with
//! `externalTrafficPolicy: Local`: there only nodes with a ready local
//! endpoint are (as Cilium does), since any other node drops that traffic.
//! A holder that stops being a candidate hands the Lease back (empty
//! holder) so a candidate takes it over on its next pass.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use riptide_datapath::service::{BackendState, FrontendKind, TrafficPolicy};

use crate::{
    metrics::Metrics,
    model::{self, NodeContext},
    slim::{SlimNode, SlimService, SlimSlice},
    store::Store,
};

/// Where the Leases live.
pub const LEASE_NAMESPACE: &str = "kube-system";
/// Lease name prefix (the Service's namespace and name follow).
pub const LEASE_PREFIX: &str = "riptide-l2-";

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
const ETH_HLEN: usize = 14;
const ARP_LEN: usize = 28;
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Undeclared(#[from] crate::watch::Undeclared),
    #[error("uplink {dev:?} for L2 announcements")]
    Uplink {
        dev: String,
        #[source]
        source: io::Error,
    },
}

/// `--l2-announcements` and its timing.
#[derive(Clone, Debug)]
pub struct Config {
    /// The device to answer ARP on (the agent's `--uplink`).
    pub uplink: String,
    /// A Lease not renewed for this long is taken over.
    pub lease_duration: Duration,
    /// How often the holder renews (and everyone re-checks).
    pub renew_every: Duration,
}

/// The Lease name of a Service (a DNS subdomain of at most 253 bytes).
pub fn lease_name(namespace: &str, name: &str) -> String {
    let mut s = format!("{LEASE_PREFIX}{namespace}-{name}");
    s.truncate(253);
    s
}

/// What to do about one Lease, judged from its current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it naming us.
    Create,
    /// Ours: renew it.
    Renew,
    /// Free (no holder) or expired: take it over.
    TakeOver,
    /// Someone else holds it and renews it.
    Follow,
}

/// Leader election over one Lease (client-go `tryAcquireOrRenew`): expiry
/// is judged by when *this* agent last saw the Lease change
/// (`unchanged_for`), never by comparing clocks with the holder.
pub fn step(lease: Option<&Lease>, me: &str, unchanged_for: Duration, default_duration: Duration) -> Step {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() { Step::TakeOver } else { Step::Create };
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Step::Renew,
        None | Some("") => Step::TakeOver,
        Some(_) => {
            let d = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(default_duration, Duration::from_secs);
            if unchanged_for >= d { Step::TakeOver } else { Step::Follow }
        }
    }
}

/// An Ethernet/IPv4 ARP frame's (operation, sender MAC, sender IP, target IP).
pub fn parse(frame: &[u8]) -> Option<(u16, [u8; 6], Ipv4Addr, Ipv4Addr)> {
    let arp = frame.get(ETH_HLEN..ETH_HLEN + ARP_LEN)?;
    let be16 = |i: usize| u16::from_be_bytes([arp[i], arp[i + 1]]);
    if u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_ARP || be16(0) != 1 || be16(2) != ETH_P_IP || arp[4] != 6 || arp[5] != 4 {
        return None;
    }
    let sha: [u8; 6] = arp[8..14].try_into().ok()?;
    let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let tpa = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    Some((be16(6), sha, spa, tpa))
}

/// An ARP request's (sender MAC, sender IP, target IP), if `frame` is one.
pub fn parse_request(frame: &[u8]) -> Option<([u8; 6], Ipv4Addr, Ipv4Addr)> {
    parse(frame).filter(|(op, ..)| *op == ARP_REQUEST).map(|(_, sha, spa, tpa)| (sha, spa, tpa))
}

/// An Ethernet + ARP frame.
pub fn build(op: u16, eth_dst: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> [u8; ETH_HLEN + ARP_LEN] {
    let mut f = [0u8; ETH_HLEN + ARP_LEN];
    f[0..6].copy_from_slice(&eth_dst);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let a = &mut f[ETH_HLEN..];
    a[0..2].copy_from_slice(&1u16.to_be_bytes());
    a[2..4].copy_from_slice(&ETH_P_IP.to_be_bytes());
    a[4] = 6;
    a[5] = 4;
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&sha);
    a[14..18].copy_from_slice(&spa.octets());
    a[18..24].copy_from_slice(&tha);
    a[24..28].copy_from_slice(&tpa.octets());
    f
}

/// A gratuitous ARP (a broadcast request for our own address), which
/// every neighbour with an entry for `ip` updates from.
pub fn gratuitous(mac: [u8; 6], ip: Ipv4Addr) -> [u8; ETH_HLEN + ARP_LEN] {
    build(ARP_REQUEST, BROADCAST_MAC, mac, ip, [0; 6], ip)
}

/// An `AF_PACKET` socket for ARP on one device.
pub struct ArpSocket {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
}

fn sockaddr_ll(ifindex: i32, dst: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ETH_P_ARP.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&dst);
    addr
}

impl ArpSocket {
    /// Opens and binds the socket to `dev` of the current network namespace.
    pub fn open(dev: &str) -> io::Result<Self> {
        let name = CString::new(dev).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated name; 0 means no such device.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let ifindex = i32::try_from(ifindex).ok().filter(|i| *i != 0).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(ETH_P_ARP.to_be()))
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex, [0; 6]);
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The bound name carries the device's hardware address
        // (`packet_getname()`).
        let mut bound = sockaddr_ll(0, [0; 6]);
        let mut blen = len;
        // SAFETY: `bound` has room for a sockaddr_ll; `blen` says so.
        if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut bound).cast(), &raw mut blen) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if bound.sll_halen != 6 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "not an Ethernet device"));
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bound.sll_addr[..6]);
        // A timeout so the responder thread notices when it is no longer wanted.
        let tv = libc::timeval { tv_sec: 0, tv_usec: 500_000 };
        let tvlen = libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16);
        // SAFETY: a valid timeval of `tvlen` bytes.
        unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), tvlen) };
        Ok(Self { fd, ifindex, mac })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn send(&self, frame: &[u8], dst: [u8; 6]) -> io::Result<()> {
        let addr = sockaddr_ll(self.ifindex, dst);
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let n = unsafe { libc::sendto(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0, (&raw const addr).cast(), len) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// The next frame that came in (not one this host sent); `None` on
    /// timeout (half a second) or when it was an outgoing one.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut from = sockaddr_ll(0, [0; 6]);
        let mut flen = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        // SAFETY: `buf` and `from` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut from).cast(), &raw mut flen)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(usize::try_from(n).ok())
    }
}

/// Answers ARP requests for the addresses in `announced` until the set is
/// dropped.
fn respond(sock: &ArpSocket, announced: &Weak<Mutex<BTreeSet<Ipv4Addr>>>) {
    let mut buf = [0u8; 1600];
    loop {
        let Some(set) = announced.upgrade() else { return };
        let n = match sock.recv(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading ARP on the uplink; L2 announcements stop");
                return;
            }
        };
        let Some((sha, spa, tpa)) = parse_request(&buf[..n]) else { continue };
        let ours = set.lock().is_ok_and(|s| s.contains(&tpa));
        drop(set);
        if ours {
            let reply = build(ARP_REPLY, sha, sock.mac, tpa, sha, spa);
            if let Err(e) = sock.send(&reply, sha) {
                tracing::debug!(error = %e, ip = %tpa, "sending an ARP reply");
            }
        }
    }
}

/// Per-Lease memory: the version last seen and since when.
struct Seen {
    version: String,
    since: Instant,
}

/// The agent's caches the announcer reads.
pub struct Inputs {
    pub services: Store<SlimService>,
    pub slices: Store<SlimSlice>,
    pub nodes: Store<SlimNode>,
}

/// What this node makes of one Service's Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    ips: Vec<Ipv4Addr>,
    /// False for `externalTrafficPolicy: Local` without a ready local endpoint.
    candidate: bool,
}

struct Announcer {
    cfg: Config,
    node: String,
    api: Api<Lease>,
    inputs: Inputs,
    ctx: NodeContext,
    node_ip: Option<Ipv4Addr>,
    sock: Arc<ArpSocket>,
    announced: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    seen: HashMap<String, Seen>,
    /// Leases this agent holds → the addresses they cover.
    held: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Gratuitous ARPs still to send per address (two, a pass apart).
    garp_left: HashMap<Ipv4Addr, u8>,
    metrics: Metrics,
}

/// Starts answering ARP on `cfg.uplink` and the Lease loop. `ctx` carries
/// the node name, proxy name and reserved ranges; node addresses are
/// refreshed from `nodes` every pass.
pub fn spawn(
    cfg: Config,
    client: Client,
    inputs: Inputs,
    ctx: NodeContext,
    node_ip: Option<Ipv4Addr>,
    metrics: Metrics,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    crate::watch::declared::<Lease>(crate::watch::LEASE_VERBS)?;
    let sock = Arc::new(ArpSocket::open(&cfg.uplink).map_err(|source| Error::Uplink { dev: cfg.uplink.clone(), source })?);
    let announced = Arc::new(Mutex::new(BTreeSet::new()));
    let (s, weak) = (sock.clone(), Arc::downgrade(&announced));
    std::thread::Builder::new()
        .name("l2-announce".into())
        .spawn(move || respond(&s, &weak))
        .map_err(|source| Error::Uplink { dev: cfg.uplink.clone(), source })?;
    tracing::info!(uplink = %cfg.uplink, mac = %fmt_mac(sock.mac()), "L2 announcements on");
    let mut a = Announcer {
        node: ctx.node_name.clone(),
        api: Api::namespaced(client, LEASE_NAMESPACE),
        cfg,
        inputs,
        ctx,
        node_ip,
        sock,
        announced,
        seen: HashMap::new(),
        held: BTreeMap::new(),
        garp_left: HashMap::new(),
        metrics,
    };
    Ok(tokio::spawn(async move {
        loop {
            a.pass().await;
            tokio::time::sleep(a.cfg.renew_every).await;
        }
    }))
}

fn fmt_mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Whether `svc` can have an address to announce at all: externalIPs, or
/// ingress addresses of a LoadBalancer. What [`wanted`] builds the full
/// model for; the rest (at 10 000 ClusterIP Services, all of them) is
/// skipped without it.
pub fn may_announce(svc: &SlimService) -> bool {
    let Some(spec) = svc.spec.as_ref() else { return false };
    let external = spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    let lb = spec.type_.as_deref() == Some("LoadBalancer")
        && svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .is_some_and(|i| !i.is_empty());
    external || lb
}

/// Lease name → the announceable addresses of every Service that has any
/// (`model::service_desired`'s externalIP and LoadBalancer frontends).
/// Every pass (each `renew_every`) runs this: only the Services that
/// [`may_announce`] get the model and a look at their slices, so a pass
/// over thousands of ClusterIP Services costs a filter, not thousands of
/// models.
fn wanted(services: &[Arc<SlimService>], slices: &Store<SlimSlice>, ctx: &NodeContext) -> BTreeMap<String, Want> {
    let candidates: Vec<&SlimService> = services.iter().map(AsRef::as_ref).filter(|s| may_announce(s)).collect();
    let mut out = BTreeMap::new();
    if candidates.is_empty() {
        return out;
    }
    let keys: HashSet<(&str, &str)> = candidates.iter().map(|s| (s.namespace(), s.name())).collect();
    let mut by_service: HashMap<(String, String), Vec<Arc<SlimSlice>>> = HashMap::new();
    for s in slices.state() {
        let Some(svc) = s.service_name.as_ref() else { continue };
        if keys.contains(&(s.namespace(), svc.as_ref())) {
            by_service.entry((s.namespace().to_owned(), svc.to_string())).or_default().push(s);
        }
    }
    for svc in candidates {
        let (ns, name) = (svc.namespace(), svc.name());
        let own: Vec<&SlimSlice> =
            by_service.get(&(ns.to_owned(), name.to_owned())).into_iter().flatten().map(AsRef::as_ref).collect();
        let d = model::service_desired(svc, &own, ctx);
        let mut ips: Vec<Ipv4Addr> = d
            .ports
            .iter()
            .flat_map(|p| &p.frontends)
            .filter(|f| matches!(f.kind, FrontendKind::ExternalIp | FrontendKind::LoadBalancer))
            .map(|f| f.addr)
            .collect();
        ips.sort_unstable();
        ips.dedup();
        let local_only = d.ports.iter().any(|p| p.external_policy == TrafficPolicy::Local);
        let candidate = !local_only
            || d.ports.iter().flat_map(|p| &p.backends).any(|b| b.local && b.state == BackendState::Active);
        if !ips.is_empty() {
            out.insert(lease_name(ns, name), Want { ips, candidate });
        }
    }
    out
}

impl Announcer {
    /// Lease name → the Service's announceable addresses.
    fn wanted(&mut self) -> BTreeMap<String, Want> {
        let nodes = self.inputs.nodes.state();
        let own = self.node_ip.or_else(|| {
            nodes.iter().find(|n| n.name() == self.node).and_then(|n| crate::node::internal_ip(n))
        });
        self.ctx.reserved.set_nodes(nodes.iter().map(AsRef::as_ref), own);
        wanted(&self.inputs.services.state(), &self.inputs.slices, &self.ctx)
    }

    async fn pass(&mut self) {
        let wanted = self.wanted();
        // Leases this agent holds for Services that need none any more.
        let gone: Vec<String> = self.held.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for name in gone {
            self.held.remove(&name);
            if let Err(e) = self.api.delete(&name, &DeleteParams::default()).await {
                tracing::debug!(lease = %name, error = %e, "deleting a Lease no Service needs");
            }
        }
        self.seen.retain(|k, _| wanted.contains_key(k));
        for (name, want) in &wanted {
            if !want.candidate {
                if self.held.remove(name).is_some() {
                    tracing::info!(lease = %name, "no ready local endpoint (externalTrafficPolicy Local): handing the Lease back");
                    self.release(name).await;
                }
                continue;
            }
            if self.try_hold(name).await {
                if self.held.insert(name.clone(), want.ips.clone()).is_none() {
                    tracing::info!(lease = %name, addresses = ?want.ips, "announcing on this node");
                }
            } else if self.held.remove(name).is_some() {
                tracing::info!(lease = %name, "no longer announcing: another node holds the Lease");
            }
        }
        let now: BTreeSet<Ipv4Addr> = self.held.values().flatten().copied().collect();
        let before = self.announced.lock().map(|s| s.clone()).unwrap_or_default();
        for ip in now.difference(&before) {
            self.garp_left.insert(*ip, 2);
        }
        self.garp_left.retain(|ip, _| now.contains(ip));
        if let Ok(mut s) = self.announced.lock() {
            s.clone_from(&now);
        }
        for (ip, left) in &mut self.garp_left {
            if let Err(e) = self.sock.send(&gratuitous(self.sock.mac(), *ip), BROADCAST_MAC) {
                tracing::warn!(ip = %ip, error = %e, "sending a gratuitous ARP");
            }
            *left -= 1;
        }
        self.garp_left.retain(|_, left| *left > 0);
        self.metrics.l2_announced.set(i64::try_from(now.len()).unwrap_or(i64::MAX));
    }

    /// Empties the holder of Lease `name` if it is still ours, so a
    /// candidate takes it over without waiting for it to expire.
    async fn release(&mut self, name: &str) {
        let Ok(Some(mut lease)) = self.api.get_opt(name).await else { return };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(self.node.as_str())) else { return };
        spec.holder_identity = None;
        if let Err(e) = self.api.replace(name, &PostParams::default(), &lease).await {
            tracing::debug!(lease = %name, error = %e, "handing a Lease back");
        }
    }

    /// One round of leader election on Lease `name`; whether we hold it now.
    async fn try_hold(&mut self, name: &str) -> bool {
        let cur = match self.api.get_opt(name).await {
            Ok(l) => l,
            Err(e) => {
                // Unknown: keep announcing what we held (the Lease will expire
                // for the others if we really cannot renew).
                tracing::debug!(lease = %name, error = %e, "reading a Lease");
                return self.held.contains_key(name);
            }
        };
        let version = cur.as_ref().and_then(|l| l.metadata.resource_version.clone()).unwrap_or_default();
        let since = match self.seen.get(name) {
            Some(s) if s.version == version => s.since,
            _ => {
                self.seen.insert(name.to_owned(), Seen { version, since: Instant::now() });
                Instant::now()
            }
        };
        let duration_s = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1);
        match step(cur.as_ref(), &self.node, since.elapsed(), self.cfg.lease_duration) {
            Step::Follow => false,
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.node.clone()),
                        lease_duration_seconds: Some(duration_s),
                        acquire_time: Some(now()),
                        renew_time: Some(now()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.is_ok()
            }
            step @ (Step::Renew | Step::TakeOver) => {
                let Some(mut lease) = cur else { return false };
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == Step::TakeOver {
                    tracing::info!(lease = %name, from = ?spec.holder_identity, "taking over an expired Lease");
                    spec.holder_identity = Some(self.node.clone());
                    spec.acquire_time = Some(now());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration_s);
                spec.renew_time = Some(now());
                // The resourceVersion in `lease` makes this a compare-and-swap:
                // of two nodes taking over at once, one gets 409.
                match self.api.replace(name, &PostParams::default(), &lease).await {
                    Ok(l) => {
                        if let Some(v) = l.metadata.resource_version {
                            self.seen.insert(name.to_owned(), Seen { version: v, since: Instant::now() });
                        }
                        true
                    }
                    Err(e) => {
                        tracing::debug!(lease = %name, error = %e, "writing a Lease");
                        false
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn lease(holder: Option<&str>, secs: i32) -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs}})).unwrap()
    }

    #[test]
    fn leader_election_steps() {
        let d = Duration::from_secs(10);
        assert_eq!(step(None, "a", Duration::ZERO, d), Step::Create);
        assert_eq!(step(Some(&lease(Some("a"), 5)), "a", Duration::from_secs(60), d), Step::Renew);
        assert_eq!(step(Some(&lease(Some("b"), 5)), "a", Duration::from_secs(4), d), Step::Follow);
        assert_eq!(step(Some(&lease(Some("b"), 5)), "a", Duration::from_secs(5), d), Step::TakeOver);
        assert_eq!(step(Some(&lease(None, 5)), "a", Duration::ZERO, d), Step::TakeOver);
        assert_eq!(step(Some(&lease(Some(""), 5)), "a", Duration::ZERO, d), Step::TakeOver);
    }

    #[test]
    fn arp_frames_round_trip() {
        let me = [2, 0, 0, 0, 0, 1];
        let peer = [2, 0, 0, 0, 0, 2];
        let (vip, client) = (Ipv4Addr::new(198, 18, 0, 208), Ipv4Addr::new(198, 18, 0, 100));
        let req = build(ARP_REQUEST, BROADCAST_MAC, peer, client, [0; 6], vip);
        assert_eq!(parse_request(&req), Some((peer, client, vip)));
        let reply = build(ARP_REPLY, peer, me, vip, peer, client);
        assert_eq!(parse_request(&reply), None, "a reply is not a request");
        assert_eq!(&reply[0..6], &peer);
        assert_eq!(&reply[ETH_HLEN + 8..ETH_HLEN + 14], &me);
        let g = gratuitous(me, vip);
        assert_eq!(parse_request(&g), Some((me, vip, vip)));
        assert_eq!(&g[0..6], &BROADCAST_MAC);
        assert_eq!(parse_request(&req[..30]), None);
        assert!(lease_name("ns", &"x".repeat(300)).len() <= 253);
    }

    fn svc(name: &str, spec: serde_json::Value, status: serde_json::Value) -> SlimService {
        let mut spec_all = json!({"clusterIP": "10.43.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]});
        for (k, v) in spec.as_object().into_iter().flatten() {
            spec_all[k] = v.clone();
        }
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name}, "spec": spec_all, "status": status})).unwrap()
    }

    #[test]
    fn only_services_with_external_addresses_are_modelled_and_none_is_missed() {
        let ctx = model::NodeContext {
            node_name: "node-a".into(),
            reserved: crate::reserved::Reserved::new("10.42.0.0/16".parse().unwrap(), "10.43.0.0/16".parse().unwrap()),
            ..model::NodeContext::default()
        };
        let ingress = json!({"loadBalancer": {"ingress": [{"ip": "192.0.2.100"}]}});
        let cases = [
            (svc("plain", json!({}), json!({})), false),
            (svc("nodeport", json!({"type": "NodePort"}), json!({})), false),
            (svc("ext", json!({"externalIPs": ["192.0.2.7"]}), json!({})), true),
            (svc("lb", json!({"type": "LoadBalancer"}), ingress.clone()), true),
            (svc("lb-pending", json!({"type": "LoadBalancer"}), json!({"loadBalancer": {}})), false),
            // Ingress left behind on a Service that is no LoadBalancer any more.
            (svc("was-lb", json!({"type": "ClusterIP"}), ingress), false),
        ];
        for (s, want) in &cases {
            assert_eq!(may_announce(s), *want, "{}", s.name());
            // The filter never hides a Service the model would announce.
            let announced = model::service_desired(s, &[], &ctx)
                .ports
                .iter()
                .flat_map(|p| &p.frontends)
                .any(|f| matches!(f.kind, FrontendKind::ExternalIp | FrontendKind::LoadBalancer));
            assert!(may_announce(s) || !announced, "{} has external frontends but was filtered out", s.name());
        }
        let services: Vec<Arc<SlimService>> = cases.into_iter().map(|(s, _)| Arc::new(s)).collect();
        let w = wanted(&services, &Store::new(), &ctx);
        assert_eq!(w.keys().collect::<Vec<_>>(), [&lease_name("ns", "ext"), &lease_name("ns", "lb")]);
        assert_eq!(w[&lease_name("ns", "lb")].ips, ["192.0.2.100".parse::<Ipv4Addr>().unwrap()]);
    }
}
