//! Authorization glue: a request's [`Attributes`] (kube-apiserver's
//! `RequestInfoFactory`), the cluster's RBAC objects kept as a [`Policy`]
//! snapshot, and the bootstrap roles written at start.
//!
//! `system:masters` is allowed everything before RBAC is asked, as
//! upstream's privileged-group authorizer does, so an admin can always
//! repair a broken policy; kubelets are then asked about by the Node
//! authorizer (`node_authz.rs`). The snapshot is rebuilt lazily: a watch on the
//! RBAC keys (writes by any apiserver sharing the store) and this server's
//! own RBAC writes mark it stale, and the next request re-reads the objects.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::http::{HeaderMap, Method, header};
use futures::StreamExt;
use super::{
    Api,
    api::{ListQuery, WriteOptions},
    authn::{MASTERS, UserInfo},
    bootstrap_policy, node_authz,
    object,
    rbac::{Attributes, Policy},
    status::{ApiError, ApiResult},
};
use crate::registry::{self, Resource};

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// Subresources of a namespace that stay on the `namespaces` resource.
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

/// What `user` asks of the API with this request.
pub fn attributes(user: &UserInfo, method: &Method, path: &str, query: &HashMap<String, String>, headers: &HeaderMap) -> Attributes {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", g, _version, rest @ ..] if !rest.is_empty() => (*g, rest),
        _ => {
            let verb = if *method == Method::HEAD { "get".to_string() } else { method.as_str().to_ascii_lowercase() };
            return Attributes { user: user.clone(), verb, path: path.to_string(), ..Attributes::default() };
        }
    };
    let mut a = Attributes { user: user.clone(), resource_request: true, api_group: group.to_string(), ..Attributes::default() };
    let mut parts: &[&str] = rest;
    if parts[0] == "namespaces" && parts.len() > 1 {
        a.namespace = parts[1].to_string();
        if parts.len() > 2 && !NAMESPACE_SUBRESOURCES.contains(&parts[2]) {
            parts = &parts[2..];
        }
    }
    a.resource = parts[0].to_string();
    a.name = parts.get(1).map(|s| (*s).to_string()).unwrap_or_default();
    a.subresource = parts.get(2).map(|s| (*s).to_string()).unwrap_or_default();
    let watch = query.get("watch").is_some_and(|v| matches!(v.as_str(), "true" | "1" | "True"));
    let upgrade = headers.get(header::UPGRADE).is_some();
    a.verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        // A WebSocket exec/attach/portforward starts a process: upstream
        // (AuthorizePodWebsocketUpgradeCreatePermission) asks for create.
        Method::GET if upgrade && matches!(a.subresource.as_str(), "exec" | "attach" | "portforward") => "create",
        Method::GET | Method::HEAD if a.name.is_empty() => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if a.name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "unknown",
    }
    .to_string();
    a
}

/// The 403 for a denied request.
pub fn forbidden(a: &Attributes) -> ApiError {
    let mut e = ApiError::forbidden(super::rbac::forbidden_message(a));
    if a.resource_request {
        e.details = Some(serde_json::json!({"name": a.name, "group": a.api_group, "kind": a.resource}));
    }
    e
}

/// The RBAC decision point of one server.
pub struct Authorizer {
    policy: RwLock<Option<Arc<Policy>>>,
    stale: AtomicBool,
    rebuild: tokio::sync::Mutex<()>,
}

fn rbac(plural: &str) -> ApiResult<&'static Resource> {
    registry::find(RBAC_GROUP, "v1", plural).ok_or_else(|| ApiError::internal(format!("{plural} not served")))
}

impl Authorizer {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { policy: RwLock::new(None), stale: AtomicBool::new(true), rebuild: tokio::sync::Mutex::new(()) })
    }

    /// The next decision re-reads the RBAC objects.
    pub fn invalidate(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    fn current(&self) -> ApiResult<Option<Arc<Policy>>> {
        Ok(self.policy.read().map_err(|_| ApiError::internal("policy lock poisoned"))?.clone())
    }

    /// The snapshot, rebuilt first when stale. While one request rebuilds,
    /// others keep deciding on the previous snapshot — except before the
    /// first one exists: then they wait for it (an empty policy would deny
    /// everyone at startup).
    async fn policy(&self, api: &Api) -> ApiResult<Arc<Policy>> {
        if self.stale.load(Ordering::SeqCst) || self.current()?.is_none() {
            let _one = self.rebuild.lock().await;
            if self.stale.swap(false, Ordering::SeqCst) || self.current()?.is_none() {
                match load(api).await {
                    Ok(p) => *self.policy.write().map_err(|_| ApiError::internal("policy lock poisoned"))? = Some(Arc::new(p)),
                    Err(e) => {
                        self.stale.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                }
            }
        }
        self.current()?.ok_or_else(|| ApiError::internal("no authorization policy loaded"))
    }

    /// kube-apiserver's chain: privileged group, Node authorizer, RBAC —
    /// the first that allows decides; none allowing is a denial.
    pub async fn allows(&self, api: &Api, a: &Attributes) -> ApiResult<bool> {
        if a.user.groups.iter().any(|g| g == MASTERS) {
            return Ok(true);
        }
        if let Some(node) = node_authz::node_of(&a.user)
            && node_authz::allows(api, node, a).await?
        {
            return Ok(true);
        }
        Ok(self.policy(api).await?.allows(a))
    }

    /// The current RBAC snapshot (for checks beyond one request's
    /// attributes, such as escalation).
    pub(super) async fn snapshot(&self, api: &Api) -> ApiResult<Arc<Policy>> {
        self.policy(api).await
    }

    pub async fn rules_for(&self, api: &Api, user: &UserInfo, namespace: &str) -> ApiResult<Vec<super::rbac::Rule>> {
        Ok(self.policy(api).await?.rules_for(user, namespace))
    }

    /// Mark the snapshot stale whenever an RBAC object changes in the store.
    pub async fn watch(self: Arc<Self>, api: Arc<Api>) {
        let prefix = format!("/{RBAC_GROUP}/");
        loop {
            let from = api.store.current_revision().await.unwrap_or(0);
            self.invalidate();
            match api.store.watch(&prefix, from).await {
                Ok(mut events) => {
                    while let Some(ev) = events.next().await {
                        self.invalidate();
                        if ev.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching RBAC objects (retrying)"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn load(api: &Api) -> ApiResult<Policy> {
    let all = ListQuery::default();
    let cr = api.list(rbac("clusterroles")?, None, &all).await?.items;
    let r = api.list(rbac("roles")?, None, &all).await?.items;
    let crb = api.list(rbac("clusterrolebindings")?, None, &all).await?.items;
    let rb = api.list(rbac("rolebindings")?, None, &all).await?.items;
    Ok(Policy::new(&cr, &r, &crb, &rb))
}

/// Create the bootstrap ClusterRoles and ClusterRoleBindings, and repair
/// those still marked `autoupdate`.
pub async fn ensure_bootstrap_policy(api: &Api) -> ApiResult<()> {
    let roles = bootstrap_policy::cluster_roles().into_iter().map(|o| (rbac("clusterroles"), o));
    let bindings = bootstrap_policy::cluster_role_bindings().into_iter().map(|o| (rbac("clusterrolebindings"), o));
    for (res, want) in roles.chain(bindings) {
        let res = res?;
        let name = object::str_at(&want, "/metadata/name").to_string();
        match api.get(res, None, &name).await {
            Err(e) if e.code == 404 => match api.create(res, None, want, &WriteOptions::default()).await {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
            Ok(have) => {
                let auto = object::str_at(&have, "/metadata/annotations/rbac.authorization.kubernetes.io~1autoupdate") != "false";
                let fields = ["rules", "aggregationRule", "roleRef", "subjects"];
                if auto && fields.iter().any(|f| have.get(*f).filter(|v| !v.is_null()) != want.get(*f)) {
                    api.mutate(res, None, &name, None, move |o| {
                        for f in fields {
                            if let (Some(obj), Some(v)) = (o.as_object_mut(), want.get(f)) {
                                obj.insert(f.to_string(), v.clone());
                            }
                        }
                        Ok(true)
                    })
                    .await?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, path: &str, query: &[(&str, &str)]) -> Attributes {
        let q = query.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        attributes(&UserInfo::default(), &method, path, &q, &HeaderMap::new())
    }

    #[test]
    fn request_info_like_upstream() {
        let a = attrs(Method::GET, "/api/v1/namespaces/default/pods/web/log", &[]);
        assert_eq!((a.verb.as_str(), a.namespace.as_str(), a.resource.as_str(), a.name.as_str(), a.subresource.as_str()), ("get", "default", "pods", "web", "log"));
        let a = attrs(Method::GET, "/apis/apps/v1/deployments", &[("watch", "true")]);
        assert_eq!((a.verb.as_str(), a.api_group.as_str(), a.namespace.as_str()), ("watch", "apps", ""));
        let a = attrs(Method::DELETE, "/api/v1/namespaces/x/configmaps", &[]);
        assert_eq!(a.verb, "deletecollection");
        let a = attrs(Method::GET, "/api/v1/namespaces/team", &[]);
        assert_eq!((a.resource.as_str(), a.name.as_str(), a.namespace.as_str()), ("namespaces", "team", "team"));
        let a = attrs(Method::PUT, "/api/v1/namespaces/team/finalize", &[]);
        assert_eq!((a.resource.as_str(), a.subresource.as_str(), a.verb.as_str()), ("namespaces", "finalize", "update"));
        let a = attrs(Method::PATCH, "/api/v1/nodes/n1/status", &[]);
        assert_eq!((a.resource.as_str(), a.subresource.as_str(), a.namespace.as_str(), a.verb.as_str()), ("nodes", "status", "", "patch"));
        let a = attrs(Method::GET, "/apis/apps/v1", &[]);
        assert!(!a.resource_request && a.path == "/apis/apps/v1" && a.verb == "get");
        let a = attrs(Method::POST, "/api/v1/namespaces/d/serviceaccounts/sa/token", &[]);
        assert_eq!((a.resource.as_str(), a.subresource.as_str(), a.verb.as_str()), ("serviceaccounts", "token", "create"));
    }
}
