//! The network configuration on stdin: one entry of a conflist, with the
//! fields the runtime injects (`cniVersion`, `name`, `prevResult`,
//! `cni.dev/valid-attachments`, `runtimeConfig`).
//!
//! ```json
//! { "cniVersion": "1.1.0", "name": "riptide", "type": "riptide",
//!   "nodeName": "node-1", "podCIDR": "10.42.1.0/24",
//!   "stateDir": "/var/lib/cni/riptide/node-1", "mtu": 1500,
//!   "dns": { "nameservers": ["10.43.0.10"] } }
//! ```

use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::{
    env::Command,
    types::{Attachment, CniError, CniResult, Dns, Version, code, supported},
};

/// The cluster's pod network (k3s default). Every node's podCIDR lies in it.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";
/// Where node state lives when the config names no `stateDir`.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/cni/riptide";
pub const DEFAULT_MTU: u32 = 1500;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    #[serde(rename = "type", default)]
    plugin_type: String,
    node_name: Option<String>,
    #[serde(rename = "podCIDR")]
    pod_cidr: Option<String>,
    /// A file holding the podCIDR (written by whoever learns it from the
    /// Node object), for configs installed before the node has a range.
    #[serde(rename = "podCIDRFile")]
    pod_cidr_file: Option<PathBuf>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    state_dir: Option<PathBuf>,
    mtu: Option<u32>,
    #[serde(default)]
    dns: Dns,
    prev_result: Option<serde_json::Value>,
    ipam: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
}

/// Where the node's pod range comes from.
#[derive(Debug, Clone)]
pub enum PodCidrSource {
    Inline(Ipv4Network),
    File(PathBuf),
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    pub node: String,
    pub pod_cidr: PodCidrSource,
    pub cluster_cidr: Ipv4Network,
    pub state_dir: PathBuf,
    pub mtu: u32,
    pub dns: Dns,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// Decodes and validates `stdin` for `command`, in the order of the
/// reference skeleton: JSON (6), network name (7), version (1), then the
/// plugin's own fields (7, or 2 for a field riptide does not support).
pub fn parse(stdin: &[u8], command: Command) -> Result<Config, CniError> {
    let value: serde_json::Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE_FAILURE, format!("error decoding network config: {e}"))
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| CniError::new(code::DECODE_FAILURE, "network config is not a JSON object"))?;
    let name = obj.get("name").and_then(|v| v.as_str()).unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("missing network name"));
    }
    if !valid_network_name(name) {
        return Err(invalid(format!(
            "invalid network name {name:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*"
        )));
    }
    let version = obj
        .get("cniVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    check_version(&version, command)?;
    let raw: RawConf = serde_json::from_value(value.clone())
        .map_err(|e| invalid(format!("invalid network config: {e}")))?;
    if raw.plugin_type != "riptide" {
        return Err(invalid(format!(
            "config type is {:?}, this plugin is \"riptide\"",
            raw.plugin_type
        )));
    }
    if raw.ipam.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(CniError::new(
            code::UNSUPPORTED_FIELD,
            "riptide allocates addresses itself from podCIDR: remove the \"ipam\" section",
        ));
    }
    let node = match raw.node_name {
        Some(n) => n,
        None => hostname().ok_or_else(|| invalid("nodeName is missing and the hostname is unreadable"))?,
    };
    if riptide_datapath::pin_dir(&node).is_err() {
        return Err(invalid(format!(
            "invalid nodeName {node:?}: use [A-Za-z0-9._-], 1 to 253 characters"
        )));
    }
    let cluster_cidr = riptide_cidr::parse("clusterCIDR", raw.cluster_cidr.as_deref().unwrap_or(DEFAULT_CLUSTER_CIDR))
        .map_err(|e| invalid(e.to_string()))?;
    let pod_cidr = match (raw.pod_cidr, raw.pod_cidr_file) {
        (Some(c), None) => {
            let c = riptide_cidr::parse("podCIDR", &c).map_err(|e| invalid(e.to_string()))?;
            check_pod_cidr(c, cluster_cidr).map_err(invalid)?;
            PodCidrSource::Inline(c)
        }
        (None, Some(f)) => PodCidrSource::File(f),
        (Some(_), Some(_)) => return Err(invalid("give either podCIDR or podCIDRFile, not both")),
        (None, None) => return Err(invalid("podCIDR (or podCIDRFile) is required")),
    };
    let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
    // 68 is the IPv4 minimum (RFC 791); 65535 the veth maximum.
    if !(68..=65_535).contains(&mtu) {
        return Err(invalid(format!("mtu {mtu} is outside 68..=65535")));
    }
    let prev_result = match raw.prev_result {
        Some(v) if !v.is_null() => Some(
            serde_json::from_value::<CniResult>(v)
                .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("prevResult: {e}")))?,
        ),
        _ => None,
    };
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT).join(&node));
    Ok(Config {
        cni_version: version,
        name: name.to_owned(),
        node,
        pod_cidr,
        cluster_cidr,
        state_dir,
        mtu,
        dns: raw.dns,
        prev_result,
        valid_attachments: raw.valid_attachments,
    })
}

/// Spec rules: an unsupported version is code 1; CHECK exists since 0.4.0,
/// GC and STATUS since 1.1.0.
fn check_version(version: &str, command: Command) -> Result<(), CniError> {
    if !supported(version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: config is {version:?}, plugin supports {:?}",
                crate::types::SUPPORTED_VERSIONS
            ),
        ));
    }
    let needs = match command {
        Command::Check => Some((Version::V0_4_0, "CHECK")),
        Command::Gc | Command::Status => Some((Version::V1_1_0, if command == Command::Gc { "GC" } else { "STATUS" })),
        _ => None,
    };
    if let Some((min, what)) = needs
        && Version::parse(version).is_none_or(|v| v < min)
    {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {version} does not allow {what}"),
        ));
    }
    Ok(())
}

/// The node's range must be a subnet of the cluster range, small enough to
/// leave network, gateway, broadcast and at least one pod (/30 at most).
pub fn check_pod_cidr(pod: Ipv4Network, cluster: Ipv4Network) -> Result<(), String> {
    if pod.prefix() > 30 {
        return Err(format!("podCIDR {pod} is smaller than a /30"));
    }
    if !pod.is_subnet_of(cluster) {
        return Err(format!("podCIDR {pod} is not inside the cluster range {cluster}"));
    }
    Ok(())
}

fn valid_network_name(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_ascii_lowercase())
}

impl Config {
    /// The node's pod range, read from the file when the config names one.
    /// A missing file means the node has no range yet: try again later.
    pub fn pod_range(&self) -> Result<Ipv4Network, CniError> {
        match &self.pod_cidr {
            PodCidrSource::Inline(c) => Ok(*c),
            PodCidrSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!("reading podCIDRFile {}: {e}", path.display()),
                    )
                })?;
                let c = riptide_cidr::parse("podCIDR", &text)
                    .map_err(|e| invalid(format!("podCIDRFile {}: {e}", path.display())))?;
                check_pod_cidr(c, self.cluster_cidr).map_err(invalid)?;
                Ok(c)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"riptide","type":"riptide","nodeName":"n1","podCIDR":"10.42.3.0/24"{extra}}}"#
        )
    }

    #[test]
    fn good_config_parses() {
        let c = parse(conf(r#","mtu":1400,"dns":{"nameservers":["10.43.0.10"]}"#).as_bytes(), Command::Add).unwrap();
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.node, "n1");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/cni/riptide/n1"));
        assert_eq!(c.dns.nameservers, vec!["10.43.0.10"]);
        assert_eq!(c.pod_range().unwrap().to_string(), "10.42.3.0/24");
    }

    #[test]
    fn errors_follow_the_skeleton_order() {
        assert_eq!(parse(b"{not json", Command::Add).unwrap_err().code, 6);
        assert_eq!(parse(br#"{"cniVersion":"1.1.0"}"#, Command::Add).unwrap_err().code, 7);
        // An unknown version wins over an invalid plugin field.
        let e = parse(br#"{"cniVersion":"9.9.9","name":"x","type":"riptide"}"#, Command::Add).unwrap_err();
        assert_eq!(e.code, 1);
        let e = parse(conf("").replace("1.1.0", "0.4.0").as_bytes(), Command::Gc).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(parse(conf("").replace("1.1.0", "0.4.0").as_bytes(), Command::Check).is_ok());
        assert_eq!(parse(conf(r#","ipam":{"type":"host-local"}"#).as_bytes(), Command::Add).unwrap_err().code, 2);
        assert_eq!(parse(conf(r#","mtu":10"#).as_bytes(), Command::Add).unwrap_err().code, 7);
        let outside = conf("").replace("10.42.3.0/24", "192.168.1.0/24");
        assert_eq!(parse(outside.as_bytes(), Command::Add).unwrap_err().code, 7);
        let tiny = conf("").replace("10.42.3.0/24", "10.42.3.0/31");
        assert_eq!(parse(tiny.as_bytes(), Command::Add).unwrap_err().code, 7);
        let other = conf("").replace(r#""type":"riptide""#, r#""type":"bridge""#);
        assert_eq!(parse(other.as_bytes(), Command::Add).unwrap_err().code, 7);
    }

    #[test]
    fn ranges_with_host_bits_are_invalid_config_with_the_network_meant() {
        let e = parse(conf(r#","clusterCIDR":"10.42.0.1/16""#).as_bytes(), Command::Add).unwrap_err();
        assert_eq!(e.code, 7);
        assert_eq!(e.msg, "clusterCIDR 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?");
        let e = parse(conf("").replace("10.42.3.0/24", "10.42.3.1/24").as_bytes(), Command::Add).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (7, "podCIDR 10.42.3.1/24 has host bits set; did you mean 10.42.3.0/24?"));
        // The file the agent writes is held to the same rule.
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("podcidr");
        std::fs::write(&file, "10.42.3.9/24\n").unwrap();
        let text = conf("").replace(r#""podCIDR":"10.42.3.0/24""#, &format!(r#""podCIDRFile":{:?}"#, file));
        let c = parse(text.as_bytes(), Command::Add).unwrap();
        let e = c.pod_range().unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.ends_with("podCIDR 10.42.3.9/24 has host bits set; did you mean 10.42.3.0/24?"), "{}", e.msg);
        std::fs::write(&file, "10.42.3.0/24\n").unwrap();
        assert_eq!(c.pod_range().unwrap().to_string(), "10.42.3.0/24");
    }
}
