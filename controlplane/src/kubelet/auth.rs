//! Who may use the kubelet API, as upstream's kubelet decides it
//! (`pkg/kubelet/server/auth.go`, webhook authentication and
//! authorization): a client certificate the cluster CA signed (CN user, O
//! groups — the apiserver's own, see `apiserver::proxy`), else a bearer
//! token the apiserver vouches for in a TokenReview; anyone else gets 401.
//! Each request is then a SubjectAccessReview on the Node: subresource
//! `log` under `/logs/`, `stats`, `metrics`, `spec` under theirs, `proxy`
//! for everything else (`/exec`, `/containerLogs`, `/healthz`); the verb is
//! the HTTP method's (GET get, POST create, …) except that exec, attach,
//! portforward and run ask for `create` whatever the method (upstream takes
//! a WebSocket GET as `get`, so `nodes/proxy` read access runs commands).
//! Denials are 403 with upstream's
//! `Forbidden (user=…, verb=…, resource=…, subresource=…)`.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

use crate::apiserver::authn::{self, AUTHENTICATED, Connection, UserInfo};

/// The kubelet's authenticator and authorizer: both ask the apiserver,
/// with the kubelet's own credentials.
pub struct KubeletAuth {
    pub client: Client,
    pub node_name: String,
}

/// What a request asks of the Node (`authorizer.Attributes` upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttributes {
    pub verb: String,
    pub subresource: &'static str,
}

fn is_subpath(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// upstream `GetRequestAttributes`, but `create` for every request that
/// starts a process.
pub fn attributes(method: &Method, path: &str) -> NodeAttributes {
    let subresource = if is_subpath(path, "/stats") {
        "stats"
    } else if is_subpath(path, "/metrics") {
        "metrics"
    } else if is_subpath(path, "/logs") {
        "log"
    } else if is_subpath(path, "/spec") {
        "spec"
    } else {
        "proxy"
    };
    let starts_process = ["/exec", "/attach", "/portforward", "/run"].iter().any(|p| is_subpath(path, p));
    let verb = match *method {
        _ if starts_process => "create",
        Method::POST => "create",
        Method::GET | Method::HEAD => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "",
    };
    NodeAttributes { verb: verb.to_string(), subresource }
}

fn reply(code: StatusCode, msg: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg).into_response()
}

impl KubeletAuth {
    /// The identity of a request from its connection's client certificate
    /// or its bearer token, or None (→ 401).
    async fn authenticate(&self, cert_user: Option<UserInfo>, token: Option<String>) -> Result<Option<UserInfo>, String> {
        if let Some(mut user) = cert_user {
            if !user.groups.iter().any(|g| g == AUTHENTICATED) {
                user.groups.push(AUTHENTICATED.into());
            }
            return Ok(Some(user));
        }
        let Some(token) = token else { return Ok(None) };
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token), audiences: None },
            ..TokenReview::default()
        };
        let out = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        let Some(status) = out.status.filter(|s| s.authenticated == Some(true)) else { return Ok(None) };
        let Some(u) = status.user else { return Ok(None) };
        Ok(Some(UserInfo {
            name: u.username.unwrap_or_default(),
            uid: u.uid.unwrap_or_default(),
            groups: u.groups.unwrap_or_default(),
            extra: u.extra.unwrap_or_default().into_iter().collect(),
        }))
    }

    async fn authorize(&self, user: &UserInfo, a: &NodeAttributes) -> Result<bool, String> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(a.verb.clone()),
                    resource: Some("nodes".into()),
                    subresource: Some(a.subresource.into()),
                    name: Some(self.node_name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let out = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("SubjectAccessReview: {e}"))?;
        Ok(out.status.is_some_and(|s| s.allowed))
    }
}

/// The axum middleware in front of every kubelet route.
pub async fn require(State(auth): State<Arc<KubeletAuth>>, req: Request, next: Next) -> Response {
    let cert_user = req.extensions().get::<Connection>().and_then(|c| c.cert_user.clone());
    let token = authn::bearer(req.headers()).map(str::to_string);
    let user = match auth.authenticate(cert_user, token).await {
        Ok(Some(u)) => u,
        Ok(None) => return reply(StatusCode::UNAUTHORIZED, "Unauthorized".into()),
        Err(e) => {
            tracing::warn!(error = %e, "kubelet API: authentication failed");
            return reply(StatusCode::UNAUTHORIZED, "Unauthorized".into());
        }
    };
    let a = attributes(req.method(), req.uri().path());
    match auth.authorize(&user, &a).await {
        Ok(true) => next.run(req).await,
        Ok(false) => reply(
            StatusCode::FORBIDDEN,
            format!("Forbidden (user={}, verb={}, resource=nodes, subresource={})", user.name, a.verb, a.subresource),
        ),
        Err(e) => {
            tracing::warn!(error = %e, user = %user.name, "kubelet API: authorization failed");
            reply(StatusCode::INTERNAL_SERVER_ERROR, format!("Authorization error (user={}, verb={}, resource=nodes, subresource={})", user.name, a.verb, a.subresource))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_attributes_like_upstream() {
        let a = |m: Method, p: &str| {
            let x = attributes(&m, p);
            (x.verb, x.subresource)
        };
        assert_eq!(a(Method::GET, "/containerLogs/default/web/main"), ("get".into(), "proxy"));
        assert_eq!(a(Method::GET, "/exec/default/web/main"), ("create".into(), "proxy"), "exec starts a process, whatever the method");
        assert_eq!(a(Method::POST, "/exec/default/web/main"), ("create".into(), "proxy"));
        assert_eq!(a(Method::GET, "/portforward/default/web"), ("create".into(), "proxy"));
        assert_eq!(a(Method::GET, "/logs/syslog"), ("get".into(), "log"));
        assert_eq!(a(Method::GET, "/logs"), ("get".into(), "log"));
        assert_eq!(a(Method::GET, "/logsx"), ("get".into(), "proxy"), "a prefix of a word is not a subpath");
        assert_eq!(a(Method::GET, "/stats/summary"), ("get".into(), "stats"));
        assert_eq!(a(Method::GET, "/metrics"), ("get".into(), "metrics"));
        assert_eq!(a(Method::DELETE, "/healthz"), ("delete".into(), "proxy"));
    }
}
