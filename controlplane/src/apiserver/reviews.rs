//! The create-only "virtual" resources of authentication.k8s.io and
//! authorization.k8s.io, and the ServiceAccount `token` subresource:
//! TokenRequest (`kubectl create token`), TokenReview, SelfSubjectReview
//! (`kubectl auth whoami`), SubjectAccessReview, SelfSubjectAccessReview,
//! LocalSubjectAccessReview (`kubectl auth can-i`) and
//! SelfSubjectRulesReview (`kubectl auth can-i --list`). Nothing is stored;
//! each answers with the request object plus its `status`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{
    Api,
    admission::DEFAULT_SERVICE_ACCOUNT,
    authn::{API_AUDIENCE, Authenticator, ObjectRef, TokenSpec, UserInfo},
    authz::Authorizer,
    object::str_at,
    rbac::Attributes,
    status::{ApiError, ApiResult, Cause},
};
use crate::registry;

/// A review resource served for `create` only.
pub struct Review {
    pub group: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

pub const REVIEWS: &[Review] = &[
    Review { group: "authentication.k8s.io", plural: "tokenreviews", kind: "TokenReview", namespaced: false },
    Review { group: "authentication.k8s.io", plural: "selfsubjectreviews", kind: "SelfSubjectReview", namespaced: false },
    Review { group: "authorization.k8s.io", plural: "subjectaccessreviews", kind: "SubjectAccessReview", namespaced: false },
    Review { group: "authorization.k8s.io", plural: "selfsubjectaccessreviews", kind: "SelfSubjectAccessReview", namespaced: false },
    Review { group: "authorization.k8s.io", plural: "localsubjectaccessreviews", kind: "LocalSubjectAccessReview", namespaced: true },
    Review { group: "authorization.k8s.io", plural: "selfsubjectrulesreviews", kind: "SelfSubjectRulesReview", namespaced: false },
];

pub fn find(group: &str, plural: &str) -> Option<&'static Review> {
    REVIEWS.iter().find(|r| r.group == group && r.plural == plural)
}

/// Upstream's TokenRequest bounds: at least 10 minutes; 1 hour by default.
const MIN_EXPIRATION: i64 = 600;
const DEFAULT_EXPIRATION: i64 = 3600;
/// No upstream maximum by default; a year keeps expiries representable.
const MAX_EXPIRATION: i64 = 365 * 24 * 3600;

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default()
}

fn reply(kind: &str, group: &str, mut body: Value, status: Value) -> Value {
    if !body.is_object() {
        body = json!({});
    }
    body["kind"] = json!(kind);
    body["apiVersion"] = json!(format!("{group}/v1"));
    if body.get("metadata").is_none_or(Value::is_null) {
        body["metadata"] = json!({});
    }
    body["status"] = status;
    body
}

/// `POST …/serviceaccounts/<name>/token`.
pub async fn token_request(api: &Api, authn: &Authenticator, ns: &str, name: &str, body: Value) -> ApiResult<Value> {
    let signer = authn.service_accounts().ok_or_else(|| ApiError::internal("ServiceAccount token signing is not configured"))?;
    let sa_res = registry::find("", "v1", "serviceaccounts").ok_or_else(|| ApiError::internal("serviceaccounts not served"))?;
    let sa = api.get(sa_res, Some(ns), name).await?;
    let invalid = |field: &str, value: &dyn std::fmt::Display, why: &str| {
        ApiError::new(422, "Invalid", format!("TokenRequest.authentication.k8s.io \"{name}\" is invalid: {}", Cause::invalid(field, value, why).message))
    };
    let expiration = body.pointer("/spec/expirationSeconds").and_then(Value::as_i64).unwrap_or(DEFAULT_EXPIRATION);
    if expiration < MIN_EXPIRATION {
        return Err(invalid("spec.expirationSeconds", &expiration, "may not specify a duration less than 10 minutes"));
    }
    let expiration = expiration.min(MAX_EXPIRATION);
    let mut audiences = strings(body.pointer("/spec/audiences"));
    if audiences.is_empty() {
        audiences.push(API_AUDIENCE.to_string());
    }
    let pod = match body.pointer("/spec/boundObjectRef") {
        None | Some(Value::Null) => None,
        Some(r) => {
            let kind = str_at(r, "/kind");
            if kind != "Pod" {
                return Err(invalid("spec.boundObjectRef.kind", &kind, "only Pod bindings are supported"));
            }
            let pod_name = str_at(r, "/name");
            let pod_res = registry::find("", "v1", "pods").ok_or_else(|| ApiError::internal("pods not served"))?;
            let pod = api.get(pod_res, Some(ns), pod_name).await?;
            let uid = str_at(&pod, "/metadata/uid").to_string();
            // Pods stored before admission defaulted the name run as `default`.
            let runs_as = Some(str_at(&pod, "/spec/serviceAccountName")).filter(|s| !s.is_empty()).unwrap_or(DEFAULT_SERVICE_ACCOUNT);
            if runs_as != name {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token for serviceaccount \"{name}\" to pod running with different serviceaccount name."
                )));
            }
            let want_uid = str_at(r, "/uid");
            if !want_uid.is_empty() && want_uid != uid {
                return Err(ApiError::conflict(pod_res, pod_name, &format!("the UID in the bound object reference ({want_uid}) does not match the UID in record ({uid})")));
            }
            Some(ObjectRef { name: pod_name.to_string(), uid })
        }
    };
    let spec = TokenSpec {
        namespace: ns.to_string(),
        service_account: ObjectRef { name: name.to_string(), uid: str_at(&sa, "/metadata/uid").to_string() },
        pod,
        audiences: audiences.clone(),
        expiration_seconds: expiration,
    };
    let (token, exp) = signer.issue(&spec).map_err(|e| ApiError::internal(format!("signing the token: {e}")))?;
    let expires = jiff::Timestamp::from_second(exp).map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    let mut out = body;
    if !out.is_object() {
        out = json!({});
    }
    out["metadata"] = json!({"name": name, "namespace": ns, "creationTimestamp": null});
    out["spec"]["audiences"] = json!(audiences);
    out["spec"]["expirationSeconds"] = json!(expiration);
    Ok(reply("TokenRequest", "authentication.k8s.io", out, json!({"token": token, "expirationTimestamp": expires})))
}

fn user_json(u: &UserInfo) -> Value {
    serde_json::to_value(u).unwrap_or_else(|_| json!({}))
}

/// Attributes of a SubjectAccessReview spec for `user`.
fn review_attributes(spec: &Value, user: UserInfo) -> Attributes {
    if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        Attributes {
            user,
            verb: str_at(r, "/verb").to_string(),
            resource_request: true,
            namespace: str_at(r, "/namespace").to_string(),
            api_group: str_at(r, "/group").to_string(),
            resource: str_at(r, "/resource").to_string(),
            subresource: str_at(r, "/subresource").to_string(),
            name: str_at(r, "/name").to_string(),
            path: String::new(),
        }
    } else {
        let n = spec.get("nonResourceAttributes").cloned().unwrap_or(Value::Null);
        Attributes { user, verb: str_at(&n, "/verb").to_string(), path: str_at(&n, "/path").to_string(), ..Attributes::default() }
    }
}

fn access_status(allowed: bool) -> Value {
    if allowed { json!({"allowed": true, "reason": "allowed by RBAC"}) } else { json!({"allowed": false}) }
}

/// `ValidateSubjectAccessReviewSpec`: exactly one kind of attributes, and
/// someone to judge.
fn spec_causes(spec: &Value, user: &UserInfo) -> Vec<Cause> {
    let given = |k: &str| spec.get(k).filter(|v| !v.is_null());
    let mut causes = Vec::new();
    match (given("resourceAttributes"), given("nonResourceAttributes")) {
        (Some(_), Some(n)) => causes.push(Cause::invalid("spec.nonResourceAttributes", n, "cannot be specified in combination with resourceAttributes")),
        (None, None) => causes.push(Cause::invalid("spec.resourceAttributes", "null", "exactly one of nonResourceAttributes or resourceAttributes must be specified")),
        _ => {}
    }
    if user.name.is_empty() && user.groups.is_empty() {
        causes.push(Cause::invalid("spec.user", "", "at least one of user or group must be specified"));
    }
    causes
}

/// The namespace of a LocalSubjectAccessReview: the URL's. As upstream's
/// create handler, a body naming another is refused (400) and a body
/// naming none takes the URL's.
fn local_namespace(body: &mut Value, url_ns: Option<&str>) -> ApiResult<String> {
    let ns = url_ns.filter(|n| !n.is_empty()).ok_or_else(|| ApiError::bad_request("namespace is required on this type: "))?;
    let in_body = str_at(body, "/metadata/namespace");
    if !in_body.is_empty() && in_body != ns {
        return Err(ApiError::bad_request("the namespace of the provided object does not match the namespace sent on the request"));
    }
    if let Some(m) = body.as_object_mut() {
        let meta = m.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        meta["namespace"] = json!(ns);
    }
    Ok(ns.to_string())
}

/// `ValidateLocalSubjectAccessReview`: the review is about its own
/// namespace only, and about resources only.
fn local_causes(spec: &Value, ns: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(r) = spec.get("resourceAttributes").filter(|r| !r.is_null()) {
        let asked = str_at(r, "/namespace");
        if asked != ns {
            causes.push(Cause::invalid("spec.resourceAttributes.namespace", asked, "must match metadata.namespace"));
        }
    }
    if let Some(n) = spec.get("nonResourceAttributes").filter(|n| !n.is_null()) {
        causes.push(Cause::invalid("spec.nonResourceAttributes", n, "disallowed on this kind of request"));
    }
    causes
}

/// 422 for a review: reviews have no name, so upstream says `""`.
fn invalid(review: &Review, causes: &[Cause]) -> ApiError {
    let msgs: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
    let msg = if msgs.len() == 1 { msgs[0].clone() } else { format!("[{}]", msgs.join(", ")) };
    let details: Vec<Value> = causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect();
    ApiError {
        details: Some(json!({"group": review.group, "kind": review.kind, "causes": details})),
        ..ApiError::new(422, "Invalid", format!("{}.{} \"\" is invalid: {msg}", review.kind, review.group))
    }
}

/// Serve one review POST; `requester` is who sent it.
pub async fn create(
    api: &Api,
    authn: &Authenticator,
    authz: &Authorizer,
    review: &Review,
    namespace: Option<&str>,
    requester: &UserInfo,
    mut body: Value,
) -> ApiResult<Value> {
    let spec = body.get("spec").cloned().unwrap_or(Value::Null);
    let status = match review.plural {
        "tokenreviews" => {
            let token = str_at(&spec, "/token");
            let asked = strings(spec.get("audiences"));
            let audiences: Vec<&str> = if asked.is_empty() { vec![API_AUDIENCE] } else { asked.iter().map(String::as_str).collect() };
            match authn.token(api, token, &audiences).await {
                Some((u, aud)) => json!({"authenticated": true, "user": user_json(&u), "audiences": aud}),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            }
        }
        "selfsubjectreviews" => json!({"userInfo": user_json(requester)}),
        "selfsubjectaccessreviews" => {
            let a = review_attributes(&spec, requester.clone());
            access_status(authz.allows(api, &a).await?)
        }
        "subjectaccessreviews" | "localsubjectaccessreviews" => {
            let extra: BTreeMap<String, Vec<String>> = spec.get("extra").and_then(|e| serde_json::from_value(e.clone()).ok()).unwrap_or_default();
            let user = UserInfo { name: str_at(&spec, "/user").to_string(), uid: str_at(&spec, "/uid").to_string(), groups: strings(spec.get("groups")), extra };
            let mut causes = spec_causes(&spec, &user);
            if review.namespaced {
                let ns = local_namespace(&mut body, namespace)?;
                causes.extend(local_causes(&spec, &ns));
            }
            if !causes.is_empty() {
                return Err(invalid(review, &causes));
            }
            // Valid: a LocalSubjectAccessReview's spec namespace is the URL's.
            let a = review_attributes(&spec, user);
            access_status(authz.allows(api, &a).await?)
        }
        "selfsubjectrulesreviews" => {
            let ns = str_at(&spec, "/namespace");
            let rules = authz.rules_for(api, requester, ns).await?;
            let masters = requester.groups.iter().any(|g| g == super::authn::MASTERS);
            let mut resource_rules = Vec::new();
            let mut url_rules = Vec::new();
            if masters {
                resource_rules.push(json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}));
                url_rules.push(json!({"verbs": ["*"], "nonResourceURLs": ["*"]}));
            }
            for r in rules {
                if r.non_resource_urls.is_empty() {
                    resource_rules.push(json!({"verbs": r.verbs, "apiGroups": r.api_groups, "resources": r.resources, "resourceNames": r.resource_names}));
                } else {
                    url_rules.push(json!({"verbs": r.verbs, "nonResourceURLs": r.non_resource_urls}));
                }
            }
            json!({"resourceRules": resource_rules, "nonResourceRules": url_rules, "incomplete": false})
        }
        _ => return Err(ApiError::not_found_path()),
    };
    Ok(reply(review.kind, review.group, body, status))
}

/// The discovery entries of the reviews in `group`.
pub fn discovery_entries(group: &str) -> Vec<Value> {
    REVIEWS
        .iter()
        .filter(|r| r.group == group)
        .map(|r| json!({"name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": ["create"]}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_reviews_must_name_their_own_namespace() {
        let lsar = find("authorization.k8s.io", "localsubjectaccessreviews").expect("served");
        let mut body = json!({"spec": {"user": "ed", "resourceAttributes": {"namespace": "other", "verb": "get", "resource": "pods"}}});
        assert_eq!(local_namespace(&mut body, Some("team")).ok().as_deref(), Some("team"));
        assert_eq!(body["metadata"]["namespace"], "team", "no metadata.namespace: the URL's");
        let e = invalid(lsar, &local_causes(&body["spec"], "team"));
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert_eq!(
            e.message,
            r#"LocalSubjectAccessReview.authorization.k8s.io "" is invalid: spec.resourceAttributes.namespace: Invalid value: "other": must match metadata.namespace"#
        );
        let mut elsewhere = json!({"metadata": {"namespace": "other"}});
        let e = local_namespace(&mut elsewhere, Some("team")).err().map(|e| (e.code, e.message));
        assert_eq!(e, Some((400, "the namespace of the provided object does not match the namespace sent on the request".to_owned())));
        let both = json!({"user": "ed", "resourceAttributes": {"namespace": "team"}, "nonResourceAttributes": {"path": "/x"}});
        assert_eq!(spec_causes(&both, &UserInfo { name: "ed".into(), ..UserInfo::default() }).len(), 1);
        assert_eq!(local_causes(&both, "team").len(), 1, "non-resource reviews are not local");
    }
}
