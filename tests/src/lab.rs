//! Bringing a lab up and tearing it down, completely and idempotently.
//!
//! Everything the lab creates is named from its prefix, so teardown works
//! from names alone: a crashed run that left no state is still cleaned by
//! the next `up` or by `down`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use riptide_test_support::cgroup::{remove_tree, tree_pids};
use serde::{Deserialize, Serialize};

use crate::netns::{self, ip};

/// cgroup v2 hierarchy on these machines; the lab creates `<prefix>/<node>`
/// under it and attaches nothing anywhere else.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// bpffs directory of riptide's per-node pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/riptide";
/// The cluster DNS Service's address (kubelets' `--cluster-dns`); the
/// `kube-dns` Service of `manifests/riptide-dns.yaml` asks for it.
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
/// Kubelets' `--cluster-domain`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The port of every lab agent's `--metrics-addr` (on the node's address),
/// the one `manifests/riptide.yaml` gives the DaemonSet's agents.
pub const AGENT_METRICS_PORT: u16 = 9962;
/// Image of riptide's own components in `manifests/` (without the tag).
const RIPTIDE_IMAGE: &str = "localhost/riptide:";
/// A second image of riptide in every kubelet's image map, what an image
/// change rolls out to: this build again, from a directory of its own
/// (`<state>/images/next`, hard links of the binaries).
pub const NEXT_IMAGE: &str = "localhost/riptide:0.1.1";
/// The binaries of riptide's image (`manifests/image/Containerfile`).
const IMAGE_BINARIES: &[&str] = &["riptide-agent", "riptide-cni", "riptide"];

#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every name the lab creates (netns, veth, cgroup, node names).
    pub prefix: String,
    /// Number of nodes.
    pub nodes: u32,
    /// Underlay is 198.18.<subnet>.0/24 (RFC 2544 benchmarking space).
    pub subnet: u8,
    /// Directory holding riptide-agent and the other binaries.
    pub bin_dir: PathBuf,
    /// State, logs and kubeconfig (`target/lab` for `cargo xtask run`).
    pub state_dir: PathBuf,
}

impl LabConfig {
    /// A lab for a test: unique prefix and subnet derived from the pid, state
    /// in a temporary directory, binaries next to the test executable.
    pub fn for_test(nodes: u32) -> Result<Self> {
        let pid = std::process::id();
        let prefix = format!("rtt{}", pid % 100_000);
        let state_dir = std::env::temp_dir().join(format!("riptide-{prefix}"));
        Ok(Self {
            prefix,
            nodes,
            // 198.18.0.x is the interactive lab's; tests use 100..=227.
            subnet: 100 + (pid % 128) as u8,
            bin_dir: bin_dir_of_current_exe()?,
            state_dir,
        })
    }

    pub fn underlay_netns(&self) -> String {
        format!("{}-ul", self.prefix)
    }
    pub fn outside_netns(&self) -> String {
        format!("{}-out", self.prefix)
    }
    pub fn node_name(&self, i: u32) -> String {
        format!("{}-n{i}", self.prefix)
    }
    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> Option<u32> {
        (1..=self.nodes).find(|i| self.node_name(*i) == name)
    }
    /// Nodes' netns are named like the nodes.
    pub fn node_netns(&self, i: u32) -> String {
        self.node_name(i)
    }
    pub fn node_ip(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 10 + i as u8)
    }
    pub fn outside_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 100)
    }
    /// Addresses Services may take as `externalIPs` (the apiserver's
    /// `--service-external-ip-cidrs`): .200-.207 of the underlay.
    pub fn external_ip_cidr(&self) -> String {
        format!("198.18.{}.200/29", self.subnet)
    }
    /// The default LoadBalancer pool (`kube-system/riptide-lb-pools`):
    /// .208-.223 of the underlay, answered by ARP from one node each.
    pub fn lb_pool(&self) -> String {
        format!("198.18.{0}.208-198.18.{0}.223", self.subnet)
    }
    /// The root namespace's address on the lab (where the control plane listens).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, 1)
    }
    /// The root-namespace end of the lab veth.
    pub fn host_link(&self) -> String {
        format!("{}0", self.prefix)
    }
    pub fn cgroup_dir(&self) -> PathBuf {
        Path::new(CGROUP2_ROOT).join(&self.prefix)
    }
    pub fn node_cgroup(&self, i: u32) -> PathBuf {
        self.cgroup_dir().join(self.node_name(i))
    }
    /// The admin kubeconfig the lab's apiserver writes.
    pub fn kubeconfig(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }
    /// The agents' kubeconfig: a token of the ServiceAccount that
    /// `manifests/riptide.yaml` binds to its ClusterRole, so agents run with
    /// exactly the rights the DaemonSet has (written by `start_cluster`).
    pub fn agent_kubeconfig(&self) -> PathBuf {
        self.state_dir.join("agent.kubeconfig")
    }
    /// The apiserver's address (in the root namespace, on the lab veth).
    pub fn apiserver_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.host_ip(), 6443))
    }
    /// Per-node state: CNI config, podCIDR file, agent socket, kubelet dir.
    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.state_dir.join("nodes").join(self.node_name(i))
    }
    /// Node `i`'s own `/` for hostPath volumes (the kubelet's
    /// `--host-path-root`), with its CNI dirs `etc/cni/net.d` and `opt/cni/bin`.
    pub fn node_root(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("root")
    }
    /// The node agent's API socket (for the `riptide` CLI). With
    /// [`Install::Manifest`] a link to the agent pod's
    /// `/run/riptide/<node>/agent.sock`.
    pub fn agent_socket(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("agent.sock")
    }
    /// Node `i`'s kubelet identity (system:node:<name>) and the serving
    /// certificate of its API, issued from the control plane's CA into
    /// `<node dir>/credentials` (the control plane must have started).
    pub fn kubelet_credentials(&self, i: u32) -> Result<PathBuf> {
        let creds = self.node_dir(i).join("credentials");
        let out = Command::new(self.bin_dir.join("riptide-controlplane"))
            .arg("kubelet-credentials")
            .arg("--data-dir")
            .arg(self.state_dir.join("controlplane"))
            .args(["--server", &format!("https://{}", self.apiserver_addr())])
            .args(["--node-name", &self.node_name(i), "--node-ip", &self.node_ip(i).to_string()])
            .arg("--out-dir")
            .arg(&creds)
            .output()
            .context("running riptide-controlplane kubelet-credentials")?;
        if !out.status.success() {
            bail!("kubelet-credentials for {}: {}", self.node_name(i), String::from_utf8_lossy(&out.stderr));
        }
        Ok(creds)
    }
    fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
}

/// The binaries of this workspace live next to `target/<profile>/deps/<test>`.
fn bin_dir_of_current_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().context("executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    Ok(dir.to_path_buf())
}

/// How the nodes are connected and how pods reach other nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabNet {
    /// Nodes are not on the lab bridge: each sits on its own point-to-point
    /// link to the underlay namespace, which routes between them (and
    /// proxy-ARPs for them on the bridge, so the control plane and the
    /// outside namespace keep their /24). The router knows nothing of pod
    /// CIDRs, so routes via node addresses (native routing) cannot work:
    /// a node's peers are not on-link.
    pub routed: bool,
    /// `--tunnel` of every agent (e.g. `vxlan`); `None`: native routing.
    pub tunnel: Option<String>,
}

/// What the live summary shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub nodes: usize,
    pub nodes_ready: usize,
    pub pods: usize,
    pub pods_running: usize,
    pub pods_ready: usize,
    pub services: usize,
}

/// How riptide gets onto the lab's nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Install {
    /// The user's way: bare kubelets, then `manifests/riptide.yaml` applied
    /// through the apiserver; the DaemonSet's init container installs the
    /// CNI into each node's own root and the agent pods make nodes Ready.
    #[default]
    Manifest,
    /// The lab writes every node's CNI config and starts every agent
    /// itself, outside Kubernetes: for debugging the agent or the CNI alone.
    HandWired,
}

impl Install {
    /// `RIPTIDE_LAB_INSTALL` (`manifest` or `hand-wired`), else the
    /// default (the manifest): how [`Lab::start_cluster`] installs riptide,
    /// so a suite can be run hand-wired for debugging without changing it.
    pub fn from_env() -> Result<Self> {
        match std::env::var("RIPTIDE_LAB_INSTALL") {
            Ok(v) => v.parse().context("RIPTIDE_LAB_INSTALL"),
            Err(_) => Ok(Self::default()),
        }
    }
}

impl std::str::FromStr for Install {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hand-wired" => Ok(Self::HandWired),
            "manifest" => Ok(Self::Manifest),
            _ => bail!("{s:?}: install is manifest or hand-wired"),
        }
    }
}

/// Node `i`'s kubelet flags for hostPath volumes when riptide comes from
/// the manifest, `root` being the node's own `/` (namespace and VM nodes
/// alike).
pub fn kubelet_host_path_args(c: &LabConfig, i: u32, root: &Path) -> Vec<String> {
    let masked = [c.state_dir.join("controlplane"), c.kubeconfig(), c.agent_kubeconfig(), c.state_dir.join("nodes")];
    vec![
        // Each node's own `/` for hostPath volumes, as kind's node
        // containers; bpffs, cgroups and /run/riptide/<node> (named per
        // node, like the pins) stay the machine's.
        "--host-path-root".into(),
        root.display().to_string(),
        // Every node of the lab shares this machine's filesystem: hide the
        // control plane's keys and tokens, the kubeconfigs and all nodes'
        // credentials and pod volumes from (unprivileged) pods.
        "--mask-path".into(),
        masked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(","),
        "--host-path-shared".into(),
        "/proc,/sys,/dev,/run/netns,/var/run/netns,/run/riptide".into(),
        // The machine's cgroup root is this node's cgroup: socket LB
        // attaches to the lab's cgroups and nowhere else.
        "--host-path-map".into(),
        format!("/sys/fs/cgroup={}", c.node_cgroup(i).display()),
    ]
}

/// The conflist a hand-wired node's kubelet reads: the riptide plugin for
/// node `node_name`, reading its podCIDR from `pod_cidr_file`, keeping its
/// IPAM state in `state_dir` and giving pods `mtu`.
pub(crate) fn cni_conflist(node_name: &str, pod_cidr_file: &Path, state_dir: &Path, mtu: u32) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "riptide",
        "plugins": [{
            "type": "riptide",
            "nodeName": node_name,
            "podCIDRFile": pod_cidr_file,
            "clusterCIDR": "10.42.0.0/16",
            "stateDir": state_dir,
            "mtu": mtu,
        }],
    })
}

/// Pods' MTU: the vxlan device takes 50 bytes of the uplink's 1500.
pub(crate) fn pod_mtu(tunnel: Option<&str>) -> u32 {
    if tunnel.is_some() { 1450 } else { 1500 }
}

/// The `riptide-config` keys that say how pods reach other nodes: the
/// routing mode (`native` without a tunnel) and the pods' MTU under it.
fn routing_config(tunnel: Option<&str>) -> [(&'static str, String); 2] {
    [("routing-mode", tunnel.unwrap_or("native").to_owned()), ("mtu", pod_mtu(tunnel).to_string())]
}

/// Where `riptide-agent` keeps the podCIDR file and its API socket on a
/// node (`/run/riptide/<node>/`), and where `install-cni`'s conflist keeps
/// the plugin's IPAM state (`/var/lib/cni/riptide/<node>/`): machine paths
/// named per node, shared with the kubelet that runs the CNI plugin.
const NODE_RUN_DIRS: &[&str] = &["/run/riptide", "/var/lib/cni/riptide"];

/// The agent pods of `manifests/riptide.yaml` and their agent container.
const AGENT_SELECTOR: &str = "app.kubernetes.io/name=riptide-agent";
const AGENT_CONTAINER: &str = "agent";

/// What a running lab records so `down` can find processes of a crashed run.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    prefix: String,
    pids: Vec<u32>,
}

/// A process the lab started.
struct Proc {
    label: String,
    child: Child,
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    cfg: LabConfig,
    net: LabNet,
    procs: Vec<Proc>,
    /// Labels started so far: a label started again (a restarted agent)
    /// appends to its log instead of truncating it.
    started: BTreeSet<String>,
    /// `--service-external-ip-cidrs` of the next control-plane start
    /// (`None`: [`LabConfig::external_ip_cidr`]).
    external_ip_cidrs: Option<String>,
    install: Install,
    /// Agent containers [`Lab::kill_agent`] killed (manifest install), by
    /// node: the pod's uid and the container's restart count before.
    killed_agents: BTreeMap<u32, (String, u64)>,
    /// `--xdp` of hand-wired agents ([`Lab::set_xdp`]; `None`: the agent's
    /// default).
    xdp: Option<String>,
    /// The `XDP_PASS` links on the underlay end of every node link that
    /// [`Lab::set_xdp`] attached; they detach when the lab drops.
    xdp_peers: Vec<OwnedFd>,
    down: bool,
}

impl Lab {
    /// Cleans leftovers of an earlier run with the same prefix, then builds
    /// the topology. On any error, whatever was built is removed again.
    pub fn up(cfg: LabConfig) -> Result<Self> {
        Self::up_with(cfg, LabNet::default())
    }

    /// [`Lab::up`] with a routed underlay and/or a tunnel (see [`LabNet`]).
    pub fn up_with(cfg: LabConfig, net: LabNet) -> Result<Self> {
        if cfg.nodes == 0 || cfg.nodes > 100 {
            bail!("a lab has 1 to 100 nodes, not {}", cfg.nodes);
        }
        teardown(&cfg.prefix, &cfg.state_dir)?;
        std::fs::create_dir_all(cfg.log_dir())
            .with_context(|| format!("creating {}", cfg.log_dir().display()))?;
        let mut lab = Self {
            cfg,
            net,
            procs: Vec::new(),
            started: BTreeSet::new(),
            external_ip_cidrs: None,
            install: Install::default(),
            killed_agents: BTreeMap::new(),
            xdp: None,
            xdp_peers: Vec::new(),
            down: false,
        };
        lab.save_state()?;
        if let Err(e) = lab.build_topology() {
            let _ = lab.down();
            return Err(e.context("building the lab topology"));
        }
        Ok(lab)
    }

    pub fn config(&self) -> &LabConfig {
        &self.cfg
    }

    pub fn net(&self) -> &LabNet {
        &self.net
    }


    /// Address of the underlay router on the bridge and on every node link
    /// (routed underlay only).
    pub fn router_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.cfg.subnet, 254)
    }

    fn build_topology(&mut self) -> Result<()> {
        let c = &self.cfg;
        let ul = c.underlay_netns();
        add_netns(&ul)?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;

        // Root namespace end, for reaching the control plane.
        let host = c.host_link();
        ip(&["link", "add", &host, "type", "veth", "peer", "name", "cp", "netns", &ul])?;
        ip(&["-n", &ul, "link", "set", "cp", "master", "br0", "up"])?;
        // Never forward anything that arrives from the lab (it could leave
        // through eth0 otherwise); the root namespace only terminates.
        sysctl_root(&format!("net/ipv4/conf/{host}/forwarding"), "0")?;
        sysctl_root(&format!("net/ipv6/conf/{host}/disable_ipv6"), "1")?;
        ip(&["addr", "add", &format!("{}/24", c.host_ip()), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;

        if self.net.routed {
            let r = format!("{}/24", self.router_ip());
            ip(&["-n", &ul, "addr", "add", &r, "dev", "br0"])?;
            sysctl_in(&ul, "net.ipv4.ip_forward", "1")?;
            // Answer ARP on the bridge for the nodes behind their links.
            sysctl_in(&ul, "net.ipv4.conf.br0.proxy_arp", "1")?;
            // Forwarding between two node links is routing, not a detour:
            // no ICMP redirects that would teach nodes a shortcut.
            sysctl_in(&ul, "net.ipv4.conf.all.send_redirects", "0")?;
            sysctl_in(&ul, "net.ipv4.conf.default.send_redirects", "0")?;
            // Anti-spoofing, as cloud underlays do (source/destination
            // checks): a packet whose source is not routed back through the
            // link it came from (a pod address) is dropped. The tunnel must
            // carry every pod-sourced packet between nodes.
            sysctl_in(&ul, "net.ipv4.conf.all.rp_filter", "1")?;
        }
        for i in 1..=c.nodes {
            self.build_node(i)?;
        }
        self.add_host_on_underlay(&c.outside_netns(), "out", c.outside_ip())?;
        Ok(())
    }

    /// Node `i`'s netns on the underlay and its cgroup.
    fn build_node(&self, i: u32) -> Result<()> {
        let c = &self.cfg;
        let ns = c.node_netns(i);
        if self.net.routed {
            self.add_routed_node(&ns, &format!("n{i}"), c.node_ip(i))?;
        } else {
            self.add_host_on_underlay(&ns, &format!("n{i}"), c.node_ip(i))?;
        }
        // Nodes route pods: forwarding on inside the node's namespace.
        sysctl_in(&ns, "net.ipv4.ip_forward", "1")?;
        std::fs::create_dir_all(c.node_cgroup(i)).with_context(|| format!("creating cgroup {}", c.node_cgroup(i).display()))
    }

    /// Adds a node to the running lab, as an operator joins a machine to a
    /// cluster: its netns on the underlay, its cgroup and its kubelet. From
    /// the manifest the DaemonSet then gives it an agent pod (whose init
    /// container installs the CNI); hand-wired, the lab starts its agent.
    /// Returns the new node's index; [`LabConfig::nodes`] counts it.
    pub fn add_node(&mut self) -> Result<u32> {
        let i = self.cfg.nodes + 1;
        if i > 100 {
            bail!("a lab has at most 100 nodes");
        }
        // Counted before anything exists, so teardown and diagnostics see
        // a half-built node too.
        self.cfg.nodes = i;
        self.build_node(i).with_context(|| format!("building node {}", self.cfg.node_name(i)))?;
        if self.install == Install::HandWired {
            self.start_agent(i)?;
        }
        self.start_kubelet(i)?;
        Ok(i)
    }

    /// A node on its own link to the underlay router: `addr/32` on the
    /// node side, the router's address (also /32) on the other, the lab
    /// range routed via the router.
    fn add_routed_node(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let ul = self.cfg.underlay_netns();
        let router = self.router_ip().to_string();
        add_netns(ns)?;
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &ul,
        ])?;
        self.route_node_link(port, addr)?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", &format!("{router}/32"), "dev", "eth0", "scope", "link"])?;
        let lan = format!("198.18.{}.0/24", self.cfg.subnet);
        ip(&["-n", ns, "route", "add", &lan, "via", &router, "dev", "eth0"])?;
        Ok(())
    }

    /// The router's end of node `addr`'s own link `port` (already in the
    /// underlay namespace): the router's address (/32) on it, up, and the
    /// node's /32 routed through it. A VM node's tap gets the same.
    pub(crate) fn route_node_link(&self, port: &str, addr: Ipv4Addr) -> Result<()> {
        let ul = self.cfg.underlay_netns();
        ip(&["-n", &ul, "addr", "add", &format!("{}/32", self.router_ip()), "dev", port])?;
        ip(&["-n", &ul, "link", "set", port, "up"])?;
        ip(&["-n", &ul, "route", "add", &format!("{addr}/32"), "dev", port])
    }

    fn add_host_on_underlay(&self, ns: &str, port: &str, addr: Ipv4Addr) -> Result<()> {
        let ul = self.cfg.underlay_netns();
        add_netns(ns)?;
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", &ul,
        ])?;
        ip(&["-n", &ul, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Starts `cmd` (already pointed at its netns if any), logging to
    /// `<state>/logs/<label>.log`, and records it for teardown. A label
    /// started before in this lab appends to its log after a marker line,
    /// so what happened before a restart stays readable.
    pub fn spawn(&mut self, label: &str, mut cmd: Command) -> Result<u32> {
        let log = self.cfg.log_dir().join(format!("{label}.log"));
        let out = if self.started.contains(label) {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?;
            writeln!(f, "----- lab: {label} started again -----").with_context(|| format!("writing {}", log.display()))?;
            f
        } else {
            File::create(&log).with_context(|| format!("creating {}", log.display()))?
        };
        let err = out.try_clone().context("duplicating log fd")?;
        let child = cmd
            // Plain text in log files (tracing-subscriber honours NO_COLOR).
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {label}: {cmd:?}"))?;
        let pid = child.id();
        self.started.insert(label.to_owned());
        self.procs.push(Proc {
            label: label.to_owned(),
            child,
        });
        self.save_state()?;
        Ok(pid)
    }

    fn bin(&self, name: &str) -> Result<PathBuf> {
        let bin = self.cfg.bin_dir.join(name);
        if !bin.exists() {
            bail!("{} is missing: build the workspace first (cargo build --bins)", bin.display());
        }
        Ok(bin)
    }

    /// Starts the control plane (apiserver, controllers, scheduler in one
    /// process) in the root namespace on the lab's host address, and waits
    /// until it accepts connections and has written the kubeconfig.
    pub fn start_control_plane(&mut self) -> Result<PathBuf> {
        self.start_apiserver_as("control-plane")
    }

    /// Stops the control plane (SIGTERM) and starts it again on the same
    /// state with `--service-external-ip-cidrs` = `cidrs` (e.g. to store
    /// what admission refuses by default). Kubelets and agents reconnect.
    pub fn restart_control_plane_allowing_external_ips(&mut self, cidrs: &str) -> Result<()> {
        let pos = self.procs.iter().position(|p| p.label == "apiserver").context("the control plane is not running")?;
        let mut p = self.procs.remove(pos);
        signal(p.child.id(), libc::SIGTERM);
        p.child.wait().context("waiting for the control plane to stop")?;
        self.external_ip_cidrs = Some(cidrs.to_owned());
        self.start_control_plane().map(|_| ())
    }

    /// Starts only the apiserver (no controllers), like `start_control_plane`.
    pub fn start_apiserver(&mut self) -> Result<PathBuf> {
        self.start_apiserver_as("apiserver")
    }

    fn start_apiserver_as(&mut self, subcommand: &str) -> Result<PathBuf> {
        let c = self.cfg.clone();
        let mut cmd = Command::new(self.bin("riptide-controlplane")?);
        let url = format!("https://{}", c.apiserver_addr());
        cmd.args([subcommand, "--listen", &c.apiserver_addr().to_string()])
            .arg("--data-dir")
            .arg(c.state_dir.join("controlplane"))
            .args(["--tls-san", &c.host_ip().to_string(), "--advertise-url", &url])
            .args(["--service-external-ip-cidrs", self.external_ip_cidrs.as_deref().unwrap_or(&c.external_ip_cidr())])
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let _ = std::fs::remove_file(c.kubeconfig());
        self.spawn("apiserver", cmd)?;
        self.wait_for_apiserver()?;
        self.apply_lb_pool()?;
        Ok(c.kubeconfig())
    }

    /// The default LoadBalancer pool on the underlay, so `type:
    /// LoadBalancer` works from the outside namespace as on a LAN.
    fn apply_lb_pool(&self) -> Result<()> {
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "riptide-lb-pools", "namespace": "kube-system"},
            "data": {"default": self.cfg.lb_pool()},
        });
        let path = self.cfg.state_dir.join("lb-pools.json");
        std::fs::write(&path, cm.to_string()).with_context(|| format!("writing {}", path.display()))?;
        let out = self.kubectl().arg("apply").arg("-f").arg(&path).output().context("running kubectl")?;
        if !out.status.success() {
            bail!("applying the LoadBalancer pool: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn wait_for_apiserver(&mut self) -> Result<()> {
        let c = self.cfg.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.kubeconfig().exists()
                && std::net::TcpStream::connect_timeout(&c.apiserver_addr(), Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if let Some((label, st)) = self.exited().into_iter().next() {
                bail!("{label} exited ({st}) while starting:\n{}", self.log_tail(&label, 30));
            }
            if Instant::now() > deadline {
                bail!("apiserver not ready after 30 s:\n{}", self.log_tail("apiserver", 30));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `kubectl` command pointed at the lab, with its own discovery cache.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.cfg.kubeconfig())
            .arg("--cache-dir")
            .arg(self.cfg.state_dir.join("kubectl-cache"));
        cmd
    }

    /// Starts the node agent of node `i` in its netns. With a control plane
    /// running it watches the cluster; without one it only loads the datapath.
    /// From the manifest agents are the DaemonSet's pods: this waits until
    /// the kubelet has restarted the container [`Lab::kill_agent`] killed
    /// and it is ready again; the new process's pid.
    pub fn start_agent(&mut self, i: u32) -> Result<u32> {
        if self.install == Install::Manifest {
            return self.wait_for_agent_restart(i, Duration::from_secs(90));
        }
        let c = self.cfg.clone();
        let bin = self.bin("riptide-agent")?;
        std::fs::create_dir_all(c.node_dir(i))
            .with_context(|| format!("creating {}", c.node_dir(i).display()))?;
        let mut cmd = netns::command(&c.node_netns(i), &bin)?;
        cmd.args(["--node-name", &c.node_name(i)])
            .args(["--node-ip", &c.node_ip(i).to_string()])
            .arg("--pod-cidr-file")
            .arg(c.node_dir(i).join("podcidr"))
            .arg("--api-socket")
            .arg(c.agent_socket(i))
            .args(["--metrics-addr", &format!("{}:{AGENT_METRICS_PORT}", c.node_ip(i))])
            .arg("--cgroup")
            .arg(c.node_cgroup(i))
            .args(["--uplink", "eth0"])
            // The node's own lab link, inside its namespace.
            .arg("--l2-announcements")
            .args(self.net.tunnel.iter().flat_map(|t| ["--tunnel", t.as_str()]))
            .args(self.xdp.iter().flat_map(|x| ["--xdp", x.as_str()]))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if c.agent_kubeconfig().exists() {
            cmd.arg("--kubeconfig").arg(c.agent_kubeconfig());
        } else if c.kubeconfig().exists() {
            cmd.arg("--kubeconfig").arg(c.kubeconfig());
        } else {
            cmd.env_remove("KUBECONFIG");
        }
        self.spawn(&format!("{}-agent", c.node_name(i)), cmd)
    }

    /// Kills node `i`'s agent with SIGKILL, as a crash or the OOM killer
    /// would: none of its own cleanup runs, so pins, pinned links, routes
    /// and its API socket stay as it left them. [`Lab::start_agent`] starts
    /// a new one (its log continues the old one's). From the manifest the
    /// victim is the agent container's process of the node's agent pod;
    /// its kubelet restarts the container after its crash back-off, as for
    /// any crash, and [`Lab::start_agent`] waits for that.
    pub fn kill_agent(&mut self, i: u32) -> Result<()> {
        if self.install == Install::Manifest {
            return self.kill_agent_container(i);
        }
        let label = format!("{}-agent", self.cfg.node_name(i));
        self.stop_process(&label)
    }

    /// Stops node `i`'s kubelet with SIGKILL, as when its machine dies: its
    /// pods' processes stay as they are, nobody restarts a container of
    /// the node (from the manifest, an agent [`Lab::kill_agent`] kills then
    /// stays dead) and its Node stops being renewed.
    /// [`Lab::start_kubelet`] starts it again; it adopts the node's pods.
    pub fn stop_kubelet(&mut self, i: u32) -> Result<()> {
        let label = format!("{}-kubelet", self.cfg.node_name(i));
        self.stop_process(&label)
    }

    /// SIGKILLs the lab process `label` and forgets it, so waits do not
    /// take its exit for a failure.
    fn stop_process(&mut self, label: &str) -> Result<()> {
        let pos = self
            .procs
            .iter()
            .position(|p| p.label == label)
            .with_context(|| format!("{label} is not running"))?;
        let mut p = self.procs.remove(pos);
        let pid = p.child.id();
        p.child.kill().with_context(|| format!("killing {label} (pid {pid})"))?;
        p.child.wait().with_context(|| format!("reaping {label} (pid {pid})"))?;
        self.save_state()
    }

    /// Node `i`'s agent pod (from the manifest): its name, uid and the
    /// agent container's status.
    fn agent_pod(&self, i: u32) -> Result<(String, String, serde_json::Value)> {
        let node = self.cfg.node_name(i);
        let out = self
            .kubectl()
            .args(["-n", "riptide-system", "get", "pods", "-l", AGENT_SELECTOR, "--field-selector"])
            .arg(format!("spec.nodeName={node}"))
            .args(["-o", "json"])
            .output()
            .context("kubectl get pods")?;
        if !out.status.success() {
            bail!("listing the agent pod of {node}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing kubectl's pod list")?;
        let pod = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["metadata"]["deletionTimestamp"].is_null())
            .with_context(|| format!("{node} has no agent pod"))?;
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let uid = pod["metadata"]["uid"].as_str().with_context(|| format!("agent pod {name} has no uid"))?.to_owned();
        let status = pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == AGENT_CONTAINER)
            .cloned()
            .unwrap_or_default();
        Ok((name, uid, status))
    }

    /// Pids of the agent container's process in node `i`'s agent pod (its
    /// cgroup, `<node cgroup>/pod-<uid>`, the kubelet's layout).
    fn agent_container_pids(&self, i: u32, uid: &str) -> Vec<u32> {
        let dir = self.cfg.node_cgroup(i).join(format!("pod-{uid}"));
        tree_pids(&dir)
            .into_iter()
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "riptide-agent"))
            .collect()
    }

    fn kill_agent_container(&mut self, i: u32) -> Result<()> {
        let (pod, uid, status) = self.agent_pod(i)?;
        let pids = self.agent_container_pids(i, &uid);
        if pids.is_empty() {
            bail!("agent pod {pod} has no riptide-agent process");
        }
        for p in &pids {
            signal(*p, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| is_alive(*p)) {
            if Instant::now() > deadline {
                bail!("agent of {pod} (pids {pids:?}) still alive 5 s after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.killed_agents.insert(i, (uid, status["restartCount"].as_u64().unwrap_or(0)));
        Ok(())
    }

    fn wait_for_agent_restart(&mut self, i: u32, timeout: Duration) -> Result<u32> {
        let node = self.cfg.node_name(i);
        let (uid, restarts) = self
            .killed_agents
            .remove(&i)
            .with_context(|| format!("the agent of {node} is the DaemonSet's pod: kill_agent({i}) first, its kubelet restarts it"))?;
        let mut pid = 0;
        self.wait_until(&format!("the kubelet restarting the agent of {node}"), timeout, |lab| {
            let Ok((_, now_uid, st)) = lab.agent_pod(i) else { return false };
            let restarted = now_uid != uid || st["restartCount"].as_u64().unwrap_or(0) > restarts;
            if restarted && st["ready"] == true {
                pid = lab.agent_container_pids(i, &now_uid).first().copied().unwrap_or(0);
            }
            pid != 0
        })?;
        Ok(pid)
    }

    /// The last `n` lines of node `i`'s agent log: the lab's log file of a
    /// hand-wired agent; from the manifest, the kubelet's log files of the
    /// node's agent containers (every pod and restart, oldest first), read
    /// from disk so they are there while the apiserver or the pod is not.
    pub fn agent_log_tail(&self, i: u32, n: usize) -> String {
        if self.install != Install::Manifest {
            return self.log_tail(&format!("{}-agent", self.cfg.node_name(i)), n);
        }
        // `<root-dir>/pods/<uid>/<container>/<restart>.log`
        // (`controlplane/src/kubelet/state.rs`).
        let pods = self.cfg.node_dir(i).join("kubelet").join("pods");
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(pods)
            .into_iter()
            .flatten()
            .filter_map(std::result::Result::ok)
            .flat_map(|pod| std::fs::read_dir(pod.path().join(AGENT_CONTAINER)).into_iter().flatten().filter_map(std::result::Result::ok))
            .filter_map(|f| Some((f.metadata().ok()?.modified().ok()?, f.path())))
            .collect();
        logs.sort();
        let mut text = String::new();
        for (_, path) in logs {
            text.push_str(&format!("----- {} -----\n", path.display()));
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Writes node `i`'s CNI config (conflist naming the node, its podCIDR
    /// file written by the agent, its own IPAM state) and a bin dir holding
    /// the plugin as `riptide`, as `/etc/cni/net.d` and `/opt/cni/bin` would.
    fn write_cni_config(&self, i: u32) -> Result<(PathBuf, PathBuf)> {
        let c = &self.cfg;
        let conf_dir = c.node_dir(i).join("cni");
        let bin_dir = c.state_dir.join("cni-bin");
        std::fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
        std::fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
        let plugin = bin_dir.join("riptide");
        let _ = std::fs::remove_file(&plugin);
        std::os::unix::fs::symlink(self.bin("riptide-cni")?, &plugin)
            .with_context(|| format!("linking {}", plugin.display()))?;
        let conf = cni_conflist(
            &c.node_name(i),
            &c.node_dir(i).join("podcidr"),
            &c.node_dir(i).join("ipam"),
            pod_mtu(self.net.tunnel.as_deref()),
        );
        let path = conf_dir.join("10-riptide.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok((conf_dir, bin_dir))
    }

    /// Starts node `i`'s kubelet in its netns (pods get their own netns and
    /// a cgroup under the node's, where the agent's socket LB applies).
    pub fn start_kubelet(&mut self, i: u32) -> Result<u32> {
        let c = self.cfg.clone();
        let (conf_dir, bin_dir) = match self.install {
            Install::HandWired => self.write_cni_config(i)?,
            // Empty until the DaemonSet's install-cni fills them (the node
            // stays NetworkReady=false meanwhile).
            Install::Manifest => {
                let root = c.node_root(i);
                let dirs = (root.join("etc/cni/net.d"), root.join("opt/cni/bin"));
                for d in [&dirs.0, &dirs.1] {
                    std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                }
                // The `riptide` CLI's usual place in the lab.
                let link = c.agent_socket(i);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(Path::new("/run/riptide").join(c.node_name(i)).join("agent.sock"), &link)
                    .with_context(|| format!("linking {}", link.display()))?;
                dirs
            }
        };
        let bin = self.bin("riptide-controlplane")?;
        let creds = c.kubelet_credentials(i)?;
        let mut cmd = netns::command(&c.node_netns(i), &bin)?;
        cmd.arg("kubelet")
            .arg("--kubeconfig")
            .arg(creds.join("kubelet.kubeconfig"))
            .arg("--tls-cert-file")
            .arg(creds.join("kubelet.crt"))
            .arg("--tls-private-key-file")
            .arg(creds.join("kubelet.key"))
            .arg("--client-ca-file")
            .arg(creds.join("ca.crt"))
            .args(["--node-name", &c.node_name(i), "--node-ip", &c.node_ip(i).to_string()])
            .arg("--cni-conf-dir")
            .arg(conf_dir)
            .arg("--cni-bin-dir")
            .arg(bin_dir)
            .arg("--cgroup-root")
            .arg(c.node_cgroup(i))
            .arg("--root-dir")
            .arg(c.node_dir(i).join("kubelet"))
            // The kubelet looks for a CNI config (NetworkReady) on its
            // heartbeat: every 2 s rather than 10 s, so a node turns Ready
            // soon after `install-cni` has written the conflist, not up to
            // 10 s later, on every lab start.
            .args(["--heartbeat-interval", "2s"])
            .args(["--cluster-dns", &CLUSTER_DNS.to_string(), "--cluster-domain", CLUSTER_DOMAIN])
            .arg("--image-map")
            .arg(self.write_image_map()?)
            .args(kubelet_host_path_args(&c, i, &c.node_root(i)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        self.spawn(&format!("{}-kubelet", c.node_name(i)), cmd)
    }

    /// The kubelets' image map (`controlplane/src/kubelet/image.rs`):
    /// riptide's image is this workspace's build directory ([`NEXT_IMAGE`]
    /// the same build from a directory of its own), pause sleeps, every
    /// other image runs its command from this machine's filesystem.
    pub fn write_image_map(&self) -> Result<PathBuf> {
        let path = self.cfg.state_dir.join("image-map");
        let next = self.stage_next_image()?;
        let map = format!(
            "{NEXT_IMAGE} = {}\n{RIPTIDE_IMAGE}* = {}\nregistry.k8s.io/pause:* = pause\n* = host\n",
            next.display(),
            self.cfg.bin_dir.display()
        );
        // Each kubelet start writes it again while the kubelet started a
        // moment before may be reading it; a truncated map would leave that
        // node's agent in ImagePullBackOff.
        write_replacing(&path, map.as_bytes())?;
        Ok(path)
    }

    /// [`NEXT_IMAGE`]'s directory: the build's image binaries hard-linked
    /// (copied across filesystems), so the running agents' files are
    /// never the ones an image change starts.
    fn stage_next_image(&self) -> Result<PathBuf> {
        let dir = self.cfg.state_dir.join("images").join("next");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in IMAGE_BINARIES {
            let (src, dst) = (self.bin(name)?, dir.join(name));
            if dst.exists() {
                continue;
            }
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
            }
        }
        Ok(dir)
    }

    /// The whole cluster, installed as [`Install::from_env`] says (from
    /// the manifest unless `RIPTIDE_LAB_INSTALL=hand-wired`); returns once
    /// every node is Ready.
    pub fn start_cluster(&mut self, timeout: Duration) -> Result<()> {
        self.start_cluster_with(Install::from_env()?, timeout)
    }

    /// The whole cluster, riptide installed as `install` says; returns once
    /// every node is Ready (and, from the manifest, every agent pod).
    pub fn start_cluster_with(&mut self, install: Install, timeout: Duration) -> Result<()> {
        self.install = install;
        if install == Install::Manifest {
            self.start_control_plane()?;
            for i in 1..=self.cfg.nodes {
                self.start_kubelet(i)?;
            }
            self.wait_until("every node registered", timeout, |lab| lab.summary().is_ok_and(|s| s.nodes == lab.cfg.nodes as usize))?;
            self.apply_riptide_manifest()?;
            return self.wait_for_agents(timeout);
        }
        self.start_control_plane()?;
        self.write_agent_kubeconfig()?;
        for i in 1..=self.cfg.nodes {
            self.start_agent(i)?;
            self.start_kubelet(i)?;
        }
        self.wait_until("every node Ready", timeout, |lab| {
            let ready = lab.summary().map(|s| s.nodes_ready).unwrap_or(0);
            ready == lab.cfg.nodes as usize
        })
    }

    /// How riptide is (to be) installed on this lab's nodes.
    pub fn install(&self) -> Install {
        self.install
    }

    /// Makes the next [`Lab::start_kubelet`] calls prepare nodes for
    /// `install` (for tests that start the pieces one by one).
    pub fn set_install(&mut self, install: Install) {
        self.install = install;
    }

    /// `manifests/riptide.yaml` as this lab's users apply it: the
    /// ConfigMap says what the lab's nodes need (the apiserver's underlay
    /// address, since the agent programs the `kubernetes` Service itself;
    /// `eth0` as uplink, L2 announcements; the tunnel and its MTU), the
    /// rest is the file as shipped. Applied with kubectl through the
    /// apiserver; the kubelets do the rest.
    pub fn apply_riptide_manifest(&self) -> Result<()> {
        use crate::manifests::{load_yaml, manifest};
        let mut objs = load_yaml(&manifest("riptide.yaml"))?;
        let cm = objs
            .iter_mut()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "riptide-config")
            .context("manifests/riptide.yaml has no ConfigMap riptide-config")?;
        let data = cm["data"].as_object_mut().context("riptide-config has no data")?;
        let mut set = |k: &str, v: String| data.insert(k.to_owned(), serde_json::Value::String(v));
        set("k8s-service-host", self.cfg.host_ip().to_string());
        set("k8s-service-port", self.cfg.apiserver_addr().port().to_string());
        set("uplink", "eth0".into());
        set("l2-announcements", "true".into());
        for (k, v) in routing_config(self.net.tunnel.as_deref()) {
            set(k, v);
        }
        self.kubectl_apply_objects("riptide.json", &objs)
    }

    /// Switches the whole cluster to `tunnel` (`None`: native routing) the
    /// way its operator would: from the manifest, `routing-mode` and `mtu`
    /// of ConfigMap `riptide-config` patched, then `kubectl rollout restart
    /// ds/riptide-agent` (the agent reads its settings at start), waiting
    /// until the rollout is done; hand-wired, every agent killed and
    /// started again with or without `--tunnel`.
    pub fn set_routing_mode(&mut self, tunnel: Option<String>, timeout: Duration) -> Result<()> {
        self.net.tunnel = tunnel;
        if self.install == Install::HandWired {
            for i in 1..=self.cfg.nodes {
                self.kill_agent(i)?;
                self.start_agent(i)?;
            }
            return Ok(());
        }
        let data: serde_json::Map<String, serde_json::Value> = routing_config(self.net.tunnel.as_deref())
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
            .collect();
        self.reconfigure_agents(data, timeout)
    }

    /// Patches `data` into ConfigMap `riptide-config`, then `kubectl
    /// rollout restart ds/riptide-agent` and waits until the rollout is
    /// done (the agent reads most settings at start).
    fn reconfigure_agents(&mut self, data: serde_json::Map<String, serde_json::Value>, timeout: Duration) -> Result<()> {
        let patch = serde_json::json!({ "data": data }).to_string();
        let run = |args: &[&str]| -> Result<()> {
            let out = self.kubectl().args(["-n", "riptide-system"]).args(args).output().context("running kubectl")?;
            if !out.status.success() {
                bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(())
        };
        run(&["patch", "configmap", "riptide-config", "--type", "merge", "-p", &patch])?;
        run(&["rollout", "restart", "ds/riptide-agent"])?;
        self.wait_for_agents(timeout)
    }

    /// Sets XDP NodePort acceleration (`setting`: `native`, `generic` or
    /// `disabled`) on every node the way an operator would: key `xdp` of
    /// ConfigMap `riptide-config` patched, then `kubectl rollout restart
    /// ds/riptide-agent` (the agent also applies a changed file live, but
    /// only once the kubelet has refreshed the volume; the restart makes
    /// the moment deterministic), waiting until every node's `eth0` runs
    /// it in that mode; hand-wired, every agent restarted with `--xdp`.
    ///
    /// The lab's uplinks are veths, so before XDP goes on the underlay gets
    /// what XDP on a veth needs (`riptide_test_support::veth_xdp`, and
    /// `ebpf/README.md`, "Turning XDP on safely"): an `XDP_PASS` program on
    /// the underlay end of every node link, or frames a node sends with
    /// `XDP_TX` stop after 256; and transmit checksum offload off on every
    /// node's and the outside namespace's `eth0`, or what XDP forwards
    /// carries the partial checksums of local sockets (a node's `eth0`
    /// covers its pods and host processes: the kernel completes the sum
    /// before a device without offload sends). Both stay for the lab's life
    /// (nodes added later get neither); they cost the lab's TCP its
    /// segmentation offload, which is why only XDP suites ask for them.
    pub fn set_xdp(&mut self, setting: &str, timeout: Duration) -> Result<()> {
        if setting != "disabled" {
            self.prepare_underlay_for_xdp()?;
        }
        self.xdp = Some(setting.to_owned());
        if self.install == Install::HandWired {
            for i in 1..=self.cfg.nodes {
                self.kill_agent(i)?;
                self.start_agent(i)?;
            }
        } else {
            let data = serde_json::Map::from_iter([("xdp".to_owned(), serde_json::Value::String(setting.to_owned()))]);
            self.reconfigure_agents(data, timeout)?;
        }
        // `ip -d link` names the mode: `xdp` (native), `xdpgeneric`.
        let want = match setting {
            "native" => Some(" xdp "),
            "generic" => Some(" xdpgeneric "),
            _ => None,
        };
        let nodes: Vec<String> = (1..=self.cfg.nodes).map(|i| self.cfg.node_netns(i)).collect();
        self.wait_until(&format!("xdp {setting} on every node's eth0"), timeout, |_| {
            nodes.iter().all(|ns| {
                let Ok(mut cmd) = netns::command(ns, "ip") else { return false };
                let Ok(out) = cmd.args(["-d", "link", "show", "eth0"]).output() else { return false };
                let link = String::from_utf8_lossy(&out.stdout);
                match want {
                    Some(mode) => link.contains(mode),
                    None => !link.contains(" xdp") && !link.contains("prog/xdp"),
                }
            })
        })
    }

    /// See [`Lab::set_xdp`]. Idempotent: the peers are attached once.
    fn prepare_underlay_for_xdp(&mut self) -> Result<()> {
        use riptide_test_support::veth_xdp;
        let c = self.cfg.clone();
        for ns in (1..=c.nodes).map(|i| c.node_netns(i)).chain([c.outside_netns()]) {
            veth_xdp::tx_checksum_off(&ns, "eth0").context("transmit checksum offload off")?;
        }
        if !self.xdp_peers.is_empty() {
            return Ok(());
        }
        let ports: Vec<String> = (1..=c.nodes).map(|i| format!("n{i}")).collect();
        let links = netns::run_in(&c.underlay_netns(), move || {
            ports
                .iter()
                .map(|p| veth_xdp::attach_pass(p).with_context(|| format!("XDP_PASS on the underlay port {p}")))
                .collect::<Result<Vec<OwnedFd>>>()
        })??;
        self.xdp_peers = links;
        Ok(())
    }

    /// Writes `objs` as a stream of JSON documents to `<state>/<file>` and
    /// `kubectl apply`s it.
    fn kubectl_apply_objects(&self, file: &str, objs: &[serde_json::Value]) -> Result<()> {
        let path = self.cfg.state_dir.join(file);
        let docs: Vec<String> = objs.iter().map(serde_json::Value::to_string).collect();
        std::fs::write(&path, docs.join("\n")).with_context(|| format!("writing {}", path.display()))?;
        let out = self.kubectl().arg("apply").arg("-f").arg(&path).output().context("kubectl apply")?;
        if !out.status.success() {
            bail!("kubectl apply -f {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Waits until the `riptide-agent` DaemonSet is rolled out on every
    /// node (`kubectl rollout status`) and every node is Ready.
    pub fn wait_for_agents(&mut self, timeout: Duration) -> Result<()> {
        self.wait_for_agents_inner(timeout).map_err(|e| e.context(self.agent_pods_report()))
    }

    /// The agent pods and the last lines of each one's containers' logs.
    pub fn agent_pods_report(&self) -> String {
        let run = |args: &[&str]| {
            self.kubectl().args(args).output().map_or_else(
                |e| format!("kubectl {}: {e}\n", args.join(" ")),
                |o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            )
        };
        let mut out = run(&["-n", "riptide-system", "get", "pods", "-o", "wide"]);
        let pods = run(&["-n", "riptide-system", "get", "pods", "-o", "name"]);
        for pod in pods.lines().filter(|l| l.starts_with("pod/")) {
            for c in ["install-cni", "agent"] {
                out.push_str(&format!("--- {pod} {c} ---\n"));
                out.push_str(&run(&["-n", "riptide-system", "logs", pod, "-c", c, "--tail", "15"]));
            }
        }
        out
    }

    fn wait_for_agents_inner(&mut self, timeout: Duration) -> Result<()> {
        let n = self.cfg.nodes as usize;
        self.wait_until("riptide-agent ready on every node", timeout, |lab| {
            lab.kubectl()
                .args(["-n", "riptide-system", "get", "ds", "riptide-agent", "-o", "json"])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|ds| {
                    let st = &ds["status"];
                    st["observedGeneration"] == ds["metadata"]["generation"]
                        && [&st["updatedNumberScheduled"], &st["numberAvailable"]].iter().all(|v| v.as_u64() == Some(n as u64))
                })
        })?;
        let out = self
            .kubectl()
            .args(["-n", "riptide-system", "rollout", "status", "ds/riptide-agent", "--timeout=30s"])
            .output()
            .context("kubectl rollout status")?;
        if !out.status.success() {
            bail!("kubectl rollout status ds/riptide-agent: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        self.wait_until("every node Ready", timeout, |lab| lab.summary().is_ok_and(|s| s.nodes_ready == n))
    }

    /// Creates the agent's ServiceAccount, ClusterRole and binding from
    /// `manifests/riptide.yaml` and writes [`LabConfig::agent_kubeconfig`]
    /// (the admin kubeconfig's cluster, a year-long token of that
    /// ServiceAccount; 0600).
    pub fn write_agent_kubeconfig(&self) -> Result<()> {
        use crate::manifests::{find, load_yaml, manifest};
        let c = &self.cfg;
        let objs = load_yaml(&manifest("riptide.yaml"))?;
        let items = [("Namespace", "riptide-system"), ("ServiceAccount", "riptide-agent"), ("ClusterRole", "riptide-agent"), ("ClusterRoleBinding", "riptide-agent")]
            .iter()
            .map(|(kind, name)| find(&objs, kind, name).cloned())
            .collect::<Result<Vec<_>>>()?;
        // One JSON document per object (YAML's `---` stream): kubectl
        // validates a `List` against discovery, which has no such kind.
        let rbac = c.state_dir.join("agent-rbac.yaml");
        let docs = items.iter().map(|o| format!("---\n{o}\n")).collect::<String>();
        std::fs::write(&rbac, docs).with_context(|| format!("writing {}", rbac.display()))?;
        let run = |args: &[&str]| -> Result<String> {
            let out = self.kubectl().args(args).output().context("running kubectl")?;
            if !out.status.success() {
                bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        run(&["apply", "-f", &rbac.display().to_string()])?;
        let token = run(&["create", "token", "riptide-agent", "-n", "riptide-system", "--duration", "8760h"])?;
        let admin = std::fs::read_to_string(c.kubeconfig()).with_context(|| format!("reading {}", c.kubeconfig().display()))?;
        let mut kc: serde_json::Value = serde_norway::from_str(&admin).context("parsing the admin kubeconfig")?;
        for u in kc["users"].as_array_mut().into_iter().flatten() {
            u["user"] = serde_json::json!({"token": token});
        }
        let path = c.agent_kubeconfig();
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)
        }
        .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut f, &serde_json::to_vec(&kc)?).with_context(|| format!("writing {}", path.display()))
    }

    /// Polls `cond` until it holds; fails early with the log of any process
    /// that exited, and on timeout with the tail of every log.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut(&mut Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return Ok(());
            }
            if let Some((label, st)) = self.exited().into_iter().next() {
                bail!("waiting for {what}: {label} exited ({st}):\n{}", self.log_tail(&label, 30));
            }
            if Instant::now() > deadline {
                let mut logs = String::new();
                for p in &self.procs {
                    logs.push_str(&format!("--- {} ---\n{}\n", p.label, self.log_tail(&p.label, 10)));
                }
                bail!("timed out after {timeout:?} waiting for {what}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Cluster DNS, installed as on any cluster: `manifests/riptide-dns.yaml`
    /// applied through the apiserver unchanged, then waits until every
    /// replica is a ready endpoint of `kube-system/kube-dns`. The kubelets'
    /// image map runs riptide's image from the build directory, and each
    /// replica reaches the API with its own ServiceAccount's projected
    /// token through the `kubernetes` Service, as on a real node — never
    /// with the lab's admin credential.
    pub fn deploy_dns(&mut self, timeout: Duration) -> Result<()> {
        let path = crate::manifests::manifest("riptide-dns.yaml");
        let objs = crate::manifests::load_yaml(&path)?;
        let svc = crate::manifests::find(&objs, "Service", "kube-dns")?;
        if svc["spec"]["clusterIP"] != CLUSTER_DNS.to_string() {
            bail!("{}: kube-dns asks for {}, kubelets are given {CLUSTER_DNS}", path.display(), svc["spec"]["clusterIP"]);
        }
        let replicas = crate::manifests::find(&objs, "Deployment", "riptide-dns")?["spec"]["replicas"].as_u64().unwrap_or(1);
        self.kubectl_apply_objects("riptide-dns.json", &objs)?;
        self.wait_until(&format!("{replicas} ready kube-dns endpoints"), timeout, |lab| {
            lab.ready_endpoints("kube-system", "kube-dns").is_ok_and(|e| e.len() as u64 == replicas)
        })
    }

    /// Ready endpoint addresses of a Service, from its EndpointSlices.
    pub fn ready_endpoints(&self, namespace: &str, service: &str) -> Result<BTreeSet<String>> {
        let out = self
            .kubectl()
            .args(["get", "endpointslices", "-n", namespace, "-l", &format!("kubernetes.io/service-name={service}"), "-o", "json"])
            .output()
            .context("kubectl get endpointslices")?;
        if !out.status.success() {
            bail!("kubectl get endpointslices: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect())
    }

    /// The demo app: 3 replicas of riptide-netexec behind a ClusterIP
    /// Service (`demo`, TCP 80 and UDP 81, named target ports) and a NodePort
    /// Service (`demo-nodeport`, 30080). The image is a label only: the
    /// kubelet runs `command` from this machine's filesystem.
    pub fn deploy_demo(&self) -> Result<()> {
        let netexec = self.bin("riptide-netexec")?;
        let manifest = format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: demo
  labels: {{app: demo}}
spec:
  replicas: 3
  selector:
    matchLabels: {{app: demo}}
  template:
    metadata:
      labels: {{app: demo}}
    spec:
      containers:
      - name: netexec
        image: riptide.local/netexec:latest
        command: ["{netexec}", "--http-port=8080", "--udp-port=8081"]
        ports:
        - {{name: http, containerPort: 8080}}
        - {{name: udp, containerPort: 8081, protocol: UDP}}
        readinessProbe:
          httpGet: {{path: /healthz, port: 8080}}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: demo
spec:
  selector: {{app: demo}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
  - {{name: udp, port: 81, targetPort: udp, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata:
  name: demo-nodeport
spec:
  type: NodePort
  selector: {{app: demo}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
"#,
            netexec = netexec.display()
        );
        let path = self.cfg.state_dir.join("demo.yaml");
        std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
        let out = self.kubectl().arg("apply").arg("-f").arg(&path).output().context("kubectl apply")?;
        if !out.status.success() {
            bail!("kubectl apply -f {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Counts for the live summary, read through kubectl.
    pub fn summary(&self) -> Result<Summary> {
        let get = |what: &str| -> Result<serde_json::Value> {
            let out = self.kubectl().args(["get", what, "-A", "-o", "json"]).output()?;
            if !out.status.success() {
                bail!("kubectl get {what}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let items = |v: &serde_json::Value| v["items"].as_array().cloned().unwrap_or_default();
        let nodes = items(&get("nodes")?);
        let pods = items(&get("pods")?);
        let svcs = items(&get("services")?);
        let cond_true = |o: &serde_json::Value, t: &str| {
            o["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
        };
        Ok(Summary {
            nodes: nodes.len(),
            nodes_ready: nodes.iter().filter(|n| cond_true(n, "Ready")).count(),
            pods: pods.len(),
            pods_running: pods.iter().filter(|p| p["status"]["phase"] == "Running").count(),
            pods_ready: pods.iter().filter(|p| cond_true(p, "Ready")).count(),
            services: svcs.len(),
        })
    }

    /// Processes that exited, with their status (for the live summary and
    /// for tests that want to fail early with the log).
    pub fn exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        self.procs
            .iter_mut()
            .filter_map(|p| match p.child.try_wait() {
                Ok(Some(st)) => Some((p.label.clone(), st)),
                _ => None,
            })
            .collect()
    }

    /// The last `n` lines of a process's log.
    pub fn log_tail(&self, label: &str, n: usize) -> String {
        let path = self.cfg.log_dir().join(format!("{label}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn save_state(&self) -> Result<()> {
        let state = State {
            prefix: self.cfg.prefix.clone(),
            pids: self.procs.iter().map(|p| p.child.id()).collect(),
        };
        std::fs::create_dir_all(&self.cfg.state_dir)
            .with_context(|| format!("creating {}", self.cfg.state_dir.display()))?;
        write_replacing(&self.cfg.state_file(), &serde_json::to_vec_pretty(&state)?).context("saving lab state")
    }

    /// Stops every process and removes everything. Safe to call twice.
    pub fn down(&mut self) -> Result<()> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        for p in &mut self.procs {
            signal(p.child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.clear();
        teardown(&self.cfg.prefix, &self.cfg.state_dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("lab teardown: {e:#}");
        }
    }
}

fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

fn sysctl_root(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
}

fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_owned();
    // /proc/sys/net reflects the netns of the thread that opens it.
    netns::run_in(ns, move || std::fs::write(&path, value))?
        .with_context(|| format!("sysctl {key} in {ns}"))
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Removes everything a lab with `prefix` may have created, whether or not
/// it is running: processes (from the state file and any process inside the
/// lab's namespaces or cgroups), namespaces, the root veth, cgroups, pins and
/// the state file. Idempotent.
pub fn teardown(prefix: &str, state_dir: &Path) -> Result<()> {
    let ours = |name: &str| name.starts_with(&format!("{prefix}-"));
    let namespaces: Vec<String> = netns::list().into_iter().filter(|n| ours(n)).collect();

    // 1. Processes: recorded pids, and anything still inside our netns or cgroups.
    let mut pids: Vec<u32> = std::fs::read(state_dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        .filter(|s| s.prefix == prefix)
        .map(|s| s.pids)
        .unwrap_or_default();
    pids.retain(|p| is_alive(*p));
    pids.extend(processes_in_netns(&namespaces));
    let cgroup = Path::new(CGROUP2_ROOT).join(prefix);
    pids.extend(tree_pids(&cgroup));
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p != std::process::id());
    stop_all(&pids);

    // Every step runs even when an earlier one failed, so one stuck object
    // never leaves the rest (pins, cgroups) behind; the errors are reported
    // together.
    let mut errors: Vec<anyhow::Error> = Vec::new();

    // 2. The root veth, then the namespaces (their veths go with them). The
    // root veth goes first: deleting the underlay netns destroys its peer
    // and with it the root end asynchronously (netns cleanup runs on a
    // kernel workqueue), so a later `ip link del` could race with it.
    let host = format!("{prefix}0");
    let host_exists = || Path::new("/sys/class/net").join(&host).exists();
    if host_exists()
        && let Err(e) = ip(&["link", "del", &host])
        && host_exists()
    {
        errors.push(e);
    }
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(e.context(format!("deleting netns {ns}")));
        }
    }

    // 3. cgroups, deepest first (rmdir fails while a process remains).
    if let Err(e) = remove_tree(&cgroup) {
        errors.push(e.into());
    }

    // 4. Pins of the lab's nodes.
    if let Ok(dir) = std::fs::read_dir(PIN_ROOT) {
        for e in dir.filter_map(std::result::Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&format!("{prefix}-"))
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                errors.push(anyhow::Error::new(err).context(format!("removing pins {}", e.path().display())));
            }
        }
    }
    // 4b. What agent pods and the CNI plugin keep per node on the machine.
    for dir in NODE_RUN_DIRS {
        for e in std::fs::read_dir(dir).into_iter().flatten().filter_map(std::result::Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&format!("{prefix}-"))
                && let Err(err) = std::fs::remove_dir_all(e.path())
            {
                errors.push(anyhow::Error::new(err).context(format!("removing {}", e.path().display())));
            }
        }
    }
    // 5. What each stopped kubelet leaves on the machine: node mounts it
    // made shared for pods' `mountPropagation` volumes (the agent pod's
    // bpffs, the cgroup2 mount) and its pinned pod mount namespaces
    // (`<root-dir>/mntns`, a mount of its own). `riptide-controlplane
    // kubelet-release` undoes both from the kubelet's own records; without
    // that binary the namespaces are still detached, so the directories
    // can go.
    let release = bin_dir_of_current_exe().map(|d| d.join("riptide-controlplane")).ok().filter(|b| b.exists());
    if let Ok(nodes) = std::fs::read_dir(state_dir.join("nodes")) {
        for n in nodes.filter_map(std::result::Result::ok) {
            let root = n.path().join("kubelet");
            if !root.exists() {
                continue;
            }
            if let Some(bin) = &release {
                let out = Command::new(bin).arg("kubelet-release").arg("--root-dir").arg(&root).output();
                match out {
                    Ok(o) if o.status.success() => continue,
                    Ok(o) => errors.push(anyhow::anyhow!(
                        "riptide-controlplane kubelet-release --root-dir {}: {}: {}",
                        root.display(),
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => errors.push(anyhow::Error::new(e).context("running riptide-controlplane kubelet-release")),
                }
            }
            if let Err(e) = detach_mount(&root.join("mntns")) {
                errors.push(e);
            }
        }
    }
    // 6. State of the run (apiserver database, kubelet and IPAM state,
    // kubeconfig): a lab always starts fresh. Only what the lab creates is
    // removed, so a mistaken --state-dir loses nothing else; logs stay for
    // post-mortems until the next `up` overwrites them.
    for entry in LAB_STATE_ENTRIES {
        let path = state_dir.join(entry);
        let removed = match std::fs::symlink_metadata(&path) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
        };
        if let Err(e) = removed {
            errors.push(anyhow::Error::new(e).context(format!("removing lab state {}", path.display())));
        }
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => bail!(
            "{n} teardown steps failed:\n{}",
            errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>().join("\n")
        ),
    }
}

/// Everything a lab writes under its state directory, besides `logs/`.
const LAB_STATE_ENTRIES: &[&str] = &[
    "state.json",
    "state.tmp",
    "controlplane",
    "nodes",
    "kubeconfig",
    "agent.kubeconfig",
    "agent-rbac.yaml",
    "cni-bin",
    "kubectl-cache",
    "demo.yaml",
    "riptide-dns.json",
    "riptide.json",
    "image-map",
    "images",
    "dns-headless.yaml",
    "bench.yaml",
    "fillers.yaml",
    "temp-svc.yaml",
    "lb-pools.json",
];

/// Lazily unmounts `dir` and everything under it; nothing to do when it is
/// not a mount point.
fn detach_mount(dir: &Path) -> Result<()> {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        bail!("{} contains a NUL byte", dir.display());
    };
    // SAFETY: plain syscall on a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
        return Ok(());
    }
    Err(anyhow::Error::new(e).context(format!("unmounting {}", dir.display())))
}

fn is_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn stop_all(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    for p in pids {
        signal(*p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && pids.iter().any(|p| is_alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids {
        if is_alive(*p) {
            signal(*p, libc::SIGKILL);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
}

/// Pids whose network namespace is one of `namespaces` (same dev and inode).
fn processes_in_netns(namespaces: &[String]) -> Vec<u32> {
    let ids: Vec<(u64, u64)> = namespaces
        .iter()
        .filter_map(|n| std::fs::metadata(netns::path(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc_dir
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
        })
        .collect()
}

/// Writes `path` aside and renames it into place, so a reader never sees a
/// half-written file.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
