//! Privileged end-to-end suite on a real 3-node lab: control plane, kubelets,
//! agents, riptide-cni and the eBPF datapath, driven with real kubectl and
//! checked with real sockets from pods, nodes and the outside namespace.
//! Modelled on Kubernetes' sig-network e2e tests (agnhost netexec answers).

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_tests::{
    e2e::{self, Curl, KeepAlive, PodInfo, Suite, eventually},
    lab::{Lab, LabConfig},
    netns,
};
use riptide_test_support::privileged;

const SETTLE: Duration = Duration::from_secs(60);

/// `sessionAffinityConfig.clientIP.timeoutSeconds` of the expiry check: short
/// so the check is quick, long enough that back-to-back requests on a busy
/// 2-core machine stay well inside it.
const AFFINITY_TIMEOUT_S: u64 = 3;
/// Idle time that must expire an affinity entry (the datapath compares
/// `now - last_used` with the timeout at lookup, `ebpf/programs/src/lb.rs`).
const AFFINITY_IDLE: Duration = Duration::from_secs(AFFINITY_TIMEOUT_S + 2);
/// Idle+probe cycles before concluding affinity never expires. Each expired
/// lookup picks anew among 3 backends, so a working datapath keeps the old
/// one every time with probability (1/3)^12, about 2e-6.
const AFFINITY_CYCLES: u32 = 12;

/// After `pinned` was answered, idles past the affinity timeout and probes
/// once, until a probe answers someone else: proof the entry expired and
/// the flow was balanced anew. Fails when it never happens.
fn affinity_expires(what: &str, pinned: &str, mut probe: impl FnMut() -> Result<String>) -> Result<u32> {
    for cycle in 1..=AFFINITY_CYCLES {
        std::thread::sleep(AFFINITY_IDLE);
        let now = probe()?;
        if now != pinned {
            eprintln!("     {what}: after idling {AFFINITY_IDLE:?} (cycle {cycle}) {pinned} → {now}");
            return Ok(cycle);
        }
    }
    bail!(
        "{what}: after each of {AFFINITY_CYCLES} idle periods of {AFFINITY_IDLE:?} (timeoutSeconds {AFFINITY_TIMEOUT_S}) the client still reached {pinned}: affinity never expires"
    )
}

/// Opens keep-alive connections with `open` until one reaches a backend on
/// a node other than `not_on` (a flow that crosses the underlay), bounded.
/// Returns the connection, the backend's pod and the `/clientip` it saw.
fn connect_to_remote_backend(
    lab: &Lab,
    what: &str,
    not_on: &str,
    mut open: impl FnMut() -> Result<KeepAlive>,
) -> Result<(KeepAlive, PodInfo, String)> {
    let pods = e2e::pods(lab, "app=demo")?;
    ensure!(pods.iter().any(|p| p.node != not_on), "{what}: every demo pod runs on {not_on}: {pods:?}");
    let mut seen = Vec::new();
    // Each try reaches a remote backend with probability ≥ 1/3.
    for _ in 0..40 {
        let mut k = open()?;
        let host = k.get("/hostname")?;
        let pod = pods.iter().find(|p| p.name == host).with_context(|| format!("{what}: unknown backend {host}"))?;
        if pod.node != not_on {
            let clientip = k.get("/clientip")?;
            eprintln!("     {what}: {} → {} ({} on {}), backend sees {clientip}", k.local, k.peer, pod.name, pod.node);
            return Ok((k, pod.clone(), clientip));
        }
        seen.push(host);
    }
    bail!("{what}: 40 connections all reached backends on {not_on}: {seen:?}")
}

#[test]
fn netns_e2e_services_on_a_three_node_lab() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(3).expect("config")).expect("lab up");
    lab.start_cluster(Duration::from_secs(120)).expect("cluster");
    lab.deploy_demo().expect("demo");
    let mut s = Suite::new(&mut lab);

    s.check("demo pods run on several nodes with addresses from their nodes' /24", |lab| {
        let pods = eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=demo")?;
            ensure!(p.len() == 3 && p.iter().all(|p| p.ready), "pods: {p:?}");
            Ok(p)
        })?;
        let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
        ensure!(nodes.len() >= 2, "replicas not spread: {pods:?}");
        for p in &pods {
            let cidr = e2e::kubectl(lab, &["get", "node", &p.node, "-o", "jsonpath={.spec.podCIDR}"])?;
            let (net, _) = cidr.split_once('/').context("podCIDR")?;
            let net: std::net::Ipv4Addr = net.parse()?;
            ensure!(p.ip.octets()[..3] == net.octets()[..3], "{} has {} outside its node's {cidr}", p.name, p.ip);
        }
        Ok(())
    });

    s.check("pod to pod, same node and across nodes, without NAT", |lab| {
        let pods = e2e::pods(lab, "app=demo")?;
        for a in &pods {
            for b in &pods {
                let url = format!("http://{}:8080/clientip", b.ip);
                let seen = eventually(Duration::from_secs(10), || e2e::pod_curl(lab, &a.name, &url, 3)?.ok())?;
                ensure!(seen.starts_with(&format!("{}:", a.ip)), "{} → {}: backend saw {seen}", a.name, b.name);
            }
        }
        Ok(())
    });

    s.check("ClusterIP over TCP reaches every endpoint from a pod", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.check("ClusterIP keeps the client pod's source address", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let seen = e2e::pod_curl(lab, &pods[1].name, &format!("http://{cip}/clientip"), 3)?.ok()?;
        ensure!(seen.starts_with(&format!("{}:", pods[1].ip)), "backend saw {seen}, client is {}", pods[1].ip);
        Ok(())
    });

    s.check("ClusterIP over UDP (named targetPort) answers from every endpoint", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::udp_dial_hostnames(lab, &pods[0].name, cip, 81, 30)?;
            ensure!(got.hostnames == want, "UDP hostnames {:?}, want {want:?} (netexec: {:?})", got.hostnames, got.errors);
            Ok(())
        })
    });

    s.check("ClusterIP from a node (socket LB on the node's cgroup)", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        eventually(SETTLE, || e2e::node_curl(lab, 1, &format!("http://{cip}/hostname"), 3)?.ok()).map(|_| ())
    });

    s.check("pods reach the apiserver through the kubernetes Service (in-cluster environment)", |lab| {
        let ep = e2e::kubectl(lab, &["get", "endpointslice", "kubernetes", "-o", "jsonpath={.endpoints[0].addresses[0]}:{.ports[0].port}"])?;
        ensure!(ep == format!("{}:6443", lab.config().host_ip()), "kubernetes EndpointSlice names {ep:?}");
        let pods = e2e::pods(lab, "app=demo")?;
        for p in &pods {
            // As client-go's in-cluster config does: the Service from the
            // environment kubectl exec gives (the container's).
            let script = "curl -sSk -m 5 https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/version";
            let body = eventually(SETTLE, || e2e::kubectl(lab, &["exec", &p.name, "--", "sh", "-c", script]))?;
            let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("{}: /version answered {body:?}", p.name))?;
            ensure!(v["gitVersion"].is_string(), "{}: /version answered {body}", p.name);
        }
        Ok(())
    });

    s.check("pods cannot read the control plane's keys, tokens or kubeconfigs", |lab| {
        // Every lab node shares this machine's filesystem; the kubelets mask
        // these paths (`--mask-path`) in each unprivileged pod.
        let c = lab.config();
        let secrets = [
            c.state_dir.join("controlplane/pki/ca.key"),
            c.state_dir.join("controlplane/tokens.csv"),
            c.kubeconfig(),
            c.node_dir(1).join("credentials/kubelet.key"),
        ];
        for path in &secrets {
            ensure!(path.exists(), "{} is not on the host: the check would prove nothing", path.display());
        }
        for p in &e2e::pods(lab, "app=demo")? {
            // The same exec does read what is the pod's own.
            let token = e2e::pod_exec(lab, &p.name, &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"])?;
            ensure!(!token.trim().is_empty(), "{}: its own ServiceAccount token reads empty", p.name);
            for path in &secrets {
                let path = path.display().to_string();
                match e2e::pod_exec(lab, &p.name, &["cat", &path]) {
                    // A file is masked by /dev/null.
                    Ok(out) => ensure!(out.trim().is_empty(), "{} read {path} ({} bytes)", p.name, out.len()),
                    // A directory by an empty tmpfs (no such file); a
                    // masked file whose /dev/null the pod may not open.
                    Err(e) => {
                        let e = format!("{e:#}");
                        ensure!(
                            e.contains("No such file") || e.contains("Permission denied"),
                            "{}: cat {path}: {e}",
                            p.name
                        );
                    }
                }
            }
        }
        Ok(())
    });

    s.check("NodePort answers on every node's address from outside", |lab| {
        let c = lab.config();
        for i in 1..=c.nodes {
            let url = format!("http://{}:30080/hostname", c.node_ip(i));
            eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())
                .with_context(|| format!("NodePort on node {i}"))?;
        }
        Ok(())
    });

    s.check("a Service without endpoints refuses connections instead of timing out", |lab| {
        e2e::kubectl(lab, &["create", "service", "clusterip", "nobody", "--tcp=80:8080"])?;
        let cip = e2e::cluster_ip(lab, "nobody")?;
        let pods = e2e::pods(lab, "app=demo")?;
        eventually(Duration::from_secs(20), || match e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/"), 5)? {
            Curl::Failed(7, _) => Ok(()),
            other => bail!("expected connection refused (curl 7), got {other:?}"),
        })?;
        e2e::kubectl(lab, &["delete", "service", "nobody"]).map(|_| ())
    });

    s.check("endpoints follow scale down and up", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let one = e2e::scale_demo(lab, 1, SETTLE)?;
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &one[0].name, &format!("http://{cip}/hostname"), 10)?;
            ensure!(got == BTreeSet::from([one[0].name.clone()]), "hostnames {got:?} after scale to 1");
            Ok(())
        })?;
        let p = e2e::scale_demo(lab, 3, SETTLE)?;
        eventually(SETTLE, || {
            let want: BTreeSet<String> = p.iter().map(|p| p.name.clone()).collect();
            let got = e2e::hostnames_from_pod(lab, &p[0].name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "hostnames {got:?}, want {want:?}");
            Ok(())
        })
    });

    s.check("a deleted Service stops answering on its ClusterIP and NodePort", |lab| {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: temp}\nspec:\n  type: NodePort\n  selector: {app: demo}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30099}]\n";
        let path = lab.config().state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        let cip = e2e::cluster_ip(lab, "temp")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let node_port = format!("http://{}:30099/hostname", lab.config().node_ip(1));
        eventually(SETTLE, || e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/hostname"), 3)?.ok())?;
        eventually(SETTLE, || e2e::outside_curl(lab, &node_port, 3)?.ok())?;
        e2e::kubectl(lab, &["delete", "service", "temp"])?;
        eventually(Duration::from_secs(20), || match e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/hostname"), 2)? {
            Curl::Ok(b) => bail!("deleted ClusterIP still answered: {b}"),
            Curl::Failed(..) => Ok(()),
        })?;
        eventually(Duration::from_secs(20), || match e2e::outside_curl(lab, &node_port, 2)? {
            Curl::Ok(b) => bail!("deleted NodePort still answered: {b}"),
            Curl::Failed(..) => Ok(()),
        })
    });

    s.check("NodePort answers from a pod, for every node's address", |lab| {
        let c = lab.config();
        let pods = e2e::pods(lab, "app=demo")?;
        for i in 1..=c.nodes {
            let url = format!("http://{}:30080/hostname", c.node_ip(i));
            eventually(SETTLE, || e2e::pod_curl(lab, &pods[0].name, &url, 3)?.ok())
                .with_context(|| format!("NodePort on node {i} from {}", pods[0].name))?;
        }
        Ok(())
    });

    s.check("sessionAffinity ClientIP pins a client; switching it off spreads again", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let url = format!("http://{cip}/hostname");
        e2e::kubectl(lab, &["patch", "service", "demo", "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#])?;
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &url, 15)?;
            ensure!(got.len() == 1, "15 requests with affinity reached {got:?}");
            Ok(())
        })?;
        e2e::kubectl(lab, &["patch", "service", "demo", "-p", r#"{"spec":{"sessionAffinity":"None"}}"#])?;
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &url, 30)?;
            ensure!(got.len() > 1, "30 requests without affinity reached only {got:?}");
            Ok(())
        })
    });

    s.check("sessionAffinity ClientIP timeoutSeconds: sticky within it, balanced anew after it expires (pod via socket LB, outside via NodePort/tc)", |lab| {
        let c = lab.config();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: afft}}\nspec:\n  type: NodePort\n  selector: {{app: demo}}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {AFFINITY_TIMEOUT_S}}}}}\n  ports: [{{port: 80, targetPort: 8080, nodePort: 30083}}]\n"
        );
        let path = c.state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        let cip = e2e::cluster_ip(lab, "afft")?;
        // The datapath holds the Service's timeout, not the 3 h default.
        eventually(SETTLE, || {
            let v = e2e::agent_services(lab, 1)?;
            let f = v.as_array().and_then(|a| a.iter().find(|f| f["ip"] == cip.to_string() && f["port"] == 80));
            let t = f.map(|f| f["affinity_timeout"].clone());
            ensure!(t == Some(serde_json::json!(AFFINITY_TIMEOUT_S)), "{cip}:80 in the maps: {f:?}");
            Ok(())
        })?;

        // From a pod: socket LB, the affinity key is the pod's netns cookie.
        // Sticky: 10 back-to-back requests and 3 more a second apart (well
        // inside the timeout) all reach one backend.
        let pods = e2e::pods(lab, "app=demo")?;
        let client = &pods[0].name;
        let url = format!("http://{cip}/hostname");
        let script = format!(
            "for i in $(seq 10); do curl -sS -m 3 {url}; echo; done; for i in 1 2 3; do sleep 1; curl -sS -m 3 {url}; echo; done"
        );
        let pinned = eventually(SETTLE, || {
            let out = e2e::pod_exec(lab, client, &["sh", "-c", &script])?;
            let got: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            let distinct: BTreeSet<&str> = got.iter().copied().collect();
            ensure!(got.len() == 13 && distinct.len() == 1, "13 requests with affinity from {client}: {got:?}");
            Ok(got[0].to_owned())
        })?;
        affinity_expires(&format!("socket LB from {client}"), &pinned, || e2e::pod_curl(lab, client, &url, 3)?.ok())?;

        // From outside via NodePort: tc on the node's uplink, keyed by the
        // client IP.
        let np = format!("http://{}:30083/hostname", c.node_ip(1));
        let pinned = eventually(SETTLE, || {
            let mut got = Vec::new();
            for i in 0..13 {
                if i >= 10 {
                    std::thread::sleep(Duration::from_secs(1));
                }
                got.push(e2e::outside_curl(lab, &np, 3)?.ok()?);
            }
            let distinct: BTreeSet<&String> = got.iter().collect();
            ensure!(distinct.len() == 1, "13 requests with affinity from outside to {np}: {got:?}");
            Ok(got[0].clone())
        })?;
        // Node 1's affinity map says so: the outside client's address →
        // the pinned pod, on the NodePort frontend.
        let pinned_ip = pods.iter().find(|p| p.name == pinned).map(|p| p.ip).context("pinned pod")?;
        let aff = e2e::agent_affinity(lab, 1)?;
        let entry = aff.as_array().and_then(|a| {
            a.iter().find(|e| e["client"] == c.outside_ip().to_string() && e["frontend"].as_str().is_some_and(|f| f.ends_with(":30083")))
        });
        ensure!(
            entry.is_some_and(|e| e["backend"] == format!("{pinned_ip}:8080")),
            "affinity of {} on node 1 should name {pinned} ({pinned_ip}): {aff}",
            c.outside_ip()
        );
        affinity_expires("tc NodePort from outside", &pinned, || e2e::outside_curl(lab, &np, 3)?.ok())?;
        e2e::kubectl(lab, &["delete", "service", "afft"]).map(|_| ())
    });

    s.check("externalIPs and a LoadBalancer ingress IP answer from outside", |lab| {
        let c = lab.config();
        let ext = std::net::Ipv4Addr::new(198, 18, c.subnet, 200);
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec:\n  selector: {{app: demo}}\n  externalIPs: [{ext}]\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: lb}}\nspec:\n  type: LoadBalancer\n  selector: {{app: demo}}\n  ports: [{{port: 80, targetPort: 8080}}]\n"
        );
        let path = c.state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        // The LoadBalancer IP comes from the lab's pool (lbipam); routed
        // through node 1 here, as for the external IP (L2 announcement has
        // its own test in netns_e2e_lb.rs).
        let lbip: std::net::Ipv4Addr = eventually(SETTLE, || {
            let ip = e2e::kubectl(lab, &["get", "service", "lb", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"])?;
            Ok(ip.trim().parse()?)
        })?;
        // As an operator would: route the addresses to a node (inside the lab).
        for ip in [ext, lbip] {
            riptide_tests::netns::ip(&["-n", &c.outside_netns(), "route", "replace", &format!("{ip}/32"), "via", &c.node_ip(1).to_string()])?;
        }
        for ip in [ext, lbip] {
            eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{ip}/hostname"), 3)?.ok())
                .with_context(|| format!("{ip} from outside"))?;
        }
        e2e::kubectl(lab, &["delete", "service", "ext", "lb"]).map(|_| ())
    });

    s.check("externalTrafficPolicy=Local keeps the client IP; health-check NodePort says 200/503", |lab| {
        let c = lab.config();
        let one = e2e::scale_demo(lab, 1, SETTLE)?.remove(0);
        let with = (1..=c.nodes).find(|i| c.node_name(*i) == one.node).context("pod's node")?;
        let without = (1..=c.nodes).find(|i| *i != with).context("another node")?;
        // healthCheckNodePort exists only for type LoadBalancer with eTP=Local.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: local}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: demo}\n  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]\n";
        let path = c.state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        let hc: u16 = e2e::kubectl(lab, &["get", "service", "local", "-o", "jsonpath={.spec.healthCheckNodePort}"])?.trim().parse()?;
        let seen = eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{}:30081/clientip", c.node_ip(with)), 3)?.ok())?;
        ensure!(seen.starts_with(&format!("{}:", c.outside_ip())), "backend saw {seen}, client is {}", c.outside_ip());
        let status = |i: u32| -> anyhow::Result<String> {
            let out = riptide_tests::netns::command(&c.outside_netns(), "curl")?
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "3", &format!("http://{}:{hc}/", c.node_ip(i))])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        eventually(SETTLE, || {
            let (a, b) = (status(with)?, status(without)?);
            ensure!(a == "200" && b == "503", "health check: {a} on the node with the endpoint, {b} on the one without");
            Ok(())
        })?;
        e2e::kubectl(lab, &["delete", "service", "local"])?;
        e2e::scale_demo(lab, 3, SETTLE).map(|_| ())
    });

    s.check("internalTrafficPolicy=Local only reaches endpoints on the client's node", |lab| {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ilocal}\nspec:\n  internalTrafficPolicy: Local\n  selector: {app: demo}\n  ports: [{port: 80, targetPort: 8080}]\n";
        let path = lab.config().state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        let cip = e2e::cluster_ip(lab, "ilocal")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let client = &pods[0];
        let want: BTreeSet<String> = pods.iter().filter(|p| p.node == client.node).map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 20)?;
            ensure!(got == want, "iTP=Local from {} reached {got:?}, want {want:?}", client.node);
            Ok(())
        })?;
        e2e::kubectl(lab, &["delete", "service", "ilocal"]).map(|_| ())
    });

    s.check("Service type ClusterIP → NodePort → ClusterIP", |lab| {
        let c = lab.config();
        e2e::kubectl(lab, &["create", "service", "clusterip", "chg", "--tcp=80:8080"])?;
        e2e::kubectl(lab, &["patch", "service", "chg", "-p", r#"{"spec":{"selector":{"app":"demo"}}}"#])?;
        let cip = e2e::cluster_ip(lab, "chg")?;
        let pods = e2e::pods(lab, "app=demo")?;
        eventually(SETTLE, || e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/hostname"), 3)?.ok())?;
        e2e::kubectl(lab, &["patch", "service", "chg", "-p", r#"{"spec":{"type":"NodePort","ports":[{"port":80,"targetPort":8080,"nodePort":30082,"protocol":"TCP"}]}}"#])?;
        let np = format!("http://{}:30082/hostname", c.node_ip(1));
        eventually(SETTLE, || e2e::outside_curl(lab, &np, 3)?.ok())?;
        e2e::kubectl(lab, &["patch", "service", "chg", "--type=json", "-p", r#"[{"op":"replace","path":"/spec/type","value":"ClusterIP"},{"op":"remove","path":"/spec/ports/0/nodePort"}]"#])?;
        eventually(Duration::from_secs(20), || match e2e::outside_curl(lab, &np, 2)? {
            Curl::Ok(b) => bail!("NodePort still answered after the change back: {b}"),
            Curl::Failed(..) => Ok(()),
        })?;
        eventually(SETTLE, || e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/hostname"), 3)?.ok())?;
        e2e::kubectl(lab, &["delete", "service", "chg"]).map(|_| ())
    });

    s.check("hostPort maps the node's port to the pod", |lab| {
        let c = lab.config();
        let netexec = c.bin_dir.join("riptide-netexec");
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: hp, labels: {{app: hp}}}}\nspec:\n  nodeName: {}\n  containers:\n  - name: netexec\n    image: riptide.local/netexec\n    command: [\"{}\", \"--http-port=8080\", \"--udp-port=0\"]\n    ports: [{{containerPort: 8080, hostPort: 8088}}]\n",
            c.node_name(2),
            netexec.display()
        );
        let path = c.state_dir.join("temp-svc.yaml");
        std::fs::write(&path, yaml)?;
        e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?])?;
        let got = eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{}:8088/hostname", c.node_ip(2)), 3)?.ok())?;
        ensure!(got == "hp", "hostPort answered {got}");
        e2e::kubectl(lab, &["delete", "pod", "hp", "--grace-period=1"]).map(|_| ())
    });

    s.check("a Service deleted and recreated under the same name works again", |lab| {
        let pods = e2e::pods(lab, "app=demo")?;
        for round in 0..2 {
            e2e::kubectl(lab, &["create", "service", "clusterip", "again", "--tcp=80:8080"])?;
            e2e::kubectl(lab, &["patch", "service", "again", "-p", r#"{"spec":{"selector":{"app":"demo"}}}"#])?;
            let cip = e2e::cluster_ip(lab, "again")?;
            eventually(SETTLE, || e2e::pod_curl(lab, &pods[0].name, &format!("http://{cip}/hostname"), 3)?.ok())
                .with_context(|| format!("round {round}"))?;
            e2e::kubectl(lab, &["delete", "service", "again"])?;
        }
        Ok(())
    });

    s.check_mut("agent kill -9 and restart during long-lived connections: no break; new connections work", |lab| {
        let c = lab.config().clone();
        let netexec = c.bin_dir.join("riptide-netexec");
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let client = pods[0].clone();

        // A pod's connection to the ClusterIP (socket LB), to a backend on
        // another node (pod routing across the underlay).
        let (mut via_cip, cip_backend, cip_seen) = connect_to_remote_backend(lab, "pod → ClusterIP", &client.node, || {
            let mut cmd = e2e::pod_command(lab, &client.name, &netexec)?;
            cmd.args(["--keepalive-client", &format!("{cip}:80")]);
            KeepAlive::open(&format!("{} → {cip}:80", client.name), cmd)
        })?;
        ensure!(via_cip.peer == format!("{cip}:80"), "getpeername shows {}, not the ClusterIP", via_cip.peer);
        ensure!(cip_seen == via_cip.local, "backend saw {cip_seen}, client is {} (NAT between pods?)", via_cip.local);

        // An outside client's connection to node 1's NodePort, to a backend
        // on another node: tc DNAT + SNAT on node 1, conntrack and NAT
        // entries that must survive the agent.
        let ingress = 1;
        let np = format!("{}:30080", c.node_ip(ingress));
        let (mut via_np, np_backend, np_seen) = connect_to_remote_backend(lab, "outside → NodePort", &c.node_name(ingress), || {
            let mut cmd = netns::command(&c.outside_netns(), &netexec)?;
            cmd.args(["--keepalive-client", &np]);
            KeepAlive::open(&format!("outside → {np}"), cmd)
        })?;
        ensure!(np_seen.starts_with(&format!("{}:", c.node_ip(ingress))), "NodePort to a remote backend: backend saw {np_seen}, not node {ingress}'s address");

        let mut exchange = |tag: &str| -> Result<()> {
            for (k, backend) in [(&mut via_cip, &cip_backend), (&mut via_np, &np_backend)] {
                let msg = format!("{tag}-{}", k.local.replace([':', '.'], "-"));
                let echo = k.get(&format!("/echo?msg={msg}"))?;
                ensure!(echo == msg, "echo {msg} answered {echo}");
                let host = k.get("/hostname")?;
                ensure!(host == backend.name, "the connection now reaches {host}, it started on {}", backend.name);
            }
            Ok(())
        };
        exchange("before")?;

        // Every node on the two paths: client, ingress, both backends.
        let mut involved: Vec<u32> = [&client.node, &cip_backend.node, &c.node_name(ingress), &np_backend.node]
            .iter()
            .filter_map(|n| c.node_index(n))
            .collect();
        involved.sort_unstable();
        involved.dedup();
        for i in &involved {
            lab.kill_agent(*i)?;
        }
        eprintln!("     killed the agents of nodes {involved:?} (SIGKILL)");
        // The datapath runs on without its agent. Whatever breaks, the
        // agents are restarted and awaited before the check returns, so a
        // failure report shows the new agents' view and the lab stays whole
        // for whatever runs next.
        let mut broken = exchange("agents-dead").err().map(|e| e.context("while the agents were dead"));
        for i in &involved {
            lab.start_agent(*i)?;
        }
        // Talk on both connections all the while the agents resync.
        let started = std::time::Instant::now();
        let mut rounds = 0;
        loop {
            if broken.is_none() {
                broken = exchange(&format!("restarting-{rounds}")).err().map(|e| e.context("while the agents restarted"));
                rounds += 1;
            }
            let ready = involved.iter().all(|i| e2e::agent_status(lab, *i).is_ok_and(|s| s["ready"] == true));
            if ready {
                break;
            }
            if let Some((label, st)) = lab.exited().into_iter().next() {
                bail!("{label} exited ({st}) after the restart:\n{}", lab.log_tail(&label, 30));
            }
            ensure!(started.elapsed() < SETTLE, "restarted agents of nodes {involved:?} not ready after {SETTLE:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
        if let Some(e) = broken {
            return Err(e);
        }
        eprintln!("     agents ready again after {:.1}s, {rounds} exchanges meanwhile", started.elapsed().as_secs_f64());
        // The first full pass (stale-entry removal, GC start, route sync) has
        // run once ready; keep talking a little past it.
        for round in 0..8 {
            exchange(&format!("after-{round}"))?;
            std::thread::sleep(Duration::from_millis(250));
        }
        // Same connections: the backends still see the same client address
        // and port.
        let now = via_cip.get("/clientip")?;
        ensure!(now == cip_seen, "pod connection: backend saw {cip_seen} before, {now} after");
        let now = via_np.get("/clientip")?;
        ensure!(now == np_seen, "NodePort connection: backend saw {np_seen} before, {now} after");
        drop(via_cip);
        drop(via_np);

        // New connections: every endpoint through the ClusterIP, and the
        // NodePort on every node from outside.
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &client.name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "after the restart: hostnames {got:?}, want {want:?}");
            Ok(())
        })?;
        for i in 1..=c.nodes {
            let url = format!("http://{}:30080/hostname", c.node_ip(i));
            eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())
                .with_context(|| format!("NodePort on node {i} after the restart"))?;
        }
        Ok(())
    });

    s.finish();
    drop(lab);
}
