//! The object operations behind every handler (and the in-process
//! controllers): get, list, create, update, patch, delete, with the
//! kube-apiserver rules for metadata, status, generation, optimistic
//! concurrency, finalizers and Service allocation.

use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

use super::{
    admission::{self, Admission},
    allocator::{self, Allocator, Held},
    defaults,
    object::{self, meta_mut, now_rfc3339},
    patch::{self, PatchType},
    pod_security,
    selectors::{FieldSelector, LabelSelector},
    status::{ApiError, ApiResult},
    validation,
};
use crate::{
    registry::{self, Resource},
    storage::{Record, Store, StorageError},
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    /// Checks that depend on who writes (RBAC escalation, NodeRestriction).
    pub writer: Option<Arc<super::escalation::WriterAdmission>>,
    /// Who writes (empty for the in-process controllers).
    pub user: String,
    /// Where admission leaves warnings for the client.
    pub warnings: admission::Warnings,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub propagation: Option<String>,
    pub grace_period: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
}

pub struct ListOut {
    pub items: Vec<Value>,
    pub revision: i64,
    pub continue_token: Option<String>,
}

/// Object operations over a store.
pub struct Api {
    pub store: Arc<dyn Store>,
    alloc: Mutex<Allocator>,
    admission: Admission,
}

pub fn decode(rec: &Record) -> ApiResult<Value> {
    let mut v: Value = serde_json::from_slice(&rec.value)
        .map_err(|e| ApiError::internal(format!("decoding stored object {}: {e}", rec.key)))?;
    meta_mut(&mut v).insert("resourceVersion".into(), json!(rec.mod_revision.to_string()));
    Ok(v)
}

fn encode(v: &Value) -> ApiResult<Vec<u8>> {
    let mut c = v.clone();
    if let Some(m) = c.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&c).map_err(|e| ApiError::internal(e.to_string()))
}

fn rv_of(v: &Value) -> i64 {
    object::str_at(v, "/metadata/resourceVersion").parse().unwrap_or(0)
}

fn lock_err<T>(_: T) -> ApiError {
    ApiError::internal("allocator lock poisoned")
}

impl admission::ServiceAccounts for Api {
    async fn service_account(&self, ns: &str, name: &str) -> ApiResult<Option<Value>> {
        let res = registry::find("", "v1", "serviceaccounts").ok_or_else(|| ApiError::internal("no serviceaccounts resource"))?;
        self.store.get(&res.key(Some(ns), name)).await?.map(|r| decode(&r)).transpose()
    }
}

impl admission::LbPools for Api {
    async fn lb_pools(&self) -> ApiResult<Vec<crate::lb_pools::Pool>> {
        use crate::lb_pools::{POOLS_CONFIGMAP, POOLS_NAMESPACE, parse_pools};
        let res = registry::find("", "v1", "configmaps").ok_or_else(|| ApiError::internal("no configmaps resource"))?;
        let Some(rec) = self.store.get(&res.key(Some(POOLS_NAMESPACE), POOLS_CONFIGMAP)).await? else { return Ok(Vec::new()) };
        let data = decode(&rec)?.get("data").cloned().unwrap_or(Value::Null);
        let data: std::collections::BTreeMap<String, String> = serde_json::from_value(data).unwrap_or_default();
        // Invalid pools: the LB IPAM controller hands out nothing from
        // them (and says why on the ConfigMap), so nothing is allowed.
        Ok(parse_pools(&data).unwrap_or_default())
    }
}

impl Api {
    /// Build the API over `store`: rebuild Service allocations and create
    /// the objects every cluster starts with.
    pub async fn new(store: Arc<dyn Store>, admission: Admission) -> ApiResult<Arc<Self>> {
        let api = Arc::new(Self { store, alloc: Mutex::new(Allocator::new()), admission });
        api.rebuild_allocations().await?;
        api.bootstrap().await?;
        Ok(api)
    }

    async fn rebuild_allocations(&self) -> ApiResult<()> {
        let res = registry::find("", "v1", "services").ok_or_else(|| ApiError::internal("no services resource"))?;
        let list = self.store.list(&res.prefix(), None, 0).await?;
        let mut a = self.alloc.lock().map_err(lock_err)?;
        for r in &list.records {
            a.take(&allocator::held_by(&decode(r)?));
        }
        Ok(())
    }

    async fn bootstrap(&self) -> ApiResult<()> {
        let ns = registry::find("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces"))?;
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match self.create(ns, None, obj, &WriteOptions::default()).await {
                Ok(_) => {}
                Err(e) if e.reason == "AlreadyExists" => {}
                Err(e) => return Err(e),
            }
        }
        let svc = registry::find("", "v1", "services").ok_or_else(|| ApiError::internal("no services"))?;
        if self.store.get(&svc.key(Some("default"), "kubernetes")).await?.is_some() {
            return Ok(());
        }
        let kubernetes = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": allocator::KUBERNETES_SERVICE_IP.to_string(),
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}});
        match self.create(svc, Some("default"), kubernetes, &WriteOptions::default()).await {
            Ok(_) => Ok(()),
            Err(e) if e.reason == "AlreadyExists" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Points the `default/kubernetes` Service at this apiserver, as
    /// kube-apiserver's endpoint reconciler does: an Endpoints and an
    /// EndpointSlice named `kubernetes` with `ip:port`, and the Service's
    /// `targetPort` set to `port`. Idempotent (writes only what differs), so
    /// it runs periodically and repairs a deleted or edited object. Pods use
    /// it through `KUBERNETES_SERVICE_HOST` (in-cluster config).
    pub async fn publish_kubernetes_endpoints(&self, ip: std::net::Ipv4Addr, port: u16) -> ApiResult<()> {
        let find = |plural: &str| {
            registry::find(if plural == "endpointslices" { "discovery.k8s.io" } else { "" }, "v1", plural)
                .ok_or_else(|| ApiError::internal(format!("no {plural} resource")))
        };
        let labels = json!({"kubernetes.io/service-name": "kubernetes"});
        let endpoints = json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": [{"ip": ip.to_string()}],
                         "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]});
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": labels},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}]});
        for (res, want, fields) in [
            (find("endpoints")?, endpoints, &["subsets"][..]),
            (find("endpointslices")?, slice, &["addressType", "endpoints", "ports"][..]),
        ] {
            match self.get(res, Some("default"), "kubernetes").await {
                Err(e) if e.reason == "NotFound" => match self.create(res, Some("default"), want, &WriteOptions::default()).await {
                    Ok(_) => {}
                    // Another apiserver (or a retry) got there first; the
                    // next pass compares.
                    Err(e) if e.reason == "AlreadyExists" => {}
                    Err(e) => return Err(e),
                },
                Err(e) => return Err(e),
                Ok(_) => {
                    self.mutate(res, Some("default"), "kubernetes", None, |obj| {
                        let mut changed = false;
                        for f in fields {
                            if obj.get(*f) != want.get(*f) {
                                obj[*f] = want[*f].clone();
                                changed = true;
                            }
                        }
                        for (k, v) in want["metadata"]["labels"].as_object().into_iter().flatten() {
                            if obj["metadata"]["labels"].get(k) != Some(v) {
                                if !obj["metadata"]["labels"].is_object() {
                                    obj["metadata"]["labels"] = json!({});
                                }
                                obj["metadata"]["labels"][k] = v.clone();
                                changed = true;
                            }
                        }
                        Ok(changed)
                    })
                    .await?;
                }
            }
        }
        let svc = find("services")?;
        self.mutate(svc, Some("default"), "kubernetes", None, |obj| {
            let Some(ports) = obj["spec"]["ports"].as_array_mut() else { return Ok(false) };
            let mut changed = false;
            for p in ports.iter_mut().filter(|p| p["name"] == "https") {
                if p["targetPort"] != json!(port) {
                    p["targetPort"] = json!(port);
                    changed = true;
                }
            }
            Ok(changed)
        })
        .await?;
        Ok(())
    }

    pub async fn get(&self, res: &Resource, ns: Option<&str>, name: &str) -> ApiResult<Value> {
        match self.store.get(&res.key(ns, name)).await? {
            Some(r) => decode(&r),
            None => Err(ApiError::not_found(res, name)),
        }
    }

    pub async fn list(&self, res: &Resource, ns: Option<&str>, q: &ListQuery) -> ApiResult<ListOut> {
        let prefix = res.ns_prefix(ns);
        let (mut start_after, token_rev) = match &q.continue_token {
            Some(t) => {
                let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(t)
                    .map_err(|_| ApiError::bad_request("continue key is not valid"))?;
                let v: Value = serde_json::from_slice(&raw).map_err(|_| ApiError::bad_request("continue key is not valid"))?;
                (Some(v["start"].as_str().unwrap_or("").to_string()), v["rv"].as_i64())
            }
            None => (None, None),
        };
        let mut items = Vec::new();
        let chunk = if q.limit > 0 { q.limit.max(100) } else { 0 };
        let mut revision = 0;
        let mut continue_token = None;
        loop {
            let page = self.store.list(&prefix, start_after.as_deref(), chunk).await?;
            revision = revision.max(page.revision);
            let mut full = false;
            for rec in &page.records {
                start_after = Some(rec.key.clone());
                let v = decode(rec)?;
                if q.labels.matches(&v) && q.fields.matches(&v) {
                    items.push(v);
                    if q.limit > 0 && items.len() == q.limit {
                        full = true;
                        break;
                    }
                }
            }
            if full {
                let consumed_page = page.records.last().map(|r| &r.key) == start_after.as_ref();
                if !consumed_page || page.more {
                    let tok = json!({"rv": token_rev.unwrap_or(revision), "start": start_after});
                    continue_token = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tok.to_string()));
                }
                break;
            }
            if !page.more {
                break;
            }
        }
        Ok(ListOut { items, revision: token_rev.unwrap_or(revision), continue_token })
    }

    async fn namespace_check(&self, ns: &str) -> ApiResult<()> {
        let nsr = registry::find("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces"))?;
        let n = self.get(nsr, None, ns).await?;
        if object::is_deleting(&n) {
            return Err(ApiError::forbidden(format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            )));
        }
        Ok(())
    }

    /// Defaulting + typed check + validation shared by create and update.
    fn admit(res: &Resource, obj: &mut Value, opts: &WriteOptions) -> ApiResult<()> {
        if let Value::Object(m) = obj {
            m.insert("apiVersion".into(), json!(res.api_version()));
            m.insert("kind".into(), json!(res.kind));
        }
        let unknown = validation::typed_check(res, obj)?;
        if opts.field_validation == FieldValidation::Strict && !unknown.is_empty() {
            let msgs: Vec<String> = unknown.iter().map(|u| format!("unknown field \"{u}\"")).collect();
            return Err(ApiError::bad_request(format!("strict decoding error: {}", msgs.join(", "))));
        }
        defaults::apply(res, obj);
        validation::validate(res, obj)
    }

    pub async fn create(&self, res: &Resource, ns: Option<&str>, mut obj: Value, opts: &WriteOptions) -> ApiResult<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request was in an unknown format"));
        }
        if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
            && av != res.api_version()
        {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
        if let Some(k) = obj.get("kind").and_then(Value::as_str)
            && k != res.kind
        {
            return Err(ApiError::bad_request(format!("the kind in the data ({k}) does not match the expected kind ({})", res.kind)));
        }
        let ns = if res.namespaced { Some(ns.unwrap_or("default")) } else { None };
        {
            let meta = meta_mut(&mut obj);
            if let Some(ns) = ns {
                match meta.get("namespace").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() && n != ns => {
                        return Err(ApiError::bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ));
                    }
                    _ => {
                        meta.insert("namespace".into(), json!(ns));
                    }
                }
            } else {
                meta.remove("namespace");
            }
            let has_name = meta.get("name").and_then(Value::as_str).is_some_and(|n| !n.is_empty());
            if !has_name
                && let Some(g) = meta.get("generateName").and_then(Value::as_str).filter(|g| !g.is_empty())
            {
                let name = format!("{g}{}", object::random_suffix(5));
                meta.insert("name".into(), json!(name));
            }
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            meta.insert("generation".into(), json!(1));
            meta.remove("resourceVersion");
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
            meta.remove("selfLink");
        }
        // Status is owned by controllers: cleared on create, except where
        // the creator is the status owner (nodes, events-like objects).
        if res.has_status()
            && !matches!(res.kind, "Node" | "Namespace")
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        Self::admit(res, &mut obj, opts)?;
        let name = object::name(&obj).to_string();
        self.admission.service(self, res, &name, &obj, None).await?;
        if let Some(writer) = &opts.writer {
            writer.check(res, None, &obj)?;
        }
        if let Some(ns) = ns {
            self.namespace_check(ns).await?;
            self.admission.pod_service_account(self, res, ns, &mut obj).await?;
        }
        let w = pod_security::Write { res, ns, name: &name, user: &opts.user, new: &obj, old: None };
        self.admission.pod_security.admit(self, &w, &opts.warnings).await?;
        let held = if res.is("", "services") {
            let mut a = self.alloc.lock().map_err(lock_err)?;
            a.assign(&mut obj, None).map_err(|c| ApiError::invalid(res, &name, &c))?
        } else {
            Held::default()
        };
        if opts.dry_run {
            self.release(&held);
            return Ok(obj);
        }
        let key = res.key(ns, &name);
        match self.store.create(&key, encode(&obj)?).await {
            Ok(rev) => {
                meta_mut(&mut obj).insert("resourceVersion".into(), json!(rev.to_string()));
                Ok(obj)
            }
            Err(e) => {
                self.release(&held);
                Err(ApiError::storage(res, &name, e))
            }
        }
    }

    fn release(&self, h: &Held) {
        if (h.ip.is_some() || !h.ports.is_empty())
            && let Ok(mut a) = self.alloc.lock()
        {
            a.release(h);
        }
    }

    /// Write `new` over `old` (both full objects; `old` carries its RV).
    /// `sub` is the subresource ("status" or None).
    // The arguments are the parts of one REST write (target, versions, options).
    #[allow(clippy::too_many_arguments)]
    async fn write_update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        old: &Value,
        mut new: Value,
        sub: Option<&str>,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        if !new.is_object() {
            return Err(ApiError::bad_request("the body of the request was in an unknown format"));
        }
        let body_name = object::name(&new);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_rv = rv_of(old);
        let body_rv = object::str_at(&new, "/metadata/resourceVersion").to_string();
        if !body_rv.is_empty() && body_rv.parse::<i64>().ok() != Some(old_rv) {
            return Err(ApiError::stale(res, name));
        }
        if sub == Some("status") {
            // Only status (and metadata labels/annotations) change here.
            let status = new.get("status").cloned();
            let mut merged = old.clone();
            if let Value::Object(m) = &mut merged {
                match status {
                    Some(s) => m.insert("status".into(), s),
                    None => m.remove("status"),
                };
            }
            new = merged;
        } else if res.has_status()
            && let Value::Object(m) = &mut new
        {
            match old.get("status") {
                Some(s) => m.insert("status".into(), s.clone()),
                None => m.remove("status"),
            };
        }
        if res.kind == "Namespace" && sub != Some("finalize") {
            // spec.finalizers only change through /finalize.
            if let (Value::Object(m), Some(spec)) = (&mut new, old.get("spec")) {
                m.insert("spec".into(), spec.clone());
            }
        }
        {
            let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
            let meta = meta_mut(&mut new);
            for k in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "namespace", "name", "generation"] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.into(), v.clone()),
                    None => meta.remove(k),
                };
            }
            meta.remove("resourceVersion");
        }
        Self::admit(res, &mut new, opts)?;
        self.admission.service(self, res, name, &new, Some(old)).await?;
        if let Some(writer) = &opts.writer {
            writer.check(res, Some(old), &new)?;
        }
        if sub.is_none() {
            let w = pod_security::Write { res, ns, name, user: &opts.user, new: &new, old: Some(old) };
            self.admission.pod_security.admit(self, &w, &opts.warnings).await?;
        }
        if object::spec_part(&new) != object::spec_part(old) && sub.is_none() {
            let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        let old_held = if res.is("", "services") { allocator::held_by(old) } else { Held::default() };
        let new_held = if res.is("", "services") {
            let mut a = self.alloc.lock().map_err(lock_err)?;
            a.assign(&mut new, Some(old)).map_err(|c| ApiError::invalid(res, name, &c))?
        } else {
            Held::default()
        };
        let newly = Held {
            ip: new_held.ip.filter(|ip| old_held.ip != Some(*ip)),
            ports: new_held.ports.iter().copied().filter(|p| !old_held.ports.contains(p)).collect(),
        };
        let freed = Held {
            ip: old_held.ip.filter(|ip| new_held.ip != Some(*ip)),
            ports: old_held.ports.iter().copied().filter(|p| !new_held.ports.contains(p)).collect(),
        };
        let mut old_cmp = old.clone();
        meta_mut(&mut old_cmp).remove("resourceVersion");
        if new == old_cmp {
            // No-op updates do not write (kube-apiserver does the same), so
            // a repeated `kubectl apply` leaves the resourceVersion alone.
            return Ok(old.clone());
        }
        if opts.dry_run {
            self.release(&newly);
            return Ok(new);
        }
        let key = res.key(ns, name);
        // Upstream's shouldDeleteDuringUpdate: with no finalizer left, an
        // object being deleted goes away now, unless it is still inside a
        // grace period (a pod whose kubelet is stopping it: a status patch
        // must not cut its containers' grace short; the kubelet's final
        // delete with gracePeriodSeconds=0 removes it).
        let in_grace = old.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64).is_some_and(|g| g > 0);
        if object::is_deleting(&new) && !in_grace && object::finalizers(&new).is_empty() && !ns_has_spec_finalizers(res, &new) {
            self.release(&newly);
            return match self.store.delete(&key, Some(old_rv)).await {
                Ok(_) => {
                    self.release(&old_held);
                    Ok(new)
                }
                Err(e) => Err(ApiError::storage(res, name, e)),
            };
        }
        match self.store.update(&key, encode(&new)?, old_rv).await {
            Ok(rev) => {
                self.release(&freed);
                meta_mut(&mut new).insert("resourceVersion".into(), json!(rev.to_string()));
                Ok(new)
            }
            Err(e) => {
                self.release(&newly);
                Err(ApiError::storage(res, name, e))
            }
        }
    }

    pub async fn update(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        new: Value,
        sub: Option<&str>,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        let old = self.get(res, ns, name).await?;
        self.write_update(res, ns, name, &old, new, sub, opts).await
    }

    /// Read-modify-write with retries on conflicts (for controllers and
    /// patches). `f` returns Ok(false) to skip the write.
    pub async fn mutate(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        mut f: impl FnMut(&mut Value) -> ApiResult<bool> + Send,
    ) -> ApiResult<Value> {
        let mut last = None;
        for _ in 0..8 {
            let old = self.get(res, ns, name).await?;
            let mut new = old.clone();
            if !f(&mut new)? {
                return Ok(old);
            }
            meta_mut(&mut new).remove("resourceVersion");
            match self.write_update(res, ns, name, &old, new, sub, &WriteOptions::default()).await {
                Err(e) if e.reason == "Conflict" => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::stale(res, name)))
    }

    // The arguments are the parts of one PATCH request (target, body, options).
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        ptype: PatchType,
        body: &[u8],
        sub: Option<&str>,
        opts: &WriteOptions,
    ) -> ApiResult<Value> {
        // Decoding and applying a large patch is CPU work for the blocking pool.
        let weight = body.len();
        let raw = body.to_vec();
        let patch_doc: Arc<Value> = Arc::new(super::limits::offload(weight, move || match ptype {
            PatchType::Apply => serde_norway::from_slice(&raw)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
            _ => serde_json::from_slice(&raw)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}"))),
        })
        .await??);
        let mut last = None;
        for _ in 0..8 {
            let old = match self.get(res, ns, name).await {
                Ok(o) => o,
                Err(e) if e.code == 404 && ptype == PatchType::Apply && sub.is_none() => {
                    // Server-side apply creates.
                    let mut obj = (*patch_doc).clone();
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                    return self.create(res, ns, obj, opts).await;
                }
                Err(e) => return Err(e),
            };
            let mut base = old.clone();
            meta_mut(&mut base).remove("resourceVersion");
            let (doc, kind) = (patch_doc.clone(), res.kind);
            let new = super::limits::offload(weight, move || match ptype {
                PatchType::Json => patch::json_patch(&base, &doc),
                PatchType::Merge => Ok(patch::merge_patch(&base, &doc)),
                PatchType::Strategic | PatchType::Apply => patch::strategic_merge(kind, &base, &doc),
            })
            .await??;
            // A resourceVersion inside the patch is a precondition.
            let patched_rv = object::str_at(&new, "/metadata/resourceVersion").to_string();
            let mut new = new;
            if patched_rv.is_empty() {
                meta_mut(&mut new).insert("resourceVersion".into(), json!(rv_of(&old).to_string()));
            }
            match self.write_update(res, ns, name, &old, new, sub, opts).await {
                Err(e) if e.reason == "Conflict" && patched_rv.is_empty() => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::stale(res, name)))
    }

    pub async fn delete(&self, res: &Resource, ns: Option<&str>, name: &str, opts: &DeleteOptions) -> ApiResult<Value> {
        let mut last = None;
        for _ in 0..8 {
            match self.try_delete(res, ns, name, opts).await {
                Err(e) if e.reason == "Conflict" && opts.precondition_rv.is_none() => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::stale(res, name)))
    }

    async fn try_delete(&self, res: &Resource, ns: Option<&str>, name: &str, opts: &DeleteOptions) -> ApiResult<Value> {
        let old = self.get(res, ns, name).await?;
        if let Some(uid) = &opts.precondition_uid
            && uid != object::uid(&old)
        {
            return Err(ApiError::conflict(res, name, &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}", object::uid(&old)
            )));
        }
        if let Some(rv) = &opts.precondition_rv
            && rv.parse::<i64>().ok() != Some(rv_of(&old))
        {
            return Err(ApiError::conflict(res, name, &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", rv_of(&old)
            )));
        }
        let mut new = old.clone();
        let mut finalizers = object::finalizers(&old);
        match opts.propagation.as_deref() {
            Some("Orphan") if !finalizers.iter().any(|f| f == "orphan") => finalizers.push("orphan".into()),
            Some("Foreground") if !finalizers.iter().any(|f| f == "foregroundDeletion") => {
                finalizers.push("foregroundDeletion".into());
            }
            Some("Orphan" | "Foreground" | "Background") | None => {}
            Some(other) => {
                return Err(ApiError::invalid(res, name, &[super::status::Cause::not_supported(
                    "propagationPolicy", other, &["Foreground", "Background", "Orphan"],
                )]));
            }
        }
        // Pods on a node terminate gracefully: the kubelet finishes the delete.
        let grace = if res.is("", "pods") && !object::str_at(&old, "/spec/nodeName").is_empty() {
            opts.grace_period
                .or_else(|| old.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64))
                .unwrap_or(30)
        } else {
            0
        };
        let ns_finalizing = ns_has_spec_finalizers(res, &old);
        if !finalizers.is_empty() || grace > 0 || ns_finalizing {
            let already = object::is_deleting(&old);
            let old_grace = old.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64);
            let meta = meta_mut(&mut new);
            meta.insert("finalizers".into(), json!(finalizers));
            if !already || old_grace.is_some_and(|g| grace < g) {
                meta.insert("deletionTimestamp".into(), json!(object::rfc3339_after(grace)));
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            if ns_finalizing {
                object::obj_at(&mut new, &["status"]).insert("phase".into(), json!("Terminating"));
            }
            if opts.dry_run || new == old {
                return Ok(new);
            }
            return self.store_deleting(res, ns, name, &old, new).await;
        }
        if opts.dry_run {
            return Ok(old);
        }
        let (_, rec) = self
            .store
            .delete(&res.key(ns, name), Some(rv_of(&old)))
            .await
            .map_err(|e| ApiError::storage(res, name, e))?;
        if res.is("", "services") {
            self.release(&allocator::held_by(&old));
        }
        let _ = rec;
        Ok(old)
    }

    /// Store an object that now carries deletionTimestamp (bypassing the
    /// update rules that keep deletion metadata immutable).
    async fn store_deleting(&self, res: &Resource, ns: Option<&str>, name: &str, old: &Value, mut new: Value) -> ApiResult<Value> {
        meta_mut(&mut new).remove("resourceVersion");
        match self.store.update(&res.key(ns, name), encode(&new)?, rv_of(old)).await {
            Ok(rev) => {
                meta_mut(&mut new).insert("resourceVersion".into(), json!(rev.to_string()));
                Ok(new)
            }
            Err(StorageError::Conflict { .. }) => Err(ApiError::stale(res, name)),
            Err(e) => Err(ApiError::storage(res, name, e)),
        }
    }

    /// Namespace finalization (the `/finalize` subresource): replaces
    /// spec.finalizers, deleting the namespace when nothing holds it.
    pub async fn finalize_namespace(&self, name: &str, spec_finalizers: Vec<String>) -> ApiResult<Value> {
        let res = registry::find("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces"))?;
        let old = self.get(res, None, name).await?;
        let mut new = old.clone();
        object::obj_at(&mut new, &["spec"]).insert("finalizers".into(), json!(spec_finalizers));
        if object::is_deleting(&new) && spec_finalizers.is_empty() && object::finalizers(&new).is_empty() {
            self.store.delete(&res.key(None, name), Some(rv_of(&old))).await.map_err(|e| ApiError::storage(res, name, e))?;
            return Ok(new);
        }
        self.store_deleting(res, None, name, &old, new).await
    }
}

fn ns_has_spec_finalizers(res: &Resource, obj: &Value) -> bool {
    res.kind == "Namespace"
        && obj.pointer("/spec/finalizers").and_then(Value::as_array).is_some_and(|a| !a.is_empty())
}

/// Decode a stored value seen in a watch event at `revision`.
pub fn decode_event_value(value: &[u8], revision: i64) -> ApiResult<Value> {
    let mut v: Value = serde_json::from_slice(value).map_err(|e| ApiError::internal(e.to_string()))?;
    meta_mut(&mut v).insert("resourceVersion".into(), json!(revision.to_string()));
    Ok(v)
}
