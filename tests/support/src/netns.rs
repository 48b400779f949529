//! Named network namespaces for tests (`/run/netns/<name>`, as `ip netns`
//! makes them), removed when the guard drops — also when the test fails.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
    thread::JoinHandle,
};

/// A named network namespace with `lo` up, deleted on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates namespace `name` (replacing a leftover of a killed run).
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        crate::ip(&["netns", "add", &name]);
        let ns = Self(name);
        crate::ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Path of namespace `name`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `program args` inside namespace `name` with `input` on its stdin
/// (`iptables-restore`, `nft -f -`); a non-zero exit is an error carrying
/// the command and its stderr.
pub fn pipe(name: &str, program: &str, args: &[&str], input: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut child = try_command(name, program)?
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A `Command` for `program` run inside namespace `name` (`setns` in
/// `pre_exec`; `ip netns exec` would remount /sys and hide bpffs).
pub fn command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    try_command(name, program).unwrap_or_else(|e| panic!("opening netns {name}: {e}"))
}

/// [`command`] for callers that report errors instead of panicking (the
/// lab, the benchmarks): fails when the namespace cannot be opened.
pub fn try_command(name: &str, program: impl AsRef<std::ffi::OsStr>) -> std::io::Result<Command> {
    let file = File::open(path(name))?;
    let mut cmd = Command::new(program);
    // SAFETY: setns is async-signal-safe; `file` lives in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `f` on a new thread inside namespace `name` (sockets it creates
/// stay in that namespace). A dedicated thread, because `setns` switches
/// only the calling thread and the test's own must stay where it is.
pub fn spawn_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let file = File::open(path(name)).unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a valid netns fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// [`spawn_in`] and wait for the result.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in(name, f).join().expect("thread in the namespace panicked")
}
