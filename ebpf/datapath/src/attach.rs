//! Attaching programs: socket LB to a cgroup, the uplink programs to a
//! device. Attachments are bpf_links held by an [`Attachment`]; dropping it
//! detaches, [`Attachment::pin`] makes the links outlive the process (a
//! restarted agent finds them pinned and traffic never stops).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, links::FdLink, tc::TcAttachType};
use riptide_common::names;

use crate::{
    Error, Result,
    loader::{Datapath, SOCK_PROGRAMS},
};

/// Links of attached programs; detached when dropped (unless pinned).
pub struct Attachment {
    target: String,
    links: Vec<(&'static str, FdLink)>,
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

    /// Pins every link under `dir` as `<prefix>_<program>` so the
    /// attachment survives this process. Existing pins of the same name are
    /// replaced (their links detach once nothing else holds them).
    pub fn pin(self, dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            action: "creating link pin directory",
            path: dir.to_owned(),
            source,
        })?;
        let mut paths = Vec::new();
        for (name, link) in self.links {
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
            links.push((name, fd));
        }
        Ok(Attachment { target, links })
    }

    /// Attaches `rt_from_net` (ingress) and `rt_to_net` (egress) to the
    /// node's uplink `ifname` (tcx on kernels ≥ 6.6).
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<Attachment> {
        let mut links = Vec::new();
        for (name, dir) in [
            (names::PROG_FROM_NET, TcAttachType::Ingress),
            (names::PROG_TO_NET, TcAttachType::Egress),
        ] {
            let prog = self.classifier(name)?;
            let id = prog.attach(ifname, dir).map_err(|source| Error::Attach {
                name,
                target: ifname.to_owned(),
                source,
            })?;
            let link = prog.take_link(id).map_err(|source| Error::Attach {
                name,
                target: ifname.to_owned(),
                source,
            })?;
            let fd = FdLink::try_from(link).map_err(|source| Error::Link {
                name,
                target: ifname.to_owned(),
                source,
            })?;
            links.push((name, fd));
        }
        Ok(Attachment {
            target: ifname.to_owned(),
            links,
        })
    }
}
