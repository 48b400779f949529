//! Starting a container's process: its own session (so signals reach the
//! whole process group), the pod's network and mount namespaces, its PID
//! namespace ([`PidNs`]) with a `/proc` of its own, a new UTS namespace
//! with the pod's hostname, the pod's cgroup, stdout/stderr appended to the
//! container's log file, and last its user, groups and capabilities
//! ([`super::security`]). What the image means is decided before
//! ([`super::image`]): the command runs from the node's filesystem as the
//! container's mount namespace shows it.
//!
//! A PID namespace applies to the children of whoever enters it
//! (`unshare`/`setns(CLONE_NEWPID)` set `pid_for_children`), so:
//! - a container (and a pod's pause process) is forked by a thread of the
//!   kubelet that entered the namespace first ([`spawn`]): it stays the
//!   kubelet's direct child (exit status, `waitpid`), and in a namespace of
//!   its own it is PID 1, as under runc — signals it has no handler for are
//!   ignored, SIGKILL is not;
//! - `kubectl exec` and exec probes, whose `Command` is spawned by others,
//!   enter the container's namespace in the child and fork once more: the
//!   first process relays signals to the second and exits with its status
//!   (what `nsenter --pid` does).

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
    pub pidns: PidNs,
    /// For [`PidNs::New`] and [`PidNs::Pod`]: the process mounts the new
    /// namespace's `/proc` over its mount namespace's (which must then be
    /// the container's own).
    pub proc_mount: ProcMount,
}

/// The PID namespace a process runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PidNs {
    /// The node's (`hostPID: true`, the kubelet's own helpers).
    #[default]
    Host,
    /// A new one with the process as PID 1 (only through [`spawn`]).
    New,
    /// The pod's shared one (`shareProcessNamespace`), an nsfs path such as
    /// `/proc/<pause>/ns/pid` (only through [`spawn`]).
    Pod(PathBuf),
    /// A running container's, for exec: setns, then fork and relay.
    Enter(PathBuf),
}

/// Whether the process mounts a `/proc` for its PID namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProcMount {
    /// Keep the mount namespace's `/proc`.
    #[default]
    Inherit,
    /// A fresh `/proc` with the node-wide knobs read-only or masked (runc's
    /// `readonlyPaths`/`maskedPaths`): for containers that are not
    /// privileged.
    Restricted,
    /// A fresh `/proc` as the kernel shows it (privileged containers).
    Full,
}

/// `/proc` entries that change the node, not the container: read-only.
const PROC_READ_ONLY: &[&std::ffi::CStr] = &[c"/proc/bus", c"/proc/fs", c"/proc/irq", c"/proc/sys", c"/proc/sysrq-trigger"];
/// `/proc` files that leak the node's memory, keys or timers: `/dev/null`.
const PROC_MASKED: &[&std::ffi::CStr] = &[c"/proc/kcore", c"/proc/keys", c"/proc/latency_stats", c"/proc/timer_list", c"/proc/sched_debug"];

/// Mounts the PID namespace's own `/proc` over the old one. Between fork
/// and exec: syscalls on static strings only.
fn mount_proc(how: ProcMount) -> std::io::Result<()> {
    let check = |r: libc::c_int| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
    let (null, no_data) = (std::ptr::null::<libc::c_char>(), std::ptr::null::<libc::c_void>());
    // SAFETY: NUL-terminated static strings, no data arguments.
    unsafe {
        // The node's /proc (and what is mounted below it) goes: the new
        // one would only cover it.
        libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH);
        check(libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, no_data))?;
        if how != ProcMount::Restricted {
            return Ok(());
        }
        for p in PROC_READ_ONLY {
            // Absent on this kernel: nothing to protect.
            if libc::mount(p.as_ptr(), p.as_ptr(), null, libc::MS_BIND | libc::MS_REC, no_data) == 0 {
                check(libc::mount(null, p.as_ptr(), null, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, no_data))?;
            }
        }
        for p in PROC_MASKED {
            libc::mount(c"/dev/null".as_ptr(), p.as_ptr(), null, libc::MS_BIND, no_data);
        }
    }
    Ok(())
}

/// Where the relaying parent of an entered process sends the signals it
/// gets (one per process: it is set after fork, in the child).
static RELAY_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = RELAY_TO.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The first process of an exec into a PID namespace: forwards signals to
/// `child` (inside the namespace), waits for it and ends the same way.
/// Between fork and exec: async-signal-safe syscalls only.
fn relay(child: libc::pid_t) -> ! {
    RELAY_TO.store(child, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: plain syscalls; the handler only calls kill(2).
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH, libc::SIGCONT] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
        // Every fd goes, the spawner's exec-error pipe first: its reader
        // waits for EOF, which the exec in `child` (CLOEXEC) then gives.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &raw mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        libc::_exit(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 })
    }
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
    let enter_pid = match &p.pidns {
        PidNs::Enter(ns) => Some(open_ns(ns)?),
        _ => None,
    };
    let proc_mount = match (&p.pidns, p.mntns.is_some()) {
        (PidNs::New | PidNs::Pod(_), true) => p.proc_mount,
        _ => ProcMount::Inherit,
    };
    // SAFETY: only async-signal-safe calls (setsid, write, setns, fork,
    // waitpid, mount, chdir, unshare, sethostname, prctl, capset, set*id)
    // on fds and strings made before fork and owned by the closure.
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
            if let Some(fd) = &enter_pid {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID))?;
                match libc::fork() {
                    -1 => return Err(std::io::Error::last_os_error()),
                    0 => {}
                    child => relay(child),
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
            if proc_mount != ProcMount::Inherit {
                mount_proc(proc_mount)?;
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
            if enter_pid.is_some() {
                // Dies with its relay (after the credential change, which
                // clears the setting). A parent outside the namespace reads
                // as 0: anything else means the relay is already gone.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                if libc::getppid() != 0 {
                    libc::_exit(137);
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Spawns `cmd` in the PID namespace `ns` says: [`PidNs::New`] and
/// [`PidNs::Pod`] are entered by a short-lived thread before it forks, so
/// the namespace change never touches the runtime's threads.
pub fn spawn_in(mut cmd: Command, ns: &PidNs) -> Result<Child, Error> {
    let what = format!("{:?}", cmd.get_program());
    let join = match ns {
        PidNs::Host | PidNs::Enter(_) => return cmd.spawn().map_err(|e| Error::Process(format!("starting {what}: {e}"))),
        PidNs::New => None,
        PidNs::Pod(p) => Some(open_ns(p)?),
    };
    std::thread::spawn(move || {
        // SAFETY: changes this thread's pid_for_children only; the fd is open.
        let r = unsafe {
            match &join {
                Some(fd) => libc::setns(fd.as_raw_fd(), libc::CLONE_NEWPID),
                None => libc::unshare(libc::CLONE_NEWPID),
            }
        };
        if r != 0 {
            return Err(Error::Process(format!("entering a PID namespace for {what}: {}", std::io::Error::last_os_error())));
        }
        cmd.spawn().map_err(|e| Error::Process(format!("starting {what}: {e}")))
    })
    .join()
    .map_err(|_| Error::Process("PID namespace thread panicked".into()))?
}

/// The pod's pause process for `shareProcessNamespace`: PID 1 of the
/// pod's PID namespace, in its cgroup, reaping orphans
/// ([`super::pause`]). It is this binary (`riptide-controlplane pause`).
pub fn spawn_pause(cgroup: &Path) -> Result<Child, Error> {
    let place = Placement {
        netns: None,
        mntns: None,
        hostname: None,
        cgroup: Some(cgroup.to_owned()),
        join_uts_of: None,
        security: None,
        pidns: PidNs::New,
        proc_mount: ProcMount::Inherit,
    };
    // /proc/self/exe is resolved by the child before exec: the kubelet's
    // binary, even if the file was replaced since.
    let mut cmd = command(&["/proc/self/exe".to_owned(), "pause".to_owned()], &[], Some("/"), &place)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    spawn_in(cmd, &place.pidns)
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
    spawn_in(cmd, &p.pidns)
}

/// How a process joins the PID namespace of `pid` (a running container):
/// nothing to enter when it is the kubelet's own (`hostPID`). A namespace
/// that cannot be read is entered anyway, so the error names it.
pub fn pidns_of(pid: i32) -> PidNs {
    use std::os::unix::fs::MetadataExt as _;
    let theirs = PathBuf::from(format!("/proc/{pid}/ns/pid"));
    match (std::fs::metadata(&theirs), std::fs::metadata("/proc/self/ns/pid")) {
        (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => PidNs::Host,
        _ => PidNs::Enter(theirs),
    }
}
