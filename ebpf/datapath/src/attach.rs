//! Attaching programs: socket LB to a cgroup, the uplink programs to a
//! device. Attachments are held by an [`Attachment`]; dropping it detaches,
//! [`Attachment::pin`] makes them outlive the process (a restarted agent
//! finds them in place and traffic never stops).
//!
//! tc programs go on a device as tcx bpf_links where the kernel has tcx
//! (≥ 6.6) and otherwise as a cls_bpf filter on the clsact qdisc through
//! netlink ([`TcMode`], detected at start-up).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        CgroupAttachMode, ProgramError, SchedClassifier,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcError, TcHandle},
    },
    util::KernelVersion,
};
use riptide_common::names;

use crate::{
    Error, Result,
    loader::{Datapath, SOCK_PROGRAMS},
};

/// How tc programs attach to a device on the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcMode {
    /// tcx bpf_links (kernel ≥ 6.6, commit e420bed02507 "bpf: Add fd-based
    /// tcx multi-prog infra with link support"): pinned on bpffs, they
    /// detach when their last pin goes.
    Tcx,
    /// A cls_bpf filter on the device's clsact qdisc, made through netlink
    /// (older kernels): it belongs to the device and stays until deleted
    /// ([`detach_uplink_filters`]) or the device goes. riptide's filter holds
    /// priority [`NL_PRIORITY`], handle 1, as Cilium's do on its devices; a
    /// restarted agent swaps the program inside it, with no gap.
    Netlink,
}

impl TcMode {
    /// The mode of the running kernel, by its version as aya's own
    /// `SchedClassifier::attach` chooses (netlink when the version cannot be
    /// read): tcx has no feature probe short of attaching something.
    pub fn detect() -> Self {
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            Self::Tcx
        } else {
            Self::Netlink
        }
    }
}

impl std::fmt::Display for TcMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "tc-netlink",
        })
    }
}

/// The tc priority of riptide's netlink filters on the uplink.
pub const NL_PRIORITY: u16 = 1;

/// The uplink programs and the hook each goes to.
const UPLINK_PROGRAMS: [(&str, TcAttachType); 2] = [
    (names::PROG_FROM_NET, TcAttachType::Ingress),
    (names::PROG_TO_NET, TcAttachType::Egress),
];

/// One attached program.
enum Link {
    /// A bpf_link (socket LB, tcx).
    Fd(FdLink),
    /// A netlink tc filter; detached when dropped.
    Tc(SchedClassifierLink),
}

/// Attached programs; detached when dropped (unless pinned).
pub struct Attachment {
    target: String,
    mode: Option<TcMode>,
    links: Vec<(&'static str, Link)>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("target", &self.target)
            .field(
                "programs",
                &self.links.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Attachment {
    /// What the programs are attached to (cgroup path or interface).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How tc programs were attached; `None` for socket LB (cgroup links).
    pub fn mode(&self) -> Option<TcMode> {
        self.mode
    }

    /// Makes the attachment survive this process: pins every bpf_link
    /// under `dir` as `<prefix>_<program>` and returns the pins. Existing
    /// pins of the same name are replaced (their links detach once nothing
    /// else holds them). Netlink filters need no pin: they stay on their
    /// device.
    pub fn pin(self, dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            action: "creating link pin directory",
            path: dir.to_owned(),
            source,
        })?;
        let mut paths = Vec::new();
        for (name, link) in self.links {
            let link = match link {
                Link::Fd(link) => link,
                Link::Tc(link) => {
                    // Dropping the handle would delete the filter; it holds
                    // only the filter's address (no fd), so forgetting it
                    // leaks nothing.
                    std::mem::forget(link);
                    continue;
                }
            };
            let path = dir.join(format!("{prefix}_{name}"));
            crate::pins::remove_if_exists(&path)?;
            link.pin(&path).map_err(|source| Error::PinLink {
                name,
                path: path.clone(),
                source,
            })?;
            paths.push(path);
        }
        Ok(paths)
    }
}

impl Datapath {
    /// Attaches the four socket-LB programs to the cgroup v2 directory
    /// `cgroup` (a node's cgroup; processes below it get socket LB).
    /// Attached as bpf_links, which always coexist with other links on the
    /// same and nested cgroups (bpf_link_create takes no ALLOW_MULTI flag:
    /// passing it is EINVAL).
    pub fn attach_sock_lb(&mut self, cgroup: &Path) -> Result<Attachment> {
        let target = cgroup.display().to_string();
        let file = File::open(cgroup).map_err(|source| Error::Io {
            action: "opening cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        let mut links = Vec::new();
        for name in SOCK_PROGRAMS {
            let prog = self.sock_addr(name)?;
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|source| Error::Attach {
                    name,
                    target: target.clone(),
                    source,
                })?;
            let link = prog.take_link(id).map_err(|source| Error::Attach {
                name,
                target: target.clone(),
                source,
            })?;
            let fd = FdLink::try_from(link).map_err(|source| Error::Link {
                name,
                target: target.clone(),
                source,
            })?;
            links.push((name, Link::Fd(fd)));
        }
        Ok(Attachment {
            target,
            mode: None,
            links,
        })
    }

    /// Attaches `rt_from_net` (ingress) and `rt_to_net` (egress) to the
    /// node's uplink `ifname`, as [`TcMode::detect`] says.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<Attachment> {
        let mode = TcMode::detect();
        let mut links = Vec::new();
        for (name, hook) in UPLINK_PROGRAMS {
            let prog = self.classifier(name)?;
            let err = |source| Error::Attach {
                name,
                target: ifname.to_owned(),
                source,
            };
            let link = match mode {
                TcMode::Tcx => {
                    let id = prog.attach(ifname, hook).map_err(err)?;
                    let link = prog.take_link(id).map_err(err)?;
                    Link::Fd(FdLink::try_from(link).map_err(|source| Error::Link {
                        name,
                        target: ifname.to_owned(),
                        source,
                    })?)
                }
                TcMode::Netlink => Link::Tc(attach_netlink(prog, ifname, hook).map_err(err)?),
            };
            links.push((name, link));
        }
        Ok(Attachment {
            target: ifname.to_owned(),
            mode: Some(mode),
            links,
        })
    }
}

/// `prog` as riptide's filter on `hook` of `ifname`: a new filter, or the
/// program swapped inside the one an earlier process left (cls_bpf replaces
/// it in one netlink request; packets always meet a program).
fn attach_netlink(
    prog: &mut SchedClassifier,
    ifname: &str,
    hook: TcAttachType,
) -> Result<SchedClassifierLink, ProgramError> {
    match tc::qdisc_add_clsact(ifname) {
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        other => other?,
    }
    let handle = TcHandle::new(0, 1);
    let opts = TcAttachOptions::Netlink(NlOptions {
        priority: NL_PRIORITY,
        handle,
        ..NlOptions::default()
    });
    let id = match prog.attach_with_options(ifname, hook, opts) {
        Err(ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
            let old = SchedClassifierLink::attached(ifname, hook, NL_PRIORITY, handle, None)
                .map_err(TcError::IoError)?;
            prog.attach_to_link(old)?
        }
        other => other?,
    };
    prog.take_link(id)
}

/// Deletes riptide's netlink filters (`rt_from_net`, `rt_to_net`) from
/// every device of the calling thread's network namespace (the uplink, the
/// vxlan device), for `uninstall` on kernels without tcx; with tcx,
/// removing the link pins is enough and this finds nothing. Returns the
/// devices it cleaned.
pub fn detach_uplink_filters() -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    for ifname in interfaces() {
        let mut found = false;
        for (name, hook) in UPLINK_PROGRAMS {
            match tc::qdisc_detach_program(&ifname, hook, name) {
                Ok(()) => found = true,
                // No such filter, or the device went meanwhile.
                Err(TcError::IoError(e))
                    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV) => {}
                Err(source) => {
                    return Err(Error::Detach {
                        name,
                        target: ifname.clone(),
                        source,
                    });
                }
            }
        }
        if found {
            cleaned.push(ifname);
        }
    }
    Ok(cleaned)
}

/// Names of the calling thread's network namespace's devices
/// (`if_nameindex`, which asks the kernel through a socket of that
/// namespace; `/sys/class/net` shows the namespace sysfs was mounted in).
fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns NULL or an array ended by a zero entry,
    // freed below with if_freenameindex and not used after.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}
