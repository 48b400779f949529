//! Probes, run from the node's network namespace (where the kubelet
//! lives) against the pod IP: httpGet (any 2xx/3xx), tcpSocket (connect),
//! grpc (grpc.health.v1 `Health/Check`, SERVING), exec (the command in the
//! container's network, mount, UTS and PID namespaces, cgroup and working
//! directory, exit 0). A failure
//! carries the kubelet's description of it for the pod's events.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::process::{Placement, command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Consecutive results of one probe, with Kubernetes' thresholds.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub successes: i32,
    pub failures: i32,
    /// Current verdict (None until the thresholds decided once).
    pub verdict: Option<Outcome>,
    pub next_due: Option<std::time::Instant>,
}

impl Tracker {
    pub fn record(&mut self, p: &Probe, o: Outcome) -> Option<Outcome> {
        match o {
            Outcome::Success => {
                self.successes += 1;
                self.failures = 0;
                if self.successes >= p.success_threshold.unwrap_or(1).max(1) {
                    self.verdict = Some(Outcome::Success);
                }
            }
            Outcome::Failure => {
                self.failures += 1;
                self.successes = 0;
                if self.failures >= p.failure_threshold.unwrap_or(3).max(1) {
                    self.verdict = Some(Outcome::Failure);
                }
            }
        }
        self.verdict
    }
}

fn port_of(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => name.parse().ok().or_else(|| {
            c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str())).and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

/// What one probe run found: the verdict and, on failure, the kubelet's
/// words for it (the `Unhealthy` event says "<Kind> probe failed: <output>").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub outcome: Outcome,
    pub output: String,
}

/// Runs `p` once for container `c` of a pod at `pod_ip`, whose main
/// process is `pid` (for exec), placed as `place`. Network probes connect
/// from the kubelet's namespace (the node's) to the pod IP, as kubelet does.
/// `cwd`: where an exec probe starts (the container's working directory,
/// as `runc exec` does).
pub async fn run(p: &Probe, c: &Container, pod_ip: Option<IpAddr>, place: &Placement, env: &[(String, String)], cwd: Option<&str>) -> Report {
    let timeout = Duration::from_secs(u64::try_from(p.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    let result = if let Some(h) = &p.http_get {
        let host: Option<IpAddr> = h.host.as_deref().and_then(|s| s.parse().ok()).or(pod_ip);
        match (host, port_of(&h.port, c)) {
            (Some(ip), Some(port)) => {
                let path = h.path.as_deref().unwrap_or("/");
                let headers = h.http_headers.as_deref().unwrap_or_default();
                tokio::time::timeout(timeout, http_get(ip, port, path, headers)).await.unwrap_or_else(|_| {
                    Err(format!("Get \"http://{}{path}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)", SocketAddr::new(ip, port)))
                })
            }
            (None, _) => Err("pod has no IP yet".to_owned()),
            (_, None) => Err(format!("unknown port {:?}", h.port)),
        }
    } else if let Some(t) = &p.tcp_socket {
        let host: Option<IpAddr> = t.host.as_deref().and_then(|s| s.parse().ok()).or(pod_ip);
        match (host, port_of(&t.port, c)) {
            (Some(ip), Some(port)) => {
                let addr = SocketAddr::new(ip, port);
                match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("dial tcp {addr}: connect: {e}")),
                    Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
                }
            }
            (None, _) => Err("pod has no IP yet".to_owned()),
            (_, None) => Err(format!("unknown port {:?}", t.port)),
        }
    } else if let Some(e) = &p.exec {
        let argv = e.command.clone().unwrap_or_default();
        exec(&argv, env, cwd, place, timeout).await
    } else if let Some(g) = &p.grpc {
        match (pod_ip, u16::try_from(g.port)) {
            (Some(ip), Ok(port)) => grpc_health(SocketAddr::new(ip, port), g.service.as_deref().unwrap_or_default(), timeout).await,
            (None, _) => Err("pod has no IP yet".to_owned()),
            (_, Err(_)) => Err(format!("invalid port {}", g.port)),
        }
    } else {
        Err("probe has no handler (want exec, httpGet, tcpSocket or grpc)".to_owned())
    };
    match result {
        Ok(()) => Report { outcome: Outcome::Success, output: String::new() },
        Err(output) => Report { outcome: Outcome::Failure, output },
    }
}

async fn exec(argv: &[String], env: &[(String, String)], cwd: Option<&str>, place: &Placement, timeout: Duration) -> Result<(), String> {
    let mut cmd = command(argv, env, cwd, place).map_err(|e| e.to_string())?;
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("starting {argv:?}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("command {argv:?} exited with {st}")),
        Ok(Err(e)) => Err(format!("waiting for {argv:?}: {e}")),
        Err(_) => Err(format!("command {argv:?} timed out after {}s", timeout.as_secs())),
    }
}

async fn http_get(ip: IpAddr, port: u16, path: &str, headers: &[k8s_openapi::api::core::v1::HTTPHeader]) -> Result<(), String> {
    let addr = SocketAddr::new(ip, port);
    let url = format!("http://{addr}{path}");
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("Get \"{url}\": dial tcp {addr}: connect: {e}"))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(&format!("{}: {}\r\n", h.name, h.value));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if (200..400).contains(&code) { Ok(()) } else { Err(format!("HTTP probe failed with statuscode: {code}")) }
}

/// The kubelet's probe client name (kube-probe/<major>.<minor>).
const USER_AGENT: &str = "kube-probe/1.33";

/// grpc.health.v1 `Health/Check` for `service` at `addr`: SERVING is
/// success; any other status, a refused or slow connection, or an RPC
/// error is a failure worded as kubelet's gRPC prober words it
/// (pkg/probe/grpc/grpc.go).
async fn grpc_health(addr: SocketAddr, service: &str, timeout: Duration) -> Result<(), String> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let secs = timeout.as_secs();
    let deadline = tokio::time::Instant::now() + timeout;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("error: failed to connect service at \"{addr}\": {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .user_agent(USER_AGENT)
        .map_err(|e| format!("error: failed to connect service at \"{addr}\": {e}"))?;
    let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => return Err(format!("error: failed to connect service at \"{addr}\": {}", chain(&e))),
        Err(_) => return Err(format!("timeout: failed to connect service \"{addr}\" within {secs}s")),
    };
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest { service: service.to_owned() };
    let response = match tokio::time::timeout_at(deadline, client.check(request)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => {
            return Err(match status.code() {
                tonic::Code::Unimplemented => format!(
                    "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {}",
                    status.message()
                ),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => format!("timeout: health rpc did not complete within {secs}s"),
                _ => format!("error: health rpc probe failed: {}: {}", status.code(), status.message()),
            });
        }
        Err(_) => return Err(format!("timeout: health rpc did not complete within {secs}s")),
    };
    match response.status() {
        ServingStatus::Serving => Ok(()),
        other => Err(format!("service unhealthy (responded with \"{}\")", other.as_str_name())),
    }
}

/// `e: its source: its source ...`, for errors whose Display alone says
/// little (tonic's "transport error").
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tonic_health::ServingStatus;

    use super::*;

    /// A grpc.health.v1 server on loopback reporting `status` for "svc".
    async fn health_server(status: ServingStatus) -> SocketAddr {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("svc", status).await;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            // Keeps the reporter (and so the status) alive with the server.
            let _reporter = reporter;
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming).await;
        });
        addr
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn grpc_health_serving_is_success_and_anything_else_a_worded_failure() {
        let serving = health_server(ServingStatus::Serving).await;
        assert_eq!(grpc_health(serving, "svc", SECOND).await, Ok(()));
        let e = grpc_health(serving, "other", SECOND).await.expect_err("unknown service");
        assert!(e.starts_with("error: health rpc probe failed: ") && e.contains("not found"), "{e}");
        let not_serving = health_server(ServingStatus::NotServing).await;
        assert_eq!(grpc_health(not_serving, "svc", SECOND).await, Err("service unhealthy (responded with \"NOT_SERVING\")".to_owned()));
        let unknown = health_server(ServingStatus::Unknown).await;
        assert_eq!(grpc_health(unknown, "svc", SECOND).await, Err("service unhealthy (responded with \"UNKNOWN\")".to_owned()));
    }

    #[tokio::test]
    async fn grpc_health_refused_and_silent_servers_fail_within_the_timeout() {
        // A port nothing listens on: bind, note it, close.
        let closed = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind").local_addr().expect("addr");
        let e = grpc_health(closed, "", SECOND).await.expect_err("refused");
        assert!(e.starts_with(&format!("error: failed to connect service at \"{closed}\"")), "{e}");
        // Accepts TCP (the backlog does) but never speaks HTTP/2.
        let silent = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let t0 = std::time::Instant::now();
        let e = grpc_health(addr, "", SECOND).await.expect_err("silent");
        assert!(e.starts_with("timeout: "), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
        drop(silent);
    }
}
