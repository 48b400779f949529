//! Builds the eBPF programs (`ebpf/programs`) for bpfel-unknown-none with the
//! pinned nightly (`ebpf/programs/rust-toolchain.toml`) and bpf-linker, and
//! leaves the object in OUT_DIR, where `src/lib.rs` embeds it. `cargo xtask
//! setup` installs what this needs.
use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow, bail};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("programs");
    let nightly = pinned_nightly(&root.join("rust-toolchain.toml"))?;
    require_installed(&nightly)?;
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // aya-build relays every line the inner cargo writes to stderr as a
    // `cargo:warning`, so its progress lines ("Compiling syn …", about 40 of
    // them) would read as warnings on every build of this crate. A quiet
    // inner cargo still reports the programs' own warnings and errors: those
    // arrive as JSON compiler messages on stdout, which aya-build renders.
    // SAFETY: the build script is single-threaded here; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "riptide-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(&nightly),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker or rust-src is missing)")
}

/// The `channel = "nightly-YYYY-MM-DD"` line of the programs' toolchain file.
fn pinned_nightly(file: &Path) -> anyhow::Result<String> {
    println!("cargo:rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim_start().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .ok_or_else(|| anyhow!("{} has no `channel = \"…\"` line", file.display()))
}

/// aya-build would fail with "failed to get rustc version meta"; say what to
/// do instead. Without rustup, aya-build falls back to the current toolchain
/// (with a warning), so only a rustup that lacks the toolchain is an error.
fn require_installed(nightly: &str) -> anyhow::Result<()> {
    let Ok(out) = Command::new("rustup").args(["run", nightly, "rustc", "-V"]).output() else {
        return Ok(());
    };
    if !out.status.success() {
        bail!(
            "the eBPF programs build with {nightly} (ebpf/programs/rust-toolchain.toml), which \
             rustup does not have: run `cargo xtask setup`, or `rustup toolchain install \
             {nightly} --profile minimal --component rust-src`"
        );
    }
    Ok(())
}
