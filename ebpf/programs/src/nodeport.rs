//! The state of a new flow from outside to a NodePort, externalIP or
//! LoadBalancer-IP frontend, whatever hook starts it: `rt_from_net` (tc)
//! and `rt_xdp_net` (XDP) both go through [`snat`] and [`record`], so they
//! write the same NAT and conntrack entries and a flow started by
//! either continues in the other (XDP detached, or a packet XDP leaves to
//! tc).

use riptide_common::{
    BE_F_LOCAL, CT_F_NODEPORT, Config, CtKey, NAT_F_NODEPORT, SVC_F_LOCAL_ONLY, stats,
};

use crate::{
    ct,
    lb::{Chosen, Service},
    maps::count,
    parse::Pkt,
};

/// The source NAT of a new flow balanced to `chosen`, `to_backend` being
/// its packet after DNAT: externalTrafficPolicy Cluster and a backend on
/// another node need the node address as source so the reply comes back
/// through this node; the port is allocated (and both NAT entries written)
/// now. `Ok(None)`: no source NAT. Local-only scopes never get here with a
/// remote backend; the flag check is a second line so a writer bug cannot
/// leak client addresses. An error means no port: the caller drops the
/// packet rather than forward it with the client's address.
#[inline(always)]
pub fn snat(
    to_backend: &Pkt,
    cfg: &Config,
    svc: &Service,
    chosen: &Chosen,
) -> Result<Option<u16>, u32> {
    let remote = chosen.be.flags & BE_F_LOCAL == 0;
    if !remote || svc.master.flags & SVC_F_LOCAL_ONLY != 0 || cfg.node_ip_be == 0 {
        return Ok(None);
    }
    let port = crate::nat::alloc(
        to_backend,
        cfg.node_ip_be,
        cfg.snat_port_min,
        cfg.snat_port_max,
        NAT_F_NODEPORT,
        true,
    )?;
    count(stats::SNAT);
    Ok(Some(port))
}

/// Records the conntrack entries of the flow `orig` (client → frontend, as
/// it arrived) now going to `chosen` as `to_backend`; `how` is
/// [`CT_F_SNAT`](riptide_common::CT_F_SNAT) when [`snat`] allocated a port, `CT_F_DSR` when the
/// packet went with the DSR option (`dsr`), else 0. The reply key is the
/// reply once the SNAT is undone (backend → client).
#[inline(always)]
pub fn record(
    orig: &CtKey,
    to_backend: &Pkt,
    svc: &Service,
    chosen: &Chosen,
    how: u16,
) -> Result<(), u32> {
    ct::create(&ct::NewFlow {
        orig: *orig,
        reply: ct::reverse(to_backend),
        backend: chosen,
        revnat_id: svc.master.revnat_id,
        flags: CT_F_NODEPORT | how,
        snat_addr_be: 0,
        snat_port_be: 0,
    })
}
