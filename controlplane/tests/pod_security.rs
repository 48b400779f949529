//! Pod Security Admission and LocalSubjectAccessReview namespaces, with a
//! real apiserver and real kubectl (issue #19, least privilege): each level
//! admits a conforming pod and refuses a violating one with upstream's 403
//! text; `warn` reaches kubectl as `Warning:` lines, for pods and for
//! workloads' pod templates; bad labels are 422; tightening a namespace
//! warns about its pods; defaults and exemptions come from the config; the
//! controllers' pods are judged too (FailedCreate events); a
//! LocalSubjectAccessReview about another namespace than its URL's is
//! refused instead of being judged in the URL's.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{Backend, TestServer};
use riptide_controlplane::apiserver::{pod_security::PodSecurity, tls};

const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: priv, labels: {pod-security.kubernetes.io/enforce: privileged}}
---
apiVersion: v1
kind: Namespace
metadata: {name: base, labels: {pod-security.kubernetes.io/enforce: baseline}}
---
apiVersion: v1
kind: Namespace
metadata: {name: restr, labels: {pod-security.kubernetes.io/enforce: restricted}}
---
apiVersion: v1
kind: Namespace
metadata: {name: warned, labels: {pod-security.kubernetes.io/warn: restricted}}
---
apiVersion: v1
kind: Namespace
metadata:
  name: old
  labels: {pod-security.kubernetes.io/enforce: restricted, pod-security.kubernetes.io/enforce-version: v1.22}
";

/// A pod in `ns` whose spec is `spec` (YAML flow mapping entries).
fn pod(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{spec}}}\n")
}

/// Breaks baseline twice: a host namespace and a privileged container.
const HOST: &str = "hostNetwork: true, containers: [{name: c, image: busybox, securityContext: {privileged: true}}]";
/// Baseline-clean, breaks restricted four ways.
const BARE: &str = "containers: [{name: c, image: busybox}]";
/// Restricted-clean.
const LOCKED: &str = "securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}, \
                      containers: [{name: c, image: busybox, securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}}]";

const BARE_VIOLATIONS: &str = "allowPrivilegeEscalation != false (container \"c\" must set securityContext.allowPrivilegeEscalation=false), \
     unrestricted capabilities (container \"c\" must set securityContext.capabilities.drop=[\"ALL\"]), \
     runAsNonRoot != true (pod or container \"c\" must set securityContext.runAsNonRoot=true), \
     seccompProfile (pod or container \"c\" must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\")";

fn workload(kind: &str, ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  \
         template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{{spec}}}\n"
    )
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter_map(|l| l.strip_prefix("Warning: ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_level_admits_its_pods_refuses_the_rest_and_warns() {
    let s = TestServer::start(Backend::Embedded).await;
    let (ok, out, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(NAMESPACES)).await;
    assert!(ok, "namespaces: {out}{err}");

    // privileged: anything goes.
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("priv", "host", HOST))).await;
    assert!(ok && warnings(&err).is_empty(), "privileged admits a host pod: {err}");

    // baseline: a plain pod passes; host access is refused with upstream's text.
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("base", "bare", BARE))).await;
    assert!(ok && warnings(&err).is_empty(), "baseline admits a plain pod: {err}");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("base", "host", HOST))).await;
    assert!(!ok, "baseline must refuse a host pod");
    assert!(
        err.contains(
            "Error from server (Forbidden): error when creating \"STDIN\": pods \"host\" is forbidden: violates PodSecurity \"baseline:latest\": \
             host namespaces (hostNetwork=true), privileged (container \"c\" must not set securityContext.privileged=true)"
        ),
        "upstream's message: {err}"
    );

    // restricted: a locked-down pod passes; a plain one is refused.
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("restr", "locked", LOCKED))).await;
    assert!(ok && warnings(&err).is_empty(), "restricted admits a locked-down pod: {err}");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("restr", "bare", BARE))).await;
    assert!(!ok, "restricted must refuse a plain pod");
    assert!(err.contains(&format!("pods \"bare\" is forbidden: violates PodSecurity \"restricted:latest\": {BARE_VIOLATIONS}")), "{err}");
    let (ok, out, _) = s.kubectl(&["get", "pod", "bare", "-n", "restr", "-o", "name"]).await;
    assert!(!ok, "a refused pod is not stored: {out}");

    // A policy version judges as that version did: runAsUser=0 became a
    // restricted violation in 1.23.
    let root = LOCKED.replace("runAsNonRoot: true", "runAsNonRoot: true, runAsUser: 0");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("old", "root", &root))).await;
    assert!(ok, "restricted:v1.22 predates the runAsUser check: {err}");
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("restr", "root", &root))).await;
    assert!(!ok && err.contains("violates PodSecurity \"restricted:latest\": runAsUser=0 (pod must not set runAsUser=0)"), "{err}");

    // warn: admitted, and kubectl prints upstream's warning.
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&pod("warned", "bare", BARE))).await;
    assert!(ok, "warn never refuses: {err}");
    assert_eq!(warnings(&err), [format!("would violate PodSecurity \"restricted:latest\": {BARE_VIOLATIONS}")], "{err}");
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&pod("warned", "locked", LOCKED))).await;
    assert!(ok && warnings(&err).is_empty(), "a conforming pod draws no warning: {err}");

    // Workloads are warned about at once (their pods would be refused
    // later), in warn and in enforce namespaces; never refused.
    for (kind, ns) in [("Deployment", "warned"), ("ReplicaSet", "restr"), ("DaemonSet", "base")] {
        let name = kind.to_lowercase();
        let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&workload(kind, ns, &name, HOST))).await;
        assert!(ok, "{kind}: a workload is never refused: {err}");
        let level = if ns == "base" { "baseline" } else { "restricted" };
        let w = warnings(&err);
        assert!(
            w.len() == 1 && w[0].starts_with(&format!("would violate PodSecurity \"{level}:latest\": host namespaces (hostNetwork=true), privileged")),
            "{kind} in {ns}: {err}"
        );
        let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&workload(kind, ns, &format!("{name}-ok"), LOCKED))).await;
        assert!(ok && warnings(&err).is_empty(), "{kind}: a conforming template draws no warning: {err}");
    }

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_validated_and_tightening_warns_about_existing_pods() {
    let s = TestServer::start(Backend::Embedded).await;
    let (ok, _, err) = s.kubectl(&["create", "namespace", "apps"]).await;
    assert!(ok, "{err}");
    for (name, spec) in [("bare-1", BARE), ("bare-2", BARE), ("locked", LOCKED), ("host", HOST)] {
        let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(&pod("apps", name, spec))).await;
        assert!(ok, "the default level is privileged: {err}");
    }

    // Invalid values are refused on create and update, with upstream's 422.
    let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: bad, labels: {pod-security.kubernetes.io/enforce: strict}}\n";
    let (ok, _, err) = s.kubectl_stdin(&["create", "-f", "-"], Some(bad)).await;
    assert!(!ok, "an invalid level must be refused");
    assert!(
        err.contains(
            "Namespace \"bad\" is invalid: metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: \"strict\": must be one of privileged, baseline, restricted"
        ),
        "{err}"
    );
    let (ok, _, err) = s.kubectl(&["label", "namespace", "apps", "pod-security.kubernetes.io/warn-version=1.30"]).await;
    assert!(!ok && err.contains("metadata.labels[pod-security.kubernetes.io/warn-version]: Invalid value: \"1.30\": must be \"latest\" or \"v1.x\""), "{err}");

    // Tightening warns about the pods already there, grouped by reason.
    let (ok, _, err) = s.kubectl(&["label", "namespace", "apps", "pod-security.kubernetes.io/enforce=baseline"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        warnings(&err),
        [
            "existing pods in namespace \"apps\" violate the new PodSecurity enforce level \"baseline:latest\"",
            "host: host namespaces, privileged",
        ],
        "{err}"
    );
    let (ok, _, err) = s.kubectl(&["label", "--overwrite", "namespace", "apps", "pod-security.kubernetes.io/enforce=restricted"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        warnings(&err),
        [
            "existing pods in namespace \"apps\" violate the new PodSecurity enforce level \"restricted:latest\"",
            "bare-1 (and 1 other pod): allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile",
            "host: host namespaces, privileged, allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile",
        ],
        "{err}"
    );
    // Relaxing warns nothing; the pods stay.
    let (ok, _, err) = s.kubectl(&["label", "--overwrite", "namespace", "apps", "pod-security.kubernetes.io/enforce=baseline"]).await;
    assert!(ok && warnings(&err).is_empty(), "{err}");
    let out = s.kubectl_ok(&["get", "pods", "-n", "apps", "-o", "name"]).await;
    assert_eq!(out.lines().count(), 4, "{out}");

    // Stored pods that now break the level: edits that change nothing
    // Pod Security judges pass; a new image is judged.
    let (ok, _, err) = s.kubectl(&["label", "pod", "host", "-n", "apps", "team=a"]).await;
    assert!(ok, "relabelling a stored pod: {err}");
    let (ok, _, err) = s.kubectl(&["set", "image", "pod/host", "-n", "apps", "c=busybox:2"]).await;
    assert!(!ok && err.contains("pods \"host\" is forbidden: violates PodSecurity \"baseline:latest\""), "a new image is judged: {err}");

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_and_exemptions_come_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "admin-token,admin,admin,\"system:masters\"\nops-token,ops,ops,\"system:masters\"\n").unwrap();
    let t = tokens.clone();
    let s = TestServer::start_with(Backend::Embedded, move |c| {
        c.token_file = Some(t);
        c.admission.pod_security = PodSecurity {
            defaults: riptide_controlplane::apiserver::pod_security::Policy {
                enforce: "baseline".parse().unwrap(),
                warn: "restricted".parse().unwrap(),
                ..Default::default()
            },
            exempt_namespaces: vec!["tools".into()],
            exempt_users: vec!["ops".into()],
        };
    })
    .await;
    let h = s.h();
    let id = |name: &str, token: &str| -> PathBuf {
        let p = dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&p, tls::kubeconfig(&h.url, h.ca_pem.as_deref(), token)).unwrap();
        p
    };
    let (admin, ops) = (id("admin", "admin-token"), id("ops", "ops-token"));

    // Unlabelled namespaces get the defaults.
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "-f", "-"], Some(&pod("default", "host", HOST))).await;
    assert!(!ok && err.contains("violates PodSecurity \"baseline:latest\""), "the default enforce level: {err}");
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "-f", "-"], Some(&pod("default", "bare", BARE))).await;
    assert!(ok && warnings(&err) == [format!("would violate PodSecurity \"restricted:latest\": {BARE_VIOLATIONS}")], "the default warn level: {err}");
    // A namespace labelled privileged opts out (how riptide's own
    // privileged agent would run under a stricter default).
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "namespace", "infra"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl_with(&admin, &["label", "namespace", "infra", "pod-security.kubernetes.io/enforce=privileged", "pod-security.kubernetes.io/warn=privileged"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "-f", "-"], Some(&pod("infra", "host", HOST))).await;
    assert!(ok && warnings(&err).is_empty(), "{err}");
    // Exempt namespaces and users are not judged; labelling an exempt
    // namespace says its policy is ignored.
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "namespace", "tools"], None).await;
    assert!(ok, "{err}");
    let (ok, _, err) = s.kubectl_with(&admin, &["create", "-f", "-"], Some(&pod("tools", "host", HOST))).await;
    assert!(ok && warnings(&err).is_empty(), "exempt namespace: {err}");
    let (ok, _, err) = s.kubectl_with(&admin, &["label", "namespace", "tools", "pod-security.kubernetes.io/enforce=restricted"], None).await;
    assert!(ok, "{err}");
    assert_eq!(
        warnings(&err),
        ["namespace \"tools\" is exempt from Pod Security, and the policy (enforce=restricted:latest) will be ignored"],
        "{err}"
    );
    let (ok, _, err) = s.kubectl_with(&ops, &["create", "-f", "-"], Some(&pod("default", "host", HOST))).await;
    assert!(ok && warnings(&err).is_empty(), "exempt user: {err}");

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_subject_access_reviews_stay_in_their_namespace() {
    let s = TestServer::start(Backend::Embedded).await;
    let setup = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n---\n\
                 apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: ed, namespace: team}\n\
                 roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}\n\
                 subjects: [{kind: User, name: ed, apiGroup: rbac.authorization.k8s.io}]\n";
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(setup)).await;
    assert!(ok, "{err}");
    let review = |meta_ns: Option<&str>, spec_ns: &str| {
        let meta = meta_ns.map(|n| format!(r#""metadata":{{"namespace":"{n}"}},"#)).unwrap_or_default();
        format!(
            r#"{{"apiVersion":"authorization.k8s.io/v1","kind":"LocalSubjectAccessReview",{meta}"spec":{{"user":"ed","resourceAttributes":{{"namespace":"{spec_ns}","verb":"create","resource":"configmaps"}}}}}}"#
        )
    };
    let post = |url_ns: &'static str, body: String| {
        let s = &s;
        async move {
            let uri = format!("/apis/authorization.k8s.io/v1/namespaces/{url_ns}/localsubjectaccessreviews");
            s.kubectl_stdin(&["create", "--raw", &uri, "-f", "-"], Some(&body)).await
        }
    };
    let allowed = |out: &str| serde_json::from_str::<serde_json::Value>(out).ok().and_then(|v| v["status"]["allowed"].as_bool());

    // Consistent: judged in team, where ed may edit.
    let (ok, out, err) = post("team", review(Some("team"), "team")).await;
    assert!(ok && allowed(&out) == Some(true), "{out}{err}");
    // No metadata.namespace: the URL's is taken.
    let (ok, out, err) = post("team", review(None, "team")).await;
    assert!(ok && allowed(&out) == Some(true), "{out}{err}");
    let (ok, out, err) = post("default", review(None, "default")).await;
    assert!(ok && allowed(&out) == Some(false), "ed may not edit in default: {out}{err}");

    // The body names another namespace than the URL: 400.
    let (ok, out, err) = post("team", review(Some("default"), "default")).await;
    assert!(!ok, "must be refused: {out}");
    assert!(err.contains("the namespace of the provided object does not match the namespace sent on the request"), "{err}");
    // The spec asks about another namespace: 422, not an answer for team.
    let (ok, out, err) = post("team", review(Some("team"), "default")).await;
    assert!(!ok, "must be refused: {out}");
    // kubectl words a 422 from its details: kind, name "" and the causes.
    assert!(
        err.contains(r#"The LocalSubjectAccessReview "" is invalid: spec.resourceAttributes.namespace: Invalid value: "default": must match metadata.namespace"#),
        "{err}"
    );
    let (ok, _, err) = post("team", review(None, "")).await;
    assert!(!ok && err.contains("must match metadata.namespace"), "an empty spec namespace is not the URL's: {err}");

    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_pods_are_judged_like_anyone_elses() {
    let s = TestServer::start(Backend::Embedded).await;
    let controllers = s.start_controllers().await;
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: locked, labels: {pod-security.kubernetes.io/enforce: restricted}}\n";
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(ns)).await;
    assert!(ok, "{err}");
    // Warned at once; its ReplicaSet's pods are then refused, which the
    // ReplicaSet controller reports as upstream's does (FailedCreate).
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&workload("Deployment", "locked", "web", BARE))).await;
    assert!(ok && warnings(&err).len() == 1, "{err}");
    let (ok, _, err) = s.kubectl_stdin(&["apply", "-f", "-"], Some(&workload("Deployment", "locked", "safe", LOCKED))).await;
    assert!(ok && warnings(&err).is_empty(), "{err}");
    let events = || async {
        let (_, out, _) = s.kubectl(&["get", "events", "-n", "locked", "-o", "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}"]).await;
        out
    };
    let refused = common::eventually(30, || async {
        // Upstream's text alone: `Error creating: pods "web-…" is forbidden: …`,
        // no client-library dump of the Status after it.
        events().await.lines().any(|l| {
            l.starts_with("FailedCreate: Error creating: pods \"web-")
                && l.contains("\" is forbidden: violates PodSecurity \"restricted:latest\": allowPrivilegeEscalation != false")
                && !l.contains("Status {")
        })
    })
    .await;
    assert!(refused, "the ReplicaSet controller's FailedCreate event: {}", events().await);
    let conforming = common::eventually(30, || async {
        let (_, out, _) = s.kubectl(&["get", "pods", "-n", "locked", "-o", "name"]).await;
        out.lines().count() == 1 && out.contains("pod/safe-")
    })
    .await;
    let (_, pods, _) = s.kubectl(&["get", "pods", "-n", "locked", "-o", "name"]).await;
    assert!(conforming, "only the conforming Deployment's pod exists: {pods}");
    controllers.abort();
    s.shutdown().await;
}
