//! The upgrade path of ingress NetworkPolicy on pod veths: `rt_to_pod` (tc
//! egress of a pod's host veth: what the kernel routes into the pod from
//! the node, the VXLAN device or any path that did not `bpf_redirect_peer`)
//! is attached by the CNI at ADD; pods created by an older plugin lack it.
//! At start the agent attaches it to the host veth of every local endpoint
//! in `rt_ep4_v1` that has none.
//!
//! "Has none" without a query that could race a concurrent CNI ADD: the
//! plugin's filter is the first `cls_bpf` filter at priority 1 of the egress
//! hook, and `cls_bpf` numbers handles from 1 (`cls_bpf_change()` →
//! `idr_alloc_u32()` from 1), so it is handle 1. Attaching with priority 1,
//! handle 1 and `NLM_F_EXCL` (aya's netlink attach) adds the filter where it
//! is absent and fails with `EEXIST` where it is there, so the program is
//! never attached twice. Like the plugin's, the filter belongs to the device
//! (no pinned link): it lives exactly as long as the veth.

use std::{ffi::CStr, path::Path};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions, TcError, TcHandle},
};
use riptide_common::{EP_F_HOST, EndpointValue, names};

/// What [`attach_missing`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Host veths that got `rt_to_pod` now.
    pub attached: Vec<String>,
    /// Host veths that had it.
    pub present: usize,
    /// `ifname: error` of the veths where attaching failed.
    pub failed: Vec<String>,
}

/// Attaches the pinned `rt_to_pod` (under `pin_dir`) at tc egress of each
/// endpoint's host veth that lacks it, in the calling thread's network
/// namespace. Host-network endpoints and vanished interfaces are skipped.
pub fn attach_missing(pin_dir: &Path, endpoints: &[(std::net::Ipv4Addr, EndpointValue)]) -> Report {
    let mut rep = Report::default();
    let mut prog = match SchedClassifier::from_pin(pin_dir.join(names::PROG_TO_POD)) {
        Ok(p) => p,
        Err(e) => {
            rep.failed.push(format!("{}: {e}", names::PROG_TO_POD));
            return rep;
        }
    };
    for (_, ep) in endpoints.iter().filter(|(_, ep)| ep.flags & EP_F_HOST == 0) {
        let Some(ifname) = ifname(ep.ifindex) else { continue };
        // A veth of an old plugin may lack the clsact qdisc's egress hook
        // only if it never had one; EEXIST is the normal case.
        let _ = tc::qdisc_add_clsact(&ifname);
        let opts = TcAttachOptions::Netlink(NlOptions { priority: 1, handle: TcHandle::new(0, 1), ..NlOptions::default() });
        match prog.attach_with_options(&ifname, TcAttachType::Egress, opts) {
            Ok(id) => match prog.take_link(id) {
                Ok(link) => {
                    // The filter must outlive this handle (and the agent).
                    std::mem::forget(link);
                    rep.attached.push(ifname);
                }
                Err(e) => rep.failed.push(format!("{ifname}: {e}")),
            },
            Err(e) if is_exists(&e) => rep.present += 1,
            Err(e) => rep.failed.push(format!("{ifname}: {e}")),
        }
    }
    rep
}

/// The name of interface `index`, `None` when it is gone.
fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The attach failed because filter priority 1 / handle 1 exists.
fn is_exists(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}
