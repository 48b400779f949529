//! RBAC escalation prevention and impersonation with real kubectl
//! (issue #19 "Authorization"): a namespace admin may hand out what they
//! hold and nothing more — unless granted `escalate` or `bind` — whether
//! by create, apply or patch; `--as`/`--as-group` work only with the
//! `impersonate` verb, and the impersonated identity is then authorized
//! as itself.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{Backend, TestServer};
use riptide_controlplane::apiserver::tls;

const SETUP: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot, namespace: team}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: team-admins, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: admin}
subjects: [{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}]
";

fn role(name: &str, verbs: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {name}, namespace: team}}\n\
         rules: [{{apiGroups: [\"\"], resources: [pods], verbs: [{verbs}]}}]\n"
    )
}

fn binding(name: &str, kind: &str, role: &str, user: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {name}, namespace: team}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: {kind}, name: {role}}}\n\
         subjects: [{{kind: User, name: {user}, apiGroup: rbac.authorization.k8s.io}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_needs_escalate_or_bind_and_impersonation_needs_impersonate() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "admin-token,admin,admin,\"system:masters\"\nalice-token,alice,alice-uid\nbob-token,bob,bob-uid\n").unwrap();
    let t = tokens.clone();
    let s = TestServer::start_with(Backend::Embedded, move |c| c.token_file = Some(t)).await;
    let h = s.h();
    let ca = h.ca_pem.clone().unwrap();
    let id = |name: &str, token: &str| -> PathBuf {
        let p = dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&p, tls::kubeconfig(&h.url, Some(&ca), token)).unwrap();
        p
    };
    let (admin, alice) = (id("admin", "admin-token"), id("alice", "alice-token"));
    let (ok, out, err) = s.kubectl_with(&admin, &["apply", "-f", "-"], Some(SETUP)).await;
    assert!(ok, "setup: {out}{err}");

    // What alice holds (admin in team covers get/delete on pods) she may grant.
    let (ok, out, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&role("readers", "get, list"))).await;
    assert!(ok, "a covered Role: {out}{err}");
    let (ok, out, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&binding("bob-admin", "ClusterRole", "admin", "bob"))).await;
    assert!(ok, "binding the role she holds in team: {out}{err}");

    // More than she holds: nodes are cluster-scoped, admin does not cover them.
    let nodes_role = "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: node-reader, namespace: team}\n\
                      rules: [{apiGroups: [\"\"], resources: [nodes], verbs: [get]}]\n";
    let (ok, _, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(nodes_role)).await;
    assert!(!ok, "an escalating Role must be refused");
    assert!(
        err.contains(r#"roles.rbac.authorization.k8s.io "node-reader" is forbidden: user "alice" (groups=["system:authenticated"]) is attempting to grant RBAC permissions not currently held:"#)
            && err.contains(r#"{APIGroups:[""], Resources:["nodes"], Verbs:["get"]}"#),
        "upstream's message: {err}"
    );
    let (ok, _, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&binding("me-root", "ClusterRole", "cluster-admin", "alice"))).await;
    assert!(!ok && err.contains("is attempting to grant RBAC permissions not currently held"), "binding cluster-admin: {err}");
    let (ok, _, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&binding("ghost", "Role", "missing", "alice"))).await;
    assert!(!ok && err.contains(r#"roles.rbac.authorization.k8s.io "missing" not found"#), "a missing role: {err}");

    // A patch is judged on what it produces, as is apply.
    let (ok, _, err) = s
        .kubectl_with(&alice, &["patch", "role", "readers", "-n", "team", "--type=json", "-p",
            r#"[{"op":"add","path":"/rules/-","value":{"apiGroups":[""],"resources":["nodes"],"verbs":["list"]}}]"#], None)
        .await;
    assert!(!ok && err.contains(r#"Resources:["nodes"], Verbs:["list"]"#), "an escalating patch: {err}");
    let (ok, out, err) = s.kubectl_with(&alice, &["label", "role", "readers", "-n", "team", "tier=one"], None).await;
    assert!(ok, "a label change grants nothing and needs no check: {out}{err}");
    let (ok, _, err) = s.kubectl_with(&alice, &["apply", "--server-side", "-f", "-"], Some(nodes_role)).await;
    assert!(!ok && err.contains("not currently held"), "server-side apply: {err}");

    // `escalate` and `bind`, granted by name, lift exactly that limit.
    let grants = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: node-viewer}\n\
                  rules: [{apiGroups: [\"\"], resources: [nodes], verbs: [get, list]}]\n---\n\
                  apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: role-granter}\n\
                  rules:\n- {apiGroups: [rbac.authorization.k8s.io], resources: [roles], verbs: [escalate]}\n\
                  - {apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: [bind], resourceNames: [node-viewer]}\n";
    let (ok, out, err) = s.kubectl_with(&admin, &["apply", "-f", "-"], Some(grants)).await;
    assert!(ok, "{out}{err}");
    let bind_nodes = binding("bob-nodes", "ClusterRole", "node-viewer", "bob");
    let (ok, _, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&bind_nodes)).await;
    assert!(!ok && err.contains(r#"Resources:["nodes"], Verbs:["get"]"#), "binding a role she does not hold: {err}");
    let (ok, out, err) = s.kubectl_with(&admin, &["create", "rolebinding", "granter", "-n", "team", "--clusterrole=role-granter", "--user=alice"], None).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(nodes_role)).await;
    assert!(ok, "with escalate: {out}{err}");
    let (ok, out, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&bind_nodes)).await;
    assert!(ok, "with bind on node-viewer: {out}{err}");
    let (ok, _, err) = s.kubectl_with(&alice, &["create", "-f", "-"], Some(&binding("me-root", "ClusterRole", "cluster-admin", "alice"))).await;
    assert!(!ok && err.contains("not currently held"), "bind on node-viewer is not bind on cluster-admin: {err}");

    // Impersonation: refused without the verb, with upstream's message.
    let (ok, _, err) = s.kubectl_with(&alice, &["get", "pods", "-n", "team", "--as=bob"], None).await;
    assert!(!ok && err.contains(r#"users "bob" is forbidden: User "alice" cannot impersonate resource "users" in API group "" at the cluster scope"#), "{err}");
    let imp = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: impersonate-some}\n\
               rules:\n- {apiGroups: [\"\"], resources: [users], verbs: [impersonate], resourceNames: [bob]}\n\
               - {apiGroups: [\"\"], resources: [serviceaccounts], verbs: [impersonate]}\n";
    let (ok, out, err) = s.kubectl_with(&admin, &["apply", "-f", "-"], Some(imp)).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = s.kubectl_with(&admin, &["create", "clusterrolebinding", "alice-imp", "--clusterrole=impersonate-some", "--user=alice"], None).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = s.kubectl_with(&alice, &["auth", "whoami", "--as=bob", "-o", "jsonpath={.status.userInfo.username} {.status.userInfo.groups}"], None).await;
    assert!(ok && out == r#"bob ["system:authenticated"]"#, "whoami as bob: {out}{err}");
    // bob may not list nodes: the request is authorized as bob.
    let (ok, _, err) = s.kubectl_with(&alice, &["get", "nodes", "--as=bob"], None).await;
    assert!(!ok && err.contains(r#"User "bob" cannot list resource "nodes""#), "{err}");
    let (ok, _, err) = s.kubectl_with(&alice, &["get", "pods", "-n", "team", "--as=carol"], None).await;
    assert!(!ok && err.contains(r#"users "carol" is forbidden"#), "only bob by name: {err}");
    let (ok, _, err) = s.kubectl_with(&alice, &["get", "pods", "-n", "team", "--as=bob", "--as-group=system:masters"], None).await;
    assert!(!ok && err.contains(r#"groups "system:masters" is forbidden"#), "groups need their own grant: {err}");
    let (ok, out, err) = s
        .kubectl_with(&alice, &["auth", "whoami", "--as=system:serviceaccount:team:robot", "-o", "jsonpath={.status.userInfo.groups}"], None)
        .await;
    assert!(ok && out.contains("system:serviceaccounts:team") && out.contains("system:authenticated"), "a ServiceAccount: {out}{err}");
    let (ok, _, err) = s.kubectl_with(&id("bob", "bob-token"), &["get", "pods", "-n", "team", "--as=alice"], None).await;
    assert!(!ok && err.contains(r#"User "bob" cannot impersonate"#), "{err}");
}
