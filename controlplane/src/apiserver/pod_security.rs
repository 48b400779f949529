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
//! Checks read the pod as JSON; a field set to `null` counts as unset, as it
//! does once decoded into upstream's typed structs. Message texts and the
//! order of checks (baseline ids sorted, then restricted ids sorted) are
//! upstream's, so kubectl output matches a real cluster.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
};

use serde_json::Value;

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

// ---------------------------------------------------------------------------
// The checks.

/// The pod (or pod template) a check reads.
#[derive(Clone, Copy)]
pub struct PodView<'a> {
    pub meta: &'a Value,
    pub spec: &'a Value,
}

impl<'a> PodView<'a> {
    pub fn of(pod: &'a Value) -> Self {
        Self { meta: pod.get("metadata").unwrap_or(&Value::Null), spec: pod.get("spec").unwrap_or(&Value::Null) }
    }

    /// Init, regular and ephemeral containers (upstream's `visitContainers`).
    fn containers(self) -> impl Iterator<Item = &'a Value> {
        ["initContainers", "containers", "ephemeralContainers"]
            .into_iter()
            .flat_map(move |k| self.spec.get(k).and_then(Value::as_array).into_iter().flatten())
    }

    fn pod_sc(self, field: &str) -> Option<&'a Value> {
        set(self.spec.get("securityContext")?.get(field)?)
    }

    fn windows(self) -> bool {
        self.spec.pointer("/os/name").and_then(Value::as_str) == Some("windows")
    }

    fn annotations(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let a = self.meta.get("annotations").and_then(Value::as_object).into_iter().flatten();
        a.filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
    }
}

fn set(v: &Value) -> Option<&Value> {
    (!v.is_null()).then_some(v)
}

fn name(c: &Value) -> String {
    c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// A container's `securityContext.<field>`, when set.
fn sc<'a>(c: &'a Value, field: &str) -> Option<&'a Value> {
    set(c.get("securityContext")?.get(field)?)
}

fn str_list(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

fn pluralize<'s>(singular: &'s str, plural: &'s str, n: usize) -> &'s str {
    if n == 1 { singular } else { plural }
}

fn join_quote<S: AsRef<str>>(items: &[S]) -> String {
    items.iter().map(|s| format!("\"{}\"", s.as_ref())).collect::<Vec<_>>().join(", ")
}

/// Go's `%q` for the texts checks quote (annotation values).
fn go_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `container "a"` / `containers "a", "b"`.
fn containers_phrase(names: &[String]) -> String {
    format!("{} {}", pluralize("container", "containers", names.len()), join_quote(names))
}

/// One failed check: upstream's `ForbiddenReason` and `ForbiddenDetail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub reason: String,
    pub detail: String,
}

fn violation(reason: impl Into<String>, detail: impl Into<String>) -> Option<Violation> {
    Some(Violation { reason: reason.into(), detail: detail.into() })
}

type CheckFn = fn(PodView<'_>, u32) -> Option<Violation>;

struct Check {
    id: &'static str,
    level: Level,
    /// The first policy minor version the check exists in.
    since: u32,
    /// Baseline checks this (restricted) check replaces while it applies.
    overrides: &'static [&'static str],
    run: CheckFn,
}

/// Upstream's evaluation order: baseline ids sorted, then restricted ids
/// sorted (byte order, so `seLinuxOptions` before `seccompProfile_…`).
const CHECKS: &[Check] = &[
    Check { id: "appArmorProfile", level: Level::Baseline, since: 0, overrides: &[], run: app_armor },
    Check { id: "capabilities_baseline", level: Level::Baseline, since: 0, overrides: &[], run: capabilities_baseline },
    Check { id: "hostNamespaces", level: Level::Baseline, since: 0, overrides: &[], run: host_namespaces },
    Check { id: "hostPathVolumes", level: Level::Baseline, since: 0, overrides: &[], run: host_path_volumes },
    Check { id: "hostPorts", level: Level::Baseline, since: 0, overrides: &[], run: host_ports },
    Check { id: "privileged", level: Level::Baseline, since: 0, overrides: &[], run: privileged },
    Check { id: "procMount", level: Level::Baseline, since: 0, overrides: &[], run: proc_mount },
    Check { id: "seLinuxOptions", level: Level::Baseline, since: 0, overrides: &[], run: se_linux_options },
    Check { id: "seccompProfile_baseline", level: Level::Baseline, since: 0, overrides: &[], run: seccomp_baseline },
    Check { id: "sysctls", level: Level::Baseline, since: 0, overrides: &[], run: sysctls },
    Check { id: "windowsHostProcess", level: Level::Baseline, since: 0, overrides: &[], run: windows_host_process },
    Check { id: "allowPrivilegeEscalation", level: Level::Restricted, since: 8, overrides: &[], run: allow_privilege_escalation },
    Check {
        id: "capabilities_restricted",
        level: Level::Restricted,
        since: 22,
        overrides: &["capabilities_baseline"],
        run: capabilities_restricted,
    },
    Check { id: "restrictedVolumes", level: Level::Restricted, since: 0, overrides: &["hostPathVolumes"], run: restricted_volumes },
    Check { id: "runAsNonRoot", level: Level::Restricted, since: 0, overrides: &[], run: run_as_non_root },
    Check { id: "runAsUser", level: Level::Restricted, since: 23, overrides: &[], run: run_as_user },
    Check {
        id: "seccompProfile_restricted",
        level: Level::Restricted,
        since: 19,
        overrides: &["seccompProfile_baseline"],
        run: seccomp_restricted,
    },
];

/// The violations of `pod` against `lv`, in upstream's order.
pub fn evaluate(lv: LevelVersion, pod: PodView<'_>) -> Vec<Violation> {
    let v = lv.version.minor();
    let active = |c: &&Check| c.since <= v;
    let overridden: HashSet<&str> = if lv.level == Level::Restricted {
        CHECKS.iter().filter(active).filter(|c| c.level == Level::Restricted).flat_map(|c| c.overrides.iter().copied()).collect()
    } else {
        HashSet::new()
    };
    CHECKS
        .iter()
        .filter(active)
        .filter(|c| c.level <= lv.level && !overridden.contains(c.id))
        .filter_map(|c| (c.run)(pod, v))
        .collect()
}

/// `reason (detail), reason (detail)` (upstream's `ForbiddenDetail`).
pub fn describe(vs: &[Violation]) -> String {
    let one = |v: &Violation| if v.detail.is_empty() { v.reason.clone() } else { format!("{} ({})", v.reason, v.detail) };
    vs.iter().map(one).collect::<Vec<_>>().join(", ")
}

fn reasons(vs: &[Violation]) -> String {
    vs.iter().map(|v| v.reason.as_str()).collect::<Vec<_>>().join(", ")
}

/// Who sets a forbidden value: `pod`, `containers "a", "b"`, joined by "and".
fn setters(pod: bool, containers: &[String]) -> Vec<String> {
    let mut s = Vec::new();
    if pod {
        s.push("pod".to_owned());
    }
    if !containers.is_empty() {
        s.push(containers_phrase(containers));
    }
    s
}

fn app_armor(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let allowed_type = |t: &str| matches!(t, "RuntimeDefault" | "Localhost");
    let ty = |v: &Value| v.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut bad_values = BTreeSet::new();
    let pod_bad = pod.pod_sc("appArmorProfile").map(ty).filter(|t| !allowed_type(t));
    let mut containers = Vec::new();
    for c in pod.containers() {
        if let Some(t) = sc(c, "appArmorProfile").map(ty).filter(|t| !allowed_type(t)) {
            containers.push(name(c));
            bad_values.insert(t);
        }
    }
    let mut setters = setters(pod_bad.is_some(), &containers);
    bad_values.extend(pod_bad);
    let mut values: Vec<String> = bad_values.into_iter().collect();
    let mut annotations: Vec<String> = pod
        .annotations()
        .filter(|(k, v)| {
            k.starts_with("container.apparmor.security.beta.kubernetes.io/")
                && !(v.is_empty() || *v == "runtime/default" || v.starts_with("localhost/"))
        })
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect();
    if !annotations.is_empty() {
        annotations.sort();
        setters.push(pluralize("annotation", "annotations", annotations.len()).to_owned());
        values.extend(annotations);
    }
    if setters.is_empty() {
        return None;
    }
    violation(
        pluralize("forbidden AppArmor profile", "forbidden AppArmor profiles", values.len()),
        format!("{} must not set AppArmor profile type to {}", setters.join(" and "), join_quote(&values)),
    )
}

/// The capabilities a baseline container may add (the container runtime's
/// default set, minus NET_RAW).
const BASELINE_CAPABILITIES: &[&str] = &[
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP",
    "SETUID", "SYS_CHROOT",
];

fn capabilities_baseline(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let mut containers = Vec::new();
    let mut caps = BTreeSet::new();
    for c in pod.containers() {
        let bad: Vec<&str> =
            str_list(sc(c, "capabilities").and_then(|k| k.get("add"))).into_iter().filter(|a| !BASELINE_CAPABILITIES.contains(a)).collect();
        if !bad.is_empty() {
            containers.push(name(c));
            caps.extend(bad);
        }
    }
    if containers.is_empty() {
        return None;
    }
    let caps: Vec<&str> = caps.into_iter().collect();
    violation(
        "non-default capabilities",
        format!("{} must not include {} in securityContext.capabilities.add", containers_phrase(&containers), join_quote(&caps)),
    )
}

fn host_namespaces(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let on: Vec<String> = ["hostNetwork", "hostPID", "hostIPC"]
        .into_iter()
        .filter(|k| pod.spec.get(*k).and_then(Value::as_bool) == Some(true))
        .map(|k| format!("{k}=true"))
        .collect();
    if on.is_empty() { None } else { violation("host namespaces", on.join(", ")) }
}

fn volumes(pod: PodView<'_>) -> impl Iterator<Item = &Value> {
    pod.spec.get("volumes").and_then(Value::as_array).into_iter().flatten()
}

fn host_path_volumes(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let names: Vec<String> = volumes(pod).filter(|v| v.get("hostPath").and_then(set).is_some()).map(name).collect();
    if names.is_empty() {
        return None;
    }
    violation("hostPath volumes", format!("{} {}", pluralize("volume", "volumes", names.len()), join_quote(&names)))
}

fn host_ports(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let mut containers = Vec::new();
    let mut ports = BTreeSet::new();
    for c in pod.containers() {
        let used: Vec<i64> = c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("hostPort").and_then(Value::as_i64))
            .filter(|p| *p != 0)
            .collect();
        if !used.is_empty() {
            containers.push(name(c));
            ports.extend(used.iter().map(ToString::to_string));
        }
    }
    if containers.is_empty() {
        return None;
    }
    let ports: Vec<String> = ports.into_iter().collect();
    violation(
        "hostPort",
        format!(
            "{} {} {} {}",
            containers_phrase(&containers),
            pluralize("uses", "use", containers.len()),
            pluralize("hostPort", "hostPorts", ports.len()),
            ports.join(", ")
        ),
    )
}

fn privileged(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let names: Vec<String> = pod.containers().filter(|c| sc(c, "privileged").and_then(Value::as_bool) == Some(true)).map(name).collect();
    if names.is_empty() {
        return None;
    }
    violation("privileged", format!("{} must not set securityContext.privileged=true", containers_phrase(&names)))
}

fn proc_mount(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let mut names = Vec::new();
    let mut kinds = BTreeSet::new();
    for c in pod.containers() {
        if let Some(m) = sc(c, "procMount").and_then(Value::as_str).filter(|m| *m != "Default") {
            names.push(name(c));
            kinds.insert(m);
        }
    }
    if names.is_empty() {
        return None;
    }
    let kinds: Vec<&str> = kinds.into_iter().collect();
    violation("procMount", format!("{} must not set securityContext.procMount to {}", containers_phrase(&names), join_quote(&kinds)))
}

fn se_linux_options(pod: PodView<'_>, v: u32) -> Option<Violation> {
    let allowed = |t: &str| matches!(t, "" | "container_t" | "container_init_t" | "container_kvm_t") || (v >= 31 && t == "container_engine_t");
    let mut bad_types = BTreeSet::new();
    let (mut user, mut role) = (false, false);
    let mut judge = |o: &Value| {
        let field = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut ok = true;
        let t = field("type");
        if !allowed(&t) {
            ok = false;
            bad_types.insert(t);
        }
        if !field("user").is_empty() {
            ok = false;
            user = true;
        }
        if !field("role").is_empty() {
            ok = false;
            role = true;
        }
        ok
    };
    let pod_bad = pod.pod_sc("seLinuxOptions").is_some_and(|o| !judge(o));
    let containers: Vec<String> =
        pod.containers().filter(|c| sc(c, "seLinuxOptions").is_some_and(|o| !judge(o))).map(name).collect();
    let setters = setters(pod_bad, &containers);
    if setters.is_empty() {
        return None;
    }
    let mut data = Vec::new();
    if !bad_types.is_empty() {
        let types: Vec<String> = bad_types.into_iter().collect();
        data.push(format!("{} {}", pluralize("type", "types", types.len()), join_quote(&types)));
    }
    if user {
        data.push("user may not be set".to_owned());
    }
    if role {
        data.push("role may not be set".to_owned());
    }
    violation(
        "seLinuxOptions",
        format!("{} set forbidden securityContext.seLinuxOptions: {}", setters.join(" and "), data.join("; ")),
    )
}

fn seccomp_type(v: &Value) -> String {
    v.get("type").and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn valid_seccomp(t: &str) -> bool {
    matches!(t, "RuntimeDefault" | "Localhost")
}

fn seccomp_baseline(pod: PodView<'_>, v: u32) -> Option<Violation> {
    if v < 19 {
        return seccomp_annotations(pod);
    }
    let mut values = BTreeSet::new();
    let pod_bad = pod.pod_sc("seccompProfile").map(seccomp_type).filter(|t| !valid_seccomp(t));
    let mut containers = Vec::new();
    for c in pod.containers() {
        if let Some(t) = sc(c, "seccompProfile").map(seccomp_type).filter(|t| !valid_seccomp(t)) {
            containers.push(name(c));
            values.insert(t);
        }
    }
    let setters = setters(pod_bad.is_some(), &containers);
    values.extend(pod_bad);
    if setters.is_empty() {
        return None;
    }
    let values: Vec<String> = values.into_iter().collect();
    violation(
        "seccompProfile",
        format!("{} must not set securityContext.seccompProfile.type to {}", setters.join(" and "), join_quote(&values)),
    )
}

/// Policy versions before 1.19 read seccomp from the alpha annotations.
fn seccomp_annotations(pod: PodView<'_>) -> Option<Violation> {
    const POD: &str = "seccomp.security.alpha.kubernetes.io/pod";
    const CONTAINER: &str = "container.seccomp.security.alpha.kubernetes.io/";
    let valid = |v: &str| v == "runtime/default" || v == "docker/default" || v.starts_with("localhost/");
    let annotations: BTreeMap<&str, &str> = pod.annotations().collect();
    let mut keys = vec![POD.to_owned()];
    keys.extend(pod.containers().map(|c| format!("{CONTAINER}{}", name(c))));
    let forbidden: BTreeSet<String> = keys
        .iter()
        .filter_map(|k| annotations.get(k.as_str()).filter(|v| !valid(v)).map(|v| format!("{k}={}", go_quote(v))))
        .collect();
    if forbidden.is_empty() {
        return None;
    }
    let forbidden: Vec<String> = forbidden.into_iter().collect();
    violation("seccompProfile", format!("forbidden {} {}", pluralize("annotation", "annotations", forbidden.len()), forbidden.join(", ")))
}

/// Namespaced sysctls isolated from other pods, by the policy version that
/// allowed them.
const SAFE_SYSCTLS: &[(&str, u32)] = &[
    ("kernel.shm_rmid_forced", 0),
    ("net.ipv4.ip_local_port_range", 0),
    ("net.ipv4.tcp_syncookies", 0),
    ("net.ipv4.ping_group_range", 0),
    ("net.ipv4.ip_unprivileged_port_start", 0),
    ("net.ipv4.ip_local_reserved_ports", 27),
    ("net.ipv4.tcp_keepalive_time", 29),
    ("net.ipv4.tcp_fin_timeout", 29),
    ("net.ipv4.tcp_keepalive_intvl", 29),
    ("net.ipv4.tcp_keepalive_probes", 29),
    ("net.ipv4.tcp_rmem", 32),
    ("net.ipv4.tcp_wmem", 32),
];

fn sysctls(pod: PodView<'_>, v: u32) -> Option<Violation> {
    let safe = |n: &str| SAFE_SYSCTLS.iter().any(|(s, since)| *s == n && *since <= v);
    let bad: Vec<&str> = pod
        .pod_sc("sysctls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("name").and_then(Value::as_str))
        .filter(|n| !safe(n))
        .collect();
    if bad.is_empty() { None } else { violation("forbidden sysctls", bad.join(", ")) }
}

fn windows_host_process(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let host_process = |o: Option<&Value>| o.and_then(|w| w.get("hostProcess")).and_then(Value::as_bool) == Some(true);
    let pod_bad = host_process(pod.pod_sc("windowsOptions"));
    let containers: Vec<String> = pod.containers().filter(|c| host_process(sc(c, "windowsOptions"))).map(name).collect();
    let setters = setters(pod_bad, &containers);
    if setters.is_empty() {
        return None;
    }
    violation("hostProcess", format!("{} must not set securityContext.windowsOptions.hostProcess=true", setters.join(" and ")))
}

fn allow_privilege_escalation(pod: PodView<'_>, v: u32) -> Option<Violation> {
    if v >= 25 && pod.windows() {
        return None;
    }
    let names: Vec<String> =
        pod.containers().filter(|c| sc(c, "allowPrivilegeEscalation").and_then(Value::as_bool) != Some(false)).map(name).collect();
    if names.is_empty() {
        return None;
    }
    violation(
        "allowPrivilegeEscalation != false",
        format!("{} must set securityContext.allowPrivilegeEscalation=false", containers_phrase(&names)),
    )
}

fn capabilities_restricted(pod: PodView<'_>, v: u32) -> Option<Violation> {
    if v >= 25 && pod.windows() {
        return None;
    }
    let (mut no_drop_all, mut adding) = (Vec::new(), Vec::new());
    let mut forbidden = BTreeSet::new();
    for c in pod.containers() {
        let Some(caps) = sc(c, "capabilities") else {
            no_drop_all.push(name(c));
            continue;
        };
        if !str_list(caps.get("drop")).contains(&"ALL") {
            no_drop_all.push(name(c));
        }
        let bad: Vec<&str> = str_list(caps.get("add")).into_iter().filter(|a| *a != "NET_BIND_SERVICE").collect();
        if !bad.is_empty() {
            adding.push(name(c));
            forbidden.extend(bad);
        }
    }
    let mut details = Vec::new();
    if !no_drop_all.is_empty() {
        details.push(format!("{} must set securityContext.capabilities.drop=[\"ALL\"]", containers_phrase(&no_drop_all)));
    }
    if !adding.is_empty() {
        let caps: Vec<&str> = forbidden.into_iter().collect();
        details.push(format!("{} must not include {} in securityContext.capabilities.add", containers_phrase(&adding), join_quote(&caps)));
    }
    if details.is_empty() { None } else { violation("unrestricted capabilities", details.join("; ")) }
}

/// Volume sources a restricted pod may use.
const RESTRICTED_VOLUME_SOURCES: &[&str] =
    &["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim", "projected", "secret"];

/// The sources upstream names when it refuses one, in its order.
const NAMED_VOLUME_SOURCES: &[&str] = &[
    "hostPath", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "nfs", "iscsi", "glusterfs", "rbd", "flexVolume", "cinder",
    "cephfs", "flocker", "fc", "azureFile", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "portworxVolume",
    "scaleIO", "storageos",
];

fn restricted_volumes(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let mut names = Vec::new();
    let mut kinds = BTreeSet::new();
    for vol in volumes(pod) {
        let has = |k: &str| vol.get(k).and_then(set).is_some();
        if RESTRICTED_VOLUME_SOURCES.iter().any(|k| has(k)) {
            continue;
        }
        names.push(name(vol));
        kinds.insert(NAMED_VOLUME_SOURCES.iter().copied().find(|k| has(k)).unwrap_or("unknown"));
    }
    if names.is_empty() {
        return None;
    }
    let kinds: Vec<&str> = kinds.into_iter().collect();
    violation(
        "restricted volume types",
        format!(
            "{} {} {} {} {}",
            pluralize("volume", "volumes", names.len()),
            join_quote(&names),
            pluralize("uses", "use", names.len()),
            pluralize("restricted volume type", "restricted volume types", kinds.len()),
            join_quote(&kinds)
        ),
    )
}

fn run_as_non_root(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let pod_value = pod.pod_sc("runAsNonRoot").and_then(Value::as_bool);
    let (mut explicit, mut implicit) = (Vec::new(), Vec::new());
    for c in pod.containers() {
        match sc(c, "runAsNonRoot").and_then(Value::as_bool) {
            Some(false) => explicit.push(name(c)),
            Some(true) => {}
            None if pod_value != Some(true) => implicit.push(name(c)),
            None => {}
        }
    }
    let setters = setters(pod_value == Some(false), &explicit);
    if !setters.is_empty() {
        return violation("runAsNonRoot != true", format!("{} must not set securityContext.runAsNonRoot=false", setters.join(" and ")));
    }
    if implicit.is_empty() {
        return None;
    }
    violation("runAsNonRoot != true", format!("pod or {} must set securityContext.runAsNonRoot=true", containers_phrase(&implicit)))
}

fn run_as_user(pod: PodView<'_>, _: u32) -> Option<Violation> {
    let root = |v: Option<&Value>| v.and_then(Value::as_i64) == Some(0);
    let containers: Vec<String> = pod.containers().filter(|c| root(sc(c, "runAsUser"))).map(name).collect();
    let setters = setters(root(pod.pod_sc("runAsUser")), &containers);
    if setters.is_empty() {
        return None;
    }
    violation("runAsUser=0", format!("{} must not set runAsUser=0", setters.join(" and ")))
}

fn seccomp_restricted(pod: PodView<'_>, v: u32) -> Option<Violation> {
    if v >= 25 && pod.windows() {
        return None;
    }
    if let Some(bad) = seccomp_baseline(pod, v) {
        return Some(bad);
    }
    let pod_set = pod.pod_sc("seccompProfile").is_some();
    let implicit: Vec<String> = pod.containers().filter(|c| !pod_set && sc(c, "seccompProfile").is_none()).map(name).collect();
    if implicit.is_empty() {
        return None;
    }
    violation(
        "seccompProfile",
        format!("pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"", containers_phrase(&implicit)),
    )
}

// ---------------------------------------------------------------------------
// Admission.

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

    use super::*;

    const RESTRICTED: LevelVersion = LevelVersion { level: Level::Restricted, version: Version::Latest };
    const BASELINE: LevelVersion = LevelVersion { level: Level::Baseline, version: Version::Latest };

    fn at(level: Level, minor: u32) -> LevelVersion {
        LevelVersion { level, version: Version::Minor(minor) }
    }

    /// A pod that passes restricted: every check below breaks it one way.
    fn good() -> Value {
        json!({
            "metadata": {"name": "p"},
            "spec": {
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "c", "image": "busybox", "securityContext": {
                    "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
                "volumes": [{"name": "v", "emptyDir": {}}],
            }
        })
    }

    fn with(patch: &Value) -> Value {
        crate::apiserver::patch::merge_patch(&good(), patch)
    }

    /// `(reason, detail)` of each violation of `pod` at `lv`.
    fn check(lv: LevelVersion, pod: &Value) -> Vec<(String, String)> {
        evaluate(lv, PodView::of(pod)).into_iter().map(|v| (v.reason, v.detail)).collect()
    }

    fn one(reason: &str, detail: &str) -> Vec<(String, String)> {
        vec![(reason.to_owned(), detail.to_owned())]
    }

    fn container(sc: &Value) -> Value {
        let mut c = good()["spec"]["containers"][0].clone();
        c["securityContext"] = crate::apiserver::patch::merge_patch(&c["securityContext"], sc);
        c
    }

    fn containers(cs: Vec<Value>) -> Value {
        with(&json!({"spec": {"containers": cs}}))
    }

    #[test]
    fn the_checks_run_in_upstream_order() {
        let ids = |l: Level| CHECKS.iter().filter(|c| c.level == l).map(|c| c.id).collect::<Vec<_>>();
        for l in [Level::Baseline, Level::Restricted] {
            let mut sorted = ids(l);
            sorted.sort_unstable();
            assert_eq!(ids(l), sorted);
        }
        assert!(CHECKS.iter().position(|c| c.level == Level::Restricted) > CHECKS.iter().rposition(|c| c.level == Level::Baseline));
    }

    #[test]
    fn latest_is_the_version_this_server_reports() {
        assert_eq!(super::super::discovery::version()["minor"], json!(POLICY_MAX_MINOR.to_string()));
    }

    #[test]
    fn a_good_pod_passes_every_level_and_privileged_checks_nothing() {
        assert!(check(RESTRICTED, &good()).is_empty());
        assert!(check(BASELINE, &good()).is_empty());
        let awful = with(&json!({"spec": {"hostNetwork": true, "containers": [{"name": "c", "securityContext": {"privileged": true}}]}}));
        assert!(check(LevelVersion::default(), &awful).is_empty());
    }

    #[test]
    fn a_bare_pod_breaks_restricted_with_upstreams_message() {
        let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        assert!(check(BASELINE, &pod).is_empty());
        assert_eq!(
            describe(&evaluate(RESTRICTED, PodView::of(&pod))),
            "allowPrivilegeEscalation != false (container \"c\" must set securityContext.allowPrivilegeEscalation=false), \
             unrestricted capabilities (container \"c\" must set securityContext.capabilities.drop=[\"ALL\"]), \
             runAsNonRoot != true (pod or container \"c\" must set securityContext.runAsNonRoot=true), \
             seccompProfile (pod or container \"c\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")"
        );
    }

    #[test]
    fn host_namespaces() {
        let pod = with(&json!({"spec": {"hostNetwork": true, "hostIPC": true, "hostPID": false}}));
        assert_eq!(check(BASELINE, &pod), one("host namespaces", "hostNetwork=true, hostIPC=true"));
    }

    #[test]
    fn privileged() {
        let pod = containers(vec![container(&json!({"privileged": true})), json!({"name": "d", "securityContext": {"privileged": false}})]);
        assert_eq!(check(BASELINE, &pod), one("privileged", "container \"c\" must not set securityContext.privileged=true"));
    }

    #[test]
    fn baseline_capabilities() {
        let pod = containers(vec![
            container(&json!({"capabilities": {"add": ["NET_ADMIN", "CHOWN", "NET_RAW"]}})),
            json!({"name": "d", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}),
            json!({"name": "e", "securityContext": {"capabilities": {"add": ["KILL", "SYS_CHROOT"]}}}),
        ]);
        assert_eq!(
            check(BASELINE, &pod),
            one("non-default capabilities", "containers \"c\", \"d\" must not include \"NET_ADMIN\", \"NET_RAW\", \"SYS_ADMIN\" in securityContext.capabilities.add")
        );
    }

    #[test]
    fn host_path_volumes_and_restricted_volume_types() {
        let pod = with(&json!({"spec": {"volumes": [
            {"name": "root", "hostPath": {"path": "/"}},
            {"name": "share", "nfs": {"server": "s", "path": "/"}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "odd", "somethingNew": {}},
        ]}}));
        assert_eq!(check(BASELINE, &pod), one("hostPath volumes", "volume \"root\""));
        // Restricted replaces the hostPath check with the volume-type one.
        assert_eq!(
            check(RESTRICTED, &pod),
            one("restricted volume types", "volumes \"root\", \"share\", \"odd\" use restricted volume types \"hostPath\", \"nfs\", \"unknown\"")
        );
    }

    #[test]
    fn host_ports() {
        let pod = containers(vec![
            container(&json!({})),
            json!({"name": "d", "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 53, "hostPort": 53}, {"containerPort": 9}]}),
        ]);
        let mut c = pod.clone();
        c["spec"]["containers"][0]["ports"] = json!([{"containerPort": 1, "hostPort": 0}]);
        assert_eq!(check(BASELINE, &c), one("hostPort", "container \"d\" uses hostPorts 53, 8080"));
    }

    #[test]
    fn app_armor() {
        let pod = with(&json!({
            "metadata": {"annotations": {
                "container.apparmor.security.beta.kubernetes.io/c": "unconfined",
                "container.apparmor.security.beta.kubernetes.io/d": "localhost/x",
            }},
            "spec": {"securityContext": {"appArmorProfile": {"type": "Unconfined"}}}
        }));
        assert_eq!(
            check(BASELINE, &pod),
            one(
                "forbidden AppArmor profiles",
                "pod and annotation must not set AppArmor profile type to \"Unconfined\", \"container.apparmor.security.beta.kubernetes.io/c=\"unconfined\"\""
            )
        );
        let ok = containers(vec![container(&json!({"appArmorProfile": {"type": "Localhost", "localhostProfile": "p"}}))]);
        assert!(check(BASELINE, &ok).is_empty());
    }

    #[test]
    fn se_linux_options() {
        let pod = with(&json!({"spec": {
            "securityContext": {"seLinuxOptions": {"type": "spc_t"}},
            "containers": [container(&json!({"seLinuxOptions": {"user": "root", "type": "container_t"}}))],
        }}));
        assert_eq!(
            check(BASELINE, &pod),
            one("seLinuxOptions", "pod and container \"c\" set forbidden securityContext.seLinuxOptions: type \"spc_t\"; user may not be set")
        );
        let engine = with(&json!({"spec": {"securityContext": {"seLinuxOptions": {"type": "container_engine_t"}}}}));
        assert!(check(BASELINE, &engine).is_empty());
        assert_eq!(check(at(Level::Baseline, 30), &engine).len(), 1, "container_engine_t came in 1.31");
    }

    #[test]
    fn proc_mount() {
        let pod = containers(vec![container(&json!({"procMount": "Unmasked"})), json!({"name": "d", "securityContext": {"procMount": "Default"}})]);
        assert_eq!(check(BASELINE, &pod), one("procMount", "container \"c\" must not set securityContext.procMount to \"Unmasked\""));
    }

    #[test]
    fn seccomp_baseline_and_restricted() {
        let pod = with(&json!({"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}}));
        let want = one("seccompProfile", "pod must not set securityContext.seccompProfile.type to \"Unconfined\"");
        assert_eq!(check(BASELINE, &pod), want);
        assert_eq!(check(RESTRICTED, &pod), want, "restricted replaces the baseline check, same text");
        // Restricted needs it set: on the pod or every container.
        let unset = with(&json!({"spec": {"securityContext": {"seccompProfile": null}, "containers": [
            container(&json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}})),
            json!({"name": "d", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}),
        ]}}));
        assert!(check(BASELINE, &unset).is_empty());
        assert_eq!(
            check(RESTRICTED, &unset),
            one("seccompProfile", "pod or container \"d\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"")
        );
        // Before 1.19 the alpha annotations were judged.
        let annotated = with(&json!({"metadata": {"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}}));
        assert!(check(BASELINE, &annotated).is_empty());
        assert_eq!(
            check(at(Level::Baseline, 18), &annotated),
            one("seccompProfile", "forbidden annotation seccomp.security.alpha.kubernetes.io/pod=\"unconfined\"")
        );
    }

    #[test]
    fn sysctls_by_version() {
        let pod = with(&json!({"spec": {"securityContext": {"sysctls": [
            {"name": "net.ipv4.tcp_rmem", "value": "1 2 3"}, {"name": "kernel.msgmax", "value": "1"}, {"name": "kernel.shm_rmid_forced", "value": "1"},
        ]}}}));
        assert_eq!(check(BASELINE, &pod), one("forbidden sysctls", "kernel.msgmax"));
        assert_eq!(check(at(Level::Baseline, 31), &pod), one("forbidden sysctls", "net.ipv4.tcp_rmem, kernel.msgmax"));
    }

    #[test]
    fn windows_host_process() {
        let pod = with(&json!({"spec": {"securityContext": {"windowsOptions": {"hostProcess": true}}}}));
        assert_eq!(check(BASELINE, &pod), one("hostProcess", "pod must not set securityContext.windowsOptions.hostProcess=true"));
    }

    #[test]
    fn allow_privilege_escalation() {
        let pod = containers(vec![container(&json!({"allowPrivilegeEscalation": true}))]);
        assert!(check(BASELINE, &pod).is_empty());
        assert_eq!(
            check(RESTRICTED, &pod),
            one("allowPrivilegeEscalation != false", "container \"c\" must set securityContext.allowPrivilegeEscalation=false")
        );
        let mut windows = pod.clone();
        windows["spec"]["os"] = json!({"name": "windows"});
        assert!(check(RESTRICTED, &windows).iter().all(|(r, _)| r != "allowPrivilegeEscalation != false"));
        assert!(check(at(Level::Restricted, 7), &pod).is_empty(), "the check came in 1.8");
    }

    #[test]
    fn restricted_capabilities() {
        let pod = containers(vec![
            container(&json!({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "NET_ADMIN"]}})),
            json!({"name": "d", "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["NET_RAW"]}}}),
        ]);
        assert_eq!(
            check(RESTRICTED, &pod),
            one(
                "unrestricted capabilities",
                "container \"d\" must set securityContext.capabilities.drop=[\"ALL\"]; container \"c\" must not include \"NET_ADMIN\" in securityContext.capabilities.add"
            )
        );
        // Before 1.22 restricted judged capabilities as baseline does.
        assert_eq!(check(at(Level::Restricted, 21), &pod)[0].0, "non-default capabilities");
    }

    #[test]
    fn run_as_non_root() {
        let pod = with(&json!({"spec": {"securityContext": {"runAsNonRoot": false}}}));
        assert_eq!(check(RESTRICTED, &pod), one("runAsNonRoot != true", "pod must not set securityContext.runAsNonRoot=false"));
        // Set per container instead of on the pod.
        let pod = with(&json!({"spec": {"securityContext": {"runAsNonRoot": null}, "containers": [container(&json!({"runAsNonRoot": true}))]}}));
        assert!(check(RESTRICTED, &pod).is_empty());
    }

    #[test]
    fn run_as_user() {
        let pod = with(&json!({"spec": {"securityContext": {"runAsUser": 0}, "containers": [container(&json!({"runAsUser": 0}))]}}));
        assert_eq!(check(RESTRICTED, &pod), one("runAsUser=0", "pod and container \"c\" must not set runAsUser=0"));
        assert!(check(at(Level::Restricted, 22), &pod).is_empty(), "the check came in 1.23");
        let pod = with(&json!({"spec": {"securityContext": {"runAsUser": 1000}}}));
        assert!(check(RESTRICTED, &pod).is_empty());
    }

    #[test]
    fn init_and_ephemeral_containers_are_judged() {
        let pod = with(&json!({"spec": {
            "initContainers": [{"name": "i", "securityContext": {"privileged": true}}],
            "ephemeralContainers": [{"name": "e", "securityContext": {"privileged": true}}],
        }}));
        assert_eq!(check(BASELINE, &pod), one("privileged", "containers \"i\", \"e\" must not set securityContext.privileged=true"));
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
