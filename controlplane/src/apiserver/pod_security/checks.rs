//! The checks of the Pod Security Standards, as upstream's
//! k8s.io/pod-security-admission `policy` package words and orders them.
//!
//! Checks read the pod as JSON; a field set to `null` counts as unset, as it
//! does once decoded into upstream's typed structs. Message texts and the
//! order of checks (baseline ids sorted, then restricted ids sorted) are
//! upstream's, so kubectl output matches a real cluster. Each check gets the
//! policy minor version it judges by and knows what changed when.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde_json::Value;

use super::{Level, LevelVersion};

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

pub(super) fn set(v: &Value) -> Option<&Value> {
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

pub(super) fn reasons(vs: &[Violation]) -> String {
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

/// [`setters`] of a `securityContext` field both the pod and its
/// containers have, where `bad` says so.
fn setters_of(pod: PodView<'_>, field: &str, bad: impl Fn(&Value) -> bool) -> Vec<String> {
    let containers: Vec<String> = pod.containers().filter(|c| sc(c, field).is_some_and(&bad)).map(name).collect();
    setters(pod.pod_sc(field).is_some_and(&bad), &containers)
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
    let setters = setters_of(pod, "windowsOptions", |w| w.get("hostProcess").and_then(Value::as_bool) == Some(true));
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
    let setters = setters_of(pod, "runAsUser", |v| v.as_i64() == Some(0));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use serde_json::json;

    use super::{super::Version, *};

    const RESTRICTED: LevelVersion = LevelVersion { level: Level::Restricted, version: Version::Latest };
    const BASELINE: LevelVersion = LevelVersion { level: Level::Baseline, version: Version::Latest };

    fn at(level: Level, minor: u32) -> LevelVersion {
        LevelVersion { level, version: Version::Minor(minor) }
    }

    /// A pod that passes restricted: every check below breaks it one way.
    pub(crate) fn good() -> Value {
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

    pub(crate) fn with(patch: &Value) -> Value {
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
}
