//! Running things inside a named network namespace (`/run/netns/<name>`).
//!
//! Processes are started with `setns(CLONE_NEWNET)` in `pre_exec` rather than
//! `ip netns exec`, which also unshares the mount namespace and remounts
//! /sys, hiding bpffs (/sys/fs/bpf) and cgroup2 from the child.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

pub use riptide_test_support::netns::path;

/// A `Command` for `program` that runs inside netns `name`.
pub fn command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    riptide_test_support::netns::try_command(name, program).with_context(|| format!("opening netns {name}"))
}

/// Like [`command`], and the child also joins cgroup v2 directory `cgroup`
/// before exec (so cgroup-attached programs, e.g. socket LB, apply to it).
pub fn command_in_cgroup(
    name: &str,
    cgroup: &std::path::Path,
    program: impl AsRef<std::ffi::OsStr>,
) -> Result<Command> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let mut cmd = command(name, program)?;
    // SAFETY: only write(2) on an fd opened before fork; "0" means "the
    // writing process" (cgroup_procs_write_start()).
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `f` on a fresh thread that has entered netns `name`; the caller's
/// thread never changes namespace (STYLE.md: setns only on a dedicated
/// thread, in synchronous code).
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    let handle = std::thread::spawn(move || -> std::io::Result<T> {
        // SAFETY: plain syscall on an fd we own; affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match handle.join() {
        Ok(r) => r.with_context(|| format!("entering netns {name}")),
        Err(_) => bail!("thread in netns {name} panicked"),
    }
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of all named network namespaces.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|dir| {
            dir.filter_map(std::result::Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}
