//! PKI and credentials: a CA generated once per data directory, a serving
//! certificate re-issued at every start (so new SANs take effect without
//! invalidating kubeconfigs that trust the CA), the token file, and the
//! admin kubeconfig.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, #[source] source: std::io::Error },
    #[error("generating {what}: {source}")]
    Cert { what: &'static str, #[source] source: rcgen::Error },
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    TokenFile(#[from] super::authn::TokenFileError),
    #[error("reading PEM: {0}")]
    Pem(String),
}

type Result<T> = std::result::Result<T, TlsError>;

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| TlsError::Io { what: "reading", path: path.to_path_buf(), source })
}

/// Writes `data` to `path` through a temporary file that is created with
/// its final mode (0600 for secrets, 0644 otherwise) — a secret is never
/// readable by others, not even for the moment between a write and a
/// chmod — fsynced, renamed over `path`, and the directory fsynced.
fn write(path: &Path, data: &str, private: bool) -> Result<()> {
    write_file(path, data.as_bytes(), if private { 0o600 } else { 0o644 })
        .map_err(|(what, path, source)| TlsError::Io { what, path, source })
}

/// [`write`]'s mechanics, for other secret files (kubelet keys, component
/// kubeconfigs); the error names the step and the file.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> std::result::Result<(), (&'static str, PathBuf, std::io::Error)> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| ("creating", tmp.clone(), e))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| ("writing", tmp.clone(), e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| ("renaming", path.to_path_buf(), e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ("syncing", dir.to_path_buf(), e))?;
    }
    Ok(())
}

/// Creates `dir` (and missing parents) mode 0700 from the start; an
/// existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The CA's fixed parameters: re-creating the CA certificate from the same
/// key and subject signs certificates that verify against the saved one.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "riptide-ca");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

/// A certificate the CA signs: subject CN (and O per group), one usage.
fn leaf_params(cn: &str, orgs: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    p.distinguished_name = dn;
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    p
}

pub struct Pki {
    pub ca_pem: String,
    /// The apiserver's serving certificate and key (empty when loaded with
    /// [`Pki::load`], which only signs).
    pub cert_pem: String,
    pub key_pem: String,
    ca_key_pem: String,
}

/// A certificate the cluster CA issued and its key, PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The user kube-apiserver presents to kubelets (kubeadm's
/// `apiserver-kubelet-client` certificate); `system:kubelet-api-admin`
/// is bound to it.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

fn sans_of(names: &[String]) -> Vec<SanType> {
    names
        .iter()
        .filter_map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect()
}

impl Pki {
    /// The CA of a data directory's `pki/` that an apiserver already
    /// created, for issuing credentials (`riptide-controlplane credentials`).
    pub fn load(dir: &Path) -> Result<Self> {
        let ca_key_pem = read(&dir.join("ca.key"))?;
        let ca_pem = read(&dir.join("ca.crt"))?;
        Ok(Self { ca_pem, cert_pem: String::new(), key_pem: String::new(), ca_key_pem })
    }

    fn issue(&self, p: CertificateParams, what: &'static str) -> Result<ClientCert> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(|source| TlsError::Cert { what: "CA key", source })?;
        let ca_cert = ca_params().self_signed(&ca_key).map_err(|source| TlsError::Cert { what: "CA certificate", source })?;
        let key = KeyPair::generate().map_err(|source| TlsError::Cert { what, source })?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(|source| TlsError::Cert { what, source })?;
        Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A client certificate signed by the cluster CA for `user` in
    /// `groups` (CN and O, which the apiserver reads back as the identity).
    pub fn issue_client_cert(&self, user: &str, groups: &[&str]) -> Result<ClientCert> {
        self.issue(leaf_params(user, groups, rcgen::ExtendedKeyUsagePurpose::ClientAuth), "client certificate")
    }

    /// A serving certificate signed by the cluster CA for `names` (IPs or
    /// DNS names), e.g. a kubelet's for its node address.
    pub fn issue_serving_cert(&self, cn: &str, names: &[String]) -> Result<ClientCert> {
        let mut p = leaf_params(cn, &[], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        p.subject_alt_names = sans_of(names);
        self.issue(p, "serving certificate")
    }

    /// The ServiceAccount token signing key (`sa.key`, created once next to
    /// the CA, like kubeadm's), as PKCS#8 PEM and its public key PEM.
    pub fn service_account_key(dir: &Path) -> Result<(String, String)> {
        let path = dir.join("sa.key");
        let key = if path.exists() {
            KeyPair::from_pem(&read(&path)?).map_err(|source| TlsError::Cert { what: "service account key", source })?
        } else {
            let k = KeyPair::generate().map_err(|source| TlsError::Cert { what: "service account key", source })?;
            write(&path, &k.serialize_pem(), true)?;
            k
        };
        Ok((key.serialize_pem(), key.public_key_pem()))
    }
}

/// Load or create the CA under `dir` (a 0700 directory) and issue a
/// serving certificate for `sans` (DNS names or IPs) plus the usual
/// in-cluster names.
pub fn ensure_pki(dir: &Path, extra_sans: &[String]) -> Result<Pki> {
    create_private_dir(dir).map_err(|source| TlsError::Io { what: "creating", path: dir.to_path_buf(), source })?;
    let ca_key_path = dir.join("ca.key");
    let ca_crt_path = dir.join("ca.crt");
    let ca_key = if ca_key_path.exists() {
        KeyPair::from_pem(&read(&ca_key_path)?).map_err(|source| TlsError::Cert { what: "CA key", source })?
    } else {
        let k = KeyPair::generate().map_err(|source| TlsError::Cert { what: "CA key", source })?;
        write(&ca_key_path, &k.serialize_pem(), true)?;
        k
    };
    let ca_cert = ca_params().self_signed(&ca_key).map_err(|source| TlsError::Cert { what: "CA certificate", source })?;
    if !ca_crt_path.exists() {
        write(&ca_crt_path, &ca_cert.pem(), false)?;
    }
    let ca_pem = read(&ca_crt_path)?;
    let mut pki = Pki { ca_pem, cert_pem: String::new(), key_pem: String::new(), ca_key_pem: ca_key.serialize_pem() };

    let mut sans: Vec<String> = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", "127.0.0.1", "::1", "10.43.0.1"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    sans.extend(extra_sans.iter().cloned());
    let serving = pki.issue_serving_cert("kube-apiserver", &sans)?;
    write(&dir.join("apiserver.crt"), &serving.cert_pem, false)?;
    write(&dir.join("apiserver.key"), &serving.key_pem, true)?;
    pki.cert_pem = serving.cert_pem;
    pki.key_pem = serving.key_pem;
    Ok(pki)
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<std::result::Result<_, _>>().map_err(|e| TlsError::Pem(e.to_string()))
}

fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem(e.to_string()))
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs(ca_pem)? {
        roots.add(ca)?;
    }
    Ok(Arc::new(roots))
}

pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    serving_config(&pki.cert_pem, &pki.key_pem, &pki.ca_pem)
}

/// A TLS server presenting `cert_pem`/`key_pem` that accepts client
/// certificates signed by `client_ca_pem` as an identity and lets clients
/// without one (bearer tokens) through the handshake.
pub fn serving_config(cert_pem: &str, key_pem: &str, client_ca_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(client_ca_pem)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Pem(format!("client certificate verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(cert_pem)?, pem_key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS client that trusts only `ca_pem` and presents `cert` (the
/// apiserver dialing kubelets). HTTP/1.1 only: exec is an HTTP/1.1 upgrade.
pub fn client_config(ca_pem: &str, cert: &ClientCert) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(pem_certs(&cert.cert_pem)?, pem_key(&cert.key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Create a token file with one random admin token if none exists.
pub fn ensure_token_file(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    write(path, &format!("{token},admin,admin,\"system:masters\"\n"), true)
}

pub fn kubeconfig(server: &str, ca_pem: Option<&str>, token: &str) -> String {
    let cluster = match ca_pem {
        Some(ca) => format!(
            "    certificate-authority-data: {}\n    server: {server}\n",
            base64::engine::general_purpose::STANDARD.encode(ca)
        ),
        None => format!("    server: {server}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: riptide\n  cluster:\n{cluster}contexts:\n- name: riptide-admin\n  context:\n    cluster: riptide\n    user: admin\n    namespace: default\ncurrent-context: riptide-admin\nusers:\n- name: admin\n  user:\n    token: {token}\npreferences: {{}}\n"
    )
}

/// A kubeconfig that authenticates with a client certificate.
pub fn kubeconfig_with_cert(server: &str, ca_pem: &str, user: &str, cert: &ClientCert) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: riptide\n  cluster:\n    certificate-authority-data: {}\n    server: {server}\ncontexts:\n- name: riptide\n  context:\n    cluster: riptide\n    user: {user:?}\ncurrent-context: riptide\nusers:\n- name: {user:?}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\npreferences: {{}}\n",
        b64(ca_pem),
        b64(&cert.cert_pem),
        b64(&cert.key_pem)
    )
}

pub fn write_kubeconfig(path: &Path, content: &str) -> Result<()> {
    write(path, content, true)
}
