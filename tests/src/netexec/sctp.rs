//! SCTP probes without an SCTP stack. The lab's kernel has no SCTP (not
//! built in, and no modules), but a raw `IPPROTO_SCTP` socket still sends
//! SCTP packets and receives every one that arrives: `ip_protocol_deliver_rcu`
//! hands them to raw sockets first and answers protocol-unreachable only
//! when no raw socket took them. The datapath judges SCTP on its ports, as
//! NetworkPolicy does, so a request in one DATA chunk and its answer take
//! the same path through policy and conntrack as an association's packets.
//!
//! The server answers a DATA chunk `hostname` sent to its port with its
//! hostname, from that port, echoing the verification tag; the client sends
//! from a fresh random port per attempt (a new flow) and waits for the
//! answer to that port. Both compute the CRC32c a real peer would check.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const IPPROTO_SCTP: libc::c_int = 132;
const CHUNK_DATA: u8 = 0;
/// DATA chunk flags: the whole user message (B and E bits).
const DATA_UNFRAGMENTED: u8 = 0x03;
const COMMON_HEADER: usize = 12;
const DATA_HEADER: usize = 16;

/// One SCTP packet carrying one DATA chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub sport: u16,
    pub dport: u16,
    pub vtag: u32,
    pub payload: Vec<u8>,
}

impl Packet {
    /// The SCTP packet (common header, DATA chunk padded to 4 bytes) with
    /// its CRC32c, stored as Linux stores it (`sctp_end_cksum`: little
    /// endian).
    pub fn encode(&self) -> Vec<u8> {
        let chunk_len = DATA_HEADER + self.payload.len();
        let mut b = Vec::with_capacity(COMMON_HEADER + chunk_len.next_multiple_of(4));
        b.extend_from_slice(&self.sport.to_be_bytes());
        b.extend_from_slice(&self.dport.to_be_bytes());
        b.extend_from_slice(&self.vtag.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        b.push(CHUNK_DATA);
        b.push(DATA_UNFRAGMENTED);
        b.extend_from_slice(&u16::try_from(chunk_len).unwrap_or(u16::MAX).to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes()); // TSN
        b.extend_from_slice(&[0; 4]); // stream id, stream sequence
        b.extend_from_slice(&[0; 4]); // payload protocol id
        b.extend_from_slice(&self.payload);
        b.resize(COMMON_HEADER + chunk_len.next_multiple_of(4), 0);
        let sum = crc32c(&b);
        b[8..12].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The packet in `ip` (an IPv4 packet as a raw socket returns it), with
    /// its source address; `None` for anything else (another chunk type, a
    /// bad checksum, a truncated packet).
    pub fn decode(ip: &[u8]) -> Option<(Ipv4Addr, Packet)> {
        let ihl = usize::from(*ip.first()? & 0x0f) * 4;
        let src = Ipv4Addr::new(*ip.get(12)?, *ip.get(13)?, *ip.get(14)?, *ip.get(15)?);
        let s = ip.get(ihl..)?;
        if s.len() < COMMON_HEADER + DATA_HEADER {
            return None;
        }
        let mut zeroed = s.to_vec();
        zeroed[8..12].copy_from_slice(&[0; 4]);
        if crc32c(&zeroed).to_le_bytes() != s[8..12] || s[12] != CHUNK_DATA {
            return None;
        }
        let chunk_len = usize::from(u16::from_be_bytes([s[14], s[15]]));
        let payload = s
            .get(COMMON_HEADER + DATA_HEADER..COMMON_HEADER + chunk_len)?
            .to_vec();
        Some((
            src,
            Packet {
                sport: u16::from_be_bytes([s[0], s[1]]),
                dport: u16::from_be_bytes([s[2], s[3]]),
                vtag: u32::from_be_bytes([s[4], s[5], s[6], s[7]]),
                payload,
            },
        ))
    }
}

/// CRC32c (Castagnoli, reflected), as SCTP's checksum (RFC 9260 appendix A).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A raw SCTP socket that waits at most `poll` per receive.
fn raw_socket(poll: Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(poll.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(poll.subsec_micros()),
    };
    // SAFETY: `tv` is a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn send(fd: &OwnedFd, to: Ipv4Addr, pkt: &Packet) -> io::Result<()> {
    let bytes = pkt.encode();
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `bytes` and `addr` outlive the call; the lengths are theirs.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(0),
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The next SCTP packet, or `None` when the receive timeout passed first.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(Ipv4Addr, Packet)>> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(None)
            }
            _ => Err(e),
        };
    }
    Ok(Packet::decode(&buf[..usize::try_from(n).unwrap_or(0)]))
}

/// A server answering `hostname` requests to its port. Its socket belongs
/// to the network namespace it was made in, whichever thread runs it.
pub struct Server {
    fd: OwnedFd,
    port: u16,
}

impl Server {
    pub fn new(port: u16) -> Result<Self> {
        let fd =
            raw_socket(Duration::from_secs(1)).context("raw SCTP socket (needs CAP_NET_RAW)")?;
        Ok(Self { fd, port })
    }

    /// Answers forever (blocking; run it on a thread of its own).
    pub fn run(self, hostname: &str) -> Result<()> {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Some((from, req)) = recv(&self.fd, &mut buf)? else {
                continue;
            };
            if req.dport != self.port || req.payload != b"hostname" {
                continue;
            }
            let answer = Packet {
                sport: self.port,
                dport: req.sport,
                vtag: req.vtag,
                payload: hostname.as_bytes().to_vec(),
            };
            if let Err(e) = send(&self.fd, from, &answer) {
                eprintln!("sctp: answering {from}:{}: {e}", req.sport);
            }
        }
    }
}

/// Asks the SCTP server at `target` for its hostname from a fresh port;
/// fails when no answer came within `timeout`.
pub fn dial(target: SocketAddrV4, timeout: Duration) -> Result<String> {
    let fd =
        raw_socket(Duration::from_millis(50)).context("raw SCTP socket (needs CAP_NET_RAW)")?;
    let (sport, vtag) = fresh_port_and_tag();
    let req = Packet {
        sport,
        dport: target.port(),
        vtag,
        payload: b"hostname".to_vec(),
    };
    send(&fd, *target.ip(), &req).context("send")?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65_535];
    while Instant::now() < deadline {
        if let Some((from, p)) = recv(&fd, &mut buf)?
            && from == *target.ip()
            && p.sport == target.port()
            && p.dport == sport
            && p.vtag == vtag
        {
            return Ok(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    bail!("timed out")
}

/// A source port in the ephemeral range and a verification tag, different
/// per call (and per process).
fn fresh_port_and_tag() -> (u16, u32) {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let r = h.finish();
    let port = 32_768 + u16::try_from(r % 28_232).unwrap_or(0);
    (port, u32::try_from(r >> 32).unwrap_or(1) | 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_rfc_3720_check_value() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_packet_survives_encoding_and_a_bad_sum_is_refused() {
        let p = Packet {
            sport: 40_000,
            dport: 80,
            vtag: 7,
            payload: b"hostname".to_vec(),
        };
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 10, 42, 0, 5, 10, 42, 1, 6,
        ];
        ip.extend_from_slice(&p.encode());
        assert_eq!(Packet::decode(&ip), Some((Ipv4Addr::new(10, 42, 0, 5), p)));
        let last = ip.len() - 1;
        ip[last - 4] ^= 1;
        assert_eq!(Packet::decode(&ip), None);
    }

    /// A server and a client in a network namespace of their own (this
    /// thread's): the answer comes from the port asked, another port gets
    /// none.
    #[test]
    fn a_server_answers_its_port_only() {
        if !riptide_test_support::privileged("for a network namespace and raw sockets") {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare(2) moves only this thread to a new netns.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "{}",
                io::Error::last_os_error()
            );
            // A child forked by this thread starts in its namespace.
            assert!(
                std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .unwrap()
                    .success()
            );
            let server = Server::new(80).unwrap();
            std::thread::spawn(move || server.run("pod-x"));
            let lo = Ipv4Addr::LOCALHOST;
            assert_eq!(
                dial(SocketAddrV4::new(lo, 80), Duration::from_secs(2)).unwrap(),
                "pod-x"
            );
            assert!(dial(SocketAddrV4::new(lo, 81), Duration::from_millis(300)).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn fresh_ports_are_ephemeral_and_differ() {
        let a = fresh_port_and_tag();
        let b = fresh_port_and_tag();
        assert!(a.0 >= 32_768 && b.0 >= 32_768);
        assert_ne!(a, b);
    }
}
