//! `riptide-lab`: the local multi-node cluster behind `cargo xtask run`.
//!
//! `up` builds the lab, starts every node's processes and stays in the
//! foreground until Ctrl-C/SIGTERM, then removes everything. `down` removes
//! whatever an earlier run left. `exec` runs a command inside a lab netns.
use std::{path::PathBuf, sync::mpsc, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use riptide_tests::{
    lab::{self, Lab, LabConfig, LabNet},
    lab_vm, netns,
};

#[derive(Parser)]
#[command(name = "riptide-lab", version, about = "riptide's local multi-node lab")]
struct Cli {
    /// Prefix of every name the lab creates.
    #[arg(long, default_value = "riptide", global = true)]
    prefix: String,
    /// State, logs and kubeconfig.
    #[arg(long, default_value = "target/lab", global = true)]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the lab in the foreground; Ctrl-C tears it down.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Leave the lab running and return; `cargo xtask down` removes it.
        #[arg(long)]
        detach: bool,
        /// `vxlan`: agents run with `--tunnel vxlan`, and the nodes sit on
        /// their own links behind a router (no shared L2 segment), where
        /// native routing could not work.
        #[arg(long, value_parser = ["vxlan"])]
        tunnel: Option<String>,
        /// `manifest` (the default): bare kubelets, then
        /// `manifests/riptide.yaml` applied through the apiserver (the
        /// user's way); `hand-wired`: the lab writes CNI configs and starts
        /// agents itself (for debugging the agent or the CNI alone).
        #[arg(long)]
        install: Option<lab::Install>,
        /// Each node a QEMU VM on the underlay (see `lab_vm`), installed
        /// either way.
        #[arg(long)]
        vm: bool,
        /// The VMs' kernel image (default: the newest one `cargo xtask run
        /// --vm` unpacked).
        #[arg(long, requires = "vm")]
        vm_kernel: Option<PathBuf>,
    },
    /// A VM node's command server (runs inside the guest).
    #[command(hide = true)]
    VmExecServer {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// Remove everything an earlier run left (safe to run twice).
    Down,
    /// Run a command in a lab namespace: a node name (`riptide-n1`, or `n1`) or `outside`.
    Exec {
        target: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Up { nodes, detach, tunnel, install, vm, vm_kernel } => {
            let net = LabNet { routed: tunnel.is_some(), tunnel };
            let vm = vm.then(|| lab_vm::VmTools::from_cache(vm_kernel)).transpose()?;
            let install = install.unwrap_or_default();
            up(&cli.prefix, &cli.state_dir, nodes, detach, net, install, vm)
        }
        Cmd::VmExecServer { config, cgroup } => lab_vm::serve(&config, &cgroup),
        Cmd::Down => {
            lab::teardown(&cli.prefix, &cli.state_dir)?;
            eprintln!("lab {}: nothing left behind", cli.prefix);
            Ok(())
        }
        Cmd::Exec { target, command } => exec(&cli.prefix, &cli.state_dir, &target, &command),
    }
}

/// Runs `command` inside a lab namespace. On a node it joins the node's
/// netns and cgroup and gets the node's environment, like a shell in
/// Cilium's agent pod: the workspace's binaries first on `PATH`, the node's
/// agent socket and name for the `riptide` CLI, and the lab's kubeconfig.
fn exec(prefix: &str, state_dir: &std::path::Path, target: &str, command: &[String]) -> Result<()> {
    let (prog, args) = command.split_first().context("no command given")?;
    let exe = std::env::current_exe().context("locating riptide-lab")?;
    let bin_dir = exe.parent().context("riptide-lab has no directory")?;
    let path = match std::env::var_os("PATH") {
        Some(p) => std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(std::env::split_paths(&p)))
            .context("building PATH")?,
        None => bin_dir.as_os_str().to_owned(),
    };
    let state_dir = std::path::absolute(state_dir).context("resolving the lab's state dir")?;
    // The program is looked up on the new PATH, so `riptide` finds the
    // workspace's build rather than whatever the caller's PATH holds.
    let program = which_in(prog, &path);
    let mut cmd = match target {
        "outside" | "out" => netns::command(&format!("{prefix}-out"), &program)?,
        t => {
            // A node: its netns and its cgroup, like a process on that node.
            let node = if t.starts_with(&format!("{prefix}-")) { t.to_owned() } else { format!("{prefix}-{t}") };
            let node_dir = state_dir.join("nodes").join(&node);
            if !node_dir.is_dir() {
                bail!("no lab node {node} (no {}): is the lab running?", node_dir.display());
            }
            if let Some(status) = lab_vm::exec_if_vm(&node_dir, command)? {
                std::process::exit(status);
            }
            let cgroup = std::path::Path::new(lab::CGROUP2_ROOT).join(prefix).join(&node);
            let mut cmd = netns::command_in_cgroup(&node, &cgroup, &program)?;
            cmd.env("RIPTIDE_NODE_NAME", &node).env("RIPTIDE_AGENT_SOCKET", node_dir.join("agent.sock"));
            cmd
        }
    };
    let kubeconfig = state_dir.join("kubeconfig");
    if kubeconfig.exists() {
        cmd.env("KUBECONFIG", kubeconfig);
    }
    let status = cmd.env("PATH", &path).args(args).status().with_context(|| format!("running {prog} in {target}"))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// `prog` resolved against `path` the way execvp would, or `prog` itself
/// (a path, or a name execvp will then report as not found).
fn which_in(prog: &str, path: &std::ffi::OsStr) -> std::path::PathBuf {
    if prog.contains('/') {
        return prog.into();
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| prog.into())
}

fn up(
    prefix: &str,
    state_dir: &std::path::Path,
    nodes: u32,
    detach: bool,
    net: LabNet,
    install: lab::Install,
    vm: Option<lab_vm::VmTools>,
) -> Result<()> {
    let exe = std::env::current_exe().context("locating riptide-lab")?;
    // Absolute: the kubelets' image map and the VM nodes' scripts name
    // paths under it, read from other working directories.
    let state_dir = std::path::absolute(state_dir).context("resolving the lab's state dir")?;
    let state_dir = state_dir.as_path();
    let cfg = LabConfig {
        prefix: prefix.to_owned(),
        nodes,
        subnet: 0,
        bin_dir: exe.parent().context("no bin dir")?.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
    };
    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;

    eprintln!("==> building a {nodes}-node lab ({prefix})");
    let mut lab = Lab::up_with(cfg.clone(), net)?;
    match install {
        lab::Install::HandWired => eprintln!("==> starting the control plane, then an agent and a kubelet per node"),
        lab::Install::Manifest => eprintln!(
            "==> starting the control plane and a kubelet per node, then applying manifests/riptide.yaml (DaemonSet riptide-agent)"
        ),
    }
    if let Some(tools) = &vm {
        eprintln!("==> VM nodes: {} under TCG, one vCPU each (minutes, not seconds)", tools.kernel.display());
        lab_vm::start_cluster(&mut lab, tools, install, Duration::from_secs(900))?;
    } else {
        lab.start_cluster_with(install, Duration::from_secs(120))?;
    }
    eprintln!("==> deploying cluster DNS (manifests/riptide-dns.yaml: kube-system/kube-dns at {})", lab::CLUSTER_DNS);
    lab.deploy_dns(Duration::from_secs(90))?;
    eprintln!("==> deploying the demo (3 × riptide-netexec, Services demo and demo-nodeport)");
    lab.deploy_demo()?;
    print_examples(&lab);
    if install == lab::Install::Manifest {
        // The agents are pods like any others.
        println!("Agent pods (kubectl -n riptide-system get pods -o wide):");
        let out = lab.kubectl().args(["-n", "riptide-system", "get", "pods", "-o", "wide"]).output().context("kubectl get pods")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!();
    }
    if detach {
        // The processes keep running (reparented to init); their pids are in
        // the state file, and teardown finds everything else by name.
        std::mem::forget(lab);
        eprintln!("==> detached; `cargo xtask down` removes the lab");
        return Ok(());
    }
    let mut last = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some((label, status)) = lab.exited().into_iter().next() {
            eprintln!("{label} exited ({status}); last lines of its log:");
            eprintln!("{}", lab.log_tail(&label, 20));
            lab.down()?;
            bail!("{label} exited; lab torn down");
        }
        // Live summary: one line whenever something changes.
        if let Ok(s) = lab.summary()
            && last != Some(s)
        {
            eprintln!(
                "[{}] nodes Ready {}/{} · pods Running {}/{} (Ready {}) · Services {}",
                chrono_like_now(),
                s.nodes_ready,
                s.nodes,
                s.pods_running,
                s.pods,
                s.pods_ready,
                s.services
            );
            last = Some(s);
        }
    }
    eprintln!("==> tearing down");
    lab.down()?;
    eprintln!("==> done: no namespaces, veths, cgroups or pins left");
    Ok(())
}

/// HH:MM:SS (UTC) without pulling in a time crate.
fn chrono_like_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

fn print_examples(lab: &Lab) {
    let c = lab.config();
    let kc = c.kubeconfig();
    let kc = std::fs::canonicalize(&kc).unwrap_or(kc);
    println!();
    println!("riptide lab is up: {} nodes on underlay 198.18.{}.0/24, control plane at https://{}", c.nodes, c.subnet, c.apiserver_addr());
    for i in 1..=c.nodes {
        println!("  {:<14} {:<15} pins {}/{}", c.node_name(i), c.node_ip(i).to_string(), lab::PIN_ROOT, c.node_name(i));
    }
    println!("  {:<14} {:<15} external client (`outside`)", c.outside_netns(), c.outside_ip().to_string());
    println!();
    println!("Point kubectl at it:");
    println!("  export KUBECONFIG={}", kc.display());
    println!("  kubectl get nodes -o wide");
    println!("  kubectl get pods -o wide");
    if lab.install() == lab::Install::Manifest {
        println!("  kubectl -n riptide-system get pods -o wide    # the agents: DaemonSet riptide-agent");
    }
    println!("  kubectl get svc,endpointslices");
    println!("Reach the demo:");
    println!("  cargo xtask lab exec outside -- curl -s http://{}:30080/hostname    # NodePort from outside", c.node_ip(1));
    println!("  cargo xtask lab exec n1 -- curl -s http://$(kubectl get svc demo -o jsonpath='{{.spec.clusterIP}}')/clientip");
    println!("See the datapath:");
    println!("  cargo xtask lab exec n1 -- riptide service list              # the node's agent, as cilium-dbg in its pod");
    println!("Resolve names from a pod (cluster DNS at {}):", lab::CLUSTER_DNS);
    println!("  kubectl exec deploy/demo -- getent hosts demo");
    println!("Logs in {}. Ctrl-C tears everything down.", c.log_dir().display());
    println!();
}

