//! Types that cross the kernel/user boundary, defined once.
//!
//! Every type here is `#[repr(C)]`, built from fixed-width integers, with
//! explicit padding fields and no `bool`/`Option`/enums, so the layout the
//! eBPF programs see is byte-for-byte the layout user space writes.
//! Fields holding network-order values end in `_be`.
//!
//! Map names carry the `rt_` prefix and a version suffix (≤ 15 bytes) so the
//! layout can evolve and a restarted agent can tell old pins from new ones.
//! Maps and programs are pinned per node under [`PIN_ROOT`]`/<node>/`.
//!
//! The service maps follow Cilium's proven layout (`bpf/lib/lb.h`): a
//! service is a set of entries in [`names::SVC4`] keyed by frontend and
//! slot; slot 0 is the master entry (backend count, reverse-NAT id, flags),
//! slots `1..=count` name backends by id; backends live once in
//! [`names::BE4`], shared by every service that uses them.
#![no_std]

/// bpffs directory under which each node keeps its pins (`<PIN_ROOT>/<node>/`).
pub const PIN_ROOT: &str = "/sys/fs/bpf/riptide";

/// Map and program names (also the file names of their pins).
pub mod names {
    /// Local pod endpoints: [`crate::EndpointKey`] → [`crate::EndpointValue`].
    pub const EP4: &str = "rt_ep4_v1";
    /// Per-CPU counters indexed by [`crate::stats`] reasons. v2: 64 slots
    /// (the NetworkPolicy verdicts outgrew v1's 32).
    pub const STATS: &str = "rt_stats_v2";
    /// Services: [`crate::SvcKey`] → [`crate::SvcValue`].
    pub const SVC4: &str = "rt_svc4_v1";
    /// Backends: [`crate::BackendKey`] → [`crate::BackendValue`].
    pub const BE4: &str = "rt_be4_v1";
    /// Reverse NAT: [`crate::RevNatKey`] → [`crate::RevNatValue`].
    pub const REVNAT4: &str = "rt_revnat4_v1";
    /// Connection tracking of TCP flows (LRU): [`crate::CtKey`] →
    /// [`crate::CtValue`]. Every entry is keyed with `dir`
    /// [`crate::CT_DIR_ANY`] and says what it is in
    /// [`crate::CtValue::flags`], so one lookup per packet finds a flow in
    /// either direction. v3: TCP only, so a flood of anything else (UDP,
    /// ICMP, inbound markers, which live in [`CT_ANY4`]) cannot evict
    /// established TCP connections (Cilium's `ct4_global` / `ct_any4_global`).
    pub const CT4: &str = "rt_ct4_v3";
    /// Connection tracking of every other protocol, and the inbound markers
    /// ([`crate::CT_F_INBOUND`] without [`crate::CT_F_POLICY`]) of every
    /// protocol (LRU): same key and value as [`CT4`].
    pub const CT_ANY4: &str = "rt_ctany4_v3";
    /// Source NAT of TCP flows (LRU): [`crate::CtKey`] →
    /// [`crate::NatValue`]. v2: TCP only, so a flood of new masqueraded or
    /// NodePort-SNATed flows of other protocols (which live in
    /// [`NAT_ANY4`]) cannot evict the mapping of an established TCP
    /// connection, whose next packet would then be dropped
    /// (`masq_lost_mapping`).
    pub const NAT4: &str = "rt_nat4_v2";
    /// Source NAT of every other protocol (LRU): same key and value as
    /// [`NAT4`].
    pub const NAT_ANY4: &str = "rt_natany4_v2";
    /// ClientIP session affinity (LRU): [`crate::AffKey`] → [`crate::AffValue`].
    pub const AFF4: &str = "rt_aff4_v1";
    /// Socket-LB reverse map (LRU): [`crate::SockRevKey`] → [`crate::SockRevValue`].
    pub const SOCKREV4: &str = "rt_sockrev4_v1";
    /// Node configuration: one-entry array of [`crate::Config`].
    pub const CONFIG: &str = "rt_config_v1";
    /// Remote pod CIDRs (LPM trie): [`crate::NodeKey`] → [`crate::NodeValue`].
    pub const NODE4: &str = "rt_node4_v1";
    /// Maglev lookup tables in chunks (hash, allocated on demand):
    /// [`crate::MaglevKey`] → [`crate::MaglevValue`].
    pub const MAGLEV4: &str = "rt_maglev4_v2";
    /// Drop/failure events (ring buffer of [`crate::DropEvent`]), rate
    /// limited per CPU; every occurrence is still counted in `rt_stats_v2`.
    pub const EVENTS: &str = "rt_events_v1";
    /// NetworkPolicy state of local pods (agent-owned; the CNI never
    /// writes it): [`crate::EndpointKey`] → [`crate::PolicyEndpointValue`].
    pub const POLEP4: &str = "rt_polep4_v1";
    /// How many [`POLEP4`] entries each slot of a local pod address
    /// ([`crate::polidx_slot`]) has (array of `u32`, agent-owned): a
    /// program asks [`POLEP4`] only for an address whose slot is not 0.
    pub const POLIDX4: &str = "rt_polidx4_v1";
    /// IP → security identity of every address the cluster knows (LPM
    /// trie): [`crate::IpcacheKey`] → [`crate::IpcacheValue`].
    pub const IPCACHE4: &str = "rt_ipcache4_v1";
    /// Per-endpoint allow rules (LPM trie): [`crate::PolicyKey`] →
    /// [`crate::PolicyValue`].
    pub const POLICY4: &str = "rt_policy4_v1";
    /// The `/32` entries of the ipcache (hash, asked before
    /// [`IPCACHE4`], which holds only shorter prefixes):
    /// [`crate::IpcacheKey`] → [`crate::IpcacheValue`].
    pub const IPCACHE4_EXACT: &str = "rt_ipcache4x_v1";
    /// The single-port rules (prefix [`crate::POLICY_PREFIX_FULL`]; hash,
    /// asked before [`POLICY4`], which holds only port ranges and rules for
    /// every port or protocol): [`crate::PolicyKey`] →
    /// [`crate::PolicyValue`].
    pub const POLICY4_EXACT: &str = "rt_policy4x_v1";
    /// `loadBalancerSourceRanges` (LPM trie): [`crate::SrcRangeKey`] →
    /// `u8` (unused), the allowed source prefixes of each load-balancer
    /// frontend carrying [`crate::SVC_F_SRC_RANGE`].
    pub const SRCRANGE4: &str = "rt_srcrange4_v1";

    /// tc program attached to the host side of every pod veth (ingress,
    /// i.e. packets leaving the pod). The CNI attaches this pinned program.
    pub const PROG_FROM_POD: &str = "rt_from_pod";
    /// tc ingress on the node's uplink: NodePort/externalIP/LB-IP/hostPort
    /// from outside, replies to SNATed and masqueraded flows.
    pub const PROG_FROM_NET: &str = "rt_from_net";
    /// tc egress on the node's uplink: SNAT for remote backends, reverse
    /// DNAT of replies from local backends, pod→outside masquerade.
    pub const PROG_TO_NET: &str = "rt_to_net";
    /// tc egress on the host side of every pod veth: packets the kernel
    /// routes into the pod (from the node itself, the VXLAN device, or any
    /// path that did not `bpf_redirect_peer`); ingress NetworkPolicy.
    /// `bpf_redirect_peer` skips it, so the programs that redirect into a
    /// pod judge ingress themselves.
    pub const PROG_TO_POD: &str = "rt_to_pod";
    /// XDP on the node's uplink: NodePort/externalIP/LB-IP flows to
    /// backends on other nodes, DNAT+SNAT and `XDP_TX` before the stack;
    /// everything else passes to tc untouched.
    pub const PROG_XDP_NET: &str = "rt_xdp_net";
    /// Socket LB (cgroup/sock_addr) programs.
    pub const PROG_SOCK_CONNECT4: &str = "rt_sock_conn4";
    pub const PROG_SOCK_SENDMSG4: &str = "rt_sock_send4";
    pub const PROG_SOCK_RECVMSG4: &str = "rt_sock_recv4";
    pub const PROG_SOCK_GETPEERNAME4: &str = "rt_sock_peer4";
    /// cgroup/dev program of containers that are not privileged (runc's
    /// default device rules). The kubelet loads and attaches it to each
    /// such container's cgroup; the agent neither loads nor pins it, so it
    /// is not in [`ALL_PROGRAMS`].
    pub const PROG_DEVICE: &str = "rt_dev";

    /// Every map name (for size checks and dumps).
    pub const ALL_MAPS: [&str; 22] = [
        EP4, STATS, SVC4, BE4, REVNAT4, CT4, CT_ANY4, NAT4, NAT_ANY4, AFF4, SOCKREV4, CONFIG, NODE4,
        MAGLEV4, EVENTS, POLEP4, IPCACHE4, POLICY4, SRCRANGE4, IPCACHE4_EXACT, POLICY4_EXACT,
        POLIDX4,
    ];
    /// Names of maps earlier versions pinned that nothing uses any more.
    /// A load removes their pins after taking over what they held (see
    /// `riptide-datapath`'s `upgrade`); never a name in [`ALL_MAPS`].
    pub const RETIRED_MAPS: [&str; 5] =
        ["rt_stats_v1", "rt_ct4_v1", "rt_ct4_v2", "rt_maglev4_v1", "rt_nat4_v1"];
    /// The conntrack map of the previous layout (TCP and everything else in
    /// one table), whose entries a load moves into [`CT4`] / [`CT_ANY4`].
    pub const CT4_PREV: &str = "rt_ct4_v2";
    /// The NAT map of the previous layout (every protocol in one table),
    /// whose entries a load moves into [`NAT4`] / [`NAT_ANY4`].
    pub const NAT4_PREV: &str = "rt_nat4_v1";
    /// Every program name.
    pub const ALL_PROGRAMS: [&str; 9] = [
        PROG_FROM_POD,
        PROG_FROM_NET,
        PROG_TO_NET,
        PROG_TO_POD,
        PROG_XDP_NET,
        PROG_SOCK_CONNECT4,
        PROG_SOCK_SENDMSG4,
        PROG_SOCK_RECVMSG4,
        PROG_SOCK_GETPEERNAME4,
    ];
}

/// Capacities of the maps (entries).
pub mod capacity {
    pub const EP4: u32 = 65_536;
    pub const SVC4: u32 = 262_144;
    pub const BE4: u32 = 131_072;
    pub const REVNAT4: u32 = 65_536;
    /// TCP conntrack ([`crate::names::CT4`]).
    pub const CT4: u32 = 524_288;
    /// Conntrack of other protocols and inbound markers
    /// ([`crate::names::CT_ANY4`]).
    pub const CT_ANY4: u32 = 262_144;
    /// TCP source NAT ([`crate::names::NAT4`]): two entries per
    /// translated connection.
    pub const NAT4: u32 = 262_144;
    /// Source NAT of other protocols ([`crate::names::NAT_ANY4`]), half of
    /// the TCP table as for conntrack.
    pub const NAT_ANY4: u32 = 131_072;
    pub const AFF4: u32 = 65_536;
    pub const SOCKREV4: u32 = 262_144;
    pub const NODE4: u32 = 16_384;
    /// Chunks of [`crate::MAGLEV_CHUNK`] positions: a table of the default
    /// size takes 16, so ~16k (frontend, scope) tables fit. Memory is
    /// allocated per chunk written (`BPF_F_NO_PREALLOC`), not up front.
    pub const MAGLEV4: u32 = 262_144;
    /// Bytes of the events ring buffer (a power of two, page multiple):
    /// ~8k events between two reads.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
    /// Events each CPU may emit per second; the rest are only counted
    /// (`events_suppressed`), so a flood never turns into per-packet
    /// logging.
    pub const EVENTS_PER_CPU_PER_S: u64 = 64;
    pub const POLEP4: u32 = 65_536;
    /// Every pod of the cluster, every node address, every ipBlock prefix.
    pub const IPCACHE4: u32 = 262_144;
    /// Allow rules of all local endpoints (LPM tries allocate per entry).
    pub const POLICY4: u32 = 1_048_576;
    /// Every pod and node address (allocated per entry).
    pub const IPCACHE4_EXACT: u32 = 262_144;
    /// Single-port allow rules of all local endpoints (allocated per
    /// entry).
    pub const POLICY4_EXACT: u32 = 1_048_576;
    /// Source prefixes of every load-balancer frontend (LPM tries allocate
    /// per entry).
    pub const SRCRANGE4: u32 = 65_536;
}

/// Reasons counted in the per-CPU `rt_stats` array (index = reason).
pub mod stats {
    pub const PASS: u32 = 0;
    pub const REDIRECT_LOCAL: u32 = 1;
    pub const DROP_MALFORMED: u32 = 2;
    pub const DROP_NO_BACKEND: u32 = 3;
    pub const DROP_CT_FULL: u32 = 4;
    pub const NAT_FAIL: u32 = 5;
    /// A new flow was load-balanced (service hit, backend chosen).
    pub const LB_NEW: u32 = 6;
    /// A packet of a tracked flow was translated.
    pub const LB_CT_HIT: u32 = 7;
    /// A reply was reverse-translated (VIP restored).
    pub const REVNAT: u32 = 8;
    /// A packet was source-NATed (remote backend or masquerade).
    pub const SNAT: u32 = 9;
    /// A reply to a source-NATed flow had its destination restored.
    pub const UNSNAT: u32 = 10;
    /// No backend: answered with TCP RST.
    pub const REJECT_RST: u32 = 11;
    /// No backend: answered with ICMP port unreachable.
    pub const REJECT_ICMP: u32 = 12;
    /// An ICMP error about a translated flow was translated too.
    pub const ICMP_ERR_XLATE: u32 = 13;
    /// Socket LB: connect/sendmsg rewritten to a backend.
    pub const SOCK_XLATE: u32 = 14;
    /// Socket LB: connect/sendmsg refused, no backend.
    pub const SOCK_NO_BACKEND: u32 = 15;
    /// Socket LB: recvmsg/getpeername showed the service address.
    pub const SOCK_REVNAT: u32 = 16;
    /// Session affinity reused a backend.
    pub const AFFINITY_HIT: u32 = 17;
    /// No SNAT port could be allocated.
    pub const SNAT_NO_PORT: u32 = 18;
    /// A hairpin flow (client is its own backend) was source-NATed.
    pub const HAIRPIN: u32 = 19;
    /// A slot pointed at a backend that is not in the backend map.
    pub const DROP_STALE_SLOT: u32 = 20;
    /// Fragments and other packets the LB cannot translate.
    pub const DROP_UNSUPPORTED: u32 = 21;
    /// A non-service flow from outside the node into a local pod was
    /// recorded ([`crate::CT_F_INBOUND`]), so its replies are never
    /// masqueraded.
    pub const INBOUND_NEW: u32 = 22;
    /// A pod's packet was not masqueraded because it answers an inbound flow.
    pub const MASQ_SKIP_INBOUND: u32 = 23;
    /// A pod's TCP packet without a masquerade mapping was not masqueraded
    /// because it is not a pure SYN (only a pod-originated connection
    /// may create a mapping; anything else is a reply or a stale flow).
    pub const MASQ_SKIP_NOT_SYN: u32 = 24;
    /// An event was not sent to `rt_events_v1`: over the per-CPU rate or
    /// the ring buffer was full.
    pub const EVENTS_SUPPRESSED: u32 = 25;
    /// A translated packet to another node or back to an outside client
    /// was sent straight out the uplink it came in on (`bpf_fib_lookup` +
    /// `bpf_redirect`), skipping the kernel's forwarding path.
    pub const FIB_REDIRECT: u32 = 26;
    /// Such a packet was left to the kernel's forwarding path: no
    /// neighbour entry yet, too big for the MTU, forwarding disabled, no
    /// route, TTL about to expire, or a route out of another device.
    pub const FIB_FALLBACK: u32 = 27;
    /// A packet to a node-address frontend (NodePort, hostPort, externalIP
    /// = node IP) that would have started a new flow belongs to a
    /// connection of a local socket (a host process using a local port in
    /// the NodePort range): left to the kernel, not balanced.
    pub const LOCAL_SOCKET: u32 = 28;
    /// NetworkPolicy: a new flow into an ingress-isolated pod was allowed.
    pub const POLICY_ALLOW_IN: u32 = 29;
    /// NetworkPolicy: a new flow out of an egress-isolated pod was allowed.
    pub const POLICY_ALLOW_OUT: u32 = 30;
    /// NetworkPolicy: a new flow into an ingress-isolated pod was dropped.
    pub const POLICY_DENY_IN: u32 = 31;
    /// NetworkPolicy: a new flow out of an egress-isolated pod was dropped.
    pub const POLICY_DENY_OUT: u32 = 32;
    /// NetworkPolicy audit mode: an ingress flow policy would drop passed.
    pub const POLICY_AUDIT_IN: u32 = 33;
    /// NetworkPolicy audit mode: an egress flow policy would drop passed.
    pub const POLICY_AUDIT_OUT: u32 = 34;
    /// Masquerade found no free node port for a new pod flow (every try
    /// taken): the packet is dropped, never sent with the pod's address.
    pub const MASQ_NO_PORT: u32 = 35;
    /// A pod's TCP packet (not a SYN, not a SYN-ACK) to a peer it would be
    /// masqueraded towards had no masquerade mapping and belongs to no
    /// inbound flow: its mapping was evicted or expired while the
    /// connection lived. Dropped, never sent with the pod's address.
    pub const MASQ_LOST_MAPPING: u32 = 36;
    /// A TCP packet other than a SYN of a load-balanced flow found no
    /// conntrack entry: the entry was evicted (LRU pressure) or expired
    /// while the connection lived, and the flow was balanced anew. Alert on
    /// its rate: it means the conntrack table is too small.
    pub const CT_LOST_TCP: u32 = 37;
    /// `rt_xdp_net` translated a NodePort & co packet and sent it back out
    /// the uplink (`XDP_TX`) before the stack saw it.
    pub const XDP_TX: u32 = 38;
    /// `rt_xdp_net` left a frontend packet to the tc path (local backend,
    /// a new flow only tc may start, no resolved next hop on the uplink).
    pub const XDP_TO_TC: u32 = 39;
    /// A new flow to a load-balancer IP came from a source outside the
    /// Service's `loadBalancerSourceRanges`: dropped (kube-proxy's
    /// `KUBE-PROXY-FIREWALL` drop).
    pub const DROP_LB_SRC_RANGE: u32 = 40;
    /// DSR: the entry node forwarded a flow's packet to a remote backend
    /// with the frontend in an IPv4 option, without source NAT (`dsr`).
    pub const DSR_OPT_SET: u32 = 41;
    /// DSR: the backend's node took the frontend from a packet's option,
    /// recorded the reply entry and stripped the option.
    pub const DSR_OPT_RECV: u32 = 42;
    /// DSR: a backend's reply left with the frontend as its source,
    /// straight to the client.
    pub const DSR_REVNAT: u32 = 43;
    /// DSR fell back to source NAT for a new flow (or left the option off
    /// a packet of a UDP flow): the packet plus the option would exceed
    /// the route's MTU.
    pub const DSR_FALLBACK_MTU: u32 = 44;
    /// DSR fell back to source NAT for a new flow: the backend is not
    /// reached out the uplink the packet came in on (VXLAN tunnel, another
    /// device, no route), or the packet already carries IP options.
    pub const DSR_FALLBACK_ROUTE: u32 = 45;
    /// DSR fell back to source NAT for a new flow: the kernel refused to
    /// make room for the option (`bpf_skb_adjust_room`).
    pub const DSR_FALLBACK_ROOM: u32 = 46;
    /// A flow the node itself sends from a port in the SNAT range (a host
    /// socket: the kubelet's or the agent's watch) had its tuple reserved
    /// in the NAT table, so no masquerade or NodePort SNAT mapping can take
    /// it and its replies stay the host's (`nat::track_host`).
    pub const NAT_HOST_NEW: u32 = 47;
    /// A host flow's first packet (a TCP SYN, or UDP) found its tuple
    /// already taken by a translated flow and was moved to a free port of
    /// the SNAT range (source NAT of the host's flow).
    pub const NAT_HOST_REMAP: u32 = 48;
    /// A host packet found its tuple taken by a translated flow and could
    /// not be moved (a TCP packet after the SYN, or no free port): sent as
    /// it is; its replies reach the other flow until that mapping ends.
    pub const NAT_HOST_CLASH: u32 = 49;
    /// The last reason (for the names check).
    pub const LAST: u32 = NAT_HOST_CLASH;
    /// Number of slots in the stats array.
    pub const MAX: u32 = 64;

    /// Human names by index, for metrics and the CLI.
    pub const NAMES: [&str; 50] = [
        "pass",
        "redirect_local",
        "drop_malformed",
        "drop_no_backend",
        "drop_ct_full",
        "nat_fail",
        "lb_new",
        "lb_ct_hit",
        "revnat",
        "snat",
        "unsnat",
        "reject_rst",
        "reject_icmp",
        "icmp_err_xlate",
        "sock_xlate",
        "sock_no_backend",
        "sock_revnat",
        "affinity_hit",
        "snat_no_port",
        "hairpin",
        "drop_stale_slot",
        "drop_unsupported",
        "inbound_new",
        "masq_skip_inbound",
        "masq_skip_not_syn",
        "events_suppressed",
        "fib_redirect",
        "fib_fallback",
        "local_socket",
        "policy_allow_in",
        "policy_allow_out",
        "policy_deny_in",
        "policy_deny_out",
        "policy_audit_in",
        "policy_audit_out",
        "masq_no_port",
        "masq_lost_mapping",
        "ct_lost_tcp",
        "xdp_tx",
        "xdp_to_tc",
        "lb_src_range",
        "dsr_opt_set",
        "dsr_opt_recv",
        "dsr_revnat",
        "dsr_fallback_mtu",
        "dsr_fallback_route",
        "dsr_fallback_room",
        "nat_host_new",
        "nat_host_remap",
        "nat_host_clash",
    ];
}

/// IP protocol numbers used in keys.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

// ---------------------------------------------------------------- endpoints

/// Key of `rt_ep4_v1`: a pod's IPv4 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointKey {
    pub addr_be: u32,
}

/// Value of `rt_ep4_v1`: how to deliver to a pod on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointValue {
    /// ifindex of the host side of the pod's veth (in the node netns);
    /// `bpf_redirect_peer` on it lands in the pod's `eth0`.
    pub ifindex: u32,
    /// `EP_F_*` flags.
    pub flags: u32,
    /// MAC of the pod's `eth0` (destination MAC when delivering).
    pub mac: [u8; 6],
    /// MAC of the host side of the veth (source MAC when delivering).
    pub node_mac: [u8; 6],
}

/// Endpoint flag: the endpoint is the node itself (host networking).
pub const EP_F_HOST: u32 = 1 << 0;

// ----------------------------------------------------------------- services

/// Service scope: the entries every lookup uses by default.
pub const SCOPE_EXT: u8 = 0;
/// Service scope: entries used for traffic from inside the cluster when the
/// master entry of [`SCOPE_EXT`] carries [`SVC_F_TWO_SCOPES`] (Cilium's
/// `LB_LOOKUP_SCOPE_INT`): with `externalTrafficPolicy: Local` the external
/// scope lists only local backends and the internal one all of them; with
/// `internalTrafficPolicy: Local` it is the other way round.
pub const SCOPE_INT: u8 = 1;

/// Key of `rt_svc4_v1`: a frontend and a slot.
///
/// `vip_be` is 0 for frontends that match every address of the node
/// (NodePort, hostPort without hostIP): the programs look those up when the
/// destination is a node address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SvcKey {
    pub vip_be: u32,
    pub port_be: u16,
    /// [`proto`] number.
    pub proto: u8,
    /// [`SCOPE_EXT`] or [`SCOPE_INT`].
    pub scope: u8,
    /// 0 = master entry, `1..=count` = backend slots.
    pub slot: u16,
    pub _pad: u16,
}

/// Value of `rt_svc4_v1`. Slot 0 (master) uses `count`, `revnat_id`,
/// `flags`, `algorithm` and `affinity_timeout_s`; slots `1..=count` use
/// `backend_id` (and repeat `revnat_id` so a slot alone identifies its
/// service).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SvcValue {
    pub backend_id: u32,
    /// Number of backend slots (master only). 0 means "reject".
    pub count: u16,
    pub revnat_id: u16,
    /// `SVC_F_*`.
    pub flags: u16,
    /// `ALG_*` (master only).
    pub algorithm: u8,
    pub _pad: u8,
    /// ClientIP affinity timeout in seconds (master, with [`SVC_F_AFFINITY`]).
    pub affinity_timeout_s: u32,
}

/// Frontend kinds and behaviour (master entry `flags`).
pub const SVC_F_CLUSTERIP: u16 = 1 << 0;
pub const SVC_F_NODEPORT: u16 = 1 << 1;
pub const SVC_F_EXTERNALIP: u16 = 1 << 2;
pub const SVC_F_LOADBALANCER: u16 = 1 << 3;
pub const SVC_F_HOSTPORT: u16 = 1 << 4;
/// `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u16 = 1 << 5;
/// This scope's slots hold only node-local backends (eTP/iTP=Local): no SNAT,
/// client address kept, no backend here → reject.
pub const SVC_F_LOCAL_ONLY: u16 = 1 << 6;
/// Internal traffic must look up [`SCOPE_INT`] instead.
pub const SVC_F_TWO_SCOPES: u16 = 1 << 7;
/// Skip socket LB for this frontend (e.g. hostPort, which must be reached
/// from outside through the per-packet path only).
pub const SVC_F_NO_SOCK_LB: u16 = 1 << 8;
/// A load-balancer frontend with `loadBalancerSourceRanges`: the source of
/// a new flow must match a prefix of [`names::SRCRANGE4`] under the
/// frontend's `revnat_id`. Socket LB skips such frontends (the source
/// address is not known at `connect()`), so the per-packet path judges
/// pods too.
pub const SVC_F_SRC_RANGE: u16 = 1 << 9;
/// Direct Server Return for this (NodePort, externalIP, load-balancer)
/// frontend: a flow from outside to a remote backend goes there with the
/// frontend in an IPv4 option and keeps the client's address; the
/// backend's node answers the client directly (see [`DSR_OPT_TYPE`]).
pub const SVC_F_DSR: u16 = 1 << 10;

/// IPv4 option type of the DSR option (copied, class 0, number 26:
/// Cilium's `DSR_IPV4_OPT_TYPE`), followed by its length
/// [`DSR_OPT_LEN`], the frontend port and the frontend address (network
/// order).
pub const DSR_OPT_TYPE: u8 = 0x9a;
/// Length of the DSR option in bytes.
pub const DSR_OPT_LEN: u8 = 8;

/// Key of [`names::SRCRANGE4`] (after the LPM prefix length): a frontend's
/// reverse-NAT id and an allowed source prefix (Cilium's
/// `lb4_src_range_key`). The prefix length counts the 32 bits of
/// `revnat_id` and `_pad` first ([`SRCRANGE_PREFIX_BASE`]), so a lookup
/// only matches prefixes of its own frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SrcRangeKey {
    /// Host order: the prefix always covers all of it, so its byte order
    /// does not matter to the trie.
    pub revnat_id: u16,
    pub _pad: u16,
    pub addr_be: u32,
}

/// LPM prefix length of a [`SrcRangeKey`] whose address prefix is 0 bits.
pub const SRCRANGE_PREFIX_BASE: u32 = 32;

/// Random backend per new flow.
pub const ALG_RANDOM: u8 = 0;
/// Maglev consistent hashing (Eisenbud et al., NSDI 2016) of the flow's
/// 5-tuple into the frontend's [`MaglevValue`] table: every node picks the
    /// Slots: the backend id. Master of an [`ALG_MAGLEV`] scope: the size
    /// `M` of its Maglev table (Cilium's master entry reuses this word the
    /// same way), so a table and the size it is indexed with change
    /// together.
/// same backend for the same flow, and a backend change moves few flows.
pub const ALG_MAGLEV: u8 = 1;

/// The Maglev table sizes the agent accepts: primes (the paper's
/// permutation `offset + j·skip mod M` needs `M` prime), each ≥ 100× the
/// backends it balances evenly (≈ 1 % imbalance): 251 for a few, 16381
/// (the default, as Cilium's) up to ~160, 65521 up to ~650.
pub const MAGLEV_SIZES: [u32; 5] = [251, 1021, 4093, 16381, 65521];
/// Default Maglev table size.
pub const MAGLEV_M_DEFAULT: u32 = 16381;
/// Largest Maglev table size; the programs ignore a master claiming more.
pub const MAGLEV_M_MAX: u32 = 65521;
/// Positions per `rt_maglev4_v2` entry. A table of size `M` is chunks
/// `0..ceil(M / MAGLEV_CHUNK)`; position `i` is in chunk `i / MAGLEV_CHUNK`
/// at `i % MAGLEV_CHUNK`. One value type serves every table size, and a
/// chunk is small enough for a map value (a whole 65521-entry table would
/// be a 256 KiB value allocated for every table).
pub const MAGLEV_CHUNK: usize = 1024;

/// Key of `rt_maglev4_v2`: a frontend (its reverse-NAT id), scope and
/// chunk of its table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MaglevKey {
    pub revnat_id: u16,
    /// [`SCOPE_EXT`] or [`SCOPE_INT`].
    pub scope: u8,
    /// `position / MAGLEV_CHUNK` (< 64 for [`MAGLEV_M_MAX`]).
    pub chunk: u8,
}

/// Value of `rt_maglev4_v2`: backend id per table position of one chunk
/// (positions past `M` in the last chunk are 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevValue {
    pub backend_ids: [u32; MAGLEV_CHUNK],
}

/// Key of `rt_be4_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendKey {
    pub id: u32,
}

/// Value of `rt_be4_v1`: one backend address, shared across services.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendValue {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    /// `BE_STATE_*`.
    pub state: u8,
    /// `BE_F_*`.
    pub flags: u32,
}

/// Ready backend: eligible for new flows.
pub const BE_STATE_ACTIVE: u8 = 0;
/// Terminating backend (KEP-1669): existing flows keep it; new flows only
/// when no backend of the service is ready.
pub const BE_STATE_TERMINATING: u8 = 1;
/// Backend is not ready and not serving: only kept for existing flows.
pub const BE_STATE_QUARANTINED: u8 = 2;

/// The backend runs on this node (no SNAT needed, eligible for eTP=Local).
pub const BE_F_LOCAL: u32 = 1 << 0;

/// Key of `rt_revnat4_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatKey {
    pub id: u16,
    pub _pad: u16,
}

/// Value of `rt_revnat4_v1`: the frontend replies must appear to come from.
/// `vip_be` 0 (a node-wide frontend) means "the node address the client
/// used", which the programs know from the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevNatValue {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

// ------------------------------------------------------------ conntrack/NAT

/// 5-tuple key of the conntrack maps (`rt_ct4_v3`, `rt_ctany4_v3`) and
/// the NAT maps (`rt_nat4_v2`, `rt_natany4_v2`), as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// [`CT_DIR_ANY`] in the conntrack tables (the entry's role is in
    /// [`CtValue::flags`]); [`NAT_DIR_EGRESS`]/[`NAT_DIR_INGRESS`] in
    /// the NAT maps.
    pub dir: u8,
    pub _pad: u16,
}

/// The `dir` of every conntrack key. A packet's own tuple is looked up
/// once and the entry found says what it is: a forward entry (client →
/// frontend, no role flag), a reply entry ([`CT_F_REPLY`]) or an inbound
/// entry ([`CT_F_INBOUND`]). The tuples of the three kinds cannot coincide
/// (a forward tuple goes to a frontend, a reply tuple to a client, an
/// inbound tuple is a pod's answer to a peer that reached it directly).
pub const CT_DIR_ANY: u8 = 0;
/// NAT entry matching outgoing packets (original tuple → new source).
pub const NAT_DIR_EGRESS: u8 = 2;
/// NAT entry matching replies (translated tuple → original destination).
pub const NAT_DIR_INGRESS: u8 = 3;

/// Value of the conntrack tables (`rt_ct4_v3`, `rt_ctany4_v3`).
///
/// Forward entry (key = client → frontend): `backend_id` the flow is pinned
/// to, `nat_*` the source the client was rewritten to (0 = none).
/// Reply entry ([`CT_F_REPLY`], key = backend → client-or-SNAT address):
/// `revnat_id` names the frontend to restore as source, `nat_*` the client
/// address to restore as destination.
/// Inbound entry ([`CT_F_INBOUND`], key = local pod → remote peer of a
/// non-service flow that came in from outside the node): only
/// `last_seen_ns`; `rt_to_net` never masquerades a packet matching one (the
/// peer expects the answer from the address it sent to; iptables'
/// MASQUERADE knows this from its conntrack's reply direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_coarse_ns()` of the last packet: CLOCK_MONOTONIC at
    /// tick granularity (at most one tick behind `clock_gettime`), so user
    /// space ages entries with CLOCK_MONOTONIC.
    pub last_seen_ns: u64,
    pub backend_id: u32,
    pub revnat_id: u16,
    /// `CT_F_*`.
    pub flags: u16,
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    /// [`CT_F_BIDIR`] entries: replies that found the entry under their
    /// reverse tuple; at [`CT_BIDIR_REPLIES`] the reply tuple gets an entry
    /// of its own ([`CT_F_POLICY_REV`]). 0 in every other entry.
    pub replies: u16,
    /// The frontend address and port the client used (a node-wide frontend
    /// has vip 0 in `rt_svc4_v1`; this is the node address actually hit).
    /// REV entries restore them as the reply's source.
    pub vip_be: u32,
    pub vport_be: u16,
    pub _pad2: u16,
    /// Forward entries: the backend's address and port, copied when the
    /// flow was balanced, so the established path rewrites without a
    /// backend lookup. The programs re-check `rt_be4_v1` once per clock
    /// tick per flow (when they refresh `last_seen_ns`) and re-balance the
    /// flow if `backend_id` is gone or names another address.
    pub be_addr_be: u32,
    pub be_port_be: u16,
    pub _pad3: u16,
}

/// The flow was source-NATed to reach a remote backend.
pub const CT_F_SNAT: u16 = 1 << 0;
/// The flow is a hairpin (client = backend), SNATed to the hairpin address.
pub const CT_F_HAIRPIN: u16 = 1 << 1;
/// Created by the uplink (NodePort & co) path.
pub const CT_F_NODEPORT: u16 = 1 << 2;
/// Inbound entry: a non-service flow from outside the node into a local pod
/// (see [`CtValue`]). Without [`CT_F_POLICY`] (a bare marker) it lives in
/// `rt_ctany4_v3` whatever the protocol, so inbound floods never evict TCP
/// connections.
pub const CT_F_INBOUND: u16 = 1 << 3;
/// Reply entry of a load-balanced flow (see [`CtValue`]).
pub const CT_F_REPLY: u16 = 1 << 4;
/// Forward entry whose backend runs on this node ([`BE_F_LOCAL`]).
pub const CT_F_BE_LOCAL: u16 = 1 << 5;
/// A FIN or RST went through this direction of a TCP flow (cleared by a
/// new SYN on the same tuple): the GC removes the entry after a short idle
/// time (`--ct-tcp-close-timeout-s`, 10 s as Cilium's close timeout)
/// instead of the established-flow one.
pub const CT_F_CLOSING: u16 = 1 << 6;
/// Policy entry: a non-service flow NetworkPolicy allowed, recorded
/// because one of its pods is isolated: for TCP one entry keyed by the
/// original tuple for both directions ([`CT_F_BIDIR`]); otherwise one per
/// direction, each keyed by its own tuple, the reply's also
/// [`CT_F_INBOUND`] when masquerade must leave it alone. Later packets and
/// replies match it and skip policy; no translation.
pub const CT_F_POLICY: u16 = 1 << 7;
/// A DSR flow: on the entry node the forward entry of a flow sent to its
/// remote backend with the frontend in an IP option (no source NAT); on
/// the backend's node the reply entry (with [`CT_F_REPLY`] and
/// [`CT_F_NODEPORT`]) recorded from that option, whose reply leaves with
/// the frontend as source (`vip_be`/`vport_be`) to the client (`nat_*`).
pub const CT_F_DSR: u16 = 1 << 8;
/// Policy entry that stands for both directions of its TCP flow (with
/// [`CT_F_POLICY`]): no entry is kept under the reply tuple, a non-SYN
/// packet whose own tuple misses finds it under its reverse tuple. One
/// insert per allowed connection instead of two. Other protocols, and flows
/// whose replies masquerade must leave alone (a reply entry with
/// [`CT_F_INBOUND`]), keep an entry per direction and never carry it.
pub const CT_F_BIDIR: u16 = 1 << 9;
/// [`CT_F_BIDIR`] entries: a FIN went through the forward direction.
/// [`CT_F_CLOSING`] is set once both directions sent a FIN (or either an
/// RST), so a half-closed connection keeps the established timeout.
pub const CT_F_FIN_FWD: u16 = 1 << 10;
/// [`CT_F_BIDIR`] entries: a FIN went through the reply direction.
pub const CT_F_FIN_REV: u16 = 1 << 11;
/// Policy entry (with [`CT_F_POLICY`]) under the reply tuple of a
/// [`CT_F_BIDIR`] flow, made once [`CT_BIDIR_REPLIES`] replies had found
/// the flow through the reverse tuple: its later replies hit it with their
/// own tuple, at the cost of a forward packet. It passes a reply's FIN or
/// RST on to the [`CT_F_BIDIR`] entry (which decides when the connection
/// is closed) and never admits a pure SYN (a new flow, judged).
pub const CT_F_POLICY_REV: u16 = 1 << 12;
/// Replies a [`CT_F_BIDIR`] flow answers through the reverse tuple before
/// the reply tuple gets its own [`CT_F_POLICY_REV`] entry: a short
/// connection (a request and its answer, TCP_CRR) keeps its single insert,
/// a longer one pays a second so that its replies cost one lookup.
pub const CT_BIDIR_REPLIES: u16 = 8;

/// Value of the NAT maps (`rt_nat4_v2`, `rt_natany4_v2`): the address/port
/// that replaces the source (egress entry) or the destination (ingress
/// entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatValue {
    /// `bpf_ktime_get_coarse_ns()` of the last packet (see [`CtValue`]).
    pub last_seen_ns: u64,
    pub addr_be: u32,
    pub port_be: u16,
    /// `NAT_F_*`.
    pub flags: u16,
}

/// Entry created by pod→outside masquerade.
pub const NAT_F_MASQ: u16 = 1 << 0;
/// Entry created for a NodePort flow to a remote backend.
pub const NAT_F_NODEPORT: u16 = 1 << 1;
/// A FIN or RST went through this direction (see [`CT_F_CLOSING`]).
pub const NAT_F_CLOSING: u16 = 1 << 2;
/// A flow the node itself sends (a host socket): an identity pair that
/// reserves its tuple, or a mapping that moved it off a tuple a translated
/// flow held first.
pub const NAT_F_HOST: u16 = 1 << 3;

// ----------------------------------------------------------------- affinity

/// Key of `rt_aff4_v1`. The client is identified by its IPv4 address in the
/// per-packet path and by its network namespace cookie in socket LB (no
/// source address exists before connect; a pod is a netns).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffKey {
    pub client: u64,
    pub revnat_id: u16,
    /// [`AFF_CLIENT_IP`] or [`AFF_CLIENT_NETNS`].
    pub kind: u8,
    pub _pad: [u8; 5],
}

pub const AFF_CLIENT_IP: u8 = 0;
pub const AFF_CLIENT_NETNS: u8 = 1;

/// Value of `rt_aff4_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffValue {
    /// `bpf_ktime_get_coarse_ns()` of the last use (see [`CtValue`]).
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

// ---------------------------------------------------------------- socket LB

/// Key of `rt_sockrev4_v1`: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// Value of `rt_sockrev4_v1`: the service address the application used.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevValue {
    pub vip_be: u32,
    pub port_be: u16,
    pub revnat_id: u16,
}

// ------------------------------------------------------------ node/config

/// The only key of `rt_config_v1`.
pub const CONFIG_KEY: u32 = 0;

/// Value of `rt_config_v1`: what the programs must know about their node.
/// All-zero (never written) disables NodePort, SNAT and masquerade: the
/// programs then only do ClusterIP LB and local delivery.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// The node's address on the underlay (NodePort target, SNAT source).
    pub node_ip_be: u32,
    /// Source address for hairpin flows (client = backend), e.g. 169.254.42.1.
    pub hairpin_ip_be: u32,
    /// Cluster pod CIDR (e.g. 10.42.0.0/16): never masqueraded.
    pub cluster_cidr_be: u32,
    /// Another destination range never masqueraded (e.g. the node underlay).
    pub nomasq_cidr_be: u32,
    pub cluster_cidr_len: u8,
    pub nomasq_cidr_len: u8,
    pub _pad: u16,
    /// `CFG_F_*`.
    pub flags: u32,
    /// First and last port for SNAT (host order), e.g. 32768..=60999.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad2: u32,
}

/// Socket LB rewrites connect/sendmsg (off: per-packet LB only).
pub const CFG_F_SOCK_LB: u32 = 1 << 0;
/// Masquerade pod→outside traffic to `node_ip`.
pub const CFG_F_MASQUERADE: u32 = 1 << 1;
/// Drop packets for a service without backends instead of answering with a
/// RST / ICMP port unreachable (the Kubernetes behaviour, and the default).
pub const CFG_F_DROP_NO_BACKEND: u32 = 1 << 2;
/// Some local pod is isolated by NetworkPolicy (or audited): the programs
/// consult `rt_polep4_v1` for new flows. Off, they never do, so a node
/// without policies pays nothing.
pub const CFG_F_POLICY: u32 = 1 << 3;

/// LPM key data of `rt_node4_v1` (the trie key is `{prefix_len, addr}`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeKey {
    pub addr_be: u32,
}

/// Value of `rt_node4_v1`: the node owning a pod CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeValue {
    pub node_ip_be: u32,
    pub flags: u32,
}

// ------------------------------------------------------------------ events

/// One entry of `rt_events_v1`: a packet or connect that was dropped,
/// rejected or passed untranslated because of a failure. The tuple is as
/// the program saw it (0 where unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DropEvent {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick granularity).
    pub ts_ns: u64,
    /// A [`stats`] reason.
    pub reason: u32,
    /// Interface the packet was seen on (0 for socket LB).
    pub ifindex: u32,
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// `EV_SRC_*`: which program reported it.
    pub source: u8,
    pub _pad: u16,
}

/// `rt_from_pod`.
pub const EV_SRC_FROM_POD: u8 = 1;
/// `rt_from_net`.
pub const EV_SRC_FROM_NET: u8 = 2;
/// `rt_to_net`.
pub const EV_SRC_TO_NET: u8 = 3;
/// Socket LB (connect/sendmsg).
pub const EV_SRC_SOCK: u8 = 4;
/// `rt_to_pod`.
pub const EV_SRC_TO_POD: u8 = 5;
/// `rt_xdp_net`.
pub const EV_SRC_XDP_NET: u8 = 6;

// ------------------------------------------------------------ NetworkPolicy
//
// Cilium's shape, with node-local identities: every distinct label set
// (namespace labels + pod labels + namespace name) gets a numeric identity,
// `rt_ipcache4_v1` maps every address to the identity of what owns it, and
// each local endpoint's allow rules are keyed by (endpoint, peer identity,
// direction, protocol, port). Identities never leave the node (the peer is
// found by its IP on both routing modes), so each agent numbers them alone.
// A new flow of an isolated pod is judged once; the verdict lives on as
// `CT_F_POLICY` (or load-balancer) conntrack entries, so established packets
// and replies never consult policy again.

/// Reserved security identities.
pub mod identity {
    /// Wildcard peer in [`crate::PolicyKey`] (a rule whose peers are
    /// "everyone"); never an address's identity.
    pub const ANY: u32 = 0;
    /// An address of this node: always allowed both ways (kubelet probes,
    /// host processes), never looked up in policy.
    pub const HOST: u32 = 1;
    /// Outside the cluster (the `0.0.0.0/0` entry of the ipcache).
    pub const WORLD: u32 = 2;
    /// Another node's address.
    pub const REMOTE_NODE: u32 = 3;
    /// First identity of a pod label set.
    pub const FIRST_LABELS: u32 = 256;
    /// First identity of an ipBlock prefix.
    pub const FIRST_CIDR: u32 = 1 << 24;
}

/// Slots of `rt_polidx4_v1`: a node's pods come from its pod CIDR (a /24
/// by default), so the low 12 bits tell them apart; pods that share a slot
/// only cost each other a `rt_polep4_v1` lookup.
pub const POLIDX4_SLOTS: u32 = 4096;

/// The `rt_polidx4_v1` slot of the local pod address `addr_be` (network
/// order). The agent counts each `rt_polep4_v1` entry in its slot before
/// writing the entry and uncounts it after removing it, so a slot of 0
/// means the address has no policy state: the packets of pods no policy
/// selects skip the hash lookup, an isolated pod is never missed.
#[inline(always)]
pub const fn polidx_slot(addr_be: u32) -> u32 {
    u32::from_be(addr_be) & (POLIDX4_SLOTS - 1)
}

/// Value of `rt_polep4_v1` (key: [`EndpointKey`], the pod's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyEndpointValue {
    /// The endpoint's id in [`PolicyKey::ep_id_be`] (agent-allocated,
    /// address-family neutral).
    pub ep_id: u32,
    /// The pod's own security identity.
    pub identity: u32,
    /// `PE_F_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// Ingress is isolated: new flows into the pod need an allow rule.
pub const PE_F_ISOLATED_IN: u32 = 1 << 0;
/// Egress is isolated: new flows out of the pod need an allow rule.
pub const PE_F_ISOLATED_OUT: u32 = 1 << 1;
/// Audit mode (namespace annotation): a flow policy would drop into the
/// pod is allowed and reported as `policy_audit_in`.
pub const PE_F_AUDIT_IN: u32 = 1 << 2;
/// Audit mode for egress (`policy_audit_out`).
pub const PE_F_AUDIT_OUT: u32 = 1 << 3;
/// Some ingress rule allows every peer ([`identity::ANY`] entries exist):
/// the programs look the wildcard up only when this is set.
pub const PE_F_ANY_IN: u32 = 1 << 4;
/// Some egress rule allows every peer.
pub const PE_F_ANY_OUT: u32 = 1 << 5;
/// The agent failed to write this endpoint's rules: every isolated
/// direction denies all but the node and the pod itself (fail closed)
/// until a later write succeeds.
pub const PE_F_FAIL_CLOSED: u32 = 1 << 6;
/// Every ingress rule of the endpoint is a single-port rule, held by
/// `rt_policy4x_v1`: the programs do not ask the `rt_policy4_v1` trie.
/// Absent (entries written before the split, or ranges), both are asked.
pub const PE_F_EXACT_IN: u32 = 1 << 7;
/// Every egress rule of the endpoint is a single-port rule.
pub const PE_F_EXACT_OUT: u32 = 1 << 8;

/// LPM key data of `rt_ipcache4_v1` (the trie key is `{prefix_len, addr}`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheKey {
    pub addr_be: u32,
}

/// Value of `rt_ipcache4_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    /// Who owns the address: a pod's label identity, [`identity::HOST`],
    /// [`identity::REMOTE_NODE`] or [`identity::WORLD`].
    pub identity: u32,
    /// The identity of the longest ipBlock prefix (of any policy) holding
    /// the address, 0 when none: ipBlock peers match pod and node
    /// addresses too, as upstream's netpol suite expects.
    pub cidr_identity: u32,
}

/// Ingress rules (peer = source) in [`PolicyKey::dir`].
pub const POL_DIR_INGRESS: u8 = 1;
/// Egress rules (peer = destination).
pub const POL_DIR_EGRESS: u8 = 2;

/// LPM key data of `rt_policy4_v1`. Every field is big-endian so the
/// trie's bit order is the field order: a rule fixes the endpoint, peer
/// identity and direction ([`POLICY_PREFIX_ANY_PROTO`] bits), optionally the
/// protocol ([`POLICY_PREFIX_ANY_PORT`]) and a port prefix (up to
/// [`POLICY_PREFIX_FULL`]; an `endPort` range is a few prefixes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyKey {
    pub ep_id_be: u32,
    /// Peer identity ([`identity::ANY`] for "every peer").
    pub identity_be: u32,
    /// [`POL_DIR_INGRESS`] or [`POL_DIR_EGRESS`].
    pub dir: u8,
    /// [`proto`] number.
    pub proto: u8,
    /// Destination port (of the endpoint for ingress, of the peer for
    /// egress), after Service translation.
    pub port_be: u16,
}

/// Prefix length of a rule for every protocol and port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length of a rule for every port of one protocol.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of a rule for exactly one port.
pub const POLICY_PREFIX_FULL: u32 = 96;

/// Value of `rt_policy4_v1`: an allow rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyValue {
    /// Agent-assigned number of the NetworkPolicy that allows (one of them
    /// when several do), for `riptide policy` views.
    pub policy_ref: u32,
    pub flags: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all types are repr(C), made of integers and byte arrays, with
    // explicit padding, so every bit pattern is valid and none is uninit.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::BackendValue {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::NatValue {}
    unsafe impl aya::Pod for super::AffKey {}
    unsafe impl aya::Pod for super::AffValue {}
    unsafe impl aya::Pod for super::SockRevKey {}
    unsafe impl aya::Pod for super::SockRevValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::NodeKey {}
    unsafe impl aya::Pod for super::NodeValue {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::MaglevValue {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::PolicyEndpointValue {}
    unsafe impl aya::Pod for super::IpcacheKey {}
    unsafe impl aya::Pod for super::IpcacheValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::SrcRangeKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    /// Sum of field sizes equals the struct size: no implicit padding.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EndpointKey>(), 4);
        assert_eq!(size_of::<EndpointValue>(), 4 + 4 + 6 + 6);
        assert_eq!(size_of::<SvcKey>(), 4 + 2 + 1 + 1 + 2 + 2);
        assert_eq!(size_of::<SvcValue>(), 4 + 2 + 2 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<BackendKey>(), 4);
        assert_eq!(size_of::<BackendValue>(), 4 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<RevNatKey>(), 4);
        assert_eq!(size_of::<RevNatValue>(), 8);
        assert_eq!(size_of::<CtKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(
            size_of::<CtValue>(),
            8 + 4 + 2 + 2 + 4 + 2 + 2 + 4 + 2 + 2 + 4 + 2 + 2
        );
        assert_eq!(size_of::<NatValue>(), 8 + 4 + 2 + 2);
        assert_eq!(size_of::<AffKey>(), 8 + 2 + 1 + 5);
        assert_eq!(size_of::<AffValue>(), 16);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 8);
        assert_eq!(size_of::<Config>(), 4 * 4 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<NodeKey>(), 4);
        assert_eq!(size_of::<NodeValue>(), 8);
        assert_eq!(size_of::<MaglevKey>(), 4);
        assert_eq!(
            size_of::<DropEvent>(),
            8 + 4 + 4 + 4 + 4 + 2 + 2 + 1 + 1 + 2
        );
        assert_eq!(size_of::<MaglevValue>(), 4 * MAGLEV_CHUNK);
        assert!(MAGLEV_M_MAX as usize / MAGLEV_CHUNK < 256, "chunk index fits a u8");
        assert!(MAGLEV_SIZES.contains(&MAGLEV_M_DEFAULT) && MAGLEV_SIZES.contains(&MAGLEV_M_MAX));
        assert_eq!(size_of::<PolicyEndpointValue>(), 16);
        assert_eq!(size_of::<IpcacheKey>(), 4);
        assert_eq!(size_of::<IpcacheValue>(), 8);
        assert_eq!(size_of::<PolicyKey>(), 4 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<PolicyKey>() as u32 * 8, POLICY_PREFIX_FULL);
        assert_eq!(size_of::<PolicyValue>(), 8);
        assert_eq!(size_of::<SrcRangeKey>() as u32 * 8, SRCRANGE_PREFIX_BASE + 32);
        // 8-byte aligned values must have 8-multiple sizes (arrays of them in
        // per-CPU maps and the verifier's view agree).
        assert_eq!(size_of::<CtValue>() % align_of::<CtValue>(), 0);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        for n in names::ALL_MAPS.iter().chain(names::ALL_PROGRAMS.iter()) {
            assert!(n.len() <= 15, "{n} is too long for a map or program name");
        }
    }

    #[test]
    fn every_stats_reason_has_a_name() {
        assert_eq!(stats::NAMES.len() as u32, stats::LAST + 1);
        assert!(stats::NAMES.len() as u32 <= stats::MAX);
    }
}
