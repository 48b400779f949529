//! Installs what riptide needs on a fresh machine of this kind, idempotently:
//! every step first checks whether its result is already there.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util::{output, run, step};

/// Debian packages: the LLVM bpf-linker links against, and the real peers the
/// tests run (iproute2 for namespaces, etcd, the reference CNI plugins,
/// python3-kubernetes as an API client, conntrack/iptables for baselines,
/// dnsutils' dig for the cluster DNS e2e tests).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "etcd-server",
    "containernetworking-plugins",
    "python3-kubernetes",
    "curl",
    "dnsutils",
    "protobuf-compiler",
    "libprotobuf-dev",
];

const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// Debian's netperf lives in the non-free component, which bookworm's
/// default sources leave out; the bench set-up adds it.
const NON_FREE_SOURCES: &str = "/etc/apt/sources.list.d/riptide-non-free.sources";
const NON_FREE: &str = "Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
/// Tools only `cargo xtask bench` needs (dnsperf and dnsmasq for the DNS
/// benchmark; dnsmasq-base is the binary without a system service).
const BENCH_PACKAGES: &[&str] = &["netperf", "iperf3", "dnsperf", "dnsmasq-base"];

/// `all()` plus the benchmark tools (netperf from non-free).
pub fn bench() -> Result<()> {
    all()?;
    let missing: Vec<&str> = BENCH_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("bench tools: already installed");
        return Ok(());
    }
    if !std::path::Path::new(NON_FREE_SOURCES).exists() {
        step("apt: enabling Debian's non-free component (netperf)");
        std::fs::write(NON_FREE_SOURCES, NON_FREE)
            .with_context(|| format!("writing {NON_FREE_SOURCES}"))?;
    }
    step(&format!("bench tools: installing {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update failed: is the Debian package registry reachable?")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

pub fn all() -> Result<()> {
    require_root()?;
    apt()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    step("setup complete");
    Ok(())
}

fn require_root() -> Result<()> {
    let uid = output(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        bail!(
            "riptide's setup and tests need root (eBPF, network namespaces, apt); \
             run again as root, e.g. `sudo -E cargo xtask …`"
        );
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step("apt packages: already installed");
        return Ok(());
    }
    step(&format!("apt packages: installing {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"])).context(
        "apt-get update failed: is the Debian package registry reachable from this machine?",
    )?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    Ok(())
}

/// The dated nightly the eBPF programs build with: the `channel` of
/// `ebpf/programs/rust-toolchain.toml`, which `ebpf/datapath/build.rs` reads
/// too.
fn pinned_nightly() -> Result<&'static str> {
    const FILE: &str = include_str!("../../ebpf/programs/rust-toolchain.toml");
    FILE.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"'))
        })
        .context("ebpf/programs/rust-toolchain.toml has no `channel = \"…\"` line")
}

fn nightly_rust_src() -> Result<()> {
    let nightly = pinned_nightly()?;
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup not found: riptide builds eBPF with a rustup-managed nightly")?;
    // "nightly-2026-05-20-x86_64-unknown-linux-gnu (default)"
    let have = toolchains
        .lines()
        .any(|l| l.split_whitespace().next().is_some_and(|t| t.starts_with(&format!("{nightly}-"))));
    if !have {
        step(&format!("{nightly}: installing (minimal profile, rust-src)"));
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            nightly,
            // rustup's own version is the machine owner's choice.
            "--no-self-update",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))
        .with_context(|| format!("installing {nightly} (is static.rust-lang.org reachable?)"));
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        nightly,
    ]))
    .unwrap_or_default();
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step(&format!("{nightly} rust-src: already installed"));
        return Ok(());
    }
    step(&format!("{nightly} rust-src: installing"));
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", nightly]))
        .with_context(|| format!("adding rust-src to {nightly}"))
}

fn bpf_linker() -> Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    // "bpf-linker 0.13.0"
    if version
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with(&format!("{BPF_LINKER_VERSION}.")))
    {
        step(&format!("bpf-linker: {} already installed", version.trim()));
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against LLVM 22 (a few minutes)"
    ));
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path))
    .context("cargo install bpf-linker failed (is llvm-22-dev installed and crates.io reachable?)")
}

fn bpffs() -> Result<()> {
    let fstype = output(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]))
        .unwrap_or_default();
    if fstype.trim() == "bpf_fs" {
        step("bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    step("bpffs: mounting at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs at /sys/fs/bpf")
}
