//! The device cgroup of containers that are not privileged: the `rt_dev`
//! program (runc's default device rules, `ebpf/programs/src/device.rs`)
//! attached to a container's cgroup, so its processes can open only
//! `/dev/null` and the like, not the node's disks or `/dev/mem`, even
//! through a device node they made themselves.
//!
//! The attachment is the kernel's cgroup-owned kind (`BPF_PROG_ATTACH`, as
//! runc makes it), not a `bpf_link`: it lives exactly as long as the
//! cgroup. A link would detach when the last fd of it closes, so a kubelet
//! that exits or restarts would leave its pods unprotected unless every
//! link were pinned, and each pin would then have to be removed with its
//! cgroup or leak. Here nothing needs cleaning up: removing the cgroup
//! releases the attachment and, with the last one, the program; a
//! restarted kubelet finds its running containers still filtered.
//!
//! Attaching is not idempotent (each call adds an attachment), so a caller
//! attaches once to a cgroup it has just created. `BPF_F_ALLOW_MULTI`, as
//! runc: a request must pass every program on the cgroup and its
//! ancestors, so a program attached below (or by the node's init system
//! above) can only deny more, never override this one.

use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupDevice, ProgramError},
};
use aya_obj::generated::{BPF_F_ALLOW_MULTI, bpf_attach_type, bpf_attr, bpf_cmd};
use riptide_common::names;

use crate::{
    Error, Result,
    loader::{EBPF_OBJECT, load_private},
    map_sizes::{MapSizes, SIZABLE},
};

/// The loaded device program, to attach to any number of cgroups. One per
/// process is enough: every attachment shares it.
pub struct DeviceFilter {
    ebpf: Ebpf,
}

impl DeviceFilter {
    /// Loads (verifies) the device program. The object's maps are created
    /// too (aya creates every map of an object), each at its smallest
    /// size: the device program uses none of them.
    pub fn load() -> Result<Self> {
        let tiny: Vec<(&str, u32)> = SIZABLE
            .iter()
            .map(|m| (m.name, MapSizes::min_entries(m.kind)))
            .collect();
        let mut ebpf = load_private(EBPF_OBJECT, &tiny)?;
        let prog: &mut CgroupDevice = ebpf
            .program_mut(names::PROG_DEVICE)
            .ok_or(Error::MissingProgram {
                name: names::PROG_DEVICE,
            })?
            .try_into()
            .map_err(|source| program_error("is not a cgroup device program", source))?;
        prog.load()
            .map_err(|source| program_error("loading (verifier)", source))?;
        Ok(Self { ebpf })
    }

    fn program(&self) -> Result<&CgroupDevice> {
        self.ebpf
            .program(names::PROG_DEVICE)
            .ok_or(Error::MissingProgram {
                name: names::PROG_DEVICE,
            })?
            .try_into()
            .map_err(|source| program_error("is not a cgroup device program", source))
    }

    /// The kernel's id of the loaded program (what
    /// [`attached_programs`] lists).
    pub fn program_id(&self) -> Result<u32> {
        let info = self
            .program()?
            .info()
            .map_err(|source| program_error("reading its info", source))?;
        Ok(info.id())
    }

    /// Attaches the program to the cgroup directory `cgroup` (cgroup v2),
    /// for as long as the cgroup exists. Processes already in the cgroup
    /// are filtered from their next device access on.
    pub fn attach(&self, cgroup: &Path) -> Result<()> {
        let dir = open_cgroup(cgroup)?;
        let prog = self.program()?;
        let prog_fd = prog
            .fd()
            .map_err(|source| program_error("getting its fd", source))?;
        // SAFETY: an all-zero bpf_attr is the kernel's "unset" for every
        // field; the fields written are those of BPF_PROG_ATTACH.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writes to the BPF_PROG_ATTACH member of the union.
        unsafe {
            let a = &mut attr.__bindgen_anon_5;
            a.__bindgen_anon_1.target_fd = fd_u32(dir.as_raw_fd());
            a.attach_bpf_fd = fd_u32(prog_fd.as_fd().as_raw_fd());
            a.attach_type = bpf_attach_type::BPF_CGROUP_DEVICE as u32;
            a.attach_flags = BPF_F_ALLOW_MULTI;
        }
        sys_bpf(bpf_cmd::BPF_PROG_ATTACH, &mut attr).map_err(|source| Error::Io {
            action: "attaching the device program (BPF_PROG_ATTACH) to cgroup",
            path: cgroup.to_owned(),
            source,
        })
    }
}

/// Ids of the device programs attached to `cgroup` itself (not those
/// inherited from its ancestors), in the order they run.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<u32>> {
    let dir = open_cgroup(cgroup)?;
    let mut ids = [0u32; 64];
    // SAFETY: as in `attach`; BPF_PROG_QUERY writes at most `prog_cnt` ids
    // into `ids`, which outlives the call.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    unsafe {
        let q = &mut attr.query;
        q.__bindgen_anon_1.target_fd = fd_u32(dir.as_raw_fd());
        q.attach_type = bpf_attach_type::BPF_CGROUP_DEVICE as u32;
        q.prog_ids = ids.as_mut_ptr() as u64;
        q.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    }
    sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr).map_err(|source| Error::Io {
        action: "listing the device programs (BPF_PROG_QUERY) of cgroup",
        path: cgroup.to_owned(),
        source,
    })?;
    // SAFETY: the kernel set `prog_cnt` to the number of ids it wrote.
    let n = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

fn open_cgroup(cgroup: &Path) -> Result<File> {
    File::open(cgroup).map_err(|source| Error::Io {
        action: "opening cgroup",
        path: PathBuf::from(cgroup),
        source,
    })
}

fn program_error(action: &'static str, source: ProgramError) -> Error {
    Error::Program {
        name: names::PROG_DEVICE,
        action,
        source,
    }
}

/// An fd as the kernel's `__u32` field (fds are never negative here: they
/// come from open files).
fn fd_u32(fd: i32) -> u32 {
    u32::try_from(fd).unwrap_or(u32::MAX)
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<()> {
    // SAFETY: bpf(2) with a pointer to a live, fully initialised bpf_attr
    // and its size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
