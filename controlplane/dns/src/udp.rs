//! DNS over UDP: one thread per core, each blocking on its own socket
//! (`SO_REUSEPORT` when there are several, so the kernel spreads clients
//! over them) for a batch of datagrams ([`crate::batch`]), answering each
//! in place: from the answer cache
//! ([`crate::cache`]) when it can, else through hickory's full request
//! path ([`Request::from_bytes`], [`Handler::decide`]), whose index answers
//! then fill the cache. Only questions that wait on upstream resolvers
//! become tokio tasks, which send their answer themselves.
//!
//! hickory-server's own UDP serving spawns a task per datagram and hands
//! every response through a channel to the socket's task; at the rates a
//! cluster DNS sees, that overhead, not the answer, is most of the cost.
//! hickory-server still serves TCP.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use hickory_server::{
    net::xfer::Protocol,
    proto::{
        op::{Header, MessageType, ResponseCode},
        rr::RecordType,
        serialize::binary::{BinDecodable as _, BinDecoder},
    },
    server::Request,
    zone_handler::{MessageResponseBuilder, Queries},
};

use crate::{
    batch::Batch,
    cache::{self, AnswerCache, Entry},
    handler::{Decision, Handler, encode_udp, qtype},
};

/// Largest datagram read, as hickory-server reads them.
const RECV_BUFFER: usize = 4096;
/// How often an idle worker looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(250);

/// A response that waits on upstream resolvers: the datagram to send.
pub type Later = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// What became of one datagram.
pub enum Served {
    /// The response is in the output buffer.
    Now,
    /// Nothing to send: not a request hickory would answer.
    Dropped,
    /// The response comes from this future.
    Later(Later),
}

/// The state every UDP worker shares.
pub struct Udp {
    handler: Arc<Handler>,
    cache: Mutex<AnswerCache>,
}

impl Udp {
    pub fn new(handler: Arc<Handler>, cache_capacity: usize) -> Self {
        Self { handler, cache: Mutex::new(AnswerCache::new(cache_capacity)) }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, AnswerCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers `datagram` from `src`; [`Served::Now`] leaves the response
    /// in `out`.
    pub fn serve(&self, datagram: &[u8], src: SocketAddr, out: &mut Vec<u8>) -> Served {
        let start = Instant::now();
        let metrics = self.handler.metrics();
        let key = cache::key(datagram);
        if let Some(key) = key {
            let serial = self.handler.serial();
            let cache = self.cache();
            if let Some(hit) = cache.get(key, serial) {
                hit.write([datagram[0], datagram[1]], out);
                hit.requests.inc();
                drop(cache);
                metrics.answer_cache_hits.inc();
                metrics.duration.observe(start.elapsed().as_secs_f64());
                return Served::Now;
            }
            drop(cache);
            metrics.answer_cache_misses.inc();
        }

        // hickory-server's request path: no answer to what has no header
        // or is a response, FORMERR to what does not decode.
        // Unlike hickory-server, no FORMERR to a response either: that
        // would answer reflected traffic.
        let Ok(header) = Header::read(&mut BinDecoder::new(datagram)) else { return Served::Dropped };
        if header.metadata.message_type == MessageType::Response {
            return Served::Dropped;
        }
        let request = match Request::from_bytes(datagram.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%src, error = %e, "undecodable request: FORMERR");
                let Ok(none) = Queries::read(&mut BinDecoder::new(&[]), 0) else { return Served::Dropped };
                let response = MessageResponseBuilder::new(&none, None).error_msg(&header.metadata, ResponseCode::FormErr);
                encode_udp(response, header.metadata.id, 512, out);
                metrics.observe(RecordType::ZERO, ResponseCode::FormErr, start.elapsed());
                return Served::Now;
            }
        };
        match self.handler.decide(&request) {
            Decision::Now { response, serial } => {
                response.encode_udp(&request, out);
                self.handler.observe(&request, response.rcode(), start);
                if let Some(key) = key {
                    let entry = Entry::new(out, metrics.requests(qtype(&request), response.rcode()));
                    let current = self.handler.serial();
                    self.cache().insert(key, entry, serial, current);
                }
                Served::Now
            }
            Decision::Later(pending) => {
                let handler = self.handler.clone();
                Served::Later(Box::pin(async move {
                    let response = handler.resolve(pending).await;
                    let mut out = Vec::new();
                    response.encode_udp(&request, &mut out);
                    handler.observe(&request, response.rcode(), start);
                    out
                }))
            }
        }
    }
}

/// Binds `workers` UDP sockets to `addr` (the first one's port for all
/// when `addr` asks for any port).
pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers.max(1) {
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        if workers > 1 {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        let s: UdpSocket = s.into();
        addr = s.local_addr()?;
        s.set_read_timeout(Some(STOP_POLL))?;
        sockets.push(s);
    }
    Ok(sockets)
}

/// One thread per socket until `stop` is set; futures of answers that wait
/// on upstreams run on `runtime`.
pub fn spawn(udp: &Arc<Udp>, sockets: Vec<UdpSocket>, runtime: &tokio::runtime::Handle, stop: &Arc<AtomicBool>) -> io::Result<Vec<JoinHandle<()>>> {
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, socket)| {
            let (udp, runtime, stop) = (udp.clone(), runtime.clone(), stop.clone());
            std::thread::Builder::new().name(format!("dns-udp-{i}")).spawn(move || worker(&udp, &Arc::new(socket), &runtime, &stop))
        })
        .collect()
}

fn worker(udp: &Udp, socket: &Arc<UdpSocket>, runtime: &tokio::runtime::Handle, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new(RECV_BUFFER);
    while !stop.load(Ordering::Relaxed) {
        let n = match batch.recv(fd) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                // ICMP errors of earlier sends surface here; the socket
                // stays usable.
                tracing::debug!(error = %e, "receiving UDP requests");
                continue;
            }
        };
        for i in 0..n {
            let Some((datagram, src, out)) = batch.slot(i) else { continue };
            if !sane_source(src) {
                continue;
            }
            match udp.serve(datagram, src, out) {
                Served::Now => batch.queue(i),
                Served::Dropped => {}
                Served::Later(answer) => {
                    let socket = socket.clone();
                    runtime.spawn(async move { send(&socket, &answer.await, src) });
                }
            }
        }
        batch.send(fd);
    }
}

fn send(socket: &UdpSocket, datagram: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(datagram, to) {
        tracing::debug!(%to, error = %e, "sending a UDP response");
    }
}

/// Whether a response to `src` can go anywhere (hickory-server's check):
/// not port 0, not an unspecified or broadcast address.
fn sane_source(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}
