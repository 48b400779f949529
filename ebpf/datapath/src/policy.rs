//! Typed access to the NetworkPolicy maps the agent writes:
//! `rt_polep4_v1` (local pods that are isolated or audited),
//! `rt_ipcache4_v1` (address/prefix → security identity) and
//! `rt_policy4_v1` (allow rules per endpoint, identity, direction,
//! protocol and port prefix), and the exact-match hashes the programs ask
//! first: `rt_ipcache4x_v1` (the `/32` entries) and `rt_policy4x_v1` (the
//! single-port rules). Each entry lives in one of a pair: the `_exact`
//! methods write the hashes, the others the tries.
//!
//! The values are `riptide_common`'s raw contract types, which the agent's
//! policy compiler produces as they are; this module only builds the LPM
//! keys. Keys are canonical: bits beyond a prefix are cleared before a
//! write or a delete, so the same prefix always names the same entry (the
//! kernel compares only the prefix bits, but would keep and list the rest).
//!
//! Write order for readers (the programs judge new flows while the agent
//! writes): ipcache entries before the rules that name their identities,
//! rules before the endpoint entry that makes a pod isolated, stale rules
//! deleted last.
//!
//! `rt_polidx4_v1` counts the endpoint entries of each address slot
//! (`riptide_common::polidx_slot`), so the programs ask `rt_polep4_v1`
//! only for addresses whose slot is not 0. [`PolicyMaps::upsert_endpoint`]
//! counts a new entry before writing it and [`PolicyMaps::remove_endpoint`]
//! uncounts it after deleting it: a count may be too high for a moment
//! (a pod costs a hash lookup), never too low (an isolated pod would be
//! skipped). Each load recounts from `rt_polep4_v1`
//! ([`PolicyMaps::recount_endpoints`]), which covers entries an older
//! version wrote without counting them; it only raises counts, so a load
//! next to a running writer (`riptide-agent --once`) cannot lower a count
//! that writer just raised for an entry it is about to write.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
};

use aya::{
    Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError,
        lpm_trie::{Key, LpmTrie},
    },
};
use riptide_common::{
    EndpointKey, IpcacheKey, IpcacheValue, POLIDX4_SLOTS, PolicyEndpointValue, PolicyKey,
    PolicyValue, names, polidx_slot,
};

use crate::{
    Error, Result,
    error::{deleted, ignore_missing, map_err},
    loader::Datapath,
};

/// Handles on a node's three NetworkPolicy maps (own file descriptors:
/// usable on any thread, independent of the [`Datapath`] they came from).
pub struct PolicyMaps {
    endpoints: HashMap<MapData, EndpointKey, PolicyEndpointValue>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    rules: LpmTrie<MapData, PolicyKey, PolicyValue>,
    ipcache_exact: HashMap<MapData, IpcacheKey, IpcacheValue>,
    rules_exact: HashMap<MapData, PolicyKey, PolicyValue>,
    slots: Array<MapData, u32>,
}

/// The six maps' data, in [`PolicyMaps`] field order.
struct Data {
    polep: MapData,
    ipcache: MapData,
    rules: MapData,
    ipcache_exact: MapData,
    rules_exact: MapData,
    polidx: MapData,
}

impl PolicyMaps {
    /// Opens the pinned maps of `node` (the datapath must have been loaded
    /// with `Pinning::Node(node)`).
    pub fn open_pinned(node: &str) -> Result<Self> {
        let dir = crate::pins::pin_dir(node)?;
        let open = |name: &'static str| MapData::from_pin(dir.join(name)).map_err(map_err(name));
        Self::from_data(Data {
            polep: open(names::POLEP4)?,
            ipcache: open(names::IPCACHE4)?,
            rules: open(names::POLICY4)?,
            ipcache_exact: open(names::IPCACHE4_EXACT)?,
            rules_exact: open(names::POLICY4_EXACT)?,
            polidx: open(names::POLIDX4)?,
        })
    }

    fn from_data(d: Data) -> Result<Self> {
        Ok(Self {
            endpoints: HashMap::try_from(Map::HashMap(d.polep)).map_err(map_err(names::POLEP4))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(d.ipcache)).map_err(map_err(names::IPCACHE4))?,
            rules: LpmTrie::try_from(Map::LpmTrie(d.rules)).map_err(map_err(names::POLICY4))?,
            ipcache_exact: HashMap::try_from(Map::HashMap(d.ipcache_exact))
                .map_err(map_err(names::IPCACHE4_EXACT))?,
            rules_exact: HashMap::try_from(Map::HashMap(d.rules_exact))
                .map_err(map_err(names::POLICY4_EXACT))?,
            slots: Array::try_from(Map::Array(d.polidx)).map_err(map_err(names::POLIDX4))?,
        })
    }

    // ------------------------------------------------------ exact hashes

    /// Sets the identity of the address `addr` in `rt_ipcache4x_v1` (what
    /// a `/32` trie entry would say; the programs ask it first).
    pub fn upsert_ipcache_exact(&mut self, addr: Ipv4Addr, value: IpcacheValue) -> Result<()> {
        self.ipcache_exact
            .insert(ipcache_addr(addr), value, 0)
            .map_err(map_err(names::IPCACHE4_EXACT))
    }

    /// Removes `addr` from `rt_ipcache4x_v1`; absent is not an error.
    pub fn remove_ipcache_exact(&mut self, addr: Ipv4Addr) -> Result<()> {
        ignore_missing(self.ipcache_exact.remove(&ipcache_addr(addr)))
            .map_err(map_err(names::IPCACHE4_EXACT))
    }

    /// Every `rt_ipcache4x_v1` entry.
    pub fn list_ipcache_exact(&self) -> Result<Vec<(Ipv4Addr, IpcacheValue)>> {
        let entries = dump(self.ipcache_exact.iter()).map_err(map_err(names::IPCACHE4_EXACT))?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k.addr_be)), v))
            .collect())
    }

    /// Writes the single-port rule `key` to `rt_policy4x_v1` (what a
    /// [`riptide_common::POLICY_PREFIX_FULL`] trie entry would allow).
    pub fn upsert_rule_exact(&mut self, key: PolicyKey, value: PolicyValue) -> Result<()> {
        self.rules_exact
            .insert(key, value, 0)
            .map_err(map_err(names::POLICY4_EXACT))
    }

    /// Removes the single-port rule `key`; absent is not an error.
    pub fn remove_rule_exact(&mut self, key: PolicyKey) -> Result<()> {
        ignore_missing(self.rules_exact.remove(&key)).map_err(map_err(names::POLICY4_EXACT))
    }

    /// Every `rt_policy4x_v1` rule.
    pub fn list_rules_exact(&self) -> Result<Vec<(PolicyKey, PolicyValue)>> {
        dump(self.rules_exact.iter()).map_err(map_err(names::POLICY4_EXACT))
    }

    // ------------------------------------------------------------ ipcache

    /// Sets the identity of `addr/prefix_len` (`/32` for a pod or node
    /// address, shorter for an ipBlock prefix or `0.0.0.0/0`).
    pub fn upsert_ipcache(
        &mut self,
        addr: Ipv4Addr,
        prefix_len: u8,
        value: IpcacheValue,
    ) -> Result<()> {
        let key = ipcache_key(addr, prefix_len)?;
        self.ipcache
            .insert(&key, value, 0)
            .map_err(map_err(names::IPCACHE4))
    }

    /// Removes `addr/prefix_len`; absent is not an error.
    pub fn remove_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        let key = ipcache_key(addr, prefix_len)?;
        ignore_missing(self.ipcache.remove(&key)).map_err(map_err(names::IPCACHE4))
    }

    /// Every ipcache entry as `((addr, prefix_len), value)`.
    pub fn list_ipcache(&self) -> Result<Vec<((Ipv4Addr, u8), IpcacheValue)>> {
        let entries = dump(self.ipcache.iter()).map_err(map_err(names::IPCACHE4))?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| {
                let data = k.data();
                (
                    (
                        Ipv4Addr::from(u32::from_be(data.addr_be)),
                        k.prefix_len() as u8,
                    ),
                    v,
                )
            })
            .collect())
    }

    // ---------------------------------------------------------- endpoints

    /// Sets the policy state of the local pod `addr` (written for pods that
    /// are isolated in some direction or audited; absent = allow all).
    /// A new entry is counted in `rt_polidx4_v1` first.
    pub fn upsert_endpoint(&mut self, addr: Ipv4Addr, value: PolicyEndpointValue) -> Result<()> {
        if self.get_endpoint(addr)?.is_none() {
            self.add_to_slot(addr, 1)?;
        }
        self.endpoints
            .insert(endpoint_key(addr), value, 0)
            .map_err(map_err(names::POLEP4))
    }

    /// Removes the policy state of `addr` (the pod is no longer isolated or
    /// is gone), then uncounts it; absent is not an error.
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<()> {
        if deleted(self.endpoints.remove(&endpoint_key(addr))).map_err(map_err(names::POLEP4))? {
            self.add_to_slot(addr, -1)?;
        }
        Ok(())
    }

    /// Adds `delta` to the `rt_polidx4_v1` count of `addr`'s slot (never
    /// below 0).
    fn add_to_slot(&mut self, addr: Ipv4Addr, delta: i32) -> Result<()> {
        let slot = polidx_slot(u32::from(addr).to_be());
        let n = self.slots.get(&slot, 0).map_err(map_err(names::POLIDX4))?;
        let n = n.saturating_add_signed(delta);
        self.slots.set(slot, n, 0).map_err(map_err(names::POLIDX4))
    }

    /// Raises every `rt_polidx4_v1` count to the number of entries
    /// `rt_polep4_v1` holds in its slot (at load, before the programs are
    /// pinned: pins may carry entries of an earlier run or version). A
    /// count above that stays: it only costs its slot's pods a lookup.
    pub fn recount_endpoints(&mut self) -> Result<()> {
        let mut counts = vec![0u32; POLIDX4_SLOTS as usize];
        for (addr, _) in self.list_endpoints()? {
            counts[polidx_slot(u32::from(addr).to_be()) as usize] += 1;
        }
        for (slot, n) in (0..).zip(counts) {
            if self.slots.get(&slot, 0).map_err(map_err(names::POLIDX4))? < n {
                self.slots.set(slot, n, 0).map_err(map_err(names::POLIDX4))?;
            }
        }
        Ok(())
    }

    /// The `rt_polidx4_v1` count of `addr`'s slot.
    pub fn slot_count(&self, addr: Ipv4Addr) -> Result<u32> {
        let slot = polidx_slot(u32::from(addr).to_be());
        self.slots.get(&slot, 0).map_err(map_err(names::POLIDX4))
    }

    /// The policy state of `addr`, if it has one.
    pub fn get_endpoint(&self, addr: Ipv4Addr) -> Result<Option<PolicyEndpointValue>> {
        match self.endpoints.get(&endpoint_key(addr), 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: names::POLEP4,
                source,
            }),
        }
    }

    /// Every endpoint entry.
    pub fn list_endpoints(&self) -> Result<Vec<(Ipv4Addr, PolicyEndpointValue)>> {
        let entries = dump(self.endpoints.iter()).map_err(map_err(names::POLEP4))?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k.addr_be)), v))
            .collect())
    }

    // -------------------------------------------------------------- rules

    /// Writes the allow rule `key` with `prefix_len` bits
    /// ([`riptide_common::POLICY_PREFIX_ANY_PROTO`] = every protocol and
    /// port, [`riptide_common::POLICY_PREFIX_ANY_PORT`] = every port of
    /// `key.proto`, up to [`POLICY_PREFIX_FULL`] = one port).
    pub fn upsert_rule(
        &mut self,
        prefix_len: u32,
        key: PolicyKey,
        value: PolicyValue,
    ) -> Result<()> {
        let key = rule_key(prefix_len, key)?;
        self.rules
            .insert(&key, value, 0)
            .map_err(map_err(names::POLICY4))
    }

    /// Removes the rule `(prefix_len, key)`; absent is not an error.
    pub fn remove_rule(&mut self, prefix_len: u32, key: PolicyKey) -> Result<()> {
        let key = rule_key(prefix_len, key)?;
        ignore_missing(self.rules.remove(&key)).map_err(map_err(names::POLICY4))
    }

    /// Every rule as `((prefix_len, key), value)`.
    pub fn list_rules(&self) -> Result<Vec<((u32, PolicyKey), PolicyValue)>> {
        let entries = dump(self.rules.iter()).map_err(map_err(names::POLICY4))?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect())
    }
}

impl Datapath {
    /// The NetworkPolicy maps of this datapath, on duplicated file
    /// descriptors (the programs and this `Datapath` keep theirs), so it
    /// can be called more than once and the handles moved to another
    /// thread.
    pub fn policy(&self) -> Result<PolicyMaps> {
        let map = |name: &'static str| self.ebpf.map(name).ok_or(Error::MissingMap { name });
        let polep: HashMap<&MapData, EndpointKey, PolicyEndpointValue> =
            HashMap::try_from(map(names::POLEP4)?).map_err(map_err(names::POLEP4))?;
        let ipcache: LpmTrie<&MapData, IpcacheKey, IpcacheValue> =
            LpmTrie::try_from(map(names::IPCACHE4)?).map_err(map_err(names::IPCACHE4))?;
        let rules: LpmTrie<&MapData, PolicyKey, PolicyValue> =
            LpmTrie::try_from(map(names::POLICY4)?).map_err(map_err(names::POLICY4))?;
        let ipcache_exact: HashMap<&MapData, IpcacheKey, IpcacheValue> =
            HashMap::try_from(map(names::IPCACHE4_EXACT)?)
                .map_err(map_err(names::IPCACHE4_EXACT))?;
        let rules_exact: HashMap<&MapData, PolicyKey, PolicyValue> =
            HashMap::try_from(map(names::POLICY4_EXACT)?).map_err(map_err(names::POLICY4_EXACT))?;
        let polidx: Array<&MapData, u32> =
            Array::try_from(map(names::POLIDX4)?).map_err(map_err(names::POLIDX4))?;
        PolicyMaps::from_data(Data {
            polep: dup(names::POLEP4, polep.map())?,
            ipcache: dup(names::IPCACHE4, ipcache.map())?,
            rules: dup(names::POLICY4, rules.map())?,
            ipcache_exact: dup(names::IPCACHE4_EXACT, ipcache_exact.map())?,
            rules_exact: dup(names::POLICY4_EXACT, rules_exact.map())?,
            polidx: dup(names::POLIDX4, polidx.map())?,
        })
    }
}

/// A second handle on `data` (its own file descriptor).
fn dup(name: &'static str, data: &MapData) -> Result<MapData> {
    let fd: OwnedFd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Io {
            action: "duplicating the file descriptor of map",
            path: name.into(),
            source,
        })?;
    MapData::from_fd(fd).map_err(map_err(name))
}

/// Collects a map dump; an entry deleted between the key walk and its
/// lookup (a concurrent writer) is skipped, not an error.
fn dump<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<Vec<(K, V)>, MapError> {
    let mut out = Vec::new();
    for entry in iter {
        match entry {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

fn ipcache_addr(addr: Ipv4Addr) -> IpcacheKey {
    IpcacheKey {
        addr_be: u32::from(addr).to_be(),
    }
}

fn endpoint_key(addr: Ipv4Addr) -> EndpointKey {
    EndpointKey {
        addr_be: u32::from(addr).to_be(),
    }
}

/// The trie key of `addr/prefix_len` with the host bits cleared.
fn ipcache_key(addr: Ipv4Addr, prefix_len: u8) -> Result<Key<IpcacheKey>> {
    let data = IpcacheKey {
        addr_be: u32::from(addr).to_be(),
    };
    Ok(Key::new(
        u32::from(prefix_len),
        masked(names::IPCACHE4, data, u32::from(prefix_len))?,
    ))
}

/// The trie key of rule `key` with `prefix_len` bits, the rest cleared.
fn rule_key(prefix_len: u32, key: PolicyKey) -> Result<Key<PolicyKey>> {
    Ok(Key::new(
        prefix_len,
        masked(names::POLICY4, key, prefix_len)?,
    ))
}

/// `data` with every bit after the first `prefix_len` (in memory order,
/// which is the trie's order: the fields are big-endian) cleared.
fn masked<K: Pod>(name: &'static str, data: K, prefix_len: u32) -> Result<K> {
    let len = std::mem::size_of::<K>();
    let max = (len * 8) as u32;
    if prefix_len > max || len > 16 {
        return Err(Error::PrefixLen {
            name,
            prefix_len,
            max,
        });
    }
    let mut bytes = [0u8; 16];
    // SAFETY: K is Pod (plain integers, no padding holes), at most 16 bytes
    // (checked above), copied byte for byte.
    unsafe {
        std::ptr::copy_nonoverlapping((&raw const data).cast::<u8>(), bytes.as_mut_ptr(), len);
    }
    let prefix = prefix_len as usize;
    for (i, b) in bytes.iter_mut().enumerate().take(len) {
        let first_bit = i * 8;
        if first_bit >= prefix {
            *b = 0;
        } else if first_bit + 8 > prefix {
            *b &= 0xffu8 << (8 - (prefix - first_bit));
        }
    }
    // SAFETY: as above; every bit pattern is a valid K.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<K>()) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use riptide_common::{
        POL_DIR_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
    };

    use super::*;

    fn rule(port: u16) -> PolicyKey {
        PolicyKey {
            ep_id_be: 7u32.to_be(),
            identity_be: 300u32.to_be(),
            dir: POL_DIR_INGRESS,
            proto: 6,
            port_be: port.to_be(),
        }
    }

    #[test]
    fn ipcache_keys_drop_host_bits() {
        let k = ipcache_key(Ipv4Addr::new(10, 42, 1, 77), 16).unwrap();
        assert_eq!(k.prefix_len(), 16);
        assert_eq!(
            Ipv4Addr::from(u32::from_be(k.data().addr_be)),
            Ipv4Addr::new(10, 42, 0, 0)
        );
        let k = ipcache_key(Ipv4Addr::new(10, 42, 1, 77), 32).unwrap();
        assert_eq!(
            Ipv4Addr::from(u32::from_be(k.data().addr_be)),
            Ipv4Addr::new(10, 42, 1, 77)
        );
        assert_eq!(
            ipcache_key(Ipv4Addr::new(1, 2, 3, 4), 0)
                .unwrap()
                .data()
                .addr_be,
            0
        );
        assert!(ipcache_key(Ipv4Addr::new(1, 2, 3, 4), 33).is_err());
    }

    #[test]
    fn rule_keys_keep_the_prefix_fields_only() {
        let k = rule_key(POLICY_PREFIX_FULL, rule(8080)).unwrap().data();
        assert_eq!(k, rule(8080));
        let k = rule_key(POLICY_PREFIX_ANY_PORT, rule(8080)).unwrap().data();
        assert_eq!(k, rule(0));
        let k = rule_key(POLICY_PREFIX_ANY_PROTO, rule(8080))
            .unwrap()
            .data();
        assert_eq!(
            k,
            PolicyKey {
                proto: 0,
                ..rule(0)
            }
        );
        // 8080..=8087 as one prefix: the low 3 port bits are free.
        let k = rule_key(POLICY_PREFIX_FULL - 3, rule(8085)).unwrap().data();
        assert_eq!(k, rule(8080));
        assert!(rule_key(POLICY_PREFIX_FULL + 1, rule(1)).is_err());
    }
}
