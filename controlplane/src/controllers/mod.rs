//! The controllers of kube-controller-manager that riptide needs:
//! Deployment, ReplicaSet, DaemonSet, EndpointSlice (+ legacy Endpoints), node IPAM,
//! node lifecycle and ServiceAccount. Each is a level-triggered loop over kube-rs
//! reflector caches: any watch event (or a periodic resync) wakes the loop,
//! which reconciles every object of its kind from the caches. That is
//! O(objects) per pass, fine for the clusters this control plane is for,
//! and it makes every loop idempotent and restart-safe by construction.
//! Only the API is used (kube-rs), so they run against any apiserver.

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod events;
pub mod lbipam;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod replicaset;
pub mod rollout;
pub mod serviceaccount;
pub mod util;

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet},
    coordination::v1::Lease,
    core::v1::{ConfigMap, Endpoints, Namespace, Node, Pod, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};

use self::util::{Wake, next_pass, reflect};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    ClusterCidr(#[from] nodeipam::CidrError),
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Pod range split into one /24 per node.
    pub cluster_cidr: ipnetwork::Ipv4Network,
    /// A node silent for this long becomes Ready=Unknown (k8s: 40s).
    pub node_monitor_grace: Duration,
    /// Full pass at least this often, even without events.
    pub resync: Duration,
}

/// 10.42.0.0/16, the k3s default.
pub const DEFAULT_CLUSTER_CIDR: ipnetwork::Ipv4Network = match ipnetwork::Ipv4Network::new_checked(std::net::Ipv4Addr::new(10, 42, 0, 0), 16) {
    Some(n) => n,
    None => panic!("a /16 is a valid prefix"),
};

impl Default for Config {
    fn default() -> Self {
        Self { cluster_cidr: DEFAULT_CLUSTER_CIDR, node_monitor_grace: Duration::from_secs(40), resync: Duration::from_secs(5) }
    }
}

/// Runs all controllers until the process ends.
pub async fn run(client: Client, cfg: Config) -> Result<(), Error> {
    nodeipam::check_cluster_cidr(cfg.cluster_cidr)?;
    let cidr = cfg.cluster_cidr;
    let (w_rs, w_dep, w_ep, w_node, w_lb) = (Wake::default(), Wake::default(), Wake::default(), Wake::default(), Wake::default());
    let (w_ds, w_sa) = (Wake::default(), Wake::default());
    let recorder = events::Recorder::new(client.clone(), "riptide-controller-manager", None);
    let wc = watcher::Config::default;
    let pods = reflect(Api::<Pod>::all(client.clone()), wc(), vec![w_rs.clone(), w_dep.clone(), w_ep.clone(), w_node.clone(), w_ds.clone()]).await;
    let sets = reflect(Api::<ReplicaSet>::all(client.clone()), wc(), vec![w_rs.clone(), w_dep.clone()]).await;
    let deployments = reflect(Api::<Deployment>::all(client.clone()), wc(), vec![w_dep.clone()]).await;
    let services = reflect(Api::<Service>::all(client.clone()), wc(), vec![w_ep.clone(), w_lb.clone()]).await;
    let lb_pools_cfg = wc().fields(&format!("metadata.name={}", lbipam::POOLS_CONFIGMAP));
    let lb_pools = reflect(Api::<ConfigMap>::namespaced(client.clone(), lbipam::POOLS_NAMESPACE), lb_pools_cfg, vec![w_lb.clone()]).await;
    let slices = reflect(Api::<EndpointSlice>::all(client.clone()), wc(), vec![w_ep.clone()]).await;
    let eps = reflect(Api::<Endpoints>::all(client.clone()), wc(), vec![w_ep.clone()]).await;
    let nodes = reflect(Api::<Node>::all(client.clone()), wc(), vec![w_node.clone(), w_ds.clone()]).await;
    let daemonsets = reflect(Api::<DaemonSet>::all(client.clone()), wc(), vec![w_ds.clone()]).await;
    let revisions = reflect(Api::<ControllerRevision>::all(client.clone()), wc(), vec![w_ds.clone()]).await;
    let leases = reflect(Api::<Lease>::namespaced(client.clone(), "kube-node-lease"), wc(), vec![w_node.clone()]).await;
    let namespaces = reflect(Api::<Namespace>::all(client.clone()), wc(), vec![w_sa.clone()]).await;
    let accounts = reflect(Api::<ServiceAccount>::all(client.clone()), wc(), vec![w_sa.clone()]).await;
    tracing::info!("controllers: caches synced");

    let rs_ctx = replicaset::Ctx { client: client.clone(), pods: pods.clone(), sets: sets.clone(), recorder: recorder.clone(), expectations: Default::default() };
    let dep_ctx = deployment::Ctx { client: client.clone(), deployments, sets, pods: pods.clone(), recorder: recorder.clone() };
    let lb_ctx = lbipam::Ctx { client: client.clone(), services: services.clone(), pools: lb_pools, recorder: recorder.clone(), told: Default::default() };
    let ep_ctx = endpoints::Ctx { client: client.clone(), services, pods: pods.clone(), slices, endpoints: eps };
    let ds_ctx = daemonset::Ctx::new(client.clone(), daemonsets, pods.clone(), nodes.clone(), revisions, recorder.clone());
    let ipam_ctx = nodeipam::Ctx { client: client.clone(), nodes: nodes.clone(), cidr, recorder: recorder.clone() };
    let sa_ctx = serviceaccount::Ctx { client: client.clone(), namespaces, accounts };
    let life_ctx = nodelifecycle::Ctx { client, nodes, leases, pods, recorder, grace: cfg.node_monitor_grace };
    let resync = cfg.resync;

    let rs_loop = async move {
        let mut rx = w_rs.subscribe();
        loop {
            replicaset::reconcile_all(&rs_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    let dep_loop = async move {
        let mut rx = w_dep.subscribe();
        loop {
            deployment::reconcile_all(&dep_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    let ep_loop = async move {
        let mut rx = w_ep.subscribe();
        loop {
            endpoints::reconcile_all(&ep_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    let ds_loop = async move {
        let mut rx = w_ds.subscribe();
        loop {
            daemonset::reconcile_all(&ds_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    let node_loop = async move {
        let mut rx = w_node.subscribe();
        loop {
            nodeipam::reconcile_all(&ipam_ctx).await;
            nodelifecycle::reconcile_all(&life_ctx).await;
            // Lease renewals wake this loop every few seconds per node;
            // the grace period is what matters, not instant reaction.
            next_pass(&mut rx, resync.min(Duration::from_secs(2))).await;
        }
    };
    let lb_loop = async move {
        let mut rx = w_lb.subscribe();
        loop {
            lbipam::reconcile_all(&lb_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    let sa_loop = async move {
        let mut rx = w_sa.subscribe();
        loop {
            serviceaccount::reconcile_all(&sa_ctx).await;
            next_pass(&mut rx, resync).await;
        }
    };
    tokio::join!(rs_loop, dep_loop, ep_loop, node_loop, lb_loop, ds_loop, sa_loop);
    Ok(())
}
