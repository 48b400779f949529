//! Privileged: the agent as the DaemonSet runs it, against our apiserver.
//!
//! Everything happens in a network namespace this test creates. The agent
//! gets no kubeconfig at all — only what a pod has: a service-account token,
//! CA and namespace at /var/run/secrets/kubernetes.io/serviceaccount (bind
//! mounted in a private mount namespace, `unshare -m`, over a tmpfs /run),
//! KUBERNETES_SERVICE_HOST/PORT, the manifest's container args and its
//! ConfigMap as --config-dir. It must sync a Service into its maps (read back
//! with `riptide service list`), claim a podCIDR through the fallback
//! (Node.spec.podCIDR absent), route to the peer node, and answer the
//! probes. The init container's `install-cni` (manifest args) installs a
//! plugin whose STATUS sees the agent's podCIDR file and pins; the uninstall
//! manifest's `riptide-agent uninstall` then removes conflist, routes, pins
//! and run dir (and a second run removes nothing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use riptide_tests::{
    e2e::Metrics,
    lab::{CGROUP2_ROOT, PIN_ROOT},
    manifests::{self, Apiserver, TempDir, bin, find, load_yaml},
    netns,
};
use serde_json::Value;
use riptide_test_support::privileged;

const NODE_IP: &str = "198.18.251.1";
const PEER_IP: &str = "198.18.251.2";
const PEER_CIDR: &str = "10.42.0.0/24";

/// Everything the test made; removed on drop, also after a failed assert.
struct Env {
    ns: String,
    node: String,
    cgroup: PathBuf,
    agent: Option<Child>,
    api: Option<Apiserver>,
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        let pid = std::process::id();
        let ns = format!("rtmi-{pid}");
        let dir = TempDir::new("incluster").unwrap();
        netns::ip(&["netns", "add", &ns]).unwrap();
        let env = Self { node: ns.clone(), cgroup: Path::new(CGROUP2_ROOT).join(&ns), ns, agent: None, api: None, dir };
        std::fs::create_dir_all(&env.cgroup).unwrap();
        netns::ip(&["-n", &env.ns, "link", "set", "lo", "up"]).unwrap();
        // The node's underlay: the peer's address must be on-link for the
        // route to its podCIDR.
        netns::ip(&["-n", &env.ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1"]).unwrap();
        netns::ip(&["-n", &env.ns, "link", "set", "ul1", "up"]).unwrap();
        netns::ip(&["-n", &env.ns, "addr", "add", &format!("{NODE_IP}/24"), "dev", "ul0"]).unwrap();
        netns::ip(&["-n", &env.ns, "link", "set", "ul0", "up"]).unwrap();
        env
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns::command(&self.ns, program).unwrap()
    }

    fn api(&self) -> &Apiserver {
        self.api.as_ref().unwrap()
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.api().kubectl_with(self.cmd("kubectl"), args, stdin).unwrap()
    }

    fn riptide(&self, args: &[&str]) -> Option<Value> {
        let out = Command::new(bin("riptide").unwrap())
            .arg("--socket")
            .arg(self.path(&format!("run/{}/agent.sock", self.node)))
            .args(args)
            .args(["-o", "json"])
            .output()
            .ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if check() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for: {what}\nagent log:\n{}\napiserver log tail:\n{}", self.agent_log(), tail(&self.api().log(), 20));
    }

    fn routes(&self) -> String {
        let out = self.cmd("ip").args(["route", "show", "proto", "201"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.api.take();
        let _ = netns::ip(&["netns", "del", &self.ns]);
        let _ = std::fs::remove_dir_all(Path::new(PIN_ROOT).join(&self.node));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// GET `path` on 127.0.0.1:`port` inside netns `ns`; the status code and
/// the whole response.
fn http_get(ns: &str, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_owned();
    netns::run_in(ns, move || -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        Some((buf.split_whitespace().nth(1)?.parse().ok()?, buf))
    })
    .ok()
    .flatten()
}

fn http_status(ns: &str, port: u16, path: &str) -> Option<u16> {
    http_get(ns, port, path).map(|(code, _)| code)
}

/// A container's command + args from a manifest, with the pod's
/// substitutions and host paths mapped into the test's directory.
fn container_argv(c: &Value, map: &[(&str, String)]) -> Vec<String> {
    c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().unwrap())
        .map(|a| {
            let mut s = a.as_str().unwrap().to_owned();
            for (from, to) in map {
                s = s.replace(from, to);
            }
            s
        })
        .collect()
}

/// The plugin's STATUS with the conflist's entry as the runtime sends it.
fn cni_status(env: &Env, plugin: &Path, conflist: &Value) -> (bool, String) {
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    let mut child = env
        .cmd(plugin)
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", plugin.parent().unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn netns_agent_in_cluster_config_syncs_then_uninstalls() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut env = Env::new();
    let node = env.node.clone();
    let peer = format!("{node}-peer");

    // Apiserver in the netns; the second token is the service account's.
    let tokens = env.path("tokens.csv");
    let sa_token = format!("sa-{}-token", std::process::id());
    std::fs::write(
        &tokens,
        format!("admin-{0}-token,admin,admin,\"system:masters\"\n{sa_token},system:serviceaccount:riptide-system:riptide-agent,sa-uid\n", std::process::id()),
    )
    .unwrap();
    env.api = Some(
        Apiserver::start_with(env.cmd(bin("riptide-controlplane").unwrap()), env.dir.path(), Some(&tokens)).unwrap(),
    );
    let port = env.api().port;

    // What the kubelet mounts into every pod of the service account.
    let sa = env.path("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), &sa_token).unwrap();
    std::fs::copy(&env.api().ca, sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), "riptide-system").unwrap();

    // The manifest's ConfigMap as its volume would hold it; socket LB on a
    // cgroup of this test, and the podCIDR fallback sooner than in a cluster.
    let objs = load_yaml(&manifests::manifest("riptide.yaml")).unwrap();
    let cm = find(&objs, "ConfigMap", "riptide-config").unwrap();
    let config = env.path("config");
    std::fs::create_dir_all(&config).unwrap();
    for (k, v) in cm["data"].as_object().unwrap() {
        let v = match k.as_str() {
            "cgroup-root" => env.cgroup.display().to_string(),
            "pod-cidr-fallback-after" => "1".into(),
            _ => v.as_str().unwrap().to_owned(),
        };
        std::fs::write(config.join(k), v).unwrap();
    }
    assert_eq!(cm["data"]["socket-lb"], "true");

    // The cluster: this node without podCIDR (no IPAM), a peer with one.
    env.kubectl(&["apply", "-f", "-"], Some(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n")));
    env.kubectl(
        &["apply", "-f", "-"],
        Some(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {peer}}}\nspec: {{podCIDR: {PEER_CIDR}, podCIDRs: [{PEER_CIDR}]}}\n")),
    );
    for (n, ip) in [(&node, NODE_IP), (&peer, PEER_IP)] {
        let patch = format!(r#"{{"status":{{"addresses":[{{"type":"InternalIP","address":"{ip}"}}]}}}}"#);
        env.kubectl(&["patch", "node", n, "--subresource=status", "--type=merge", "-p", &patch], None);
    }
    env.kubectl(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n"),
    );
    env.kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [10.42.0.7]\n  nodeName: {peer}\n  conditions: {{ready: true, serving: true, terminating: false}}\n"
        )),
    );
    // The manifest's identity and RBAC, which the apiserver enforces. The
    // binding comes once the agent has shown how it fails without it.
    for (kind, name) in [("Namespace", "riptide-system"), ("ServiceAccount", "riptide-agent"), ("ClusterRole", "riptide-agent")] {
        env.kubectl(&["apply", "-f", "-"], Some(&find(&objs, kind, name).unwrap().to_string()));
    }
    let svc = env.api().kubectl_with(env.cmd("kubectl"), &["get", "service", "web", "-o", "json"], None).unwrap();
    let cluster_ip = serde_json::from_str::<Value>(&svc).unwrap()["spec"]["clusterIP"].as_str().unwrap().to_owned();

    // The init container: install-cni with the manifest's args.
    let ds = find(&objs, "DaemonSet", "riptide-agent").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    let root = env.dir.path().display().to_string();
    let map = vec![
        ("$(NODE_NAME)", node.clone()),
        ("$(HOST_IP)", "127.0.0.1".to_owned()),
        ("/etc/riptide/config", config.display().to_string()),
        ("/usr/local/bin/riptide-cni", bin("riptide-cni").unwrap().display().to_string()),
        ("/host/opt/cni/bin", format!("{root}/opt-cni-bin")),
        ("/host/etc/cni/net.d", format!("{root}/cni-conf")),
        ("/run/riptide", format!("{root}/run")),
    ];
    let init = pod["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "install-cni").unwrap();
    let argv = container_argv(init, &map);
    assert_eq!(&argv[..2], ["riptide-agent", "install-cni"]);
    let st = Command::new(bin("riptide-agent").unwrap())
        .args(&argv[1..])
        .arg(format!("--cni-state-dir={root}/cni-state"))
        .status()
        .unwrap();
    assert!(st.success(), "install-cni failed");
    let plugin = env.path("opt-cni-bin/riptide");
    let conflist_path = env.path("cni-conf/10-riptide.conflist");
    let conflist: Value = serde_json::from_str(&std::fs::read_to_string(&conflist_path).unwrap()).unwrap();
    let p = &conflist["plugins"][0];
    assert_eq!(p["type"], "riptide");
    assert_eq!(p["nodeName"], node.as_str());
    assert_eq!(p["clusterCIDR"], "10.42.0.0/16");
    assert_eq!(p["podCIDRFile"], format!("{root}/run/{node}/podcidr"));
    let version = Command::new(&plugin).env("CNI_COMMAND", "VERSION").stdin(Stdio::null()).output().unwrap();
    let version: Value = serde_json::from_slice(&version.stdout).unwrap();
    assert_eq!(version["cniVersion"], "1.1.0", "the installed plugin is riptide-cni");
    let (ok, out) = cni_status(&env, &plugin, &conflist);
    assert!(!ok, "STATUS before the agent ran must fail (no podCIDR, no pins): {out}");

    // The agent container: manifest args, in-cluster environment only.
    let agent = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "agent").unwrap();
    let argv = container_argv(agent, &map);
    assert_eq!(argv[0], "riptide-agent");
    let metrics_port: u16 = argv.iter().find_map(|a| a.strip_prefix("--metrics-addr=127.0.0.1:")).unwrap().parse().unwrap();
    let home = env.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let log = std::fs::File::create(env.path("agent.log")).unwrap();
    let script = r#"set -e
mount -t tmpfs -o size=1m,mode=755 riptide-test-run /run
mkdir -p /run/secrets/kubernetes.io/serviceaccount
mount --bind "$SA_DIR" /var/run/secrets/kubernetes.io/serviceaccount
exec "$@""#;
    let child = env
        .cmd("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(bin("riptide-agent").unwrap())
        .args(&argv[1..])
        .arg(format!("--api-socket={root}/run/{node}/agent.sock"))
        .arg(format!("--pod-cidr-file={root}/run/{node}/podcidr"))
        .env_remove("KUBECONFIG")
        .env_remove("RIPTIDE_CONFIG_DIR")
        .env("HOME", &home)
        .env("SA_DIR", &sa)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", port.to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    env.agent = Some(child);

    // Without its ClusterRoleBinding the agent fails cleanly: not ready, a
    // log line naming the refused call, and the watch error counter — then
    // it recovers by itself once the binding exists (the agent works with
    // exactly the manifest's ClusterRole, below).
    env.eventually("a forbidden watch in the log", || {
        env.agent_log().lines().any(|l| l.contains("watch failed") && l.contains("forbidden") && l.contains("services"))
    });
    env.eventually("watch errors counted", || {
        http_get(&env.ns, metrics_port, "/metrics").is_some_and(|(_, response)| {
            let text = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
            let metrics = Metrics { source: format!("http://127.0.0.1:{metrics_port}/metrics in netns {}", env.ns), text };
            metrics.sum("riptide_agent_watch_errors_total", &[("kind", "services")]).is_ok_and(|v| v >= 1.0)
        })
    });
    assert!(env.riptide(&["status"]).is_none(), "`riptide status` must fail while the agent cannot watch");
    assert_ne!(http_status(&env.ns, metrics_port, "/readyz"), Some(200), "not ready without RBAC");
    env.kubectl(&["apply", "-f", "-"], Some(&find(&objs, "ClusterRoleBinding", "riptide-agent").unwrap().to_string()));

    env.eventually("the Service's ClusterIP with its backend in the maps", || {
        env.riptide(&["service", "list"]).and_then(|v| v.as_array().cloned()).is_some_and(|l| {
            l.iter().any(|f| {
                f["ip"] == cluster_ip.as_str()
                    && f["port"] == 80
                    && f["backends"].as_array().is_some_and(|b| b.len() == 1 && b[0]["addr"] == "10.42.0.7:8080")
            })
        })
    });
    // `riptide status` exits non-zero until ready, so ready comes first.
    env.eventually("ready", || env.riptide(&["status"]).is_some_and(|s| s["ready"] == true));
    let status = env.riptide(&["status"]).unwrap();
    assert_eq!(status["kubernetes"], true, "connected through the in-cluster config: {status}");
    assert!(status["attachments"].as_array().unwrap().iter().any(|a| a.as_str().unwrap().starts_with("socket-lb:")), "{status}");
    // The DaemonSet's probes.
    assert_eq!(http_status(&env.ns, metrics_port, "/healthz"), Some(200));
    assert_eq!(http_status(&env.ns, metrics_port, "/readyz"), Some(200));

    // podCIDR fallback: the lowest /24 the peer does not hold, claimed on
    // our Node (RBAC patch), handed to the CNI; route to the peer.
    env.eventually("podCIDR claimed and written for the CNI", || {
        std::fs::read_to_string(env.path(&format!("run/{node}/podcidr"))).is_ok_and(|s| s.trim() == "10.42.1.0/24")
    });
    let me: Value = serde_json::from_str(&env.kubectl(&["get", "node", &node, "-o", "json"], None)).unwrap();
    assert_eq!(me["metadata"]["annotations"]["riptide.io/pod-cidr"], "10.42.1.0/24");
    env.eventually("route to the peer's podCIDR", || env.routes().contains(&format!("{PEER_CIDR} via {PEER_IP}")));
    let (ok, out) = cni_status(&env, &plugin, &conflist);
    assert!(ok, "the installed plugin sees the agent's podCIDR file and pins: {out}");

    // Stop the agent (as `kubectl delete -f riptide.yaml` does); pins stay.
    let mut agent = env.agent.take().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    assert!(agent.wait().unwrap().success(), "agent exits cleanly on SIGTERM:\n{}", env.agent_log());
    let pins = Path::new(PIN_ROOT).join(&node);
    assert!(pins.exists(), "pins outlive the agent");
    assert!(env.routes().contains(PEER_CIDR));

    // The uninstall manifest's command.
    let un = load_yaml(&manifests::manifest("riptide-uninstall.yaml")).unwrap();
    let un_pod = &find(&un, "DaemonSet", "riptide-uninstall").unwrap()["spec"]["template"]["spec"];
    let argv = container_argv(&un_pod["initContainers"][0], &map);
    assert_eq!(&argv[..2], ["riptide-agent", "uninstall"]);
    let uninstall = || -> Value {
        let out = env.cmd(bin("riptide-agent").unwrap()).args(&argv[1..]).output().unwrap();
        assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
        // Log lines first (tracing writes to stdout), the report last.
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let report = uninstall();
    assert_eq!(report["conflist_removed"], true, "{report}");
    assert_eq!(report["routes_removed"], serde_json::json!([PEER_CIDR]), "{report}");
    assert_eq!(report["pins_removed"], true, "{report}");
    assert_eq!(report["run_dir_removed"], true, "{report}");
    assert!(!conflist_path.exists());
    assert!(!pins.exists(), "pins (and with them the pinned links) gone");
    assert!(env.routes().trim().is_empty(), "riptide routes left: {}", env.routes());
    assert!(!env.path(&format!("run/{node}")).exists());
    assert!(plugin.exists(), "the plugin stays for pods that still use it");
    let (ok, out) = cni_status(&env, &plugin, &conflist);
    assert!(!ok, "STATUS after uninstall must fail: {out}");
    // Idempotent.
    let again = uninstall();
    assert_eq!(
        again,
        serde_json::json!({"conflist_removed": false, "plugin_removed": false, "routes_removed": [], "pins_removed": false, "run_dir_removed": false})
    );
}
