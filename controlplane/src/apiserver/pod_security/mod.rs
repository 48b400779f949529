//! Pod Security Admission: upstream's built-in `PodSecurity` admission
//! plugin (k8s.io/pod-security-admission, the Pod Security Standards).
//!
//! A namespace picks a level per mode with the labels
//! `pod-security.kubernetes.io/{enforce,audit,warn}` (`privileged`,
//! `baseline`, `restricted`) and a policy version with `…-version`
//! (`latest` or `v1.N`). Unlabelled modes take the server's defaults
//! (`--pod-security-default-*`; upstream's default is `privileged` for all
//! three). Then:
//! - **enforce**: a Pod create, or an update that changes an image or the
//!   set of containers (upstream's `isSignificantPodUpdate`), that breaks the
//!   level is refused: 403 `pods "x" is forbidden: violates PodSecurity
//!   "restricted:latest": <reason> (<detail>), …`;
//! - **warn**: the same text, as `would violate PodSecurity …`, goes back in
//!   a `Warning` header, for Pods and for the pod templates of workloads
//!   (which are never refused, as upstream: their pods are);
//! - **audit**: upstream writes the violation into the audit event. This
//!   apiserver keeps no audit log yet, so it is an `info` line in its own
//!   log (target `pod_security`).
//!
//! Namespace labels are validated on create and on updates that change them
//! (422 Invalid). Tightening a namespace's enforce level warns about the
//! existing pods that would break it (at most [`MAX_PODS_TO_CHECK`], one per
//! controller first), as upstream does; nothing is evicted.
//!
//! Versions: each check carries the policy version it appeared or changed
//! in, so `v1.22` judges as 1.22 did. `latest`, and any version newer than
//! this server (it reports Kubernetes 1.32), is the 1.32 policy, as upstream
//! caps it at the apiserver's own version; so the 1.34 probe-host check and
//! the 1.35 user-namespace relaxations are not here yet. RuntimeClass
//! exemptions are not either (this cluster has no RuntimeClass).
//!
//! The checks themselves are in [`checks`]; this module resolves a
//! namespace's policy from its labels and runs the admission flow.

mod checks;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
};

use serde_json::Value;

use self::checks::{reasons, set};
pub use self::checks::{PodView, Violation, describe, evaluate};
use super::{
    Api,
    admission::Warnings,
    api::ListQuery,
    status::{ApiError, ApiResult, Cause},
};
use crate::registry::{self, Resource};

/// The newest policy version judged: the Kubernetes minor this apiserver
/// reports (`/version`), as upstream caps `latest` at its own version.
pub const POLICY_MAX_MINOR: u32 = 32;

/// Pods checked when a namespace's enforce level tightens (upstream's
/// `namespaceMaxPodsToCheck`).
pub const MAX_PODS_TO_CHECK: usize = 3000;

const LABEL_PREFIX: &str = "pod-security.kubernetes.io/";

/// How strict a policy is; ordered from least to most strict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    #[default]
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "privileged" => Some(Self::Privileged),
            "baseline" => Some(Self::Baseline),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        })
    }
}

/// A policy version: `v1.N` or `latest` (newer than any `v1.N`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    Minor(u32),
    #[default]
    Latest,
}

impl Version {
    /// `latest` or `v1.N` (upstream's `^v1\.([0-9]|[1-9][0-9]*)$`).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "latest" {
            return Some(Self::Latest);
        }
        let n = s.strip_prefix("v1.")?;
        let canonical = !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
        canonical.then(|| n.parse().ok().map(Self::Minor)).flatten()
    }

    /// The policy minor version this judges by.
    fn minor(self) -> u32 {
        match self {
            Self::Minor(n) => n.min(POLICY_MAX_MINOR),
            Self::Latest => POLICY_MAX_MINOR,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Minor(n) => write!(f, "v1.{n}"),
            Self::Latest => f.write_str("latest"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LevelVersion {
    pub level: Level,
    pub version: Version,
}

impl LevelVersion {
    /// Both privileged (the version does not matter then), or equal.
    fn equivalent(&self, other: &Self) -> bool {
        (self.level == Level::Privileged && other.level == Level::Privileged) || self == other
    }
}

impl fmt::Display for LevelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.level, self.version)
    }
}

impl std::str::FromStr for LevelVersion {
    type Err = String;

    /// `level` or `level:version`, as the server flags take them.
    fn from_str(s: &str) -> Result<Self, String> {
        let (l, v) = s.split_once(':').unwrap_or((s, "latest"));
        let level = Level::parse(l).ok_or_else(|| format!("{l:?}: must be one of privileged, baseline, restricted"))?;
        let version = Version::parse(v).ok_or_else(|| format!("{v:?}: must be \"latest\" or \"v1.x\""))?;
        Ok(Self { level, version })
    }
}

/// The three modes of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub enforce: LevelVersion,
    pub audit: LevelVersion,
    pub warn: LevelVersion,
}

impl Policy {
    fn fully_privileged(&self) -> bool {
        [self.enforce, self.audit, self.warn].iter().all(|m| m.level == Level::Privileged)
    }

    fn equivalent(&self, other: &Self) -> bool {
        self.enforce.equivalent(&other.enforce) && self.audit.equivalent(&other.audit) && self.warn.equivalent(&other.warn)
    }
}

fn labels_of(obj: &Value) -> BTreeMap<&str, &str> {
    let labels = obj.pointer("/metadata/labels").and_then(Value::as_object).into_iter().flatten();
    labels.filter_map(|(k, v)| Some((k.as_str(), v.as_str()?))).collect()
}

/// The policy `labels` ask for over `defaults`, and the label errors
/// (upstream's `PolicyToEvaluate`). A bad enforce level judges as
/// `restricted` (fail closed), a bad audit or warn level as `privileged`
/// (fail open); a bad version as `latest`. An explicit enforce level
/// stricter than the warn level also warns at it, unless warn is labelled.
pub fn policy_for(labels: &BTreeMap<&str, &str>, defaults: Policy) -> (Policy, Vec<Cause>) {
    let mut p = defaults;
    let mut errs = Vec::new();
    let label = |mode: &str| labels.get(format!("{LABEL_PREFIX}{mode}").as_str()).copied();
    let mut bad = |mode: &str, value: &str, why: &str| {
        errs.push(Cause::invalid(format!("metadata.labels[{LABEL_PREFIX}{mode}]"), value, why));
    };
    const LEVELS: &str = "must be one of privileged, baseline, restricted";
    const VERSIONS: &str = "must be \"latest\" or \"v1.x\"";
    let mut has_enforce_level = false;
    for (mode, lv, fallback) in [
        ("enforce", &mut p.enforce, Level::Restricted),
        ("audit", &mut p.audit, Level::Privileged),
        ("warn", &mut p.warn, Level::Privileged),
    ] {
        if let Some(v) = label(mode) {
            lv.level = Level::parse(v).unwrap_or_else(|| {
                bad(mode, v, LEVELS);
                fallback
            });
            has_enforce_level |= mode == "enforce" && Level::parse(v).is_some();
        }
        if let Some(v) = label(&format!("{mode}-version")) {
            lv.version = Version::parse(v).unwrap_or_else(|| {
                bad(&format!("{mode}-version"), v, VERSIONS);
                Version::Latest
            });
        }
    }
    if label("warn").is_none() && has_enforce_level && p.enforce.level > p.warn.level {
        p.warn.level = p.enforce.level;
        if label("warn-version").is_none() {
            p.warn.version = p.enforce.version;
        }
    }
    (p, errs)
}


/// The PodSecurity plugin's configuration (upstream's
/// `PodSecurityConfiguration`: defaults and exemptions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSecurity {
    /// The policy of a namespace without labels.
    pub defaults: Policy,
    /// Namespaces whose pods are never judged.
    pub exempt_namespaces: Vec<String>,
    /// Users whose requests are never judged.
    pub exempt_users: Vec<String>,
}

/// What the plugin reads from storage.
pub trait PodSecurityStore {
    /// The Namespace `name`.
    fn namespace(&self, name: &str) -> impl Future<Output = ApiResult<Value>> + Send;
    /// Every pod in `ns`.
    fn pods(&self, ns: &str) -> impl Future<Output = ApiResult<Vec<Value>>> + Send;
}

impl PodSecurityStore for Api {
    async fn namespace(&self, name: &str) -> ApiResult<Value> {
        let res = registry::find("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces resource"))?;
        self.get(res, None, name).await
    }

    async fn pods(&self, ns: &str) -> ApiResult<Vec<Value>> {
        let res = registry::find("", "v1", "pods").ok_or_else(|| ApiError::internal("no pods resource"))?;
        Ok(self.list(res, Some(ns), &ListQuery::default()).await?.items)
    }
}

/// One write, as the plugin sees it.
pub struct Write<'a> {
    pub res: &'a Resource,
    pub ns: Option<&'a str>,
    pub name: &'a str,
    pub user: &'a str,
    pub new: &'a Value,
    /// The stored object an update replaces; None on create.
    pub old: Option<&'a Value>,
}

/// The pod template of a workload kind (upstream's `DefaultPodSpecExtractor`).
fn pod_template<'a>(res: &Resource, obj: &'a Value) -> Option<&'a Value> {
    let path = match (res.group, res.kind) {
        ("", "ReplicationController")
        | ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
        | ("batch", "Job") => "/spec/template",
        ("batch", "CronJob") => "/spec/jobTemplate/spec/template",
        ("", "PodTemplate") => "/template",
        _ => return None,
    };
    obj.pointer(path).and_then(set)
}

/// Only image and container-set changes can make a stored pod less safe
/// (the rest of a pod's spec is immutable); upstream judges only those.
fn significant_pod_update(new: &Value, old: &Value) -> bool {
    let list = |p: &Value, k: &str| p.pointer(&format!("/spec/{k}")).and_then(Value::as_array).cloned().unwrap_or_default();
    let image = |c: &Value| c.get("image").cloned();
    for k in ["containers", "initContainers"] {
        let (n, o) = (list(new, k), list(old, k));
        if n.len() != o.len() || n.iter().zip(&o).any(|(a, b)| image(a) != image(b)) {
            return true;
        }
    }
    let old_eph = list(old, "ephemeralContainers");
    list(new, "ephemeralContainers").iter().any(|c| match old_eph.iter().find(|o| o.get("name") == c.get("name")) {
        None => true,
        Some(o) => image(o) != image(c),
    })
}

impl PodSecurity {
    fn exempt(&self, ns: &str, user: &str) -> bool {
        (!ns.is_empty() && self.exempt_namespaces.iter().any(|n| n == ns)) || (!user.is_empty() && self.exempt_users.iter().any(|u| u == user))
    }

    /// Admits a write of a Namespace, a Pod or a workload with a pod
    /// template; every other write passes. Warnings go to `warnings`.
    pub async fn admit(&self, store: &impl PodSecurityStore, w: &Write<'_>, warnings: &Warnings) -> ApiResult<()> {
        if w.res.is("", "namespaces") {
            return self.admit_namespace(store, w, warnings).await;
        }
        let is_pod = w.res.is("", "pods");
        let template = if is_pod { None } else { pod_template(w.res, w.new) };
        if !is_pod && template.is_none() {
            return Ok(());
        }
        let ns = w.ns.unwrap_or_default();
        if self.exempt(ns, w.user) {
            return Ok(());
        }
        // Binding, status-like and metadata edits of a pod: nothing to judge,
        // so no namespace read on the kubelet's and scheduler's hot path.
        if is_pod && w.old.is_some_and(|old| !significant_pod_update(w.new, old)) {
            return Ok(());
        }
        let namespace = store.namespace(ns).await?;
        let (policy, errs) = policy_for(&labels_of(&namespace), self.defaults);
        if !errs.is_empty() {
            let errs: Vec<&str> = errs.iter().map(|c| c.message.as_str()).collect();
            tracing::debug!(target: "pod_security", namespace = ns, errors = ?errs, "invalid PodSecurity labels; judging with the fallbacks");
        }
        if is_pod {
            if errs.is_empty() && policy.fully_privileged() {
                return Ok(());
            }
            self.judge(w, policy, PodView::of(w.new), true, warnings)
        } else {
            if errs.is_empty() && policy.warn.level == Level::Privileged && policy.audit.level == Level::Privileged {
                return Ok(());
            }
            let template = template.unwrap_or(&Value::Null);
            self.judge(w, policy, PodView::of(template), false, warnings)
        }
    }

    /// Upstream's `EvaluatePod`: enforce (pods only), audit, then warn
    /// unless the request is refused.
    fn judge(&self, w: &Write<'_>, policy: Policy, pod: PodView<'_>, enforce: bool, warnings: &Warnings) -> ApiResult<()> {
        let mut results: Vec<(LevelVersion, Vec<Violation>)> = Vec::new();
        let mut eval = |lv: LevelVersion| match results.iter().find(|(l, _)| *l == lv) {
            Some((_, v)) => v.clone(),
            None => {
                let v = evaluate(lv, pod);
                results.push((lv, v.clone()));
                v
            }
        };
        let refused = if enforce { Some(eval(policy.enforce)).filter(|v| !v.is_empty()) } else { None };
        let audit = eval(policy.audit);
        if !audit.is_empty() {
            // No audit log to annotate: the apiserver's log stands in.
            tracing::info!(
                target: "pod_security",
                resource = w.res.plural, namespace = w.ns.unwrap_or_default(), name = w.name, user = w.user,
                "audit-violations: would violate PodSecurity \"{}\": {}", policy.audit, describe(&audit)
            );
        }
        if let Some(v) = refused {
            let resource = if w.res.group.is_empty() { w.res.plural.to_owned() } else { format!("{}.{}", w.res.plural, w.res.group) };
            return Err(ApiError::forbidden(format!(
                "{resource} \"{}\" is forbidden: violates PodSecurity \"{}\": {}",
                w.name,
                policy.enforce,
                describe(&v)
            )));
        }
        let warn = eval(policy.warn);
        if !warn.is_empty() {
            warnings.push(format!("would violate PodSecurity \"{}\": {}", policy.warn, describe(&warn)));
        }
        Ok(())
    }

    /// Upstream's `ValidateNamespace`.
    async fn admit_namespace(&self, store: &impl PodSecurityStore, w: &Write<'_>, warnings: &Warnings) -> ApiResult<()> {
        let labels = labels_of(w.new);
        let (policy, errs) = policy_for(&labels, self.defaults);
        let invalid = |errs: &[Cause]| ApiError::invalid(w.res, w.name, errs);
        let Some(old) = w.old else {
            if !errs.is_empty() {
                return Err(invalid(&errs));
            }
            if self.exempt(w.name, "") {
                warnings.extend(self.exempt_warning(w.name, &policy, &labels));
            }
            return Ok(());
        };
        let (old_policy, old_errs) = policy_for(&labels_of(old), self.defaults);
        let same = |a: &[Cause], b: &[Cause]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.field == y.field && x.message == y.message);
        if !errs.is_empty() && (old_errs.is_empty() || !same(&errs, &old_errs)) {
            return Err(invalid(&errs));
        }
        let (new_e, old_e) = (policy.enforce, old_policy.enforce);
        if new_e == old_e || new_e.level == Level::Privileged || (new_e.version == old_e.version && new_e.level <= old_e.level) {
            return Ok(());
        }
        if self.exempt(w.name, "") {
            warnings.extend(self.exempt_warning(w.name, &policy, &labels));
            return Ok(());
        }
        warnings.extend(self.existing_pods(store, w.name, new_e).await);
        Ok(())
    }

    /// Upstream's `exemptNamespaceWarning`: an exempt namespace labelled
    /// with a policy that will be ignored.
    fn exempt_warning(&self, ns: &str, policy: &Policy, labels: &BTreeMap<&str, &str>) -> Option<String> {
        if policy.fully_privileged() || policy.equivalent(&self.defaults) {
            return None;
        }
        let labelled = |mode: &str| labels.contains_key(format!("{LABEL_PREFIX}{mode}").as_str()) || labels.contains_key(format!("{LABEL_PREFIX}{mode}-version").as_str());
        let modes: Vec<String> = [("enforce", policy.enforce), ("audit", policy.audit), ("warn", policy.warn)]
            .into_iter()
            .filter(|(m, lv)| lv.level != Level::Privileged && labelled(m))
            .map(|(m, lv)| format!("{m}={lv}"))
            .collect();
        Some(format!("namespace \"{ns}\" is exempt from Pod Security, and the policy ({}) will be ignored", modes.join(", ")))
    }

    /// Upstream's `EvaluatePodsInNamespace`: the existing pods that break a
    /// new enforce level, grouped by the reasons they break it.
    async fn existing_pods(&self, store: &impl PodSecurityStore, ns: &str, enforce: LevelVersion) -> Vec<String> {
        let Ok(pods) = store.pods(ns).await else {
            return vec!["failed to list pods while checking new PodSecurity enforce level".to_owned()];
        };
        // One pod per controller first: replicas break a level alike.
        let mut seen = HashSet::new();
        let (mut first, mut rest) = (Vec::new(), Vec::new());
        for p in &pods {
            let owners = p.pointer("/metadata/ownerReferences").and_then(Value::as_array).into_iter().flatten();
            let controller = owners.filter(|o| o.get("controller").and_then(Value::as_bool) == Some(true)).find_map(|o| o.get("uid")?.as_str());
            match controller {
                Some(uid) if !seen.insert(uid) => rest.push(p),
                _ => first.push(p),
            }
        }
        first.extend(rest);
        let total = first.len();
        first.truncate(MAX_PODS_TO_CHECK);
        let mut by_reason: BTreeMap<String, (String, usize)> = BTreeMap::new();
        for p in &first {
            let v = evaluate(enforce, PodView::of(p));
            if v.is_empty() {
                continue;
            }
            let pod_name = super::object::name(p).to_owned();
            let e = by_reason.entry(reasons(&v)).or_insert_with(|| (pod_name.clone(), 0));
            if pod_name < e.0 {
                e.0 = pod_name;
            }
            e.1 += 1;
        }
        let mut out = Vec::new();
        if first.len() < total {
            out.push(format!("new PodSecurity enforce level only checked against the first {} of {total} existing pods", first.len()));
        }
        if !by_reason.is_empty() {
            out.push(format!("existing pods in namespace \"{ns}\" violate the new PodSecurity enforce level \"{enforce}\""));
        }
        let mut pods: Vec<String> = by_reason
            .into_iter()
            .map(|(reason, (pod, n))| match n {
                1 => format!("{pod}: {reason}"),
                2 => format!("{pod} (and 1 other pod): {reason}"),
                _ => format!("{pod} (and {} other pods): {reason}", n - 1),
            })
            .collect();
        pods.sort();
        out.extend(pods);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::{
        checks::tests::{good, with},
        *,
    };

    #[test]
    fn latest_is_the_version_this_server_reports() {
        assert_eq!(super::super::discovery::version()["minor"], json!(POLICY_MAX_MINOR.to_string()));
    }

    fn labels(kv: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
        kv.iter().copied().collect()
    }

    #[test]
    fn labels_pick_levels_and_versions() {
        let (p, errs) = policy_for(&labels(&[("pod-security.kubernetes.io/enforce", "baseline"), ("pod-security.kubernetes.io/enforce-version", "v1.25")]), Policy::default());
        assert!(errs.is_empty());
        assert_eq!(p.enforce.to_string(), "baseline:v1.25");
        // An explicit enforce level stricter than warn also warns at it.
        assert_eq!(p.warn, p.enforce);
        assert_eq!(p.audit.to_string(), "privileged:latest");
        let (p, _) = policy_for(&labels(&[("pod-security.kubernetes.io/enforce", "baseline"), ("pod-security.kubernetes.io/warn", "restricted")]), Policy::default());
        assert_eq!((p.enforce.to_string(), p.warn.to_string()), ("baseline:latest".into(), "restricted:latest".into()));
        // Defaults apply to unlabelled modes.
        let defaults = Policy { enforce: "baseline".parse().unwrap(), ..Policy::default() };
        assert_eq!(policy_for(&labels(&[]), defaults).0, defaults);
    }

    #[test]
    fn bad_labels_are_errors_and_fail_closed_for_enforce() {
        let (p, errs) = policy_for(
            &labels(&[
                ("pod-security.kubernetes.io/enforce", "strict"),
                ("pod-security.kubernetes.io/warn", "nope"),
                ("pod-security.kubernetes.io/audit-version", "1.25"),
            ]),
            Policy::default(),
        );
        assert_eq!(p.enforce.level, Level::Restricted);
        assert_eq!(p.warn.level, Level::Privileged);
        let msgs: Vec<String> = errs.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        assert_eq!(msgs, [
            "metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: \"strict\": must be one of privileged, baseline, restricted",
            "metadata.labels[pod-security.kubernetes.io/audit-version]: Invalid value: \"1.25\": must be \"latest\" or \"v1.x\"",
            "metadata.labels[pod-security.kubernetes.io/warn]: Invalid value: \"nope\": must be one of privileged, baseline, restricted",
        ]);
    }

    #[test]
    fn versions_parse_as_upstream() {
        assert_eq!(Version::parse("v1.0"), Some(Version::Minor(0)));
        assert_eq!(Version::parse("v1.29"), Some(Version::Minor(29)));
        for bad in ["v1.01", "v2.0", "v1.", "1.29", "v1.-1", "Latest", "v1.99999999999"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
        assert_eq!(Version::Minor(99).minor(), POLICY_MAX_MINOR, "newer than the server: judged as latest");
        assert!("restricted:v1.30".parse::<LevelVersion>().is_ok());
        assert!("strict".parse::<LevelVersion>().is_err());
    }

    #[test]
    fn only_image_and_container_changes_are_significant() {
        let old = good();
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"] = json!({"a": "b"});
        assert!(!significant_pod_update(&relabelled, &old));
        let mut image = old.clone();
        image["spec"]["containers"][0]["image"] = json!("other");
        assert!(significant_pod_update(&image, &old));
        let mut debug = old.clone();
        debug["spec"]["ephemeralContainers"] = json!([{"name": "dbg", "image": "busybox"}]);
        assert!(significant_pod_update(&debug, &old));
        assert!(!significant_pod_update(&debug, &debug));
    }

    /// Namespaces and pods held in memory.
    struct Store(Value, Vec<Value>);

    impl PodSecurityStore for Store {
        async fn namespace(&self, _: &str) -> ApiResult<Value> {
            Ok(self.0.clone())
        }
        async fn pods(&self, _: &str) -> ApiResult<Vec<Value>> {
            Ok(self.1.clone())
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn ns(labels: &Value) -> Value {
        json!({"metadata": {"name": "ns", "labels": labels}})
    }

    #[test]
    fn tightening_a_namespace_warns_about_its_pods_grouped_by_reason() {
        let res = registry::find("", "v1", "namespaces").unwrap();
        let bare = |n: &str, owner: Option<&str>| {
            let mut p = json!({"metadata": {"name": n}, "spec": {"containers": [{"name": "c"}]}});
            if let Some(uid) = owner {
                p["metadata"]["ownerReferences"] = json!([{"uid": uid, "controller": true}]);
            }
            p
        };
        let root = with(&json!({"metadata": {"name": "root"}, "spec": {"securityContext": {"runAsUser": 0}}}));
        let store = Store(Value::Null, vec![bare("web-b", Some("rs")), bare("web-a", Some("rs")), bare("solo", None), root, good()]);
        let old = ns(&json!({}));
        let new = ns(&json!({"pod-security.kubernetes.io/enforce": "restricted"}));
        let w = Write { res, ns: None, name: "ns", user: "u", new: &new, old: Some(&old) };
        let warnings = Warnings::default();
        block_on(PodSecurity::default().admit(&store, &w, &warnings)).unwrap();
        assert_eq!(warnings.take(), [
            "existing pods in namespace \"ns\" violate the new PodSecurity enforce level \"restricted:latest\"",
            "root: runAsUser=0",
            "solo (and 2 other pods): allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile",
        ]);
        // Relaxing, or labelling without changing enforce, warns nothing.
        let w = Write { new: &old, old: Some(&new), ..w };
        block_on(PodSecurity::default().admit(&store, &w, &warnings)).unwrap();
        assert!(warnings.take().is_empty());
    }

    #[test]
    fn invalid_namespace_labels_are_refused_unless_already_stored() {
        let res = registry::find("", "v1", "namespaces").unwrap();
        let store = Store(Value::Null, vec![]);
        let bad = ns(&json!({"pod-security.kubernetes.io/enforce": "bogus"}));
        let w = Write { res, ns: None, name: "ns", user: "u", new: &bad, old: None };
        let e = block_on(PodSecurity::default().admit(&store, &w, &Warnings::default())).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert_eq!(
            e.message,
            "Namespace \"ns\" is invalid: metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: \"bogus\": must be one of privileged, baseline, restricted"
        );
        // The same bad label already stored: other edits pass.
        let mut relabelled = bad.clone();
        relabelled["metadata"]["labels"]["team"] = json!("a");
        let w = Write { new: &relabelled, old: Some(&bad), ..w };
        assert!(block_on(PodSecurity::default().admit(&store, &w, &Warnings::default())).is_ok());
    }

    #[test]
    fn pods_are_refused_workloads_warned_and_exemptions_honoured() {
        let pods = registry::find("", "v1", "pods").unwrap();
        let deployments = registry::find("apps", "v1", "deployments").unwrap();
        let store = Store(ns(&json!({"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted"})), vec![]);
        let ps = PodSecurity { exempt_users: vec!["system:admin".into()], ..PodSecurity::default() };
        let bad = with(&json!({"metadata": {"name": "x"}, "spec": {"hostPID": true}}));
        let w = Write { res: pods, ns: Some("ns"), name: "x", user: "alice", new: &bad, old: None };
        let e = block_on(ps.admit(&store, &w, &Warnings::default())).unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(e.message, "pods \"x\" is forbidden: violates PodSecurity \"baseline:latest\": host namespaces (hostPID=true)");
        assert!(block_on(ps.admit(&store, &Write { user: "system:admin", ..w }, &Warnings::default())).is_ok());
        // Baseline-clean but not restricted: admitted with a warning.
        let warnings = Warnings::default();
        let bare = json!({"metadata": {"name": "y"}, "spec": {"containers": [{"name": "c"}]}});
        block_on(ps.admit(&store, &Write { new: &bare, name: "y", ..w }, &warnings)).unwrap();
        assert_eq!(warnings.take().len(), 1);
        // A workload's template is warned about, never refused.
        let deploy = json!({"metadata": {"name": "d"}, "spec": {"template": bad}});
        block_on(ps.admit(&store, &Write { res: deployments, new: &deploy, name: "d", ..w }, &warnings)).unwrap();
        let got = warnings.take();
        assert_eq!(got, ["would violate PodSecurity \"restricted:latest\": host namespaces (hostPID=true)"]);
    }
}
