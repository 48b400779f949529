//! The node's maps other than services and endpoints, as methods of
//! [`Datapath`]: configuration, remote pod CIDRs, drop counters, and dumps
//! of conntrack, NAT and affinity.

use std::net::Ipv4Addr;

use aya::maps::{
    Array, HashMap, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use riptide_common::{
    AffKey, AffValue, CONFIG_KEY, Config, CtKey, CtValue, NatValue, NodeKey, NodeValue, names,
    stats,
};

use crate::{
    Error, Result,
    error::{ignore_missing, map_err},
    loader::Datapath,
    service::Services,
};


/// Per-reason counters summed over CPUs, indexed like [`stats::NAMES`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub Vec<u64>);

impl Stats {
    /// Counter of `reason` (a [`stats`] constant).
    pub fn get(&self, reason: u32) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    /// `(name, value)` for every named reason.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        stats::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, self.0.get(i).copied().unwrap_or(0)))
    }
}

impl Datapath {
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or(Error::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(Error::MissingMap { name })
    }

    /// Moves the service maps out into a [`Services`] writer (ids read back
    /// from the maps). Call once; the programs keep using the same maps.
    pub fn services(&mut self) -> Result<Services> {
        let mut take =
            |name: &'static str| self.ebpf.take_map(name).ok_or(Error::MissingMap { name });
        let svc = take(names::SVC4)?;
        let be = take(names::BE4)?;
        let revnat = take(names::REVNAT4)?;
        let maglev = take(names::MAGLEV4)?;
        let srcrange = take(names::SRCRANGE4)?;
        Services::from_maps(svc, be, revnat, maglev, srcrange)
    }

    /// Writes the node configuration the programs read.
    pub fn set_config(&mut self, cfg: &Config) -> Result<()> {
        let mut a: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        a.set(CONFIG_KEY, cfg, 0).map_err(map_err(names::CONFIG))
    }

    /// The node configuration currently in the map.
    pub fn config(&self) -> Result<Config> {
        let a: Array<&MapData, Config> =
            Array::try_from(self.map(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        a.get(&CONFIG_KEY, 0).map_err(map_err(names::CONFIG))
    }

    /// Records that `cidr/len` holds the pods of the node at `node_ip`
    /// (pods there are never masqueraded).
    pub fn upsert_node(&mut self, cidr: Ipv4Addr, len: u8, node_ip: Ipv4Addr) -> Result<()> {
        let v = NodeValue {
            node_ip_be: u32::from(node_ip).to_be(),
            flags: 0,
        };
        self.node_trie()?
            .insert(&node_key(cidr, len), v, 0)
            .map_err(map_err(names::NODE4))
    }

    /// Forgets a remote pod CIDR; absent is not an error.
    pub fn remove_node(&mut self, cidr: Ipv4Addr, len: u8) -> Result<()> {
        ignore_missing(self.node_trie()?.remove(&node_key(cidr, len))).map_err(map_err(names::NODE4))
    }

    fn node_trie(&mut self) -> Result<LpmTrie<&mut MapData, NodeKey, NodeValue>> {
        LpmTrie::try_from(self.map_mut(names::NODE4)?).map_err(map_err(names::NODE4))
    }

    /// Counters by reason, summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let a: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(names::STATS)?).map_err(map_err(names::STATS))?;
        let mut out = vec![0u64; stats::MAX as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = a.get(&(i as u32), 0).map_err(map_err(names::STATS))?;
            *slot = v.iter().sum();
        }
        Ok(Stats(out))
    }

    /// Every conntrack entry of both tables (TCP, then the rest; for the
    /// CLI, GC and failing tests).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let mut out = self.conntrack_table(names::CT4)?;
        out.extend(self.conntrack_table(names::CT_ANY4)?);
        Ok(out)
    }

    /// Every entry of one conntrack table ([`names::CT4`] or
    /// [`names::CT_ANY4`]).
    pub fn conntrack_table(&self, name: &'static str) -> Result<Vec<(CtKey, CtValue)>> {
        let m: HashMap<&MapData, CtKey, CtValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(m.iter().filter_map(std::result::Result::ok).collect())
    }

    /// Every NAT entry of both tables (TCP, then the rest).
    pub fn nat(&self) -> Result<Vec<(CtKey, NatValue)>> {
        let mut out = self.nat_table(names::NAT4)?;
        out.extend(self.nat_table(names::NAT_ANY4)?);
        Ok(out)
    }

    /// Every entry of one NAT table ([`names::NAT4`] or
    /// [`names::NAT_ANY4`]).
    pub fn nat_table(&self, name: &'static str) -> Result<Vec<(CtKey, NatValue)>> {
        let m: HashMap<&MapData, CtKey, NatValue> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(m.iter().filter_map(std::result::Result::ok).collect())
    }

    /// Every sessionAffinity entry (client → backend per frontend).
    pub fn affinity(&self) -> Result<Vec<(AffKey, AffValue)>> {
        let m: HashMap<&MapData, AffKey, AffValue> =
            HashMap::try_from(self.map(names::AFF4)?).map_err(map_err(names::AFF4))?;
        Ok(m.iter().filter_map(std::result::Result::ok).collect())
    }
}

/// The `rt_node4_v1` key of the range `cidr/len`.
fn node_key(cidr: Ipv4Addr, len: u8) -> Key<NodeKey> {
    Key::new(
        u32::from(len),
        NodeKey {
            addr_be: u32::from(cidr).to_be(),
        },
    )
}
