//! `loadBalancerSourceRanges`: a new flow to a load-balancer IP of a
//! Service with source ranges is dropped unless its source lies in one of
//! them (kube-proxy's `KUBE-FW-*` chains and nftables `firewall-ips`,
//! Cilium's `lb4_src_range_ok()` in `bpf/lib/lb.h`).
//!
//! Scope, as kube-proxy: only the load-balancer ingress IPs are filtered
//! (the agent sets [`SVC_F_SRC_RANGE`] on those frontends only); the
//! Service's NodePort, externalIPs and ClusterIP stay open. Every client is
//! judged by the address it sends from: outside clients on the uplink (tc
//! and XDP), pods on their veth (kube-proxy filters pod → LB IP in
//! PREROUTING the same way). Socket LB skips these frontends, so a pod's
//! connect() reaches the per-packet path where its address is known.
//!
//! Cost: a Service without ranges pays the flag test; one with ranges pays
//! one LPM lookup on the first packet of a flow only. Established flows
//! are found in conntrack before the service lookup and never come here.

use aya_ebpf::maps::lpm_trie::Key;
use riptide_common::{SRCRANGE_PREFIX_BASE, SVC_F_SRC_RANGE, SrcRangeKey, stats};

use crate::{
    events,
    lb::Service,
    maps::{SRCRANGE4, count},
    parse::{Frame, Pkt},
};

/// Whether the source of `p`, the first packet of a flow to `svc`, is
/// outside the frontend's source ranges. Counts and reports the drop
/// (`lb_src_range`); the caller returns its hook's drop verdict.
#[inline(always)]
pub fn denied(ctx: &impl Frame, svc: &Service, p: &Pkt, source: u8) -> bool {
    if svc.master.flags & SVC_F_SRC_RANGE == 0 {
        return false;
    }
    let key = Key::new(
        SRCRANGE_PREFIX_BASE + 32,
        SrcRangeKey {
            revnat_id: svc.master.revnat_id,
            _pad: 0,
            addr_be: p.saddr_be,
        },
    );
    if SRCRANGE4.get(&key).is_some() {
        return false;
    }
    count(stats::DROP_LB_SRC_RANGE);
    events::report(ctx, stats::DROP_LB_SRC_RANGE, source);
    true
}
