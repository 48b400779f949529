//! A pod's own `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname`:
//! built ([`dns`], [`hosts`]), written under the pod's state directory
//! (0644, removed with the pod) and shown to the pod's processes through
//! its mount namespace ([`mntns`]).
//!
//! A hostNetwork pod keeps the node's files and hostname unless its
//! resolver settings differ from the node's (`ClusterFirstWithHostNet`,
//! `None`, a `dnsConfig`) or it has hostAliases; then it gets a generated
//! resolv.conf and the node's hosts file plus its aliases, as upstream.

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::Pod;

use super::{
    Config, Error,
    dns::{self, NodeDns},
    hosts, mntns,
    state::pod_dir,
};

/// What the sandbox needs from the pod's /etc files.
#[derive(Debug, Default)]
pub struct PodEtc {
    /// The pinned mount namespace (None: the node's).
    pub mntns: Option<PathBuf>,
    /// The UTS hostname (None: the node's).
    pub hostname: Option<String>,
    /// Events to record on the pod (reason, message), as upstream does.
    pub warnings: Vec<(&'static str, String)>,
}

/// The node's resolver settings from `--resolv-conf` (None when the flag
/// is empty).
fn node_dns(cfg: &Config) -> Result<NodeDns, Error> {
    let host = match &cfg.resolv_conf {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| Error::Sandbox(format!("reading {}: {e}", p.display())))?;
            Some(
                dns::parse_resolv_conf(&text)
                    .map_err(|e| Error::Sandbox(format!("parsing {}: {e}", p.display())))?,
            )
        }
    };
    Ok(NodeDns {
        cluster_dns: cfg.cluster_dns.clone(),
        cluster_domain: cfg.cluster_domain.clone(),
        host,
        node_ips: cfg.node_ip.parse::<IpAddr>().into_iter().collect(),
    })
}

/// Writes `content` to `path` in place (truncating), mode 0644: a file
/// already bind-mounted into the pod keeps its inode.
fn write(path: &Path, content: &str) -> Result<(), Error> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| Error::Sandbox(format!("writing {}: {e}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(|e| Error::Sandbox(format!("writing {}: {e}", path.display())))
}

/// Builds and mounts the pod's /etc files; `ip` is the pod's address.
/// Blocking (file writes, a namespace thread): call from a blocking task.
pub fn setup(cfg: &Config, pod: &Pod, uid: &str, ip: Option<&str>) -> Result<PodEtc, Error> {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let aliases = spec
        .and_then(|s| s.host_aliases.clone())
        .unwrap_or_default();
    if host_network && dns::uses_node_resolver(pod) && aliases.is_empty() {
        return Ok(PodEtc::default());
    }
    let (resolv, warnings) = dns::pod_dns(pod, &node_dns(cfg)?);
    let dir = pod_dir(&cfg.root_dir, uid);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Sandbox(format!("creating {}: {e}", dir.display())))?;
    let mut binds = Vec::new();
    let mut add = |name: &str, target: &str, content: &str| -> Result<(), Error> {
        let source = dir.join(name);
        write(&source, content)?;
        binds.push(mntns::Bind {
            source,
            target: PathBuf::from(target),
        });
        Ok(())
    };
    add("resolv.conf", "/etc/resolv.conf", &dns::render(&resolv))?;
    let hostname = if host_network {
        let node = std::fs::read_to_string("/etc/hosts")
            .map_err(|e| Error::Sandbox(format!("reading /etc/hosts: {e}")))?;
        add("hosts", "/etc/hosts", &hosts::node_hosts(&node, &aliases))?;
        None
    } else {
        let names = hosts::pod_names(pod, &cfg.cluster_domain).map_err(Error::Sandbox)?;
        let ips: Vec<String> = ip.into_iter().map(str::to_owned).collect();
        add(
            "hosts",
            "/etc/hosts",
            &hosts::managed_hosts(&ips, &names, &aliases),
        )?;
        add("hostname", "/etc/hostname", &hosts::hostname_file(&names))?;
        Some(names.kernel)
    };
    let ns = mntns::create(&cfg.root_dir, uid, &binds)?;
    Ok(PodEtc {
        mntns: Some(ns),
        hostname,
        warnings,
    })
}
