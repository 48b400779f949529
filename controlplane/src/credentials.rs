//! Each component's own identity, issued by the cluster CA as kubeadm and
//! k3s do: a client-certificate kubeconfig per component (CN the user, O
//! the groups RBAC binds), and for a kubelet also the serving certificate
//! of its API. Nothing here uses the admin credential.
//!
//! | component          | user                              | groups         |
//! |--------------------|-----------------------------------|----------------|
//! | kubelet on node N  | `system:node:N`                   | `system:nodes` |
//! | scheduler          | `system:kube-scheduler`           |                |
//! | controller manager | `system:kube-controller-manager`  |                |

use std::path::{Path, PathBuf};

use crate::apiserver::tls::{self, Pki, TlsError};

pub use crate::apiserver::node_authz::NODES_GROUP;
pub const SCHEDULER_USER: &str = "system:kube-scheduler";
pub const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";

/// A kubelet's user name (what the Node authorizer keys on).
pub fn node_user(node: &str) -> String {
    format!("system:node:{node}")
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    tls::write_file(path, data.as_bytes(), mode).map_err(|(what, path, source)| TlsError::Io { what, path, source })
}

/// Writes a client-certificate kubeconfig for `user` in `groups` to `path`
/// (0600 from its first byte).
pub fn write_kubeconfig(pki: &Pki, server: &str, user: &str, groups: &[&str], path: &Path) -> Result<(), TlsError> {
    let cert = pki.issue_client_cert(user, groups)?;
    write(path, &tls::kubeconfig_with_cert(server, &pki.ca_pem, user, &cert), 0o600)
}

/// The files [`write_kubelet`] creates.
#[derive(Debug, Clone)]
pub struct KubeletFiles {
    /// `--kubeconfig`: `system:node:<node>` in `system:nodes`.
    pub kubeconfig: PathBuf,
    /// `--tls-cert-file` / `--tls-private-key-file`: the kubelet API's
    /// serving certificate for the node's address and name.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--client-ca-file`: the cluster CA.
    pub ca: PathBuf,
}

/// Issues node `node`'s kubelet credentials into `dir` (created 0700).
pub fn write_kubelet(pki: &Pki, server: &str, node: &str, node_ip: &str, dir: &Path) -> Result<KubeletFiles, TlsError> {
    tls::create_private_dir(dir).map_err(|source| TlsError::Io { what: "creating", path: dir.to_path_buf(), source })?;
    let files = KubeletFiles {
        kubeconfig: dir.join("kubelet.kubeconfig"),
        cert: dir.join("kubelet.crt"),
        key: dir.join("kubelet.key"),
        ca: dir.join("ca.crt"),
    };
    write_kubeconfig(pki, server, &node_user(node), &[NODES_GROUP], &files.kubeconfig)?;
    let serving = pki.issue_serving_cert(&node_user(node), &[node_ip.to_string(), node.to_string()])?;
    write(&files.key, &serving.key_pem, 0o600)?;
    write(&files.cert, &serving.cert_pem, 0o644)?;
    write(&files.ca, &pki.ca_pem, 0o644)?;
    Ok(files)
}
