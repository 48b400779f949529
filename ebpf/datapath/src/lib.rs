//! Loads riptide's eBPF programs, pins their maps and programs per node under
//! `/sys/fs/bpf/riptide/<node>/`, and writes the maps with typed helpers.
//!
//! Loading is idempotent: maps are pinned by name, so a second load (a
//! restarted agent, or the CNI finding the datapath) reuses the same maps and
//! what is in them survives.

mod attach;
mod bpffs;
pub mod clock;
pub mod devices;
pub mod endpoints;
mod error;
pub mod events;
/// Flow-state map access for the agent's GC (added by the agent's helper).
pub mod gc;
mod loader;
pub mod maglev;
pub mod map_sizes;
mod node_lock;
pub mod node_maps;
mod pins;
pub mod policy;
pub mod service;
pub mod upgrade;
pub mod xdp;

pub use attach::{Attachment, TcMode, detach_uplink_filters};
pub use bpffs::ensure_bpffs;
pub use error::{Error, Result};
pub use loader::{Datapath, EBPF_OBJECT, Pinning};
pub use map_sizes::MapSizes;
pub use node_lock::NodeLock;
pub use pins::{pin_dir, unpin_node};
