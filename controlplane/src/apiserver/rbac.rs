//! The RBAC authorizer: pure evaluation of Role/ClusterRole rules reached
//! through RoleBindings/ClusterRoleBindings, with upstream's semantics
//! (`plugin/pkg/auth/authorizer/rbac` and `pkg/apis/rbac/v1/evaluation_helpers.go`):
//! a request is allowed when any rule of any role bound to the user (or a
//! group of theirs, or their ServiceAccount) allows it; nothing denies.
//! Aggregated ClusterRoles take the rules of the ClusterRoles their
//! `aggregationRule` selects, as the clusterrole-aggregation controller would.

use std::collections::HashMap;

use serde_json::Value;

use super::{
    authn::{UserInfo, service_account_user},
    selectors::LabelSelector,
};

/// What a request wants to do (`authorizer.Attributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub user: UserInfo,
    pub verb: String,
    /// A resource request (else a non-resource URL such as `/healthz`).
    pub resource_request: bool,
    pub namespace: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    /// The URL path, for non-resource requests.
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub resource_names: Vec<String>,
    pub non_resource_urls: Vec<String>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default()
}

impl Rule {
    pub fn from_json(v: &Value) -> Self {
        Self {
            verbs: strings(v, "verbs"),
            api_groups: strings(v, "apiGroups"),
            resources: strings(v, "resources"),
            resource_names: strings(v, "resourceNames"),
            non_resource_urls: strings(v, "nonResourceURLs"),
        }
    }

    fn verb_matches(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == "*" || v == verb)
    }

    fn group_matches(&self, group: &str) -> bool {
        self.api_groups.iter().any(|g| g == "*" || g == group)
    }

    /// `*`, the resource, `resource/subresource`, or `*/subresource`.
    fn resource_matches(&self, resource: &str, sub: &str) -> bool {
        let combined = if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") };
        self.resources.iter().any(|r| {
            r == "*" || *r == combined || (!sub.is_empty() && r.strip_prefix("*/").is_some_and(|s| s == sub))
        })
    }

    fn name_matches(&self, name: &str) -> bool {
        self.resource_names.is_empty() || self.resource_names.iter().any(|n| n == name)
    }

    /// `*`, the exact path, or a prefix ending in `*`.
    fn url_matches(&self, path: &str) -> bool {
        self.non_resource_urls.iter().any(|u| {
            u == "*" || u == path || u.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix))
        })
    }

    pub fn allows(&self, a: &Attributes) -> bool {
        if a.resource_request {
            self.verb_matches(&a.verb)
                && self.group_matches(&a.api_group)
                && self.resource_matches(&a.resource, &a.subresource)
                && self.name_matches(&a.name)
        } else {
            self.verb_matches(&a.verb) && self.url_matches(&a.path)
        }
    }
}

/// One rule broken down to single verbs, groups, resources and names
/// (upstream `BreakdownRule`), the unit the escalation check compares.
fn breakdown(rule: &Rule) -> Vec<Rule> {
    let one = |v: &str| vec![v.to_string()];
    let mut out = Vec::new();
    for group in &rule.api_groups {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                let base = Rule { verbs: one(verb), api_groups: one(group), resources: one(resource), ..Rule::default() };
                if rule.resource_names.is_empty() {
                    out.push(base);
                } else {
                    out.extend(rule.resource_names.iter().map(|n| Rule { resource_names: one(n), ..base.clone() }));
                }
            }
        }
    }
    for url in &rule.non_resource_urls {
        for verb in &rule.verbs {
            out.push(Rule { verbs: one(verb), non_resource_urls: one(url), ..Rule::default() });
        }
    }
    out
}

fn has_all(set: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| set.contains(w))
}

/// upstream `resourceCoversAll`: `*`, the exact resource, or `*/sub` for a
/// subresource.
fn resources_cover(set: &[String], wanted: &[String]) -> bool {
    if set.iter().any(|r| r == "*") {
        return true;
    }
    wanted.iter().all(|path| {
        set.contains(path) || path.split_once('/').is_some_and(|(_, sub)| set.iter().any(|r| r.strip_prefix("*/") == Some(sub)))
    })
}

fn urls_cover(set: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|path| {
        set.iter().any(|owner| owner == path || owner.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix.trim_end_matches('*'))))
    })
}

/// upstream `ruleCovers`: whether `owner` grants everything `sub` (one
/// broken-down rule) does.
fn rule_covers(owner: &Rule, sub: &Rule) -> bool {
    let names = if sub.resource_names.is_empty() {
        owner.resource_names.is_empty()
    } else {
        owner.resource_names.is_empty() || has_all(&owner.resource_names, &sub.resource_names)
    };
    (owner.verbs.iter().any(|v| v == "*") || has_all(&owner.verbs, &sub.verbs))
        && (owner.api_groups.iter().any(|g| g == "*") || has_all(&owner.api_groups, &sub.api_groups))
        && resources_cover(&owner.resources, &sub.resources)
        && names
        && urls_cover(&owner.non_resource_urls, &sub.non_resource_urls)
}

/// upstream `Covers`: the parts of `servant` that no rule of `owner`
/// grants (empty when `owner` holds every permission `servant` would).
pub fn uncovered(owner: &[Rule], servant: &[Rule]) -> Vec<Rule> {
    servant.iter().flat_map(breakdown).filter(|sub| !owner.iter().any(|o| rule_covers(o, sub))).collect()
}

impl Rule {
    /// upstream `PolicyRule.CompactString`, as escalation errors print rules.
    pub fn compact_string(&self) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(" ");
        let mut parts = Vec::new();
        for (label, v) in [
            ("APIGroups", &self.api_groups),
            ("Resources", &self.resources),
            ("ResourceNames", &self.resource_names),
            ("NonResourceURLs", &self.non_resource_urls),
            ("Verbs", &self.verbs),
        ] {
            if !v.is_empty() || (label == "APIGroups" && !self.resources.is_empty()) {
                parts.push(format!("{label}:[{}]", list(v)));
            }
        }
        format!("{{{}}}", parts.join(", "))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

#[derive(Debug, Clone)]
struct Binding {
    /// Empty for ClusterRoleBindings.
    namespace: String,
    role_kind: String,
    role_name: String,
    subjects: Vec<Subject>,
}

impl Binding {
    fn from_json(v: &Value) -> Self {
        let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        Self {
            namespace: s(v, "/metadata/namespace"),
            role_kind: s(v, "/roleRef/kind"),
            role_name: s(v, "/roleRef/name"),
            subjects: v
                .get("subjects")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| Subject { kind: s(x, "/kind"), name: s(x, "/name"), namespace: s(x, "/namespace") }).collect())
                .unwrap_or_default(),
        }
    }

    /// upstream `appliesToUser`: a ServiceAccount subject without a
    /// namespace means the binding's own.
    fn applies_to(&self, user: &UserInfo) -> bool {
        self.subjects.iter().any(|s| match s.kind.as_str() {
            "User" => s.name == user.name,
            "Group" => user.groups.contains(&s.name),
            "ServiceAccount" => {
                let ns = if s.namespace.is_empty() { &self.namespace } else { &s.namespace };
                !ns.is_empty() && user.name == service_account_user(ns, &s.name)
            }
            _ => false,
        })
    }
}

/// The RBAC objects of a cluster, ready to evaluate.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    cluster_roles: HashMap<String, Vec<Rule>>,
    roles: HashMap<(String, String), Vec<Rule>>,
    cluster_bindings: Vec<Binding>,
    bindings: HashMap<String, Vec<Binding>>,
}

fn rules_of(role: &Value) -> Vec<Rule> {
    role.get("rules").and_then(Value::as_array).map(|a| a.iter().map(Rule::from_json).collect()).unwrap_or_default()
}

/// ClusterRole rules with aggregation resolved: a role with an
/// `aggregationRule` gets the rules of every ClusterRole its selectors
/// match, iterated so chains (view → edit → admin) settle.
fn aggregate(cluster_roles: &[Value]) -> HashMap<String, Vec<Rule>> {
    let name = |r: &Value| r.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
    let mut rules: HashMap<String, Vec<Rule>> = cluster_roles.iter().map(|r| (name(r), rules_of(r))).collect();
    let aggregated: Vec<(String, Vec<LabelSelector>)> = cluster_roles
        .iter()
        .filter_map(|r| {
            let sels = r.pointer("/aggregationRule/clusterRoleSelectors")?.as_array()?;
            Some((name(r), sels.iter().map(LabelSelector::from_object).collect()))
        })
        .collect();
    for _ in 0..4 {
        let mut changed = false;
        for (agg, sels) in &aggregated {
            let mut merged = Vec::new();
            for r in cluster_roles {
                let n = name(r);
                if n != *agg && sels.iter().any(|s| !s.is_empty() && s.matches(r)) {
                    for rule in rules.get(&n).into_iter().flatten() {
                        if !merged.contains(rule) {
                            merged.push(rule.clone());
                        }
                    }
                }
            }
            if rules.get(agg) != Some(&merged) {
                rules.insert(agg.clone(), merged);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    rules
}

impl Policy {
    pub fn new(cluster_roles: &[Value], roles: &[Value], cluster_bindings: &[Value], bindings: &[Value]) -> Self {
        let key = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        let mut by_ns: HashMap<String, Vec<Binding>> = HashMap::new();
        for b in bindings.iter().map(Binding::from_json) {
            by_ns.entry(b.namespace.clone()).or_default().push(b);
        }
        Self {
            cluster_roles: aggregate(cluster_roles),
            roles: roles.iter().map(|r| ((key(r, "/metadata/namespace"), key(r, "/metadata/name")), rules_of(r))).collect(),
            cluster_bindings: cluster_bindings.iter().map(Binding::from_json).collect(),
            bindings: by_ns,
        }
    }

    fn role_rules(&self, b: &Binding) -> &[Rule] {
        let rules = match b.role_kind.as_str() {
            "ClusterRole" => self.cluster_roles.get(&b.role_name),
            "Role" => self.roles.get(&(b.namespace.clone(), b.role_name.clone())),
            _ => None,
        };
        rules.map_or(&[], Vec::as_slice)
    }

    /// Whether RBAC allows the request: ClusterRoleBindings everywhere,
    /// RoleBindings only in their namespace.
    pub fn allows(&self, a: &Attributes) -> bool {
        let cluster = self.cluster_bindings.iter();
        let local = (a.resource_request && !a.namespace.is_empty())
            .then(|| self.bindings.get(&a.namespace))
            .flatten()
            .into_iter()
            .flatten();
        cluster.chain(local).filter(|b| b.applies_to(&a.user)).any(|b| self.role_rules(b).iter().any(|r| r.allows(a)))
    }

    /// The rules a binding's `roleRef` grants in `namespace` (empty for a
    /// RoleBinding's ClusterRole outside it), `None` when the role does not
    /// exist.
    pub fn role_ref_rules(&self, kind: &str, name: &str, namespace: &str) -> Option<&[Rule]> {
        match kind {
            "ClusterRole" => self.cluster_roles.get(name),
            "Role" => self.roles.get(&(namespace.to_string(), name.to_string())),
            _ => None,
        }
        .map(Vec::as_slice)
    }

    /// The rules that apply to `user` in `namespace` (SelfSubjectRulesReview).
    pub fn rules_for(&self, user: &UserInfo, namespace: &str) -> Vec<Rule> {
        let local = self.bindings.get(namespace).into_iter().flatten();
        let mut out = Vec::new();
        for b in self.cluster_bindings.iter().chain(local).filter(|b| b.applies_to(user)) {
            for r in self.role_rules(b) {
                if !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }
}

/// upstream's `forbiddenMessage` (`endpoints/handlers/responsewriters`),
/// after the `<resource> "<name>" is forbidden: ` prefix `NewForbidden` adds.
pub fn forbidden_message(a: &Attributes) -> String {
    let user = &a.user.name;
    if !a.resource_request {
        return format!("forbidden: User {user:?} cannot {} path {:?}", a.verb, a.path);
    }
    let resource = if a.subresource.is_empty() { a.resource.clone() } else { format!("{}/{}", a.resource, a.subresource) };
    let why = if a.namespace.is_empty() {
        format!("User {user:?} cannot {} resource {resource:?} in API group {:?} at the cluster scope", a.verb, a.api_group)
    } else {
        format!("User {user:?} cannot {} resource {resource:?} in API group {:?} in the namespace {:?}", a.verb, a.api_group, a.namespace)
    };
    let qualified = if a.api_group.is_empty() { a.resource.clone() } else { format!("{}.{}", a.resource, a.api_group) };
    if a.name.is_empty() { format!("{qualified} is forbidden: {why}") } else { format!("{qualified} {:?} is forbidden: {why}", a.name) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo { name: name.into(), groups: groups.iter().map(|g| (*g).to_string()).collect(), ..UserInfo::default() }
    }

    fn req(u: &UserInfo, verb: &str, ns: &str, group: &str, resource: &str, sub: &str, name: &str) -> Attributes {
        Attributes {
            user: u.clone(),
            verb: verb.into(),
            resource_request: true,
            namespace: ns.into(),
            api_group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    fn url(u: &UserInfo, verb: &str, path: &str) -> Attributes {
        Attributes { user: u.clone(), verb: verb.into(), path: path.into(), ..Attributes::default() }
    }

    fn policy() -> Policy {
        let cluster_roles = [
            json!({"metadata": {"name": "reader"}, "rules": [
                {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]}]}),
            json!({"metadata": {"name": "status-writer"}, "rules": [
                {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["update", "patch"]}]}),
            json!({"metadata": {"name": "one-cm"}, "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["settings"], "verbs": ["get", "update"]}]}),
            json!({"metadata": {"name": "health"}, "rules": [
                {"nonResourceURLs": ["/healthz", "/apis/*"], "verbs": ["get"]}]}),
            json!({"metadata": {"name": "agg-part", "labels": {"agg": "yes"}}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["*"]}]}),
            json!({"metadata": {"name": "aggregated", "labels": {"agg2": "yes"}},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg": "yes"}}]}, "rules": []}),
            json!({"metadata": {"name": "aggregated-twice"},
                "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"agg2": "yes"}}]}}),
        ];
        let roles = [json!({"metadata": {"name": "deployer", "namespace": "team"}, "rules": [
            {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"], "verbs": ["*"]}]})];
        let crbs = [
            json!({"metadata": {"name": "a"}, "roleRef": {"kind": "ClusterRole", "name": "health"},
                "subjects": [{"kind": "Group", "name": "system:authenticated"}]}),
            json!({"metadata": {"name": "b"}, "roleRef": {"kind": "ClusterRole", "name": "status-writer"},
                "subjects": [{"kind": "ServiceAccount", "name": "ctrl", "namespace": "kube-system"}]}),
            json!({"metadata": {"name": "c"}, "roleRef": {"kind": "ClusterRole", "name": "aggregated-twice"},
                "subjects": [{"kind": "User", "name": "agg-user"}]}),
        ];
        let rbs = [
            json!({"metadata": {"name": "r1", "namespace": "team"}, "roleRef": {"kind": "ClusterRole", "name": "reader"},
                "subjects": [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": "bot"}]}),
            json!({"metadata": {"name": "r2", "namespace": "team"}, "roleRef": {"kind": "Role", "name": "deployer"},
                "subjects": [{"kind": "Group", "name": "devs"}]}),
            json!({"metadata": {"name": "r3", "namespace": "other"}, "roleRef": {"kind": "Role", "name": "deployer"},
                "subjects": [{"kind": "Group", "name": "devs"}]}),
            json!({"metadata": {"name": "r4", "namespace": "team"}, "roleRef": {"kind": "ClusterRole", "name": "one-cm"},
                "subjects": [{"kind": "User", "name": "carol"}]}),
        ];
        Policy::new(&cluster_roles, &roles, &crbs, &rbs)
    }

    #[test]
    fn role_bindings_grant_only_in_their_namespace() {
        let p = policy();
        let alice = user("alice", &["system:authenticated"]);
        assert!(p.allows(&req(&alice, "get", "team", "", "pods", "", "x")));
        assert!(p.allows(&req(&alice, "list", "team", "", "pods", "", "")));
        assert!(p.allows(&req(&alice, "watch", "team", "", "pods", "", "")));
        assert!(!p.allows(&req(&alice, "get", "other", "", "pods", "", "x")), "other namespace");
        assert!(!p.allows(&req(&alice, "list", "", "", "pods", "", "")), "cluster-wide list");
        assert!(!p.allows(&req(&alice, "delete", "team", "", "pods", "", "x")), "verb");
        assert!(!p.allows(&req(&alice, "deletecollection", "team", "", "pods", "", "")), "deletecollection is its own verb");
        assert!(!p.allows(&req(&alice, "get", "team", "", "secrets", "", "x")), "resource");
        assert!(!p.allows(&req(&alice, "get", "team", "extensions", "deployments", "", "x")), "group");
    }

    #[test]
    fn subresources_are_separate_resources() {
        let p = policy();
        let alice = user("alice", &[]);
        assert!(p.allows(&req(&alice, "get", "team", "", "pods", "log", "x")));
        assert!(!p.allows(&req(&alice, "create", "team", "", "pods", "exec", "x")), "pods/exec not granted");
        assert!(!p.allows(&req(&alice, "get", "team", "", "pods", "exec", "x")), "pods/exec not granted by pods");
        let ctrl = user("system:serviceaccount:kube-system:ctrl", &[]);
        assert!(p.allows(&req(&ctrl, "update", "", "", "nodes", "status", "n1")), "*/status");
        assert!(p.allows(&req(&ctrl, "patch", "x", "", "services", "status", "s")));
        assert!(!p.allows(&req(&ctrl, "update", "", "", "nodes", "", "n1")), "*/status is not the object");
        let dev = user("dave", &["devs"]);
        assert!(p.allows(&req(&dev, "update", "team", "apps", "deployments", "scale", "web")));
        assert!(p.allows(&req(&dev, "deletecollection", "team", "apps", "deployments", "", "")), "* verb");
        assert!(!p.allows(&req(&dev, "update", "team", "apps", "replicasets", "scale", "web")));
    }

    #[test]
    fn resource_names_limit_to_named_objects() {
        let p = policy();
        let carol = user("carol", &[]);
        assert!(p.allows(&req(&carol, "get", "team", "", "configmaps", "", "settings")));
        assert!(!p.allows(&req(&carol, "get", "team", "", "configmaps", "", "other")));
        assert!(!p.allows(&req(&carol, "list", "team", "", "configmaps", "", "")), "a list names no object");
    }

    #[test]
    fn service_account_subjects_default_to_the_binding_namespace() {
        let p = policy();
        let bot = user("system:serviceaccount:team:bot", &["system:serviceaccounts"]);
        assert!(p.allows(&req(&bot, "get", "team", "", "pods", "", "x")));
        let impostor = user("system:serviceaccount:other:bot", &[]);
        assert!(!p.allows(&req(&impostor, "get", "team", "", "pods", "", "x")));
    }

    #[test]
    fn non_resource_urls_match_exactly_or_by_star_prefix() {
        let p = policy();
        let u = user("x", &["system:authenticated"]);
        assert!(p.allows(&url(&u, "get", "/healthz")));
        assert!(p.allows(&url(&u, "get", "/apis/apps/v1")));
        assert!(!p.allows(&url(&u, "get", "/healthz/etcd")));
        assert!(!p.allows(&url(&u, "post", "/healthz")));
        assert!(!p.allows(&url(&user("anon", &["system:unauthenticated"]), "get", "/healthz")));
    }

    #[test]
    fn aggregated_cluster_roles_collect_selected_rules_transitively() {
        let p = policy();
        let u = user("agg-user", &[]);
        assert!(p.allows(&req(&u, "delete", "any", "", "secrets", "", "s")));
        assert!(!p.allows(&req(&u, "get", "any", "", "pods", "", "s")));
    }

    fn rule(verbs: &[&str], groups: &[&str], resources: &[&str], names: &[&str]) -> Rule {
        let v = |x: &[&str]| x.iter().map(|s| (*s).to_string()).collect();
        Rule { verbs: v(verbs), api_groups: v(groups), resources: v(resources), resource_names: v(names), non_resource_urls: vec![] }
    }

    #[test]
    fn coverage_follows_upstream_policy_comparator() {
        let owner = [rule(&["get", "list"], &[""], &["pods", "*/status"], &[]), rule(&["*"], &["apps"], &["deployments"], &["web"])];
        assert!(uncovered(&owner, &[rule(&["get"], &[""], &["pods"], &[])]).is_empty());
        assert!(uncovered(&owner, &[rule(&["get"], &[""], &["pods"], &["one"])]).is_empty(), "all names cover one");
        assert!(uncovered(&owner, &[rule(&["list"], &[""], &["services/status"], &[])]).is_empty(), "*/status");
        assert!(uncovered(&owner, &[rule(&["delete"], &["apps"], &["deployments"], &["web"])]).is_empty());
        let missing = uncovered(&owner, &[rule(&["get", "delete"], &[""], &["pods"], &[])]);
        assert_eq!(missing, vec![rule(&["delete"], &[""], &["pods"], &[])]);
        assert_eq!(missing[0].compact_string(), r#"{APIGroups:[""], Resources:["pods"], Verbs:["delete"]}"#);
        assert_eq!(uncovered(&owner, &[rule(&["get"], &["apps"], &["deployments"], &[])]).len(), 1, "one name does not cover all");
        assert_eq!(uncovered(&owner, &[rule(&["get"], &["*"], &["pods"], &[])]).len(), 1, "a wildcard needs a wildcard");
        let urls = [Rule { verbs: vec!["get".into()], non_resource_urls: vec!["/healthz/*".into()], ..Rule::default() }];
        let want = |u: &str| [Rule { verbs: vec!["get".into()], non_resource_urls: vec![u.into()], ..Rule::default() }];
        assert!(uncovered(&urls, &want("/healthz/etcd")).is_empty());
        assert_eq!(uncovered(&urls, &want("/metrics")).len(), 1);
    }

    #[test]
    fn forbidden_messages_match_upstream() {
        let bob = user("bob", &[]);
        assert_eq!(
            forbidden_message(&req(&bob, "get", "default", "", "pods", "", "web")),
            r#"pods "web" is forbidden: User "bob" cannot get resource "pods" in API group "" in the namespace "default""#
        );
        assert_eq!(
            forbidden_message(&req(&bob, "list", "", "apps", "deployments", "", "")),
            r#"deployments.apps is forbidden: User "bob" cannot list resource "deployments" in API group "apps" at the cluster scope"#
        );
        assert_eq!(
            forbidden_message(&req(&bob, "create", "ns", "", "pods", "exec", "p")),
            r#"pods "p" is forbidden: User "bob" cannot create resource "pods/exec" in API group "" in the namespace "ns""#
        );
        assert_eq!(forbidden_message(&url(&bob, "get", "/metrics")), r#"forbidden: User "bob" cannot get path "/metrics""#);
    }
}
