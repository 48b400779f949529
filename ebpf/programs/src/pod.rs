//! `rt_from_pod`: tc ingress on the host side of a pod veth (packets the pod
//! sends). Service traffic that socket LB did not translate (the pod is
//! outside the node's cgroup, raw sockets, …) is load-balanced here with
//! conntrack; replies of local backends to local clients are reverse-NATed
//! and delivered; everything else is routed (`route::deliver`). With
//! NetworkPolicy on, new flows are judged (`policy`) on the pod's egress
//! and, for a destination pod on this node, its ingress.
//!
//! Established path: one conntrack lookup on the packet's own tuple (the
//! entry says forward, reply or inbound), one backend lookup, the rewrite,
//! and no endpoint lookup when the backend is known to be remote.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use riptide_common::{
    BE_F_LOCAL, CT_F_HAIRPIN, CT_F_INBOUND, CT_F_NODEPORT, CT_F_POLICY, CT_F_REPLY,
    CtKey, CtValue, EV_SRC_FROM_POD, stats,
};

use crate::{
    csum::rewrite,
    ct,
    icmp::Rewrite,
    lb::{self, Chosen},
    maps::{config, count},
    parse::{self, Pkt},
    policy, reject, route,
};

/// Returns the tc verdict for a packet leaving a pod, or a stats reason.
#[inline(always)]
pub fn try_from_pod(ctx: &TcContext) -> Result<i32, u32> {
    let Some(mut p) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    if !p.has_ports() {
        // A backend pod's ICMP error about a balanced flow goes back to the
        // client as if the service had sent it.
        let translated = crate::icmp::xlate_error(ctx, &mut p, error_plan)?;
        if !translated
            && policy::enabled(config())
            && policy::deny_other(ctx, &p, true, EV_SRC_FROM_POD, false)
        {
            return policy::drop();
        }
        // ICMP, fragments, other protocols: routed as they are. Services are
        // TCP/UDP only; a fragment of a service flow cannot be matched.
        return route::deliver(ctx, &p);
    }

    if let Some(hit) = ct::lookup(&p) {
        let flags = hit.e.flags;
        if flags & CT_F_REPLY != 0 {
            return reply(ctx, &mut p, hit.e);
        }
        if flags & CT_F_INBOUND != 0 {
            // The pod answering a peer outside the node that reached it
            // directly: nothing to translate, the kernel routes it.
            return route::pass();
        }
        if flags & CT_F_POLICY != 0 {
            // A flow (or the reply of one) NetworkPolicy allowed.
            return route::deliver(ctx, &p);
        }
        // A packet of a flow already balanced.
        if let Some(chosen) = ct::fwd_backend(&hit) {
            count(stats::LB_CT_HIT);
            return forward(ctx, &mut p, &chosen, hit.e.nat_addr_be, hit.e.nat_port_be);
        }
        // The backend is gone (endpoint deleted): balance the flow anew
        // rather than black-holing it.
        ct::remove(&p);
    }

    let cfg = config();
    // The pod's egress: a reply of a TCP flow policy recorded with one
    // entry passes; a pod without policy state needs no egress verdict.
    let mut egress = policy::enabled(cfg);
    if egress {
        match policy::before_probe(&p, p.saddr_be) {
            policy::REPLY => return route::deliver(ctx, &p),
            policy::OPEN => egress = false,
            _ => {}
        }
    }
    let is_node = cfg.node_ip_be != 0 && p.daddr_be == cfg.node_ip_be;
    let Some(svc) = lb::lookup_with_node(p.daddr_be, p.dport_be, p.proto, true, is_node) else {
        // A new flow to a pod or elsewhere: the pod's egress and, when the
        // destination is a pod on this node, its ingress (delivery with
        // bpf_redirect_peer skips the veth egress program). The endpoint
        // lookup delivery needs anyway says whether the destination is
        // local, so a remote one costs no policy lookup. The replies of a
        // TCP flow policy recorded with one entry pass here too.
        let ep = route::endpoint(p.daddr_be);
        if policy::enabled(cfg)
            && (egress || ep.is_some())
            && policy::deny_plain(ctx, &p, egress, ep.is_some(), EV_SRC_FROM_POD, false)
        {
            return policy::drop();
        }
        return route::deliver_to(ctx, &p, ep);
    };
    if crate::srcrange::denied(ctx, &svc, &p, EV_SRC_FROM_POD) {
        return Ok(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    let Some(chosen) = lb::select_for(&svc, &p)?
    else {
        return reject::reject(ctx, &p, cfg, EV_SRC_FROM_POD);
    };
    // Policy judges the backend, never the frontend: the client's egress,
    // and the backend's ingress when it runs here. The load balancer's
    // conntrack entries then carry the verdict.
    if policy::enabled(cfg) {
        let local = chosen.be.flags & BE_F_LOCAL != 0;
        let f = policy::Flow::of(ctx, &p, true, local, EV_SRC_FROM_POD).to_backend(&chosen.be);
        if policy::judge(&f) == policy::DENY {
            return policy::drop();
        }
    }
    count(stats::LB_NEW);
    ct::note_new_flow(&p);
    let orig = ct::key(&p);
    // Hairpin: a pod reaching its own service lands on itself. Its kernel
    // would drop a packet from its own address arriving on eth0, so the
    // source becomes the hairpin address (Cilium's IPV4_LOOPBACK).
    let hairpin = chosen.be.addr_be == p.saddr_be && cfg.hairpin_ip_be != 0;
    let (snat_addr, snat_port) = if hairpin {
        (cfg.hairpin_ip_be, p.sport_be)
    } else {
        (0, 0)
    };
    // The reply as it will leave the backend: to the client, or to the
    // hairpin address.
    let mut reply = orig;
    reply.saddr_be = chosen.be.addr_be;
    reply.sport_be = chosen.be.port_be;
    reply.daddr_be = if hairpin { snat_addr } else { p.saddr_be };
    reply.dport_be = p.sport_be;
    ct::create(&ct::NewFlow {
        orig,
        reply,
        backend: &chosen,
        revnat_id: svc.master.revnat_id,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        snat_addr_be: snat_addr,
        snat_port_be: snat_port,
    })?;
    forward(ctx, &mut p, &chosen, snat_addr, snat_port)
}

/// DNAT to the chosen backend (plus the hairpin SNAT), then delivery.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    p: &mut Pkt,
    chosen: &Chosen,
    snat_addr: u32,
    snat_port: u16,
) -> Result<i32, u32> {
    let (saddr, sport) = if snat_addr != 0 {
        count(stats::HAIRPIN);
        (snat_addr, snat_port)
    } else {
        (p.saddr_be, p.sport_be)
    };
    rewrite(ctx, p, saddr, sport, chosen.be.addr_be, chosen.be.port_be)?;
    if chosen.be.flags & BE_F_LOCAL == 0 {
        // A backend on another node: no endpoint here to look up; the
        // kernel routes it.
        return Ok(TC_ACT_OK);
    }
    route::deliver(ctx, p)
}

/// A reply from a backend pod on this node.
#[inline(always)]
fn reply(ctx: &TcContext, p: &mut Pkt, e: &CtValue) -> Result<i32, u32> {
    if e.flags & CT_F_NODEPORT != 0 {
        // The client is outside: the uplink's egress program restores the
        // frontend there (rewriting the source to a node address here would
        // make the kernel drop the packet as a martian).
        return route::pass();
    }
    // Flows balanced by this program have their client on this node.
    rewrite(ctx, p, e.vip_be, e.vport_be, e.nat_addr_be, e.nat_port_be)?;
    count(stats::REVNAT);
    route::deliver(ctx, p)
}

/// What this program would do to a packet of tuple `r` (for ICMP errors,
/// see `icmp`): reverse NAT of replies to local clients, DNAT of balanced
/// flows. NodePort replies are translated on the uplink's egress.
#[inline(always)]
fn error_plan(r: &CtKey) -> Option<Rewrite> {
    let hit = ct::lookup_key(r)?;
    let e = &*hit.e;
    if e.flags & CT_F_REPLY != 0 {
        if e.flags & CT_F_NODEPORT != 0 {
            return None;
        }
        return Some(Rewrite {
            saddr_be: e.vip_be,
            sport_be: e.vport_be,
            daddr_be: e.nat_addr_be,
            dport_be: e.nat_port_be,
        });
    }
    if e.flags & CT_F_INBOUND != 0 {
        return None;
    }
    let c = ct::fwd_backend(&hit)?;
    let mut rw = Rewrite::of(r);
    if e.nat_addr_be != 0 {
        rw.saddr_be = e.nat_addr_be;
        rw.sport_be = e.nat_port_be;
    }
    rw.daddr_be = c.be.addr_be;
    rw.dport_be = c.be.port_be;
    Some(rw)
}
