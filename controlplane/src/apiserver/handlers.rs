//! HTTP routing and handlers. Kubernetes paths do not fit a static route
//! table well (namespaced vs cluster-scoped, subresources), so one handler
//! parses the path and dispatches.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, Method, Request, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    api::{Api, DeleteOptions, FieldValidation, ListQuery, WriteOptions},
    authn::{Authenticator, Connection, UserInfo},
    authz::{self, Authorizer},
    discovery, escalation,
    limits::{self, Limits, WatchBudget},
    node_authz, object, openapi,
    patch::{self, PatchType},
    proxy::PodProxy,
    reviews,
    selectors::{FieldSelector, LabelSelector},
    status::{ApiError, ApiResult, json_response},
    table::{self, IncludeObject},
    watch::{self, WatchParams},
};
use crate::registry::{self, Resource};

pub struct AppState {
    pub api: Arc<Api>,
    pub authn: Authenticator,
    pub authz: Arc<Authorizer>,
    pub limits: Limits,
    pub watches: Arc<WatchBudget>,
    pub proxy: Arc<dyn PodProxy>,
    pub bookmark_interval: Duration,
    pub server_address: String,
}

type Q = HashMap<String, String>;

fn ok(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// Paths anyone may read, authenticated or not.
fn public(path: &str) -> bool {
    matches!(path.trim_end_matches('/'), "/healthz" | "/livez" | "/readyz" | "/version")
}

pub async fn handle(State(st): State<Arc<AppState>>, mut req: Request<Body>) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let mut user = st.authn.authenticate(&st.api, req.headers(), req.extensions().get::<Connection>()).await;
    if !public(&path) {
        if user.is_anonymous() {
            return ApiError::unauthorized().into_response();
        }
        user = match escalation::impersonate(&st.authz, &st.api, user, req.headers()).await {
            Ok(u) => u,
            Err(e) => return e.into_response(),
        };
        let attrs = authz::attributes(&user, &method, &path, &query(&req), req.headers());
        match st.authz.allows(&st.api, &attrs).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(user = %user.name, verb = %attrs.verb, resource = %attrs.resource, %path, "forbidden");
                return authz::forbidden(&attrs).into_response();
            }
            Err(e) => return e.into_response(),
        }
    }
    req.extensions_mut().insert(user);
    tracing::debug!(%method, uri = %req.uri(), "request");
    let result = route(&st, req).await;
    // This server's own RBAC writes count at once (the store watch follows).
    if method != Method::GET && path.starts_with(&format!("/apis/{}/", authz::RBAC_GROUP)) {
        st.authz.invalidate();
    }
    match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %path, code = e.code, reason = e.reason, message = %e.message, "request failed");
            e.into_response()
        }
    }
}

fn query(req: &Request<Body>) -> Q {
    Query::<Q>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default()
}

fn truthy(q: &Q, k: &str) -> bool {
    q.get(k).is_some_and(|v| matches!(v.as_str(), "true" | "1" | "True"))
}

fn table_request(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|a| a.split(',').next().is_some_and(|first| first.contains("as=Table")))
}

async fn body_bytes(st: &AppState, req: Request<Body>) -> ApiResult<(HeaderMap, bytes::Bytes)> {
    let (parts, body) = req.into_parts();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|h| h.to_str().ok()).and_then(|h| h.parse().ok());
    let b = limits::read_body(body, declared, st.limits.max_body_bytes).await?;
    Ok((parts.headers, b))
}

/// Decode a request body (JSON, YAML or protobuf), off the async workers
/// when it is large.
async fn parse_body(headers: &HeaderMap, b: bytes::Bytes) -> ApiResult<Value> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|h| h.to_str().ok()).unwrap_or("application/json").to_string();
    limits::offload(b.len(), move || decode_body(&ct, &b)).await?
}

/// A DeleteOptions body; anything undecodable counts as none.
async fn delete_body(b: bytes::Bytes) -> ApiResult<Option<Value>> {
    limits::offload(b.len(), move || serde_json::from_slice(&b).ok()).await
}

fn decode_body(ct: &str, b: &[u8]) -> ApiResult<Value> {
    if ct.contains("protobuf") {
        return super::protobuf::decode(b);
    }
    let v: Value = if ct.contains("yaml") {
        serde_norway::from_slice(b).map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?
    } else {
        serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))?
    };
    if !v.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    Ok(v)
}

/// [`write_opts`] plus the checks that depend on who writes.
async fn guarded_write_opts(st: &AppState, res: &Resource, user: &UserInfo, q: &Q) -> ApiResult<WriteOptions> {
    let mut opts = write_opts(q);
    opts.writer = st.authz.writer_admission(&st.api, user, res).await?.map(Arc::new);
    opts.user.clone_from(&user.name);
    Ok(opts)
}

/// `resp` with admission's warnings as `Warning: 299 - "…"` headers
/// (k8s.io/apimachinery `NewWarningHeader`: `"` and `\` escaped).
fn with_warnings(mut resp: Response, opts: &WriteOptions) -> Response {
    for w in opts.warnings.take() {
        let text: String = w.chars().filter(|c| !c.is_control()).collect();
        let quoted = text.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = header::HeaderValue::from_bytes(format!("299 - \"{quoted}\"").as_bytes()) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

fn write_opts(q: &Q) -> WriteOptions {
    WriteOptions {
        dry_run: q.get("dryRun").is_some_and(|d| d == "All"),
        field_validation: match q.get("fieldValidation").map(String::as_str) {
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            _ => FieldValidation::Warn,
        },
        writer: None,
        user: String::new(),
        warnings: Default::default(),
    }
}

/// The parsed resource part of a URL.
struct Target {
    res: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(group: &str, version: &str, segs: &[&str]) -> ApiResult<Target> {
    let find = |plural: &str| registry::find(group, version, plural).ok_or_else(ApiError::not_found_path);
    match segs {
        ["namespaces", ns, plural, rest @ ..] if registry::find(group, version, plural).is_some_and(|r| r.namespaced) => {
            let res = find(plural)?;
            match rest {
                [] => Ok(Target { res, ns: Some((*ns).to_string()), name: None, sub: None }),
                [name] => Ok(Target { res, ns: Some((*ns).to_string()), name: Some((*name).to_string()), sub: None }),
                [name, sub] => Ok(Target { res, ns: Some((*ns).to_string()), name: Some((*name).to_string()), sub: Some((*sub).to_string()) }),
                _ => Err(ApiError::not_found_path()),
            }
        }
        [plural] => Ok(Target { res: find(plural)?, ns: None, name: None, sub: None }),
        [plural, name] => {
            let res = find(plural)?;
            if res.namespaced {
                return Err(ApiError::not_found_path());
            }
            Ok(Target { res, ns: None, name: Some((*name).to_string()), sub: None })
        }
        [plural, name, sub] => {
            let res = find(plural)?;
            if res.namespaced {
                return Err(ApiError::not_found_path());
            }
            Ok(Target { res, ns: None, name: Some((*name).to_string()), sub: Some((*sub).to_string()) })
        }
        _ => Err(ApiError::not_found_path()),
    }
}

async fn route(st: &Arc<AppState>, req: Request<Body>) -> ApiResult<Response> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let get = req.method() == Method::GET;
    match segs.as_slice() {
        [] if get => Ok(ok(&json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/openapi/v3", "/version"]}))),
        ["healthz" | "livez" | "readyz", ..] => Ok((StatusCode::OK, "ok").into_response()),
        ["version"] => Ok(ok(&discovery::version())),
        ["api"] if get => Ok(ok(&discovery::api_versions(&st.server_address))),
        ["apis"] if get => Ok(ok(&discovery::api_group_list())),
        ["api", "v1"] if get => discovery::resource_list("", "v1").map(|v| ok(&v)).ok_or_else(ApiError::not_found_path),
        ["apis", g] if get => discovery::api_group(g).map(|v| ok(&v)).ok_or_else(ApiError::not_found_path),
        ["apis", g, v] if get => discovery::resource_list(g, v).map(|d| ok(&d)).ok_or_else(ApiError::not_found_path),
        ["openapi", "v3"] if get => Ok(ok(&openapi::index())),
        ["openapi", "v3", rest @ ..] if get => {
            openapi::group_version(&rest.join("/")).map(|v| ok(&v)).ok_or_else(ApiError::not_found_path)
        }
        ["apis", g, "v1", plural] if reviews::find(g, plural).is_some_and(|r| !r.namespaced) => {
            review(st, g, plural, None, req).await
        }
        ["apis", g, "v1", "namespaces", ns, plural] if reviews::find(g, plural).is_some_and(|r| r.namespaced) => {
            review(st, g, plural, Some((*ns).to_string()), req).await
        }
        ["api", "v1", rest @ ..] => {
            let t = parse_target("", "v1", rest)?;
            resource(st, t, req).await
        }
        ["apis", g, v, rest @ ..] => {
            let t = parse_target(g, v, rest)?;
            resource(st, t, req).await
        }
        _ => Err(ApiError::not_found_path()),
    }
}

async fn review(st: &Arc<AppState>, group: &str, plural: &str, ns: Option<String>, req: Request<Body>) -> ApiResult<Response> {
    let r = reviews::find(group, plural).ok_or_else(ApiError::not_found_path)?;
    if req.method() != Method::POST {
        return Err(ApiError::method_not_allowed(format!("the server does not allow this method on the requested resource ({})", req.method())));
    }
    let requester = req.extensions().get::<UserInfo>().cloned().unwrap_or_else(UserInfo::anonymous);
    let (h, b) = body_bytes(st, req).await?;
    let body = parse_body(&h, b).await?;
    let out = reviews::create(&st.api, &st.authn, &st.authz, r, ns.as_deref(), &requester, body).await?;
    Ok(json_response(StatusCode::CREATED, &out))
}

fn list_query(q: &Q) -> ApiResult<ListQuery> {
    Ok(ListQuery {
        labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?,
        limit: q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(0),
        continue_token: q.get("continue").filter(|c| !c.is_empty()).cloned(),
    })
}

fn delete_opts(q: &Q, body: Option<&Value>) -> DeleteOptions {
    let b = body.cloned().unwrap_or(Value::Null);
    DeleteOptions {
        propagation: q
            .get("propagationPolicy")
            .cloned()
            .or_else(|| b.get("propagationPolicy").and_then(Value::as_str).map(str::to_string))
            .or_else(|| match (q.get("orphanDependents"), b.get("orphanDependents").and_then(Value::as_bool)) {
                (Some(v), _) if v == "true" => Some("Orphan".into()),
                (_, Some(true)) => Some("Orphan".into()),
                _ => None,
            }),
        grace_period: q
            .get("gracePeriodSeconds")
            .and_then(|g| g.parse().ok())
            .or_else(|| b.get("gracePeriodSeconds").and_then(Value::as_i64)),
        precondition_uid: b.pointer("/preconditions/uid").and_then(Value::as_str).map(str::to_string),
        precondition_rv: b.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(str::to_string),
        dry_run: q.get("dryRun").is_some_and(|d| d == "All")
            || b.get("dryRun").and_then(Value::as_array).is_some_and(|a| a.iter().any(|x| x == "All")),
    }
}

async fn resource(st: &Arc<AppState>, t: Target, req: Request<Body>) -> ApiResult<Response> {
    let q = query(&req);
    let api = &st.api;
    let res = t.res;
    let ns = t.ns.as_deref();
    let as_table = table_request(req.headers());
    let include = IncludeObject::parse(q.get("includeObject").map(String::as_str));
    let method = req.method().clone();
    match (&method, t.name.as_deref(), t.sub.as_deref()) {
        // Collection.
        (&Method::GET, None, None) => {
            let lq = list_query(&q)?;
            if truthy(&q, "watch") {
                let params = WatchParams {
                    resource_version: q.get("resourceVersion").cloned(),
                    send_initial_events: q.get("sendInitialEvents").map(|v| v == "true"),
                    bookmarks: truthy(&q, "allowWatchBookmarks"),
                    timeout: q.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs),
                    labels: lq.labels,
                    fields: lq.fields,
                    as_table: as_table.then_some(include),
                    bookmark_interval: st.bookmark_interval,
                };
                let user = req.extensions().get::<UserInfo>().map_or("", |u| u.name.as_str());
                let slot = st.watches.acquire(user)?;
                let rx = watch::start(api.clone(), res, t.ns.clone(), params).await?;
                let body = Body::from_stream(limits::Held::new(ReceiverStream::new(rx), slot));
                let mut r = Response::new(body);
                r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                r.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache, private"));
                return Ok(r);
            }
            let out = api.list(res, ns, &lq).await?;
            let rv = out.revision.to_string();
            if as_table {
                return Ok(ok(&table::table(res, &out.items, include, &rv, out.continue_token.as_deref())));
            }
            let mut meta = json!({"resourceVersion": rv});
            if let Some(c) = &out.continue_token {
                meta["continue"] = json!(c);
            }
            Ok(ok(&json!({"kind": res.list_kind(), "apiVersion": res.api_version(), "metadata": meta, "items": out.items})))
        }
        (&Method::POST, None, None) => {
            let user = req.extensions().get::<UserInfo>().cloned().unwrap_or_default();
            let opts = guarded_write_opts(st, res, &user, &q).await?;
            let (h, b) = body_bytes(st, req).await?;
            let obj = parse_body(&h, b).await?;
            node_authz::admit_create(&user, res.group, res.plural, &obj)?;
            let created = api.create(res, ns, obj, &opts).await?;
            Ok(with_warnings(json_response(StatusCode::CREATED, &created), &opts))
        }
        (&Method::DELETE, None, None) => {
            let lq = list_query(&q)?;
            let (_, b) = body_bytes(st, req).await?;
            let body = delete_body(b).await?;
            let opts = delete_opts(&q, body.as_ref());
            let out = api.list(res, ns, &ListQuery { limit: 0, continue_token: None, ..lq }).await?;
            let mut deleted = Vec::new();
            for o in &out.items {
                let ons = object::namespace(o).to_string();
                match api.delete(res, if res.namespaced { Some(ons.as_str()) } else { None }, object::name(o), &opts).await {
                    Ok(d) => deleted.push(d),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(ok(&json!({"kind": res.list_kind(), "apiVersion": res.api_version(), "metadata": {}, "items": deleted})))
        }
        // Object.
        (&Method::GET, Some(name), None) => {
            let o = api.get(res, ns, name).await?;
            if as_table {
                let rv = object::str_at(&o, "/metadata/resourceVersion").to_string();
                return Ok(ok(&table::table(res, std::slice::from_ref(&o), include, &rv, None)));
            }
            Ok(ok(&o))
        }
        (&Method::PUT, Some(name), None | Some("status")) => {
            let sub = t.sub.as_deref();
            if sub == Some("status") && !res.has_status() {
                return Err(ApiError::not_found_path());
            }
            let user = req.extensions().get::<UserInfo>().cloned().unwrap_or_default();
            let opts = guarded_write_opts(st, res, &user, &q).await?;
            let (h, b) = body_bytes(st, req).await?;
            let obj = parse_body(&h, b).await?;
            let updated = api.update(res, ns, name, obj, sub, &opts).await?;
            Ok(with_warnings(ok(&updated), &opts))
        }
        (&Method::PATCH, Some(name), None | Some("status")) => {
            let user = req.extensions().get::<UserInfo>().cloned().unwrap_or_default();
            let sub = t.sub.as_deref();
            if sub == Some("status") && !res.has_status() {
                return Err(ApiError::not_found_path());
            }
            let (h, b) = body_bytes(st, req).await?;
            let ct = h.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()).unwrap_or("");
            let pt = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media(format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct})"))
            })?;
            let opts = guarded_write_opts(st, res, &user, &q).await?;
            let patched = api.patch(res, ns, name, pt, &b, sub, &opts).await?;
            Ok(with_warnings(ok(&patched), &opts))
        }
        (&Method::DELETE, Some(name), None) => {
            let (_, b) = body_bytes(st, req).await?;
            let body = delete_body(b).await?;
            let opts = delete_opts(&q, body.as_ref());
            Ok(ok(&api.delete(res, ns, name, &opts).await?))
        }
        (&Method::GET, Some(name), Some("status")) if res.has_status() => Ok(ok(&api.get(res, ns, name).await?)),
        // Scale.
        (_, Some(name), Some("scale")) if res.subresources.contains(&"scale") => scale(st, res, ns, name, req, &q).await,
        // Pods.
        (&Method::POST, Some(name), Some("binding")) if res.is("", "pods") => {
            let (h, b) = body_bytes(st, req).await?;
            let binding = parse_body(&h, b).await?;
            bind(api, res, ns, name, &binding).await
        }
        (_, Some(name), Some(sub @ ("log" | "exec" | "attach" | "portforward"))) if res.is("", "pods") => {
            if !res.subresources.contains(&sub) {
                return Err(ApiError::not_found_path());
            }
            let pod = api.get(res, ns, name).await?;
            let node_name = object::str_at(&pod, "/spec/nodeName").to_string();
            let node = match registry::find("", "v1", "nodes") {
                Some(nres) if !node_name.is_empty() => api.get(nres, None, &node_name).await.ok(),
                _ => None,
            };
            Ok(st.proxy.serve(sub, pod, node, req).await)
        }
        // ServiceAccount tokens (TokenRequest).
        (&Method::POST, Some(name), Some("token")) if res.is("", "serviceaccounts") => {
            let ns = ns.unwrap_or("default").to_string();
            let (h, b) = body_bytes(st, req).await?;
            let body = parse_body(&h, b).await?;
            Ok(json_response(StatusCode::CREATED, &reviews::token_request(api, &st.authn, &ns, name, body).await?))
        }
        // Namespaces.
        (&Method::PUT, Some(name), Some("finalize")) if res.kind == "Namespace" => {
            let (h, b) = body_bytes(st, req).await?;
            let obj = parse_body(&h, b).await?;
            let fins: Vec<String> = obj
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            Ok(ok(&api.finalize_namespace(name, fins).await?))
        }
        (_, _, Some(_)) => Err(ApiError::not_found_path()),
        _ => Err(ApiError::method_not_allowed(format!("the server does not allow this method on the requested resource ({method})"))),
    }
}

fn scale_of(res: &Resource, o: &Value) -> Value {
    let sel = o.pointer("/spec/selector").map(LabelSelector::from_object).map(|s| s.to_string_form()).unwrap_or_default();
    let m = o.get("metadata").cloned().unwrap_or(json!({}));
    let _ = res;
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": m.get("name"), "namespace": m.get("namespace"), "uid": m.get("uid"),
            "resourceVersion": m.get("resourceVersion"), "creationTimestamp": m.get("creationTimestamp")},
        "spec": {"replicas": o.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
        "status": {"replicas": o.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0), "selector": sel}})
}

async fn scale(st: &Arc<AppState>, res: &'static Resource, ns: Option<&str>, name: &str, req: Request<Body>, q: &Q) -> ApiResult<Response> {
    let api = &st.api;
    let method = req.method().clone();
    if method == Method::GET {
        return Ok(ok(&scale_of(res, &api.get(res, ns, name).await?)));
    }
    let (h, b) = body_bytes(st, req).await?;
    let current = api.get(res, ns, name).await?;
    let cur_scale = scale_of(res, &current);
    let new_scale = match method {
        Method::PUT => parse_body(&h, b).await?,
        Method::PATCH => {
            let ct = h.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()).unwrap_or("");
            let doc: Value = limits::offload(b.len(), move || serde_json::from_slice(&b))
                .await?
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            match PatchType::from_content_type(ct) {
                Some(PatchType::Json) => patch::json_patch(&cur_scale, &doc)?,
                Some(PatchType::Merge) => patch::merge_patch(&cur_scale, &doc),
                Some(_) => patch::strategic_merge("Scale", &cur_scale, &doc)?,
                None => return Err(ApiError::unsupported_media(format!("unsupported patch type {ct}"))),
            }
        }
        _ => return Err(ApiError::method_not_allowed("scale supports get, update and patch")),
    };
    let replicas = new_scale.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0);
    if replicas < 0 {
        return Err(ApiError::invalid(res, name, &[super::status::Cause::invalid("spec.replicas", replicas, "must be greater than or equal to 0")]));
    }
    let want_rv = object::str_at(&new_scale, "/metadata/resourceVersion").to_string();
    let cur_rv = object::str_at(&current, "/metadata/resourceVersion").to_string();
    if method == Method::PUT && !want_rv.is_empty() && want_rv != cur_rv {
        return Err(ApiError::stale(res, name));
    }
    let _ = write_opts(q);
    let updated = api
        .mutate(res, ns, name, None, |o| {
            object::obj_at(o, &["spec"]).insert("replicas".into(), json!(replicas));
            Ok(true)
        })
        .await?;
    Ok(ok(&scale_of(res, &updated)))
}

async fn bind(api: &Arc<Api>, res: &'static Resource, ns: Option<&str>, name: &str, binding: &Value) -> ApiResult<Response> {
    let node = object::str_at(binding, "/target/name").to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(res, name, &[super::status::Cause::required("target.name")]));
    }
    let pod = api.get(res, ns, name).await?;
    let existing = object::str_at(&pod, "/spec/nodeName");
    if !existing.is_empty() {
        return Err(ApiError::conflict(res, name, &format!("pod {name} is already assigned to node \"{existing}\"")));
    }
    if object::is_deleting(&pod) {
        return Err(ApiError::conflict(res, name, "pod is being deleted, cannot be assigned to a host"));
    }
    let n = node.clone();
    api.mutate(res, ns, name, None, move |o| {
        object::obj_at(o, &["spec"]).insert("nodeName".into(), json!(n));
        Ok(true)
    })
    .await?;
    api.mutate(res, ns, name, Some("status"), |o| {
        let status = object::obj_at(o, &["status"]);
        let conds = status.entry("conditions").or_insert_with(|| json!([]));
        if let Value::Array(cs) = conds {
            cs.retain(|c| object::str_at(c, "/type") != "PodScheduled");
            cs.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                "lastTransitionTime": object::now_rfc3339()}));
        }
        Ok(true)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})))
}
