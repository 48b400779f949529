//! The packet generator and the counters the rate is read from.
//!
//! The generator is a raw `AF_PACKET` socket in the outside namespace
//! sending ready-made Ethernet frames with `sendmmsg` (64 per call) and
//! `PACKET_QDISC_BYPASS` (straight to the veth's `ndo_start_xmit`, as
//! pktgen and trafgen do): small UDP datagrams, one per flow of a fixed
//! set, so after the first round every packet belongs to an established
//! flow and the rate measures forwarding, not flow setup. It stops at a
//! packet count or a deadline, whichever comes first, and runs on one CPU:
//! the veth hands each frame to its peer on the sending CPU, and the
//! bridge, node 1, node 2 and the pod's veth process it there in softirq,
//! so one core carries the whole path and the rate is that core's.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

fn checksum(data: &[u8], seed: u32) -> u16 {
    let mut sum = seed;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 60-byte Ethernet frame (64 on the wire with the FCS): UDP with 18
/// bytes of payload, checksums valid.
pub fn udp_frame(macs: ([u8; 6], [u8; 6]), src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    const PAYLOAD: usize = 18;
    let udp_len = 8 + PAYLOAD;
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&macs.1);
    f.extend_from_slice(&macs.0);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    iph[6] = 0x40; // DF
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&src.0.octets());
    iph[16..20].copy_from_slice(&dst.0.octets());
    let c = checksum(&iph, 0);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    let mut udp = vec![0u8; udp_len];
    udp[0..2].copy_from_slice(&src.1.to_be_bytes());
    udp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    for (i, b) in udp[8..].iter_mut().enumerate() {
        *b = b'a' + i as u8;
    }
    // Pseudo-header: addresses, protocol, UDP length.
    let mut pseudo = 0u32;
    for w in [src.0.octets(), dst.0.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 17 + udp_len as u32;
    let c = match checksum(&udp, pseudo) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// What one generator run did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is checked against the set's size by the macro's caller
    // contract: callers pass an index below the machine's CPU count.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Sends `frames` round-robin out of `ifname` of the calling thread's
/// namespace until `max_packets` went out or `max_time` passed, from CPU
/// `cpu`.
pub fn send(
    ifname: &str,
    frames: &[Vec<u8>],
    max_packets: u64,
    max_time: Duration,
    cpu: Option<usize>,
) -> Result<Sent> {
    if let Some(c) = cpu {
        pin(c)?;
    }
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}");
    }
    // Protocol 0: this socket only sends, it never sees received frames.
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
    }
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
    }
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr().cast_mut().cast(),
            iov_len: f.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; zero is a valid start.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut packets = 0u64;
    while packets < max_packets && start.elapsed() < max_time {
        let want = (max_packets - packets).min(msgs.len() as u64) as u32;
        // SAFETY: `msgs` points at `iovs`, which point at `frames`; all
        // outlive the call.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), want, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The device's queue is full for a moment: try again.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(e).context("sendmmsg"),
            }
        }
        packets += n as u64;
    }
    Ok(Sent {
        packets,
        elapsed: start.elapsed(),
    })
}

/// UDP datagrams that reached the UDP layer of the calling thread's
/// namespace with a valid checksum (`InDatagrams + NoPorts`: queued to a
/// socket, or for a port nobody listens on; both are counted after the
/// checksum check) and those with a bad one (`InCsumErrors`).
pub fn udp_received() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
        .context("reading /proc/thread-self/net/snmp")?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (
        udp.next().context("Udp header")?,
        udp.next().context("Udp values")?,
    );
    let get = |want: &str| -> Result<u64> {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == want)
            .with_context(|| format!("Udp {want}"))?
            .1
            .parse()
            .with_context(|| format!("Udp {want} value"))
    };
    Ok((get("InDatagrams")? + get("NoPorts")?, get("InCsumErrors")?))
}

/// `/proc/stat`'s CPU lines: name (`cpu` for the sum, `cpuN`) and the
/// first seven columns (user nice system idle iowait irq softirq) in
/// seconds.
fn cpu_stat() -> Result<Vec<(String, [f64; 7])>> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("cpu")) {
        let mut f = line.split_whitespace();
        let name = f.next().unwrap_or_default().to_owned();
        let mut cols = [0.0; 7];
        for c in &mut cols {
            *c = f.next().context("/proc/stat column")?.parse::<f64>()? / hz;
        }
        out.push((name, cols));
    }
    Ok(out)
}

/// Time spent in softirq so far, summed over every CPU, and per CPU
/// (`/proc/stat`, in seconds).
pub fn softirq_seconds() -> Result<(f64, Vec<f64>)> {
    let mut all = 0.0;
    let mut per_cpu = Vec::new();
    for (name, cols) in cpu_stat()? {
        if name == "cpu" {
            all = cols[6];
        } else {
            per_cpu.push(cols[6]);
        }
    }
    Ok((all, per_cpu))
}

/// System and softirq time of `cpu` so far (`/proc/stat`, in seconds).
pub fn cpu_times(cpu: usize) -> Result<(f64, f64)> {
    let name = format!("cpu{cpu}");
    let (_, cols) = cpu_stat()?
        .into_iter()
        .find(|(n, _)| *n == name)
        .with_context(|| format!("{name} in /proc/stat"))?;
    Ok((cols[2], cols[6]))
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
