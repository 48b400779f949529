//! Packet parsing: the IPv4 5-tuple and header offsets the LB needs.
//!
//! Direct packet access: the headers are made linear once
//! (`bpf_skb_pull_data`, a no-op when they already are) and read through
//! bounds-checked pointers, never with `bpf_skb_load_bytes`. The header
//! structs below use naturally aligned integer fields so LLVM emits one
//! load per field: the IPv4 header sits at a 4-byte aligned address (the
//! kernel reserves NET_IP_ALIGN for exactly that), and x86/arm64 accept
//! unaligned packet loads anyway (the verifier only enforces alignment with
//! BPF_F_STRICT_ALIGNMENT). Byte-array headers (network-types) compile to a
//! load per byte, which was a third of the per-packet cost.
//!
//! Addresses and ports stay in network order (`_be`), exactly as the map
//! keys written by user space.
//!
//! The direct-access part ([`Frame`], [`ptr_at`], [`headers`]) serves tc's
//! skbs and XDP's buffers alike; only tc pulls non-linear data and reads
//! ports behind IP options through the helper.

use aya_ebpf::programs::{TcContext, XdpContext};
use riptide_common::{proto, stats};

/// A packet the programs read and write in place: a tc skb or an XDP
/// buffer.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The device the packet arrived on (or leaves through, for egress).
    fn ifindex(&self) -> u32;
    /// The context pointer helpers such as `bpf_fib_lookup` take.
    fn raw(&self) -> *mut core::ffi::c_void;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the program was given.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut core::ffi::c_void {
        self.skb.skb.cast()
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context the program was given.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut core::ffi::c_void {
        self.ctx.cast()
    }
}

pub const ETH_LEN: usize = 14;
pub const IP_OFF: usize = ETH_LEN;
/// L4 offset without IP options (IHL 5), the case every fast path handles.
pub const L4_OFF: usize = IP_OFF + 20;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// The IPv4 header, fields in network order.
#[repr(C)]
pub struct IpHdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The first 4 bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub source: u16,
    pub dest: u16,
}

/// What the LB knows about one IPv4 packet.
#[derive(Clone, Copy)]
pub struct Pkt {
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// 0 for protocols without ports.
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub ttl: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// Non-first fragment or more-fragments set: no (complete) L4 header.
    pub fragment: bool,
    /// Offset of the L4 header ([`L4_OFF`] unless the packet has IP options).
    pub l4_off: usize,
    /// Total IPv4 length from the header.
    pub tot_len: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Pkt {
    /// Offset of the L4 checksum, for protocols that carry one in a fixed place.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        match self.proto {
            proto::TCP => Some(self.l4_off + 16),
            proto::UDP => Some(self.l4_off + 6),
            proto::ICMP => Some(self.l4_off + 2),
            _ => None,
        }
    }

    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        (self.proto == proto::TCP || self.proto == proto::UDP) && !self.fragment
    }
}

/// Bytes the parser wants in the linear area: Ethernet, IPv4 without
/// options and the TCP header up to its flags.
const LINEAR: usize = ETH_LEN + 20 + 14;

/// A bounds-checked pointer to a `T` at `off` in the linear area. Callers
/// re-derive pointers after any helper that may move packet data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The start of the packet when its first `len` bytes are linear: every
/// pointer derived from it below `len` is one the verifier accepts.
#[inline(always)]
pub fn linear(ctx: &impl Frame, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start)
}

/// Parses an Ethernet/IPv4 frame. `Ok(None)` for anything that is not IPv4.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Pkt>, u32> {
    if ctx.data() + LINEAR > ctx.data_end() {
        // Make the headers linear (GRO'ed or paged frames). A packet shorter
        // than LINEAR cannot be pulled that far: pull all of it.
        let len = (ctx.len() as usize).min(LINEAR) as u32;
        let _ = ctx.pull_data(len);
    }
    let Some(mut p) = headers(ctx)? else {
        return Ok(None);
    };
    if p.l4_off != L4_OFF && (p.proto == proto::TCP || p.proto == proto::UDP) {
        // IP options (rare): a variable offset through the helper keeps
        // the verifier's job simple. Only the first fragment has ports.
        let ip = ptr_at::<IpHdr>(ctx, IP_OFF).ok_or(stats::DROP_MALFORMED)?;
        // SAFETY: bounds checked by ptr_at.
        if u16::from_be(unsafe { (*ip).frag_off }) & 0x1fff != 0 {
            return Ok(Some(p));
        }
        let ports: [u16; 2] = ctx.load(p.l4_off).map_err(|_| stats::DROP_MALFORMED)?;
        p.sport_be = ports[0];
        p.dport_be = ports[1];
        if p.proto == proto::TCP {
            p.tcp_flags = ctx.load(p.l4_off + 13).map_err(|_| stats::DROP_MALFORMED)?;
        }
    }
    Ok(Some(p))
}

/// The Ethernet and IPv4 headers by direct access, and the ports and TCP
/// flags when the header has no options (`l4_off == L4_OFF`; with options
/// they are left 0 for the caller). `Ok(None)` for anything not IPv4.
#[inline(always)]
pub fn headers(ctx: &impl Frame) -> Result<Option<Pkt>, u32> {
    let Some(eth_proto) = ptr_at::<u16>(ctx, 12) else {
        return Ok(None);
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *eth_proto } != ETH_P_IP_BE {
        return Ok(None);
    }
    let ip = ptr_at::<IpHdr>(ctx, IP_OFF).ok_or(stats::DROP_MALFORMED)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || ihl < 20 {
        return Err(stats::DROP_MALFORMED);
    }
    let frag = u16::from_be(ip.frag_off);
    let mut p = Pkt {
        saddr_be: ip.saddr,
        daddr_be: ip.daddr,
        sport_be: 0,
        dport_be: 0,
        proto: ip.proto,
        ttl: ip.ttl,
        tcp_flags: 0,
        // MF flag or a non-zero fragment offset.
        fragment: frag & 0x3fff != 0,
        l4_off: IP_OFF + ihl,
        tot_len: u16::from_be(ip.tot_len),
    };
    // Only the first fragment carries the L4 header; later ones have none.
    if frag & 0x1fff == 0 && ihl == 20 && (p.proto == proto::TCP || p.proto == proto::UDP) {
        let ports = ptr_at::<Ports>(ctx, L4_OFF).ok_or(stats::DROP_MALFORMED)?;
        // SAFETY: bounds checked by ptr_at.
        let ports = unsafe { &*ports };
        p.sport_be = ports.source;
        p.dport_be = ports.dest;
        if p.proto == proto::TCP {
            let flags = ptr_at::<u8>(ctx, L4_OFF + 13).ok_or(stats::DROP_MALFORMED)?;
            // SAFETY: bounds checked by ptr_at.
            p.tcp_flags = unsafe { *flags };
        }
    }
    Ok(Some(p))
}

/// `addr` (network order) is inside `net/len` (network order).
#[inline(always)]
pub fn in_cidr(addr_be: u32, net_be: u32, len: u8) -> bool {
    if len == 0 || len > 32 {
        return false;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    (u32::from_be(addr_be) & mask) == (u32::from_be(net_be) & mask)
}
