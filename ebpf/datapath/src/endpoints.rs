//! Typed access to `rt_ep4_v1`, the map of pods on this node.

use std::{borrow::BorrowMut, net::Ipv4Addr};

use aya::maps::{HashMap, MapData};
use riptide_common::{EndpointKey, EndpointValue, names};

use crate::{Error, Result};

/// The endpoint map of one node.
pub struct Endpoints<T> {
    map: HashMap<T, EndpointKey, EndpointValue>,
}

impl<'a> Endpoints<&'a mut MapData> {
    pub(crate) fn new(map: &'a mut aya::maps::Map) -> Result<Self> {
        let map = HashMap::try_from(map).map_err(|source| Error::Map {
            name: names::EP4,
            source,
        })?;
        Ok(Self { map })
    }
}

impl Endpoints<MapData> {
    /// Opens the node's pinned endpoint map (the CNI does this; it never loads
    /// programs itself).
    pub fn open_pinned(node: &str) -> Result<Self> {
        let path = crate::pins::pin_dir(node)?.join(names::EP4);
        let data = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: names::EP4,
            source,
        })?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| {
            Error::Map {
                name: names::EP4,
                source,
            }
        })?;
        Ok(Self { map })
    }
}

impl<T: BorrowMut<MapData>> Endpoints<T> {
    /// Adds or replaces the endpoint for `addr`.
    pub fn upsert(&mut self, addr: Ipv4Addr, value: EndpointValue) -> Result<()> {
        self.map
            .insert(key(addr), value, 0)
            .map_err(|source| Error::Map {
                name: names::EP4,
                source,
            })
    }

    /// Removes the endpoint for `addr`; absent is not an error.
    pub fn remove(&mut self, addr: Ipv4Addr) -> Result<()> {
        crate::error::ignore_missing(self.map.remove(&key(addr))).map_err(|source| Error::Map {
            name: names::EP4,
            source,
        })
    }

    /// Looks up the endpoint for `addr`.
    pub fn get(&self, addr: Ipv4Addr) -> Result<Option<EndpointValue>> {
        match self.map.get(&key(addr), 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::Map {
                name: names::EP4,
                source,
            }),
        }
    }

    /// Every endpoint in the map.
    pub fn list(&self) -> Vec<(Ipv4Addr, EndpointValue)> {
        self.map
            .iter()
            .filter_map(std::result::Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k.addr_be)), v))
            .collect()
    }
}

fn key(addr: Ipv4Addr) -> EndpointKey {
    EndpointKey {
        addr_be: u32::from(addr).to_be(),
    }
}
