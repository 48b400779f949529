//! Starting a container's process: its own session (so signals reach the
//! whole process group), the pod's network and mount namespaces, a new UTS
//! namespace with the pod's hostname, the pod's cgroup, stdout/stderr
//! appended to the container's log file, and last its user, groups and
//! capabilities ([`super::security`]). What the image means is decided
//! before ([`super::image`]): the command runs from the node's filesystem
//! as the container's mount namespace shows it.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use super::Error;

/// Where and how a process joins a pod.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Network namespace to enter (None: stay in the node's).
    pub netns: Option<PathBuf>,
    /// Mount namespace to enter, a pinned nsfs file (None: the node's).
    pub mntns: Option<PathBuf>,
    /// New UTS namespace with this hostname (None: share the node's).
    pub hostname: Option<String>,
    /// cgroup directory to join.
    pub cgroup: Option<PathBuf>,
    /// Join the UTS namespace of this process instead of making one (exec
    /// into a running container).
    pub join_uts_of: Option<i32>,
    /// User, groups, capabilities (None: the kubelet's own, as root).
    pub security: Option<super::security::Security>,
}

/// The "start time" field of /proc/<pid>/stat (clock ticks since boot):
/// together with the pid, it identifies a process across kubelet restarts.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" of the command name; starttime is field 22.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Is `pid` still the process we started (same start time, not a zombie)?
pub fn alive(pid: i32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
}

pub fn signal_group(pid: i32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) on the process group we created with setsid.
        unsafe {
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        }
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd, Error> {
    File::open(path).map(OwnedFd::from).map_err(|e| Error::Process(format!("opening namespace {}: {e}", path.display())))
}

/// Builds a `Command` for `argv` placed as `p` says. Files are opened here,
/// before fork; the pre_exec hook only makes async-signal-safe syscalls.
pub fn command(argv: &[String], env: &[(String, String)], cwd: Option<&str>, p: &Placement) -> Result<Command, Error> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(Error::Process("container has neither command nor args, and its image (as riptide's kubelet maps it) has no entrypoint".into()));
    };
    let mut cmd = Command::new(prog);
    cmd.args(args).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(d) = cwd.filter(|d| !d.is_empty()) {
        cmd.current_dir(d);
    }
    let netns = p.netns.as_deref().map(open_ns).transpose()?;
    let mntns = p.mntns.as_deref().map(open_ns).transpose()?;
    // setns(CLONE_NEWNS) moves the process to the namespace's root, so the
    // working directory is entered again, by path, inside it (an fd opened
    // outside would keep a handle on the node's mount tree).
    let chdir = match (&mntns, cwd.filter(|d| !d.is_empty())) {
        (None, _) => None,
        (Some(_), Some(d)) => Some(PathBuf::from(d)),
        (Some(_), None) => std::env::current_dir().ok(),
    }
    .map(|d| CString::new(d.as_os_str().as_encoded_bytes()).map_err(|_| Error::Process(format!("bad working directory {}", d.display()))))
    .transpose()?;
    let uts_join = p.join_uts_of.map(|pid| open_ns(Path::new(&format!("/proc/{pid}/ns/uts")))).transpose()?;
    let hostname = p.hostname.as_deref().map(|h| CString::new(h).map_err(|_| Error::Process(format!("bad hostname {h:?}")))).transpose()?;
    let cgroup = p
        .cgroup
        .as_ref()
        .map(|d| {
            OpenOptions::new()
                .write(true)
                .open(d.join("cgroup.procs"))
                .map(OwnedFd::from)
                .map_err(|e| Error::Process(format!("opening {}/cgroup.procs: {e}", d.display())))
        })
        .transpose()?;
    let security = p.security.clone().map(|s| (s, super::security::last_cap()));
    // SAFETY: only async-signal-safe calls (setsid, write, setns, chdir,
    // unshare, sethostname, prctl, capset, set*id) on fds and strings made
    // before fork and owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
            libc::setsid();
            if let Some(fd) = &cgroup {
                // "0" = the writing process (cgroup v2).
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = &netns {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            if let Some(fd) = &mntns {
                // The child is single-threaded: its fs_struct is its own,
                // which setns(CLONE_NEWNS) requires.
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS))?;
                if let Some(d) = &chdir {
                    check(libc::chdir(d.as_ptr()))?;
                }
            }
            if let Some(fd) = &uts_join {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWUTS))?;
            } else if let Some(h) = &hostname {
                check(libc::unshare(libc::CLONE_NEWUTS))?;
                check(libc::sethostname(h.as_ptr(), h.as_bytes().len()))?;
            }
            // Last: joining namespaces needs the capabilities dropped here.
            if let Some((s, last)) = &security {
                super::security::apply(s, *last)?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Starts a container process with stdout/stderr appended to `log`.
pub fn spawn(argv: &[String], env: &[(String, String)], cwd: Option<&str>, p: &Placement, log: &Path) -> Result<Child, Error> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Process(format!("creating {}: {e}", dir.display())))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Process(format!("opening log {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| Error::Process(format!("duplicating log fd: {e}")))?;
    let mut cmd = command(argv, env, cwd, p)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn().map_err(|e| Error::Process(format!("starting {:?}: {e}", argv.first().cloned().unwrap_or_default())))
}
