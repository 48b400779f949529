//! A pod's hostname, `/etc/hostname` and `/etc/hosts`, as upstream
//! kubelet builds them (`GeneratePodHostNameAndDomain`,
//! `GetNodenameForKernel`, `managedHostsFileContent`,
//! `nodeHostsFileContent` in `pkg/kubelet`).

use k8s_openapi::api::core::v1::{HostAlias, Pod};

const MANAGED_HEADER: &str = "# Kubernetes-managed hosts file.\n";
const MANAGED_HEADER_HOST_NETWORK: &str = "# Kubernetes-managed hosts file (host network).\n";
/// The kernel's nodename holds 64 bytes with the terminating NUL.
const HOSTNAME_MAX_LEN: usize = 63;
const FQDN_MAX_LEN: usize = 64;

/// A pod's names: `hostname` (spec.hostname or the pod name, at most 63
/// characters), `domain` (`<subdomain>.<ns>.svc.<zone>` when
/// spec.subdomain is set, else empty) and `kernel` (what `hostname`
/// prints: the FQDN with `setHostnameAsFQDN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNames {
    pub hostname: String,
    pub domain: String,
    pub kernel: String,
}

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// # Errors
/// An invalid spec.hostname/spec.subdomain, or an FQDN hostname that does
/// not fit the kernel's 64 characters (upstream fails the sandbox too).
pub fn pod_names(pod: &Pod, cluster_domain: &str) -> Result<PodNames, String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref();
    let mut hostname = name.to_owned();
    if let Some(h) = spec
        .and_then(|s| s.hostname.as_deref())
        .filter(|h| !h.is_empty())
    {
        if !is_dns1123_label(h) {
            return Err(format!("pod Hostname {h:?} is not a valid DNS label"));
        }
        hostname = h.to_owned();
    }
    if hostname.len() > HOSTNAME_MAX_LEN {
        // Pod names may be 253 characters; a hostname may not end in - or .
        hostname = hostname[..HOSTNAME_MAX_LEN]
            .trim_end_matches(['-', '.'])
            .to_owned();
        if hostname.is_empty() {
            return Err(format!("hostname for pod {name:?} was invalid"));
        }
    }
    let mut domain = String::new();
    if let Some(sub) = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty())
    {
        if !is_dns1123_label(sub) {
            return Err(format!("pod Subdomain {sub:?} is not a valid DNS label"));
        }
        domain = format!("{sub}.{ns}.svc.{cluster_domain}");
    }
    let mut kernel = hostname.clone();
    if !domain.is_empty() && spec.and_then(|s| s.set_hostname_as_fqdn) == Some(true) {
        let fqdn = format!("{hostname}.{domain}");
        if fqdn.len() > FQDN_MAX_LEN {
            return Err(format!(
                "failed to construct FQDN from pod hostname and cluster domain, FQDN {fqdn} is too long ({FQDN_MAX_LEN} characters is the max, {} characters requested)",
                fqdn.len()
            ));
        }
        kernel = fqdn;
    }
    Ok(PodNames {
        hostname,
        domain,
        kernel,
    })
}

/// `/etc/hostname`.
pub fn hostname_file(names: &PodNames) -> String {
    format!("{}\n", names.kernel)
}

fn alias_entries(aliases: &[HostAlias]) -> String {
    if aliases.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n# Entries added by HostAliases.\n");
    for a in aliases {
        s += &format!(
            "{}\t{}\n",
            a.ip,
            a.hostnames.clone().unwrap_or_default().join("\t")
        );
    }
    s
}

/// `/etc/hosts` of a pod with its own network: localhost, the pod's
/// addresses with its names, then hostAliases.
pub fn managed_hosts(pod_ips: &[String], names: &PodNames, aliases: &[HostAlias]) -> String {
    let mut s = String::from(MANAGED_HEADER);
    s += "127.0.0.1\tlocalhost\n";
    s += "::1\tlocalhost ip6-localhost ip6-loopback\n";
    s += "fe00::0\tip6-localnet\n";
    s += "fe00::0\tip6-mcastprefix\n";
    s += "fe00::1\tip6-allnodes\n";
    s += "fe00::2\tip6-allrouters\n";
    for ip in pod_ips {
        if names.domain.is_empty() {
            s += &format!("{ip}\t{}\n", names.hostname);
        } else {
            s += &format!(
                "{ip}\t{}.{}\t{}\n",
                names.hostname, names.domain, names.hostname
            );
        }
    }
    s + &alias_entries(aliases)
}

/// `/etc/hosts` of a hostNetwork pod: the node's file plus hostAliases.
pub fn node_hosts(node_hosts: &str, aliases: &[HostAlias]) -> String {
    format!(
        "{MANAGED_HEADER_HOST_NETWORK}{node_hosts}{}",
        alias_entries(aliases)
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::PodSpec;

    use super::*;

    fn pod(name: &str, hostname: Option<&str>, subdomain: Option<&str>, fqdn: bool) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                hostname: hostname.map(Into::into),
                subdomain: subdomain.map(Into::into),
                set_hostname_as_fqdn: Some(fqdn),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn names_follow_hostname_subdomain_and_fqdn() {
        let n = pod_names(&pod("web-0", None, None, false), "cluster.local").unwrap();
        assert_eq!(
            (n.hostname.as_str(), n.domain.as_str(), n.kernel.as_str()),
            ("web-0", "", "web-0")
        );
        let n = pod_names(
            &pod("web-0", Some("db"), Some("nodes"), false),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(
            (n.hostname.as_str(), n.domain.as_str(), n.kernel.as_str()),
            ("db", "nodes.default.svc.cluster.local", "db")
        );
        let n = pod_names(
            &pod("web-0", Some("db"), Some("nodes"), true),
            "cluster.local",
        )
        .unwrap();
        assert_eq!(n.kernel, "db.nodes.default.svc.cluster.local");
        assert_eq!(hostname_file(&n), "db.nodes.default.svc.cluster.local\n");
        // Truncated to 63, trailing '-' trimmed (upstream TestTruncatePodHostname).
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        assert_eq!(
            pod_names(&pod(&long, None, None, false), "cluster.local")
                .unwrap()
                .hostname,
            "a".repeat(62)
        );
        assert!(pod_names(&pod("p", Some("Not_A_Label"), None, false), "cluster.local").is_err());
        assert!(pod_names(&pod("p", None, Some("-bad"), false), "cluster.local").is_err());
        let too_long = pod(&"x".repeat(40), None, Some("nodes"), true);
        assert!(
            pod_names(&too_long, "cluster.local")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn hosts_files_match_upstream() {
        // Upstream TestManagedHostsFileContent, "hostDomainName" case.
        let names = PodNames {
            hostname: "hostName".into(),
            domain: "domain.com".into(),
            kernel: "hostName".into(),
        };
        let aliases = vec![HostAlias {
            ip: "123.45.67.89".into(),
            hostnames: Some(vec!["foo".into(), "bar".into(), "baz".into()]),
        }];
        assert_eq!(
            managed_hosts(&["203.0.113.1".into()], &names, &aliases),
            "# Kubernetes-managed hosts file.\n\
             127.0.0.1\tlocalhost\n\
             ::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\n\
             fe00::0\tip6-mcastprefix\n\
             fe00::1\tip6-allnodes\n\
             fe00::2\tip6-allrouters\n\
             203.0.113.1\thostName.domain.com\thostName\n\
             \n\
             # Entries added by HostAliases.\n\
             123.45.67.89\tfoo\tbar\tbaz\n"
        );
        let plain = PodNames {
            hostname: "web-0".into(),
            domain: String::new(),
            kernel: "web-0".into(),
        };
        assert!(
            managed_hosts(&["10.42.1.5".into()], &plain, &[])
                .ends_with("fe00::2\tip6-allrouters\n10.42.1.5\tweb-0\n")
        );
        assert_eq!(
            node_hosts("127.0.0.1 localhost\n", &aliases),
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n\n# Entries added by HostAliases.\n123.45.67.89\tfoo\tbar\tbaz\n"
        );
    }
}
