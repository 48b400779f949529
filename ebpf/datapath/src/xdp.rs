//! Attaching `rt_xdp_net` to the node's uplink as a pinned bpf_link, like
//! the tc programs: native (driver) mode, or generic (skb) mode when asked
//! or when the driver has no native XDP, which the caller reports (generic
//! mode runs after the skb exists and saves little over tc).
//!
//! The link is pinned as `xdp_native` or `xdp_generic` in the node's link
//! directory, so a restarted agent knows the mode of the link it finds: the
//! same mode gets the new program swapped into the link (`bpf_link_update`,
//! no gap); a different mode, or disabling, removes the old pin first.
//! Between the two, packets take the tc path, which handles every flow the
//! same way (XDP only accelerates).

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use aya::programs::{
    ProgramError, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};
use aya_obj::programs::XdpAttachType;
use riptide_common::names;

use crate::{Datapath, Error, Result};

/// The `xdp` setting. Off by default: `XDP_TX` out of a veth uplink (the
/// lab's nodes, most containers) fails once the peer's queue fills unless
/// the peer has an XDP program of its own (GRO alone does not wake it),
/// local senders behind a veth must turn transmit checksum offload off (XDP
/// forwards their partial checksums unchanged), and the lab's end-to-end
/// suites do not yet run with XDP on; operators whose uplink is a NIC turn
/// it on (`ebpf/README.md`, "Turning XDP on safely").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpSetting {
    /// Native mode; generic if the driver cannot (reported).
    Native,
    /// Generic (skb) mode only.
    Generic,
    /// No XDP program: NodePort & co through tc only.
    #[default]
    Disabled,
}

/// An `xdp` value other than `native`, `generic` or `disabled`.
#[derive(Debug, thiserror::Error)]
#[error("xdp mode {0:?} is none of native, generic, disabled")]
pub struct InvalidXdpSetting(pub String);

impl FromStr for XdpSetting {
    type Err = InvalidXdpSetting;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "disabled" => Ok(Self::Disabled),
            other => Err(InvalidXdpSetting(other.to_owned())),
        }
    }
}

impl fmt::Display for XdpSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Disabled => "disabled",
        })
    }
}

/// How `rt_xdp_net` ended up attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpAttached {
    /// [`XdpSetting::Native`] or [`XdpSetting::Generic`].
    pub mode: XdpSetting,
    /// Native was asked for and refused: why (the driver's error).
    pub fell_back: Option<String>,
    /// The link's pin.
    pub pin: PathBuf,
}

fn pin_path(links_dir: &Path, mode: XdpSetting) -> PathBuf {
    links_dir.join(format!("xdp_{mode}"))
}

/// Removes the pinned XDP link of `mode` (it detaches once no process holds
/// it); `true` when there was one.
fn unpin(links_dir: &Path, mode: XdpSetting) -> Result<bool> {
    let path = pin_path(links_dir, mode);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            action: "removing the XDP link pin",
            path,
            source,
        }),
    }
}

/// Detaches riptide's XDP program from the uplink by removing its link
/// pins (`xdp: disabled`, uninstall). Returns whether one was there.
pub fn detach_xdp(links_dir: &Path) -> Result<bool> {
    let native = unpin(links_dir, XdpSetting::Native)?;
    let generic = unpin(links_dir, XdpSetting::Generic)?;
    Ok(native || generic)
}

impl Datapath {
    /// Attaches `rt_xdp_net` to `ifname` as `setting` says and pins the
    /// link under `links_dir` (see the module docs); `Ok(None)` for
    /// [`XdpSetting::Disabled`], which detaches.
    pub fn attach_xdp(
        &mut self,
        ifname: &str,
        setting: XdpSetting,
        links_dir: &Path,
    ) -> Result<Option<XdpAttached>> {
        attach(self.xdp(names::PROG_XDP_NET)?, ifname, setting, links_dir)
    }
}

/// [`Datapath::attach_xdp`] with the program a loader pinned in the node's
/// pin directory `pin_dir`: for a process that switches XDP on and off
/// while another one owns the loaded datapath (the agent's ConfigMap
/// watcher).
pub fn attach_pinned_xdp(
    pin_dir: &Path,
    ifname: &str,
    setting: XdpSetting,
    links_dir: &Path,
) -> Result<Option<XdpAttached>> {
    if setting == XdpSetting::Disabled {
        detach_xdp(links_dir)?;
        return Ok(None);
    }
    let name = names::PROG_XDP_NET;
    let path = pin_dir.join(name);
    let mut prog =
        Xdp::from_pin(&path, XdpAttachType::Interface).map_err(|source| Error::Program {
            name,
            action: "opening the pinned program",
            source,
        })?;
    attach(&mut prog, ifname, setting, links_dir)
}

fn attach(
    prog: &mut Xdp,
    ifname: &str,
    setting: XdpSetting,
    links_dir: &Path,
) -> Result<Option<XdpAttached>> {
    let mut fell_back = None;
    let mode = match setting {
        XdpSetting::Disabled => {
            detach_xdp(links_dir)?;
            return Ok(None);
        }
        XdpSetting::Native => match attach_mode(prog, ifname, XdpSetting::Native, links_dir) {
            Ok(()) => XdpSetting::Native,
            Err(e) => {
                fell_back = Some(error_chain(&e));
                XdpSetting::Generic
            }
        },
        XdpSetting::Generic => XdpSetting::Generic,
    };
    if mode == XdpSetting::Generic {
        attach_mode(prog, ifname, XdpSetting::Generic, links_dir)?;
    }
    Ok(Some(XdpAttached {
        mode,
        fell_back,
        pin: pin_path(links_dir, mode),
    }))
}

fn attach_mode(prog: &mut Xdp, ifname: &str, mode: XdpSetting, links_dir: &Path) -> Result<()> {
    let name = names::PROG_XDP_NET;
    let err = |source| Error::Attach {
        name,
        target: ifname.to_owned(),
        source,
    };
    std::fs::create_dir_all(links_dir).map_err(|source| Error::Io {
        action: "creating link pin directory",
        path: links_dir.to_owned(),
        source,
    })?;
    let path = pin_path(links_dir, mode);
    let other = if mode == XdpSetting::Native {
        XdpSetting::Generic
    } else {
        XdpSetting::Native
    };
    unpin(links_dir, other)?;
    let id = match PinnedLink::from_pin(&path) {
        // A restarted agent: the new program into the same link.
        Ok(pinned) => {
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|source| Error::Link {
                name,
                target: ifname.to_owned(),
                source,
            })?;
            prog.attach_to_link(link).map_err(err)?
        }
        Err(_) => {
            let xdp_mode = if mode == XdpSetting::Native {
                XdpMode::Driver
            } else {
                XdpMode::Skb
            };
            attach_retrying(|| prog.attach(ifname, xdp_mode)).map_err(err)?
        }
    };
    let link = prog.take_link(id).map_err(err)?;
    let fd = FdLink::try_from(link).map_err(|source| Error::Link {
        name,
        target: ifname.to_owned(),
        source,
    })?;
    crate::pins::remove_if_exists(&path)?;
    fd.pin(&path).map_err(|source| Error::PinLink {
        name,
        path: path.clone(),
        source,
    })?;
    Ok(())
}

/// A link of the other mode that was just unpinned is released by the
/// kernel from a work queue (`bpf_link_put`), so for a moment the device
/// still has the old program (EEXIST: native and generic never coexist;
/// EBUSY): retry for up to a second.
fn attach_retrying<T>(
    mut attach: impl FnMut() -> Result<T, ProgramError>,
) -> Result<T, ProgramError> {
    let mut tries = 0;
    loop {
        match attach() {
            Err(ProgramError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
                    && tries < 20 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
