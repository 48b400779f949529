//! The pause process of a pod with `shareProcessNamespace: true`: PID 1
//! of the pod's PID namespace (the containers join it), so the namespace
//! outlives any one container, and the reaper of the processes orphaned in
//! it, as `registry.k8s.io/pause` is. It is the kubelet's own binary run as
//! `riptide-controlplane pause` ([`super::process::spawn_pause`]); it
//! exits on SIGTERM or SIGINT, and dies with the pod's cgroup.

extern "C" fn reap(_: libc::c_int) {
    // SAFETY: waitpid(2) is async-signal-safe.
    unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} }
}

extern "C" fn leave(_: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(0) }
}

/// Never returns. The handlers are process-wide, so whichever thread of
/// this process a signal reaches runs them.
pub fn run() -> ! {
    // SAFETY: installs handlers that only call async-signal-safe functions.
    unsafe {
        for (sig, f) in [(libc::SIGCHLD, reap as extern "C" fn(libc::c_int)), (libc::SIGTERM, leave), (libc::SIGINT, leave)] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = f as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
        reap(0);
        loop {
            libc::pause();
        }
    }
}
