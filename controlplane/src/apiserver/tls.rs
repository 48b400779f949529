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
    #[error("token file {path} has no token")]
    NoToken { path: PathBuf },
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

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
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
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver");
    p.distinguished_name = dn;
    p.subject_alt_names = sans
        .iter()
        .filter_map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Some(SanType::IpAddress(ip)),
            Err(_) => s.clone().try_into().ok().map(SanType::DnsName),
        })
        .collect();
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate().map_err(|source| TlsError::Cert { what: "serving key", source })?;
    let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(|source| TlsError::Cert { what: "serving certificate", source })?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    write(&dir.join("apiserver.crt"), &cert_pem, false)?;
    write(&dir.join("apiserver.key"), &key_pem, true)?;
    Ok(Pki { ca_pem, cert_pem, key_pem })
}

pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Tokens from a kube-apiserver static token file (`token,user,uid,"groups"`
/// per line) or a plain one-token-per-line file.
pub fn load_tokens(path: &Path) -> Result<Vec<String>> {
    let tokens: Vec<String> = read(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(',').next().map(|t| t.trim().to_string()))
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(TlsError::NoToken { path: path.to_path_buf() });
    }
    Ok(tokens)
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

pub fn write_kubeconfig(path: &Path, content: &str) -> Result<()> {
    write(path, content, true)
}
