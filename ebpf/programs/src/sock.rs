//! Socket LB (cgroup/sock_addr hooks, Cilium `bpf_sock.c`): connect() and
//! unconnected sendmsg() to a service frontend are rewritten to a backend
//! before any packet exists, so established flows cost nothing per packet.
//! The original frontend is remembered per (socket cookie, backend) so UDP
//! recvmsg() and getpeername() show the service address.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use riptide_common::{
    AFF_CLIENT_NETNS, CFG_F_SOCK_LB, DropEvent, EV_SRC_SOCK, SVC_F_NO_SOCK_LB, SockRevKey,
    SockRevValue, proto, stats,
};

use crate::{
    lb,
    maps::{SOCKREV4, config, count},
};

/// Return values of cgroup sock_addr programs.
pub const SOCK_ALLOW: i32 = 1;
pub const SOCK_REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn is_loopback(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

/// connect4 / sendmsg4: rewrite a service frontend to a backend.
#[inline(always)]
pub fn try_xlate_fwd(ctx: &SockAddrContext) -> Result<i32, u32> {
    let cfg = config();
    if cfg.flags & CFG_F_SOCK_LB == 0 {
        return Ok(SOCK_ALLOW);
    }
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the program was given.
    let (vip_be, port_be, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let proto = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return Ok(SOCK_ALLOW),
    };
    // NodePort reached from the node itself: any node address or loopback.
    let is_node = (cfg.node_ip_be != 0 && vip_be == cfg.node_ip_be) || is_loopback(vip_be);
    let Some(svc) = lb::lookup_with_node(vip_be, port_be, proto, true, is_node) else {
        return Ok(SOCK_ALLOW);
    };
    if svc.master.flags & SVC_F_NO_SOCK_LB != 0 {
        return Ok(SOCK_ALLOW);
    }
    // SAFETY: plain helper call on our context.
    let netns = || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(chosen) = lb::select(&svc, netns, AFF_CLIENT_NETNS, || None)? else {
        count(stats::SOCK_NO_BACKEND);
        crate::events::emit(DropEvent {
            reason: stats::SOCK_NO_BACKEND,
            daddr_be: vip_be,
            dport_be: port_be,
            proto,
            source: EV_SRC_SOCK,
            ..DropEvent::default()
        });
        // Kubernetes: a service without endpoints rejects. Returning 0 alone
        // would surface as EPERM; bpf_set_retval (5.18+) sets the errno the
        // application sees, as Cilium's bpf_sock does.
        // SAFETY: plain helper call.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return Ok(SOCK_REJECT);
    };
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        addr_be: chosen.be.addr_be,
        port_be: chosen.be.port_be,
        _pad: 0,
    };
    let val = SockRevValue {
        vip_be,
        port_be,
        revnat_id: svc.master.revnat_id,
    };
    // Without the entry replies would show the backend: fail the call
    // rather than confuse a UDP client that checks its peer.
    SOCKREV4
        .insert(&key, &val, 0)
        .map_err(|_| stats::NAT_FAIL)?;
    // SAFETY: writable fields for connect4/sendmsg4.
    unsafe {
        (*sa).user_ip4 = chosen.be.addr_be;
        (*sa).user_port = u32::from(chosen.be.port_be);
    }
    count(stats::SOCK_XLATE);
    Ok(SOCK_ALLOW)
}

/// recvmsg4 / getpeername4: show the frontend instead of the backend.
#[inline(always)]
pub fn try_xlate_rev(ctx: &SockAddrContext) -> Result<i32, u32> {
    let sa = ctx.sock_addr;
    // SAFETY: plain helper call on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: fields of the context the program was given.
    let key = unsafe {
        SockRevKey {
            cookie,
            addr_be: (*sa).user_ip4,
            port_be: (*sa).user_port as u16,
            _pad: 0,
        }
    };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { SOCKREV4.get(&key) }.copied() {
        // SAFETY: writable fields for recvmsg4/getpeername4.
        unsafe {
            (*sa).user_ip4 = v.vip_be;
            (*sa).user_port = u32::from(v.port_be);
        }
        count(stats::SOCK_REVNAT);
    }
    Ok(SOCK_ALLOW)
}
