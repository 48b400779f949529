//! A pod's `/etc/resolv.conf`, following upstream kubelet
//! (`pkg/kubelet/network/dns/dns.go`, `GetPodDNS`) and the file layout a
//! CRI runtime writes from it (containerd: `search`, `nameserver`s,
//! `options`).
//!
//! - `ClusterFirst` (the default): the cluster DNS servers only, searches
//!   `<ns>.svc.<zone> svc.<zone> <zone>` then the node's, `options ndots:5`.
//!   A hostNetwork pod falls back to `Default`; `ClusterFirstWithHostNet`
//!   is `ClusterFirst` for hostNetwork pods too.
//! - `Default`: the node's resolver configuration (`--resolv-conf`).
//! - `None`: only what `dnsConfig` says.
//! - `dnsConfig` is merged on top (nameservers and searches appended
//!   without duplicates, options overriding by name), then cut to the libc
//!   limits: 3 nameservers, 32 search domains, 2048 characters of search
//!   line, no search domain longer than 253 characters.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, PodDNSConfig};

/// Linux libc limits, as upstream's `validation.MaxDNS*`.
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCH_PATHS: usize = 32;
pub const MAX_SEARCH_LIST_CHARS: usize = 2048;
/// glibc aborts on longer search domains (DNS1123SubdomainMaxLength).
const MAX_SEARCH_DOMAIN_LEN: usize = 253;
/// Upstream `defaultDNSOptions`.
const CLUSTER_OPTIONS: &[&str] = &["ndots:5"];

/// Resolver settings: what a resolv.conf says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    /// `name` or `name:value`, one entry per name.
    pub options: Vec<String>,
}

/// What the node contributes to every pod's DNS settings.
#[derive(Debug, Clone, Default)]
pub struct NodeDns {
    /// `--cluster-dns`.
    pub cluster_dns: Vec<IpAddr>,
    /// `--cluster-domain` (empty: no cluster searches).
    pub cluster_domain: String,
    /// The parsed `--resolv-conf`; `None` when the flag is empty, which
    /// upstream turns into a resolver that cannot look anything up.
    pub host: Option<ResolvConf>,
    pub node_ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cluster,
    Host,
    None,
}

/// Parses a resolv.conf as upstream `parseResolvConf`: `nameserver` lines
/// accumulate, the last `search` line wins (trailing dots dropped, `.`
/// ignored), `options` accumulate with later ones overriding by name.
///
/// # Errors
/// A `nameserver` line without an address.
pub fn parse_resolv_conf(text: &str) -> Result<ResolvConf, String> {
    let mut rc = ResolvConf::default();
    let mut errors = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["nameserver", addr, ..] => rc.nameservers.push((*addr).to_owned()),
            ["nameserver"] => errors.push("nameserver list is empty".to_owned()),
            ["search", domains @ ..] => {
                rc.searches = domains
                    .iter()
                    .filter(|d| **d != ".")
                    .map(|d| d.trim_end_matches('.').to_owned())
                    .collect();
            }
            ["options", opts @ ..] => {
                append_options(&mut rc.options, opts.iter().map(|o| (*o).to_owned()))
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(rc)
    } else {
        Err(errors.join("; "))
    }
}

fn option_name(o: &str) -> &str {
    o.split(':').next().unwrap_or(o)
}

/// Adds options, a later one replacing an earlier one of the same name in
/// place (upstream `appendOptions`, with a stable order).
fn append_options(options: &mut Vec<String>, new: impl IntoIterator<Item = String>) {
    for o in new {
        match options
            .iter_mut()
            .find(|e| option_name(e) == option_name(&o))
        {
            Some(e) => *e = o,
            None => options.push(o),
        }
    }
}

fn omit_duplicates(v: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for s in v {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

fn kind(pod: &Pod) -> Kind {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    match spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst")
    {
        "None" => Kind::None,
        "Default" => Kind::Host,
        "ClusterFirst" if host_network => Kind::Host,
        // ClusterFirst, ClusterFirstWithHostNet, and (as upstream, which
        // logs it) anything the apiserver should have rejected.
        _ => Kind::Cluster,
    }
}

/// Whether the pod's resolver settings are the node's own (a hostNetwork
/// pod in that case keeps the node's `/etc` files).
pub fn uses_node_resolver(pod: &Pod) -> bool {
    kind(pod) == Kind::Host
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.dns_config.as_ref())
            .is_none()
}

/// The pod's resolver settings (upstream `GetPodDNS`), and the warnings
/// upstream records as events (`MissingClusterDNS`, `DNSConfigForming`).
pub fn pod_dns(pod: &Pod, node: &NodeDns) -> (ResolvConf, Vec<(&'static str, String)>) {
    let mut warnings = Vec::new();
    let mut kind = kind(pod);
    let mut rc = node.host.clone().unwrap_or_default();
    if kind == Kind::Cluster && node.cluster_dns.is_empty() {
        warnings.push((
            "MissingClusterDNS",
            "kubelet does not have ClusterDNS IP configured and cannot create Pod using \"ClusterFirst\" policy. Falling back to \"Default\" policy."
                .to_owned(),
        ));
        kind = Kind::Host;
    }
    match kind {
        Kind::None => rc = ResolvConf::default(),
        Kind::Cluster => {
            rc.nameservers = node.cluster_dns.iter().map(ToString::to_string).collect();
            rc.searches = cluster_searches(
                pod.metadata.namespace.as_deref().unwrap_or("default"),
                &node.cluster_domain,
                rc.searches,
            );
            rc.options = CLUSTER_OPTIONS.iter().map(|o| (*o).to_owned()).collect();
        }
        Kind::Host if node.host.is_none() => {
            // `--resolv-conf=""`: a resolver that looks nothing up.
            rc.nameservers = node
                .node_ips
                .iter()
                .map(|ip| if ip.is_ipv6() { "::" } else { "0.0.0.0" }.to_owned())
                .collect();
            rc.searches = vec![".".to_owned()];
        }
        Kind::Host => {}
    }
    if let Some(cfg) = pod.spec.as_ref().and_then(|s| s.dns_config.as_ref()) {
        merge(&mut rc, cfg);
    }
    fit_limits(&mut rc, &mut warnings);
    (rc, warnings)
}

/// Upstream `generateSearchesForDNSClusterFirst`.
fn cluster_searches(namespace: &str, zone: &str, host: Vec<String>) -> Vec<String> {
    if zone.is_empty() {
        return host;
    }
    let mut s = vec![
        format!("{namespace}.svc.{zone}"),
        format!("svc.{zone}"),
        zone.to_owned(),
    ];
    s.extend(host);
    omit_duplicates(s)
}

/// Upstream `appendDNSConfig`.
fn merge(rc: &mut ResolvConf, cfg: &PodDNSConfig) {
    rc.nameservers = omit_duplicates(
        [
            std::mem::take(&mut rc.nameservers),
            cfg.nameservers.clone().unwrap_or_default(),
        ]
        .concat(),
    );
    rc.searches = omit_duplicates(
        [
            std::mem::take(&mut rc.searches),
            cfg.searches.clone().unwrap_or_default(),
        ]
        .concat(),
    );
    let opts = cfg.options.iter().flatten().filter_map(|o| {
        let name = o.name.as_deref()?;
        Some(match o.value.as_deref().filter(|v| !v.is_empty()) {
            Some(v) => format!("{name}:{v}"),
            None => name.to_owned(),
        })
    });
    append_options(&mut rc.options, opts);
}

/// Upstream `formDNSConfigFitsLimits`.
fn fit_limits(rc: &mut ResolvConf, warnings: &mut Vec<(&'static str, String)>) {
    if rc.nameservers.len() > MAX_NAMESERVERS {
        rc.nameservers.truncate(MAX_NAMESERVERS);
        warnings.push((
            "DNSConfigForming",
            format!(
                "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
                rc.nameservers.join(" ")
            ),
        ));
    }
    let mut exceeded = false;
    if rc.searches.len() > MAX_SEARCH_PATHS {
        rc.searches.truncate(MAX_SEARCH_PATHS);
        exceeded = true;
    }
    let before = rc.searches.len();
    rc.searches.retain(|s| s.len() <= MAX_SEARCH_DOMAIN_LEN);
    exceeded |= rc.searches.len() != before;
    // Drop domains from the end until the line fits.
    while rc.searches.join(" ").len() > MAX_SEARCH_LIST_CHARS {
        rc.searches.pop();
        exceeded = true;
    }
    if exceeded {
        warnings.push((
            "DNSConfigForming",
            format!(
                "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
                rc.searches.join(" ")
            ),
        ));
    }
}

/// The file, as containerd writes it from the CRI DNS config.
pub fn render(rc: &ResolvConf) -> String {
    let mut s = String::new();
    if !rc.searches.is_empty() {
        s += &format!("search {}\n", rc.searches.join(" "));
    }
    for n in &rc.nameservers {
        s += &format!("nameserver {n}\n");
    }
    if !rc.options.is_empty() {
        s += &format!("options {}\n", rc.options.join(" "));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use k8s_openapi::api::core::v1::{PodDNSConfigOption, PodSpec};

    use super::*;

    fn pod(ns: &str, policy: Option<&str>, host_network: bool, cfg: Option<PodDNSConfig>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                dns_policy: policy.map(Into::into),
                host_network: Some(host_network),
                dns_config: cfg,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(host: &str) -> NodeDns {
        NodeDns {
            cluster_dns: vec!["10.43.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            host: Some(parse_resolv_conf(host).unwrap()),
            node_ips: vec!["198.18.0.11".parse().unwrap()],
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_resolv_conf_like_upstream() {
        // Cases from upstream dns_test.go TestParseResolvConf.
        let rc =
            parse_resolv_conf("nameserver 1.2.3.4\nnameserver 2.3.4.5\nsearch foo bar\n").unwrap();
        assert_eq!(rc.nameservers, strings(&["1.2.3.4", "2.3.4.5"]));
        assert_eq!(rc.searches, strings(&["foo", "bar"]));
        let rc = parse_resolv_conf("search foo\nsearch bar.\n# search baz\n").unwrap();
        assert_eq!(rc.searches, strings(&["bar"]));
        let rc = parse_resolv_conf("search .\n").unwrap();
        assert!(rc.searches.is_empty());
        let rc = parse_resolv_conf("options ndots:5 attempts:2\noptions ndots:1 debug\n").unwrap();
        assert_eq!(rc.options, strings(&["ndots:1", "attempts:2", "debug"]));
        assert!(parse_resolv_conf("nameserver\n").is_err());
    }

    #[test]
    fn cluster_first_uses_cluster_dns_and_appends_host_searches() {
        let n = node("nameserver 10.255.255.53\nsearch corp.example\noptions timeout:1\n");
        let (rc, w) = pod_dns(&pod("team", None, false, None), &n);
        assert!(w.is_empty());
        assert_eq!(
            render(&rc),
            "search team.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.43.0.10\noptions ndots:5\n"
        );
        // hostNetwork: ClusterFirst means the node's; ClusterFirstWithHostNet the cluster's.
        let (rc, _) = pod_dns(&pod("team", Some("ClusterFirst"), true, None), &n);
        assert_eq!(
            render(&rc),
            "search corp.example\nnameserver 10.255.255.53\noptions timeout:1\n"
        );
        let (rc, _) = pod_dns(
            &pod("team", Some("ClusterFirstWithHostNet"), true, None),
            &n,
        );
        assert_eq!(rc.nameservers, strings(&["10.43.0.10"]));
        assert!(!uses_node_resolver(&pod(
            "team",
            Some("ClusterFirstWithHostNet"),
            true,
            None
        )));
        assert!(uses_node_resolver(&pod(
            "team",
            Some("ClusterFirst"),
            true,
            None
        )));
    }

    #[test]
    fn default_none_and_missing_cluster_dns() {
        let n = node("nameserver 10.255.255.53\nsearch corp.example\n");
        let (rc, _) = pod_dns(&pod("ns", Some("Default"), false, None), &n);
        assert_eq!(
            render(&rc),
            "search corp.example\nnameserver 10.255.255.53\n"
        );
        // None: only dnsConfig (upstream's TestGetPodDNSCustom "DNSNone").
        let cfg = PodDNSConfig {
            nameservers: Some(strings(&["203.0.113.1"])),
            searches: Some(strings(&["my.domain", "second.domain"])),
            options: Some(vec![PodDNSConfigOption {
                name: Some("ndots".into()),
                value: Some("3".into()),
            }]),
        };
        let (rc, _) = pod_dns(&pod("ns", Some("None"), false, Some(cfg)), &n);
        assert_eq!(
            render(&rc),
            "search my.domain second.domain\nnameserver 203.0.113.1\noptions ndots:3\n"
        );
        // No --cluster-dns: ClusterFirst falls back to Default with a warning.
        let mut no_dns = n.clone();
        no_dns.cluster_dns.clear();
        let (rc, w) = pod_dns(&pod("ns", None, false, None), &no_dns);
        assert_eq!(rc.nameservers, strings(&["10.255.255.53"]));
        assert_eq!(w[0].0, "MissingClusterDNS");
        // --resolv-conf="": nothing resolvable.
        let mut blank = n;
        blank.host = None;
        let (rc, _) = pod_dns(&pod("ns", Some("Default"), false, None), &blank);
        assert_eq!(render(&rc), "search .\nnameserver 0.0.0.0\n");
    }

    #[test]
    fn dns_config_merges_into_cluster_first() {
        // Upstream TestGetPodDNSCustom "DNSClusterFirst with DNSConfig".
        let n = node("nameserver 10.255.255.53\nsearch corp.example\n");
        let cfg = PodDNSConfig {
            nameservers: Some(strings(&["203.0.113.1", "10.43.0.10"])),
            searches: Some(strings(&["my.domain", "svc.cluster.local"])),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("3".into()),
                },
                PodDNSConfigOption {
                    name: Some("debug".into()),
                    value: None,
                },
            ]),
        };
        let (rc, w) = pod_dns(&pod("ns", Some("ClusterFirst"), false, Some(cfg)), &n);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(rc.nameservers, strings(&["10.43.0.10", "203.0.113.1"]));
        assert_eq!(
            rc.searches,
            strings(&[
                "ns.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "my.domain"
            ])
        );
        assert_eq!(rc.options, strings(&["ndots:3", "debug"]));
    }

    #[test]
    fn limits_are_applied_with_warnings() {
        let n = node("nameserver 10.255.255.53\n");
        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let cfg = PodDNSConfig {
            nameservers: Some(strings(&["203.0.113.1", "203.0.113.2", "203.0.113.3"])),
            searches: Some(many),
            options: None,
        };
        let (rc, w) = pod_dns(&pod("ns", None, false, Some(cfg)), &n);
        assert_eq!(rc.nameservers.len(), MAX_NAMESERVERS);
        assert_eq!(rc.searches.len(), MAX_SEARCH_PATHS);
        assert_eq!(
            w.iter().filter(|(r, _)| *r == "DNSConfigForming").count(),
            2
        );
        // Too long in characters: cut from the end; over-long domains dropped.
        let long: Vec<String> = (0..20)
            .map(|i| format!("{i:02}{}", "x".repeat(150)))
            .collect();
        let cfg = PodDNSConfig {
            searches: Some([vec!["y".repeat(254)], long].concat()),
            ..Default::default()
        };
        let (rc, w) = pod_dns(&pod("ns", Some("None"), false, Some(cfg)), &n);
        assert!(rc.searches.join(" ").len() <= MAX_SEARCH_LIST_CHARS);
        assert_eq!(
            rc.searches.len(),
            13,
            "13 × 153 - 1 = 1988 characters fit, 14 do not"
        );
        assert!(rc.searches.iter().all(|s| s.len() <= MAX_SEARCH_DOMAIN_LEN));
        assert_eq!(w.len(), 1);
    }
}
