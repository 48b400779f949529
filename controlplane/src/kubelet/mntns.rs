//! A pod's mount namespace: the node's filesystem with the pod's own
//! `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` bind-mounted over
//! the node's files. Nothing else differs from the node.
//!
//! Containers with volumes or an image, every container that is not
//! privileged (it must not see the node's secrets, nor write the node) and
//! every container with a PID namespace of its own (its `/proc`) get a
//! namespace of their own made from this one ([`super::mounts`]), pinned beside it as
//! `<uid>.<container>`.
//!
//! The namespace outlives its processes the way `ip netns` keeps a network
//! namespace: its nsfs file is bind-mounted on `<root-dir>/mntns/<uid>`,
//! so containers started later, `kubectl exec` and a restarted kubelet
//! join it by path (`setns(CLONE_NEWNS)` in the child before exec).
//! `<root-dir>/mntns` is a private bind mount of itself: a mount namespace
//! file can only be bound where the mount would not propagate into that
//! namespace (`copy_tree()` refuses to copy nsfs mounts), and on hosts
//! whose `/` is shared it would.
//!
//! The namespace is made on a dedicated thread (`unshare` changes only the
//! calling thread's namespace, never across an `.await`); its mounts are
//! slaves of the node's, so the node's later mounts (new `/run/netns`
//! entries) still appear in pods (where the node's mount is shared) and the
//! pod's binds never reach the node. Removing the pod also undoes what the
//! kubelet shared on the node for its volumes' `mountPropagation`.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use super::Error;

/// Where the pods' namespace files live.
pub fn dir(root: &Path) -> PathBuf {
    root.join("mntns")
}

pub fn path(root: &Path, uid: &str) -> PathBuf {
    dir(root).join(uid)
}

pub(super) fn cstr(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Sandbox(format!("path {} contains a NUL byte", p.display())))
}

pub(super) fn os_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Sandbox(format!("{what}: {e}"))
}

pub(super) fn check(r: libc::c_int, what: impl FnOnce() -> String) -> Result<(), Error> {
    if r == 0 {
        Ok(())
    } else {
        Err(os_err(what())(std::io::Error::last_os_error()))
    }
}

pub(super) fn mount(src: Option<&CString>, target: &CString, flags: libc::c_ulong) -> libc::c_int {
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    unsafe {
        libc::mount(
            src.map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    }
}

/// statx of `p` itself (a final symlink not followed) with `mask`.
pub(super) fn statx(p: &Path, mask: libc::c_uint) -> Result<libc::statx, Error> {
    let c = cstr(p)?;
    // SAFETY: statx fills the zeroed struct; plain data.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and output buffer.
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_SYMLINK_NOFOLLOW, mask, &raw mut stx) };
    check(r, || format!("statx {}", p.display()))?;
    Ok(stx)
}

/// Whether `p` is the root of a mount (statx `STATX_ATTR_MOUNT_ROOT`,
/// Linux 5.8): a bind of a directory onto itself keeps its device number,
/// so comparing with the parent's cannot tell.
pub(super) fn is_mount_root(p: &Path) -> Result<bool, Error> {
    let stx = statx(p, 0)?;
    Ok(
        stx.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0
            && stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0,
    )
}

/// Makes `<root>/mntns` a private mount of itself, once (a restarted
/// kubelet finds it mounted: binding again would hide the pods' files).
pub fn prepare(root: &Path) -> Result<(), Error> {
    let d = dir(root);
    std::fs::create_dir_all(&d).map_err(os_err(format!("creating {}", d.display())))?;
    let c = cstr(&d)?;
    if !is_mount_root(&d)? {
        check(mount(Some(&c), &c, libc::MS_BIND), || {
            format!("bind-mounting {} onto itself", d.display())
        })?;
    }
    check(mount(None, &c, libc::MS_PRIVATE), || {
        format!("making {} a private mount", d.display())
    })
}

/// Unmounts `<root>/mntns` with every pod namespace under it (lazily: a
/// pod's namespace lives on while its processes do). For whoever removes a
/// kubelet's root directory after the kubelet is gone.
pub fn release_all(root: &Path) -> Result<(), Error> {
    super::mounts::release_shared(root, None)?;
    detach(&dir(root))
}

pub(super) fn detach(p: &Path) -> Result<(), Error> {
    let c = cstr(p)?;
    // SAFETY: valid path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        // Not a mount point (never mounted, or already released).
        e if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        e => Err(Error::Sandbox(format!("unmounting {}: {e}", p.display()))),
    }
}

/// One file of the pod shown at `target` (a path of the node).
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// Creates the pod's mount namespace with `binds` and pins it at
/// `path(root, uid)`. Idempotent: an already pinned namespace is kept (its
/// files are rewritten in place by the caller).
pub fn create(root: &Path, uid: &str, binds: &[Bind]) -> Result<PathBuf, Error> {
    let pin = path(root, uid);
    if pin.exists() && is_mount_root(&pin)? {
        return Ok(pin);
    }
    let binds: Vec<(CString, CString, String)> = binds
        .iter()
        .map(|b| {
            Ok((
                cstr(&b.source)?,
                cstr(&b.target)?,
                format!("{} over {}", b.source.display(), b.target.display()),
            ))
        })
        .collect::<Result<_, Error>>()?;
    pin_new(&pin, move || {
        // SAFETY: unshare affects only this thread (CLONE_NEWNS implies
        // CLONE_FS, which unshares this thread's root and cwd).
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, || {
            "unshare(CLONE_NEWNS)".to_owned()
        })?;
        let root = cstr(Path::new("/"))?;
        check(mount(None, &root, libc::MS_REC | libc::MS_SLAVE), || {
            "making / a slave mount".to_owned()
        })?;
        for (src, target, what) in &binds {
            check(mount(Some(src), target, libc::MS_BIND), || {
                format!("bind-mounting {what}")
            })?;
        }
        Ok(())
    })?;
    Ok(pin)
}

/// Runs `make` on a dedicated thread (namespace changes never leak into
/// the runtime's threads), then pins the mount namespace the thread ends
/// up in at `pin`.
pub(super) fn pin_new(
    pin: &Path,
    make: impl FnOnce() -> Result<(), Error> + Send + 'static,
) -> Result<(), Error> {
    File::create(pin).map_err(os_err(format!("creating {}", pin.display())))?;
    let made = std::thread::spawn(move || -> Result<OwnedFd, Error> {
        make()?;
        File::open("/proc/thread-self/ns/mnt")
            .map(OwnedFd::from)
            .map_err(os_err("opening the new mount namespace".to_owned()))
    })
    .join()
    .map_err(|_| Error::Sandbox("mount namespace thread panicked".into()));
    let pinned = made.and_then(|r| r).and_then(|ns| {
        // The thread is gone; the fd keeps the namespace until it is pinned.
        let src = cstr(Path::new(&format!("/proc/self/fd/{}", ns.as_raw_fd())))?;
        check(mount(Some(&src), &cstr(pin)?, libc::MS_BIND), || {
            format!("pinning the mount namespace at {}", pin.display())
        })
    });
    if pinned.is_err() {
        let _ = std::fs::remove_file(pin);
    }
    pinned
}

/// Unpins the pod's namespace (it ends with its last process) and removes
/// the file; the node's mounts made shared for the pod's volumes alone
/// ([`super::mounts::share`]) go too.
pub fn remove(root: &Path, uid: &str) -> Result<(), Error> {
    let containers = std::fs::read_dir(dir(root))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{uid}.")))
        .map(|e| e.path());
    for pin in containers.chain([path(root, uid)]) {
        unpin(&pin)?;
    }
    super::mounts::release_shared(root, Some(uid))
}

/// Detaches and removes one pinned namespace file, if there.
pub(super) fn unpin(pin: &Path) -> Result<(), Error> {
    if !pin.exists() {
        return Ok(());
    }
    detach(pin)?;
    std::fs::remove_file(pin).map_err(os_err(format!("removing {}", pin.display())))
}
