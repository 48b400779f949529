//! What RBAC alone does not stop: writing a role or binding that grants
//! more than the writer holds (upstream `pkg/registry/rbac/*/policybased`,
//! the "escalate" and "bind" verbs), a kubelet steering workloads to its
//! node through its own labels and taints (NodeRestriction, in
//! `node_authz.rs`), and acting as someone else (`Impersonate-*` headers,
//! upstream `WithImpersonation`). The first two depend on the writer and
//! the final object, so [`WriterAdmission`] rides in the write options
//! into the store's write path.
//!
//! Escalation: a Role or ClusterRole write is allowed when the writer may
//! `escalate` it, or already holds every permission in it; a binding write
//! when the writer may `bind` the referenced role, or holds everything the
//! role grants in the binding's namespace. `system:masters` is exempt, as
//! upstream. Writes that leave the security-relevant fields alone (rules,
//! aggregationRule; roleRef, subjects) are not checked, so controllers can
//! manage finalizers and labels. The check runs in the store's write path
//! ([`WriteOptions::rbac_guard`](super::api::WriteOptions)) on the final
//! object, so patches and server-side apply are judged on what they
//! produce.
//!
//! Impersonation: every requested identity part (user or ServiceAccount,
//! each group, uid, each extra value) needs the `impersonate` verb on it;
//! the impersonated user then goes through authorization like any other.

use std::{collections::BTreeMap, sync::Arc};

use axum::http::HeaderMap;
use serde_json::Value;

use super::{
    Api,
    authn::{AUTHENTICATED, ANONYMOUS, MASTERS, UNAUTHENTICATED, UserInfo},
    authz::{self, Authorizer, RBAC_GROUP},
    node_authz, object,
    rbac::{Attributes, Policy, Rule, uncovered},
    status::{ApiError, ApiResult},
};
use crate::registry::{self, Resource};

/// The writer-dependent admission of one request: its user and, for RBAC
/// writes, the RBAC snapshot the request was authorized against.
pub struct WriterAdmission {
    user: UserInfo,
    policy: Option<Arc<Policy>>,
}

impl std::fmt::Debug for WriterAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterAdmission").field("user", &self.user.name).finish_non_exhaustive()
    }
}

fn rules_in(obj: &Value) -> Vec<Rule> {
    obj.get("rules").and_then(Value::as_array).map(|a| a.iter().map(Rule::from_json).collect()).unwrap_or_default()
}

fn qualified(res: &Resource) -> String {
    format!("{}.{}", res.plural, res.group)
}

/// The escalation check of an RBAC write: who writes, against which policy.
struct RbacGuard<'a> {
    user: &'a UserInfo,
    policy: &'a Policy,
}

impl WriterAdmission {
    /// Judges a write of `new` (replacing `old`, absent on create) as `res`.
    pub fn check(&self, res: &Resource, old: Option<&Value>, new: &Value) -> ApiResult<()> {
        if let Some(policy) = &self.policy {
            RbacGuard { user: &self.user, policy }.check(res, old, new)?;
        }
        if res.is("", "nodes") {
            node_authz::admit_node_write(&self.user, old, new)?;
        }
        Ok(())
    }
}

impl RbacGuard<'_> {
    fn may(&self, verb: &str, plural: &str, namespace: &str, name: &str) -> bool {
        self.policy.allows(&Attributes {
            user: self.user.clone(),
            verb: verb.into(),
            resource_request: true,
            namespace: namespace.into(),
            api_group: RBAC_GROUP.into(),
            resource: plural.into(),
            name: name.into(),
            ..Attributes::default()
        })
    }

    fn forbidden(res: &Resource, name: &str, why: &str) -> ApiError {
        let mut e = ApiError::forbidden(format!("{} {name:?} is forbidden: {why}", qualified(res)));
        e.details = Some(serde_json::json!({"name": name, "group": res.group, "kind": res.plural}));
        e
    }

    /// upstream `ConfirmNoEscalation`: the writer holds every rule in
    /// `wanted` (in `namespace`, or cluster-wide when empty).
    fn confirm(&self, res: &Resource, name: &str, namespace: &str, wanted: &[Rule]) -> ApiResult<()> {
        let missing = uncovered(&self.policy.rules_for(self.user, namespace), wanted);
        if missing.is_empty() {
            return Ok(());
        }
        let groups = self.user.groups.iter().map(|g| format!("{g:?}")).collect::<Vec<_>>().join(" ");
        let rules = missing.iter().map(Rule::compact_string).collect::<Vec<_>>().join("\n");
        Err(Self::forbidden(
            res,
            name,
            &format!("user {:?} (groups=[{groups}]) is attempting to grant RBAC permissions not currently held:\n{rules}", self.user.name),
        ))
    }

    fn check(&self, res: &Resource, old: Option<&Value>, new: &Value) -> ApiResult<()> {
        if res.group != RBAC_GROUP || self.user.groups.iter().any(|g| g == MASTERS) {
            return Ok(());
        }
        let unchanged = |fields: &[&str]| old.is_some_and(|o| fields.iter().all(|f| o.get(*f) == new.get(*f)));
        let (name, namespace) = (object::name(new), object::namespace(new));
        match res.kind {
            "Role" | "ClusterRole" => {
                if unchanged(&["rules", "aggregationRule"]) || self.may("escalate", res.plural, namespace, name) {
                    return Ok(());
                }
                if new.get("aggregationRule").is_some_and(|a| !a.is_null()) {
                    let all = |v: &str| vec![v.to_string()];
                    let full = [
                        Rule { verbs: all("*"), api_groups: all("*"), resources: all("*"), ..Rule::default() },
                        Rule { verbs: all("*"), non_resource_urls: all("*"), ..Rule::default() },
                    ];
                    if !uncovered(&self.policy.rules_for(self.user, ""), &full).is_empty() {
                        return Err(Self::forbidden(res, name, "must have cluster-admin privileges to use the aggregationRule"));
                    }
                }
                self.confirm(res, name, namespace, &rules_in(new))
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                if unchanged(&["roleRef", "subjects"]) {
                    return Ok(());
                }
                let kind = object::str_at(new, "/roleRef/kind");
                let role = object::str_at(new, "/roleRef/name");
                let plural = if kind == "Role" { "roles" } else { "clusterroles" };
                if self.may("bind", plural, namespace, role) {
                    return Ok(());
                }
                let rules = self.policy.role_ref_rules(kind, role, namespace).ok_or_else(|| {
                    registry::find(RBAC_GROUP, "v1", plural)
                        .map_or_else(|| ApiError::internal(format!("{plural} not served")), |r| ApiError::not_found(r, role))
                })?;
                self.confirm(res, name, namespace, rules)
            }
            _ => Ok(()),
        }
    }
}

const IMPERSONATE_USER: &str = "impersonate-user";
const IMPERSONATE_GROUP: &str = "impersonate-group";
const IMPERSONATE_UID: &str = "impersonate-uid";
const IMPERSONATE_EXTRA: &str = "impersonate-extra-";
const AUTHENTICATION_GROUP: &str = "authentication.k8s.io";

/// The user a request acts as: `user` itself, or the identity its
/// `Impersonate-*` headers ask for when `user` may impersonate every part.
pub async fn impersonate(authz: &Authorizer, api: &Api, user: UserInfo, headers: &HeaderMap) -> ApiResult<UserInfo> {
    let values = |name: &str| -> ApiResult<Vec<String>> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().map(str::to_string).map_err(|_| ApiError::bad_request(format!("invalid {name} header"))))
            .collect()
    };
    let names = values(IMPERSONATE_USER)?;
    let groups = values(IMPERSONATE_GROUP)?;
    let uids = values(IMPERSONATE_UID)?;
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in headers {
        if let Some(key) = k.as_str().strip_prefix(IMPERSONATE_EXTRA) {
            let key = percent_decode(key);
            let v = v.to_str().map_err(|_| ApiError::bad_request(format!("invalid {k} header")))?;
            extra.entry(key).or_default().push(v.to_string());
        }
    }
    if names.is_empty() {
        if groups.is_empty() && uids.is_empty() && extra.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::bad_request("requested impersonation of groups, uid or extra without impersonating a user"));
    }
    if names.len() > 1 || uids.len() > 1 {
        return Err(ApiError::bad_request("only one user and one uid can be impersonated"));
    }
    let name = names[0].clone();
    let ask = |namespace: &str, group: &str, resource: &str, subresource: &str, target: &str| Attributes {
        user: user.clone(),
        verb: "impersonate".into(),
        resource_request: true,
        namespace: namespace.into(),
        api_group: group.into(),
        resource: resource.into(),
        subresource: subresource.into(),
        name: target.into(),
        ..Attributes::default()
    };
    let mut checks = Vec::new();
    let service_account = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .map(|(ns, sa)| (ns.to_string(), sa.to_string()));
    match &service_account {
        Some((ns, sa)) => checks.push(ask(ns, "", "serviceaccounts", "", sa)),
        None => checks.push(ask("", "", "users", "", &name)),
    }
    checks.extend(groups.iter().map(|g| ask("", "", "groups", "", g)));
    checks.extend(uids.iter().map(|u| ask("", AUTHENTICATION_GROUP, "uids", "", u)));
    for (key, vals) in &extra {
        checks.extend(vals.iter().map(|v| ask("", AUTHENTICATION_GROUP, "userextras", key, v)));
    }
    for attrs in &checks {
        if !authz.allows(api, attrs).await? {
            return Err(authz::forbidden(attrs));
        }
    }
    let mut out = UserInfo { name, uid: uids.into_iter().next().unwrap_or_default(), groups, extra };
    if let Some((ns, _)) = service_account {
        for g in ["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{ns}")] {
            if !out.groups.contains(&g) {
                out.groups.push(g);
            }
        }
    }
    let implicit = if out.name == ANONYMOUS { UNAUTHENTICATED } else { AUTHENTICATED };
    if !out.groups.iter().any(|g| g == implicit) {
        out.groups.push(implicit.to_string());
    }
    tracing::debug!(user = %user.name, as_user = %out.name, "impersonating");
    Ok(out)
}

/// Extra keys arrive percent-encoded (upstream `unescapeExtraKey`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(Some(h)), Some(Some(l))) = (b.get(i + 1).map(|c| hex(*c)), b.get(i + 2).map(|c| hex(*c)))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Authorizer {
    /// The writer-dependent admission of writes by `user` to `res` (with
    /// the current RBAC snapshot when `res` is an RBAC kind), or none when
    /// nothing about `res` depends on the writer.
    pub async fn writer_admission(&self, api: &Api, user: &UserInfo, res: &Resource) -> ApiResult<Option<WriterAdmission>> {
        let policy = if res.group == RBAC_GROUP { Some(self.snapshot(api).await?) } else { None };
        if policy.is_none() && !(res.is("", "nodes") && node_authz::node_of(user).is_some()) {
            return Ok(None);
        }
        Ok(Some(WriterAdmission { user: user.clone(), policy }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_are_percent_decoded() {
        assert_eq!(percent_decode("example.com%2fscopes"), "example.com/scopes");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
