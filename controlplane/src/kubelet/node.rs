//! The kubelet's Node: registration (addresses, capacity, labels, taints,
//! kubelet endpoint), status updates with the Ready condition, and the
//! Lease in `kube-node-lease` renewed every heartbeat.
//!
//! Ready follows the network as upstream's: without a CNI config in
//! `--cni-conf-dir` the node is NotReady with the runtime's
//! `NetworkReady=false` message, and the status is posted as soon as that
//! changes (checked every heartbeat), not only every 4th heartbeat.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus, NodeSystemInfo, DaemonEndpoint, Taint},
    },
    apimachinery::pkg::{api::resource::Quantity, apis::meta::v1::MicroTime},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::Config;
use crate::controllers::util::now;

fn meminfo_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

fn capacity(cfg: &Config) -> BTreeMap<String, Quantity> {
    let cpus = cfg.cpu.clone().unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).to_string());
    let mem = cfg.memory.clone().unwrap_or_else(|| format!("{}Ki", meminfo_bytes() / 1024));
    BTreeMap::from([
        ("cpu".to_string(), Quantity(cpus)),
        ("memory".to_string(), Quantity(mem)),
        ("pods".to_string(), Quantity(cfg.max_pods.to_string())),
        ("ephemeral-storage".to_string(), Quantity("10Gi".into())),
    ])
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The node's network: a CNI config exists (Err: upstream's message).
pub fn network_ready(cfg: &Config) -> Result<(), String> {
    super::cni::Cni { conf_dir: cfg.cni_conf_dir.clone(), bin_dir: cfg.cni_bin_dir.clone() }.network_status()
}

pub fn status(cfg: &Config, old: Option<&NodeStatus>) -> NodeStatus {
    let cap = capacity(cfg);
    let t = now();
    let prev = |ty: &str| old.and_then(|s| s.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == ty)).cloned();
    let cond = |ty: &str, status: &str, reason: &str, msg: &str| {
        let p = prev(ty);
        NodeCondition {
            type_: ty.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(msg.into()),
            last_heartbeat_time: Some(t.clone()),
            last_transition_time: match p {
                Some(p) if p.status == status => p.last_transition_time,
                _ => Some(t.clone()),
            },
        }
    };
    let kernel = read_trim("/proc/sys/kernel/osrelease");
    NodeStatus {
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: cfg.node_ip.clone() },
            NodeAddress { type_: "Hostname".into(), address: cfg.node_name.clone() },
        ]),
        allocatable: Some(cap.clone()),
        capacity: Some(cap),
        conditions: Some(vec![
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            match network_ready(cfg) {
                Ok(()) => cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                Err(msg) => cond("Ready", "False", "KubeletNotReady", &msg),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints { kubelet_endpoint: Some(DaemonEndpoint { port: i32::from(cfg.port) }) }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("riptide://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: kernel,
            kube_proxy_version: String::new(),
            kubelet_version: "v1.33.0-riptide".into(),
            machine_id: read_trim("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image: "riptide lab node".into(),
            system_uuid: cfg.node_name.clone(),
            swap: None,
        }),
        ..Default::default()
    }
}

/// Creates the Node (or takes over an existing one) and posts its status.
pub async fn register(client: &Client, cfg: &Config) -> kube::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), cfg.node_name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64")),
    ]);
    labels.extend(cfg.node_labels.clone());
    let node = Node {
        metadata: ObjectMeta { name: Some(cfg.node_name.clone()), labels: Some(labels), ..Default::default() },
        spec: Some(NodeSpec {
            taints: (!cfg.register_taints.is_empty()).then(|| cfg.register_taints.clone()),
            ..Default::default()
        }),
        status: None,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = %cfg.node_name, "registered node"),
        Err(kube::Error::Api(e)) if e.code == 409 => tracing::info!(node = %cfg.node_name, "node exists, taking it over"),
        Err(e) => return Err(e),
    }
    post_status(client, cfg).await
}

pub async fn post_status(client: &Client, cfg: &Config) -> kube::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    for _ in 0..5 {
        let mut node = api.get(&cfg.node_name).await?;
        node.status = Some(status(cfg, node.status.as_ref()));
        match api.replace_status(&cfg.node_name, &PostParams::default(), &node).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub async fn renew_lease(client: &Client, cfg: &Config) -> kube::Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let spec = LeaseSpec {
        holder_identity: Some(cfg.node_name.clone()),
        lease_duration_seconds: Some(40),
        renew_time: Some(MicroTime(now().0)),
        ..Default::default()
    };
    match api.get_opt(&cfg.node_name).await? {
        Some(mut l) => {
            l.spec = Some(spec);
            api.replace(&cfg.node_name, &PostParams::default(), &l).await?;
        }
        None => {
            let node_uid = Api::<Node>::all(client.clone()).get(&cfg.node_name).await.ok().and_then(|n| n.metadata.uid);
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.node_name.clone()),
                    namespace: Some("kube-node-lease".into()),
                    owner_references: node_uid.map(|uid| {
                        vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: cfg.node_name.clone(),
                            uid,
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &l).await?;
        }
    }
    Ok(())
}

/// Lease renewal every `interval`, full status every 4 intervals (and
/// re-registration if the Node was deleted).
pub async fn heartbeat(client: Client, cfg: Config, interval: Duration) {
    let mut n: u64 = 0;
    let mut network = network_ready(&cfg).is_ok();
    loop {
        tokio::time::sleep(interval).await;
        n += 1;
        if let Err(e) = renew_lease(&client, &cfg).await {
            tracing::warn!(error = %e, "renewing node lease");
        }
        let now_ready = network_ready(&cfg).is_ok();
        let changed = now_ready != network;
        if changed {
            tracing::info!(network_ready = now_ready, "node network readiness changed");
            network = now_ready;
        }
        if changed || n.is_multiple_of(4) {
            match post_status(&client, &cfg).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    let _ = register(&client, &cfg).await;
                }
                Err(e) => tracing::warn!(error = %e, "posting node status"),
                Ok(()) => {}
            }
        }
    }
}

/// `key=value:Effect` → Taint.
pub fn parse_taint(s: &str) -> Option<Taint> {
    let (kv, effect) = s.rsplit_once(':')?;
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (kv, None),
    };
    Some(Taint { key: key.into(), value, effect: effect.into(), time_added: None })
}
