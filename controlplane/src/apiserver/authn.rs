//! Authentication: who a request comes from. kube-apiserver's chain, in
//! its order: client certificate, then bearer token (static token file,
//! then ServiceAccount JWT). A request none of them accepts is anonymous
//! (`system:anonymous` in `system:unauthenticated`), which only the health
//! and version endpoints admit.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};

/// An authenticated identity (`user.Info` upstream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserInfo {
    #[serde(rename = "username")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

pub const ANONYMOUS: &str = "system:anonymous";
pub const UNAUTHENTICATED: &str = "system:unauthenticated";
pub const AUTHENTICATED: &str = "system:authenticated";
pub const MASTERS: &str = "system:masters";

impl UserInfo {
    pub fn anonymous() -> Self {
        Self { name: ANONYMOUS.into(), groups: vec![UNAUTHENTICATED.into()], ..Self::default() }
    }

    pub fn is_anonymous(&self) -> bool {
        self.name == ANONYMOUS
    }

    /// Every authenticated user is also in `system:authenticated`.
    fn authenticated(mut self) -> Self {
        if !self.groups.iter().any(|g| g == AUTHENTICATED) {
            self.groups.push(AUTHENTICATED.into());
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("reading token file {path}: {source}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("token file {path} line {line}: {why}")]
    Line { path: PathBuf, line: usize, why: &'static str },
    #[error("token file {path} has no token")]
    Empty { path: PathBuf },
}

/// Split one CSV record: commas separate fields, a field in double quotes
/// may hold commas, `""` inside quotes is a quote (RFC 4180, which Go's
/// encoding/csv reads for kube-apiserver).
fn csv_fields(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (false, ',') => out.push(std::mem::take(&mut cur)),
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return None;
    }
    out.push(cur);
    Some(out.into_iter().map(|f| f.trim().to_string()).collect())
}

/// kube-apiserver's `--token-auth-file`: `token,user,uid[,"group1,group2"]`
/// per line, in file order (the first `system:masters` token is the one the
/// admin kubeconfig carries).
pub fn load_token_file(path: &Path) -> Result<Vec<(String, UserInfo)>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read { path: path.to_path_buf(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let bad = |why| TokenFileError::Line { path: path.to_path_buf(), line: i + 1, why };
        let f = csv_fields(l).ok_or_else(|| bad("unterminated quote"))?;
        if f.len() < 3 {
            return Err(bad("want at least token,user,uid"));
        }
        if f[0].is_empty() || f[1].is_empty() {
            return Err(bad("empty token or user"));
        }
        let groups = f.get(3).map(|g| g.split(',').map(str::trim).filter(|g| !g.is_empty()).map(str::to_string).collect()).unwrap_or_default();
        out.push((f[0].clone(), UserInfo { name: f[1].clone(), uid: f[2].clone(), groups, extra: BTreeMap::new() }));
    }
    if out.is_empty() {
        return Err(TokenFileError::Empty { path: path.to_path_buf() });
    }
    Ok(out)
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = h.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The identity in a client certificate that the TLS layer already
/// verified against the cluster CA: CN is the user, each O a group.
pub fn cert_user(der: &[u8]) -> Option<UserInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let groups = subject.iter_organization().filter_map(|o| o.as_str().ok()).map(str::to_string).collect();
    (!name.is_empty()).then(|| UserInfo { name, groups, ..UserInfo::default() })
}

/// Per-connection facts a request inherits: the client certificate's
/// identity, when the client presented one.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub cert_user: Option<UserInfo>,
}

/// The audience and issuer of ServiceAccount tokens (kubeadm's and k3s's
/// `--service-account-issuer`/`--api-audiences` default).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// The `kubernetes.io` claim of a bound ServiceAccount token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KubeClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The claims upstream's TokenRequest tokens carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kube: KubeClaims,
}

impl Claims {
    /// `system:serviceaccount:<ns>:<name>` in `system:serviceaccounts` and
    /// `system:serviceaccounts:<ns>`, with the pod binding as extra.
    pub fn user(&self) -> UserInfo {
        let ns = &self.kube.namespace;
        let mut extra = BTreeMap::new();
        if let Some(p) = &self.kube.pod {
            extra.insert("authentication.kubernetes.io/pod-name".into(), vec![p.name.clone()]);
            extra.insert("authentication.kubernetes.io/pod-uid".into(), vec![p.uid.clone()]);
        }
        extra.insert("authentication.kubernetes.io/credential-id".into(), vec![format!("JTI={}", self.jti)]);
        UserInfo {
            name: service_account_user(ns, &self.kube.serviceaccount.name),
            uid: self.kube.serviceaccount.uid.clone(),
            groups: vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}")],
            extra,
        }
        .authenticated()
    }
}

pub fn service_account_user(ns: &str, name: &str) -> String {
    format!("system:serviceaccount:{ns}:{name}")
}

/// Signs and verifies ServiceAccount tokens (ES256 JWTs).
pub struct ServiceAccountTokens {
    encoding: jsonwebtoken::EncodingKey,
    decoding: jsonwebtoken::DecodingKey,
}

impl std::fmt::Debug for ServiceAccountTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceAccountTokens")
    }
}

/// What a TokenRequest asks for.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub namespace: String,
    pub service_account: ObjectRef,
    pub pod: Option<ObjectRef>,
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
}

impl ServiceAccountTokens {
    /// From the PKCS#8 private key and SPKI public key, PEM.
    pub fn new(private_pem: &str, public_pem: &str) -> Result<Self, jsonwebtoken::errors::Error> {
        Ok(Self {
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes())?,
            decoding: jsonwebtoken::DecodingKey::from_ec_pem(public_pem.as_bytes())?,
        })
    }

    /// A signed token and its expiry (Unix seconds).
    pub fn issue(&self, spec: &TokenSpec) -> Result<(String, i64), jsonwebtoken::errors::Error> {
        let now = jiff::Timestamp::now().as_second();
        let exp = now.saturating_add(spec.expiration_seconds);
        let claims = Claims {
            iss: API_AUDIENCE.into(),
            sub: service_account_user(&spec.namespace, &spec.service_account.name),
            aud: spec.audiences.clone(),
            exp,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            kube: KubeClaims { namespace: spec.namespace.clone(), serviceaccount: spec.service_account.clone(), pod: spec.pod.clone() },
        };
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        Ok((jsonwebtoken::encode(&header, &claims, &self.encoding)?, exp))
    }

    /// The claims of a token this server signed that has not expired and
    /// is meant for one of `audiences`. Whether the ServiceAccount (and
    /// pod) it names still exist is the caller's check.
    pub fn verify(&self, token: &str, audiences: &[&str]) -> Option<Claims> {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_issuer(&[API_AUDIENCE]);
        v.set_audience(audiences);
        v.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).ok().map(|d| d.claims)
    }
}

/// The authentication chain of one server.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens: HashMap<String, UserInfo>,
    service_accounts: Option<ServiceAccountTokens>,
}

impl Authenticator {
    pub fn new(tokens: Vec<(String, UserInfo)>, service_accounts: Option<ServiceAccountTokens>) -> Self {
        Self { tokens: tokens.into_iter().collect(), service_accounts }
    }

    pub fn service_accounts(&self) -> Option<&ServiceAccountTokens> {
        self.service_accounts.as_ref()
    }

    /// The user a bearer token stands for, if it is meant for one of
    /// `audiences` (static tokens are for the apiserver's audience).
    /// A ServiceAccount token also needs its ServiceAccount, and the pod it
    /// is bound to, to still exist with the uids it names.
    pub async fn token(&self, api: &super::Api, token: &str, audiences: &[&str]) -> Option<(UserInfo, Vec<String>)> {
        if let Some(u) = self.tokens.get(token) {
            return audiences.contains(&API_AUDIENCE).then(|| (u.clone().authenticated(), vec![API_AUDIENCE.to_string()]));
        }
        let claims = self.service_accounts.as_ref()?.verify(token, audiences)?;
        let ns = claims.kube.namespace.as_str();
        let uid_of = |o: &serde_json::Value| super::object::str_at(o, "/metadata/uid").to_string();
        let sa_res = crate::registry::find("", "v1", "serviceaccounts")?;
        let sa = api.get(sa_res, Some(ns), &claims.kube.serviceaccount.name).await.ok()?;
        if uid_of(&sa) != claims.kube.serviceaccount.uid {
            return None;
        }
        if let Some(p) = &claims.kube.pod {
            let pod_res = crate::registry::find("", "v1", "pods")?;
            let pod = api.get(pod_res, Some(ns), &p.name).await.ok()?;
            if uid_of(&pod) != p.uid {
                return None;
            }
        }
        let aud = claims.aud.iter().filter(|a| audiences.contains(&a.as_str())).cloned().collect();
        Some((claims.user(), aud))
    }

    /// The user a request comes from, in kube-apiserver's order: client
    /// certificate, then bearer token; anonymous when nothing is accepted.
    pub async fn authenticate(&self, api: &super::Api, headers: &HeaderMap, conn: Option<&Connection>) -> UserInfo {
        if let Some(u) = conn.and_then(|c| c.cert_user.clone()) {
            return u.authenticated();
        }
        match bearer(headers) {
            Some(t) => self.token(api, t, &[API_AUDIENCE]).await.map_or_else(UserInfo::anonymous, |(u, _)| u),
            None => UserInfo::anonymous(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_file_in_upstream_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "# comment\nt1,admin,1,\"system:masters\"\nt2,alice,2,\"dev,ops\"\nt3,bob,3\nt4, \"carol, c\" ,4,\"a \"\"b\"\"\"\n").unwrap();
        let t = load_token_file(&p).unwrap();
        assert_eq!(t[0].1.groups, ["system:masters"]);
        assert_eq!(t[1].1.groups, ["dev", "ops"]);
        assert!(t[2].1.groups.is_empty());
        assert_eq!(t[3].1.name, "carol, c");
        assert_eq!(t[3].1.groups, ["a \"b\""]);
        assert_eq!(t[1].1.clone().authenticated().groups, ["dev", "ops", AUTHENTICATED]);
        std::fs::write(&p, "lonely-token\n").unwrap();
        assert!(load_token_file(&p).is_err());
    }

    #[test]
    fn service_account_tokens_verify_signature_audience_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = crate::apiserver::tls::Pki::service_account_key(dir.path()).unwrap();
        let sat = ServiceAccountTokens::new(&private, &public).unwrap();
        let spec = TokenSpec {
            namespace: "ns1".into(),
            service_account: ObjectRef { name: "robot".into(), uid: "u1".into() },
            pod: Some(ObjectRef { name: "p".into(), uid: "pu".into() }),
            audiences: vec![API_AUDIENCE.into()],
            expiration_seconds: 600,
        };
        let (token, _) = sat.issue(&spec).unwrap();
        let c = sat.verify(&token, &[API_AUDIENCE]).unwrap();
        let u = c.user();
        assert_eq!(u.name, "system:serviceaccount:ns1:robot");
        assert_eq!(u.groups, ["system:serviceaccounts", "system:serviceaccounts:ns1", AUTHENTICATED]);
        assert_eq!(u.extra["authentication.kubernetes.io/pod-name"], ["p"]);
        assert!(sat.verify(&token, &["other"]).is_none(), "wrong audience");
        let expired = sat.issue(&TokenSpec { expiration_seconds: -10, ..spec.clone() }).unwrap().0;
        assert!(sat.verify(&expired, &[API_AUDIENCE]).is_none(), "expired");
        let mut forged = token.clone();
        forged.pop();
        assert!(sat.verify(&forged, &[API_AUDIENCE]).is_none(), "bad signature");
        let other_dir = tempfile::tempdir().unwrap();
        let (p2, k2) = crate::apiserver::tls::Pki::service_account_key(other_dir.path()).unwrap();
        let other = ServiceAccountTokens::new(&p2, &k2).unwrap();
        assert!(other.verify(&token, &[API_AUDIENCE]).is_none(), "another cluster's key");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
