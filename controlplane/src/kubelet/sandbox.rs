//! A pod's sandbox: a named network namespace (`/run/netns/<name>`), a
//! cgroup under the node's cgroup (where riptide's socket-LB hooks are
//! attached, so they apply to the pod), and the processes in them.
//!
//! Each container runs in a cgroup of its own below the pod's, as under
//! containerd: the device rules ([`super::devices`]) are per container, so
//! a privileged container and one that is not can share a pod. The pod's
//! cgroup holds only its pause process, if any.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::Error;

/// Netns name of a pod: unique per pod uid, and prefixed with the node's
/// name so that whoever manages the node (the lab's teardown, an operator)
/// can tell which namespaces belong to it even after the kubelet is gone.
pub fn netns_name(node: &str, uid: &str) -> String {
    format!("{node}-pod-{uid}")
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip").args(args).output().map_err(|e| Error::Sandbox(format!("running ip {}: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Sandbox(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// Creates the pod netns with `lo` up. `ip netns add` (iproute2) sets up
/// the shared `/run/netns` mount the way every other tool expects.
pub fn create_netns(name: &str) -> Result<(), Error> {
    if !netns_path(name).exists() {
        ip(&["netns", "add", name])?;
    }
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Sets network sysctls (`key`, `value`) inside the pod's netns.
pub fn set_sysctls(name: &str, sysctls: &[(&str, &str)]) -> Result<(), Error> {
    let mut args = vec!["netns", "exec", name, "sysctl", "-qw"];
    let kv: Vec<String> = sysctls.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.extend(kv.iter().map(String::as_str));
    ip(&args)
}

pub fn delete_netns(name: &str) -> Result<(), Error> {
    if netns_path(name).exists() {
        ip(&["netns", "delete", name])?;
    }
    Ok(())
}

/// `<cgroup-root>/pod-<uid>`.
pub fn cgroup_dir(root: &Path, uid: &str) -> PathBuf {
    root.join(format!("pod-{uid}"))
}

pub fn create_cgroup(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::Sandbox(format!("creating cgroup {}: {e}", dir.display())))
}

/// Pids still in the cgroup.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A container's own cgroup, `<pod cgroup>/<container>` (a container's
/// name is a DNS label: never a cgroup interface file's `<x>.<y>`).
pub fn container_cgroup(pod: &Path, container: &str) -> PathBuf {
    pod.join(container)
}

/// The cgroup a process joining a running container enters (`kubectl
/// exec`, exec probes): the container's own, or the pod's for a container
/// a kubelet without per-container cgroups started.
pub fn joined_cgroup(pod: &Path, container: &str) -> PathBuf {
    let own = container_cgroup(pod, container);
    if own.is_dir() { own } else { pod.to_owned() }
}

/// A fresh cgroup for a container's next start: what the previous run left
/// in its cgroup (a daemonized child, an exec session) is killed with the
/// cgroup, as upstream removes a container with its cgroup. Unless
/// `privileged`, its device access is restricted before anything runs in
/// it; when that fails the container must not start, so the error is
/// returned (fail closed).
pub fn create_container_cgroup(pod: &Path, container: &str, privileged: bool) -> Result<PathBuf, Error> {
    let dir = container_cgroup(pod, container);
    remove_cgroup(&dir)?;
    create_cgroup(&dir)?;
    if !privileged {
        super::devices::restrict(&dir)?;
    }
    Ok(dir)
}

/// Kills everything in the cgroup and below (`cgroup.kill`, Linux 5.14) and
/// removes it, its children first, once empty.
pub fn remove_cgroup(dir: &Path) -> Result<(), Error> {
    if !dir.exists() {
        return Ok(());
    }
    if let Ok(mut f) = fs::OpenOptions::new().write(true).open(dir.join("cgroup.kill")) {
        let _ = f.write_all(b"1");
    }
    kill_tree(dir);
    remove_tree(dir)
}

/// SIGKILL to every process of `dir` and its descendants (for kernels
/// without `cgroup.kill`).
fn kill_tree(dir: &Path) {
    for pid in cgroup_pids(dir) {
        // SAFETY: plain kill(2); a stale pid at worst gets ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for child in child_cgroups(dir) {
        kill_tree(&child);
    }
}

fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()).unwrap_or_default()
}

fn remove_tree(dir: &Path) -> Result<(), Error> {
    for child in child_cgroups(dir) {
        remove_tree(&child)?;
    }
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY until the killed processes are reaped.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    fs::remove_dir(dir).map_err(|e| Error::Sandbox(format!("removing cgroup {}: {e}", dir.display())))
}
