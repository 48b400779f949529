//! Which device nodes a container may use. A container that is not
//! `privileged` sees the node's `/dev` (read-only, but a read-only mount
//! does not stop opening a device node) and has `CAP_MKNOD`, so without
//! a device cgroup a root pod could read the node's disks or `/dev/mem`.
//! Its cgroup ([`super::sandbox::create_container_cgroup`]) gets riptide's
//! `rt_dev` program (runc's default rules: mknod of anything, read/write
//! of `/dev/null`, `zero`, `full`, `random`, `urandom`, `tty`, `ptmx` and
//! the pseudo-terminals only) before the container's process joins it.
//! Privileged containers get none, as upstream.
//!
//! The program is attached the cgroup-owned way (`riptide_datapath::devices`):
//! the attachment ends with the container's cgroup, not with this process,
//! so running containers stay filtered while the kubelet restarts, and
//! nothing is left behind when the cgroup goes. It is loaded once per
//! kubelet, on the first container that needs it; a kernel that cannot load
//! or attach it fails that container's start (the error becomes its
//! `RunContainerError` and a `Failed` event) rather than running it
//! unfiltered, and the next start tries again.

use std::{path::Path, sync::Mutex};

use riptide_datapath::devices::DeviceFilter;

use super::{Error, probes::chain};

static FILTER: Mutex<Option<DeviceFilter>> = Mutex::new(None);

/// Restricts the devices of what runs in `cgroup` (a container's own, just
/// created: each call adds an attachment) to runc's defaults.
pub fn restrict(cgroup: &Path) -> Result<(), Error> {
    let fail = |what: &str, e: &dyn std::error::Error| Error::Sandbox(format!("{what} for container cgroup {}: {}", cgroup.display(), chain(e)));
    let mut filter = FILTER.lock().map_err(|_| Error::Sandbox("device filter lock poisoned".into()))?;
    if filter.is_none() {
        *filter = Some(DeviceFilter::load().map_err(|e| fail("loading the device cgroup program", &e))?);
    }
    if let Some(f) = filter.as_ref() {
        f.attach(cgroup).map_err(|e| fail("restricting devices", &e))?;
    }
    Ok(())
}
