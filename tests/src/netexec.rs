//! An agnhost-netexec-compatible test server, the workhorse of Kubernetes'
//! sig-network e2e tests, so our suites ask the questions those tests ask.
//!
//! HTTP: `/` (timestamp), `/hostname`, `/echo?msg=`, `/clientip` (the peer
//! as `ip:port`, i.e. what the server saw after any NAT), `/healthz`,
//! `/dial?request=&host=&port=&protocol=http|udp&tries=` (JSON
//! `{"responses":[…],"errors":[…]}`, 200 when the last try succeeded, 417
//! otherwise, 400 on bad parameters), `/exit?code=`.
//! UDP: `hostname`, `echo <msg>`, `clientip`.
//! SCTP (optional, raw sockets: [`sctp`]): `hostname`.
//!
//! Also a client for long-lived connections ([`keepalive_client`]): one
//! HTTP/1.1 keep-alive connection, one GET per stdin line, so a test can
//! exchange data over the same connection before, during and after an event
//! (agnhost's tests do this with `/echo` over a persistent connection).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use axum::{
    Json, Router,
    extract::{ConnectInfo, Query},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};
use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};

pub mod sctp;

#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub http_port: u16,
    /// 0 disables the UDP server.
    pub udp_port: u16,
    /// 0 disables the SCTP server.
    pub sctp_port: u16,
}

/// The name the server reports: `HOSTNAME` if set (runtimes set it to the pod
/// name), else the UTS hostname.
pub fn hostname() -> String {
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
    {
        return h;
    }
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::from("unknown");
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Serves HTTP (and UDP) until the process ends.
pub async fn serve(cfg: Config) -> Result<()> {
    let http = TcpListener::bind((Ipv4Addr::UNSPECIFIED, cfg.http_port))
        .await
        .with_context(|| format!("binding HTTP port {}", cfg.http_port))?;
    if cfg.udp_port != 0 {
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, cfg.udp_port))
            .await
            .with_context(|| format!("binding UDP port {}", cfg.udp_port))?;
        tokio::spawn(serve_udp(udp));
    }
    let sctp = if cfg.sctp_port == 0 {
        None
    } else {
        let server = sctp::Server::new(cfg.sctp_port)
            .with_context(|| format!("serving SCTP port {}", cfg.sctp_port))?;
        let name = hostname();
        Some(tokio::task::spawn_blocking(move || server.run(&name)))
    };
    let http = axum::serve(
        http,
        router().into_make_service_with_connect_info::<SocketAddr>(),
    );
    // A server that cannot serve SCTP must fail the pod, not hide from a
    // probe behind timeouts.
    match sctp {
        Some(sctp) => tokio::select! {
            served = http => served.context("serving HTTP"),
            failed = sctp => failed.context("SCTP server task")?.context("serving SCTP"),
        },
        None => http.await.context("serving HTTP"),
    }
}

fn router() -> Router {
    Router::new()
        .route("/", get(|| async { format!("NOW: {:?}", std::time::SystemTime::now()) }))
        .route("/hostname", get(|| async { hostname() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/echo",
            get(|Query(q): Query<HashMap<String, String>>| async move {
                q.get("msg").cloned().unwrap_or_default()
            }),
        )
        .route(
            "/clientip",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
        .route("/exit", get(exit))
        .route("/dial", get(dial))
}

async fn exit(Query(q): Query<HashMap<String, String>>) -> &'static str {
    let code = q.get("code").and_then(|c| c.parse().ok()).unwrap_or(0);
    std::process::exit(code)
}

async fn serve_udp(sock: UdpSocket) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let msg = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        let reply = match msg.split_once(' ') {
            _ if msg == "hostname" => hostname(),
            _ if msg == "clientip" => peer.to_string(),
            Some(("echo", rest)) => rest.to_owned(),
            _ => String::from("unknown command"),
        };
        let _ = sock.send_to(reply.as_bytes(), peer).await;
    }
}

#[derive(Serialize, Default)]
struct DialResult {
    responses: Vec<String>,
    errors: Vec<String>,
}

async fn dial(Query(q): Query<HashMap<String, String>>) -> impl IntoResponse {
    let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned()).into_response();
    let Some(host) = q.get("host") else { return bad("missing host") };
    let Some(port) = q.get("port").and_then(|p| p.parse::<u16>().ok()) else {
        return bad("missing or invalid port");
    };
    let request = q.get("request").cloned().unwrap_or_else(|| "hostname".into());
    let tries: u32 = q.get("tries").and_then(|t| t.parse().ok()).unwrap_or(1).clamp(1, 1000);
    let protocol = q.get("protocol").map_or("http", String::as_str);
    let Ok(ip) = host.parse::<std::net::IpAddr>() else { return bad("host must be an IP") };
    let target = SocketAddr::new(ip, port);
    let mut out = DialResult::default();
    let mut last_ok = false;
    for _ in 0..tries {
        let r = match protocol {
            "http" => dial_http(target, &request, DIAL_HTTP_TIMEOUT).await,
            "udp" => dial_udp(target, &request, DIAL_UDP_TIMEOUT).await,
            other => return bad(&format!("unsupported protocol {other}")),
        };
        last_ok = r.is_ok();
        match r {
            Ok(body) => out.responses.push(body),
            Err(e) => out.errors.push(format!("{e:#}")),
        }
    }
    let status = if last_ok { StatusCode::OK } else { StatusCode::EXPECTATION_FAILED };
    (status, Json(out)).into_response()
}

/// How long `/dial` waits for one HTTP exchange and one UDP answer.
const DIAL_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_UDP_TIMEOUT: Duration = Duration::from_secs(3);

async fn dial_http(target: SocketAddr, request: &str, timeout: Duration) -> Result<String> {
    use http_body_util::{BodyExt as _, Empty};
    let path = if request.starts_with('/') { request.to_owned() } else { format!("/{request}") };
    let fut = async {
        let stream = tokio::net::TcpStream::connect(target).await.context("connect")?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", target.to_string())
            .body(Empty::<bytes_alias::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, fut).await.context("timed out")?
}

async fn dial_udp(target: SocketAddr, request: &str, timeout: Duration) -> Result<String> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    sock.connect(target).await?;
    sock.send(request.as_bytes()).await?;
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .context("timed out")??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A probe's transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// `tcp`, `udp`, `sctp`.
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

async fn dial_sctp(target: SocketAddr, timeout: Duration) -> Result<String> {
    let SocketAddr::V4(target) = target else {
        bail!("SCTP probes are IPv4 only")
    };
    tokio::task::spawn_blocking(move || sctp::dial(target, timeout))
        .await
        .context("SCTP probe task")?
}

/// One reachability probe: `tcp|udp|sctp:IP:PORT[:TRIES]` (as the
/// NetworkPolicy suite passes them to `riptide-netexec --probe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub protocol: Protocol,
    pub target: SocketAddr,
    /// Attempts before the probe counts as failed (each a new connection
    /// or socket, so a new flow for the datapath).
    pub tries: u32,
}

impl std::str::FromStr for Probe {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut parts = s.split(':');
        let protocol = match parts.next() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("sctp") => Protocol::Sctp,
            _ => bail!("probe {s:?}: want tcp|udp|sctp:IP:PORT[:TRIES]"),
        };
        let ip: Ipv4Addr = parts
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("probe {s:?}: address"))?;
        let port: u16 = parts
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("probe {s:?}: port"))?;
        let tries = parts
            .next()
            .map_or(Ok(1), str::parse)
            .with_context(|| format!("probe {s:?}: tries"))?;
        ensure!(
            parts.next().is_none() && tries >= 1,
            "probe {s:?}: want tcp|udp|sctp:IP:PORT[:TRIES]"
        );
        Ok(Self {
            protocol,
            target: SocketAddr::from((ip, port)),
            tries,
        })
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.protocol.lower(),
            self.target.ip(),
            self.target.port(),
            self.tries
        )
    }
}

/// Asks the server behind `p` for its hostname (`GET /hostname` over a fresh
/// TCP connection, UDP or SCTP `hostname` from a fresh port), up to `p.tries`
/// times, each bounded by `timeout`: the first answer, or the last error.
/// Upstream's netpol suite connects only; asking for the hostname also
/// tells which pod was reached.
pub async fn probe(p: Probe, timeout: Duration) -> Result<String> {
    let mut last = None;
    for _ in 0..p.tries {
        let r = match p.protocol {
            Protocol::Tcp => dial_http(p.target, "/hostname", timeout).await,
            Protocol::Udp => dial_udp(p.target, "hostname", timeout).await,
            Protocol::Sctp => dial_sctp(p.target, timeout).await,
        };
        match r {
            Ok(answer) => return Ok(answer),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no tries")))
}

/// Runs `probes` at most `parallel` at a time and writes one line per probe,
/// in the order given: `<probe> ok <answer>` or `<probe> fail <error>`.
pub async fn probe_all(probes: Vec<Probe>, timeout: Duration, parallel: usize, mut out: impl Write) -> Result<()> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let tasks: Vec<_> = probes
        .into_iter()
        .map(|p| {
            let permits = permits.clone();
            let task = tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                probe(p, timeout).await
            });
            (p, task)
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for (p, task) in tasks {
        results.push((p, task.await.unwrap_or_else(|e| Err(anyhow::anyhow!("probe task: {e}")))));
    }
    for (p, r) in results {
        match r {
            Ok(answer) => writeln!(out, "{p} ok {}", answer.replace('\n', " "))?,
            Err(e) => writeln!(out, "{p} fail {}", format!("{e:#}").replace('\n', " "))?,
        }
    }
    out.flush()?;
    Ok(())
}

/// How long the keep-alive client waits for a connect or an answer before
/// it reports the connection as broken (a stalled flow must not hang a test).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens one TCP connection to `target` and keeps it: prints
/// `connected <local> <peer>` (the peer as `getpeername` shows it, i.e. the
/// Service address under socket LB), then for every line of `input` (a path)
/// sends `GET <path>` over that same connection and prints `ok <body>`.
/// Never reconnects: the first failure prints `error <what>` and returns the
/// error, so a broken connection cannot hide behind a new one.
pub fn keepalive_client(target: SocketAddr, input: impl BufRead, mut output: impl Write) -> Result<()> {
    let run = |output: &mut dyn Write| -> Result<()> {
        let stream = TcpStream::connect_timeout(&target, CLIENT_TIMEOUT).with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        writeln!(output, "connected {} {}", stream.local_addr()?, stream.peer_addr()?)?;
        output.flush()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        for line in input.lines() {
            let path = line.context("reading stdin")?;
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            write!(writer, "GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n").with_context(|| format!("sending GET {path}"))?;
            let body = read_response(&mut reader).with_context(|| format!("reading the answer to GET {path}"))?;
            writeln!(output, "ok {}", body.replace('\n', " "))?;
            output.flush()?;
        }
        Ok(())
    };
    let r = run(&mut output);
    if let Err(e) = &r {
        let _ = writeln!(output, "error {e:#}");
        let _ = output.flush();
    }
    r
}

/// One HTTP/1.1 response with a Content-Length body (what the server sends
/// for every route); the connection stays usable for the next request.
fn read_response(r: &mut impl BufRead) -> Result<String> {
    let mut status = String::new();
    if r.read_line(&mut status)? == 0 {
        bail!("connection closed by the peer");
    }
    let mut len = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            bail!("connection closed inside the headers");
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = Some(v.trim().parse::<usize>().with_context(|| format!("bad header {h}"))?);
        }
    }
    let len = len.with_context(|| format!("no Content-Length in the answer ({})", status.trim_end()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{}: {body}", status.trim_end());
    }
    Ok(body)
}

/// hyper's body type parameter; re-exported through axum to avoid another
/// direct dependency.
mod bytes_alias {
    pub use axum::body::Bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (u16, u16) {
        let http = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let (hp, up) = (http.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
        tokio::spawn(serve_udp(udp));
        tokio::spawn(async move {
            axum::serve(http, router().into_make_service_with_connect_info::<SocketAddr>())
                .await
                .unwrap();
        });
        (hp, up)
    }

    async fn get(port: u16, path: &str) -> (u16, String) {
        let stream = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut s, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(c);
        let req = hyper::Request::get(path)
            .header("host", "x")
            .body(http_body_util::Empty::<bytes_alias::Bytes>::new())
            .unwrap();
        let r = s.send_request(req).await.unwrap();
        let st = r.status().as_u16();
        use http_body_util::BodyExt as _;
        let b = r.into_body().collect().await.unwrap().to_bytes();
        (st, String::from_utf8_lossy(&b).into_owned())
    }

    #[tokio::test]
    async fn http_endpoints_answer_like_agnhost() {
        let (hp, _) = start().await;
        assert_eq!(get(hp, "/echo?msg=hi%20there").await, (200, "hi there".into()));
        assert_eq!(get(hp, "/hostname").await.1, hostname());
        let (st, ip) = get(hp, "/clientip").await;
        assert_eq!(st, 200);
        assert!(ip.starts_with("127.0.0.1:"), "clientip was {ip}");
    }

    #[tokio::test]
    async fn udp_commands_answer() {
        let (_, up) = start().await;
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, up));
        assert_eq!(dial_udp(target, "echo abc", DIAL_UDP_TIMEOUT).await.unwrap(), "abc");
        assert_eq!(dial_udp(target, "hostname", DIAL_UDP_TIMEOUT).await.unwrap(), hostname());
        assert!(dial_udp(target, "clientip", DIAL_UDP_TIMEOUT).await.unwrap().starts_with("127.0.0.1:"));
    }

    #[tokio::test]
    async fn probes_report_answers_and_failures_in_order() {
        let (hp, up) = start().await;
        let probes: Vec<Probe> = [format!("tcp:127.0.0.1:{hp}"), format!("udp:127.0.0.1:{up}:2"), "tcp:127.0.0.1:1:2".into()]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(probes[1].to_string(), format!("udp:127.0.0.1:{up}:2"));
        let mut out = Vec::new();
        probe_all(probes, Duration::from_secs(1), 2, &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("tcp:127.0.0.1:{hp}:1 ok {}", hostname()));
        assert_eq!(lines[1], format!("udp:127.0.0.1:{up}:2 ok {}", hostname()));
        assert!(lines[2].starts_with("tcp:127.0.0.1:1:2 fail "), "{out}");
        assert_eq!(
            "sctp:1.2.3.4:80".parse::<Probe>().unwrap().protocol,
            Protocol::Sctp
        );
        assert!("quic:1.2.3.4:80".parse::<Probe>().is_err());
        assert!("tcp:1.2.3.4:80:0".parse::<Probe>().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keepalive_client_reuses_one_connection() {
        let (hp, _) = start().await;
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, hp));
        let out = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            keepalive_client(target, &b"/clientip\n/echo?msg=a\n/clientip\n"[..], &mut out).unwrap();
            String::from_utf8(out).unwrap()
        })
        .await
        .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let local = lines[0].split_whitespace().nth(1).unwrap();
        // The server saw the same source port twice: one connection.
        assert_eq!(lines[1], format!("ok {local}"));
        assert_eq!(lines[2], "ok a");
        assert_eq!(lines[3], format!("ok {local}"));
    }

    #[test]
    fn keepalive_client_reports_a_failed_connect() {
        // Nothing listens on port 1: the client says so and fails.
        let mut out = Vec::new();
        let r = keepalive_client(SocketAddr::from((Ipv4Addr::LOCALHOST, 1)), &b"/hostname\n"[..], &mut out);
        assert!(r.is_err());
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("error connecting to 127.0.0.1:1"), "{out}");
    }

    #[test]
    fn read_response_rejects_a_truncated_answer() {
        let mut r = &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..];
        assert!(read_response(&mut r).is_err());
        let mut r = &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx"[..];
        assert_eq!(read_response(&mut r).unwrap(), "hello");
        assert!(read_response(&mut r).unwrap_err().to_string().contains("404"));
    }

    #[tokio::test]
    async fn dial_reports_responses_and_errors() {
        let (hp, up) = start().await;
        let (st, body) = get(hp, &format!("/dial?request=hostname&host=127.0.0.1&port={hp}&protocol=http&tries=2")).await;
        assert_eq!(st, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["responses"].as_array().unwrap().len(), 2);
        let (st, body) = get(hp, &format!("/dial?request=echo%20x&host=127.0.0.1&port={up}&protocol=udp")).await;
        assert_eq!((st, body.contains("\"x\"")), (200, true), "{body}");
        // Nothing listens on port 1: the dial fails and says so.
        let (st, body) = get(hp, "/dial?request=hostname&host=127.0.0.1&port=1&protocol=http").await;
        assert_eq!(st, 417, "{body}");
        assert_eq!(get(hp, "/dial?host=127.0.0.1").await.0, 400);
    }
}
