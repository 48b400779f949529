//! The kubelet runs what install manifests ask, end to end and privileged:
//! a real apiserver process and a real kubelet process on loopback (node
//! address 127.0.0.1, the pods hostNetwork unless a test gives the node a
//! network), real kubectl, pods' processes observed through `kubectl logs`.
//! Each test has its own apiserver, node name, kubelet root and cgroup, so
//! they may run at once; everything is removed on drop (also on panic).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

mod common;

use common::kubelet::Node;
use riptide_test_support::privileged;

/// `name: value` lines of /proc/self/status as a container printed them.
fn status_field<'a>(log: &'a str, field: &str) -> &'a str {
    log.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).map_or("", str::trim)
}

#[test]
fn kubelet_volumes_security_and_service_account_token() {
    let Some(n) = Node::start("v", true, "for mount namespaces, cgroups and setuid") else { return };
    // Something that must stay out of the machine's real /opt/cni/bin.
    let marker = format!("marker-{}", n.node);
    let vols = n.pod_yaml("vols").meta("labels: {app: vols}").spec("");
    n.apply(&format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: app}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg}}
data: {{routing-mode: native, mtu: "1500"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: sec}}
stringData: {{password: hunter2}}
---
{vols}  serviceAccountName: app
  restartPolicy: Never
  securityContext: {{fsGroup: 4321}}
  volumes:
  - {{name: cfg, configMap: {{name: cfg}}}}
  - {{name: sec, secret: {{secretName: sec, defaultMode: 0400}}}}
  - {{name: scratch, emptyDir: {{}}}}
  - {{name: labels, downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: "metadata.labels['app']"}}}}]}}}}
  - {{name: cni-bin, hostPath: {{path: /opt/cni/bin, type: DirectoryOrCreate}}}}
  - {{name: bpffs, hostPath: {{path: /sys/fs/bpf, type: Directory}}}}
  containers:
  - name: main
    image: riptide.test/host:1
    command: ["/bin/sh", "-c"]
    args:
    - |
      cat /etc/riptide/config/routing-mode; echo
      echo "secret=$(cat /secret/password) $(stat -L -c '%a %g' /secret/password)"
      echo "labels=$(cat /labels/labels)"
      echo hi > /scratch/from-main
      touch /host/opt/cni/bin/{marker}
      echo "bpffs=$(stat -f -c %T /sys/fs/bpf)"
      echo "ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace)"
      echo "svchost=$KUBERNETES_SERVICE_HOST"
      grep '^Groups:' /proc/self/status
      SA=/var/run/secrets/kubernetes.io/serviceaccount
      HOME=/tmp kubectl --server={server} --certificate-authority=$SA/ca.crt --token="$(cat $SA/token)" auth whoami -o jsonpath='whoami={{.status.userInfo.username}}{{"\n"}}'
      echo done-main
      sleep 1000
    volumeMounts:
    - {{name: cfg, mountPath: /etc/riptide/config, readOnly: true}}
    - {{name: sec, mountPath: /secret}}
    - {{name: labels, mountPath: /labels}}
    - {{name: scratch, mountPath: /scratch}}
    - {{name: cni-bin, mountPath: /host/opt/cni/bin}}
    - {{name: bpffs, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}}
  - name: restricted
    image: riptide.test/tools:1
    command: ["/bin/sh", "-c"]
    args: ["hello-tool x; ls /usr/local/bin; grep -E '^(Uid|Gid|Groups|CapBnd|CapEff|NoNewPrivs):' /proc/self/status; echo done-restricted; sleep 1000"]
    securityContext:
      runAsUser: 1000
      runAsGroup: 1000
      allowPrivilegeEscalation: false
      capabilities: {{drop: [ALL], add: [NET_BIND_SERVICE]}}
  - name: dns-like
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "grep -E '^(Uid|CapBnd|CapEff|NoNewPrivs):' /proc/self/status; echo done-dns; sleep 1000"]
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {{drop: [ALL], add: [NET_BIND_SERVICE]}}
  - name: default
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "grep -E '^(CapBnd|NoNewPrivs):' /proc/self/status; echo done-default; sleep 1000"]
  - name: privileged
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "grep -E '^CapBnd:' /proc/self/status; ls /scratch; echo done-priv; sleep 1000"]
    securityContext: {{privileged: true}}
    volumeMounts:
    - {{name: scratch, mountPath: /scratch}}
"#,
        server = n.server
    ));
    let main = n.logs_with("vols", "main", "done-main");
    assert!(main.contains("native"), "configMap key as a file:\n{main}");
    assert!(main.contains("secret=hunter2 400 4321"), "secret with defaultMode 0400 and fsGroup:\n{main}");
    assert!(main.contains("labels=vols"), "downwardAPI:\n{main}");
    assert!(main.contains("bpffs=bpf_fs"), "/sys/fs/bpf stays the kernel's:\n{main}");
    assert!(main.contains("ns=default"), "namespace file:\n{main}");
    assert_eq!(status_field(&main, "Groups"), "4321", "fsGroup is a group of root containers too:\n{main}");
    assert!(main.contains("whoami=system:serviceaccount:default:app"), "the mounted token authenticates as the pod's ServiceAccount:\n{main}");
    // hostPath under the node's root, never the machine's.
    assert!(n.node_root().join("opt/cni/bin").join(&marker).exists(), "hostPath resolved under the node root\n{main}");
    assert!(!Path::new("/opt/cni/bin").join(&marker).exists(), "the machine's /opt/cni/bin was touched");
    assert!(!Path::new("/host").exists() && !Path::new("/etc/riptide/config").exists(), "mount points were made on the machine's /");

    let r = n.logs_with("vols", "restricted", "done-restricted");
    assert!(r.contains("hello from the image, args: x"), "the image's binary by name:\n{r}");
    assert!(r.contains("hello-tool"), "the image dir at /usr/local/bin:\n{r}");
    assert!(status_field(&r, "Uid").starts_with("1000\t1000"), "runAsUser:\n{r}");
    assert!(status_field(&r, "Gid").starts_with("1000\t1000"), "runAsGroup:\n{r}");
    assert_eq!(status_field(&r, "Groups"), "4321", "fsGroup as supplementary group:\n{r}");
    assert_eq!(status_field(&r, "CapBnd"), "0000000000000400", "drop ALL + add NET_BIND_SERVICE:\n{r}");
    assert_eq!(status_field(&r, "CapEff"), "0000000000000000", "non-root: no effective caps:\n{r}");
    assert_eq!(status_field(&r, "NoNewPrivs"), "1", "allowPrivilegeEscalation: false:\n{r}");

    let d = n.logs_with("vols", "dns-like", "done-dns");
    assert_eq!(status_field(&d, "CapEff"), "0000000000000400", "root keeps NET_BIND_SERVICE (riptide-dns binds :53):\n{d}");

    let def = n.logs_with("vols", "default", "done-default");
    // containerd's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID
    // SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    assert_eq!(status_field(&def, "CapBnd"), "00000000a80425fb", "default capabilities:\n{def}");
    assert_eq!(status_field(&def, "NoNewPrivs"), "0");

    let p = n.logs_with("vols", "privileged", "done-priv");
    // Every capability the kubelet has (this machine may withhold some).
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(status_field(&p, "CapBnd"), status_field(&own, "CapBnd"), "privileged keeps every capability:\n{p}");
    assert!(p.contains("from-main"), "emptyDir shared between containers:\n{p}");

    // kubectl exec runs as the container's user.
    let (ok, out) = n.kubectl_raw(&["exec", "vols", "-c", "restricted", "--", "id", "-u"], None);
    assert!(ok && out.trim() == "1000", "exec as runAsUser: {out}");
}

/// A pod that is not privileged (root, default capabilities, and also
/// through `kubectl exec`) sees none of the control plane's or the kubelet's
/// secrets, nor another pod's volumes; it still reads its own ServiceAccount
/// token and volumes. A privileged pod sees the node as before.
#[test]
fn kubelet_masks_node_secrets_from_pods() {
    let Some(n) = Node::start("m", true, "for mount namespaces, cgroups and setuid") else { return };
    let (victim, probe_pod, bare) = (n.pod_yaml("victim").spec(""), n.pod_yaml("probe").spec(""), n.pod_yaml("bare").spec(""));
    n.apply(&format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: victim-sec}}
stringData: {{password: victim-password}}
---
{victim}  restartPolicy: Never
  volumes: [{{name: sec, secret: {{secretName: victim-sec}}}}]
  containers:
  - name: main
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "cat /sec/password; echo; echo done-victim; sleep 1000"]
    volumeMounts: [{{name: sec, mountPath: /sec}}]
"#
    ));
    assert!(n.logs_with("victim", "main", "done-victim").contains("victim-password"));
    // The victim's secret as the node stores it.
    let uid = n.pod("victim")["metadata"]["uid"].as_str().unwrap().to_owned();
    let found = Command::new("find").arg(n.root().join("pods").join(&uid)).args(["-name", "password", "-type", "f"]).output().unwrap();
    let victim_secret = String::from_utf8_lossy(&found.stdout).lines().next().unwrap_or_default().to_owned();
    assert!(std::fs::read_to_string(&victim_secret).is_ok_and(|s| s == "victim-password"), "victim's secret on the node: {victim_secret:?}");
    let cp = n.dir.path().join("cp");
    let creds = n.dir.path().join("creds");
    let secrets: Vec<PathBuf> = vec![
        cp.join("pki").join("ca.key"),
        n.kubeconfig.clone(),
        creds.join("kubelet.key"),
        creds.join("kubelet.kubeconfig"),
        PathBuf::from(&victim_secret),
        // Through a host process's root: needs ptrace rights over it.
        Path::new("/proc/1/root").join(cp.join("pki").join("ca.key").strip_prefix("/").unwrap()),
    ];
    for s in &secrets[..5] {
        assert!(s.exists(), "{} exists on the node", s.display());
    }
    let list = secrets.iter().map(|p| format!("\"{}\"", p.display())).collect::<Vec<_>>().join(", ");
    std::fs::create_dir_all(n.node_root().join("etc/cp-test")).unwrap();
    std::fs::write(n.node_root().join("etc/cp-test/marker"), "host-marker").unwrap();
    let probe = r#"for f in "$@"; do if cat "$f" >/dev/null 2>&1; then echo "readable $f"; else echo "hidden $f"; fi; done; echo "token=$(wc -c < /var/run/secrets/kubernetes.io/serviceaccount/token)"; echo "cfg=$(cat /cfg/k)"; echo "sec=$(cat /sec/password)"; echo done-probe; sleep 1000"#;
    n.apply(&format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: own-cfg}}
data: {{k: own-config}}
---
apiVersion: v1
kind: Secret
metadata: {{name: own-sec}}
stringData: {{password: own-password}}
---
{probe_pod}  restartPolicy: Never
  volumes:
  - {{name: cfg, configMap: {{name: own-cfg}}}}
  - {{name: sec, secret: {{secretName: own-sec}}}}
  - {{name: cp, hostPath: {{path: /etc/cp-test, type: DirectoryOrCreate}}}}
  containers:
  - name: main
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {probe:?}, "sh", {list}]
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: sec, mountPath: /sec}}
  - name: priv
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "cat /mnt/cp-test/marker; echo; cat \"$0\" >/dev/null && echo readable-ca; echo done-priv; sleep 1000", {ca:?}]
    securityContext: {{privileged: true}}
    volumeMounts: [{{name: cp, mountPath: /mnt/cp-test}}]
---
{bare}  restartPolicy: Never
  automountServiceAccountToken: false
  containers:
  - name: main
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {probe_bare:?}, "sh", {list}]
"#,
        probe_bare = probe.split("; echo \"token=").next().unwrap().to_owned() + "; echo done-probe; sleep 1000",
        ca = secrets[0].display().to_string(),
    ));
    let out = n.logs_with("probe", "main", "done-probe");
    for s in &secrets {
        assert!(out.contains(&format!("hidden {}", s.display())), "a default pod reads {}:\n{out}", s.display());
    }
    assert!(out.contains("token=") && !out.contains("token=0"), "own ServiceAccount token:\n{out}");
    assert!(out.contains("cfg=own-config") && out.contains("sec=own-password"), "own volumes:\n{out}");
    let bare = n.logs_with("bare", "main", "done-probe");
    for s in &secrets {
        assert!(bare.contains(&format!("hidden {}", s.display())), "a pod without volumes reads {}:\n{bare}", s.display());
    }
    // kubectl exec runs in the container's masked namespace.
    for s in &secrets {
        let (ok, got) = n.kubectl_raw(&["exec", "probe", "-c", "main", "--", "cat", &s.display().to_string()], None);
        assert!(!ok && !got.contains("PRIVATE KEY") && !got.contains("victim-password"), "exec reads {}: {got}", s.display());
    }
    let (ok, got) = n.kubectl_raw(&["exec", "probe", "-c", "main", "--", "cat", "/sec/password"], None);
    assert!(ok && got.contains("own-password"), "exec reads its own secret volume: {got}");
    // The privileged container: its hostPath and the node's files.
    let p = n.logs_with("probe", "priv", "done-priv");
    assert!(p.contains("host-marker") && p.contains("readable-ca"), "privileged container sees the node:\n{p}");
}

#[test]
fn kubelet_init_containers_in_order_with_retry() {
    let Some(n) = Node::start("i", true, "for mount namespaces and cgroups") else { return };
    let (init, blocked) = (n.pod_yaml("init").spec(""), n.pod_yaml("blocked").spec(""));
    n.apply(&format!(
        r#"{init}  volumes: [{{name: work, emptyDir: {{}}}}]
  initContainers:
  - name: first
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "echo first >> /work/order"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  - name: flaky
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "if [ -e /work/tried ]; then echo flaky-ok >> /work/order; else touch /work/tried; echo flaky-fail >> /work/order; exit 3; fi"]
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: app
    image: registry.k8s.io/pause:3.10
  - name: reader
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "echo app >> /work/order; cat /work/order; echo done-reader; sleep 1000"]
    volumeMounts: [{{name: work, mountPath: /work}}]
---
{blocked}  initContainers:
  - {{name: ok, image: "riptide.test/host:1", command: ["true"]}}
  - {{name: fails, image: "riptide.test/host:1", command: ["false"]}}
  containers:
  - {{name: never, image: "riptide.test/host:1", command: ["sleep", "1000"]}}
"#
    ));
    let out = n.logs_with("init", "reader", "done-reader");
    assert!(out.contains("first\nflaky-fail\nflaky-ok\napp\n"), "init containers in order, the failed one retried, then the app:\n{out}");
    let p = n.pod("init");
    let inits = p["status"]["initContainerStatuses"].as_array().cloned().unwrap_or_default();
    assert_eq!(inits.len(), 2, "{p}");
    assert_eq!(inits[0]["state"]["terminated"]["reason"], "Completed", "{p}");
    assert!(inits[1]["restartCount"].as_i64() >= Some(1), "the failed init container restarted: {p}");
    assert_eq!(p["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Initialized").unwrap()["status"], "True");
    // The pause container runs the built-in sleep.
    n.wait("init pod Running with the pause container up", 30, |n| {
        let p = n.pod("init");
        (p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["state"]["running"].is_object()).then_some(())
    });

    // A failing init container blocks the app and shows as Init:… .
    let status = n.wait("blocked pod to show its init state", 30, |n| {
        let (_, out) = n.kubectl_raw(&["get", "pod", "blocked", "--no-headers"], None);
        let p = n.pod("blocked");
        (p["status"]["initContainerStatuses"][1]["restartCount"].as_i64() >= Some(1) && out.contains("Init:")).then_some(out)
    });
    assert!(status.contains("Init:Error") || status.contains("Init:CrashLoopBackOff") || status.contains("Init:1/2"), "{status}");
    let p = n.pod("blocked");
    assert_eq!(p["status"]["phase"], "Pending", "{p}");
    assert_eq!(p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "PodInitializing", "{p}");
    let cond = p["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Initialized").cloned().unwrap();
    assert_eq!(cond["status"], "False");
    assert!(cond["message"].as_str().unwrap_or_default().contains("fails"), "{cond}");
}

#[test]
fn kubelet_unknown_image_is_an_image_pull_error() {
    let Some(n) = Node::start("u", true, "for cgroups") else { return };
    n.apply(&n.pod_yaml("unknown").spec("  containers:\n  - {name: c, image: \"example.invalid/nothing:1\", command: [\"sleep\", \"1000\"]}\n"));
    let waiting = n.wait("an image pull error", 30, |n| {
        let w = n.pod("unknown")["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        w["reason"].as_str().is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff").then_some(w)
    });
    assert!(waiting["message"].as_str().unwrap_or_default().contains("example.invalid/nothing:1"), "{waiting}");
    // Later attempts back off.
    n.wait("ImagePullBackOff", 30, |n| {
        (n.pod("unknown")["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff").then_some(())
    });
    let p = n.pod("unknown");
    assert_eq!(p["status"]["phase"], "Pending", "{p}");
    let cg = n.cgroup.join(format!("pod-{}", p["metadata"]["uid"].as_str().unwrap()));
    assert_eq!(riptide_test_support::cgroup::tree_pids(&cg), Vec::<u32>::new(), "no process may run for an unknown image");
}

#[test]
fn kubelet_node_network_ready_follows_cni_config() {
    let Some(n) = Node::start("n", false, "for network namespaces") else { return };
    let node = n.node.clone();
    let (net, host) = (n.pod_yaml("net").pod_network().spec(""), n.pod_yaml("host").spec(""));
    let ready = |n: &Node| n.json(&["get", "node", &n.node])["status"]["conditions"].as_array().cloned().unwrap_or_default().into_iter().find(|c| c["type"] == "Ready");
    let c = n.wait("NotReady without CNI config", 30, |n| ready(n).filter(|c| c["status"] == "False"));
    let msg = c["message"].as_str().unwrap_or_default();
    assert!(msg.contains("NetworkReady=false") && msg.contains(n.cni_conf().to_str().unwrap()), "{c}");
    let (ok, out) = n.kubectl_raw(&["patch", "node", &node, "-p", r#"{"spec":{"podCIDR":"10.250.0.0/24"}}"#], None);
    assert!(ok, "{out}");
    n.apply(&format!(
        r#"{net}  containers:
  - {{name: c, image: "riptide.test/host:1", command: ["/bin/sh", "-c", "echo port-start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); echo done-net; sleep 1000"]}}
---
{host}  containers:
  - {{name: c, image: "riptide.test/host:1", command: ["sleep", "1000"]}}
"#
    ));
    n.wait("the hostNetwork pod to run", 30, |n| (n.pod("host")["status"]["phase"] == "Running").then_some(()));
    std::thread::sleep(Duration::from_secs(2));
    let p = n.pod("net");
    assert_eq!(p["status"]["phase"], "Pending", "a pod network pod waits for the network: {p}");
    assert!(p["status"]["message"].as_str().unwrap_or_default().contains("NetworkReady=false"), "{p}");
    n.write_conflist();
    n.wait("Ready once the config exists", 20, |n| ready(n).filter(|c| c["status"] == "True"));
    let out = n.logs_with("net", "c", "done-net");
    assert!(out.contains("port-start=0"), "containerd's unprivileged ports in the pod netns:\n{out}");
    assert_eq!(n.pod("net")["status"]["podIP"], "10.250.0.9");
}

impl Node {
    /// `GET https://<node>:<kubelet port><path>` with `token`: the status code.
    fn kubelet_get(&self, path: &str, token: &str) -> u16 {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(self.dir.path().join("creds").join("ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("https://127.0.0.1:{}{path}", self.kubelet_port))
            .output()
            .expect("curl must be installed");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    /// Requests that reached the apiserver so far: (TokenReviews, SubjectAccessReviews).
    fn reviews(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default();
        let count = |uri: &str| log.lines().filter(|l| l.contains(" request ") && l.contains(uri)).count();
        (count("/apis/authentication.k8s.io/v1/tokenreviews"), count("/apis/authorization.k8s.io/v1/subjectaccessreviews"))
    }

    /// A ServiceAccount `name` (with `nodes/proxy` get on every node when
    /// `proxy`) and a token for it.
    fn account_token(&self, name: &str, proxy: bool) -> String {
        let mut yaml = format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: default}}\n");
        if proxy {
            yaml += &format!(
                "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {name}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-proxy}}\nsubjects: [{{kind: ServiceAccount, name: {name}, namespace: default}}]\n"
            );
        }
        self.apply(&yaml);
        let (ok, out) = self.kubectl_raw(&["create", "token", name], None);
        assert!(ok, "{out}");
        out.trim().to_string()
    }
}

#[test]
fn kubelet_api_caches_reviews() {
    if !privileged("for the kubelet's cgroups") {
        return;
    }
    // A short token TTL so revocation can be watched expiring; the
    // decision TTLs stay upstream's (5 min allowed, 30 s denied).
    const TOKEN_TTL: Duration = Duration::from_secs(6);
    let n = Node::up_with("c", false, &["--authentication-token-webhook-cache-ttl", "6s"]);
    n.apply("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: node-proxy}\nrules: [{apiGroups: [''], resources: [nodes/proxy], verbs: [get]}]\n");
    let allowed = n.account_token("scraper", true);
    let denied = n.account_token("nobody", false);

    // Three requests within the TTLs: one TokenReview, one SubjectAccessReview.
    let (t0, s0) = n.reviews();
    assert_eq!([n.kubelet_get("/healthz", &allowed), n.kubelet_get("/healthz", &allowed), n.kubelet_get("/healthz", &allowed)], [200; 3]);
    assert_eq!(n.reviews(), (t0 + 1, s0 + 1), "allowed: reviewed once\n{}", n.log("apiserver"));
    // A denial is cached too (30 s), and so is a token the apiserver rejects.
    assert_eq!([n.kubelet_get("/healthz", &denied), n.kubelet_get("/healthz", &denied)], [403; 2]);
    assert_eq!(n.reviews(), (t0 + 2, s0 + 2), "denied: reviewed once");
    assert_eq!([n.kubelet_get("/healthz", "not-a-token"), n.kubelet_get("/healthz", "not-a-token")], [401; 2]);
    assert_eq!(n.reviews(), (t0 + 3, s0 + 2), "unauthenticated: one TokenReview, no SubjectAccessReview");
    // A different path with the same verb and subresource is the same decision.
    let code = n.kubelet_get("/containerLogs/default/none/c", &allowed);
    assert!(code != 401 && code != 403, "{code}");
    assert_eq!(n.reviews(), (t0 + 3, s0 + 2));

    // Revocation takes up to the token TTL, as upstream documents: the
    // deleted account's token still opens the kubelet from cache, then 401.
    let gone = n.account_token("gone", true);
    let first = Instant::now();
    assert_eq!(n.kubelet_get("/healthz", &gone), 200);
    let (ok, out) = n.kubectl_raw(&["delete", "serviceaccount", "gone"], None);
    assert!(ok, "{out}");
    let (ok, out) = n.kubectl_raw(&["get", "--raw", "/api", "--token", &gone], None);
    assert!(!ok, "the apiserver refuses the revoked token at once: {out}");
    if first.elapsed() < TOKEN_TTL - Duration::from_secs(1) {
        assert_eq!(n.kubelet_get("/healthz", &gone), 200, "within the TTL the cached review stands");
    }
    let refused = n.wait("the revoked token to be refused", 20, |n| (n.kubelet_get("/healthz", &gone) == 401).then(|| first.elapsed()));
    assert!(refused >= TOKEN_TTL, "refused after {refused:?}, before the TTL");
    assert!(refused < TOKEN_TTL + Duration::from_secs(3), "refused only after {refused:?}");
}

/// A process of the node that pods must neither see nor signal; killed on
/// drop.
struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Node paths outside every volume that pods try to write; removed on drop
/// (also what a failed test wrote there).
struct NodePaths {
    dir: PathBuf,
    etc_file: PathBuf,
}

impl Drop for NodePaths {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.etc_file);
    }
}

/// A root pod gets its own PID namespace (its process is PID 1, the node's
/// processes are out of sight and reach, also for `kubectl exec` and exec
/// probes) and the node's filesystem read-only apart from its volumes and
/// scratch (`/tmp`, `/var/tmp`, `/dev/shm`); `readOnlyRootFilesystem`
/// makes the scratch read-only too. `hostPID` shows the node's processes;
/// `shareProcessNamespace` puts the containers in one namespace with a
/// pause process as PID 1 that reaps orphans; a privileged container
/// writes the node but sees its processes only with `hostPID`.
#[test]
fn kubelet_isolates_pod_processes_and_node_filesystem() {
    let Some(n) = Node::start("p", true, "for PID and mount namespaces") else { return };
    let host = HostProcess(Command::new("sleep").arg("1001").spawn().unwrap());
    let hpid = host.0.id();
    let node = n.node.clone();
    let paths = NodePaths { dir: PathBuf::from(format!("/var/lib/riptide-test-{node}")), etc_file: PathBuf::from(format!("/etc/riptide-test-{node}")) };
    std::fs::create_dir_all(&paths.dir).unwrap();
    let (ok, out) = n.kubectl_raw(&["patch", "node", &node, "-p", r#"{"spec":{"podCIDR":"10.250.0.0/24"}}"#], None);
    assert!(ok, "{out}");
    let check = |tag: &str| {
        format!(
            r#"echo "self=$$$$"
if [ -e /proc/{hpid} ]; then echo sees-host; else echo host-hidden; fi
if kill -TERM {hpid} 2>/dev/null; then echo killed-host; else echo cannot-kill; fi
for f in {dir}/{tag} {etc}; do if echo x 2>/dev/null > $f; then echo "wrote $f"; else echo "refused $f"; fi; done
for d in /tmp /var/tmp /dev/shm /work; do if echo x 2>/dev/null > $d/{tag}-{node}; then echo "wrote $d"; else echo "refused $d"; fi; done
if echo x 2>/dev/null > /proc/sys/kernel/hostname; then echo wrote-procsys; else echo refused-procsys; fi
echo done-{tag}
sleep 1000
"#,
            dir = paths.dir.display(),
            etc = paths.etc_file.display()
        )
    };
    let probe = format!("test -e /proc/1 && ! test -e /proc/{hpid}");
    let zombies = r#"(sleep 0.2 &); sleep 1; echo "zombies=$(grep -l '^State:.Z' /proc/[0-9]*/status | wc -l)"; echo "pid1=$(tr '\0' ' ' < /proc/1/cmdline)"; until cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' ' ' | grep -q 'sleep 1002'; do sleep 0.2; done; echo sees-sibling; echo done-b; sleep 1000"#;
    let iso = n.pod_yaml("iso").pod_network().spec(&format!(
        r#"  restartPolicy: Never
  volumes: [{{name: work, emptyDir: {{}}}}]
  containers:
  - name: main
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {main:?}]
    volumeMounts: [{{name: work, mountPath: /work}}]
    readinessProbe: {{exec: {{command: ["/bin/sh", "-c", {probe:?}]}}, periodSeconds: 1}}
  - name: ro
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {ro:?}]
    securityContext: {{readOnlyRootFilesystem: true}}
    volumeMounts: [{{name: work, mountPath: /work}}]
  - name: priv
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {privileged:?}]
    securityContext: {{privileged: true}}
  - name: exits
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "exit 7"]
"#,
        main = check("main"),
        ro = check("ro"),
        privileged = check("priv"),
    ));
    let host_pid = n.pod_yaml("hostpid").spec(&format!(
        "  hostPID: true\n  containers:\n  - {{name: c, image: \"riptide.test/host:1\", command: [\"/bin/sh\", \"-c\", {:?}]}}\n",
        format!("if [ -e /proc/{hpid} ]; then echo sees-host; else echo host-hidden; fi; echo done-hostpid; sleep 1000")
    ));
    let shared = n.pod_yaml("shared").spec(&format!(
        "  shareProcessNamespace: true\n  containers:\n  - {{name: a, image: \"riptide.test/host:1\", command: [sleep, \"1002\"]}}\n  - {{name: b, image: \"riptide.test/host:1\", command: [\"/bin/sh\", \"-c\", {zombies:?}]}}\n"
    ));
    n.apply(&format!("{iso}---\n{host_pid}---\n{shared}"));

    let main = n.logs_with("iso", "main", "done-main");
    for want in ["self=1", "host-hidden", "cannot-kill", "refused-procsys", "wrote /tmp", "wrote /var/tmp", "wrote /dev/shm", "wrote /work"] {
        assert!(main.lines().any(|l| l == want), "root pod: want {want:?}:\n{main}");
    }
    assert!(main.contains(&format!("refused {}/main", paths.dir.display())) && main.contains(&format!("refused {}", paths.etc_file.display())), "root pod writes the node:\n{main}");
    let ro = n.logs_with("iso", "ro", "done-ro");
    for want in ["self=1", "host-hidden", "refused /tmp", "refused /var/tmp", "wrote /dev/shm", "wrote /work"] {
        assert!(ro.lines().any(|l| l == want), "readOnlyRootFilesystem: want {want:?}:\n{ro}");
    }
    let p = n.logs_with("iso", "priv", "done-priv");
    assert!(p.lines().any(|l| l == "host-hidden") && p.lines().any(|l| l == "self=1"), "privileged without hostPID:\n{p}");
    assert!(p.contains(&format!("wrote {}/priv", paths.dir.display())), "privileged writes the node:\n{p}");
    assert!(host.0.id() == hpid && std::fs::metadata(format!("/proc/{hpid}")).is_ok(), "the node's process survived");
    assert!(!paths.dir.join("main").exists() && !paths.dir.join("ro").exists(), "nothing written outside the volumes");
    assert!(!Path::new(&format!("/tmp/main-{node}")).exists(), "the pod's /tmp is its own");
    // Probes and exec run in the pod's PID namespace.
    n.wait("iso main ready (exec probe in the pod's PID namespace)", 30, |n| {
        (n.pod("iso")["status"]["containerStatuses"].as_array()?.iter().find(|c| c["name"] == "main")?["ready"] == true).then_some(())
    });
    let script = format!("echo self=$$; echo pid1=$(tr '\\0' ' ' < /proc/1/cmdline); if [ -e /proc/{hpid} ]; then echo sees-host; else echo host-hidden; fi; cat /tmp/main-{node}");
    let (ok, out) = n.kubectl_raw(&["exec", "iso", "-c", "main", "--", "/bin/sh", "-c", &script], None);
    assert!(ok && out.contains("host-hidden") && out.contains("pid1=/bin/sh -c echo") && !out.contains("self=1\n") && out.contains("x"), "exec in the pod: {out}");
    let exits = n.wait("exit code 7", 30, |n| {
        let s = n.pod("iso")["status"]["containerStatuses"].as_array()?.iter().find(|c| c["name"] == "exits")?.clone();
        s["state"]["terminated"]["exitCode"].as_i64().map(|_| s)
    });
    assert_eq!(exits["state"]["terminated"]["exitCode"], 7, "{exits}");

    let hp = n.logs_with("hostpid", "c", "done-hostpid");
    assert!(hp.lines().any(|l| l == "sees-host"), "hostPID pod:\n{hp}");
    let b = n.logs_with("shared", "b", "done-b");
    assert!(b.contains("sees-sibling") && b.contains("pid1=/proc/self/exe pause") && b.contains("zombies=0"), "shareProcessNamespace:\n{b}");
}

/// A host image's command below the node's `/tmp` (a build tree checked
/// out there) still starts, though the container's `/tmp` is its own: the
/// executable alone is carried into the fresh scratch.
#[test]
fn kubelet_runs_a_host_command_from_under_tmp() {
    let Some(n) = Node::start("t", true, "for mount namespaces") else { return };
    let dir = tempfile::Builder::new().prefix("riptide-cmd-").tempdir_in("/tmp").unwrap();
    let script = dir.path().join("cmd.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"ran-from-tmp $(ls -A /tmp | wc -l)\"\nexec sleep 1000\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cmd = script.display().to_string();
    n.apply(&n.pod_yaml("tmpcmd").spec(&format!("  containers:\n  - {{name: c, image: \"riptide.test/host:1\", command: [{cmd:?}]}}\n")));
    let out = n.logs_with("tmpcmd", "c", "ran-from-tmp");
    // Only the command's own top directory is in the container's /tmp.
    assert!(out.contains("ran-from-tmp 1"), "{out}\n{}", n.diagnostics());
}

/// Graceful deletion: SIGTERM, then SIGKILL after the grace period, also
/// for a PID 1 that has no SIGTERM handler (the kernel drops the signal).
#[test]
fn kubelet_graceful_delete_with_pid_namespaces() {
    let Some(n) = Node::start("g", true, "for PID and mount namespaces") else { return };
    let pod = |name: &str, script: &str| {
        n.pod_yaml(name).spec(&format!(
            r#"  terminationGracePeriodSeconds: 4
  volumes: [{{name: out, hostPath: {{path: /grace-out, type: DirectoryOrCreate}}}}]
  containers:
  - name: c
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {script:?}]
    volumeMounts: [{{name: out, mountPath: /out}}]
"#
        ))
    };
    let handler = pod("handler", "trap 'echo term > /out/handler; exit 0' TERM; echo started; while :; do sleep 0.2; done");
    let ignorer = pod("ignorer", "echo started; while :; do sleep 0.2; done");
    n.apply(&format!("{handler}---\n{ignorer}"));
    n.logs_with("handler", "c", "started");
    n.logs_with("ignorer", "c", "started");
    let t0 = Instant::now();
    let (ok, out) = n.kubectl_raw(&["delete", "pod", "handler", "ignorer", "--wait=false"], None);
    assert!(ok, "{out}");
    let gone = |name: &'static str| move |n: &Node| n.kubectl_raw(&["get", "pod", name], None).1.contains("NotFound").then(|| t0.elapsed());
    let handled = n.wait("the handling pod to be gone", 30, gone("handler"));
    let ignored = n.wait("the ignoring pod to be gone", 30, gone("ignorer"));
    assert!(handled < Duration::from_secs(3), "the SIGTERM handler took {handled:?}");
    let handler = std::fs::read_to_string(n.node_root().join("grace-out/handler")).unwrap_or_default();
    assert_eq!(handler.trim(), "term", "the handling container got SIGTERM");
    assert!(ignored >= Duration::from_millis(3500), "the SIGTERM-ignoring PID 1 lasted only {ignored:?}, not the grace period\n{}", n.log("kubelet"));
    assert!(ignored < Duration::from_secs(10), "the SIGTERM-ignoring PID 1 was killed only after {ignored:?}");
}
