//! The Node authorizer with real kubelet identities (client certificates
//! `system:node:<n>` from `credentials::write_kubelet`) and real requests
//! through kube-rs: a kubelet reads the Secrets and ConfigMaps its own pods
//! use and nothing else, writes its own Node, Lease and its pods' status,
//! and none of another node's, nor creates a Node or Lease under another
//! name (NodeRestriction). `kubectl auth can-i` agrees.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Backend, TestServer};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use riptide_controlplane::credentials;
use serde_json::json;

struct NodeId {
    client: Client,
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn node_identity(s: &TestServer, node: &str) -> NodeId {
    let dir = tempfile::tempdir().unwrap();
    let files = credentials::write_kubelet(s.h().pki.as_ref().unwrap(), &s.h().url, node, "127.0.0.1", dir.path()).unwrap();
    let kc = kube::config::Kubeconfig::read_from(&files.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    NodeId { client: Client::try_from(cfg).unwrap(), kubeconfig: files.kubeconfig, _dir: dir }
}

fn code<T: std::fmt::Debug>(r: kube::Result<T>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

async fn can_i(s: &TestServer, id: &NodeId, args: &[&str]) -> String {
    let out = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&id.kubeconfig)
        .arg("--cache-dir")
        .arg(s.cache.path())
        .args(["auth", "can-i"])
        .args(args)
        .output()
        .await
        .expect("kubectl must be installed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelets_reach_only_their_own_node_and_pods() {
    let s = TestServer::start(Backend::Embedded).await;
    let admin = s.client().await;
    for n in ["n1", "n2"] {
        Api::<Node>::all(admin.clone()).create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await.unwrap();
    }
    let pod = |name: &str, node: &str, secret: &str, cm: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"nodeName": node, "serviceAccountName": "default",
            "containers": [{"name": "c", "image": "x",
                "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}],
                "envFrom": [{"configMapRef": {"name": cm}}]}]}}))
        .unwrap()
    };
    let pods = Api::<Pod>::namespaced(admin.clone(), "default");
    pods.create(&PostParams::default(), &pod("p1", "n1", "s1", "c1")).await.unwrap();
    pods.create(&PostParams::default(), &pod("p2", "n2", "s2", "c2")).await.unwrap();
    for name in ["s1", "s2"] {
        Api::<Secret>::namespaced(admin.clone(), "default").create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"k": "v"}})).unwrap()).await.unwrap();
    }
    for name in ["c1", "c2"] {
        Api::<ConfigMap>::namespaced(admin.clone(), "default").create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).unwrap()).await.unwrap();
    }
    let n1 = node_identity(&s, "n1").await;
    let c = n1.client.clone();

    // Secrets and ConfigMaps: only what its pods reference, only by name.
    let secrets = Api::<Secret>::namespaced(c.clone(), "default");
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "default");
    assert_eq!(code(secrets.get("s1").await), 200, "its pod's secret");
    assert_eq!(code(secrets.get("s2").await), 403, "another node's pod's secret");
    assert_eq!(code(secrets.list(&ListParams::default()).await), 403, "no listing secrets");
    assert_eq!(code(cms.get("c1").await), 200);
    assert_eq!(code(cms.get("c2").await), 403);

    // Pods: reads; status and deletion of its own only.
    let my_pods = Api::<Pod>::namespaced(c.clone(), "default");
    assert_eq!(code(my_pods.list(&ListParams::default().fields("spec.nodeName=n1")).await), 200);
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    assert_eq!(code(my_pods.patch_status("p1", &PatchParams::default(), &running).await), 200);
    assert_eq!(code(my_pods.patch_status("p2", &PatchParams::default(), &running).await), 403);
    assert_eq!(code(my_pods.delete("p2", &Default::default()).await), 403);
    assert_eq!(code(my_pods.create(&PostParams::default(), &pod("p3", "n1", "s1", "c1")).await), 403, "no creating pods");

    // Nodes: read all, write its own.
    let nodes = Api::<Node>::all(c.clone());
    assert_eq!(code(nodes.get("n2").await), 200);
    let label = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    assert_eq!(code(nodes.patch("n1", &PatchParams::default(), &label).await), 200);
    assert_eq!(code(nodes.patch("n2", &PatchParams::default(), &label).await), 403);
    // NodeRestriction: no restricted or foreign kubernetes.io labels, no taint changes —
    // on a patch as on any write — while the admin may set both.
    let steer = Patch::Merge(json!({"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "secure"}}}));
    match nodes.patch("n1", &PatchParams::default(), &steer).await {
        Err(kube::Error::Api(e)) => assert_eq!(
            (e.code, e.message.as_str()),
            (403, "nodes \"n1\" is forbidden: is not allowed to modify labels: node-restriction.kubernetes.io/pool")
        ),
        r => panic!("a kubelet set a node-restriction label: {r:?}"),
    }
    let role = Patch::Merge(json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}));
    assert_eq!(code(nodes.patch("n1", &PatchParams::default(), &role).await), 403);
    let own = Patch::Merge(json!({"metadata": {"labels": {"node.kubernetes.io/instance-type": "lab", "topology.kubernetes.io/zone": "a"}}}));
    assert_eq!(code(nodes.patch("n1", &PatchParams::default(), &own).await), 200, "the kubelet's own labels");
    let admin_nodes = Api::<Node>::all(admin.clone());
    let taint = Patch::Merge(json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}));
    assert_eq!(code(admin_nodes.patch("n1", &PatchParams::default(), &taint).await), 200);
    assert_eq!(code(admin_nodes.patch("n1", &PatchParams::default(), &steer).await), 200, "the admin may");
    match nodes.patch("n1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"taints": null}}))).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.message.as_str()), (403, "nodes \"n1\" is forbidden: node \"n1\" is not allowed to modify taints")),
        r => panic!("a kubelet removed its taint: {r:?}"),
    }
    assert_eq!(code(nodes.patch("n1", &PatchParams::default(), &label).await), 200, "other labels still pass with the taint and restricted label in place");
    let ready = Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
    assert_eq!(code(nodes.patch_status("n1", &PatchParams::default(), &ready).await), 200);
    assert_eq!(code(nodes.patch_status("n2", &PatchParams::default(), &ready).await), 403);
    assert_eq!(code(nodes.delete("n2", &Default::default()).await), 403);
    // NodeRestriction on creates: only under its own name.
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "n9"}})).unwrap();
    match nodes.create(&PostParams::default(), &other).await {
        Err(kube::Error::Api(e)) => assert_eq!((e.code, e.message.as_str()), (403, "nodes \"n9\" is forbidden: node \"n1\" is not allowed to modify node \"n9\"")),
        r => panic!("a kubelet created another node: {r:?}"),
    }

    // Leases: its own in kube-node-lease.
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "kube-node-lease"}})).unwrap())
        .await
        .ok();
    let leases = Api::<Lease>::namespaced(c.clone(), "kube-node-lease");
    let lease = |n: &str| -> Lease { serde_json::from_value(json!({"metadata": {"name": n}, "spec": {"holderIdentity": n}})).unwrap() };
    assert_eq!(code(leases.create(&PostParams::default(), &lease("n1")).await), 200);
    assert_eq!(code(leases.get("n1").await), 200);
    Api::<Lease>::namespaced(admin.clone(), "kube-node-lease").create(&PostParams::default(), &lease("n2")).await.unwrap();
    assert_eq!(code(leases.create(&PostParams::default(), &lease("n3")).await), 403, "no lease under another name");
    assert_eq!(code(leases.get("n2").await), 403);
    assert_eq!(code(leases.patch("n2", &PatchParams::default(), &Patch::Merge(json!({"spec": {"holderIdentity": "n1"}}))).await), 403);
    assert_eq!(code(Api::<Lease>::namespaced(c.clone(), "default").get("n1").await), 403, "only in kube-node-lease");

    // Nothing cluster-admin-like.
    assert_eq!(code(Api::<Secret>::namespaced(c.clone(), "kube-system").list(&ListParams::default()).await), 403);

    // kubectl auth can-i asks the same authorizer.
    assert_eq!(can_i(&s, &n1, &["get", "secret/s1"]).await, "yes");
    assert_eq!(can_i(&s, &n1, &["get", "secret/s2"]).await, "no");
    assert_eq!(can_i(&s, &n1, &["patch", "nodes/n1", "--subresource=status"]).await, "yes");
    assert_eq!(can_i(&s, &n1, &["patch", "nodes/n2", "--subresource=status"]).await, "no");
    assert_eq!(can_i(&s, &n1, &["create", "serviceaccounts/default", "--subresource=token"]).await, "yes", "its pods run as default");
    assert_eq!(can_i(&s, &n1, &["create", "serviceaccounts/other", "--subresource=token"]).await, "no");
    s.shutdown().await;
}
