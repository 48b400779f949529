//! Reading `rt_events_v1`: drop/failure events the programs emit (rate
//! limited per CPU; every occurrence is also counted in `rt_stats_v2`).
//!
//! The ring buffer has one consumer position: one reader per node (the
//! agent). [`Events`] is `AsFd`, so it can sit in an epoll/tokio `AsyncFd`
//! loop; [`Events::drain`] never blocks.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
};

use aya::maps::{Map, MapData, RingBuf};
use riptide_common::{DropEvent, names, stats};

use crate::{Error, Result, loader::Datapath};

/// A decoded [`DropEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub raw: DropEvent,
}

impl Event {
    /// The reason's name ([`stats::NAMES`]).
    pub fn reason(&self) -> &'static str {
        stats::NAMES
            .get(self.raw.reason as usize)
            .copied()
            .unwrap_or("unknown")
    }

    pub fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.raw.saddr_be)),
            u16::from_be(self.raw.sport_be),
        )
    }

    pub fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(self.raw.daddr_be)),
            u16::from_be(self.raw.dport_be),
        )
    }
}

/// The consumer side of a node's events ring buffer.
pub struct Events {
    ring: RingBuf<MapData>,
}

impl Events {
    /// Opens the node's pinned ring buffer (the datapath must have been
    /// loaded with `Pinning::Node(node)`).
    pub fn open_pinned(node: &str) -> Result<Self> {
        let path = crate::pins::pin_dir(node)?.join(names::EVENTS);
        let data = MapData::from_pin(&path).map_err(|source| Error::Map {
            name: names::EVENTS,
            source,
        })?;
        Self::from_map(Map::RingBuf(data))
    }

    fn from_map(map: Map) -> Result<Self> {
        let ring = RingBuf::try_from(map).map_err(|source| Error::Map {
            name: names::EVENTS,
            source,
        })?;
        Ok(Self { ring })
    }

    /// Every event written since the last call (non-blocking).
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<DropEvent>() {
                // SAFETY: the programs write whole DropEvents; the length is
                // checked and read_unaligned copes with any alignment.
                let raw = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropEvent>()) };
                out.push(Event { raw });
            }
        }
        out
    }
}

impl AsFd for Events {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

/// For `tokio::io::unix::AsyncFd`, which asks for `AsRawFd`.
impl AsRawFd for Events {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_fd().as_raw_fd()
    }
}

impl Datapath {
    /// Moves the events ring buffer out into an [`Events`] reader. Call
    /// once (the programs keep writing to the same map).
    pub fn events(&mut self) -> Result<Events> {
        let map = self.ebpf.take_map(names::EVENTS).ok_or(Error::MissingMap {
            name: names::EVENTS,
        })?;
        Events::from_map(map)
    }
}
