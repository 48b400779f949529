//! riptide's eBPF programs. Each entry point is a thin wrapper over a
//! `try_*` function in the module for its concern; the wrapper maps an error
//! to an explicit, commented verdict.
//!
//! The crate is only meaningful for `bpfel-unknown-none` (aya-build builds
//! it from `ebpf/datapath/build.rs`). A host build (`cargo build
//! --workspace`, clippy, tests) compiles the same code against std with an
//! empty `main`, so every ordinary workspace command works and still
//! type-checks the programs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Map keys and values go to the helpers by reference on purpose: passed by
// value (as this lint suggests) each one is copied again onto the
// program's stack, and the object's code and stack layout change (the
// verifier sees different programs).
#![allow(clippy::needless_borrows_for_generic_args)]

mod clock;
mod csum;
mod ct;
mod device;
mod dsr;
mod events;
mod icmp;
mod lb;
mod local_sock;
mod maps;
mod masq;
mod nat;
mod nodeport;
mod parse;
mod pod;
mod policy;
mod reject;
mod route;
mod sock;
mod srcrange;
mod to_pod;
mod uplink;
mod xdp;

use aya_ebpf::{
    bindings::{
        TC_ACT_OK,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    macros::{cgroup_device, cgroup_sock_addr, classifier, xdp},
    programs::{DeviceContext, SockAddrContext, TcContext, XdpContext},
};
use riptide_common::{
    DropEvent, EV_SRC_FROM_NET, EV_SRC_FROM_POD, EV_SRC_SOCK, EV_SRC_TO_NET, EV_SRC_TO_POD,
    EV_SRC_XDP_NET, stats,
};

/// tc ingress on the host side of a pod's veth: every packet the pod sends.
///
/// Each tc entry's body is inlined into the entry aya's macro wraps it in:
/// 6.1's verifier (`check_max_stack_depth`) counts every frame of a
/// BPF-to-BPF call chain, even an empty one, as at least 32 of the 512
/// bytes of stack the chain may use, and the reject path (body →
/// `tcp_rst`) has none to spare.
#[classifier]
#[inline(always)]
pub fn rt_from_pod(ctx: TcContext) -> i32 {
    match pod::try_from_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(reason);
            events::report(&ctx, reason, EV_SRC_FROM_POD);
            // Fail open: a packet we cannot parse or translate goes to the
            // kernel stack. Dropping it would black-hole a pod on a parser
            // bug; the kernel still routes and filters it.
            TC_ACT_OK
        }
    }
}

/// tc ingress on the node uplink: traffic arriving from other nodes/outside.
#[classifier]
#[inline(always)]
pub fn rt_from_net(ctx: TcContext) -> i32 {
    match uplink::try_from_net(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(reason);
            events::report(&ctx, reason, EV_SRC_FROM_NET);
            // Fail open, as for pods: the uplink carries the node's own
            // traffic (control plane, SSH in real clusters); never cut it
            // on an LB error.
            TC_ACT_OK
        }
    }
}

/// tc egress on the node uplink: SNAT, reverse DNAT, masquerade.
#[classifier]
#[inline(always)]
pub fn rt_to_net(ctx: TcContext) -> i32 {
    match uplink::try_to_net(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(reason);
            events::report(&ctx, reason, EV_SRC_TO_NET);
            // Fail open: an untranslated packet reaches the peer, which
            // answers with a RST for an unknown flow; better than silence.
            TC_ACT_OK
        }
    }
}

/// tc egress on the host side of a pod's veth: packets the kernel routes
/// into the pod (ingress NetworkPolicy for flows that were not delivered
/// with `bpf_redirect_peer`).
#[classifier]
#[inline(always)]
pub fn rt_to_pod(ctx: TcContext) -> i32 {
    match to_pod::try_to_pod(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(reason);
            events::report(&ctx, reason, EV_SRC_TO_POD);
            // Fail open, like the other tc programs: a packet this program
            // cannot parse is one no policy verdict applies to (policy
            // judges IPv4 flows), and dropping it would cut the pod off on
            // a parser bug.
            TC_ACT_OK
        }
    }
}

/// XDP on the node uplink: NodePort & co to remote backends before the
/// stack; everything else passes to the tc programs.
#[xdp]
pub fn rt_xdp_net(ctx: XdpContext) -> u32 {
    match xdp::try_xdp_net(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(reason);
            events::report(&ctx, reason, EV_SRC_XDP_NET);
            if reason == stats::DROP_MALFORMED {
                // An IPv4 header with a bad version or length: `ip_rcv`
                // drops it too, only later.
                XDP_DROP
            } else {
                // Fail open: nothing was rewritten before a failure (state
                // first, then the packet), so tc sees the packet as it came.
                XDP_PASS
            }
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn rt_sock_conn4(ctx: SockAddrContext) -> i32 {
    sock_fwd(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn rt_sock_send4(ctx: SockAddrContext) -> i32 {
    sock_fwd(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn rt_sock_recv4(ctx: SockAddrContext) -> i32 {
    sock_rev(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn rt_sock_peer4(ctx: SockAddrContext) -> i32 {
    sock_rev(&ctx)
}

#[inline(always)]
fn sock_fwd(ctx: &SockAddrContext) -> i32 {
    match sock::try_xlate_fwd(ctx) {
        Ok(v) => v,
        Err(reason) => {
            maps::count(reason);
            events::emit(DropEvent {
                reason,
                source: EV_SRC_SOCK,
                ..DropEvent::default()
            });
            // Fail open: the call proceeds untranslated (to the VIP, which
            // then meets the per-packet LB on the pod's veth) rather than
            // failing an application's connect on an internal error.
            sock::SOCK_ALLOW
        }
    }
}

#[inline(always)]
fn sock_rev(ctx: &SockAddrContext) -> i32 {
    match sock::try_xlate_rev(ctx) {
        Ok(v) => v,
        Err(reason) => {
            maps::count(reason);
            // recvmsg/getpeername hooks must return 1; the address stays.
            sock::SOCK_ALLOW
        }
    }
}

/// The device cgroup of a container that is not privileged (the kubelet
/// attaches it to the container's cgroup): runc's default allow list.
#[cgroup_device]
pub fn rt_dev(ctx: DeviceContext) -> i32 {
    device::judge(&ctx)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

// bpf_redirect_peer and friends are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
