//! manifests/*.yaml are valid Kubernetes objects: real kubectl applies them
//! to riptide's apiserver (server-side dry run, then for real, then again
//! unchanged), and the objects that come back carry what a node needs —
//! RBAC verbs, hostPath mounts and propagation, tolerations, probes on the
//! agent's metrics port, priority class, the CNI installer init container.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use riptide_agent::install::Subcommand;
use riptide_tests::manifests::{self, Apiserver, TempDir, find, load_yaml, permissions};
use serde_json::Value;

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

/// `--flag=value` of a container's args.
fn arg<'a>(c: &'a Value, flag: &str) -> Option<&'a str> {
    c["args"].as_array()?.iter().filter_map(Value::as_str).find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

/// The Namespace documents of a file, created for real first: a server
/// dry run of namespaced objects in a namespace that does not exist yet
/// fails with NotFound, on kube-apiserver too.
fn create_namespaces(api: &Apiserver, file: &str) {
    for o in load_yaml(&manifests::manifest(file)).unwrap().iter().filter(|o| o["kind"] == "Namespace") {
        api.kubectl(&["apply", "-f", "-"], Some(&o.to_string())).unwrap();
    }
}

fn check_daemonset(ds: &Value, cm: &Value) {
    let spec = &ds["spec"];
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    let sel = &spec["selector"]["matchLabels"];
    for (k, v) in sel.as_object().unwrap() {
        assert_eq!(&spec["template"]["metadata"]["labels"][k], v, "selector matches the template");
    }
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true, "sockdiag opens /proc/<pid>/ns/net of the pods' pids");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["serviceAccountName"], "riptide-agent");
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]), "runs on every node whatever its taints");

    // Volumes: host paths by volume name.
    let host: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    for p in ["/sys/fs/bpf", "/sys/fs/cgroup", "/run/riptide", "/opt/cni/bin", "/etc/cni/net.d"] {
        assert!(host.values().any(|h| *h == p), "hostPath {p} missing: {host:?}");
    }
    let cm_vol = pod["volumes"].as_array().unwrap().iter().find(|v| v["configMap"].is_object()).unwrap();
    assert_eq!(cm_vol["configMap"]["name"], cm["metadata"]["name"]);

    // Mounts: container path → (host path, propagation).
    let mounts = |c: &Value| -> BTreeMap<String, (String, String)> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let name = m["name"].as_str().unwrap();
                let src = host.get(name).map_or_else(|| format!("volume:{name}"), |h| (*h).to_owned());
                (m["mountPath"].as_str().unwrap().to_owned(), (src, m["mountPropagation"].as_str().unwrap_or("None").to_owned()))
            })
            .collect()
    };

    let agent = by_name(&pod["containers"], "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    let m = mounts(agent);
    assert_eq!(m["/sys/fs/bpf"], ("/sys/fs/bpf".into(), "Bidirectional".into()), "pins must be the host's bpffs");
    let cg_root = cm["data"]["cgroup-root"].as_str().unwrap();
    let (cg_mount, (cg_host, _)) = m.iter().find(|(_, (h, _))| h == "/sys/fs/cgroup").expect("cgroup2 mounted");
    assert!(cg_root.starts_with(cg_mount.as_str()), "socket LB's cgroup-root {cg_root} lies in the host cgroup mount {cg_mount} ({cg_host})");
    assert_eq!(m["/run/riptide"].0, "/run/riptide", "podCIDR file and CLI socket at the host path the conflist names");
    assert!(m.contains_key("/etc/riptide/config"));
    assert_eq!(arg(agent, "--config-dir"), Some("/etc/riptide/config"));
    assert_eq!(arg(agent, "--node-name"), Some("$(NODE_NAME)"));

    let env = |c: &Value, name: &str| by_name(&c["env"], name).clone();
    assert_eq!(env(agent, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert_eq!(env(agent, "HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    for (var, key) in [("KUBERNETES_SERVICE_HOST", "k8s-service-host"), ("KUBERNETES_SERVICE_PORT", "k8s-service-port")] {
        let r = &env(agent, var)["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["name"], cm["metadata"]["name"]);
        assert_eq!(r["key"], key);
        assert_eq!(r["optional"], true, "absent keys keep the kubelet's own {var}");
    }

    // Probes hit the agent's metrics listener on the node address.
    let metrics = arg(agent, "--metrics-addr").unwrap();
    assert_eq!(metrics, "$(HOST_IP):9962");
    let port = metrics.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(agent[probe]["httpGet"]["path"], path);
        assert_eq!(agent[probe]["httpGet"]["port"].as_u64(), Some(port), "{probe} port");
    }
    assert!(agent["resources"]["requests"]["cpu"].is_string());
    assert!(agent["resources"]["requests"]["memory"].is_string());

    // The CNI installer, as the real parser of `riptide-agent install-cni` reads it.
    let init = by_name(&pod["initContainers"], "install-cni");
    assert_eq!(init["securityContext"]["privileged"], true);
    let m = mounts(init);
    assert_eq!(m["/host/opt/cni/bin"].0, "/opt/cni/bin");
    assert_eq!(m["/host/etc/cni/net.d"].0, "/etc/cni/net.d");
    let mut argv: Vec<std::ffi::OsString> = init["command"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
    argv.extend(init["args"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().replace("$(NODE_NAME)", "node-a").into()));
    match Subcommand::from_argv(&argv).expect("install-cni is a subcommand").expect("its args parse") {
        Subcommand::InstallCni(i) => {
            assert_eq!(i.cni_bin_dir, std::path::Path::new("/host/opt/cni/bin"));
            assert_eq!(i.cni_conf_dir, std::path::Path::new("/host/etc/cni/net.d"));
            assert_eq!(i.conflist_name, "10-riptide.conflist");
            let data: BTreeMap<String, String> = serde_json::from_value(cm["data"].clone()).unwrap();
            let c = i.conflist_with(&data).unwrap();
            assert_eq!(c["plugins"][0]["podCIDRFile"], "/run/riptide/node-a/podcidr");
            assert_eq!(c["plugins"][0]["clusterCIDR"], cm["data"]["cluster-cidr"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn manifests_apply_to_the_apiserver_and_come_back_complete() {
    let dir = TempDir::new("manifests-apply").unwrap();
    let api = Apiserver::start(dir.path()).unwrap();
    let file = manifests::manifest("riptide.yaml");
    let file = file.to_str().unwrap();
    let local = load_yaml(&manifests::manifest("riptide.yaml")).unwrap();

    create_namespaces(&api, "riptide.yaml");
    // Server-side dry run: every object validated (strict field validation,
    // typed decode, defaults) and returned, nothing stored.
    let dry: Value = serde_json::from_str(&api.kubectl(&["apply", "--dry-run=server", "-f", file, "-o", "json"], None).unwrap()).unwrap();
    let items = dry["items"].as_array().unwrap();
    let kinds: Vec<&str> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]);
    let dry_ds = items.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    assert_eq!(dry_ds["spec"]["template"]["spec"]["restartPolicy"], "Always", "defaults applied by the server");
    assert!(
        api.get_json(&["daemonsets", "-n", "riptide-system"]).unwrap()["items"].as_array().unwrap().is_empty(),
        "a dry run stores nothing"
    );

    let out = api.kubectl(&["apply", "-f", file], None).unwrap();
    for what in ["serviceaccount/riptide-agent", "clusterrole.rbac.authorization.k8s.io/riptide-agent", "daemonset.apps/riptide-agent"] {
        assert!(out.contains(&format!("{what} created")), "{out}");
    }
    // What the server stored.
    let role = api.get_json(&["clusterrole", "riptide-agent"]).unwrap();
    assert_eq!(
        permissions(&role["rules"]).unwrap(),
        permissions(&find(&local, "ClusterRole", "riptide-agent").unwrap()["rules"]).unwrap()
    );
    let binding = api.get_json(&["clusterrolebinding", "riptide-agent"]).unwrap();
    assert_eq!(binding["subjects"][0]["namespace"], "riptide-system");
    api.get_json(&["serviceaccount", "riptide-agent", "-n", "riptide-system"]).unwrap();
    let cm = api.get_json(&["configmap", "riptide-config", "-n", "riptide-system"]).unwrap();
    assert_eq!(cm["data"]["cluster-cidr"], "10.42.0.0/16");
    assert_eq!(cm["data"]["routing-mode"], "native");
    assert_eq!(cm["data"]["socket-lb"], "true");
    assert_eq!(cm["data"]["masquerade"], "true");
    let ds = api.get_json(&["daemonset", "riptide-agent", "-n", "riptide-system"]).unwrap();
    assert!(ds["metadata"]["uid"].is_string());
    check_daemonset(&ds, &cm);
    // The dry run returned the same object the real create stored.
    assert_eq!(dry_ds["spec"], ds["spec"]);

    // Re-applying an unchanged file changes nothing (upgrades re-apply).
    let again = api.kubectl(&["apply", "-f", file], None).unwrap();
    assert_eq!(again.matches(" unchanged").count(), 6, "{again}");

    // The documented k3s variant (docs/install-k3s.md) rewrites exactly the
    // two CNI host paths and is still valid.
    let text = std::fs::read_to_string(manifests::manifest("riptide.yaml")).unwrap();
    assert_eq!(text.matches("path: /opt/cni/bin\n").count(), 1);
    assert_eq!(text.matches("path: /etc/cni/net.d\n").count(), 1);
    // sed 's|# k8s-service-host: .*|k8s-service-host: "$API_IP"|' and the port.
    let uncomment = |text: &str, key: &str, value: &str| -> String {
        let pat = format!("# {key}: ");
        assert_eq!(text.matches(&pat).count(), 1, "{pat}");
        text.lines()
            .map(|l| match l.find(&pat) {
                Some(i) => format!("{}{key}: \"{value}\"", &l[..i]),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let k3s = text
        .replace("path: /opt/cni/bin\n", "path: /var/lib/rancher/k3s/data/cni\n")
        .replace("path: /etc/cni/net.d\n", "path: /var/lib/rancher/k3s/agent/etc/cni/net.d\n");
    let k3s = uncomment(&uncomment(&k3s, "k8s-service-host", "192.0.2.10"), "k8s-service-port", "6443");
    let dry: Value = serde_json::from_str(&api.kubectl(&["apply", "--dry-run=server", "-f", "-", "-o", "json"], Some(&k3s)).unwrap()).unwrap();
    let vols = &dry["items"].as_array().unwrap().iter().find(|o| o["kind"] == "DaemonSet").unwrap()["spec"]["template"]["spec"]["volumes"];
    assert_eq!(by_name(vols, "cni-bin")["hostPath"]["path"], "/var/lib/rancher/k3s/data/cni");
    assert_eq!(by_name(vols, "cni-conf")["hostPath"]["path"], "/var/lib/rancher/k3s/agent/etc/cni/net.d");
    let cm = dry["items"].as_array().unwrap().iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    assert_eq!(cm["data"]["k8s-service-host"], "192.0.2.10");
    assert_eq!(cm["data"]["k8s-service-port"], "6443");

    // Deleting the file removes everything, namespace contents included.
    api.kubectl(&["delete", "-f", file, "--wait=true", "--timeout=60s"], None).unwrap();
    assert!(api.kubectl(&["get", "clusterrole", "riptide-agent"], None).is_err());
    assert!(api.kubectl(&["get", "namespace", "riptide-system"], None).is_err(), "{}", api.log());
}

#[test]
fn uninstall_manifest_applies_and_runs_the_uninstaller_everywhere() {
    let dir = TempDir::new("manifests-uninstall").unwrap();
    let api = Apiserver::start(dir.path()).unwrap();
    let file = manifests::manifest("riptide-uninstall.yaml");
    let file = file.to_str().unwrap();
    create_namespaces(&api, "riptide-uninstall.yaml");
    api.kubectl(&["apply", "--dry-run=server", "-f", file], None).unwrap();
    api.kubectl(&["apply", "-f", file], None).unwrap();
    let ds = api.get_json(&["daemonset", "riptide-uninstall", "-n", "riptide-uninstall"]).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"], serde_json::json!([{"operator": "Exists"}]));
    assert_eq!(pod["automountServiceAccountToken"], false);
    let init = by_name(&pod["initContainers"], "uninstall");
    assert_eq!(init["securityContext"]["privileged"], true);
    let mut argv: Vec<std::ffi::OsString> = init["command"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect();
    argv.extend(init["args"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().replace("$(NODE_NAME)", "node-a").into()));
    match Subcommand::from_argv(&argv).expect("uninstall is a subcommand").expect("its args parse") {
        Subcommand::Uninstall(u) => {
            assert_eq!(u.node_name, "node-a");
            assert_eq!(u.cni_conf_dir, std::path::Path::new("/host/etc/cni/net.d"));
            assert_eq!(u.run_dir, std::path::Path::new("/run/riptide"));
            assert!(u.cni_bin_dir.is_none(), "the plugin stays for pods still using it");
        }
        other => panic!("{other:?}"),
    }
    let vols: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    for m in init["volumeMounts"].as_array().unwrap() {
        let host = vols[m["name"].as_str().unwrap()];
        match m["mountPath"].as_str().unwrap() {
            "/sys/fs/bpf" => assert_eq!(host, "/sys/fs/bpf"),
            "/run/riptide" => assert_eq!(host, "/run/riptide"),
            "/host/etc/cni/net.d" => assert_eq!(host, "/etc/cni/net.d"),
            other => panic!("unexpected mount {other}"),
        }
    }
}
