//! Installs what riptide needs on a fresh machine of this kind, idempotently:
//! every step first checks whether its result is already there.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

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
/// benchmark; dnsmasq-base is the binary without a system service; ethtool
/// for the packets/s benchmark's device counters when a path loses packets).
const BENCH_PACKAGES: &[&str] = &["netperf", "iperf3", "dnsperf", "dnsmasq-base", "ethtool"];

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
    apt_install(&missing)
}

/// What `cargo xtask test --kernel` needs besides [`all`]: QEMU (TCG:
/// nested KVM hangs on these machines), busybox for virtme-ng's initramfs,
/// kmod (depmod for the extracted modules; modprobe in the guest, which
/// runs on this machine's root filesystem), python3-venv for virtme-ng.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod", "python3-venv"];
/// virtme-ng (PyPI) boots a kernel with this machine's root shared
/// read-only; pinned, installed into its own venv under the cache.
const VIRTME_NG_VERSION: &str = "1.42";

/// A kernel to boot and the tool that boots it.
pub struct VmTools {
    /// virtme-ng's `vng`; its directory must be on PATH (it runs
    /// `virtme-run` from there).
    pub vng: PathBuf,
    /// The kernel image; virtme-ng finds its modules under
    /// `<image>/../../lib/modules/<release>`.
    pub kernel: PathBuf,
    /// `uname -r` of that kernel, e.g. `6.1.0-57-amd64`.
    pub release: String,
}

/// [`all`] plus a kernel for `cargo xtask test --kernel SERIES`: QEMU,
/// virtme-ng, and Debian's newest `linux-image-SERIES.0-N-amd64` unpacked
/// into the cache (never installed: the package's postinst would build an
/// initramfs and touch the boot loader of this machine). `kernel` may also
/// be the path of a kernel image, used as it is.
pub fn vm(kernel: &str) -> Result<VmTools> {
    require_root()?;
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step("VM tools: already installed");
    } else {
        step(&format!("VM tools: installing {}", missing.join(" ")));
        apt_install(&missing)?;
    }
    let vng = virtme_ng()?;
    let (kernel, release) = if Path::new(kernel).is_file() {
        let path = std::fs::canonicalize(kernel).with_context(|| format!("resolving {kernel}"))?;
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        (path, name)
    } else {
        debian_kernel(kernel)?
    };
    Ok(VmTools {
        vng,
        kernel,
        release,
    })
}

/// `$XDG_CACHE_HOME/riptide` or `~/.cache/riptide`: downloads that outlive
/// `cargo clean` (a kernel is 400 MB unpacked).
fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("riptide"))
}

fn virtme_ng() -> Result<PathBuf> {
    let venv = cache_dir()?.join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let vng = venv.join("bin/vng");
    let version = output(Command::new(&vng).arg("--version")).unwrap_or_default();
    // "virtme-ng 1.42"
    if version.split_whitespace().nth(1) == Some(VIRTME_NG_VERSION) {
        step(&format!("virtme-ng {VIRTME_NG_VERSION}: already installed"));
        return Ok(vng);
    }
    step(&format!(
        "virtme-ng {VIRTME_NG_VERSION}: installing into {}",
        venv.display()
    ));
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .with_context(|| format!("creating a Python venv at {}", venv.display()))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")))
    .context("pip install virtme-ng failed (is pypi.org reachable?)")?;
    Ok(vng)
}

/// Debian's newest `linux-image-<series>.0-<abi>-amd64`, unpacked under the
/// cache with its modules indexed (depmod), so the guest loads veth,
/// bridge, vxlan and cls_bpf on demand: Debian builds them as modules.
fn debian_kernel(series: &str) -> Result<(PathBuf, String)> {
    if !series
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        bail!(
            "--kernel takes a kernel series such as 6.1, or the path of a kernel image; got {series:?}"
        );
    }
    let mut pkg = newest_kernel_package(series);
    if pkg.is_none() {
        run(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed: is the Debian package registry reachable?")?;
        pkg = newest_kernel_package(series);
    }
    let pkg = pkg.with_context(|| {
        format!("Debian offers no linux-image-{series}.0-*-amd64 package to this machine")
    })?;
    let release = pkg.trim_start_matches("linux-image-").to_owned();
    let kernels = cache_dir()?.join("kernels");
    let dir = kernels.join(&pkg);
    let image = dir.join(format!("boot/vmlinuz-{release}"));
    if image.is_file() {
        step(&format!("kernel {release}: unpacked in {}", dir.display()));
        return Ok((image, release));
    }
    step(&format!(
        "kernel {release}: downloading {pkg} and unpacking it into {}",
        dir.display()
    ));
    // Unpacked into a scratch directory and renamed into place: an
    // interrupted download never looks like a kernel.
    let scratch = kernels.join(format!(".{pkg}.partial"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    run(Command::new("apt-get")
        // apt's download sandbox user cannot write to root's cache.
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", &pkg])
        .current_dir(&scratch))
    .with_context(|| format!("apt-get download {pkg} failed"))?;
    let deb = std::fs::read_dir(&scratch)
        .with_context(|| format!("listing {}", scratch.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", scratch.display()))?;
    let root = scratch.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    // The package leaves modules.dep to its postinst.
    run(Command::new("depmod")
        .arg("-a")
        .arg("-b")
        .arg(&root)
        .arg(&release))
    .with_context(|| format!("depmod for {release}"))?;
    std::fs::rename(&root, &dir)
        .with_context(|| format!("moving {} to {}", root.display(), dir.display()))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok((image, release))
}

/// The highest ABI number among `linux-image-<series>.0-<abi>-amd64` in
/// apt's package lists.
fn newest_kernel_package(series: &str) -> Option<String> {
    let pattern = format!(
        "^linux-image-{}\\.0-[0-9]+-amd64$",
        series.replace('.', "\\.")
    );
    let list = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let prefix = format!("linux-image-{series}.0-");
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name.strip_prefix(&prefix)?.strip_suffix("-amd64")?;
            Some((abi.parse::<u32>().ok()?, name.to_owned()))
        })
        .max()
        .map(|(_, name)| name)
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
    apt_install(&missing)
}

/// `apt-get update` and `apt-get install` of `packages`, without
/// recommends.
fn apt_install(packages: &[&str]) -> Result<()> {
    run(Command::new("apt-get").args(["update", "-q"])).context(
        "apt-get update failed: is the Debian package registry reachable from this machine?",
    )?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", packages.join(" ")))
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
