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
//!
//! The ServiceAccount plugin (upstream `plugin/pkg/admission/serviceaccount`):
//! a pod that names no account runs as `default`, and a pod may only name an
//! account that exists — else 403 `error looking up service account …`. The
//! `default` account is made by the ServiceAccount controller
//! (`controllers::serviceaccount`) a moment after its namespace, so a miss on
//! it is retried for about a second, as upstream does for a namespace just
//! created. An apiserver run without a controller manager (tests, benches)
//! has no `default` accounts at all; there, seen as `kube-system` having none,
//! such a pod is admitted and its kubelet mounts no token (and says so).

use std::{net::Ipv4Addr, time::Duration};

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

/// The account a pod runs as when it names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Tries for the `default` account (upstream: 10, 100–200 ms apart).
const DEFAULT_SA_TRIES: u32 = 10;
const DEFAULT_SA_RETRY: Duration = Duration::from_millis(150);

/// What the ServiceAccount plugin reads from storage.
pub trait ServiceAccounts {
    /// The ServiceAccount `ns/name`, or None when there is none.
    fn service_account(&self, ns: &str, name: &str) -> impl Future<Output = ApiResult<Option<Value>>> + Send;
}

/// Sets `spec.serviceAccountName` (from the deprecated `serviceAccount`
/// alias, else `default`) and mirrors it into the alias, as upstream's
/// conversion does; returns the name.
pub fn default_service_account(pod: &mut Value) -> String {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else { return DEFAULT_SERVICE_ACCOUNT.into() };
    let named = |k: &str| spec.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    let sa = named("serviceAccountName").or_else(|| named("serviceAccount")).unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into());
    spec.insert("serviceAccountName".into(), Value::String(sa.clone()));
    spec.insert("serviceAccount".into(), Value::String(sa.clone()));
    sa
}

fn is_mirror_pod(pod: &Value) -> bool {
    pod.pointer("/metadata/annotations/kubernetes.io~1config.mirror").is_some()
}

impl Admission {
    /// Admits a Pod create in `ns` (see the module docs).
    pub async fn pod_service_account(&self, store: &impl ServiceAccounts, res: &Resource, ns: &str, pod: &mut Value) -> ApiResult<()> {
        if !res.is("", "pods") || is_mirror_pod(pod) {
            return Ok(());
        }
        let sa = default_service_account(pod);
        let tries = if sa == DEFAULT_SERVICE_ACCOUNT { DEFAULT_SA_TRIES } else { 1 };
        for i in 0..tries {
            if i > 0 {
                tokio::time::sleep(DEFAULT_SA_RETRY).await;
            }
            if store.service_account(ns, &sa).await?.is_some() {
                return Ok(());
            }
            if sa == DEFAULT_SERVICE_ACCOUNT && store.service_account("kube-system", DEFAULT_SERVICE_ACCOUNT).await?.is_none() {
                // No ServiceAccount controller runs: nobody will make it.
                return Ok(());
            }
        }
        let name = super::object::name(pod);
        Err(ApiError::forbidden(format!(
            "pods \"{name}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
        )))
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
    fn pods_run_as_default_unless_they_name_an_account() {
        let mut p = json!({"spec": {"containers": []}});
        assert_eq!(default_service_account(&mut p), "default");
        assert_eq!((p["spec"]["serviceAccountName"].as_str(), p["spec"]["serviceAccount"].as_str()), (Some("default"), Some("default")));
        let mut p = json!({"spec": {"serviceAccountName": "", "serviceAccount": "legacy"}});
        assert_eq!(default_service_account(&mut p), "legacy", "the deprecated alias still names the account");
        let mut p = json!({"spec": {"serviceAccountName": "app", "serviceAccount": "legacy"}});
        assert_eq!(default_service_account(&mut p), "app");
        assert_eq!(p["spec"]["serviceAccount"], "app");
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
