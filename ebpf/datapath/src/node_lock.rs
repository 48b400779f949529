//! One agent per node: an exclusive `flock(2)` on the node's pin directory.
//!
//! The pin directory is the resource two agents would fight over (shared
//! maps, ids allocated independently, program and link pins replaced under
//! each other), and the one path every agent of a node computes the same way
//! ([`crate::pin_dir`]). bpffs holds only pins and directories, so the lock is
//! taken on the directory itself rather than on a lock file; the kernel drops
//! it when the holder exits, however it exits, so no stale lock survives a
//! crash. The holder's PID comes from `/proc/locks` (the kernel's own record,
//! never stale), in the reader's PID namespace.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
};

use crate::{Error, Result, pins::create_pin_dir};

/// Held while the agent runs; dropping it (or exiting) releases the node.
#[derive(Debug)]
pub struct NodeLock {
    _dir: File,
    path: PathBuf,
}

impl NodeLock {
    /// Takes the node's lock without waiting: fails with
    /// [`Error::NodeLocked`] naming the holder's PID when another process
    /// has it.
    pub fn acquire(node: &str) -> Result<Self> {
        let path = create_pin_dir(node)?;
        let dir = File::open(&path).map_err(|source| Error::Io {
            action: "opening pin directory",
            path: path.clone(),
            source,
        })?;
        // SAFETY: flock on an fd this function owns; no memory is passed.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = dir.metadata().ok().and_then(|m| holder(m.dev(), m.ino()));
                return Err(Error::NodeLocked {
                    node: node.to_owned(),
                    pid,
                });
            }
            return Err(Error::Io {
                action: "locking pin directory",
                path,
                source,
            });
        }
        Ok(Self { _dir: dir, path })
    }

    /// The locked directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// The PID holding a `flock` on the file (`dev`, `ino`), from `/proc/locks`.
fn holder(dev: u64, ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    parse_holder(&locks, &want)
}

/// `/proc/locks` lines look like `3: FLOCK  ADVISORY  WRITE 4242 00:1f:17 0 EOF`;
/// waiters are listed as `3: -> FLOCK ...` and are skipped.
fn parse_holder(locks: &str, dev_ino: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&dev_ino))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::parse_holder;

    #[test]
    fn finds_the_holder_not_a_waiter() {
        let locks = "1: POSIX  ADVISORY  WRITE 10 00:1f:17 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1f:17 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4343 00:1f:17 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 77 00:1f:18 0 EOF\n";
        assert_eq!(parse_holder(locks, "00:1f:17"), Some(4242));
        assert_eq!(parse_holder(locks, "00:1f:18"), Some(77));
        assert_eq!(parse_holder(locks, "00:1f:19"), None);
    }
}
