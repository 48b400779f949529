//! ServiceAccount controller (upstream `pkg/controller/serviceaccount`,
//! `serviceaccounts_controller.go`): every active Namespace has a
//! ServiceAccount `default`, made when the Namespace appears and made again
//! if someone deletes it. Pod admission counts on it (a pod naming no
//! account runs as `default`, see `apiserver::admission`). Nothing else is
//! written: the account carries no secrets, as upstream since 1.24.
//! Namespaces on their way out are left alone, so deleting one is not
//! fought by a fresh account in it.

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ObjectMeta, PostParams},
    runtime::reflector::{ObjectRef, Store},
};

use crate::apiserver::admission::DEFAULT_SERVICE_ACCOUNT;

pub struct Ctx {
    pub client: Client,
    pub namespaces: Store<Namespace>,
    pub accounts: Store<ServiceAccount>,
}

fn active(ns: &Namespace) -> bool {
    ns.metadata.deletion_timestamp.is_none() && ns.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Terminating")
}

/// The active namespaces whose `default` account the cache does not hold.
pub fn missing(namespaces: &[std::sync::Arc<Namespace>], has: impl Fn(&str) -> bool) -> Vec<String> {
    namespaces.iter().filter(|n| active(n)).map(|n| n.name_any()).filter(|ns| !has(ns)).collect()
}

pub async fn reconcile_all(ctx: &Ctx) {
    let todo = missing(&ctx.namespaces.state(), |ns| ctx.accounts.get(&ObjectRef::new(DEFAULT_SERVICE_ACCOUNT).within(ns)).is_some());
    for ns in todo {
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(DEFAULT_SERVICE_ACCOUNT.into()), namespace: Some(ns.clone()), ..ObjectMeta::default() },
            ..ServiceAccount::default()
        };
        match Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns).create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::info!(namespace = %ns, "created ServiceAccount default"),
            // The cache was behind (or another controller won): nothing to do.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            // Deleted meanwhile, or terminating: the next pass sees it.
            Err(kube::Error::Api(e)) if e.code == 403 || e.code == 404 => {
                tracing::debug!(namespace = %ns, error = %e.message, "ServiceAccount default not created");
            }
            Err(e) => tracing::warn!(namespace = %ns, error = %e, "creating ServiceAccount default"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::{api::core::v1::NamespaceStatus, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    use super::*;

    fn ns(name: &str, phase: Option<&str>, deleting: bool) -> Arc<Namespace> {
        Arc::new(Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting.then(|| Time(Timestamp::now())),
                ..ObjectMeta::default()
            },
            status: phase.map(|p| NamespaceStatus { phase: Some(p.into()), ..NamespaceStatus::default() }),
            ..Namespace::default()
        })
    }

    #[test]
    fn only_active_namespaces_without_default_need_one() {
        let all = [ns("a", Some("Active"), false), ns("b", None, false), ns("c", Some("Terminating"), false), ns("d", Some("Active"), true), ns("e", None, false)];
        assert_eq!(missing(&all, |n| n == "e"), ["a", "b"]);
    }
}
