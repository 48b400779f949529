//! The ClusterRole in manifests/riptide.yaml grants exactly the API calls
//! the agent makes: its own list (`riptide_agent::watch::API_ACCESS`, which
//! the watchers and the podCIDR fallback check before calling), compared both
//! ways with the manifest — nothing missing, nothing extra.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use riptide_agent::watch::API_ACCESS;
use riptide_tests::manifests::{self, Permission, find, load_yaml, permissions};

fn agent_permissions() -> BTreeSet<Permission> {
    API_ACCESS
        .iter()
        .flat_map(|a| a.verbs.iter().map(move |v| (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned())))
        .collect()
}

#[test]
fn clusterrole_grants_exactly_what_the_agent_calls() {
    let objs = load_yaml(&manifests::manifest("riptide.yaml")).unwrap();
    let role = find(&objs, "ClusterRole", "riptide-agent").unwrap();
    let granted = permissions(&role["rules"]).unwrap();
    let needed = agent_permissions();
    assert!(!needed.is_empty());
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(missing.is_empty(), "the agent calls these but the ClusterRole does not grant them: {missing:?}");
    assert!(extra.is_empty(), "the ClusterRole grants these but the agent never calls them: {extra:?}");
    // The floor: read access to the six watched kinds.
    for (g, r) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for v in ["list", "watch"] {
            assert!(granted.contains(&(g.into(), r.into(), v.into())), "{v} {g}/{r}");
        }
    }
    // Never a namespaced Role for cluster-wide watches.
    assert!(!objs.iter().any(|o| o["kind"] == "Role" || o["kind"] == "RoleBinding"));
}

#[test]
fn the_daemonset_runs_as_the_bound_service_account() {
    let objs = load_yaml(&manifests::manifest("riptide.yaml")).unwrap();
    let binding = find(&objs, "ClusterRoleBinding", "riptide-agent").unwrap();
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "riptide-agent");
    assert_eq!(binding["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
    let subjects = binding["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1, "bound to exactly one subject");
    let (sa, ns) = (subjects[0]["name"].as_str().unwrap(), subjects[0]["namespace"].as_str().unwrap());
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    find(&objs, "ServiceAccount", sa).unwrap();
    let ds = find(&objs, "DaemonSet", "riptide-agent").unwrap();
    assert_eq!(ds["metadata"]["namespace"], ns);
    assert_eq!(ds["spec"]["template"]["spec"]["serviceAccountName"], sa);
    // The uninstaller needs no API access at all.
    let un = load_yaml(&manifests::manifest("riptide-uninstall.yaml")).unwrap();
    let ds = find(&un, "DaemonSet", "riptide-uninstall").unwrap();
    assert_eq!(ds["spec"]["template"]["spec"]["automountServiceAccountToken"], false);
    assert!(!un.iter().any(|o| o["kind"].as_str().is_some_and(|k| k.contains("Role"))));
}
