//! `rt_to_pod`: tc egress on the host side of a pod veth, i.e. packets the
//! kernel routes into the pod: from the node's own stack (kubelet probes,
//! host processes, socket-LB flows of host processes), from a tunnel device
//! without the uplink programs, and anything the other programs handed to
//! the kernel instead of delivering it with `bpf_redirect_peer` (which
//! skips this hook; those programs judge ingress themselves).
//!
//! Its only job is the pod's ingress NetworkPolicy: a packet of a flow
//! conntrack knows (a policy or load-balancer entry, either direction)
//! passes; the first packet of any other flow into an isolated pod is
//! judged, and an allowed one recorded so its replies pass the pod's egress.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use riptide_common::EV_SRC_TO_POD;

use crate::{ct, maps::config, masq, parse, policy};

/// Returns the tc verdict for a packet entering a pod, or a stats reason.
#[inline(always)]
pub fn try_to_pod(ctx: &TcContext) -> Result<i32, u32> {
    let cfg = config();
    if !policy::enabled(cfg) {
        return Ok(TC_ACT_OK);
    }
    let Some(p) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    if !p.has_ports() {
        if policy::deny_other(ctx, &p, false, EV_SRC_TO_POD, false) {
            return policy::drop();
        }
        return Ok(TC_ACT_OK);
    }
    if ct::lookup(&p).is_some() {
        return Ok(TC_ACT_OK);
    }
    // Replies of this flow leave through the uplink's egress: masquerade
    // must leave them alone when the peer is one it would rewrite towards
    // (as `rt_from_net` marks flows it delivers). A reply of a TCP flow
    // policy recorded with one entry passes (`policy::judge`).
    let inbound = masq::enabled(cfg) && masq::applies_to(cfg, p.saddr_be);
    if policy::deny_plain(ctx, &p, false, true, EV_SRC_TO_POD, inbound) {
        return policy::drop();
    }
    Ok(TC_ACT_OK)
}
