//! Admission rules that depend on the apiserver's configuration (the
//! fixed ones live in `validation.rs`).
//!
//! `spec.externalIPs` lets whoever may write a Service make every node
//! capture traffic to any address (CVE-2020-8554): a node's own IP and
//! port, another tenant's, the apiserver's. Upstream answers with the
//! DenyServiceExternalIPs admission plugin; here the rule is an allow list
//! of CIDRs (`--service-external-ip-cidrs`), empty by default, so external
//! IPs are denied unless an operator names the ranges they may come from.
//! As upstream, an update that adds no address is always admitted, so
//! Services stored before the rule (or before the list shrank) can still be
//! edited or cleaned up.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::status::{ApiError, ApiResult};
use crate::registry::Resource;

/// Configuration of the admission rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Ranges `spec.externalIPs` may come from; empty: none.
    pub external_ip_cidrs: Vec<Ipv4Network>,
}

fn external_ips(obj: &Value) -> Vec<&str> {
    obj.pointer("/spec/externalIPs").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

impl Admission {
    /// Admits a Service write: every external IP that `old` did not already
    /// hold must be an IPv4 address inside an allowed range.
    pub fn service(&self, res: &Resource, name: &str, new: &Value, old: Option<&Value>) -> ApiResult<()> {
        if !res.is("", "services") {
            return Ok(());
        }
        let before: Vec<&str> = old.map(external_ips).unwrap_or_default();
        for (i, ip) in external_ips(new).into_iter().enumerate() {
            if before.contains(&ip) {
                continue;
            }
            let allowed = ip.parse::<Ipv4Addr>().is_ok_and(|a| self.external_ip_cidrs.iter().any(|c| c.contains(a)));
            if !allowed {
                let ranges = if self.external_ip_cidrs.is_empty() {
                    "none: external IPs are denied".to_owned()
                } else {
                    self.external_ip_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                };
                return Err(ApiError::forbidden(format!(
                    "services \"{name}\" is forbidden: spec.externalIPs[{i}]: {ip} is not in a range the cluster allows for external IPs (--service-external-ip-cidrs: {ranges})"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(ips: &[&str]) -> Value {
        json!({"spec": {"externalIPs": ips}})
    }

    #[test]
    fn denied_by_default_allowed_by_range_and_kept_on_update() {
        let res = crate::registry::find("", "v1", "services").unwrap();
        let deny = Admission::default();
        let e = deny.service(res, "x", &svc(&["192.0.2.10"]), None).unwrap_err();
        assert_eq!(e.code, 403);
        assert!(e.message.contains("spec.externalIPs[0]: 192.0.2.10") && e.message.contains("denied"), "{}", e.message);
        assert!(deny.service(res, "x", &svc(&[]), None).is_ok());
        let allow = Admission { external_ip_cidrs: vec!["192.0.2.0/28".parse().unwrap()] };
        assert!(allow.service(res, "x", &svc(&["192.0.2.10"]), None).is_ok());
        let e = allow.service(res, "x", &svc(&["192.0.2.10", "192.0.2.16"]), None).unwrap_err();
        assert!(e.message.contains("spec.externalIPs[1]: 192.0.2.16") && e.message.contains("192.0.2.0/28"), "{}", e.message);
        assert!(allow.service(res, "x", &svc(&["not-an-ip"]), None).is_err());
        // Already held: an update may keep (or drop) it, never add another.
        assert!(deny.service(res, "x", &svc(&["192.0.2.10"]), Some(&svc(&["192.0.2.10", "192.0.2.11"]))).is_ok());
        assert!(deny.service(res, "x", &svc(&["192.0.2.12"]), Some(&svc(&["192.0.2.10"]))).is_err());
    }
}
