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
//!
//! And for measuring one node's forwarding alone (`pps_bench --hop
//! node1`): [`Generator`], packets made by XDP in live-frames mode, which
//! reach a veth's peer as `xdp_frame`s rather than skbs, and [`Sink`], a
//! counting `XDP_DROP` on the first hop after the node.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// `struct bpf_insn` as the kernel reads it.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        }
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 32]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed;
    // every pointer in it outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u64; 32]>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// A `bpf(2)` command that returns a new descriptor.
fn bpf(cmd: libc::c_long, attr: &mut [u64; 32]) -> std::io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u64 = 6;
const BPF_XDP: u64 = 37;
const XDP_FLAGS_DRV_MODE: u64 = 1 << 2;

/// Loads an XDP program; on a verifier error the message carries its log.
fn load_xdp(insns: &[Insn]) -> std::io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u64; 32];
    // prog_type, insn_cnt; insns; license; (log: none); expected_attach_type
    // at byte 68 (the high half of word 8).
    attr[0] = BPF_PROG_TYPE_XDP | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[8] = BPF_XDP << 32;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            let mut log = vec![0u8; 64 * 1024];
            // log_level 1, log_size; log_buf.
            attr[3] = 1 | ((log.len() as u64) << 32);
            attr[4] = log.as_mut_ptr() as u64;
            let again = bpf(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            again.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "loading an XDP program: {e}: {}",
                        String::from_utf8_lossy(&log[..end])
                    ),
                )
            })
        }
        Err(e) => Err(e),
    }
}

fn ifindex(ifname: &str) -> std::io::Result<u32> {
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ifindex)
}

/// Attaches `prog` natively to `ifname` of the calling thread's namespace
/// as a bpf_link.
fn link_native(prog: &OwnedFd, ifname: &str) -> std::io::Result<OwnedFd> {
    let ifindex = ifindex(ifname)?;
    let mut attr = [0u64; 32];
    // prog_fd, target_ifindex; attach_type, flags.
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    attr[1] = BPF_XDP | (XDP_FLAGS_DRV_MODE << 32);
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// Loads `r0 = XDP_PASS; exit` and attaches it natively to `ifname` of the
/// calling thread's namespace. The link detaches when the returned
/// descriptor is closed or the device goes.
pub fn attach_pass(ifname: &str) -> std::io::Result<OwnedFd> {
    attach_verdict(ifname, 2)
}

/// Loads `r0 = XDP_TX; exit` and attaches it like [`attach_pass`]: every
/// frame goes back out unchanged, the least a forwarding node can do (a
/// benchmark's floor).
pub fn attach_tx(ifname: &str) -> std::io::Result<OwnedFd> {
    attach_verdict(ifname, 3)
}

fn attach_verdict(ifname: &str, verdict: i32) -> std::io::Result<OwnedFd> {
    let insns = [
        // mov64 r0, verdict
        Insn::new(0xb7, 0, 0, 0, verdict),
        // exit
        Insn::new(0x95, 0, 0, 0, 0),
    ];
    let prog = load_xdp(&insns)?;
    link_native(&prog, ifname)
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

/// Counters of [`Sink`]: what reached it, by the addresses it carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkCounts {
    /// IPv4 UDP to `dst` from the first expected source.
    pub from_first: u64,
    /// IPv4 UDP to `dst` from the second expected source.
    pub from_second: u64,
    /// Anything else (another address, protocol or Ethernet type).
    pub other: u64,
}

/// An XDP program that drops everything a veth receives and counts it in a
/// per-CPU array by what it carries: the first hop after a node under
/// measurement, so a forwarding rate is counted where the packets leave
/// the node and nothing after it costs CPU. Frames sent into the veth with
/// `XDP_TX` or a redirect arrive as `xdp_frame`s (its XDP program also
/// gives the veth the NAPI that takes them), forwarded skbs arrive as
/// skbs; both are dropped where XDP runs. Detached when dropped.
pub struct Sink {
    map: OwnedFd,
    _link: OwnedFd,
}

/// The number of possible CPUs: the per-CPU value array's length.
fn possible_cpus() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let last = text
        .trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
        .max()
        .ok_or_else(|| std::io::Error::other(format!("cpu/possible: {text:?}")))?;
    Ok(last + 1)
}

impl Sink {
    /// Attaches the sink natively to `ifname` of the calling thread's
    /// namespace, counting UDP to `dst` from `src[0]` and from `src[1]`
    /// apart from everything else.
    pub fn attach(ifname: &str, dst: Ipv4Addr, src: [Ipv4Addr; 2]) -> std::io::Result<Self> {
        const PERCPU_ARRAY: u64 = 6;
        let mut attr = [0u64; 32];
        // map_type, key_size; value_size, max_entries.
        attr[0] = PERCPU_ARRAY | (4 << 32);
        attr[1] = 8 | (3 << 32);
        let map = bpf(BPF_MAP_CREATE, &mut attr)?;
        // The addresses as a 32-bit load from the packet sees them.
        let le = |a: Ipv4Addr| i32::from_le_bytes(a.octets());
        let insns = [
            Insn::new(0xbf, 6, 1, 0, 0),               // 0: r6 = ctx
            Insn::new(0xb7, 8, 0, 0, 2),               // 1: key = other
            Insn::new(0x61, 2, 6, 0, 0),               // 2: r2 = data
            Insn::new(0x61, 3, 6, 4, 0),               // 3: r3 = data_end
            Insn::new(0xbf, 4, 2, 0, 0),               // 4: r4 = data
            Insn::new(0x07, 4, 0, 0, 34),              // 5: r4 += Ethernet + IPv4
            Insn::new(0x2d, 4, 3, 12, 0),              // 6: short → count
            Insn::new(0x69, 5, 2, 12, 0),              // 7: Ethernet type
            Insn::new(0x56, 5, 0, 10, 0x0008),         // 8: not IPv4 → count
            Insn::new(0x71, 5, 2, 23, 0),              // 9: protocol
            Insn::new(0x56, 5, 0, 8, 17),              // 10: not UDP → count
            Insn::new(0x61, 5, 2, 30, 0),              // 11: destination
            Insn::new(0x56, 5, 0, 6, le(dst)),         // 12: not dst → count
            Insn::new(0x61, 5, 2, 26, 0),              // 13: source
            Insn::new(0xb7, 8, 0, 0, 0),               // 14
            Insn::new(0x16, 5, 0, 3, le(src[0])),      // 15: first → count
            Insn::new(0xb7, 8, 0, 0, 1),               // 16
            Insn::new(0x16, 5, 0, 1, le(src[1])),      // 17: second → count
            Insn::new(0xb7, 8, 0, 0, 2),               // 18
            Insn::new(0x63, 10, 8, -4, 0),             // 19: count: *(u32 *)(fp - 4) = key
            Insn::new(0x18, 1, 1, 0, map.as_raw_fd()), // 20: r1 = map (pseudo fd)
            Insn::new(0, 0, 0, 0, 0),                  // 21
            Insn::new(0xbf, 2, 10, 0, 0),              // 22: r2 = fp
            Insn::new(0x07, 2, 0, 0, -4),              // 23: r2 -= 4
            Insn::new(0x85, 0, 0, 0, 1),               // 24: bpf_map_lookup_elem
            Insn::new(0x15, 0, 0, 3, 0),               // 25: NULL → drop
            Insn::new(0x79, 1, 0, 0, 0),               // 26: per-CPU: no atomics needed
            Insn::new(0x07, 1, 0, 0, 1),               // 27
            Insn::new(0x7b, 0, 1, 0, 0),               // 28
            Insn::new(0xb7, 0, 0, 0, 1),               // 29: XDP_DROP
            Insn::new(0x95, 0, 0, 0, 0),               // 30
        ];
        let prog = load_xdp(&insns)?;
        let link = link_native(&prog, ifname)?;
        Ok(Self { map, _link: link })
    }

    /// The counters so far, summed over CPUs.
    pub fn counts(&self) -> std::io::Result<SinkCounts> {
        let cpus = possible_cpus()?;
        let mut sums = [0u64; 3];
        for (key, sum) in (0u32..).zip(sums.iter_mut()) {
            let mut values = vec![0u64; cpus];
            let mut attr = [0u64; 32];
            // map_fd; key; value; flags.
            attr[0] = self.map.as_raw_fd() as u64;
            attr[1] = (&raw const key) as u64;
            attr[2] = values.as_mut_ptr() as u64;
            sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
            *sum = values.iter().sum();
        }
        Ok(SinkCounts {
            from_first: sums[0],
            from_second: sums[1],
            other: sums[2],
        })
    }
}

/// A packet generator without skbs, as the kernel's `xdp-trafficgen`: an
/// XDP program run with `BPF_PROG_TEST_RUN` in live-frames mode
/// (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18) that writes a prepared
/// Ethernet/IPv4/UDP header into each frame and redirects it
/// (`bpf_redirect`) to a device of the caller's namespace. A veth takes
/// such frames as `xdp_frame`s (`veth_ndo_xdp_xmit`) onto its peer's ring
/// and the peer's NAPI runs them on the same CPU, when the peer has NAPI
/// (an XDP program, or GRO on).
///
/// The kernel keeps the test run's pages in a page pool and copies the
/// template into a page only when the pool first hands it out, so a frame
/// that a later hop rewrote in place (NAT, MACs, TTL) comes back rewritten:
/// the program therefore writes the first 44 bytes (Ethernet, IPv4, UDP
/// and two payload bytes) from the template every time. It picks one of
/// `flows` source ports (`bpf_get_prandom_u32`) and takes the difference
/// from the first payload word, so the UDP checksum stays valid.
pub struct Generator {
    prog: OwnedFd,
    template: Vec<u8>,
}

/// Bytes of the template the generator writes into every frame.
const GEN_HEADER: usize = 44;

impl Generator {
    /// `template`: an untagged Ethernet frame, IPv4 without options, UDP,
    /// at least two payload bytes whose big-endian value is ≥ `flows` − 1;
    /// `flows`: a power of two ≤ 256, source ports from the template's
    /// upward; `ifindex`: the device to send to, in the namespace of the
    /// thread that calls [`Generator::run`].
    pub fn new(template: &[u8], flows: u16, ifindex: u32) -> std::io::Result<Self> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_owned());
        if template.len() < GEN_HEADER + 2
            || template[12..14] != [0x08, 0x00]
            || template[14] != 0x45
            || template[23] != 17
        {
            return Err(bad(
                "template: Ethernet, IPv4 without options, UDP, a payload",
            ));
        }
        if !flows.is_power_of_two() || flows > 256 {
            return Err(bad("flows: a power of two up to 256"));
        }
        let sport = u16::from_be_bytes([template[34], template[35]]);
        let word = u16::from_be_bytes([template[42], template[43]]);
        if word < flows - 1 || u32::from(sport) + u32::from(flows) > 0xffff {
            return Err(bad(
                "template: the first payload word below the flow count, or ports overflow",
            ));
        }
        let ifindex = i32::try_from(ifindex).map_err(|_| bad("ifindex"))?;
        let mut insns = vec![
            Insn::new(0xbf, 6, 1, 0, 0), // r6 = ctx
            Insn::new(0x85, 0, 0, 0, 7), // bpf_get_prandom_u32
            Insn::new(0xbf, 7, 0, 0, 0), // r7 = flow
            Insn::new(0x57, 7, 0, 0, i32::from(flows - 1)),
            Insn::new(0x61, 2, 6, 0, 0), // r2 = data
            Insn::new(0x61, 3, 6, 4, 0), // r3 = data_end
            Insn::new(0xbf, 4, 2, 0, 0),
            Insn::new(0x07, 4, 0, 0, GEN_HEADER as i32),
            // short frame → drop (jump patched below)
            Insn::new(0x2d, 4, 3, 0, 0),
        ];
        let jump = insns.len() - 1;
        for (off, w) in (0i16..)
            .step_by(4)
            .zip(template[..GEN_HEADER].chunks_exact(4))
        {
            let imm = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            insns.push(Insn::new(0x62, 2, 0, off, imm)); // *(u32 *)(data + off) = imm
        }
        insns.extend([
            Insn::new(0xb7, 5, 0, 0, i32::from(sport)),
            Insn::new(0x0f, 5, 7, 0, 0),  // + flow
            Insn::new(0xdc, 5, 0, 0, 16), // to big endian
            Insn::new(0x6b, 2, 5, 34, 0), // source port
            Insn::new(0xb7, 5, 0, 0, i32::from(word)),
            Insn::new(0x1f, 5, 7, 0, 0), // − flow: the checksum's sum stays
            Insn::new(0xdc, 5, 0, 0, 16),
            Insn::new(0x6b, 2, 5, 42, 0),
            Insn::new(0xb7, 1, 0, 0, ifindex),
            Insn::new(0xb7, 2, 0, 0, 0),
            Insn::new(0x85, 0, 0, 0, 23), // bpf_redirect → XDP_REDIRECT
            Insn::new(0x95, 0, 0, 0, 0),
        ]);
        insns[jump].off = (insns.len() - jump - 1) as i16;
        insns.extend([
            Insn::new(0xb7, 0, 0, 0, 1), // XDP_DROP
            Insn::new(0x95, 0, 0, 0, 0),
        ]);
        let prog = load_xdp(&insns)?;
        Ok(Self {
            prog,
            template: template.to_vec(),
        })
    }

    /// Runs the program `repeat` times in live-frames mode, `batch` frames
    /// per redirect flush (the kernel allows up to 256), on the calling
    /// thread's CPU and in its namespace. Returns once every frame went.
    pub fn run(&self, repeat: u32, batch: u32) -> std::io::Result<()> {
        const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
        let mut attr = [0u64; 32];
        // prog_fd, retval; data_size_in, data_size_out; data_in; data_out;
        // repeat, duration; ctx sizes; ctx_in; ctx_out; flags, cpu;
        // batch_size.
        attr[0] = self.prog.as_raw_fd() as u64;
        attr[1] = self.template.len() as u64;
        attr[2] = self.template.as_ptr() as u64;
        attr[4] = u64::from(repeat);
        attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
        attr[9] = u64::from(batch);
        sys_bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
    }
}
