//! The node's uplink: `rt_from_net` (tc ingress) and `rt_to_net` (tc egress).
//!
//! Ingress: NodePort / externalIP / LoadBalancer-IP / hostPort traffic from
//! outside is DNATed; replies to source-NATed flows get their destination
//! back; replies from remote backends to local client pods get the frontend
//! restored. Egress: the source NAT of flows to remote backends, the reverse
//! DNAT of replies to outside clients, and pod→outside masquerade. With
//! NetworkPolicy on, new flows into local pods (plain, or NodePort & co to
//! a local backend) are judged on the pod's ingress (`policy`).
//!
//! Why the split: after a translation that puts a node address in the source
//! the packet must not re-enter the kernel's input path (it would be dropped
//! as a martian), so every "source = node address" rewrite happens on egress,
//! where the kernel has already routed the packet.
//!
//! Translated packets that leave through the uplink they came in on (to a
//! backend on another node, replies back to an outside client) skip the
//! kernel's forwarding path when they can: `route::forward_out` looks the
//! route and next hop up with `bpf_fib_lookup` and redirects the packet to
//! the uplink's egress, where the source NAT above still happens.
//!
//! A packet to a node address is not a new NodePort (hostPort, externalIP
//! on the node address) flow when it belongs to a connection of a host
//! process that happens to use the frontend's port as its local port (the
//! SYN-ACK of `connect()` from local port 30000): before balancing such a
//! packet `local_sock::owns` asks the kernel's socket table and leaves it
//! to the kernel if a non-listening TCP socket or a connected UDP socket
//! owns the tuple (a listener on the port does not stop the NodePort). One
//! socket lookup per new flow to a node-address frontend only: established
//! flows are found in conntrack first.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use riptide_common::{
    BE_F_LOCAL, CT_F_DSR, CT_F_INBOUND, CT_F_NODEPORT, CT_F_POLICY, CT_F_REPLY, CT_F_SNAT,
    Config, CtKey, EV_SRC_FROM_NET, EV_SRC_TO_NET, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_MASQ,
    stats,
};

use crate::{
    csum::{rewrite, set_dst, set_src},
    ct,
    icmp::Rewrite,
    lb::{self, Chosen},
    local_sock,
    maps::{config, count},
    masq,
    parse::{self, L4_OFF, Pkt},
    policy, reject, route,
};

/// tc ingress on the uplink.
#[inline(always)]
pub fn try_from_net(ctx: &TcContext) -> Result<i32, u32> {
    let Some(mut p) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    let cfg = config();
    // A DSR flow's packet for a local backend: remember the frontend its
    // reply must come from, strip the option, then on as any packet for
    // the pod (`dsr`).
    if p.l4_off != L4_OFF
        && route::is_local_pod(p.daddr_be)
        && let Some(frontend) = crate::dsr::take(ctx, &mut p)?
    {
        ct::create_dsr_reply(&p, frontend)?;
    }
    if !p.has_ports() {
        let translated = crate::icmp::xlate_error(ctx, &mut p, |r| from_net_error_plan(cfg, r))?;
        if !translated
            && policy::enabled(cfg)
            && policy::deny_other(ctx, &p, false, EV_SRC_FROM_NET, false)
        {
            return policy::drop();
        }
        // Pods on this node are reached with bpf_redirect_peer, the rest
        // (the node itself, forwarding) goes to the kernel.
        return route::deliver(ctx, &p);
    }
    let is_node = cfg.node_ip_be != 0 && p.daddr_be == cfg.node_ip_be;

    // 1. A reply to a flow we source-NATed: restore the original client.
    let mut unsnat = false;
    if is_node && let Some(n) = crate::nat::lookup_ingress(&p) {
        if crate::nat::is_identity(n, p.daddr_be, p.dport_be) {
            // A reply to a host socket whose tuple `nat::track_host`
            // reserved: the host's, whatever else matches it.
            return route::pass();
        }
        let (addr, port) = (n.addr_be, n.port_be);
        set_dst(ctx, &mut p, addr, port)?;
        count(stats::UNSNAT);
        unsnat = true;
    }

    // 2. A flow we track (one lookup on the packet's tuple).
    if let Some(hit) = ct::lookup(&p) {
        let e = &*hit.e;
        if e.flags & CT_F_REPLY != 0 {
            // A reply from a backend of a flow balanced on this node.
            if e.flags & CT_F_NODEPORT != 0 {
                // The client is outside: the reply goes back out the uplink
                // (straight, or through the kernel's forwarding) and
                // `rt_to_net` restores the frontend as source on the way
                // out.
                return route::forward_out(ctx, &p);
            }
            rewrite(
                ctx,
                &mut p,
                e.vip_be,
                e.vport_be,
                e.nat_addr_be,
                e.nat_port_be,
            )?;
            count(stats::REVNAT);
            return route::deliver(ctx, &p);
        }
        if e.flags & CT_F_POLICY != 0 {
            // A flow (or the reply of one) NetworkPolicy allowed.
            return route::deliver(ctx, &p);
        }
        if e.flags & CT_F_INBOUND == 0 && !unsnat {
            // 3. A packet of a NodePort & co flow already balanced.
            if let Some(c) = ct::fwd_backend(&hit) {
                count(stats::LB_CT_HIT);
                set_dst(ctx, &mut p, c.be.addr_be, c.be.port_be)?;
                if c.be.flags & BE_F_LOCAL == 0 {
                    if e.flags & CT_F_DSR != 0 {
                        crate::dsr::refresh(ctx, &mut p, (e.vip_be, e.vport_be));
                    }
                    // NodePort to another node: out the uplink again, and
                    // `rt_to_net` applies the SNAT (none for DSR).
                    return route::forward_out(ctx, &p);
                }
                return route::deliver(ctx, &p);
            }
            ct::remove(&p);
        }
    }
    if unsnat {
        // Masqueraded pod traffic coming back.
        return route::deliver(ctx, &p);
    }
    // The destination's ingress: a reply of a TCP flow policy recorded
    // with one entry passes (also when its destination port happens to be
    // a frontend's); a pod without policy state needs no verdict. Never
    // for a node address: it has no policy (and carries the node's
    // control traffic), and the node's own flows into pods get their
    // replies on the pod's veth.
    let mut ingress = policy::enabled(cfg) && !is_node;
    if ingress {
        match policy::before_probe(&p, p.daddr_be) {
            policy::REPLY => return route::deliver(ctx, &p),
            policy::OPEN => ingress = false,
            _ => {}
        }
    }

    // 4. A new flow to a frontend of this node.
    let Some(svc) = lb::lookup_with_node(p.daddr_be, p.dport_be, p.proto, false, is_node) else {
        // Traffic for a pod on this node (from other nodes' pods, other
        // nodes, outside): the pod's ingress policy; remember flows whose
        // replies the masquerade would otherwise rewrite (policy's reply
        // entry does when it records the flow); then straight into the pod.
        let inbound = is_inbound(cfg, &p, is_node);
        if ingress {
            let f = policy::Flow::of(ctx, &p, false, true, EV_SRC_FROM_NET);
            match policy::judge(&f) {
                policy::DENY => return policy::drop(),
                policy::ALLOW => {
                    ct::create_policy(&ct::key(&p), inbound);
                    return route::deliver(ctx, &p);
                }
                policy::REPLY => return route::deliver(ctx, &p),
                _ => {}
            }
        }
        if inbound {
            masq::track_inbound(&p);
        }
        return route::deliver(ctx, &p);
    };
    if is_node && local_sock::owns(ctx, &p) {
        // A reply (or later packet) of a connection a host process opened
        // from a local port that equals this frontend's port: the kernel's
        // socket owns it, it is not a new NodePort flow. Checked only here,
        // for packets that would start a flow to a node-address frontend:
        // established flows hit conntrack above and never pay the lookup.
        count(stats::LOCAL_SOCKET);
        return Ok(TC_ACT_OK);
    }
    if crate::srcrange::denied(ctx, &svc, &p, EV_SRC_FROM_NET) {
        return Ok(aya_ebpf::bindings::TC_ACT_SHOT);
    }
    let Some(chosen) = lb::select_for(&svc, &p)?
    else {
        return reject::reject(ctx, &p, cfg, EV_SRC_FROM_NET);
    };
    // A backend on this node: its ingress policy judges the client as it
    // reaches the backend (the forwarding node's address when that node
    // source-NATed). A remote backend's node judges it there.
    if policy::enabled(cfg) && chosen.be.flags & BE_F_LOCAL != 0 {
        let f = policy::Flow::of(ctx, &p, false, true, EV_SRC_FROM_NET).to_backend(&chosen.be);
        if policy::judge(&f) == policy::DENY {
            return policy::drop();
        }
    }
    count(stats::LB_NEW);
    ct::note_new_flow(&p);
    new_flow(ctx, &mut p, cfg, &svc, &chosen)
}

/// Whether `p`, a non-service packet from outside the node, is the first of
/// a flow into a local pod whose replies masquerade must leave alone (its
/// source is an address the pod's own flows would be masqueraded to).
#[inline(always)]
fn is_inbound(cfg: &Config, p: &Pkt, is_node: bool) -> bool {
    masq::enabled(cfg)
        && !is_node
        && masq::applies_to(cfg, p.saddr_be)
        && route::is_local_pod(p.daddr_be)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    p: &mut Pkt,
    cfg: &Config,
    svc: &lb::Service,
    chosen: &Chosen,
) -> Result<i32, u32> {
    let orig = ct::key(p);
    // DSR (the option goes in before the DNAT, so a refusal leaves the
    // flow to source NAT), else source NAT for a remote backend.
    let dsr = crate::dsr::start(ctx, p, svc, chosen);
    set_dst(ctx, p, chosen.be.addr_be, chosen.be.port_be)?;
    // The state is the XDP program's too (`nodeport`); the SNAT itself is
    // applied by `rt_to_net` after routing.
    let how = if dsr {
        CT_F_DSR
    } else {
        match crate::nodeport::snat(p, cfg, svc, chosen) {
            Ok(Some(_)) => CT_F_SNAT,
            Ok(None) => 0,
            Err(reason) => return crate::nat::drop(ctx, reason, EV_SRC_FROM_NET),
        }
    };
    crate::nodeport::record(&orig, p, svc, chosen, how)?;
    let remote = chosen.be.flags & BE_F_LOCAL == 0;
    if remote {
        return route::forward_out(ctx, p);
    }
    route::deliver(ctx, p)
}

/// tc egress on the uplink.
#[inline(always)]
pub fn try_to_net(ctx: &TcContext) -> Result<i32, u32> {
    let Some(mut p) = parse::parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    if !p.has_ports() {
        crate::icmp::xlate_error(ctx, &mut p, to_net_error_plan)?;
        return Ok(TC_ACT_OK);
    }
    // 1. A flow already source-NATed (NodePort to a remote backend,
    //    masquerade), or a host flow `nat::track_host` recorded.
    if let Some(n) = crate::nat::lookup_egress(&p) {
        if crate::nat::is_identity(n, p.saddr_be, p.sport_be) {
            return Ok(TC_ACT_OK);
        }
        let (addr, port) = (n.addr_be, n.port_be);
        set_src(ctx, &mut p, addr, port)?;
        count(stats::SNAT);
        return Ok(TC_ACT_OK);
    }
    // 2. A flow we track (one lookup on the packet's tuple).
    let mut inbound = false;
    if let Some(hit) = ct::lookup(&p) {
        let e = &*hit.e;
        if e.flags & CT_F_REPLY != 0 {
            // A reply to an outside client of a flow balanced here, or
            // of a DSR flow balanced by another node (its frontend).
            if e.flags & CT_F_DSR != 0 {
                count(stats::DSR_REVNAT);
            }
            rewrite(
                ctx,
                &mut p,
                e.vip_be,
                e.vport_be,
                e.nat_addr_be,
                e.nat_port_be,
            )?;
            count(stats::REVNAT);
            return Ok(TC_ACT_OK);
        }
        inbound = e.flags & CT_F_INBOUND != 0;
    }
    let cfg = config();
    // 3. A flow of the node's own sockets: reserve its tuple so no
    //    mapping takes it (`nat::track_host`).
    if cfg.node_ip_be != 0 && p.saddr_be == cfg.node_ip_be {
        if let Some(port) = crate::nat::track_host(&p, cfg.snat_port_min, cfg.snat_port_max) {
            set_src(ctx, &mut p, cfg.node_ip_be, port)?;
            count(stats::SNAT);
        }
        return Ok(TC_ACT_OK);
    }
    // 4. Pod → outside: masquerade to the node address, only for flows
    //    the pod originates (`masq`).
    if !masq::enabled(cfg)
        || !route::is_local_pod(p.saddr_be)
        || !masq::applies_to(cfg, p.daddr_be)
    {
        return Ok(TC_ACT_OK);
    }
    match masq::decide(&p, inbound) {
        masq::Verdict::Create => {}
        masq::Verdict::Leave => return Ok(TC_ACT_OK),
        masq::Verdict::Drop(reason) => return crate::nat::drop(ctx, reason, EV_SRC_TO_NET),
    }
    let port = match crate::nat::alloc(
        &p,
        cfg.node_ip_be,
        cfg.snat_port_min,
        cfg.snat_port_max,
        NAT_F_MASQ,
        false,
    ) {
        Ok(port) => port,
        // Never let the packet out with the pod's address.
        Err(stats::SNAT_NO_PORT) => {
            return crate::nat::drop(ctx, stats::MASQ_NO_PORT, EV_SRC_TO_NET);
        }
        Err(reason) => return crate::nat::drop(ctx, reason, EV_SRC_TO_NET),
    };
    set_src(ctx, &mut p, cfg.node_ip_be, port)?;
    count(stats::SNAT);
    Ok(TC_ACT_OK)
}

/// What `rt_from_net` would do to a packet of tuple `r` (for ICMP errors,
/// see `icmp`): un-SNAT, reverse NAT of replies to local clients, DNAT of
/// NodePort & co flows.
#[inline(always)]
fn from_net_error_plan(cfg: &Config, r: &CtKey) -> Option<Rewrite> {
    let mut rw = Rewrite::of(r);
    let mut k = *r;
    let mut unsnat = false;
    if cfg.node_ip_be != 0
        && r.daddr_be == cfg.node_ip_be
        && let Some(n) = crate::nat::lookup_tuple(r, NAT_DIR_INGRESS)
    {
        rw.daddr_be = n.addr_be;
        rw.dport_be = n.port_be;
        k.daddr_be = n.addr_be;
        k.dport_be = n.port_be;
        unsnat = true;
    }
    if let Some(hit) = ct::lookup_key(&k) {
        let e = &*hit.e;
        if e.flags & CT_F_REPLY != 0 {
            if e.flags & CT_F_NODEPORT == 0 {
                rw.saddr_be = e.vip_be;
                rw.sport_be = e.vport_be;
                rw.daddr_be = e.nat_addr_be;
                rw.dport_be = e.nat_port_be;
            }
        } else if e.flags & CT_F_INBOUND == 0
            && !unsnat
            && let Some(c) = ct::fwd_backend(&hit)
        {
            rw.daddr_be = c.be.addr_be;
            rw.dport_be = c.be.port_be;
        }
    }
    Some(rw)
}

/// What `rt_to_net` would do to a packet of tuple `r` (for ICMP errors):
/// SNAT of NodePort flows and masqueraded flows, reverse DNAT of replies
/// to outside clients. Never a new masquerade mapping.
#[inline(always)]
fn to_net_error_plan(r: &CtKey) -> Option<Rewrite> {
    let mut rw = Rewrite::of(r);
    if let Some(n) = crate::nat::lookup_tuple(r, NAT_DIR_EGRESS) {
        rw.saddr_be = n.addr_be;
        rw.sport_be = n.port_be;
        return Some(rw);
    }
    let hit = ct::lookup_key(r)?;
    let e = &*hit.e;
    if e.flags & CT_F_REPLY == 0 {
        return None;
    }
    rw.saddr_be = e.vip_be;
    rw.sport_be = e.vport_be;
    rw.daddr_be = e.nat_addr_be;
    rw.dport_be = e.nat_port_be;
    Some(rw)
}
