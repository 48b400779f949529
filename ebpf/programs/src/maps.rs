//! Map definitions. Names and value types come from `riptide-common`; maps
//! are pinned by name so the loader can place them under the node's pin
//! directory and the CNI and a restarted agent find the same maps.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use riptide_common::{
    AffKey, AffValue, BackendKey, BackendValue, CONFIG_KEY, Config, CtKey, CtValue, EndpointKey,
    EndpointValue, IpcacheKey, IpcacheValue, MaglevKey, MaglevValue, NatValue, NodeKey, NodeValue,
    PolicyEndpointValue, PolicyKey, PolicyValue, RevNatKey, RevNatValue, SockRevKey, SockRevValue,
    SrcRangeKey, SvcKey, SvcValue, capacity, stats,
};

/// Local pod endpoints (`rt_ep4_v1`).
#[map(name = "rt_ep4_v1")]
pub static EP4: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(capacity::EP4, 0);

/// Per-CPU counters by reason (`rt_stats_v2`).
#[map(name = "rt_stats_v2")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::MAX, 0);

#[map(name = "rt_svc4_v1")]
pub static SVC4: HashMap<SvcKey, SvcValue> = HashMap::pinned(capacity::SVC4, 0);

#[map(name = "rt_be4_v1")]
pub static BE4: HashMap<BackendKey, BackendValue> = HashMap::pinned(capacity::BE4, 0);

#[map(name = "rt_revnat4_v1")]
pub static REVNAT4: HashMap<RevNatKey, RevNatValue> = HashMap::pinned(capacity::REVNAT4, 0);

/// LRU: under pressure the oldest flows go first instead of new flows
/// failing (Cilium's choice too); the agent exports fill levels. TCP
/// only: [`CT_ANY4`] takes everything a flood can be made of.
#[map(name = "rt_ct4_v3")]
pub static CT4: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CT4, 0);

/// Conntrack of every protocol but TCP, and the inbound markers of every
/// protocol (see `ct`).
#[map(name = "rt_ctany4_v3")]
pub static CT_ANY4: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(capacity::CT_ANY4, 0);

/// Source NAT of TCP flows; [`NAT_ANY4`] takes every other protocol, so a
/// flood of new UDP mappings cannot evict a live TCP one (see `nat`).
#[map(name = "rt_nat4_v2")]
pub static NAT4: LruHashMap<CtKey, NatValue> = LruHashMap::pinned(capacity::NAT4, 0);

#[map(name = "rt_natany4_v2")]
pub static NAT_ANY4: LruHashMap<CtKey, NatValue> = LruHashMap::pinned(capacity::NAT_ANY4, 0);

#[map(name = "rt_aff4_v1")]
pub static AFF4: LruHashMap<AffKey, AffValue> = LruHashMap::pinned(capacity::AFF4, 0);

#[map(name = "rt_sockrev4_v1")]
pub static SOCKREV4: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(capacity::SOCKREV4, 0);

#[map(name = "rt_config_v1")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Maglev tables in 4 KiB chunks, `ceil(M / MAGLEV_CHUNK)` per (frontend,
/// scope) of services using `ALG_MAGLEV`; `BPF_F_NO_PREALLOC` so only
/// written chunks take memory.
#[map(name = "rt_maglev4_v2")]
pub static MAGLEV4: HashMap<MaglevKey, MaglevValue> =
    HashMap::pinned(capacity::MAGLEV4, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "rt_node4_v1")]
pub static NODE4: LpmTrie<NodeKey, NodeValue> = LpmTrie::pinned(capacity::NODE4, 0);

/// NetworkPolicy state of local pods that are isolated or audited (agent
/// writes; absent = not isolated).
#[map(name = "rt_polep4_v1")]
pub static POLEP4: HashMap<EndpointKey, PolicyEndpointValue> =
    HashMap::pinned(capacity::POLEP4, 0);

/// [`POLEP4`] entries per address slot (`riptide_common::polidx_slot`):
/// an inlined array read that spares pods without policy state the hash
/// lookup.
#[map(name = "rt_polidx4_v1")]
pub static POLIDX4: Array<u32> = Array::pinned(riptide_common::POLIDX4_SLOTS, 0);

/// Address → security identity (LPM; LPM tries must be `BPF_F_NO_PREALLOC`).
#[map(name = "rt_ipcache4_v1")]
pub static IPCACHE4: LpmTrie<IpcacheKey, IpcacheValue> =
    LpmTrie::pinned(capacity::IPCACHE4, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Allow rules keyed by (endpoint, peer identity, direction, protocol,
/// port prefix).
#[map(name = "rt_policy4_v1")]
pub static POLICY4: LpmTrie<PolicyKey, PolicyValue> =
    LpmTrie::pinned(capacity::POLICY4, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// The `/32` entries of the ipcache, asked before [`IPCACHE4`]
/// (`BPF_F_NO_PREALLOC`: memory per pod known, not per slot).
#[map(name = "rt_ipcache4x_v1")]
pub static IPCACHE4_EXACT: HashMap<IpcacheKey, IpcacheValue> = HashMap::pinned(
    capacity::IPCACHE4_EXACT,
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// Single-port allow rules, asked before [`POLICY4`].
#[map(name = "rt_policy4x_v1")]
pub static POLICY4_EXACT: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(
    capacity::POLICY4_EXACT,
    aya_ebpf::bindings::BPF_F_NO_PREALLOC,
);

/// `loadBalancerSourceRanges`: allowed source prefixes per load-balancer
/// frontend (`srcrange`).
#[map(name = "rt_srcrange4_v1")]
pub static SRCRANGE4: LpmTrie<SrcRangeKey, u8> =
    LpmTrie::pinned(capacity::SRCRANGE4, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Counts one event of `reason` on this CPU.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(ptr) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *ptr += 1 };
    }
}

/// All-zero configuration (what the map holds before the agent writes it).
static NO_CONFIG: Config = Config {
    node_ip_be: 0,
    hairpin_ip_be: 0,
    cluster_cidr_be: 0,
    nomasq_cidr_be: 0,
    cluster_cidr_len: 0,
    nomasq_cidr_len: 0,
    _pad: 0,
    flags: 0,
    snat_port_min: 0,
    snat_port_max: 0,
    _pad2: 0,
};

/// The node configuration, by reference (an inlined array lookup; callers
/// read only the fields they need instead of copying 32 bytes).
#[inline(always)]
pub fn config() -> &'static Config {
    CONFIG.get(CONFIG_KEY).unwrap_or(&NO_CONFIG)
}
