//! What riptide's test suites share, in one place rather than a copy per
//! suite: the gate of tests that need root, network namespaces a test
//! creates and removes, workspace binaries a test runs, the
//! kube-proxy-shaped rules the benchmarks compare against and the memory
//! of the processes they measure. A
//! dev-dependency of the production crates — as aya's
//! `test/integration-common` — so nothing here reaches a production build;
//! only the lab and bench harness (`riptide-tests`, never shipped) depends
//! on it normally. Panicking on a broken environment is the point of most
//! helpers: a test that cannot set itself up must fail loudly. The lab
//! needs errors instead, so the namespace primitives also come in fallible
//! form (`netns::try_command`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cgroup;
pub mod kubeproxy;
pub mod netns;
pub mod procfs;
pub mod uplink_lab;
pub mod veth_xdp;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// True when the test may use the kernel (root). Otherwise it prints
/// `SKIP: needs root <needs>` and returns false, unless
/// `RIPTIDE_REQUIRE_PRIVILEGED` is set (as `cargo xtask test` sets it): then
/// it panics, so the project's own test command never skips a privileged
/// test silently.
///
/// `needs` says what for: "to load eBPF programs", "for network namespaces".
pub fn privileged(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("RIPTIDE_REQUIRE_PRIVILEGED").is_none(),
        "privileged test run without root (RIPTIDE_REQUIRE_PRIVILEGED is set); it needs root {needs}"
    );
    eprintln!("SKIP: needs root {needs}");
    false
}

/// Runs `args[0]` with the rest as arguments and returns its stdout;
/// panics with its stderr when it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip <args>`, see [`run`].
pub fn ip(args: &[&str]) -> String {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    run(&all)
}

/// The workspace binary `bin` of `package`, in `bin_dir` (the directory of
/// a binary the test already has, e.g. `CARGO_BIN_EXE_<name>`'s parent),
/// built there first if missing: a test of one package can run another
/// package's binary without a prior `cargo build` of the workspace.
pub fn workspace_bin(bin_dir: &Path, package: &str, bin: &str) -> PathBuf {
    let path = bin_dir.join(bin);
    if !path.exists() {
        cargo_build(bin_dir, package, "--bin", bin);
    }
    path
}

/// Example `example` of `package`, built now (a no-op when it is up to
/// date; `cargo test` of one test file does not build examples) into the
/// target directory around `bin_dir`, as [`workspace_bin`] locates it: a
/// test can run a benchmark through its real command line.
pub fn workspace_example(bin_dir: &Path, package: &str, example: &str) -> PathBuf {
    cargo_build(bin_dir, package, "--example", example);
    bin_dir.join("examples").join(example)
}

/// `cargo build -p package <kind> <name>` into the target directory that
/// holds `bin_dir` (the test's own profile directory).
fn cargo_build(bin_dir: &Path, package: &str, kind: &str, name: &str) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target = bin_dir.parent().expect("a binary directory inside a target directory");
    let st = Command::new(cargo)
        .args(["build", "-p", package, kind, name])
        .env("CARGO_TARGET_DIR", target)
        .status()
        .unwrap_or_else(|e| panic!("running cargo to build {name}: {e}"));
    assert!(st.success(), "building {name}");
}
