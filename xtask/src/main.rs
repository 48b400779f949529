//! `cargo xtask <task>`: the entry points of development.
//!
//! - `setup`: installs everything riptide needs on a fresh machine (idempotent).
//! - `test`: setup, then every test: unit, eBPF (BPF_PROG_TEST_RUN), privileged;
//!   `test --kernel 6.1`: the kernel-facing tests inside a VM of that kernel.
//! - `run`: setup, build, then the main job in the foreground; Ctrl-C tears down;
//!   `run --vm`: every lab node a VM (`tests/src/lab_vm.rs`).
//! - `down`: removes whatever a previous `run` left (safe to run twice).
mod setup;
mod util;
mod vm;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "riptide development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build chain and test tools (apt, nightly rust-src, bpf-linker, bpffs).
    Setup,
    /// Run every test (does `setup` first). Extra args go to `cargo test`.
    Test {
        /// Instead: the kernel-facing tests (datapath, CNI) in a VM booting
        /// Debian's newest kernel of this series (`6.1`) or this kernel
        /// image; extra args then go to each test binary.
        #[arg(long, value_name = "SERIES|IMAGE")]
        kernel: Option<String>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start the local cluster in the foreground (does `setup` first).
    Run {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Leave the lab running in the background (`cargo xtask down` removes it).
        #[arg(long)]
        detach: bool,
        /// `vxlan`: a VXLAN overlay between nodes that sit behind a router.
        #[arg(long, value_parser = ["vxlan"])]
        tunnel: Option<String>,
        /// `manifest` (the default): bare kubelets, then
        /// manifests/riptide.yaml applied through the apiserver;
        /// `hand-wired`: the lab starts agents itself, for debugging.
        #[arg(long, value_parser = ["manifest", "hand-wired"])]
        install: Option<String>,
        /// Each node a QEMU VM (TCG) with its own kernel, on the lab
        /// underlay; the control plane stays on the host.
        #[arg(long)]
        vm: bool,
        /// The VMs' kernel: a Debian series (`6.1`, the default) or an image.
        #[arg(long, value_name = "SERIES|IMAGE", requires = "vm")]
        kernel: Option<String>,
    },
    /// Benchmarks: riptide vs the direct path vs kube-proxy-shaped rules
    /// (results under target/bench/).
    Bench {
        /// A smoke run that finishes in under 3 minutes.
        #[arg(long)]
        quick: bool,
        /// Only this scenario (repeatable; clusterip, clusterip-local,
        /// nodeport, nodeport-local, netpol, netpol-local), and no micro
        /// benchmarks.
        #[arg(long)]
        scenario: Vec<String>,
        /// Only this micro benchmark (e.g. `pps`: packets/s through a
        /// NodePort to another node, iptables / nftables / riptide tc /
        /// riptide XDP / riptide XDP+DSR), without the netperf cluster.
        only: Option<String>,
    },
    /// The property-based fuzzers (apiserver inputs, CNI config, every tc
    /// program through BPF_PROG_TEST_RUN) with many more cases than `test`.
    Fuzz {
        /// Cases per property (`cargo xtask test` runs 256).
        #[arg(long, default_value_t = 20_000)]
        cases: u32,
    },
    /// Tear down whatever a previous `run` left behind.
    Down,
    /// Lab helpers: `cargo xtask lab exec <n1|outside> -- CMD`.
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup::all(),
        Task::Test { kernel: None, args } => {
            setup::all()?;
            test(&root, &args)
        }
        Task::Test {
            kernel: Some(kernel),
            args,
        } => {
            setup::all()?;
            let tools = setup::vm(&kernel)?;
            vm::test(&root, &target_dir(&root), &tools, &args)
        }
        Task::Run {
            nodes,
            detach,
            tunnel,
            install,
            vm,
            kernel,
        } => {
            setup::all()?;
            let mut args = vec!["up".to_owned(), "--nodes".to_owned(), nodes.to_string()];
            if vm {
                let tools = setup::vm(kernel.as_deref().unwrap_or("6.1"))?;
                args.extend(["--vm".to_owned(), "--vm-kernel".to_owned()]);
                args.push(tools.kernel.to_string_lossy().into_owned());
            }
            if detach {
                args.push("--detach".into());
            }
            if let Some(t) = tunnel {
                args.extend(["--tunnel".to_owned(), t]);
            }
            if let Some(i) = install {
                args.extend(["--install".to_owned(), i]);
            }
            lab(&root, &args)
        }
        Task::Bench {
            quick,
            scenario,
            only: Some(only),
        } => {
            anyhow::ensure!(
                scenario.is_empty(),
                "--scenario picks netperf scenarios; `bench {only}` runs one micro benchmark"
            );
            setup::bench()?;
            std::fs::create_dir_all(root.join("target/bench")).context("creating target/bench")?;
            micro_benches(&root, quick, Some(&only))
        }
        Task::Bench {
            quick,
            scenario,
            only: None,
        } => {
            setup::bench()?;
            util::step("building the benchmarks");
            util::run(util::cargo(&root).args(["build", "--bins"]))?;
            let mut cmd = std::process::Command::new(target_dir(&root).join("debug/riptide-bench"));
            cmd.current_dir(&root).args(["--out", "target/bench"]);
            if quick {
                cmd.arg("--quick");
            }
            for s in &scenario {
                cmd.args(["--scenario", s]);
            }
            util::run(&mut cmd)?;
            if !scenario.is_empty() {
                return Ok(());
            }
            micro_benches(&root, quick, None)
        }
        Task::Fuzz { cases } => {
            setup::all()?;
            fuzz(&root, cases)
        }
        Task::Down => lab(&root, &["down".into()]),
        Task::Lab { args } => lab(&root, &args),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}

/// Where cargo puts build outputs: `CARGO_TARGET_DIR` (relative to the
/// workspace root, as cargo reads it from there) or `target/`. Results stay
/// under the root's `target/bench/` either way.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    // End-to-end tests start the workspace's binaries (agent, CNI, control
    // plane, lab) from target/debug, so build them first.
    util::step("building the binaries");
    util::run(util::cargo(root).args(["build", "--bins"]))?;
    util::step("running the tests");
    let mut cmd = util::cargo(root);
    // default-members: everything but the bpfel-only eBPF crate.
    cmd.args(["test", "--no-fail-fast"]).args(extra);
    // Privileged tests must not quietly skip under the project's test command.
    cmd.env("RIPTIDE_REQUIRE_PRIVILEGED", "1");
    let tally = util::run_tests(&mut cmd)?;
    // One closing line over every test binary (cargo's own last line is the
    // last binary's, often an empty doctest run).
    println!("{}", tally.summary());
    if !tally.ok || tally.failed > 0 {
        anyhow::bail!("tests failed");
    }
    Ok(())
}

/// The fuzz targets, one cargo invocation; they also run (256 cases each)
/// in `test`.
const FUZZ_TARGETS: [(&str, &str); 3] = [
    ("riptide-controlplane", "fuzz_inputs"),
    ("riptide-cni", "fuzz_config"),
    ("riptide-datapath", "kernel_fuzz_test_run"),
];

fn fuzz(root: &Path, cases: u32) -> Result<()> {
    util::step(&format!("fuzzing with {cases} cases per property"));
    let mut cmd = util::cargo(root);
    cmd.args(["test", "--no-fail-fast"]);
    for (package, target) in FUZZ_TARGETS {
        cmd.args(["-p", package, "--test", target]);
    }
    cmd.env("PROPTEST_CASES", cases.to_string()).env("RIPTIDE_REQUIRE_PRIVILEGED", "1");
    let tally = util::run_tests(&mut cmd)?;
    println!("{}", tally.summary());
    if !tally.ok || tally.failed > 0 {
        anyhow::bail!("a fuzz target failed (proptest printed the minimal input above)");
    }
    Ok(())
}

/// The micro benchmarks, in the order they run: name, package, example
/// and its arguments (`quick`: the shorter runs; `baseline_agent`: a second
/// agent binary for the agent benchmark to compare against).
fn micro_bench_list(
    quick: bool,
    baseline_agent: Option<&str>,
) -> [(&'static str, &'static str, &'static str, Vec<&str>); 11] {
    [
        (
            "ebpf-lb",
            "riptide-datapath",
            "lb_bench",
            vec![if quick { "500" } else { "5000" }],
        ),
        // NetworkPolicy: first and established packets with 0, 100 and
        // 1,000 policies over 1,000 pods, as deltas and ratios to the
        // no-policy baseline of the same run.
        (
            "ebpf-policy",
            "riptide-datapath",
            "policy_bench",
            vec![if quick { "500" } else { "5000" }],
        ),
        // Maglev: table rebuild at 1k backends, first-packet cost next to
        // random in the same run (ratios).
        (
            "ebpf-maglev",
            "riptide-datapath",
            "lb_bench",
            vec!["maglev", if quick { "500" } else { "5000" }],
        ),
        // XDP NodePort acceleration: ns/packet next to the tc path at 1,
        // 1k and 10k Services.
        (
            "ebpf-xdp",
            "riptide-datapath",
            "lb_bench",
            vec!["xdp", if quick { "500" } else { "5000" }],
        ),
        (
            "cni-add-del",
            "riptide-cni",
            "bench_add_del",
            if quick {
                vec!["10", "2"]
            } else {
                vec!["50", "5"]
            },
        ),
        // Programming latency (EndpointSlice change → map entry) at 10k
        // Services / 50k endpoints / 25k Pods on 834 Nodes (a fifth with
        // --quick) against the iptables-restore a kube-proxy sync does for
        // the same change, and the agent's RSS; next to the RSS of the agent
        // binary in RIPTIDE_BASELINE_AGENT (an earlier build), when set,
        // cold-started in the same run.
        (
            "agent",
            "riptide-agent",
            "agent_bench",
            quick
                .then_some("--quick")
                .into_iter()
                .chain(baseline_agent.into_iter().flat_map(|b| ["--baseline-agent", b]))
                .collect(),
        ),
        // NetworkPolicy programming latency (policy change or pod label
        // change → the maps allow the new flow) at 1,000 policies / 5,000
        // pods.
        (
            "agent-policy",
            "riptide-agent",
            "agent_bench",
            if quick {
                vec!["--policy", "--quick"]
            } else {
                vec!["--policy"]
            },
        ),
        // riptide-dns next to dnsmasq serving the same names, each pinned
        // to one core, dnsperf on the other: queries/s, p99, RSS at 10k
        // Services / 50k endpoints (1k with --quick).
        (
            "dns",
            "riptide-dns",
            "dns_bench",
            if quick { vec!["--quick"] } else { vec![] },
        ),
        // The apiserver: 10k pods (1k with --quick), embedded store vs
        // etcd, create/list/watch latency, 100-watcher fan-out, peak RSS.
        (
            "apiserver",
            "riptide-controlplane",
            "apiserver_bench",
            if quick { vec!["--quick"] } else { vec![] },
        ),
        // Packets/s of small UDP datagrams from an outside namespace through
        // a NodePort on node 1 to a pod on node 2, and softirq CPU per
        // million packets: kube-proxy-shaped iptables and nftables, riptide
        // tc, XDP and XDP+DSR, at 1 and 10k Services (namespaces of its own);
        // both the whole path and node 1 alone (XDP live-frames generator,
        // counting drop after node 1), interleaved.
        (
            "pps",
            "riptide-datapath",
            "pps_bench",
            if quick {
                vec!["--hop", "both", "--quick"]
            } else {
                vec!["--hop", "both"]
            },
        ),
        // netperf TCP_RR / TCP_CRR through the same NodePort paths (XDP on
        // and off, XDP+DSR) on the same wiring.
        (
            "pps-netperf",
            "riptide-datapath",
            "pps_bench",
            if quick {
                vec!["--netperf", "--quick"]
            } else {
                vec!["--netperf"]
            },
        ),
    ]
}

/// Micro benchmarks, each printing one JSON document: ns/packet of the tc LB
/// path via BPF_PROG_TEST_RUN at 1/1k/10k Services and of NetworkPolicy at
/// 0/100/1,000 policies, Maglev next to random (table rebuild, first
/// packet), XDP NodePort next to tc at 1/1k/10k Services, CNI ADD/DEL latency next
/// to the reference bridge + host-local plugins, the agent's programming
/// latency next to iptables-restore and for NetworkPolicy, riptide-dns next to dnsmasq
/// (dnsperf), the apiserver on both stores, and packets/s through a
/// NodePort to another node (iptables, nftables, riptide tc and XDP).
/// Release builds, each an example of the crate it measures; results go to
/// target/bench/<name>.json and a section of results.md. `only`: just the
/// benchmark of that name.
fn micro_benches(root: &Path, quick: bool, only: Option<&str>) -> Result<()> {
    let baseline_agent = std::env::var("RIPTIDE_BASELINE_AGENT").ok();
    let benches = micro_bench_list(quick, baseline_agent.as_deref());
    if let Some(o) = only {
        anyhow::ensure!(
            benches.iter().any(|b| b.0 == o),
            "no micro benchmark {o} (one of: {})",
            benches.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
        );
    }
    let mut md = String::from("\n## Micro benchmarks\n");
    for (name, pkg, example, args) in benches {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        util::step(&format!("micro benchmark {name}"));
        // The package's own binaries too: the CNI benchmark execs the
        // release `riptide-cni` next to it.
        // The agent and apiserver benchmarks run the release control plane.
        util::run(util::cargo(root).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            pkg,
            "-p",
            "riptide-controlplane",
            "--bins",
        ]))?;
        let out = util::cargo(root)
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                pkg,
                "--example",
                example,
                "--",
            ])
            .args(&args)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {example}"))?;
        if !out.status.success() {
            anyhow::bail!("{example} failed: {}", out.status);
        }
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        std::fs::write(root.join(format!("target/bench/{name}.json")), &json)
            .with_context(|| format!("writing target/bench/{name}.json"))?;
        md.push_str(&format!("\n### {name}\n\n```json\n{}\n```\n", json.trim()));
        println!("{name}: {}", json.trim());
    }
    let results = root.join("target/bench/results.md");
    let mut text = std::fs::read_to_string(&results).unwrap_or_default();
    text.push_str(&md);
    std::fs::write(&results, text).context("appending to target/bench/results.md")?;
    Ok(())
}

fn lab(root: &Path, args: &[String]) -> Result<()> {
    let bin = target_dir(root).join("debug/riptide-lab");
    if args.first().is_some_and(|a| a == "up") {
        util::step("building the lab");
        util::run(util::cargo(root).args(["build", "--bins"]))?;
    } else {
        // `lab exec` and `down` are commands a user types into a shell next
        // to a running lab: their output is the command's own, so the build
        // speaks only when it fails.
        util::run_quiet(util::cargo(root).args(["build", "--bins", "--quiet"]))?;
    }
    let status = std::process::Command::new(bin)
        .args(args)
        .current_dir(root)
        .status()
        .context("starting riptide-lab")?;
    // `lab exec` passes the command's exit code through, as `kubectl exec` does.
    std::process::exit(status.code().unwrap_or(1));
}
