//! The apiserver side: an upgrade-aware proxy to the kubelet, like
//! kube-apiserver's `UpgradeAwareHandler`. The client's upgrade request is
//! replayed to the kubelet over the apiserver's own authenticated
//! connection (the client's credentials are not forwarded); if the kubelet
//! switches protocols, we answer the client with the kubelet's 101 headers
//! (so `Sec-WebSocket-Accept` and the negotiated subprotocol are the
//! kubelet's) and splice the two upgraded connections byte for byte. Any
//! other kubelet answer (404 Status, 400 …) is passed back as is.

use axum::{
    body::Body,
    http::{HeaderValue, Request, Response, StatusCode, Uri, header},
    response::IntoResponse as _,
};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::apiserver::status::ApiError;

fn bad_gateway(msg: String) -> Response<Body> {
    let mut r = ApiError::internal(msg).into_response();
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

/// Whether `req` asks for a protocol upgrade (WebSocket, SPDY).
pub fn is_upgrade(req: &Request<Body>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Proxies the upgrade request `req` over `kubelet` (an HTTP/1.1
/// connection with upgrades enabled, already authenticated — see
/// `apiserver::proxy`) to `path_and_query`; `authority` is the Host.
pub async fn upgrade(mut kubelet: SendRequest<Body>, authority: &str, path_and_query: &str, mut req: Request<Body>) -> Response<Body> {
    if !is_upgrade(&req) {
        return ApiError::bad_request("Upgrade request required").into_response();
    }
    let Ok(uri) = path_and_query.parse::<Uri>() else {
        return ApiError::internal(format!("bad kubelet path {path_and_query}")).into_response();
    };
    let mut out = Request::new(Body::empty());
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = uri;
    for (k, v) in req.headers() {
        // The client's credentials are for us, not for the kubelet.
        if k == header::AUTHORIZATION || k == header::HOST || k == header::CONTENT_LENGTH {
            continue;
        }
        out.headers_mut().append(k.clone(), v.clone());
    }
    if let Ok(h) = HeaderValue::from_str(authority) {
        out.headers_mut().insert(header::HOST, h);
    }

    let mut resp = match kubelet.send_request(out).await {
        Ok(r) => r,
        Err(e) => return bad_gateway(format!("kubelet at {authority}: {e}")),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, Body::new(body));
    }
    let kubelet_upgrade = hyper::upgrade::on(&mut resp);
    let client_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (kubelet, client) = match tokio::join!(kubelet_upgrade, client_upgrade) {
            (Ok(k), Ok(c)) => (k, c),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "exec proxy: upgrade failed");
                return;
            }
        };
        let mut kubelet = TokioIo::new(kubelet);
        let mut client = TokioIo::new(client);
        match tokio::io::copy_bidirectional(&mut client, &mut kubelet).await {
            Ok((up, down)) => tracing::debug!(up, down, "exec proxy: stream finished"),
            Err(e) => {
                // Typically the kubelet's TLS ending without close_notify
                // once the session is over: end ours cleanly all the same,
                // so the client sees the end of a stream, not a truncation.
                tracing::debug!(error = %e, "exec proxy: stream ended");
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
            }
        }
    });
    let mut out = Response::new(Body::empty());
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *out.headers_mut() = resp.headers().clone();
    out
}
