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

fn write(path: &Path, data: &str, private: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(|source| TlsError::Io { what: "writing", path: tmp.clone(), source })?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600));
    }
    fs::rename(&tmp, path).map_err(|source| TlsError::Io { what: "renaming", path: path.to_path_buf(), source })
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
    pub cert_pem: String,
    pub key_pem: String,
    ca_key_pem: String,
}

/// A client certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A client certificate signed by the cluster CA for `user` in
    /// `groups` (CN and O, which the apiserver reads back as the identity).
    pub fn issue_client_cert(&self, user: &str, groups: &[&str]) -> Result<ClientCert> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(|source| TlsError::Cert { what: "CA key", source })?;
        let ca_cert = ca_params().self_signed(&ca_key).map_err(|source| TlsError::Cert { what: "CA certificate", source })?;
        let p = leaf_params(user, groups, rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let key = KeyPair::generate().map_err(|source| TlsError::Cert { what: "client key", source })?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(|source| TlsError::Cert { what: "client certificate", source })?;
        Ok(ClientCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
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

/// Load or create the CA under `dir` and issue a serving certificate for
/// `sans` (DNS names or IPs) plus the usual in-cluster names.
pub fn ensure_pki(dir: &Path, extra_sans: &[String]) -> Result<Pki> {
    fs::create_dir_all(dir).map_err(|source| TlsError::Io { what: "creating", path: dir.to_path_buf(), source })?;
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

    let mut sans: Vec<String> = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", "127.0.0.1", "::1", "10.43.0.1"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    sans.extend(extra_sans.iter().cloned());
    let mut p = leaf_params("kube-apiserver", &[], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    p.subject_alt_names = sans
        .iter()
        .filter_map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect();
    let key = KeyPair::generate().map_err(|source| TlsError::Cert { what: "serving key", source })?;
    let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(|source| TlsError::Cert { what: "serving certificate", source })?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    write(&dir.join("apiserver.crt"), &cert_pem, false)?;
    write(&dir.join("apiserver.key"), &key_pem, true)?;
    Ok(Pki { ca_pem, cert_pem, key_pem, ca_key_pem: ca_key.serialize_pem() })
}

pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Client certificates signed by the cluster CA are an identity; clients
    // without one (bearer tokens) are still let through the handshake.
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(ca.map_err(|e| TlsError::Pem(e.to_string()))?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Pem(format!("client certificate verifier: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
