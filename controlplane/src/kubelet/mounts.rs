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
//! A container that is not `privileged` (or that asks for
//! `readOnlyRootFilesystem`) sees the node's filesystem read-only: every
//! mount of the namespace is made read-only (`mount_setattr`, recursive)
//! once the volumes, masks and scratch are in place, and then the writable
//! volumes and scratch are made writable again (recursively: a writable
//! volume's submounts are writable too). Scratch ([`Isolation::scratch`])
//! is where images let processes write: `/tmp` and `/var/tmp` (per
//! container, emptied at every start) and `/dev/shm` (per pod), bound from
//! the pod's directory over the node's. It goes on last, so a volume below
//! it is carried over (`open_tree` + `move_mount`), not hidden. The node's
//! `/dev` stays (read-only: device nodes still work).
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

/// What a container may change of the node's filesystem.
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    /// Every mount read-only except the writable volumes, scratch and
    /// `writable`.
    pub read_only_root: bool,
    /// Directories of the pod bound over node directories after everything
    /// else (their `read_only` is honoured).
    pub scratch: Vec<Mount>,
    /// Node mounts that stay writable (hostIPC's `/dev/shm`, `/dev/pts`).
    pub writable: Vec<PathBuf>,
}

impl Isolation {
    /// A container that is not privileged: the node read-only, fresh
    /// `/tmp` and `/var/tmp` under `<pod_dir>/scratch/<container>` (emptied
    /// now: a restarted container starts from its image, as under
    /// containerd; read-only with `readOnlyRootFilesystem`) and the pod's
    /// `/dev/shm` (`<pod_dir>/shm`, writable either way, as upstream),
    /// the node's own with `hostIPC`.
    pub fn unprivileged(pod_dir: &Path, container: &str, read_only_rootfs: bool, host_ipc: bool) -> Result<Self, Error> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = pod_dir.join("scratch").join(container);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(os_err(format!("emptying {}", dir.display())))?;
        }
        let shm = pod_dir.join("shm");
        let mut scratch = Vec::new();
        let mut writable = vec![PathBuf::from("/dev/pts")];
        let mut add = |source: PathBuf, target: &str, read_only: bool| -> Result<(), Error> {
            std::fs::create_dir_all(&source).map_err(os_err(format!("creating {}", source.display())))?;
            // Sticky and world-writable, as the node's.
            std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o1777)).map_err(os_err(format!("chmod {}", source.display())))?;
            scratch.push(Mount { source, target: target.into(), read_only, propagation: Propagation::None });
            Ok(())
        };
        if host_ipc {
            writable.push("/dev/shm".into());
        } else {
            add(shm, "/dev/shm", false)?;
        }
        add(dir.join("tmp"), "/tmp", read_only_rootfs)?;
        add(dir.join("var-tmp"), "/var/tmp", read_only_rootfs)?;
        Ok(Self { read_only_root: true, scratch, writable })
    }
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
pub fn create(root: &Path, uid: &str, container: &str, base: Option<&Path>, mounts: &[Mount], masks: &[PathBuf], iso: &Isolation) -> Result<PathBuf, Error> {
    let pin = pin_path(root, uid, container);
    mntns::unpin(&pin)?;
    let staging = staging_dir(root);
    std::fs::create_dir_all(&staging).map_err(os_err(format!("creating {}", staging.display())))?;
    let base = base.map(|b| File::open(b).map_err(os_err(format!("opening {}", b.display())))).transpose()?;
    let (mounts, masks, iso) = (mounts.to_vec(), masks.to_vec(), iso.clone());
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
        // Scratch sources and mount points before the masks and the first
        // cover: both hide the kubelet's root (sources, staging directory).
        let scratch = iso
            .scratch
            .iter()
            .map(|s| Ok((clone_tree(&s.source)?, b.ensure(&s.target, false)?, s)))
            .collect::<Result<Vec<_>, Error>>()?;
        if b.staging_mounted {
            mntns::detach(&b.staging)?;
        }
        for p in &masks {
            mask(p, &targets)?;
        }
        let mut writable: Vec<PathBuf> = mounts.iter().zip(&targets).filter(|(m, _)| !m.read_only).map(|(_, t)| t.clone()).collect();
        for (tree, at, s) in &scratch {
            if cover(tree, at, s, &targets)? && !s.read_only {
                writable.push(at.clone());
            }
        }
        if iso.read_only_root {
            set_read_only(Path::new("/"), true)?;
            for t in writable.iter().chain(iso.writable.iter().filter(|p| mntns::is_mount_root(p).unwrap_or(false))) {
                set_read_only(t, false)?;
            }
        }
        Ok(())
    })?;
    Ok(pin)
}

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Makes the mount at `p` and every mount below it read-only (or
/// writable) in this namespace (`mount_setattr`, Linux 5.12).
fn set_read_only(p: &Path, ro: bool) -> Result<(), Error> {
    let c = cstr(p)?;
    let attr = if ro {
        MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 }
    } else {
        MountAttr { attr_set: 0, attr_clr: MOUNT_ATTR_RDONLY, propagation: 0, userns_fd: 0 }
    };
    // SAFETY: valid path and attribute struct of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_mount_setattr, libc::AT_FDCWD, c.as_ptr(), AT_RECURSIVE, &raw const attr, size_of::<MountAttr>()) };
    check(i32::from(r == 0) - 1, || format!("making {} {}", p.display(), if ro { "read-only" } else { "writable" }))
}

/// A detached copy of the mount tree at `p` (`open_tree`, Linux 5.2):
/// it keeps its flags and propagation, and survives `p` being covered.
fn clone_tree(p: &Path) -> Result<File, Error> {
    let c = cstr(p)?;
    // SAFETY: valid path; the returned fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint) };
    let fd = i32::try_from(fd).map_err(|_| Error::Sandbox(format!("open_tree {}: bad fd", p.display())))?;
    check(fd.min(0), || format!("copying the mounts at {}", p.display()))?;
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Puts scratch `tree` (a copy of `s.source`) over the node directory
/// `at`; the volumes already mounted below it (`targets`) are moved on
/// top. False when a volume is mounted at that very place (it wins).
fn cover(tree: &File, at: &Path, s: &Mount, targets: &[PathBuf]) -> Result<bool, Error> {
    if targets.iter().any(|t| t == at) {
        return Ok(false);
    }
    // Outermost volumes only: a copy takes its submounts along.
    let under: Vec<&PathBuf> = targets.iter().filter(|t| t.starts_with(at)).collect();
    let outer = under.iter().filter(|t| !under.iter().any(|o| o != *t && t.starts_with(o)));
    let trees = outer.map(|t| Ok((clone_tree(t)?, *t, std::fs::metadata(t).is_ok_and(|m| m.is_dir())))).collect::<Result<Vec<_>, Error>>()?;
    attach_tree(tree, at)?;
    let c = cstr(at)?;
    if s.read_only {
        set_read_only(at, true)?;
    }
    check(mount(None, &c, libc::MS_REC | libc::MS_PRIVATE), || format!("making {} private", at.display()))?;
    for (tree, target, dir) in &trees {
        // The mount point is made in the pod's own scratch.
        let made = if *dir {
            std::fs::create_dir_all(target)
        } else {
            target.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| File::create(target).map(drop))
        };
        made.map_err(os_err(format!("creating mount point {}", target.display())))?;
        attach_tree(tree, target)?;
    }
    Ok(true)
}

/// Attaches a tree from [`clone_tree`] at `target`.
fn attach_tree(tree: &File, target: &Path) -> Result<(), Error> {
    let c = cstr(target)?;
    // SAFETY: an open mount fd and a valid path.
    let r = unsafe { libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), c"".as_ptr(), libc::AT_FDCWD, c.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH) };
    check(i32::from(r == 0) - 1, || format!("moving mounts to {}", target.display()))
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
