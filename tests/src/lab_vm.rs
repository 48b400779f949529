//! Lab nodes as VMs (`riptide-lab up --vm`, `cargo xtask run --vm`): each
//! node is a QEMU guest with its own kernel, conntrack, bpffs and cgroup
//! tree, booted by virtme-ng with this machine's filesystem shared
//! read-only, so the kubelet and agent run from the workspace's build as in
//! the namespace lab, installed either way ([`Install`]): from the manifest
//! each guest's kubelet runs the DaemonSet's pods with hostPath volumes
//! under the guest's own root ([`GUEST_ROOT`]).
//!
//! ```text
//!  root netns ── P0 (198.18.S.1, control plane) ──┐
//!  netns P-ul:  br0 ── cp ─┘ ── n1 (tap) ── n2 (tap) ── out (veth)
//!                              │ QEMU        │ QEMU
//!                        guest P-n1 eth0   guest P-n2 eth0
//!                        198.18.S.11       198.18.S.12
//! ```
//!
//! The lab is built as usual ([`Lab::up_with`]); each node's network
//! namespace is then replaced by a tap device of the same port name,
//! created inside `P-ul`, and QEMU (with virtme-ng around it) runs in
//! `P-ul` too: the root namespace gains nothing, and a guest's only NIC is
//! its tap, which reaches nothing but the lab (the root namespace's `P0`
//! does not forward). The control plane stays on the host. On a routed
//! underlay ([`crate::lab::LabNet::routed`], what `--tunnel vxlan` runs
//! on) the tap is not on the bridge but the node's own link to the router
//! in `P-ul`, addressed as a namespace node's veth is: the guest has its
//! address as /32 and reaches the lab through the router, which knows no
//! pod CIDR and drops pod-sourced packets, so pods reach other nodes
//! through the agent's VXLAN device only.
//!
//! A guest writes nothing on this machine but its logs (`--rwdir` of the
//! lab's log directory); kubelet, agent and CNI state live in the guest's
//! memory ([`GUEST_RUN`]), so a VM that is killed leaves nothing.
//! virtme-ng's temporary files go to the node's state directory (`TMPDIR`),
//! which teardown removes. QEMU and virtme-ng run inside the lab's
//! underlay namespace and are recorded in the lab's state file like every
//! lab process, so [`crate::lab::teardown`] (run by `down` and by the next
//! `up`) kills them even after a crash, and deleting the namespace removes
//! the taps.
//!
//! Commands reach a guest ([`exec`], `riptide-lab exec <node>`) through a
//! small command server the guest runs as its last boot step
//! ([`serve`]): TCP on the node's underlay address, reachable from the
//! host's `P0` address only, one JSON request line carrying a per-lab
//! random token (a 0600 file in the node's state directory), then framed
//! stdout/stderr and the exit code. virtio-vsock needs `vhost_vsock` on the
//! host (absent here) and a virtio-serial port carries one session at a
//! time; the underlay is already there and multiplexes for free. The
//! server runs each command in the node's cgroup, like `lab exec` on a
//! namespace node, so socket LB applies to it; stdin is not forwarded.
//!
//! Guests are emulated (TCG: nested KVM hangs on these machines), one vCPU
//! each: functional checks, never performance numbers.

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::{
    lab::{AGENT_METRICS_PORT, CLUSTER_DNS, CLUSTER_DOMAIN, Install, Lab, LabConfig, cni_conflist, pod_mtu},
    netns::ip,
};

/// Where a guest keeps its node state (kubelet root, CNI IPAM, podCIDR
/// file, agent socket and pid), in memory like all its writes. Not under
/// `/run`: a pod whose volumes need a new directory there (`/var/run/secrets`)
/// gets a tmpfs copy of `/run`, which must not hide the kubelet's own dir.
pub const GUEST_RUN: &str = "/var/lib/riptide-vm";
/// The command server's port on each node's underlay address.
const EXEC_PORT: u16 = 10299;
/// One vCPU per guest: TCG runs a host thread per vCPU, and the machine's
/// two cores also carry the control plane.
const VM_CPUS: &str = "1";
const VM_MEMORY: &str = "1536M";
/// virtme-ng's release this module is written against (xtask's set-up
/// installs it).
const VIRTME_NG_DIR: &str = "virtme-ng-1.42";

/// The kernel to boot and virtme-ng's `vng` (its directory holds
/// `virtme-run`, which `vng` runs).
#[derive(Debug, Clone)]
pub struct VmTools {
    pub vng: PathBuf,
    pub kernel: PathBuf,
}

impl VmTools {
    /// What `cargo xtask test --kernel 6.1` / `run --vm` set up under
    /// `~/.cache/riptide` (or `$XDG_CACHE_HOME/riptide`): virtme-ng's venv
    /// and the newest unpacked kernel; `kernel` overrides the image.
    pub fn from_cache(kernel: Option<PathBuf>) -> Result<Self> {
        let cache = match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
        }
        .join("riptide");
        let vng = cache.join(VIRTME_NG_DIR).join("bin/vng");
        ensure!(vng.is_file(), "{} is missing: `cargo xtask run --vm` installs it", vng.display());
        let kernel = match kernel {
            Some(k) => k,
            None => {
                let mut images: Vec<PathBuf> = std::fs::read_dir(cache.join("kernels"))
                    .into_iter()
                    .flatten()
                    .filter_map(std::result::Result::ok)
                    .filter_map(|e| std::fs::read_dir(e.path().join("boot")).ok())
                    .flatten()
                    .filter_map(std::result::Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
                    .collect();
                images.sort();
                images.pop().with_context(|| {
                    format!("no kernel under {}: `cargo xtask run --vm` downloads one", cache.join("kernels").display())
                })?
            }
        };
        ensure!(kernel.is_file(), "kernel image {} does not exist", kernel.display());
        Ok(Self { vng, kernel })
    }
}

/// How the host reaches a node's command server (`<node dir>/vm-exec.json`,
/// 0600; the guest reads it through the read-only share). Its presence
/// marks the node as a VM.
#[derive(Debug, Serialize, Deserialize)]
struct ExecConfig {
    addr: SocketAddr,
    token: String,
}

const EXEC_CONFIG: &str = "vm-exec.json";

/// Label of node `i`'s VM among the lab's processes (its log is the
/// guest's console).
pub fn vm_label(cfg: &LabConfig, i: u32) -> String {
    format!("{}-vm", cfg.node_name(i))
}

fn mac(cfg: &LabConfig, i: u32) -> String {
    format!("52:54:00:72:{:02x}:{:02x}", cfg.subnet, i)
}

/// Starts the control plane on the host, then every node as a VM running
/// its kubelet, and waits until every node is Ready. The lab's
/// [`crate::lab::LabNet`] holds for the guests too: a routed underlay puts
/// each on its own link to the router, and a tunnel is the agents' routing
/// mode (the ConfigMap's `routing-mode` and `mtu`, or `--tunnel`
/// hand-wired). From the manifest the kubelets start bare and
/// `manifests/riptide.yaml` is applied as on the namespace lab: the
/// DaemonSet's agent pod and its `install-cni` init container run inside
/// each guest, writing the CNI files under the guest's own node root
/// ([`GUEST_RUN`]`/root`). Hand-wired, the lab writes the CNI config and
/// each guest starts its agent at boot.
pub fn start_cluster(lab: &mut Lab, tools: &VmTools, install: Install, timeout: Duration) -> Result<()> {
    lab.set_install(install);
    lab.start_control_plane()?;
    if install == Install::HandWired {
        lab.write_agent_kubeconfig()?;
    }
    let image_map = lab.write_image_map()?;
    for i in 1..=lab.config().nodes {
        start_node(lab, tools, i, install, &image_map).with_context(|| format!("starting VM {}", lab.config().node_name(i)))?;
    }
    let n = lab.config().nodes as usize;
    if install == Install::Manifest {
        lab.wait_until("every VM node registered", timeout, |lab| lab.summary().is_ok_and(|s| s.nodes == n))
            .map_err(|e| e.context(guest_logs(lab.config())))?;
        lab.apply_riptide_manifest()?;
        lab.wait_for_agents(timeout).map_err(|e| e.context(guest_logs(lab.config())))?;
    }
    lab.wait_until("every VM node Ready", timeout, |lab| lab.summary().is_ok_and(|s| s.nodes_ready == n))
        .map_err(|e| e.context(guest_logs(lab.config())))
}

/// The last lines of every guest's boot, kubelet and agent logs.
pub fn guest_logs(cfg: &LabConfig) -> String {
    let mut out = String::new();
    for i in 1..=cfg.nodes {
        for what in ["guest", "kubelet", "agent"] {
            let path = cfg.log_dir().join(format!("{}-{what}.log", cfg.node_name(i)));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ---\n{}\n", path.display(), lines[lines.len().saturating_sub(15)..].join("\n")));
        }
    }
    out
}

fn start_node(lab: &mut Lab, tools: &VmTools, i: u32, install: Install, image_map: &Path) -> Result<()> {
    let c = lab.config().clone();
    let net = lab.net().clone();
    let node = c.node_name(i);
    let ul = c.underlay_netns();
    let port = format!("n{i}");
    // The namespace node's veth pair and netns go; a tap of the same port
    // name takes its place, on the bridge or as the node's routed link.
    // The pair is deleted first and by hand: a deleted netns frees its
    // devices asynchronously.
    ip(&["-n", &ul, "link", "del", &port])?;
    ip(&["netns", "del", &c.node_netns(i)])?;
    ip(&["-n", &ul, "tuntap", "add", "dev", &port, "mode", "tap"])?;
    let uplink = if net.routed {
        lab.route_node_link(&port, c.node_ip(i))?;
        Uplink::Routed { router: lab.router_ip() }
    } else {
        ip(&["-n", &ul, "link", "set", &port, "master", "br0", "up"])?;
        Uplink::Bridged
    };

    let dir = c.node_dir(i);
    let tmp = dir.join("vm-tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let creds = c.kubelet_credentials(i)?;
    let exec = ExecConfig { addr: SocketAddr::from((c.node_ip(i), EXEC_PORT)), token: random_token()? };
    write_private(&dir.join(EXEC_CONFIG), &serde_json::to_vec(&exec)?)?;
    let agent_sh = dir.join(AGENT_SCRIPT);
    let _ = std::fs::remove_file(&agent_sh);
    let guest = match install {
        Install::HandWired => {
            write_file(&agent_sh, &agent_script(&c, i, net.tunnel.as_deref()))?;
            GuestNode::HandWired { agent_sh: &agent_sh, cni_conf: write_cni_config(&c, i, pod_mtu(net.tunnel.as_deref()))? }
        }
        Install::Manifest => GuestNode::Manifest,
    };
    let boot = dir.join("boot.sh");
    write_file(&boot, &boot_script(&c, i, uplink, &guest, &creds, image_map))?;

    let bin_dir = tools.vng.parent().context("vng has no directory")?;
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = crate::netns::command(&ul, &tools.vng)?;
    cmd.arg("--run")
        .arg(&tools.kernel)
        .args(["--disable-kvm", "--cpus", VM_CPUS, "--memory", VM_MEMORY, "--name", &node])
        .arg("--rwdir")
        .arg(c.log_dir())
        .arg(format!(
            "--qemu-opts=-netdev tap,id=ul0,ifname={port},script=no,downscript=no -device virtio-net-pci,netdev=ul0,mac={}",
            mac(&c, i)
        ))
        // Kernel messages in the console log, for a guest that never
        // finished booting.
        .arg("--verbose")
        .args(["--exec", &format!("sh {}", boot.display())])
        .env("PATH", path)
        .env("TMPDIR", &tmp)
        // Its own process group: Ctrl-C on the lab's terminal reaches the
        // lab, which then stops the VMs in order.
        .process_group(0);
    lab.spawn(&vm_label(&c, i), cmd)?;
    Ok(())
}

/// How a guest's NIC reaches the lab (see [`crate::lab::LabNet::routed`]).
#[derive(Debug, Clone, Copy)]
enum Uplink {
    /// On the lab bridge: the node's address in the underlay's /24.
    Bridged,
    /// The node's own link to `router`: its address as /32, the router
    /// on-link, the underlay's /24 through it.
    Routed { router: Ipv4Addr },
}

/// How a guest gets its agent and CNI config.
enum GuestNode<'a> {
    /// The boot script starts the agent from `agent_sh`; the kubelet reads
    /// the lab's CNI config from `cni_conf` (and the plugin from its `bin`).
    HandWired { agent_sh: &'a Path, cni_conf: PathBuf },
    /// The DaemonSet's pod does both; the kubelet's CNI dirs start empty
    /// under the guest's node root.
    Manifest,
}

/// The guest's `/` for hostPath volumes (from the manifest): in its memory,
/// so `install-cni` never writes this machine's `/opt/cni` or `/etc/cni`.
const GUEST_ROOT: &str = "/var/lib/riptide-vm/root";
/// Node directory file holding a hand-wired guest's agent script; its
/// absence marks a node whose agent is the DaemonSet's pod.
const AGENT_SCRIPT: &str = "agent.sh";

/// Node `i`'s CNI config directory, with the conflist pointing at the
/// guest's own state and giving pods `mtu`, and the plugin linked as
/// `riptide` beside it.
fn write_cni_config(c: &LabConfig, i: u32, mtu: u32) -> Result<PathBuf> {
    let conf_dir = c.node_dir(i).join("cni");
    std::fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
    let guest_run = Path::new(GUEST_RUN);
    let conf = cni_conflist(&c.node_name(i), &guest_run.join("podcidr"), &guest_run.join("ipam"), mtu);
    write_file(&conf_dir.join("10-riptide.conflist"), &serde_json::to_string_pretty(&conf)?)?;
    let bin = conf_dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let plugin = bin.join("riptide");
    let _ = std::fs::remove_file(&plugin);
    std::os::unix::fs::symlink(c.bin_dir.join("riptide-cni"), &plugin).with_context(|| format!("linking {}", plugin.display()))?;
    Ok(conf_dir)
}

fn sh_quote(p: impl AsRef<std::ffi::OsStr>) -> String {
    format!("'{}'", p.as_ref().to_string_lossy().replace('\'', r"'\''"))
}

/// Starts the node's agent in the background (its log appended to), its
/// pid in `GUEST_RUN/agent.pid`; the boot script runs it, and so does
/// [`start_agent`] after [`kill_agent`]. `tunnel`: its `--tunnel`.
fn agent_script(c: &LabConfig, i: u32, tunnel: Option<&str>) -> String {
    let log = c.log_dir().join(format!("{}-agent.log", c.node_name(i)));
    let tunnel = tunnel.map(|t| format!("--tunnel {} ", sh_quote(t))).unwrap_or_default();
    format!(
        "#!/bin/sh\n\
         # Node {node}'s agent, inside its VM (written by riptide-lab, tests/src/lab_vm.rs).\n\
         echo \"----- lab: {node}-agent started $(date -u +%T) -----\" >> {log}\n\
         setsid {agent} --node-name {node} --node-ip {ip} --pod-cidr-file {GUEST_RUN}/podcidr \
         --api-socket {GUEST_RUN}/agent.sock --metrics-addr {ip}:{AGENT_METRICS_PORT} --cgroup {cgroup} --uplink eth0 \
         --l2-announcements {tunnel}--kubeconfig {kc} >> {log} 2>&1 < /dev/null &\n\
         echo $! > {GUEST_RUN}/agent.pid\n",
        node = c.node_name(i),
        ip = c.node_ip(i),
        log = sh_quote(&log),
        agent = sh_quote(c.bin_dir.join("riptide-agent")),
        cgroup = sh_quote(c.node_cgroup(i)),
        kc = sh_quote(c.agent_kubeconfig()),
    )
}

/// The guest's only job: mounts (bpffs, cgroup v2 where this machine's
/// hybrid layout has it), the underlay address on the NIC with the lab's
/// MAC (and routes, as `uplink` says), the node cgroup, then the agent and
/// the kubelet in the background and the command server in the foreground
/// (the VM powers off when it exits).
fn boot_script(c: &LabConfig, i: u32, uplink: Uplink, guest: &GuestNode<'_>, creds: &Path, image_map: &Path) -> String {
    let node = c.node_name(i);
    let ip = c.node_ip(i);
    let address = match uplink {
        Uplink::Bridged => format!("ip addr add {ip}/24 dev eth0 && ip link set eth0 up || exit 1\n"),
        Uplink::Routed { router } => format!(
            "ip addr add {ip}/32 dev eth0 && ip link set eth0 up &&\n\
             \x20 ip route add {router}/32 dev eth0 scope link &&\n\
             \x20 ip route add 198.18.{subnet}.0/24 via {router} dev eth0 || exit 1\n",
            subnet = c.subnet,
        ),
    };
    let log = |what: &str| sh_quote(c.log_dir().join(format!("{node}-{what}.log")));
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    // Values quoted, flags bare, as the rest of the script reads.
    let quoted = |args: &[String]| {
        args.iter().map(|a| if a.starts_with("--") { a.clone() } else { sh_quote(a) }).collect::<Vec<_>>().join(" ")
    };
    // (prepare the node, its agent socket, start the agent, kubelet flags)
    let (prepare, socket, agent, kubelet_args) = match guest {
        GuestNode::HandWired { agent_sh, cni_conf } => (
            String::new(),
            format!("{GUEST_RUN}/agent.sock"),
            format!("sh {}\n", sh_quote(agent_sh)),
            quoted(&[
                "--cni-conf-dir".into(),
                cni_conf.display().to_string(),
                "--cni-bin-dir".into(),
                cni_conf.join("bin").display().to_string(),
            ]),
        ),
        GuestNode::Manifest => {
            let mut args = vec![
                "--cni-conf-dir".into(),
                format!("{GUEST_ROOT}/etc/cni/net.d"),
                "--cni-bin-dir".into(),
                format!("{GUEST_ROOT}/opt/cni/bin"),
                // NetworkReady is looked for on the heartbeat: the node
                // turns Ready soon after install-cni, as on the netns lab.
                "--heartbeat-interval".into(),
                "2s".into(),
            ];
            args.extend(crate::lab::kubelet_host_path_args(c, i, Path::new(GUEST_ROOT)));
            (
                format!("mkdir -p {GUEST_ROOT}/etc/cni/net.d {GUEST_ROOT}/opt/cni/bin /run/riptide || exit 1\n"),
                format!("/run/riptide/{node}/agent.sock"),
                String::new(),
                quoted(&args),
            )
        }
    };
    format!(
        "#!/bin/sh\n\
         # Lab node {node} as a VM, run by virtme-ng (written by riptide-lab, tests/src/lab_vm.rs).\n\
         exec > {guest_log} 2>&1\n\
         echo \"riptide-vm: {node} kernel $(uname -r)\"\n\
         mount -t bpf bpf /sys/fs/bpf || exit 1\n\
         if [ ! -d /sys/fs/cgroup/unified ]; then\n\
         \x20 mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/unified &&\n\
         \x20 mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified || exit 1\n\
         fi\n\
         mkdir -p {cgroup} {GUEST_RUN}/ipam || exit 1\n\
         {prepare}\
         ip link set lo up\n\
         # No udev in the guest to load the NIC's driver.\n\
         modprobe virtio_net\n\
         dev=''\n\
         for t in 1 2 3 4 5 6 7 8 9 10; do\n\
         \x20 for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && dev=${{d##*/}}; done\n\
         \x20 [ -n \"$dev\" ] && break; sleep 1\n\
         done\n\
         [ -n \"$dev\" ] || {{ echo \"riptide-vm: no NIC with MAC {mac}\"; exit 1; }}\n\
         [ \"$dev\" = eth0 ] || ip link set \"$dev\" name eth0 || exit 1\n\
         {address}\
         echo 1 > /proc/sys/net/ipv4/ip_forward\n\
         # The tunnel's device (`routing-mode: vxlan`), which the agent\n\
         # creates when the ConfigMap asks: a module in distribution kernels.\n\
         modprobe vxlan\n\
         hostname {node}\n\
         export PATH={bin}:$PATH RIPTIDE_NODE_NAME={node} RIPTIDE_AGENT_SOCKET={socket} \
         KUBECONFIG={kubeconfig} NO_COLOR=1 RUST_LOG={rust_log}\n\
         {agent}\
         # Restarted when it exits, as systemd does on a node: its first TLS\n\
         # handshakes can outlast the apiserver's 10 s limit while the agent\n\
         # loads the datapath on the same emulated CPU.\n\
         (while :; do\n\
         \x20 {controlplane} kubelet --kubeconfig {creds}/kubelet.kubeconfig \
         --tls-cert-file {creds}/kubelet.crt --tls-private-key-file {creds}/kubelet.key \
         --client-ca-file {creds}/ca.crt --node-name {node} --node-ip {ip} \
         {kubelet_args} --cgroup-root {cgroup} \
         --root-dir {GUEST_RUN}/kubelet --cluster-dns {CLUSTER_DNS} --cluster-domain {CLUSTER_DOMAIN} \
         --image-map {image_map}\n\
         \x20 echo \"----- lab: {node}-kubelet exited ($?), restarting in 2 s -----\"; sleep 2\n\
         done) > {kubelet_log} 2>&1 < /dev/null &\n\
         echo \"riptide-vm: {node} up, commands on {ip}:{EXEC_PORT}\"\n\
         exec {lab} vm-exec-server --config {exec_conf} --cgroup {cgroup}\n",
        guest_log = log("guest"),
        kubelet_log = log("kubelet"),
        cgroup = sh_quote(c.node_cgroup(i)),
        mac = mac(c, i),
        bin = sh_quote(&c.bin_dir),
        kubeconfig = sh_quote(c.kubeconfig()),
        rust_log = sh_quote(&rust_log),
        controlplane = sh_quote(c.bin_dir.join("riptide-controlplane")),
        creds = sh_quote(creds),
        image_map = sh_quote(image_map),
        lab = sh_quote(c.bin_dir.join("riptide-lab")),
        exec_conf = sh_quote(c.node_dir(i).join(EXEC_CONFIG)),
    )
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether node `i` of this lab runs as a VM.
pub fn is_vm(cfg: &LabConfig, i: u32) -> bool {
    cfg.node_dir(i).join(EXEC_CONFIG).is_file()
}

/// Kills node `i`'s agent with SIGKILL inside its VM, as a crash would
/// (pins, links and routes stay as it left them). From the manifest the
/// victim is the agent container's process, found by name among the
/// processes of the node's pod cgroups (`<node cgroup>/pod-<uid>`, the
/// kubelet's layout), and its kubelet restarts it after the crash
/// back-off.
pub fn kill_agent(cfg: &LabConfig, i: u32) -> Result<()> {
    let script = if cfg.node_dir(i).join(AGENT_SCRIPT).is_file() {
        format!("kill -KILL $(cat {GUEST_RUN}/agent.pid)")
    } else {
        format!(
            "n=0; for p in $(cat {cgroup}/pod-*/cgroup.procs {cgroup}/pod-*/*/cgroup.procs 2>/dev/null); do \
             [ \"$(cat /proc/$p/comm 2>/dev/null)\" = riptide-agent ] && kill -KILL $p && n=$((n+1)); done; \
             [ $n -gt 0 ] || {{ echo 'no riptide-agent process in the pod cgroups'; exit 1; }}",
            cgroup = sh_quote(cfg.node_cgroup(i)),
        )
    };
    let out = exec(&cfg.node_dir(i), &["sh", "-c", &script])?;
    ensure!(out.status == 0, "killing the agent of {}: {}", cfg.node_name(i), out.text());
    Ok(())
}

/// Starts node `i`'s agent again inside its VM (its log continues). From
/// the manifest there is nothing to start: the node's kubelet restarts the
/// agent container [`kill_agent`] killed, as for any crash; callers wait
/// for the agent to be ready either way.
pub fn start_agent(cfg: &LabConfig, i: u32) -> Result<()> {
    let script = cfg.node_dir(i).join(AGENT_SCRIPT);
    if !script.is_file() {
        return Ok(());
    }
    let out = exec(&cfg.node_dir(i), &["sh", &script.to_string_lossy()])?;
    ensure!(out.status == 0, "starting the agent of {}: {}", cfg.node_name(i), out.text());
    Ok(())
}

/// What a command run in a guest printed, and its exit status (128 +
/// signal when a signal ended it).
#[derive(Debug)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn text(&self) -> String {
        format!("{}{}", String::from_utf8_lossy(&self.stdout), String::from_utf8_lossy(&self.stderr))
    }
}

/// Runs `argv` in the VM whose node directory is `node_dir`, collecting
/// its output.
pub fn exec(node_dir: &Path, argv: &[&str]) -> Result<ExecOutput> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
    let status = exec_streaming(node_dir, &argv, &mut stdout, &mut stderr)?;
    Ok(ExecOutput { status, stdout, stderr })
}

/// For `riptide-lab exec`: `Some(exit status)` after running `argv` in
/// the node's VM with output passed through, `None` when the node is no
/// VM.
pub fn exec_if_vm(node_dir: &Path, argv: &[String]) -> Result<Option<i32>> {
    if !node_dir.join(EXEC_CONFIG).is_file() {
        return Ok(None);
    }
    let status = exec_streaming(node_dir, argv, &mut std::io::stdout(), &mut std::io::stderr())?;
    Ok(Some(status))
}

#[derive(Serialize, Deserialize)]
struct Request {
    token: String,
    argv: Vec<String>,
}

/// Frame kinds of the server's answer: `[kind u8][len u32 BE][payload]`.
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
/// Payload: the exit status, i32 BE.
const EXIT: u8 = 3;
/// Payload: why the command could not run.
const FAILED: u8 = 4;

fn exec_streaming(node_dir: &Path, argv: &[String], out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let path = node_dir.join(EXEC_CONFIG);
    let cfg: ExecConfig = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
        .with_context(|| format!("parsing {}", path.display()))?;
    let mut conn = TcpStream::connect_timeout(&cfg.addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the VM's command server at {} (is the VM up?)", cfg.addr))?;
    let mut req = serde_json::to_vec(&Request { token: cfg.token, argv: argv.to_vec() })?;
    req.push(b'\n');
    conn.write_all(&req).with_context(|| format!("sending the command to {}", cfg.addr))?;
    let mut conn = BufReader::new(conn);
    loop {
        let (kind, payload) = read_frame(&mut conn).with_context(|| format!("reading the answer of {}", cfg.addr))?;
        let written = match kind {
            STDOUT => out.write_all(&payload),
            STDERR => err.write_all(&payload),
            EXIT => {
                let code: [u8; 4] = payload.as_slice().try_into().context("exit frame of the wrong size")?;
                return Ok(i32::from_be_bytes(code));
            }
            FAILED => bail!("in the VM at {}: {}", cfg.addr, String::from_utf8_lossy(&payload)),
            k => bail!("unknown frame kind {k} from {}", cfg.addr),
        };
        match written {
            Ok(()) => {}
            // `lab exec n1 -- riptide service list | head`: ends as a
            // shell pipeline would (128 + SIGPIPE); dropping the connection
            // makes the server kill the command.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(128 + libc::SIGPIPE),
            Err(e) => return Err(anyhow::Error::new(e).context("writing the command's output")),
        }
    }
}

fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn write_frame(w: &Mutex<TcpStream>, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    let mut w = w.lock().map_err(|_| std::io::Error::other("writer poisoned"))?;
    w.write_all(&frame)
}

/// The guest's command server (`riptide-lab vm-exec-server`): answers
/// requests carrying the node's token from the host's lab address only,
/// running each in `cgroup`. Runs until the VM powers off.
pub fn serve(config: &Path, cgroup: &Path) -> Result<()> {
    let cfg: ExecConfig = serde_json::from_slice(&std::fs::read(config).with_context(|| format!("reading {}", config.display()))?)
        .with_context(|| format!("parsing {}", config.display()))?;
    let listener = TcpListener::bind(cfg.addr).with_context(|| format!("listening on {}", cfg.addr))?;
    // The lab's host address: `.1` of the node's /24.
    let host = match cfg.addr {
        SocketAddr::V4(a) => {
            let o = a.ip().octets();
            Ipv4Addr::new(o[0], o[1], o[2], 1)
        }
        SocketAddr::V6(_) => bail!("the lab underlay is IPv4"),
    };
    let token = Arc::new(cfg.token);
    let cgroup = Arc::new(cgroup.to_path_buf());
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if !conn.peer_addr().is_ok_and(|p| p.ip() == std::net::IpAddr::V4(host)) {
            continue;
        }
        let (token, cgroup) = (Arc::clone(&token), Arc::clone(&cgroup));
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &token, &cgroup) {
                eprintln!("vm-exec-server: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(conn: TcpStream, token: &str, cgroup: &Path) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(1 << 20)).read_line(&mut line).context("reading the request")?;
    let writer = Arc::new(Mutex::new(conn));
    let req: Request = serde_json::from_str(&line).context("parsing the request")?;
    // Both are 32 hex digits from the same file; a length-independent
    // comparison costs nothing here.
    if req.token.len() != token.len() || req.token.bytes().zip(token.bytes()).fold(0, |acc, (a, b)| acc | (a ^ b)) != 0 {
        write_frame(&writer, FAILED, b"wrong token")?;
        return Ok(());
    }
    let Some((prog, args)) = req.argv.split_first() else {
        write_frame(&writer, FAILED, b"no command")?;
        return Ok(());
    };
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.display()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: only write(2) on an fd opened before fork; "0" is the
    // writing process itself.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd as _;
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            write_frame(&writer, FAILED, format!("running {prog}: {e}").as_bytes())?;
            return Ok(());
        }
    };
    let pid = child.id();
    let pump = |mut from: Box<dyn Read + Send>, kind: u8| {
        let writer = Arc::clone(&writer);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if write_frame(&writer, kind, &buf[..n]).is_err() {
                            // The client is gone: nobody reads the rest.
                            // SAFETY: plain syscall.
                            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                            return;
                        }
                    }
                }
            }
        })
    };
    let out = pump(Box::new(child.stdout.take().context("child stdout")?), STDOUT);
    let err = pump(Box::new(child.stderr.take().context("child stderr")?), STDERR);
    let status = child.wait().context("waiting for the command")?;
    let _ = out.join();
    let _ = err.join();
    let code = {
        use std::os::unix::process::ExitStatusExt as _;
        status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
    };
    write_frame(&writer, EXIT, &code.to_be_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LabConfig {
        LabConfig {
            prefix: "rt".into(),
            nodes: 2,
            subnet: 7,
            bin_dir: "/w/target/debug".into(),
            state_dir: "/w/target/lab".into(),
        }
    }

    #[test]
    fn boot_script_addresses_the_nic_by_the_labs_mac() {
        let c = cfg();
        let guest = GuestNode::HandWired { agent_sh: Path::new("/a.sh"), cni_conf: "/cni".into() };
        let s = boot_script(&c, 2, Uplink::Bridged, &guest, Path::new("/creds"), Path::new("/map"));
        assert!(s.contains("= 52:54:00:72:07:02 ]"), "{s}");
        assert!(s.contains("\nsh '/a.sh'\n") && s.contains("--cni-conf-dir '/cni' --cni-bin-dir '/cni/bin'"), "{s}");
        assert!(s.contains("ip addr add 198.18.7.12/24 dev eth0"), "{s}");
        assert!(s.contains("--cgroup-root '/sys/fs/cgroup/unified/rt/rt-n2'"), "{s}");
        assert!(s.trim_end().ends_with("vm-exec-server --config '/w/target/lab/nodes/rt-n2/vm-exec.json' --cgroup '/sys/fs/cgroup/unified/rt/rt-n2'"), "{s}");
    }

    #[test]
    fn manifest_guest_leaves_agent_and_cni_to_the_daemonset() {
        let c = cfg();
        let s = boot_script(&c, 1, Uplink::Bridged, &GuestNode::Manifest, Path::new("/creds"), Path::new("/map"));
        assert!(!s.contains("agent.sh") && !s.contains("riptide-agent"), "no agent of the lab's own: {s}");
        assert!(s.contains("mkdir -p /var/lib/riptide-vm/root/etc/cni/net.d /var/lib/riptide-vm/root/opt/cni/bin /run/riptide"), "{s}");
        assert!(
            s.contains("--cni-conf-dir '/var/lib/riptide-vm/root/etc/cni/net.d' --cni-bin-dir '/var/lib/riptide-vm/root/opt/cni/bin'"),
            "{s}"
        );
        assert!(s.contains("--host-path-root '/var/lib/riptide-vm/root'"), "hostPaths resolve in the guest's memory: {s}");
        assert!(s.contains("--host-path-map '/sys/fs/cgroup=/sys/fs/cgroup/unified/rt/rt-n1'"), "{s}");
        assert!(s.contains("RIPTIDE_AGENT_SOCKET=/run/riptide/rt-n1/agent.sock"), "{s}");
    }

    #[test]
    fn routed_guest_reaches_the_lab_through_the_router() {
        let c = cfg();
        let router = Ipv4Addr::new(198, 18, 7, 254);
        let s = boot_script(&c, 2, Uplink::Routed { router }, &GuestNode::Manifest, Path::new("/creds"), Path::new("/map"));
        assert!(s.contains("ip addr add 198.18.7.12/32 dev eth0"), "{s}");
        assert!(!s.contains("198.18.7.12/24"), "no on-link /24 on a routed node: {s}");
        assert!(s.contains("ip route add 198.18.7.254/32 dev eth0 scope link"), "{s}");
        assert!(s.contains("ip route add 198.18.7.0/24 via 198.18.7.254 dev eth0"), "{s}");
        assert!(s.contains("\nmodprobe vxlan\n"), "{s}");
    }

    #[test]
    fn agent_script_records_its_pid_in_the_guest() {
        let s = agent_script(&cfg(), 1, None);
        assert!(s.contains("--node-ip 198.18.7.11"), "{s}");
        assert!(!s.contains("--tunnel"), "{s}");
        assert!(s.trim_end().ends_with("echo $! > /var/lib/riptide-vm/agent.pid"), "{s}");
        let s = agent_script(&cfg(), 1, Some("vxlan"));
        assert!(s.contains("--l2-announcements --tunnel 'vxlan' --kubeconfig"), "{s}");
    }
}
