//! Where a node's maps and programs live: `/sys/fs/bpf/riptide/<node>/`.

use std::path::{Path, PathBuf};

use riptide_common::PIN_ROOT;

use crate::{Error, Result, bpffs::ensure_bpffs};

/// The pin directory of one node: `/sys/fs/bpf/riptide/<node>`.
///
/// bpffs refuses names containing `.` (`bpf_lookup()` returns EPERM), and
/// Kubernetes node names are often FQDNs, so dots become `_`.
pub fn pin_dir(node: &str) -> Result<PathBuf> {
    let ok = !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(Error::NodeName(node.to_owned()));
    }
    Ok(Path::new(PIN_ROOT).join(node.replace('.', "_")))
}

/// [`pin_dir`] of `node`, created (with bpffs mounted) if missing.
pub(crate) fn create_pin_dir(node: &str) -> Result<PathBuf> {
    let dir = pin_dir(node)?;
    ensure_bpffs()?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        action: "creating pin directory",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

pub(crate) fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            action: "removing old pin",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes every pin of `node` (maps and programs). Attached links hold their
/// programs, so this only forgets state; call it when the node goes away.
pub fn unpin_node(node: &str) -> Result<()> {
    let dir = pin_dir(node)?;
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            action: "removing pin directory",
            path: dir,
            source,
        }),
    }
}
