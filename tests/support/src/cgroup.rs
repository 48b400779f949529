//! cgroup v2 trees a test or the lab made: the processes in them and their
//! removal. The kubelet's own cgroups hold a pod's pause process in the pod
//! cgroup and each container in a cgroup of its own below it, so both walk
//! the whole tree.

use std::{io, path::Path, time::Duration};

/// Every process in the cgroup `dir` and below it, the cgroup's own first;
/// empty when `dir` does not exist.
pub fn tree_pids(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for child in children(dir) {
        pids.extend(tree_pids(&child));
    }
    pids
}

/// Removes the cgroup `dir` and its descendants, deepest first (cgroupfs
/// directories go with rmdir although they list files). A cgroup whose
/// killed processes are not reaped yet answers EBUSY; that is retried for
/// up to a second before it is an error. A missing `dir` is not one.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    for child in children(dir) {
        remove_tree(&child)?;
    }
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("removing cgroup {}: {e}", dir.display()))),
        }
    }
}

fn children(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_cgroup_has_no_processes_and_removes_cleanly() {
        let dir = Path::new("/nonexistent/riptide-test-support/cgroup");
        assert!(tree_pids(dir).is_empty());
        assert!(remove_tree(dir).is_ok());
    }

    #[test]
    fn a_plain_directory_tree_is_removed_deepest_first() {
        // An ordinary directory stands in for the layout: rmdir fails on a
        // non-empty directory just as on a cgroup with children.
        let root = std::env::temp_dir().join(format!("riptide-cgroup-tree-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("c")).unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn a_directory_that_cannot_go_is_an_error_naming_it() {
        let root = std::env::temp_dir().join(format!("riptide-cgroup-file-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        let err = remove_tree(&root).unwrap_err();
        assert!(err.to_string().contains(&root.display().to_string()), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
