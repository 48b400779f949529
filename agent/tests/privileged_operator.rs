//! What operators watch, end to end against our apiserver in a network
//! namespace (root: eBPF pins, namespaces): the per-Service backend cap and
//! its Event, a deliberately tiny backend map that fails one Service while
//! the others sync, metrics scraped over HTTP and checked by name and
//! value, kube-proxy's `:10256/healthz`, `riptide map list` / `node list`
//! / `bpf nat list` (both NAT tables), and a stale watch while the
//! apiserver is down, with recovery.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{Netns, agent_log_tail, apply, eventually, eventually_for, kubectl, riptide, set_node_ip, start_agent};
use riptide_test_support::privileged;
use serde_json::Value;

/// `riptide status -o json`, whatever the exit code (1 = not ready).
fn status(ns: &Netns) -> Option<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(ns.path("agent.sock"))
        .args(["status", "-o", "json"])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// GET `url` inside the namespace: (HTTP status, body).
fn http(ns: &Netns, url: &str) -> (u16, String) {
    let out = ns.cmd("curl").args(["-s", "-m", "5", "-w", "\n%{http_code}", url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// The value of the sample `series` (name with labels, exactly as
/// exported) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

fn metrics(ns: &Netns) -> String {
    http(ns, "http://127.0.0.1:9962/metrics").1
}

fn service(name: &str, ip: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n")
}

/// An EndpointSlice of `svc` with `n` ready endpoints 10.42.9.<base+i>.
fn slice(svc: &str, base: u8, n: u8, trigger: Option<&str>) -> String {
    let annotations = trigger.map_or_else(String::new, |t| format!("  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{t}\"}}\n"));
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-a\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\n{annotations}addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
    );
    for i in 0..n {
        s.push_str(&format!("- addresses: [10.42.9.{}]\n  conditions: {{ready: true}}\n", base + i));
    }
    s
}

/// Backends of `svc` in the maps (`riptide service list`).
fn backends(ns: &Netns, svc: &str) -> Option<usize> {
    let Value::Array(list) = riptide(ns, &["service", "list"])? else { return None };
    list.iter()
        .find(|f| f["service"].as_str().is_some_and(|s| s.starts_with(&format!("default/{svc}:"))))
        .map(|f| f["backends"].as_array().map_or(0, Vec::len))
}

fn node(ns: &Netns, kc: &Path) {
    let me = &ns.node;
    apply(ns, kc, &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {me}}}\nspec: {{podCIDR: 10.42.7.0/24, podCIDRs: [10.42.7.0/24]}}\n"));
    set_node_ip(ns, kc, me, "198.18.77.1");
}

fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    // `date` is simpler than pulling a time crate into the test.
    let out = Command::new("date").args(["-u", "-d", &format!("@{}", d.as_secs()), "+%Y-%m-%dT%H:%M:%SZ"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn privileged_backend_cap_tiny_map_metrics_and_node_health() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    // Declared first: dropped after the namespace's processes are gone.
    let cg = common::Cgroup::new("ops");
    let mut ns = Netns::new("ops");
    ns.underlay();
    let kc = common::start_apiserver(&mut ns);
    node(&ns, &kc);
    // big: 6 endpoints, cut to 4; small: 2; zz-overflow: 3 more than the
    // 8-entry backend map holds (written last: ports go in name order).
    apply(&ns, &kc, &service("big", "10.43.0.61"));
    apply(&ns, &kc, &slice("big", 10, 6, None));
    apply(&ns, &kc, &service("small", "10.43.0.62"));
    apply(&ns, &kc, &slice("small", 30, 2, None));
    apply(&ns, &kc, &service("zz-overflow", "10.43.0.63"));
    apply(&ns, &kc, &slice("zz-overflow", 50, 3, None));
    // No endpoints: socket LB refuses connects to it.
    apply(&ns, &kc, &service("empty", "10.43.0.64"));
    start_agent(
        &mut ns,
        &kc,
        &[
            "--max-backends-per-service", "4",
            "--map-sizes", "rt_be4_v1=8",
            "--map-sample-interval-s", "1",
            "--healthz-addr", "127.0.0.1:10256",
            "--cgroup", cg.path.to_str().unwrap(),
        ],
    );

    eventually(&ns, "big cut to 4 backends, small with 2, the agent ready", || {
        backends(&ns, "big") == Some(4) && backends(&ns, "small") == Some(2) && riptide(&ns, &["status"]).is_some_and(|s| s["ready"] == true)
    });
    let st = status(&ns).unwrap();
    assert_eq!(st["truncated_services"], serde_json::json!([{"service": "default/big", "backends": 6, "kept": 4}]), "{st}");
    let failing = st["failing_services"].as_object().unwrap();
    assert_eq!(failing.keys().collect::<Vec<_>>(), ["default/zz-overflow"], "the Service that does not fit is named: {st}");
    assert_eq!(backends(&ns, "zz-overflow"), None, "nothing half-written");
    let (code, body) = http(&ns, "http://127.0.0.1:9962/readyz");
    assert_eq!(code, 200, "one failing Service does not make the node unready: {body}");
    assert!(body.contains("default/zz-overflow") && body.contains("default/big truncated: 4 of 6"), "{body}");

    // The Event on the Service, for `kubectl describe service big`.
    eventually(&ns, "BackendsTruncated event on big", || {
        let v: Value = serde_json::from_str(&kubectl(&ns, &kc, &["get", "events", "-n", "default", "-o", "json"], None)).unwrap();
        v["items"].as_array().unwrap().iter().any(|e| {
            e["reason"] == "BackendsTruncated"
                && e["type"] == "Warning"
                && e["involvedObject"]["name"] == "big"
                && e["involvedObject"]["kind"] == "Service"
                && e["message"].as_str().is_some_and(|m| m.contains("6 backends, only 4 written"))
        })
    });

    // Metrics by name and value: map pressure from the sampler, the cap,
    // the failing Service, build info.
    eventually(&ns, "map pressure of the backend map at 6/8", || {
        let m = metrics(&ns);
        sample(&m, "riptide_bpf_map_pressure{map_name=\"rt_be4_v1\"}") == Some(0.75)
            && sample(&m, "riptide_bpf_map_capacity{map_name=\"rt_be4_v1\"}") == Some(8.0)
    });
    let m = metrics(&ns);
    assert_eq!(sample(&m, "riptide_agent_truncated_services"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "riptide_agent_truncated_backends"), Some(2.0), "{m}");
    assert_eq!(sample(&m, "riptide_agent_failing_services"), Some(1.0), "{m}");
    // big, small and whatever the apiserver made itself (`kubernetes`).
    assert_eq!(sample(&m, "riptide_agent_service_ports"), st["service_ports"].as_f64(), "{m}");
    assert!(m.lines().any(|l| l.starts_with("riptide_build_info{") && l.ends_with(" 1")), "{m}");
    assert!(sample(&m, "riptide_agent_map_entries{map=\"rt_be4_v1\"}") == Some(6.0), "{m}");
    assert_eq!(sample(&m, "riptide_sync_proxy_rules_last_timestamp_seconds"), Some(0.0), "no pass wrote everything yet: {m}");

    // Real traffic: connects from the socket-LB cgroup to the Service
    // without endpoints are refused, and counted as egress drops.
    let connect = format!("echo $$ > {}/cgroup.procs && exec curl -s -m 2 http://10.43.0.64/", cg.path.display());
    for _ in 0..3 {
        let out = ns.cmd("sh").args(["-c", &connect]).output().unwrap();
        assert_eq!(out.status.code(), Some(7), "curl: connection refused by socket LB: {out:?}");
    }
    eventually(&ns, "refused connects counted by reason and direction", || {
        sample(&metrics(&ns), "riptide_drop_count_total{reason=\"sock_no_backend\",direction=\"egress\"}").is_some_and(|n| n >= 3.0)
    });

    // `riptide map list` and `node list`, in every output format.
    let maps = riptide(&ns, &["map", "list"]).unwrap();
    let be = maps.as_array().unwrap().iter().find(|m| m["name"] == "rt_be4_v1").unwrap();
    assert_eq!((be["entries"].as_u64(), be["max_entries"].as_u64()), (Some(6), Some(8)), "{maps}");
    let nodes = riptide(&ns, &["node", "list"]).unwrap();
    assert_eq!(nodes[0]["name"], ns.node.as_str(), "{nodes}");
    assert_eq!(nodes[0]["state"], "local", "{nodes}");
    for format in ["yaml", "wide", "table"] {
        let out = Command::new(env!("CARGO_BIN_EXE_riptide"))
            .arg("--socket")
            .arg(ns.path("agent.sock"))
            .args(["map", "list", "-o", format])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("rt_be4_v1"), "-o {format}: {text}");
    }

    // Both NAT tables, wherever operators look: a masqueraded TCP and UDP
    // flow written as the programs write them (each in its protocol's
    // table) are listed with their table by `riptide bpf nat list`, and the
    // map list, the capacity gauges and status name both tables.
    write_masquerade_mappings(&ns.node);
    let nat = riptide(&ns, &["bpf", "nat", "list"]).unwrap();
    let listed: Vec<(&str, &str, &str)> = nat
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["table"].as_str().unwrap(), e["protocol"].as_str().unwrap(), e["direction"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [
            ("rt_nat4_v2", "TCP", "egress"),
            ("rt_nat4_v2", "TCP", "ingress"),
            ("rt_natany4_v2", "UDP", "egress"),
            ("rt_natany4_v2", "UDP", "ingress")
        ],
        "{nat}"
    );
    let wide = Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(ns.path("agent.sock"))
        .args(["bpf", "nat", "list", "-o", "wide"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&wide.stdout);
    assert!(wide.status.success() && text.contains("TABLE") && text.contains("rt_nat4_v2") && text.contains("rt_natany4_v2"), "{text}");
    assert!(text.contains("10.42.9.200:40000") && text.contains("10.42.9.200:53000"), "{text}");
    let maps = riptide(&ns, &["map", "list"]).unwrap();
    for (name, max) in [("rt_nat4_v2", 262_144), ("rt_natany4_v2", 131_072)] {
        let m = maps.as_array().unwrap().iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name} in {maps}"));
        assert_eq!(m["max_entries"].as_u64(), Some(max), "{maps}");
    }
    eventually(&ns, "both NAT tables sampled: status and gauges", || {
        let m = metrics(&ns);
        status(&ns).is_some_and(|s| s["nat_entries"] == 4 && s["nat_tables"]["rt_nat4_v2"] == 2 && s["nat_tables"]["rt_natany4_v2"] == 2)
            && sample(&m, "riptide_bpf_map_capacity{map_name=\"rt_natany4_v2\"}") == Some(131_072.0)
            && sample(&m, "riptide_bpf_map_pressure{map_name=\"rt_nat4_v2\"}").is_some_and(|p| p > 0.0)
    });

    // The overflow goes: everything fits, the pass writes all it wants.
    kubectl(&ns, &kc, &["delete", "service", "zz-overflow"], None);
    kubectl(&ns, &kc, &["delete", "endpointslice", "zz-overflow-a"], None);
    eventually(&ns, "no failing Service left", || {
        status(&ns).is_some_and(|s| s["failing_services"].as_object().is_some_and(serde_json::Map::is_empty))
    });
    eventually(&ns, "last successful sync stamped", || {
        sample(&metrics(&ns), "riptide_sync_proxy_rules_last_timestamp_seconds").is_some_and(|t| t > 1.0e9)
    });

    // Network programming latency from the slice's trigger time.
    apply(&ns, &kc, &slice("small", 30, 3, Some(&rfc3339_now())));
    eventually(&ns, "small with 3 backends", || backends(&ns, "small") == Some(3));
    eventually(&ns, "programming latency observed", || {
        let m = metrics(&ns);
        sample(&m, "riptide_network_programming_duration_seconds_count").is_some_and(|n| n >= 1.0)
            && sample(&m, "riptide_network_programming_duration_seconds_sum").is_some_and(|s| (0.0..30.0).contains(&s))
    });

    // kube-proxy's node health: 200 with its body, then 503 on /healthz
    // (not /livez) once the Node is being drained by the autoscaler.
    let (code, body) = http(&ns, "http://127.0.0.1:10256/healthz");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["nodeEligible"], true, "{v}");
    assert!(v["lastUpdated"].as_str().is_some_and(|s| !s.is_empty()) && v["currentTime"].is_string(), "{v}");
    kubectl(&ns, &kc, &["taint", "node", &ns.node, "ToBeDeletedByClusterAutoscaler=1:NoSchedule"], None);
    eventually(&ns, "/healthz 503 for a node being deleted", || http(&ns, "http://127.0.0.1:10256/healthz").0 == 503);
    let (code, body) = http(&ns, "http://127.0.0.1:10256/livez");
    assert_eq!(code, 200, "/livez ignores eligibility: {body}");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
}

/// Writes both halves of a masqueraded TCP flow (10.42.9.200:40000 →
/// 203.0.113.1:443) and a UDP one (:53000 → :53) into the pinned NAT
/// tables of `node`, each in its protocol's table as `nat.rs` does.
fn write_masquerade_mappings(node: &str) {
    use aya::maps::{HashMap, Map, MapData};
    use riptide_common::{CtKey, NAT_DIR_EGRESS, NAT_DIR_INGRESS, NAT_F_MASQ, NatValue, names, proto};
    let (pod, peer, node_ip) = ([10, 42, 9, 200], [203, 0, 113, 1], [198, 18, 77, 1]);
    let be = |a: [u8; 4]| u32::from_be_bytes(a).to_be();
    let now = riptide_datapath::clock::monotonic_ns();
    for (table, p, pod_port, peer_port, nat_port) in [(names::NAT4, proto::TCP, 40_000u16, 443u16, 40_000u16), (names::NAT_ANY4, proto::UDP, 53_000, 53, 41_000)] {
        let path = riptide_datapath::pin_dir(node).unwrap().join(table);
        let mut m: HashMap<MapData, CtKey, NatValue> = HashMap::try_from(Map::LruHashMap(MapData::from_pin(path).unwrap())).unwrap();
        let egress = CtKey { saddr_be: be(pod), daddr_be: be(peer), sport_be: pod_port.to_be(), dport_be: peer_port.to_be(), proto: p, dir: NAT_DIR_EGRESS, _pad: 0 };
        let ingress = CtKey { saddr_be: be(peer), daddr_be: be(node_ip), sport_be: peer_port.to_be(), dport_be: nat_port.to_be(), proto: p, dir: NAT_DIR_INGRESS, _pad: 0 };
        m.insert(egress, NatValue { last_seen_ns: now, addr_be: be(node_ip), port_be: nat_port.to_be(), flags: NAT_F_MASQ }, 0).unwrap();
        m.insert(ingress, NatValue { last_seen_ns: now, addr_be: be(pod), port_be: pod_port.to_be(), flags: NAT_F_MASQ }, 0).unwrap();
    }
}

/// The apiserver on a fixed address, so a restart keeps the kubeconfig.
fn start_apiserver_at(ns: &mut Netns, listen: &str) -> (usize, PathBuf) {
    let data = ns.path("cp");
    let mut child = ns
        .cmd(common::controlplane_bin())
        .args(["apiserver", "--data-dir", data.to_str().unwrap(), "--listen", listen])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::options().create(true).append(true).open(ns.path("apiserver.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    ns.procs.push(child);
    let kubeconfig = lines.by_ref().map_while(Result::ok).find_map(|l| l.strip_prefix("kubeconfig ").map(PathBuf::from));
    std::thread::spawn(move || for _ in lines {});
    (ns.procs.len() - 1, kubeconfig.expect("apiserver printed no kubeconfig line"))
}

#[test]
fn privileged_stale_watch_is_reported_while_the_maps_keep_serving() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("stale");
    ns.underlay();
    let listen = "127.0.0.1:16443";
    let (api, kc) = start_apiserver_at(&mut ns, listen);
    node(&ns, &kc);
    apply(&ns, &kc, &service("web", "10.43.0.71"));
    apply(&ns, &kc, &slice("web", 10, 2, None));
    start_agent(&mut ns, &kc, &["--stale-after-s", "2", "--healthz-addr", "127.0.0.1:10256"]);
    eventually(&ns, "web written, agent ready", || {
        backends(&ns, "web") == Some(2) && status(&ns).is_some_and(|s| s["ready"] == true)
    });

    // The apiserver goes away: stale, named, not ready; the maps keep web.
    ns.procs[api].kill().unwrap();
    ns.procs[api].wait().unwrap();
    eventually(&ns, "status reports the stale watch", || {
        status(&ns).is_some_and(|s| {
            s["ready"] == false
                && s["stale"].as_str().is_some_and(|m| m.contains("apiserver unreachable") && m.contains("endpointslices"))
        })
    });
    let st = status(&ns).unwrap();
    assert!(st["not_ready"].as_array().unwrap().iter().any(|r| r.as_str().is_some_and(|r| r.contains("stale watch"))), "{st}");
    assert_eq!(backends(&ns, "web"), Some(2), "the datapath keeps serving the last view");
    assert_eq!(sample(&metrics(&ns), "riptide_agent_watch_stale"), Some(1.0));
    let (code, body) = http(&ns, "http://127.0.0.1:9962/readyz");
    assert!(code == 503 && body.contains("stale watch"), "{code} {body}");
    // kube-proxy semantics: nothing is queued, so the node stays healthy
    // for load balancers.
    assert_eq!(http(&ns, "http://127.0.0.1:10256/healthz").0, 200);
    // riptide status exits 1 meanwhile.
    let out = Command::new(env!("CARGO_BIN_EXE_riptide")).arg("--socket").arg(ns.path("agent.sock")).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stale watch"));

    // Back: ready again, and changes made now reach the maps.
    let (_, kc2) = start_apiserver_at(&mut ns, listen);
    assert_eq!(kc2, kc);
    eventually_for(&ns, "ready again after the apiserver returned", Duration::from_secs(60), || {
        status(&ns).is_some_and(|s| s["ready"] == true && s["stale"].is_null())
    });
    apply(&ns, &kc, &slice("web", 10, 3, None));
    apply(&ns, &kc, &service("after", "10.43.0.72"));
    apply(&ns, &kc, &slice("after", 40, 1, None));
    eventually_for(&ns, "changes after the outage converge", Duration::from_secs(60), || {
        backends(&ns, "web") == Some(3) && backends(&ns, "after") == Some(1)
    });
    assert_eq!(sample(&metrics(&ns), "riptide_agent_watch_stale"), Some(0.0), "{}", agent_log_tail(&ns, 20));
}
