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
//! A LoadBalancer ingress address (`status.loadBalancer.ingress[].ip`,
//! written through `services/status`) captures traffic the same way, so
//! the same list judges it, with one addition: an address of a LoadBalancer
//! pool (`kube-system/riptide-lb-pools`, see [`crate::lb_pools`]) is
//! allowed by construction. The pools are what the operator handed the LB
//! IPAM controller, so its writes always pass, and listing the pools in
//! `--service-external-ip-cidrs` as well would let any Service editor take
//! a pool address as an external IP. Another implementation's addresses
//! (a foreign `loadBalancerClass`) must be in the allow list. An invalid
//! pools ConfigMap allows nothing, as the controller then hands out nothing.
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
//!
//! Pod Security Admission lives in [`super::pod_security`]; its settings are
//! [`Admission::pod_security`].

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnetwork::Ipv4Network;
use serde_json::Value;

use super::status::{ApiError, ApiResult};
use crate::{
    lb_pools::{POOLS_CONFIGMAP, POOLS_NAMESPACE, Pool},
    registry::Resource,
};

/// Configuration of the admission rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Ranges `spec.externalIPs` may come from; empty: none.
    pub external_ip_cidrs: Vec<Ipv4Network>,
    /// Pod Security Admission's defaults and exemptions.
    pub pod_security: super::pod_security::PodSecurity,
}

/// Warnings admission raises for one request; the handler returns them as
/// `Warning: 299 - "…"` headers (kubectl prints `Warning: …`). Shared, so
/// the handler keeps a handle while the write options travel down.
#[derive(Debug, Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<String>>>);

impl Warnings {
    /// Adds `w` unless already there: a write retried after a conflict is
    /// admitted again, and upstream's recorder also keeps each text once.
    pub fn push(&self, w: String) {
        if let Ok(mut v) = self.0.lock()
            && !v.contains(&w)
        {
            v.push(w);
        }
    }

    pub fn extend(&self, ws: impl IntoIterator<Item = String>) {
        for w in ws {
            self.push(w);
        }
    }

    /// The warnings so far, leaving none.
    pub fn take(&self) -> Vec<String> {
        self.0.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default()
    }
}

fn external_ips(obj: &Value) -> Vec<&str> {
    obj.pointer("/spec/externalIPs").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

/// `(index in ingress, ip)` of every LoadBalancer ingress entry with an IP.
fn lb_ingress_ips(obj: &Value) -> Vec<(usize, &str)> {
    let entries = obj.pointer("/status/loadBalancer/ingress").and_then(Value::as_array).into_iter().flatten();
    entries.enumerate().filter_map(|(i, e)| Some((i, e.get("ip")?.as_str()?))).collect()
}

/// What admission reads of the LoadBalancer pools.
pub trait LbPools {
    /// The pools of `kube-system/riptide-lb-pools`; none when it is absent
    /// or does not parse.
    fn lb_pools(&self) -> impl Future<Output = ApiResult<Vec<Pool>>> + Send;
}

impl Admission {
    fn allows(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>().is_ok_and(|a| self.external_ip_cidrs.iter().any(|c| c.contains(a)))
    }

    fn allowed_ranges(&self) -> String {
        if self.external_ip_cidrs.is_empty() {
            "none: external IPs are denied".to_owned()
        } else {
            self.external_ip_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        }
    }

    /// Admits a Service write: every external IP and LoadBalancer ingress IP
    /// that `old` did not already hold must be an IPv4 address inside an
    /// allowed range (for ingress IPs: or inside a pool).
    pub async fn service(&self, pools: &impl LbPools, res: &Resource, name: &str, new: &Value, old: Option<&Value>) -> ApiResult<()> {
        if !res.is("", "services") {
            return Ok(());
        }
        let before: Vec<&str> = old.map(external_ips).unwrap_or_default();
        for (i, ip) in external_ips(new).into_iter().enumerate() {
            if !before.contains(&ip) && !self.allows(ip) {
                return Err(ApiError::forbidden(format!(
                    "services \"{name}\" is forbidden: spec.externalIPs[{i}]: {ip} is not in a range the cluster allows for external IPs (--service-external-ip-cidrs: {})",
                    self.allowed_ranges()
                )));
            }
        }
        let before: Vec<&str> = old.map(lb_ingress_ips).unwrap_or_default().into_iter().map(|(_, ip)| ip).collect();
        let outside: Vec<(usize, &str)> =
            lb_ingress_ips(new).into_iter().filter(|(_, ip)| !before.contains(ip) && !self.allows(ip)).collect();
        if outside.is_empty() {
            return Ok(());
        }
        let pools = pools.lb_pools().await?;
        for (i, ip) in outside {
            if ip.parse::<Ipv4Addr>().is_ok_and(|a| pools.iter().any(|p| p.contains(a))) {
                continue;
            }
            let pools = if pools.is_empty() {
                "none".to_owned()
            } else {
                pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            };
            return Err(ApiError::forbidden(format!(
                "services \"{name}\" is forbidden: status.loadBalancer.ingress[{i}].ip: {ip} is not in a range the cluster allows for LoadBalancer addresses (--service-external-ip-cidrs: {}; pools of {POOLS_NAMESPACE}/{POOLS_CONFIGMAP}: {pools})",
                self.allowed_ranges()
            )));
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

    fn lb(ips: &[&str]) -> Value {
        let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip, "ipMode": "VIP"})).collect();
        json!({"spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {"ingress": ingress}}})
    }

    /// Pools as the ConfigMap would give them; counts the reads.
    struct Pools(Vec<Pool>, std::sync::atomic::AtomicUsize);

    impl Pools {
        fn new(kv: &[(&str, &str)]) -> Self {
            Self(crate::lb_pools::tests::pools(kv), 0.into())
        }
        fn reads(&self) -> usize {
            self.1.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl LbPools for Pools {
        async fn lb_pools(&self) -> ApiResult<Vec<Pool>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self.0.clone())
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn warnings_are_kept_once_each() {
        let w = Warnings::default();
        w.extend(["a".to_owned(), "b".to_owned(), "a".to_owned()]);
        assert_eq!(w.take(), ["a", "b"]);
        assert!(w.take().is_empty());
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
        let nopools = Pools::new(&[]);
        let check = |a: &Admission, new: &Value, old: Option<&Value>| block_on(a.service(&nopools, res, "x", new, old));
        let deny = Admission::default();
        let e = check(&deny, &svc(&["192.0.2.10"]), None).unwrap_err();
        assert_eq!(e.code, 403);
        assert!(e.message.contains("spec.externalIPs[0]: 192.0.2.10") && e.message.contains("denied"), "{}", e.message);
        assert!(check(&deny, &svc(&[]), None).is_ok());
        let allow = Admission { external_ip_cidrs: vec!["192.0.2.0/28".parse().unwrap()], ..Admission::default() };
        assert!(check(&allow, &svc(&["192.0.2.10"]), None).is_ok());
        let e = check(&allow, &svc(&["192.0.2.10", "192.0.2.16"]), None).unwrap_err();
        assert!(e.message.contains("spec.externalIPs[1]: 192.0.2.16") && e.message.contains("192.0.2.0/28"), "{}", e.message);
        assert!(check(&allow, &svc(&["not-an-ip"]), None).is_err());
        // Already held: an update may keep (or drop) it, never add another.
        assert!(check(&deny, &svc(&["192.0.2.10"]), Some(&svc(&["192.0.2.10", "192.0.2.11"]))).is_ok());
        assert!(check(&deny, &svc(&["192.0.2.12"]), Some(&svc(&["192.0.2.10"]))).is_err());
    }

    #[test]
    fn lb_ingress_ips_need_the_allow_list_or_a_pool() {
        let res = crate::registry::find("", "v1", "services").unwrap();
        let pools = Pools::new(&[("default", "198.51.100.10-198.51.100.13"), ("edge", "203.0.113.0/30")]);
        let deny = Admission::default();
        let check = |a: &Admission, new: &Value, old: Option<&Value>| block_on(a.service(&pools, res, "web", new, old));
        // The allocator's addresses: inside a pool, admitted with no allow list.
        assert!(check(&deny, &lb(&["198.51.100.10"]), Some(&lb(&[]))).is_ok());
        assert!(check(&deny, &lb(&["203.0.113.2"]), None).is_ok());
        // Outside every pool and range: 403 naming the entry, the ranges and the pools.
        let e = check(&deny, &lb(&["198.51.100.10", "192.0.2.7"]), Some(&lb(&[]))).unwrap_err();
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        assert_eq!(
            e.message,
            "services \"web\" is forbidden: status.loadBalancer.ingress[1].ip: 192.0.2.7 is not in a range the cluster allows for LoadBalancer addresses (--service-external-ip-cidrs: none: external IPs are denied; pools of kube-system/riptide-lb-pools: default (198.51.100.10-198.51.100.13), edge (203.0.113.1-203.0.113.2))"
        );
        // The network address of a CIDR pool is not in it.
        assert!(check(&deny, &lb(&["203.0.113.0"]), None).is_err());
        // The allow list admits ingress IPs too (another implementation's).
        let allow = Admission { external_ip_cidrs: vec!["192.0.2.0/28".parse().unwrap()], ..Admission::default() };
        assert!(check(&allow, &lb(&["192.0.2.7"]), None).is_ok());
        // Held before: kept (or dropped) whatever the pools say now.
        assert!(check(&deny, &lb(&["192.0.2.7"]), Some(&lb(&["192.0.2.7", "192.0.2.8"]))).is_ok());
        assert!(check(&deny, &lb(&[]), Some(&lb(&["192.0.2.7"]))).is_ok());
        // Hostname-only entries carry no address to judge.
        let host = json!({"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example.com"}]}}});
        assert!(check(&deny, &host, None).is_ok());
        // Pools are read only when an address is outside the allow list.
        let reads = pools.reads();
        assert!(check(&allow, &lb(&["192.0.2.9"]), None).is_ok());
        assert!(check(&deny, &lb(&["192.0.2.7"]), Some(&lb(&["192.0.2.7"]))).is_ok());
        assert_eq!(pools.reads(), reads);
    }
}
