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
//!
//! Both answers are cached, as upstream's webhook authenticator and
//! authorizer cache them, so a burst of requests (a `kubectl logs -f`
//! reconnecting, a metrics scraper) costs the apiserver one review: a
//! TokenReview verdict, either way, for `token` (2 min), a
//! SubjectAccessReview for `allowed` (5 min) or `denied` (30 s) — the
//! kubelet's `--authentication-token-webhook-cache-ttl` and
//! `--authorization-webhook-cache-{authorized,unauthorized}-ttl`. The price
//! is upstream's too: a revoked token (its ServiceAccount or pod deleted)
//! or a removed RoleBinding keeps working here until its entry expires.
//! Failed reviews (apiserver unreachable) are not cached. Each cache holds
//! at most [`CACHE_ENTRIES`] entries; when full, expired ones go first,
//! then the one closest to expiring.
//!
//! The token cache is keyed by an HMAC-SHA256 of the token under a key
//! drawn at start ([`TokenKeyer`]), as upstream's
//! `cached_token_authenticator.go` keys it: the cache never holds a
//! credential, and a memory dump of it yields nothing to replay or to test
//! guesses against offline.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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
use ring::{hmac, rand::SystemRandom};

use crate::apiserver::authn::{self, AUTHENTICATED, Connection, UserInfo};

/// Entries per cache (tokens, decisions).
pub const CACHE_ENTRIES: usize = 4096;

/// How long review answers are reused; zero turns a cache off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    pub token: Duration,
    pub allowed: Duration,
    pub denied: Duration,
}

impl Default for CacheTtls {
    /// Upstream kubelet's defaults.
    fn default() -> Self {
        Self { token: Duration::from_secs(120), allowed: Duration::from_secs(300), denied: Duration::from_secs(30) }
    }
}

/// A map whose entries expire, bounded to `cap` entries.
struct TtlCache<K, V> {
    cap: usize,
    map: HashMap<K, (Instant, V)>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    fn new(cap: usize) -> Self {
        Self { cap, map: HashMap::new() }
    }

    fn get(&mut self, k: &K, now: Instant) -> Option<V> {
        match self.map.get(k) {
            Some((until, v)) if *until > now => Some(v.clone()),
            Some(_) => {
                self.map.remove(k);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, k: K, v: V, ttl: Duration, now: Instant) {
        if ttl.is_zero() || self.cap == 0 {
            return;
        }
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            self.map.retain(|_, (until, _)| *until > now);
            if self.map.len() >= self.cap
                && let Some(oldest) = self.map.iter().min_by_key(|(_, (until, _))| *until).map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(k, (now + ttl, v));
    }
}

/// What the token cache is keyed by: HMAC-SHA256 of the bearer token.
type TokenKey = [u8; 32];

/// Turns bearer tokens into cache keys with a per-process secret, so equal
/// tokens meet in the cache and the token itself is never stored.
pub struct TokenKeyer(hmac::Key);

impl TokenKeyer {
    /// A keyer with a fresh random secret (the system's CSPRNG).
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).map(Self)
    }

    pub fn key(&self, token: &str) -> TokenKey {
        let tag = hmac::sign(&self.0, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

/// The kubelet's authenticator and authorizer: both ask the apiserver,
/// with the kubelet's own credentials, and cache the answers.
pub struct KubeletAuth {
    client: Client,
    node_name: String,
    ttls: CacheTtls,
    keyer: TokenKeyer,
    /// HMAC of a bearer token → the identity it stands for (None: not
    /// authenticated).
    tokens: Mutex<TtlCache<TokenKey, Option<UserInfo>>>,
    /// (user, attributes) → allowed.
    decisions: Mutex<TtlCache<String, bool>>,
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
    /// Fails only when the system's random source does.
    pub fn new(client: Client, node_name: String, ttls: CacheTtls) -> Result<Self, ring::error::Unspecified> {
        Ok(Self {
            client,
            node_name,
            ttls,
            keyer: TokenKeyer::generate()?,
            tokens: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
            decisions: Mutex::new(TtlCache::new(CACHE_ENTRIES)),
        })
    }

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
        let key = self.keyer.key(&token);
        if let Some(hit) = self.tokens.lock().ok().and_then(|mut c| c.get(&key, Instant::now())) {
            return Ok(hit);
        }
        let user = self.token_review(token).await?;
        if let Ok(mut c) = self.tokens.lock() {
            c.insert(key, user.clone(), self.ttls.token, Instant::now());
        }
        Ok(user)
    }

    async fn token_review(&self, token: String) -> Result<Option<UserInfo>, String> {
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
        let key = serde_json::to_string(&(user, &a.verb, a.subresource)).map_err(|e| format!("cache key: {e}"))?;
        if let Some(hit) = self.decisions.lock().ok().and_then(|mut c| c.get(&key, Instant::now())) {
            return Ok(hit);
        }
        let allowed = self.subject_access_review(user, a).await?;
        if let Ok(mut c) = self.decisions.lock() {
            let ttl = if allowed { self.ttls.allowed } else { self.ttls.denied };
            c.insert(key, allowed, ttl, Instant::now());
        }
        Ok(allowed)
    }

    async fn subject_access_review(&self, user: &UserInfo, a: &NodeAttributes) -> Result<bool, String> {
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cache_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(2);
        c.insert("a", 1, Duration::from_secs(10), t0);
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(9)), Some(1));
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(10)), None, "expired at its TTL");
        c.insert("off", 1, Duration::ZERO, t0);
        assert_eq!(c.get(&"off", t0), None, "a zero TTL caches nothing");
        c.insert("a", 1, Duration::from_secs(5), t0);
        c.insert("b", 2, Duration::from_secs(30), t0);
        c.insert("c", 3, Duration::from_secs(20), t0);
        assert_eq!(c.map.len(), 2);
        assert_eq!(c.get(&"a", t0), None, "full: the entry closest to expiring went");
        c.insert("d", 4, Duration::from_secs(40), t0 + Duration::from_secs(25));
        assert_eq!((c.get(&"b", t0), c.get(&"c", t0), c.get(&"d", t0)), (Some(2), None, Some(4)), "expired entries go first");
    }

    #[test]
    fn token_cache_keys_are_keyed_hashes_not_tokens() {
        let (k1, k2) = (TokenKeyer::generate().unwrap(), TokenKeyer::generate().unwrap());
        let token = "eyJhbGciOiJFUzI1NiJ9.a-service-account-token.sig";
        assert_eq!(k1.key(token), k1.key(token), "one token meets its own cache entry");
        assert_ne!(k1.key(token), k1.key("eyJhbGciOiJFUzI1NiJ9.another-token.sig"));
        assert_ne!(k1.key(token), k2.key(token), "keyed per process: not a plain digest anyone can precompute");
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        assert_ne!(k1.key(token).as_slice(), digest.as_ref());
        // HMAC-SHA256 (RFC 4231 test case 2) under a known key.
        let known = TokenKeyer(hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"));
        let hex: String = known.key("what do ya want for nothing?").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

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
