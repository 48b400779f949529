//! NetworkPolicy programming latency (`agent_bench --policy`): numbers are
//! reported, never asserted.
//!
//! Setup: the same apiserver and agent as the Service part (`bench`), loaded
//! with `pods` Pods in `namespaces` Namespaces and `policies`
//! NetworkPolicies. Pods are objects only (nothing runs): each has a
//! `nodeName` and a `podIP` in its status, every `local_every`-th on the
//! agent's node (addresses in its pod range), the rest on a node that does
//! not exist. Pod `i` is in namespace `ns{i % 20}` with labels
//! `app=a{i % 250}`, `role=r{i % 4}`; policy `j` (namespace `ns{j % 20}`)
//! selects `app=a{j % 250}` (10 pods, the `i ≡ j mod 500` ones), allows
//! ingress from `app=a{(j + 130) % 250}` of its namespace on one TCP port,
//! from `role=r{j % 4}` of the namespaces labelled `team=t{j % 5}` on the
//! named port `http`, every tenth also from an ipBlock, and every fourth is
//! an egress policy too (UDP 53 to every namespace).
//!
//! Two kinds of change, interleaved, each on a policy that selects a pod of
//! the agent's node (L), from the apiserver's answer to the change being
//! visible in the pinned maps as the datapath reads them (`rt_polep4_v1` →
//! L's endpoint id, `rt_ipcache4_v1` → the peer's identity, an LPM lookup
//! in `rt_policy4_v1` for that endpoint, identity, ingress, TCP and port):
//! - **policy change**: the policy's first rule gets a port no rule had;
//!   visible when the peer it names is allowed to L on that port;
//! - **pod label change**: a pod of the policy's namespace that was not a
//!   peer takes the peer's `app` label; visible when that pod is allowed to
//!   L on the rule's port (a new identity or an existing one for its
//!   address in the ipcache, and the rules that name it).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, lpm_trie::{Key, LpmTrie}};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use riptide_common::{
    EndpointKey, IpcacheKey, IpcacheValue, POL_DIR_INGRESS, POLICY_PREFIX_FULL, PolicyEndpointValue, PolicyKey,
    PolicyValue, names, proto,
};
use serde::Serialize;

use crate::bench::{
    Error, Percentiles, Result, World, root_runtime, start_agent, start_apiserver, step, unix_get, vm_hwm_mib,
    wait_ready,
};

/// Sizes of one run.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyOptions {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// Every `local_every`-th pod runs on the agent's node.
    pub local_every: usize,
    /// Samples of each kind of change.
    pub samples: usize,
}

impl PolicyOptions {
    /// The scale either way (the load takes seconds); `quick` takes
    /// fewer samples.
    pub fn new(quick: bool) -> Self {
        Self { pods: 5_000, policies: 1_000, namespaces: 20, local_every: 25, samples: if quick { 25 } else { 150 } }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyBenchReport {
    pub quick: bool,
    pub pods: usize,
    pub local_pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    /// Creating every object in the apiserver.
    pub apiserver_load_s: f64,
    /// Agent start → ready (every policy compiled and written).
    pub start_to_ready_ms: f64,
    /// NetworkPolicy change answered by the apiserver → visible in the maps.
    pub policy_change: Percentiles,
    pub policy_change_from_request: Percentiles,
    /// Pod label change answered by the apiserver → visible in the maps.
    pub label_change: Percentiles,
    pub label_change_from_request: Percentiles,
    /// The agent's `policy` status at the end (entries, identities, the
    /// last compile + write pass's duration).
    pub agent_policy_status: serde_json::Value,
    /// `VmHWM` of the agent at the end, MiB.
    pub agent_peak_rss_mib: f64,
    pub notes: Vec<String>,
}

const APP_GROUPS: usize = 250;
const ROLES: usize = 4;
const TEAMS: usize = 5;
/// The peer app of policy `j` is `app_of(j) + PEER_SHIFT`: a multiple of
/// 10 (= gcd(20 namespaces, 250 apps)), so some pod of the policy's
/// namespace has it.
const PEER_SHIFT: usize = 130;
const HTTP_PORT: u16 = 8080;

fn ns_of(i: usize, o: &PolicyOptions) -> String {
    format!("ns{}", i % o.namespaces)
}

fn pod_ip(i: usize, o: &PolicyOptions) -> Ipv4Addr {
    if i.is_multiple_of(o.local_every) {
        // The agent's pod range (`POD_CIDR`), from .2.
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 7, 2)) + u32::try_from(i / o.local_every).unwrap_or(0))
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 44, 0, 0)) + u32::try_from(i).unwrap_or(0))
    }
}

fn policy_object(j: usize, port: u16, o: &PolicyOptions) -> serde_json::Value {
    let mut ingress = vec![
        serde_json::json!({"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (j + PEER_SHIFT) % APP_GROUPS)}}}],
                           "ports": [{"protocol": "TCP", "port": port}]}),
        serde_json::json!({"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % TEAMS)}},
                                     "podSelector": {"matchLabels": {"role": format!("r{}", j % ROLES)}}}],
                           "ports": [{"port": "http"}]}),
    ];
    if j.is_multiple_of(10) {
        ingress.push(serde_json::json!({"from": [{"ipBlock": {"cidr": format!("192.168.{}.0/24", j % 256), "except": [format!("192.168.{}.128/25", j % 256)]}}]}));
    }
    let mut spec = serde_json::json!({
        "podSelector": {"matchLabels": {"app": format!("a{}", j % APP_GROUPS)}},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    });
    if j.is_multiple_of(4) {
        spec["policyTypes"] = serde_json::json!(["Ingress", "Egress"]);
        spec["egress"] = serde_json::json!([{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}]}]);
    }
    serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("np{j}"), "namespace": ns_of(j, o)},
        "spec": spec,
    })
}

fn first_port(j: usize) -> u16 {
    8000 + u16::try_from(j % 100).unwrap_or(0)
}

pub fn run(opts: &PolicyOptions, quick: bool) -> Result<PolicyBenchReport> {
    if opts.pods / opts.local_every > 250 || opts.policies < 500 || opts.pods < 500 {
        return Err(Error::Failed("the policy bench needs ≥ 500 pods and policies and ≤ 250 local pods".into()));
    }
    let rt = root_runtime()?;
    let mut report = PolicyBenchReport {
        quick,
        pods: opts.pods,
        local_pods: opts.pods.div_ceil(opts.local_every),
        policies: opts.policies,
        namespaces: opts.namespaces,
        ..PolicyBenchReport::default()
    };
    rt.block_on(part(opts, &mut report))?;
    Ok(report)
}

async fn part(o: &PolicyOptions, report: &mut PolicyBenchReport) -> Result<()> {
    let mut w = World::new("rtpb", "riptide-policy-bench")?;
    let (kubeconfig, client) = start_apiserver(&mut w).await?;
    let node = w.node.clone();

    let started = Instant::now();
    let nss: Api<Namespace> = Api::all(client.clone());
    for k in 0..o.namespaces {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{k}"), "labels": {"team": format!("t{}", k % TEAMS)}},
        }))
        .map_err(step("namespace object"))?;
        nss.create(&PostParams::default(), &ns).await.map_err(step(format!("creating Namespace ns{k}")))?;
    }
    futures::stream::iter(0..o.pods)
        .map(|i| {
            let (client, node) = (client.clone(), node.clone());
            async move {
                let pods: Api<Pod> = Api::namespaced(client, &ns_of(i, o));
                let on = if i.is_multiple_of(o.local_every) { node.as_str() } else { "elsewhere" };
                let ip = pod_ip(i, o).to_string();
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{i}"), "labels": {"app": format!("a{}", i % APP_GROUPS), "role": format!("r{}", i % ROLES)}},
                    "spec": {"nodeName": on, "containers": [{"name": "c", "image": "riptide.local/none", "ports": [{"name": "http", "containerPort": HTTP_PORT}]}]},
                }))
                .map_err(step("pod object"))?;
                pods.create(&PostParams::default(), &pod).await.map_err(step(format!("creating Pod p{i}")))?;
                // Status is the kubelet's to write: a subresource.
                let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                pods.patch_status(&format!("p{i}"), &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .map_err(step(format!("setting the status of Pod p{i}")))?;
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(0..o.policies)
        .map(|j| {
            let client = client.clone();
            async move {
                let api: Api<NetworkPolicy> = Api::namespaced(client, &ns_of(j, o));
                let np: NetworkPolicy =
                    serde_json::from_value(policy_object(j, first_port(j), o)).map_err(step("policy object"))?;
                api.create(&PostParams::default(), &np).await.map_err(step(format!("creating NetworkPolicy np{j}")))?;
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    report.apiserver_load_s = started.elapsed().as_secs_f64();

    let t0 = Instant::now();
    let agent_pid = start_agent(&mut w, &kubeconfig)?;
    wait_ready(&w.sock(), Duration::from_secs(600)).await?;
    report.start_to_ready_ms = t0.elapsed().as_secs_f64() * 1e3;

    let dir = riptide_datapath::pin_dir(&w.node).map_err(step("pin dir"))?;
    let probe = PolicyProbe::open(&dir)?;
    // The policies that select a local pod (i ≡ j mod 500 with i local).
    let local_policies: Vec<usize> = (0..o.policies).filter(|j| (j % 500).is_multiple_of(o.local_every)).collect();
    let mut ports: HashMap<usize, u16> = HashMap::new();
    let mut used: HashSet<usize> = HashSet::new();
    let (mut pol, mut pol_req, mut lab, mut lab_req) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..o.samples {
        // Policy change.
        let j = local_policies[k % local_policies.len()];
        let target = pod_ip(j % 500, o);
        let peer = pod_ip((j + 380) % 500, o);
        let port = 20_000 + u16::try_from(k).unwrap_or(0);
        let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns_of(j, o));
        let patch = serde_json::json!({"spec": policy_object(j, port, o)["spec"]});
        let sent = Instant::now();
        api.patch(&format!("np{j}"), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(step(format!("patching NetworkPolicy np{j}")))?;
        let answered = Instant::now();
        ports.insert(j, port);
        match probe.wait_allowed(peer, target, port, Duration::from_secs(10)) {
            Some(seen) => {
                pol.push(ms(seen, answered));
                pol_req.push(ms(seen, sent));
            }
            None => report.notes.push(format!("policy sample {k}: np{j}'s new port {port} not in the maps after 10 s")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;

        // Pod label change: a pod of np{j}'s namespace, not yet its peer,
        // takes the peer's app label. Pods below 500 are left alone: the
        // policy changes' endpoints and peers are among them.
        let j = local_policies[(k + local_policies.len() / 2) % local_policies.len()];
        let target = pod_ip(j % 500, o);
        let port = ports.get(&j).copied().unwrap_or_else(|| first_port(j));
        let peer_app = (j + PEER_SHIFT) % APP_GROUPS;
        let Some(q) = (500..o.pods).find(|&i| {
            i % o.namespaces == j % o.namespaces
                && i % APP_GROUPS != peer_app
                && !i.is_multiple_of(o.local_every)
                && !used.contains(&i)
                && !probe.allowed(pod_ip(i, o), target, port)
        }) else {
            report.notes.push(format!("label sample {k}: no pod left to relabel in {}", ns_of(j, o)));
            continue;
        };
        used.insert(q);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_of(q, o));
        let patch = serde_json::json!({"metadata": {"labels": {"app": format!("a{peer_app}")}}});
        let sent = Instant::now();
        pods.patch(&format!("p{q}"), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(step(format!("relabelling Pod p{q}")))?;
        let answered = Instant::now();
        match probe.wait_allowed(pod_ip(q, o), target, port, Duration::from_secs(10)) {
            Some(seen) => {
                lab.push(ms(seen, answered));
                lab_req.push(ms(seen, sent));
            }
            None => report.notes.push(format!("label sample {k}: p{q} not allowed to {target}:{port} after 10 s")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.policy_change = Percentiles::of(pol);
    report.policy_change_from_request = Percentiles::of(pol_req);
    report.label_change = Percentiles::of(lab);
    report.label_change_from_request = Percentiles::of(lab_req);
    if let Ok(body) = unix_get(&w.sock(), "/v1/status")
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
    {
        report.agent_policy_status = v["policy"].clone();
    }
    report.agent_peak_rss_mib = vm_hwm_mib(agent_pid);
    drop(w);
    Ok(())
}

fn ms(seen: Instant, from: Instant) -> f64 {
    seen.saturating_duration_since(from).as_secs_f64() * 1e3
}

/// Judges a flow from the pinned policy maps the way the datapath does for
/// an ingress-isolated endpoint: its endpoint id, the peer's identity, one
/// LPM lookup in the rules.
struct PolicyProbe {
    endpoints: BpfHashMap<MapData, EndpointKey, PolicyEndpointValue>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    rules: LpmTrie<MapData, PolicyKey, PolicyValue>,
}

impl PolicyProbe {
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| MapData::from_pin(dir.join(name)).map_err(step(format!("opening pinned {name}")));
        Ok(Self {
            endpoints: BpfHashMap::try_from(Map::HashMap(open(names::POLEP4)?)).map_err(step(names::POLEP4))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(open(names::IPCACHE4)?)).map_err(step(names::IPCACHE4))?,
            rules: LpmTrie::try_from(Map::LpmTrie(open(names::POLICY4)?)).map_err(step(names::POLICY4))?,
        })
    }

    /// Whether a new TCP flow `from` → `to:port` has an allow rule.
    fn allowed(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
        let Ok(ep) = self.endpoints.get(&EndpointKey { addr_be: u32::from(to).to_be() }, 0) else { return false };
        let Ok(peer) = self.ipcache.get(&Key::new(32, IpcacheKey { addr_be: u32::from(from).to_be() }), 0) else {
            return false;
        };
        let rule = PolicyKey {
            ep_id_be: ep.ep_id.to_be(),
            identity_be: peer.identity.to_be(),
            dir: POL_DIR_INGRESS,
            proto: proto::TCP,
            port_be: port.to_be(),
        };
        self.rules.get(&Key::new(POLICY_PREFIX_FULL, rule), 0).is_ok()
    }

    /// Polls until `from` → `to:port` is allowed; the instant it was first
    /// seen.
    fn wait_allowed(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.allowed(from, to, port) {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            // Three lookups per poll; 100 µs keeps the agent's CPU its own.
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}
