//! The bench cluster on top of a 2-node lab: netserver pods on both nodes,
//! a riptide client pod on node 1, the Services riptide serves, a plain
//! (ptp-style) pod for the kube-proxy baselines, and the routes an outside
//! client needs.
//!
//! Everything here lives inside the lab's namespaces; the plain pod's netns
//! carries the lab prefix, so the lab's teardown removes it with the rest.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use super::{
    netperf::CONTROL_PORT,
    paths::{DataPath, Scenario},
};
use crate::{
    e2e,
    lab::{Lab, LabConfig},
    netns,
};

/// The plain pod: `<prefix>-plain`, 10.42.254.2 behind node 1's `plain0`
/// (10.42.254.1). The /24 is one the node IPAM hands out only to the 255th
/// node, so it never meets a riptide pod.
pub const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 254, 2);
const PLAIN_GW: Ipv4Addr = Ipv4Addr::new(10, 42, 254, 1);
const PLAIN_NET: &str = "10.42.254.0/24";
/// A second address of the outside client (TEST-NET-3, inside the lab's
/// namespaces only) that both nodes route through node 1: a data connection
/// from it to a pod on node 2 takes node 1 both ways (`direct-sym`).
pub const RETURN_VIA_NODE1_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The ClusterIP the baselines' measured Service gets (not one of riptide's).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 255, 10);

/// NodePorts of the control connection (→ netserver's 12865): riptide's
/// Services (remote, local backend) and the baselines' rules. The
/// baselines' NodePorts are never riptide's, so riptide's uplink program
/// lets them through to netfilter.
pub fn control_node_port(scenario: Scenario, path: DataPath) -> u16 {
    let base = if path == DataPath::Riptide {
        30_000
    } else {
        32_000
    };
    base + u16::from(!scenario.remote_server())
}

/// Data ports, one per measurement, from disjoint pools: netperf's TCP_CRR
/// cycles client ports in the same order every run, so a port reused
/// through any NAT meets earlier TIME_WAIT/conntrack state (REFERENCES.md).
#[derive(Debug, Clone)]
pub struct PortPlan {
    /// Ports of riptide's ClusterIP Services (both expose all of them).
    pub cluster: Vec<u16>,
    /// NodePort = port = targetPort of riptide's NodePort Service with the
    /// remote backend, and of the one with the local backend.
    pub node_port_remote: Vec<u16>,
    pub node_port_local: Vec<u16>,
}

impl PortPlan {
    /// `per_path`: measurements of one path in one scenario over the whole run.
    pub fn new(per_path: usize) -> Self {
        let range = |start: u16| (0..per_path).map(|k| start + k as u16).collect::<Vec<_>>();
        Self {
            // riptide-sock and riptide-tc share the pool.
            cluster: range(20_001)
                .into_iter()
                .chain(range(20_001 + per_path as u16))
                .collect(),
            node_port_remote: range(30_010),
            node_port_local: range(30_010 + per_path as u16),
        }
    }
}

/// Where netperf runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// riptide's client pod, in its cgroup (socket LB applies).
    Pod,
    /// riptide's client pod's netns, outside its cgroup (no socket LB).
    PodNoCgroup,
    /// The plain pod.
    Plain,
    /// Node 1's host network.
    Node1,
    /// The outside namespace.
    Outside,
}

/// Addresses and places of a deployed bench cluster.
#[derive(Debug, Clone)]
pub struct Topology {
    pub cfg: LabConfig,
    pub server_remote: Ipv4Addr,
    pub server_local: Ipv4Addr,
    pub cip_remote: Ipv4Addr,
    pub cip_local: Ipv4Addr,
    pub pod_netns: String,
    pub pod_cgroup: PathBuf,
}

impl Topology {
    pub fn plain_netns(&self) -> String {
        format!("{}-plain", self.cfg.prefix)
    }

    pub fn server(&self, s: Scenario) -> Ipv4Addr {
        if s.remote_server() {
            self.server_remote
        } else {
            self.server_local
        }
    }

    pub fn cluster_ip(&self, s: Scenario) -> Ipv4Addr {
        if s.remote_server() {
            self.cip_remote
        } else {
            self.cip_local
        }
    }

    /// A `netperf` command at `client`'s place.
    pub fn command(&self, client: Client, program: &str) -> Result<Command> {
        match client {
            Client::Pod => netns::command_in_cgroup(&self.pod_netns, &self.pod_cgroup, program),
            Client::PodNoCgroup => netns::command(&self.pod_netns, program),
            Client::Plain => netns::command(&self.plain_netns(), program),
            Client::Node1 => netns::command(&self.cfg.node_netns(1), program),
            Client::Outside => netns::command(&self.cfg.outside_netns(), program),
        }
    }
}

/// Pods, Services, the plain pod, the outside routes and node 2's host
/// netserver; returns once both netservers answer.
pub fn deploy(lab: &mut Lab, ports: &PortPlan) -> Result<Topology> {
    apply(lab, "bench.yaml", &manifest(lab.config(), ports))?;
    let c = lab.config().clone();
    let (remote, local, client) = e2e::eventually(Duration::from_secs(90), || {
        let r = e2e::pods(lab, "app=netserver")?;
        let l = e2e::pods(lab, "app=netserver-local")?;
        let k = e2e::pods(lab, "app=client")?;
        ensure!(
            r.len() == 1 && l.len() == 1 && k.len() == 1,
            "bench pods not running yet"
        );
        Ok((r[0].clone(), l[0].clone(), k[0].clone()))
    })?;
    let v = e2e::kubectl_json(lab, &["get", "pod", &client.name])?;
    let uid = v["metadata"]["uid"].as_str().context("client pod uid")?;
    let pod_netns = format!("{}-pod-{uid}", client.node);
    let pod_cgroup = c.node_cgroup(1).join(format!("pod-{uid}"));
    ensure!(
        Path::new("/run/netns").join(&pod_netns).exists(),
        "client pod netns {pod_netns} not found"
    );
    ensure!(
        pod_cgroup.exists(),
        "client pod cgroup {} not found",
        pod_cgroup.display()
    );
    let topo = Topology {
        server_remote: remote.ip,
        server_local: local.ip,
        cip_remote: e2e::cluster_ip(lab, "netperf")?,
        cip_local: e2e::cluster_ip(lab, "netperf-local")?,
        pod_netns,
        pod_cgroup,
        cfg: c.clone(),
    };
    plain_pod(&topo)?;
    // The outside client reaches pod IPs through node 1 (the NodePort
    // scenarios' direct path): a route inside the outside netns only.
    let node1 = c.node_ip(1).to_string();
    let out = c.outside_netns();
    netns::ip(&["-n", &out, "route", "add", "10.42.0.0/16", "via", &node1])?;
    // The hop-matched direct path: replies to RETURN_VIA_NODE1_IP go from
    // node 2 to node 1 and from there to the outside client.
    let ret = format!("{RETURN_VIA_NODE1_IP}/32");
    netns::ip(&["-n", &out, "addr", "add", &ret, "dev", "eth0"])?;
    let ret_net = "203.0.113.0/24";
    netns::ip(&[
        "-n",
        &c.node_netns(2),
        "route",
        "add",
        ret_net,
        "via",
        &node1,
    ])?;
    netns::ip(&[
        "-n",
        &c.node_netns(1),
        "route",
        "add",
        ret_net,
        "via",
        &c.outside_ip().to_string(),
    ])?;
    // A client that follows ICMP redirects would, after node 1 forwarded a
    // packet back out of the interface it came in on, send to node 2
    // directly and skip the node the path is meant to cross.
    for key in [
        "net.ipv4.conf.all.accept_redirects",
        "net.ipv4.conf.eth0.accept_redirects",
    ] {
        let path = std::path::PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        netns::run_in(&out, move || std::fs::write(&path, "0"))?
            .with_context(|| format!("sysctl {key}=0 in {out}"))?;
    }
    // The host-network reference: netserver in node 2's namespace.
    let mut host_server = netns::command(&c.node_netns(2), "netserver")?;
    host_server.args(["-D", "-p", &CONTROL_PORT.to_string()]);
    lab.spawn("netserver-node2", host_server)?;
    for (client, server) in [
        (Client::PodNoCgroup, topo.server_remote),
        (Client::PodNoCgroup, topo.server_local),
    ] {
        wait_for_netserver(&topo, client, server)?;
    }
    Ok(topo)
}

/// A pod wired the way the reference `ptp` CNI plugin wires one (veth,
/// the pod's /32 with a default route via the host side's address, a /32
/// route to the pod on the node), with none of riptide's programs on its
/// veth: the client of a kube-proxy cluster. Node 2 routes its /24 via
/// node 1 as a kube-proxy cluster's CNI or cloud routes would.
fn plain_pod(t: &Topology) -> Result<()> {
    let c = &t.cfg;
    let ns = t.plain_netns();
    let node1 = c.node_netns(1);
    netns::ip(&["netns", "add", &ns])?;
    netns::ip(&[
        "link", "add", "plain0", "netns", &node1, "type", "veth", "peer", "name", "eth0", "netns",
        &ns,
    ])?;
    let (gw, ip) = (PLAIN_GW.to_string(), PLAIN_IP.to_string());
    netns::ip(&[
        "-n", &node1, "addr", "add", &gw, "peer", &ip, "dev", "plain0",
    ])?;
    netns::ip(&["-n", &node1, "link", "set", "plain0", "up"])?;
    netns::ip(&["-n", &ns, "addr", "add", &ip, "peer", &gw, "dev", "eth0"])?;
    netns::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
    netns::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    netns::ip(&["-n", &ns, "route", "add", "default", "via", &gw])?;
    netns::ip(&[
        "-n",
        &c.node_netns(2),
        "route",
        "add",
        PLAIN_NET,
        "via",
        &c.node_ip(1).to_string(),
    ])?;
    Ok(())
}

fn wait_for_netserver(t: &Topology, client: Client, server: Ipv4Addr) -> Result<()> {
    e2e::eventually(Duration::from_secs(30), || {
        super::netperf::run_with(
            t.command(client, "netperf")?,
            &super::netperf::Target {
                addr: server,
                control_port: CONTROL_PORT,
                data_port: 19_999,
                local: None,
            },
            super::netperf::Test::TcpRr,
            1,
            None,
        )
        .map(|_| ())
    })
    .with_context(|| format!("netserver on {server}"))
}

/// The bench objects: netserver pods on node 2 (`app=netserver`) and node 1
/// (`app=netserver-local`), the client pod on node 1, a ClusterIP Service
/// per server exposing the control port and every data port (TCP and UDP),
/// and a NodePort Service per server whose data ports are their own
/// NodePorts (netserver binds the port netperf names, so port, targetPort
/// and nodePort are one number).
fn manifest(c: &LabConfig, ports: &PortPlan) -> String {
    let pod = |name: &str, app: &str, node: u32, command: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  nodeName: {}\n  containers:\n  - name: main\n    image: riptide.local/netperf\n    command: {command}\n---\n",
            c.node_name(node)
        )
    };
    let netserver = format!(r#"["/usr/bin/netserver", "-D", "-p", "{CONTROL_PORT}"]"#);
    let mut m = String::new();
    m.push_str(&pod("netserver", "netserver", 2, &netserver));
    m.push_str(&pod("netserver-local", "netserver-local", 1, &netserver));
    m.push_str(&pod("client", "client", 1, r#"["/bin/sleep", "infinity"]"#));
    for (name, app) in [
        ("netperf", "netserver"),
        ("netperf-local", "netserver-local"),
    ] {
        m.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {app}}}\n  ports:\n  - {{name: control, port: {CONTROL_PORT}}}\n"
        ));
        for p in &ports.cluster {
            m.push_str(&format!(
                "  - {{name: t{p}, port: {p}}}\n  - {{name: u{p}, port: {p}, protocol: UDP}}\n"
            ));
        }
        m.push_str("---\n");
    }
    for (name, app, s, data) in [
        (
            "netperf-np",
            "netserver",
            Scenario::NodePort,
            &ports.node_port_remote,
        ),
        (
            "netperf-np-local",
            "netserver-local",
            Scenario::NodePortLocal,
            &ports.node_port_local,
        ),
    ] {
        let ctl = control_node_port(s, DataPath::Riptide);
        m.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  selector: {{app: {app}}}\n  ports:\n  - {{name: control, port: {CONTROL_PORT}, nodePort: {ctl}}}\n"
        ));
        for p in data {
            m.push_str(&format!(
                "  - {{name: t{p}, port: {p}, nodePort: {p}}}\n  - {{name: u{p}, port: {p}, nodePort: {p}, protocol: UDP}}\n"
            ));
        }
        m.push_str("---\n");
    }
    m
}

pub fn apply(lab: &Lab, file: &str, manifest: &str) -> Result<()> {
    let path = lab.config().state_dir.join(file);
    std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    e2e::kubectl(lab, &["apply", "-f", path.to_str().context("path")?]).map(|_| ())
}
