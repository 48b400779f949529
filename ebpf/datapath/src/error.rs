//! The library's error type, and the two ways map errors are reported.

use std::path::PathBuf;

use aya::{maps::MapError, programs::ProgramError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object for node {node}")]
    Load {
        node: String,
        /// Boxed: `EbpfError` is large and would bloat every `Result`.
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {action}")]
    Program {
        name: &'static str,
        action: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {name}: prefix length {prefix_len} is longer than the key ({max} bits)")]
    PrefixLen {
        name: &'static str,
        prefix_len: u32,
        max: u32,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "node {node} already has a running agent (pid {}) holding its pin directory",
        pid.map_or_else(|| String::from("unknown"), |p| p.to_string())
    )]
    NodeLocked {
        node: String,
        /// `None` when `/proc/locks` does not show it (another PID namespace).
        pid: Option<u32>,
    },
    #[error("map {name}: max_entries {max_entries} {reason}")]
    MapSize {
        name: String,
        max_entries: u32,
        reason: String,
    },
    #[error("invalid node name {0:?}: use [A-Za-z0-9._-], 1 to 253 characters")]
    NodeName(String),
    #[error("service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error("no free {what} id left")]
    IdsExhausted { what: &'static str },
    #[error("attaching {name} to {target}")]
    Attach {
        name: &'static str,
        target: String,
        #[source]
        source: ProgramError,
    },
    #[error("deleting the tc filter of {name} from {target}")]
    Detach {
        name: &'static str,
        target: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error("link of {name} on {target} is not a bpf_link (kernel too old?)")]
    Link {
        name: &'static str,
        target: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link of {name} at {path}")]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the map's name to a map error.
pub(crate) fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Whether a delete removed an entry: `Ok(false)` when the key was absent.
/// aya 0.14 reports an absent key from `bpf_map_delete_elem` as a syscall
/// error with ENOENT, not as `MapError::KeyNotFound` (which only lookups
/// return), so both mean "absent".
pub(crate) fn deleted(r: Result<(), MapError>) -> Result<bool, MapError> {
    match r {
        Ok(()) => Ok(true),
        Err(MapError::KeyNotFound) => Ok(false),
        Err(MapError::SyscallError(ref e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Deleting an absent key is success.
pub(crate) fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    deleted(r).map(|_| ())
}
