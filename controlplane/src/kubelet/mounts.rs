//! A container's mount namespace: a copy of its pod's ([`mntns`]) with
//! the container's volumes and its image's binaries bind-mounted in, pinned
//! at `<root-dir>/mntns/<uid>.<container>` (remade at every start).
//!
//! There is no image root filesystem: the container sees the node's, so a
//! mount point that does not exist there (`/host/opt/cni/bin`,
//! `/etc/riptide/config`) cannot simply be created, which would write to
//! the node's own `/` or `/etc`. Instead the directory that lacks it is
//! shadowed, in this namespace only, by a tmpfs holding bind mounts of
//! each of its entries plus the new mount point (`/` itself through
//! `pivot_root` into such a tmpfs). The container sees the same files; new
//! files it writes directly in a shadowed directory stay in the tmpfs.
//!
//! A container that is not `privileged` always gets a namespace of its
//! own, in which the kubelet's and the control plane's state
//! (`Config::masked_paths`: the root dir with every pod's volumes and
//! namespace pins, the kubelet's kubeconfig and keys, `--mask-path`) is
//! covered after the volumes are bound: an empty read-only tmpfs over a
//! directory, `/dev/null` over a file (runc's `maskedPaths` way). The
//! volumes stay visible at their targets (a bind mount does not go through
//! its source's path). A mask that would cover a volume's target is left
//! out: a pod that names such a place as a `hostPath` gets what it asked
//! for, as upstream does without Pod Security Admission (not implemented).
//! This is masking, not a root filesystem of the pod's own: the rest of the
//! node's filesystem stays visible, and without `CAP_SYS_ADMIN` the pod
//! cannot unmount the masks.
//!
//! Every mount is a slave of the node's (the pod's namespace is), so mounts
//! never propagate from a container to the node. `mountPropagation:
//! HostToContainer` keeps a volume a slave (the node's later mounts below
//! it appear); `None` makes it private; `Bidirectional` makes it shared
//! within the container only (mounts the container makes there do not reach
//! the node: not yet).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::symlink},
    path::{Component, Path, PathBuf},
};

use super::{
    Error,
    mntns::{self, check, cstr, mount, os_err},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    None,
    HostToContainer,
    Bidirectional,
}

impl Propagation {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("HostToContainer") => Self::HostToContainer,
            Some("Bidirectional") => Self::Bidirectional,
            _ => Self::None,
        }
    }
}

/// One bind mount into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// A path of the node (resolved in the pod's mount namespace).
    pub source: PathBuf,
    /// Where the container sees it.
    pub target: PathBuf,
    pub read_only: bool,
    pub propagation: Propagation,
}

pub fn pin_path(root: &Path, uid: &str, container: &str) -> PathBuf {
    mntns::dir(root).join(format!("{uid}.{container}"))
}

/// Where shadowed directories are staged while their tmpfs is built: a
/// directory of the kubelet's, mounted over only inside the new namespace.
fn staging_dir(root: &Path) -> PathBuf {
    root.join("staging")
}

/// Makes the container's namespace from `base` (the pod's pinned
/// namespace, or the node's when None) and pins it; an older pin of the
/// same container is replaced. Blocking: call from a blocking task.
pub fn create(root: &Path, uid: &str, container: &str, base: Option<&Path>, mounts: &[Mount], masks: &[PathBuf]) -> Result<PathBuf, Error> {
    let pin = pin_path(root, uid, container);
    mntns::unpin(&pin)?;
    let staging = staging_dir(root);
    std::fs::create_dir_all(&staging).map_err(os_err(format!("creating {}", staging.display())))?;
    let base = base.map(|b| File::open(b).map_err(os_err(format!("opening {}", b.display())))).transpose()?;
    let (mounts, masks) = (mounts.to_vec(), masks.to_vec());
    mntns::pin_new(&pin, move || {
        // SAFETY: unshare/setns on this thread only; the fd is open.
        unsafe {
            check(libc::unshare(libc::CLONE_FS), || "unshare(CLONE_FS)".into())?;
            if let Some(fd) = &base {
                check(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS), || "entering the pod's mount namespace".into())?;
            }
            check(libc::unshare(libc::CLONE_NEWNS), || "unshare(CLONE_NEWNS)".into())?;
        }
        check(mount(None, &cstr(Path::new("/"))?, libc::MS_REC | libc::MS_SLAVE), || "making / a slave mount".into())?;
        let mut b = Builder { staging, staging_mounted: false, tmpfs: Vec::new(), n: 0 };
        let mut targets = Vec::with_capacity(mounts.len());
        for m in &mounts {
            targets.push(b.bind(m)?);
        }
        if b.staging_mounted {
            mntns::detach(&b.staging)?;
        }
        for p in &masks {
            mask(p, &targets)?;
        }
        Ok(())
    })?;
    Ok(pin)
}

/// Hides `p` (if it exists) unless one of the container's volume
/// `targets` is at or below it.
fn mask(p: &Path, targets: &[PathBuf]) -> Result<(), Error> {
    // Resolved in the new namespace: the path the container would use.
    let Ok(p) = std::fs::canonicalize(p) else { return Ok(()) };
    if let Some(t) = targets.iter().find(|t| t.starts_with(&p)) {
        tracing::info!(path = %p.display(), volume = %t.display(), "not masking a path that holds a volume's mount point");
        return Ok(());
    }
    let md = std::fs::metadata(&p).map_err(os_err(format!("masking {}", p.display())))?;
    let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if md.is_dir() {
        tmpfs_with(&p, ro, c"size=4k,mode=0555")
    } else {
        bind(Path::new("/dev/null"), &p, 0)?;
        check(mount(None, &cstr(&p)?, libc::MS_BIND | libc::MS_REMOUNT | ro), || format!("making the mask of {} read-only", p.display()))
    }
}

struct Builder {
    staging: PathBuf,
    staging_mounted: bool,
    /// Directories on a tmpfs of ours, where mount points may be created.
    tmpfs: Vec<PathBuf>,
    n: u32,
}

fn tmpfs(target: &Path) -> Result<(), Error> {
    tmpfs_with(target, 0, c"mode=0755")
}

fn tmpfs_with(target: &Path, flags: libc::c_ulong, data: &std::ffi::CStr) -> Result<(), Error> {
    let t = cstr(target)?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(c"tmpfs".as_ptr(), t.as_ptr(), c"tmpfs".as_ptr(), flags, data.as_ptr().cast()) };
    check(r, || format!("mounting a tmpfs on {}", target.display()))
}

fn bind(src: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), Error> {
    check(mount(Some(&cstr(src)?), &cstr(target)?, libc::MS_BIND | flags), || {
        format!("bind-mounting {} on {}", src.display(), target.display())
    })
}

/// Fills the (empty, tmpfs) directory `to` with bind mounts of `from`'s
/// entries and copies of its symlinks.
fn replicate(from: &Path, to: &Path) -> Result<(), Error> {
    let entries = std::fs::read_dir(from).map_err(os_err(format!("reading {}", from.display())))?;
    for e in entries.filter_map(Result::ok) {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let Ok(md) = std::fs::symlink_metadata(&src) else { continue };
        if md.file_type().is_symlink() {
            let link = std::fs::read_link(&src).map_err(os_err(format!("reading link {}", src.display())))?;
            symlink(&link, &dst).map_err(os_err(format!("creating link {}", dst.display())))?;
        } else {
            if md.is_dir() {
                std::fs::create_dir(&dst).map_err(os_err(format!("creating {}", dst.display())))?;
            } else {
                File::create(&dst).map_err(os_err(format!("creating {}", dst.display())))?;
            }
            bind(&src, &dst, libc::MS_REC)?;
        }
    }
    Ok(())
}

impl Builder {
    fn ensure_staging(&mut self) -> Result<(), Error> {
        if !self.staging_mounted {
            tmpfs(&self.staging)?;
            self.staging_mounted = true;
        }
        Ok(())
    }

    /// Puts a tmpfs copy of `dir` over it, so entries can be added.
    fn shadow(&mut self, dir: &Path) -> Result<(), Error> {
        if dir == Path::new("/") {
            // The staging tmpfs would be copied into the new root.
            if self.staging_mounted {
                mntns::detach(&self.staging)?;
                self.staging_mounted = false;
            }
            self.ensure_staging()?;
            replicate(Path::new("/"), &self.staging)?;
            let new_root = cstr(&self.staging)?;
            // SAFETY: valid paths; `pivot_root(".", ".")` stacks the old
            // root under the new one, then it is detached (runc's way,
            // no put_old directory needed).
            unsafe {
                check(libc::chdir(new_root.as_ptr()), || "entering the new root".into())?;
                let dot = CString::from(c".");
                check(libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int, || "pivot_root".into())?;
                check(libc::umount2(dot.as_ptr(), libc::MNT_DETACH), || "detaching the old root".into())?;
                let slash = CString::from(c"/");
                check(libc::chdir(slash.as_ptr()), || "entering /".into())?;
            }
            // The new root holds a copy of itself at the staging path (the
            // replica of the directory above it): drop it.
            self.staging_mounted = false;
            mntns::detach(&self.staging)?;
            self.tmpfs.push(PathBuf::from("/"));
            return Ok(());
        }
        self.ensure_staging()?;
        self.n += 1;
        let stage = self.staging.join(self.n.to_string());
        std::fs::create_dir(&stage).map_err(os_err(format!("creating {}", stage.display())))?;
        bind(dir, &stage, libc::MS_REC)?;
        tmpfs(dir)?;
        replicate(&stage, dir)?;
        mntns::detach(&stage)?;
        self.tmpfs.push(dir.to_owned());
        Ok(())
    }

    /// Makes `target` exist (a directory, or a file when `file`), shadowing
    /// the first existing ancestor that lacks the next component.
    fn ensure(&mut self, target: &Path, file: bool) -> Result<PathBuf, Error> {
        let parts: Vec<_> = target.components().filter(|c| matches!(c, Component::Normal(_))).collect();
        let mut cur = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            let next = cur.join(part);
            match std::fs::symlink_metadata(&next) {
                Ok(md) if md.file_type().is_symlink() => {
                    // `/var/run` → `/run`: follow it, in this namespace.
                    cur = std::fs::canonicalize(&next).map_err(os_err(format!("resolving {}", next.display())))?;
                }
                Ok(_) => cur = next,
                Err(_) => {
                    if !self.tmpfs.contains(&cur) {
                        self.shadow(&cur)?;
                    }
                    if file && i + 1 == parts.len() {
                        File::create(&next).map(drop)
                    } else {
                        std::fs::create_dir(&next)
                    }
                    .map_err(os_err(format!("creating mount point {}", next.display())))?;
                    self.tmpfs.push(next.clone());
                    cur = next;
                }
            }
        }
        Ok(cur)
    }

    /// Binds `m`; returns where it ended up (symlinks resolved).
    fn bind(&mut self, m: &Mount) -> Result<PathBuf, Error> {
        let file = !std::fs::metadata(&m.source).map_err(os_err(format!("volume source {}", m.source.display())))?.is_dir();
        let target = self.ensure(&m.target, file)?;
        bind(&m.source, &target, libc::MS_REC)?;
        let t = cstr(&target)?;
        if m.read_only {
            check(mount(None, &t, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY), || {
                format!("making {} read-only", target.display())
            })?;
        }
        let prop = match m.propagation {
            Propagation::None => libc::MS_PRIVATE,
            Propagation::HostToContainer => libc::MS_SLAVE,
            Propagation::Bidirectional => libc::MS_SHARED,
        };
        check(mount(None, &t, libc::MS_REC | prop), || format!("setting propagation of {}", target.display()))?;
        Ok(target)
    }
}
