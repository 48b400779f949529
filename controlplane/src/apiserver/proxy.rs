//! `pods/log`, `pods/exec` (and `attach`, `portforward`) are served by the
//! node's kubelet. The apiserver resolves the pod's node and hands the
//! request to a [`PodProxy`]. The default, [`KubeletProxy`], talks to the
//! kubelet endpoint a Node advertises (`status.addresses[InternalIP]` and
//! `status.daemonEndpoints.kubeletEndpoint.Port`, nowhere else) over HTTPS,
//! as kube-apiserver does: it presents its own client certificate
//! ([`super::tls::KUBELET_CLIENT_USER`], which the kubelet authorizes with a
//! SubjectAccessReview) and accepts only a serving certificate the cluster
//! CA signed for that address. Logs at `/containerLogs/{ns}/{pod}/{container}`
//! (the body is streamed back), exec at `/exec/{ns}/{pod}/{container}` (the
//! WebSocket upgrade is spliced through, see [`crate::exec`]). `attach` and
//! `portforward` get a 501 Status. A kubelet component can install its own
//! proxy (`Config::pod_proxy`).

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{HeaderValue, Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::TcpStream;

use super::{object::str_at, status::ApiError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
pub trait PodProxy: Send + Sync + 'static {
    /// Serve `pods/<sub>` for `pod`; `node` is its Node object, if bound.
    async fn serve(&self, sub: &str, pod: Value, node: Option<Value>, req: Request<Body>) -> Response;
}

/// Forwards `pods/log` and `pods/exec` to the node's kubelet over HTTPS.
pub struct KubeletProxy {
    /// Trusts the cluster CA, presents the apiserver's kubelet-client
    /// certificate; None on a plain-HTTP apiserver, which has no PKI and so
    /// cannot reach any kubelet.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl KubeletProxy {
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self { tls }
    }

    /// An HTTP/1.1 connection (upgrades enabled) to the kubelet at
    /// `ip:port`, whose certificate must be the cluster CA's for `ip`.
    async fn connect(&self, ip: IpAddr, port: u16) -> Result<SendRequest<Body>, String> {
        let Some(tls) = &self.tls else {
            return Err("this apiserver serves plain HTTP and has no client certificate for kubelets".into());
        };
        let dial = async {
            let tcp = TcpStream::connect((ip, port)).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(tls.clone())
                .connect(ServerName::IpAddress(ip.into()), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, dial).await.map_err(|_| "timed out".to_string())??;
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "kubelet connection ended");
            }
        });
        Ok(sender)
    }
}

/// The kubelet endpoint a Node advertises: its InternalIP (an address, never
/// a name to resolve) and the kubelet port.
fn kubelet_endpoint(node: &Value) -> Option<(IpAddr, u16)> {
    let port = node.pointer("/status/daemonEndpoints/kubeletEndpoint/Port").and_then(Value::as_u64)?;
    let addrs = node.pointer("/status/addresses").and_then(Value::as_array)?;
    let ip = addrs.iter().find(|a| str_at(a, "/type") == "InternalIP").map(|a| str_at(a, "/address"))?;
    let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
    Some((ip.parse().ok()?, port))
}

fn bad_gateway(msg: String) -> Response {
    let mut r = ApiError::internal(msg).into_response();
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// The container a log/exec request is for: `?container=`, else the pod's
/// first container.
fn container_of(pod: &Value, query: Option<&str>) -> String {
    let query: std::collections::HashMap<String, String> = query.map(url_pairs).unwrap_or_default();
    query.get("container").filter(|c| !c.is_empty()).cloned().unwrap_or_else(|| {
        pod.pointer("/spec/containers/0/name").and_then(Value::as_str).unwrap_or("").to_string()
    })
}

fn has_container(pod: &Value, name: &str) -> bool {
    ["/spec/containers", "/spec/initContainers", "/spec/ephemeralContainers"].iter().any(|p| {
        pod.pointer(p).and_then(Value::as_array).is_some_and(|cs| cs.iter().any(|c| str_at(c, "/name") == name))
    })
}

#[async_trait::async_trait]
impl PodProxy for KubeletProxy {
    async fn serve(&self, sub: &str, pod: Value, node: Option<Value>, req: Request<Body>) -> Response {
        let name = str_at(&pod, "/metadata/name").to_string();
        let ns = str_at(&pod, "/metadata/namespace").to_string();
        let node_name = str_at(&pod, "/spec/nodeName").to_string();
        match sub {
            "attach" => {
                return ApiError::new(
                    501,
                    "NotImplemented",
                    format!("pods/attach is not supported by riptide (pod {name}): container output goes to log files (kubectl logs -f) and containers have no stdin to attach to; use kubectl exec"),
                )
                .into_response();
            }
            "portforward" => {
                return ApiError::new(
                    501,
                    "NotImplemented",
                    format!("pods/portforward is not supported by riptide (pod {name}): reach the pod at its IP from a node, expose it with a Service (kubectl expose), or use kubectl exec"),
                )
                .into_response();
            }
            _ => {}
        }
        if node_name.is_empty() {
            return ApiError::bad_request(format!("pod {name} does not have a host assigned")).into_response();
        }
        let Some((ip, port)) = node.as_ref().and_then(kubelet_endpoint) else {
            return ApiError::bad_request(format!(
                "node {node_name} does not advertise a kubelet endpoint; {sub} for pod {name} is not available"
            ))
            .into_response();
        };
        let container = container_of(&pod, req.uri().query());
        let q = req.uri().query().unwrap_or("").to_string();
        let authority = std::net::SocketAddr::from((ip, port)).to_string();
        if sub == "exec" {
            if !has_container(&pod, &container) {
                return ApiError::bad_request(format!("container {container} is not valid for pod {name}")).into_response();
            }
            let phase = str_at(&pod, "/status/phase");
            if phase == "Succeeded" || phase == "Failed" {
                return ApiError::bad_request(format!(
                    "cannot exec into a container in a completed pod; current phase is {phase}"
                ))
                .into_response();
            }
            if !crate::exec::proxy::is_upgrade(&req) {
                return ApiError::bad_request("Upgrade request required").into_response();
            }
            let sender = match self.connect(ip, port).await {
                Ok(s) => s,
                Err(e) => return bad_gateway(format!("dialing the kubelet at {authority}: {e}")),
            };
            return crate::exec::proxy::upgrade(sender, &authority, &format!("/exec/{ns}/{name}/{container}?{q}"), req).await;
        }
        if sub != "log" {
            return ApiError::new(501, "NotImplemented", format!("pods/{sub} is not proxied by this apiserver"))
                .into_response();
        }
        let path = format!("/containerLogs/{ns}/{name}/{container}?{q}");
        let Ok(out) = Request::get(&path).header(header::HOST, &authority).body(Body::empty()) else {
            return ApiError::internal(format!("bad kubelet path {path}")).into_response();
        };
        let mut sender = match self.connect(ip, port).await {
            Ok(s) => s,
            Err(e) => return bad_gateway(format!("dialing the kubelet at {authority}: {e}")),
        };
        match sender.send_request(out).await {
            Ok(resp) => {
                let status = resp.status();
                let mut r = Response::new(Body::new(resp.into_body()));
                *r.status_mut() = status;
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                r
            }
            Err(e) => bad_gateway(format!("kubelet https://{authority}: {e}")),
        }
    }
}

fn url_pairs(q: &str) -> std::collections::HashMap<String, String> {
    q.split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(addresses: Value, port: Value) -> Value {
        json!({"status": {"addresses": addresses, "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}}})
    }

    #[test]
    fn the_kubelet_is_dialled_only_at_the_nodes_internal_ip() {
        let ok = node(json!([{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "198.18.0.11"}]), json!(10250));
        assert_eq!(kubelet_endpoint(&ok), Some(("198.18.0.11".parse().unwrap(), 10250)));
        // A name is never resolved, whatever the Node (or its kubelet) wrote.
        assert_eq!(kubelet_endpoint(&node(json!([{"type": "Hostname", "address": "127.0.0.1"}]), json!(10250))), None);
        assert_eq!(kubelet_endpoint(&node(json!([{"type": "InternalIP", "address": "evil.example.com"}]), json!(10250))), None);
        assert_eq!(kubelet_endpoint(&node(json!([{"type": "ExternalIP", "address": "203.0.113.1"}]), json!(10250))), None);
        // No port, port 0 or one past u16: nothing to dial.
        let ip = json!([{"type": "InternalIP", "address": "198.18.0.11"}]);
        for port in [json!(0), json!(65536), json!(-1), Value::Null] {
            assert_eq!(kubelet_endpoint(&node(ip.clone(), port.clone())), None, "port {port}");
        }
    }
}
