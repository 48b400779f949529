//! What XDP on a veth needs from the rest of the path, for the tests and
//! benchmarks that run `rt_xdp_net` on veth uplinks (`ebpf/README.md`,
//! "Turning XDP on safely"):
//!
//! - [`attach_pass`]: a two-instruction `XDP_PASS` program, natively as a
//!   bpf_link, on the far end of a veth whose other end sends with
//!   `XDP_TX`. `XDP_TX` on a veth puts the frame on the peer's receive
//!   ring (`veth_xdp_xmit`); the sender's flush (`veth_xdp_flush`)
//!   schedules the peer's NAPI only when the peer runs an XDP program, so
//!   without one the first 256 frames (the ring) go out and every later
//!   `XDP_TX` fails (GRO on the peer turns NAPI on but does not help).
//!   Raw `bpf(2)`: two instructions need no object file.
//! - [`tx_checksum_off`]: full checksums from a namespace's sockets. A
//!   veth passes a local socket's packet with only the pseudo-header sum
//!   in its checksum field (CHECKSUM_PARTIAL, completed by whoever really
//!   transmits it); an XDP program sees bytes only, and the frame it sends
//!   with `XDP_TX` leaves as a new buffer whose partial sum is taken as
//!   complete: measured, every datagram XDP forwarded counted as
//!   `UdpInCsumErrors` at the receiver. Without checksum offload on the
//!   device the kernel completes the sum in software before sending
//!   (`skb_csum_hwoffload_help`), also for packets it forwards (a node's
//!   pods); traffic from a physical network always carries full sums.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// `struct bpf_insn` as the kernel reads it.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 32]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed;
    // every pointer in it outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u64; 32]>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = XDP_PASS; exit` and attaches it natively to `ifname` of the
/// calling thread's namespace. The link detaches when the returned
/// descriptor is closed or the device goes.
pub fn attach_pass(ifname: &str) -> std::io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u64 = 6;
    const BPF_XDP: u64 = 37;
    const XDP_FLAGS_DRV_MODE: u64 = 1 << 2;
    let insns = [
        // mov64 r0, XDP_PASS (2)
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 2,
        },
        // exit
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut attr = [0u64; 32];
    // prog_type, insn_cnt; insns; license; (log: none); expected_attach_type
    // at byte 68 (the high half of word 8).
    attr[0] = BPF_PROG_TYPE_XDP | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[8] = BPF_XDP << 32;
    let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut attr = [0u64; 32];
    // prog_fd, target_ifindex; attach_type, flags.
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    attr[1] = BPF_XDP | (XDP_FLAGS_DRV_MODE << 32);
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// `ethtool -K <dev> tx off` in namespace `ns` (see the module docs).
pub fn tx_checksum_off(ns: &str, dev: &str) -> std::io::Result<()> {
    let out = crate::netns::try_command(ns, "ethtool")?
        .args(["-K", dev, "tx", "off"])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ethtool -K {dev} tx off in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
