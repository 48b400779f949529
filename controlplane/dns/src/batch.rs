//! Batched UDP I/O: up to [`BATCH`] datagrams received with one
//! `recvmmsg(2)` and their responses sent with one `sendmmsg(2)`. Under
//! load the socket holds many queries at a time; a system call per
//! datagram each way cost riptide-dns about a sixth of its CPU
//! (`docs/bench/dns-*.json`: 157k → 184k queries per CPU second).
//!
//! The headers point into buffers this struct owns on the heap (`Vec`s
//! that never grow), and are re-pointed before every call, so moving the
//! struct is harmless.

use std::{io, mem, net::SocketAddr, os::fd::RawFd, ptr};

use socket2::{SockAddr, SockAddrStorage};

/// Datagrams per system call.
pub const BATCH: usize = 32;

pub struct Batch {
    /// `BATCH` receive buffers of `size` bytes, back to back.
    bufs: Vec<u8>,
    size: usize,
    /// Source addresses, which are also the responses' destinations.
    addrs: Vec<SockAddrStorage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    /// The response to datagram `i`, if it has one now.
    outs: Vec<Vec<u8>>,
    send_iovs: Vec<libc::iovec>,
    send_hdrs: Vec<libc::mmsghdr>,
    /// Responses queued for [`Self::send`].
    queued: usize,
}

fn empty_iov() -> libc::iovec {
    libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 }
}

fn empty_hdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is a plain C struct; all zeroes is an empty header
    // (no name, no buffers, no control data).
    unsafe { mem::zeroed() }
}

impl Batch {
    /// Buffers for datagrams of up to `size` bytes (longer ones are cut).
    pub fn new(size: usize) -> Self {
        Self {
            bufs: vec![0; size * BATCH],
            size,
            addrs: (0..BATCH).map(|_| SockAddrStorage::zeroed()).collect(),
            iovs: vec![empty_iov(); BATCH],
            hdrs: vec![empty_hdr(); BATCH],
            outs: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            send_iovs: vec![empty_iov(); BATCH],
            send_hdrs: vec![empty_hdr(); BATCH],
            queued: 0,
        }
    }

    /// Waits for a datagram on `fd` (up to the socket's receive timeout)
    /// and takes what else is queued, up to [`BATCH`]: how many.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.queued = 0;
        let name_len = libc::socklen_t::try_from(mem::size_of::<SockAddrStorage>()).unwrap_or(libc::socklen_t::MAX);
        for (i, chunk) in self.bufs.chunks_exact_mut(self.size).enumerate() {
            self.iovs[i] = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_hdr.msg_namelen = name_len;
            h.msg_hdr.msg_iov = &raw mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_len = 0;
        }
        // SAFETY: BATCH headers, each pointing at its own live buffer of
        // the length it declares and at an address storage of the size it
        // declares; the kernel writes no further.
        let n = unsafe { libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_WAITFORONE, ptr::null_mut()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Datagram `i` of the last [`Self::recv`], its source, and the buffer
    /// for its response.
    pub fn slot(&mut self, i: usize) -> Option<(&[u8], SocketAddr, &mut Vec<u8>)> {
        let h = self.hdrs.get(i)?;
        let len = usize::try_from(h.msg_len).ok()?.min(self.size);
        // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address
        // into this storage; SockAddrStorage is plain data, so a copy is
        // a valid value.
        let addr = unsafe { SockAddr::new(ptr::read(&raw const self.addrs[i]), h.msg_hdr.msg_namelen) };
        let src = addr.as_socket()?;
        let datagram = self.bufs.get(i * self.size..i * self.size + len)?;
        Some((datagram, src, self.outs.get_mut(i)?))
    }

    /// Queues the response [`Self::slot`] `i` left in its buffer, to its
    /// source.
    pub fn queue(&mut self, i: usize) {
        let q = self.queued;
        let (Some(out), Some(src)) = (self.outs.get_mut(i), self.hdrs.get(i)) else { return };
        let name_len = src.msg_hdr.msg_namelen;
        self.send_iovs[q] = libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() };
        let h = &mut self.send_hdrs[q];
        h.msg_hdr.msg_name = (&raw mut self.addrs[i]).cast();
        h.msg_hdr.msg_namelen = name_len;
        h.msg_hdr.msg_iov = &raw mut self.send_iovs[q];
        h.msg_hdr.msg_iovlen = 1;
        self.queued += 1;
    }

    /// Sends the queued responses; one that cannot be sent is dropped (the
    /// client asks again), the rest still go.
    pub fn send(&mut self, fd: RawFd) {
        let mut sent = 0;
        while sent < self.queued {
            let rest = &mut self.send_hdrs[sent..self.queued];
            // SAFETY: each queued header points at a response buffer and a
            // destination address that live, unchanged, until `recv`.
            let n = unsafe { libc::sendmmsg(fd, rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            match usize::try_from(n) {
                Ok(n) if n > 0 => sent += n,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        tracing::debug!(error = %e, "sending a UDP response");
                        sent += 1;
                    }
                }
            }
        }
        self.queued = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::{net::UdpSocket, os::fd::AsRawFd as _, time::Duration};

    use super::*;

    /// Real loopback sockets: several datagrams in one `recv`, each
    /// answered to its own source in one `send`; a long one is cut.
    #[test]
    fn a_batch_answers_each_datagram_to_its_source() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let clients: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            c.send_to(&vec![b'a' + i as u8; 10 + i * 10], server.local_addr().unwrap()).unwrap();
        }
        let mut b = Batch::new(16);
        let mut got = Vec::new();
        while got.len() < clients.len() {
            let n = b.recv(server.as_raw_fd()).unwrap();
            for i in 0..n {
                let (datagram, src, out) = b.slot(i).unwrap();
                got.push((datagram.to_vec(), src));
                out.clear();
                out.extend_from_slice(b"re:");
                out.extend_from_slice(datagram);
                b.queue(i);
            }
            b.send(server.as_raw_fd());
        }
        for (i, c) in clients.iter().enumerate() {
            let sent = vec![b'a' + i as u8; (10 + i * 10).min(16)];
            assert!(got.contains(&(sent.clone(), c.local_addr().unwrap())), "{got:?}");
            let mut buf = [0u8; 64];
            let n = c.recv(&mut buf).unwrap();
            assert_eq!(buf[..n], [b"re:".as_slice(), &sent].concat());
        }
    }

    #[test]
    fn an_idle_socket_times_out() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let e = Batch::new(16).recv(server.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
