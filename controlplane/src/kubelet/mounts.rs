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
//! container, emptied at every start) and `/dev/shm` (per pod; the node's
//! with `hostIPC`), bound from the pod's directory over the node's. It goes
//! on last, so a volume below it is carried over (`open_tree` +
//! `move_mount`), not hidden. What the kubelet makes and lets a container
//! write (scratch, `emptyDir`, every volume from the pod's directory) is
//! `nodev,nosuid`: a device node made there cannot be opened.
//!
//! Such a container gets a `/dev` of its own, as runc gives: a
//! `nosuid,nodev` tmpfs (mode 755, read-only like the rest) with the node's
//! [`DEVICES`] bound in, a devpts instance of its own (`ptmx` → `pts/ptmx`),
//! `fd`/`stdin`/`stdout`/`stderr` links to `/proc/self/fd` and `shm`. No
//! `mqueue` (pods share the node's IPC namespace, whose queues it would
//! show) and no `termination-log` (the kubelet does not read one). A
//! privileged container keeps the node's `/dev`.
//!
//! Every mount is a slave of the node's (the pod's namespace is), so mounts
//! never propagate from a container to the node, except as
//! `mountPropagation` says. `None` makes a volume private. For
//! `HostToContainer` and `Bidirectional` (privileged containers only, as
//! the apiserver and [`super::volumes`] enforce) the volume is copied from
//! the node's namespace, not the pod's, on a shared mount ([`share`]: a
//! node root's directory is bound onto itself, a kernel mount made shared),
//! so the copy is a peer of the node's: `HostToContainer` then makes it a
//! slave (the node's later mounts below it appear), `Bidirectional` keeps
//! it shared (mounts the container makes below it reach the node, and go
//! when the last pod using the shared mount goes: [`release_shared`]).

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::symlink},
    path::{Component, Path, PathBuf},
};

use super::{
    Error,
    mntns::{self, check, cstr, mount, os_err},
    state::{pod_dir, pods_dir},
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
    /// Mounts that stay writable (`/dev/pts`).
    pub writable: Vec<PathBuf>,
    /// A `/dev` of the container's own ([`DEVICES`]) instead of the node's.
    pub minimal_dev: bool,
}

/// The node's device nodes an unprivileged container's `/dev` holds (runc's
/// default devices), bound from the node's as rootless runc does.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

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
        let mut add = |source: PathBuf, target: &str, read_only: bool| -> Result<(), Error> {
            std::fs::create_dir_all(&source).map_err(os_err(format!("creating {}", source.display())))?;
            // Sticky and world-writable, as the node's.
            std::fs::set_permissions(&source, std::fs::Permissions::from_mode(0o1777)).map_err(os_err(format!("chmod {}", source.display())))?;
            scratch.push(Mount { source, target: target.into(), read_only, propagation: Propagation::None });
            Ok(())
        };
        if !host_ipc {
            add(shm, "/dev/shm", false)?;
        }
        add(dir.join("tmp"), "/tmp", read_only_rootfs)?;
        add(dir.join("var-tmp"), "/var/tmp", read_only_rootfs)?;
        if host_ipc {
            // The node's own, carried into the container's /dev.
            scratch.push(Mount { source: "/dev/shm".into(), target: "/dev/shm".into(), read_only: false, propagation: Propagation::None });
        }
        Ok(Self { read_only_root: true, scratch, writable: vec!["/dev/pts".into()], minimal_dev: true })
    }

    /// What a host image's command `argv0` needs from below a scratch
    /// directory (a build tree checked out under `/tmp`), which the
    /// container's fresh scratch would hide: the symlinks on its way are
    /// made again in the scratch, and the executable they lead to is bound
    /// at its real path, read-only, as an image's binaries are. The rest of
    /// the node's `/tmp` stays hidden.
    pub fn host_command(&self, argv0: Option<&String>) -> Option<Mount> {
        let mut p = PathBuf::from(argv0?);
        if !p.is_absolute() {
            return None;
        }
        let under = |p: &Path| self.scratch.iter().find(|s| p.starts_with(&s.target));
        // At most 40 links, as the kernel follows.
        for _ in 0..40 {
            let Some(s) = under(&p) else { break };
            let Ok(link) = std::fs::read_link(&p) else { break };
            let copy = p.strip_prefix(&s.target).map(|rel| s.source.join(rel)).ok()?;
            let made = copy.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| symlink(&link, &copy));
            if let Err(e) = made {
                tracing::warn!(path = %p.display(), error = %e, "copying the command's symlink into the container's scratch");
                return None;
            }
            p = p.parent().map_or_else(|| link.clone(), |d| d.join(&link));
        }
        let real = std::fs::canonicalize(&p).ok()?;
        (under(&real).is_some() && real.is_file()).then(|| Mount { source: real.clone(), target: real, read_only: true, propagation: Propagation::None })
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
    // Volumes with propagation are copied from the node's namespace (this
    // thread's), on a shared mount: the copy joins its peer group, which
    // the pod's namespace (a slave of the node's) cannot give.
    let host_trees = mounts
        .iter()
        .map(|m| match m.propagation {
            Propagation::None => Ok(None),
            _ => share(root, uid, &m.source).and_then(|()| clone_tree(&m.source)).map(Some),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let own = pod_dir(root, uid);
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
        for (m, tree) in mounts.iter().zip(&host_trees) {
            targets.push(b.bind(m, tree.as_ref(), m.source.starts_with(&own))?);
        }
        // Scratch sources and mount points before the masks and the first
        // cover: both hide the kubelet's root (sources, staging directory).
        let scratch = iso
            .scratch
            .iter()
            .map(|s| Ok((clone_tree(&s.source)?, b.ensure(&s.target, false)?, s)))
            .collect::<Result<Vec<_>, Error>>()?;
        let dev = if iso.minimal_dev { Some(b.dev_tree()?) } else { None };
        if b.staging_mounted {
            mntns::detach(&b.staging)?;
        }
        for p in &masks {
            mask(p, &targets)?;
        }
        let mut writable: Vec<PathBuf> = mounts.iter().zip(&targets).filter(|(m, _)| !m.read_only).map(|(_, t)| t.clone()).collect();
        if let Some(dev) = &dev {
            let at = PathBuf::from("/dev");
            cover(dev, &at, &Mount { source: at.clone(), target: at.clone(), read_only: false, propagation: Propagation::None }, &targets, false)?;
        }
        for (tree, at, s) in &scratch {
            if cover(tree, at, s, &targets, s.source.starts_with(&own))? && !s.read_only {
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
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Makes the mount at `p` and every mount below it read-only (or
/// writable) in this namespace (`mount_setattr`, Linux 5.12).
fn set_read_only(p: &Path, ro: bool) -> Result<(), Error> {
    let (set, clr) = if ro { (MOUNT_ATTR_RDONLY, 0) } else { (0, MOUNT_ATTR_RDONLY) };
    set_attr(p, set, clr, AT_RECURSIVE).map_err(|e| Error::Sandbox(format!("making {} {}: {e}", p.display(), if ro { "read-only" } else { "writable" })))
}

/// Makes the mount at `p` (and below it with `AT_RECURSIVE`) `nodev` and
/// `nosuid`: what the kubelet makes holds plain files, so a device node
/// made there by the container cannot be opened, as upstream's `/dev/shm`.
fn set_no_devices(p: &Path) -> Result<(), Error> {
    set_attr(p, MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID, 0, 0).map_err(|e| Error::Sandbox(format!("making {} nodev: {e}", p.display())))
}

///
/// Read-only fails with EBUSY while a mount of the tree has a file open
/// for writing. In the container's fresh namespace that is transient: a
/// process another kubelet thread forks between its own `open` and `exec`
/// inherits this thread's open files for that moment (CI saw "making /
/// read-only: Device or resource busy" with several pods starting at
/// once). So EBUSY is retried for up to a second.
fn set_attr(p: &Path, attr_set: u64, attr_clr: u64, flags: libc::c_uint) -> Result<(), std::io::Error> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = MountAttr { attr_set, attr_clr, propagation: 0, userns_fd: 0 };
    let mut tries = 0;
    loop {
        // SAFETY: valid path and attribute struct of the size passed.
        let r = unsafe { libc::syscall(libc::SYS_mount_setattr, libc::AT_FDCWD, c.as_ptr(), flags, &raw const attr, size_of::<MountAttr>()) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        tries += 1;
        if e.raw_os_error() != Some(libc::EBUSY) || tries >= 100 {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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
/// `at` (`nodev` with `no_dev`); the volumes already mounted below it
/// (`targets`) are moved on top. False when a volume is mounted at that
/// very place (it wins).
fn cover(tree: &File, at: &Path, s: &Mount, targets: &[PathBuf], no_dev: bool) -> Result<bool, Error> {
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
    if no_dev {
        set_no_devices(at)?;
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
    /// A minimal `/dev`, built in the staging directory and returned as a
    /// detached tree: a `nosuid,nodev` tmpfs (mode 755) with [`DEVICES`]
    /// bound from the node's `/dev`, a devpts instance of its own
    /// (`newinstance`: the node's terminals stay out) with `ptmx` linking
    /// to it, the `/proc/self/fd` links, and an empty `shm` for the pod's.
    fn dev_tree(&mut self) -> Result<File, Error> {
        self.ensure_staging()?;
        let dev = self.staging.join("dev");
        std::fs::create_dir(&dev).map_err(os_err(format!("creating {}", dev.display())))?;
        tmpfs_with(&dev, libc::MS_NOSUID | libc::MS_NODEV, c"mode=0755,size=65536k")?;
        for name in DEVICES {
            let node = Path::new("/dev").join(name);
            if std::fs::symlink_metadata(&node).is_err() {
                continue;
            }
            let at = dev.join(name);
            File::create(&at).map_err(os_err(format!("creating {}", at.display())))?;
            bind(&node, &at, 0)?;
        }
        for (link, to) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")] {
            symlink(to, dev.join(link)).map_err(os_err(format!("linking /dev/{link}")))?;
        }
        for d in ["pts", "shm"] {
            std::fs::create_dir(dev.join(d)).map_err(os_err(format!("creating /dev/{d}")))?;
        }
        let pts = cstr(&dev.join("pts"))?;
        // SAFETY: NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(c"devpts".as_ptr(), pts.as_ptr(), c"devpts".as_ptr(), libc::MS_NOSUID | libc::MS_NOEXEC, c"newinstance,ptmxmode=0666,mode=0620,gid=5".as_ptr().cast())
        };
        check(r, || "mounting a devpts instance on /dev/pts".into())?;
        let tree = clone_tree(&dev)?;
        mntns::detach(&dev)?;
        Ok(tree)
    }

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

    /// Binds `m` (attaches `tree`, its copy from the node's namespace, if
    /// given; `nodev` with `no_dev`); returns where it ended up (symlinks
    /// resolved).
    fn bind(&mut self, m: &Mount, tree: Option<&File>, no_dev: bool) -> Result<PathBuf, Error> {
        let file = !std::fs::metadata(&m.source).map_err(os_err(format!("volume source {}", m.source.display())))?.is_dir();
        let target = self.ensure(&m.target, file)?;
        match tree {
            Some(tree) => attach_tree(tree, &target)?,
            None => bind(&m.source, &target, libc::MS_REC)?,
        }
        let t = cstr(&target)?;
        if m.read_only {
            check(mount(None, &t, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY), || {
                format!("making {} read-only", target.display())
            })?;
        }
        if no_dev {
            set_no_devices(&target)?;
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

/// One node mount the kubelet made shared for pods' volumes, as recorded
/// in `<pod dir>/shared-mounts` of every pod that needs it: the boot and
/// the mount's unique id (`STATX_MNT_ID_UNIQUE`, Linux 6.8) tell it from
/// whatever is mounted at its path later or after a reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedMount {
    boot: String,
    id: u64,
    made: Made,
    path: PathBuf,
}

/// What the kubelet did to share a mount, undone by [`release_shared`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    /// Bound a directory onto itself (unmounted).
    Bind,
    /// Made a private mount shared (private again).
    Shared,
    /// Made a slave mount shared too (a slave only again).
    SharedSlave,
}

impl Made {
    const ALL: [(Self, &'static str); 3] = [(Self::Bind, "bind"), (Self::Shared, "shared"), (Self::SharedSlave, "shared-slave")];

    fn name(self) -> &'static str {
        Self::ALL.iter().find(|(m, _)| *m == self).map_or("", |(_, n)| n)
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(m, _)| *m)
    }
}

/// Serialises [`share`] and [`release_shared`] between pod workers.
static SHARING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn records_path(root: &Path, uid: &str) -> PathBuf {
    pod_dir(root, uid).join("shared-mounts")
}

fn read_records(file: &Path) -> Vec<SharedMount> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(4, ' ');
            Some(SharedMount { boot: f.next()?.to_owned(), id: f.next()?.parse().ok()?, made: Made::parse(f.next()?)?, path: PathBuf::from(f.next()?) })
        })
        .collect()
}

/// Every pod's records (`uid` → its mounts).
fn all_records(root: &Path) -> Vec<(String, Vec<SharedMount>)> {
    std::fs::read_dir(pods_dir(root))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), read_records(&e.path().join("shared-mounts"))))
        .filter(|(_, r)| !r.is_empty())
        .collect()
}

fn add_record(root: &Path, uid: &str, m: &SharedMount) -> Result<(), Error> {
    use std::io::Write as _;
    let file = records_path(root, uid);
    if read_records(&file).contains(m) {
        return Ok(());
    }
    let line = format!("{} {} {} {}\n", m.boot, m.id, m.made.name(), m.path.display());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(os_err(format!("recording a shared mount in {}", file.display())))
}

/// The id of the mount `p` is on (`unique`: `STATX_MNT_ID_UNIQUE`, else
/// the id `/proc/*/mountinfo` shows). Kernels before 6.8 (Debian 12's 6.1,
/// the oldest we claim) have no unique id: they get the mountinfo one,
/// which a later mount may reuse, so there a record can outlive its mount
/// by naming a newer one at the same path (the boot id still rules out a
/// reboot).
fn mount_id(p: &Path, unique: bool) -> Result<u64, Error> {
    let masks: &[u32] = if unique { &[libc::STATX_MNT_ID_UNIQUE, libc::STATX_MNT_ID] } else { &[libc::STATX_MNT_ID] };
    for &mask in masks {
        let stx = mntns::statx(p, mask)?;
        if stx.stx_mask & mask != 0 {
            return Ok(stx.stx_mnt_id);
        }
    }
    Err(Error::Sandbox(format!("statx {}: the kernel gives no mount id (Linux 5.8 needed)", p.display())))
}

/// The mount `p` is on, as this thread's namespace's mountinfo shows it.
struct MountInfo {
    /// Where it is mounted (mountinfo's octal escapes undone).
    point: PathBuf,
    shared: bool,
    slave: bool,
}

fn mount_info(p: &Path) -> Result<MountInfo, Error> {
    let id = mount_id(p, false)?;
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo").map_err(os_err("reading mountinfo".into()))?;
    let head = info
        .lines()
        .find(|l| l.split(' ').next().and_then(|f| f.parse::<u64>().ok()) == Some(id))
        .and_then(|l| l.split(" - ").next())
        .ok_or_else(|| Error::Sandbox(format!("mount {id} of {} is not in mountinfo", p.display())))?;
    let fields: Vec<&str> = head.split(' ').collect();
    let point = fields.get(4).map(|f| unescape_octal(f)).unwrap_or_default();
    let optional = fields.get(6..).unwrap_or_default();
    Ok(MountInfo { point, shared: optional.iter().any(|f| f.starts_with("shared:")), slave: optional.iter().any(|f| f.starts_with("master:")) })
}

/// mountinfo's `\040`-style escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt as _;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], code) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Makes `source`, a path of the node, sit on a shared mount of the node's
/// namespace (this thread's), so a volume with `mountPropagation` can join
/// its peer group. Upstream's runtime requires that of the host (systemd
/// makes every mount shared at boot); ours makes it, recorded for pod
/// `uid` and every later pod that uses it, and undoes it once the last of
/// them goes ([`release_shared`]):
/// - on the machine's `/` (a node root's directories), `source` is bound
///   onto itself and the bind made shared: `/` itself stays as it is;
/// - on another mount (`/sys/fs/bpf`, a cgroup hierarchy), that mount is
///   made shared, as systemd would have.
///
/// A mount already shared is used as it is.
pub fn share(root: &Path, uid: &str, source: &Path) -> Result<(), Error> {
    let _one = SHARING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = std::fs::canonicalize(source).map_err(os_err(format!("resolving {}", source.display())))?;
    let (boot, id) = (boot_id(), mount_id(&source, true)?);
    let info = mount_info(&source)?;
    if info.shared {
        // Ours if another pod recorded it: this pod keeps it up too.
        let ours = all_records(root).into_iter().flat_map(|(_, r)| r).find(|m| m.boot == boot && m.id == id);
        return ours.map_or(Ok(()), |m| add_record(root, uid, &m));
    }
    if info.point == Path::new("/") {
        let c = cstr(&source)?;
        check(mount(Some(&c), &c, libc::MS_BIND | libc::MS_REC), || format!("bind-mounting {} onto itself", source.display()))?;
        let made = check(mount(None, &c, libc::MS_REC | libc::MS_SHARED), || format!("making {} a shared mount", source.display()))
            .and_then(|()| mount_id(&source, true))
            .and_then(|id| add_record(root, uid, &SharedMount { boot, id, made: Made::Bind, path: source.clone() }));
        if made.is_err() {
            let _ = mntns::detach(&source);
        }
        return made;
    }
    let c = cstr(&info.point)?;
    check(mount(None, &c, libc::MS_SHARED), || format!("making {} a shared mount", info.point.display()))?;
    let made = if info.slave { Made::SharedSlave } else { Made::Shared };
    add_record(root, uid, &SharedMount { boot, id, made, path: info.point })
}

/// Drops pod `uid`'s records (every pod's when None) and undoes what
/// [`share`] did for the mounts no other pod records, if they are still the
/// ones it was done to (same boot, same mount id). A bind goes with the
/// mounts containers made below it with `Bidirectional`.
pub fn release_shared(root: &Path, uid: Option<&str>) -> Result<(), Error> {
    let _one = SHARING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (gone, kept): (Vec<_>, Vec<_>) = all_records(root).into_iter().partition(|(u, _)| uid.is_none_or(|x| x == u));
    let boot = boot_id();
    let mut undone: Vec<&SharedMount> = Vec::new();
    for m in gone.iter().flat_map(|(_, r)| r) {
        let still = m.boot == boot && mount_id(&m.path, true).is_ok_and(|id| id == m.id);
        if !still || undone.contains(&m) || kept.iter().flat_map(|(_, r)| r).any(|k| k == m) {
            continue;
        }
        let c = cstr(&m.path)?;
        match m.made {
            Made::Bind => mntns::detach(&m.path)?,
            Made::Shared => check(mount(None, &c, libc::MS_PRIVATE), || format!("making {} private again", m.path.display()))?,
            Made::SharedSlave => check(mount(None, &c, libc::MS_SLAVE), || format!("making {} a slave again", m.path.display()))?,
        }
        undone.push(m);
    }
    for (u, _) in &gone {
        let _ = std::fs::remove_file(records_path(root, u));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_and_records() {
        assert_eq!(unescape_octal(r"/a\040b\011c\134d\"), PathBuf::from("/a b\tc\\d\\"));
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("shared-mounts");
        let m = SharedMount { boot: "b".into(), id: 7, made: Made::SharedSlave, path: "/sys/fs/bpf x".into() };
        std::fs::write(&file, format!("{} {} {} {}\nbad line\n", m.boot, m.id, m.made.name(), m.path.display())).expect("write");
        assert_eq!(read_records(&file), vec![m]);
    }
}
