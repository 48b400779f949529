//! `cargo xtask test --kernel SERIES`: the tests that exercise the kernel —
//! the eBPF programs through BPF_PROG_TEST_RUN and the verifier, socket LB
//! and attachment in network namespaces, the CNI plugin end to end — on
//! another kernel than the machine's, inside one QEMU VM.
//!
//! The test binaries are built here, as `cargo test --no-run` builds them;
//! virtme-ng boots the kernel with this machine's root filesystem shared
//! read-only (writes go to a guest-only overlay) and runs them from a script,
//! one after another, in a single boot (a boot costs ~20 s under TCG). The
//! guest writes its output into `target/vm-test/`, the only directory it may
//! write on this machine; this side follows that log live and totals it into
//! the same `summary:` line as `cargo xtask test`.
//!
//! The guest has no network device (QEMU `-net none`, virtme-ng's default):
//! the tests only use the namespaces and devices they create inside it, and
//! its bpffs, cgroups and namespaces are its own, so nothing it does reaches
//! the host's datapath.

use std::{
    fmt::Write as _,
    fs::File,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup::VmTools,
    util::{self, Tally},
};

/// Packages whose test binaries run in the VM: every test of the datapath
/// (BPF_PROG_TEST_RUN, the verifier's load of each program, attach, socket
/// LB in namespaces) and of the CNI plugin.
const PACKAGES: &[&str] = &["riptide-datapath", "riptide-cni"];

/// Two vCPUs, as the machine has: TCG runs one host thread per vCPU.
const VM_CPUS: &str = "2";
const VM_MEMORY: &str = "2G";
/// The whole pass, boot included; past it the VM is killed. Generous: TCG
/// runs the guest 5–20× slower than the host, more while the host builds.
const VM_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// One test binary inside the guest (coreutils `timeout`), so one that hangs
/// costs its own result, not the pass.
const BINARY_TIMEOUT_SECS: u32 = 30 * 60;

/// Lines the guest script writes around the test output.
const MARK: &str = "riptide-vm:";

/// A test executable and the directory cargo would run it in (its
/// package's root).
struct TestBinary {
    name: String,
    exe: PathBuf,
    cwd: PathBuf,
}

/// Builds the test binaries, runs them in one VM booted from
/// `tools.kernel`, and prints the summary. `extra` goes to every test
/// binary (libtest filters and flags).
pub fn test(root: &Path, target: &Path, tools: &VmTools, extra: &[String]) -> Result<()> {
    // The same two invocations as the host pass (`cargo build --bins`, then
    // `cargo test` over the default members): after it they are no-ops.
    // Selecting packages with `-p` would resolve features differently and
    // rebuild the eBPF objects into a second copy of every artifact, which
    // is time and, on CI's disk, space (the CI run of 5150473 ran out).
    // The tests run the workspace's binaries (the CNI install test runs the
    // agent's `install-cni`).
    util::step("building the binaries the tests run");
    util::run(util::cargo(root).args(["build", "--bins"]))?;
    util::step("building the test binaries");
    let bins = test_binaries(root)?;

    let dir = target.join("vm-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("run.sh");
    let log = dir.join("log");
    let console = dir.join("console.log");
    std::fs::write(&script, guest_script(&bins, extra))
        .with_context(|| format!("writing {}", script.display()))?;
    // A previous run's log must never be read as this run's.
    File::create(&log).with_context(|| format!("creating {}", log.display()))?;

    util::step(&format!(
        "booting {} in QEMU (TCG, {VM_CPUS} CPUs, {VM_MEMORY}): {} test binaries of {}",
        tools.release,
        bins.len(),
        PACKAGES.join(", ")
    ));
    let started = Instant::now();
    let mut child = boot(tools, &dir, &script, &log, &console)?;
    let mut follow = Follow::new(&log)?;
    let status = loop {
        follow.read()?;
        if let Some(status) = child.try_wait().context("waiting for the VM")? {
            break Some(status);
        }
        if started.elapsed() > VM_TIMEOUT {
            kill_tree(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    follow.read()?;
    follow.finish();
    let wall = started.elapsed();

    let mut tally = follow.tally;
    tally.ok = follow.done && follow.failed_binaries.is_empty();
    println!(
        "vm: kernel {} ({}), {} test binaries, {:.0} s wall time from boot to power-off",
        follow.kernel.as_deref().unwrap_or("?"),
        tools.kernel.display(),
        bins.len(),
        wall.as_secs_f64()
    );
    for f in &follow.failed_binaries {
        println!("vm: {f}");
    }
    if !follow.done {
        let why = match status {
            None => format!("killed after {} min", VM_TIMEOUT.as_secs() / 60),
            Some(s) => format!("exited ({s}) before the script finished"),
        };
        println!("vm: the VM {why}; last lines of {}:", console.display());
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(40)..] {
            println!("  {l}");
        }
    }
    println!("{}", tally.summary());
    if !tally.ok || tally.failed > 0 {
        bail!("tests on kernel {} failed", tools.release);
    }
    Ok(())
}

/// `cargo test --no-run` of the default members (lib, bins and integration
/// tests; doctests only run through rustdoc, on the host), and the
/// executables it reports that belong to [`PACKAGES`].
fn test_binaries(root: &Path) -> Result<Vec<TestBinary>> {
    let mut cmd = util::cargo(root);
    cmd.args([
        "test",
        "--no-run",
        "--lib",
        "--bins",
        "--tests",
        "--message-format=json-render-diagnostics",
    ]);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact"
            || msg["profile"]["test"] != true
            || !PACKAGES.contains(&package_name(&msg["package_id"]))
        {
            continue;
        }
        let (Some(exe), Some(manifest), Some(name)) = (
            msg["executable"].as_str(),
            msg["manifest_path"].as_str(),
            msg["target"]["name"].as_str(),
        ) else {
            continue;
        };
        let cwd = Path::new(manifest)
            .parent()
            .with_context(|| format!("manifest path {manifest} has no directory"))?;
        bins.push(TestBinary {
            name: name.to_owned(),
            exe: PathBuf::from(exe),
            cwd: cwd.to_owned(),
        });
    }
    if bins.is_empty() {
        bail!("cargo test --no-run reported no test executables");
    }
    Ok(bins)
}

/// The package name in a cargo `package_id`: `path+file:///…/dir#name@1.0`
/// (cargo ≥ 1.77; `#1.0` alone when the name is the directory's), or the
/// older `name 1.0 (path+file:///…)`.
fn package_name(id: &serde_json::Value) -> &str {
    let id = id.as_str().unwrap_or_default();
    match id.rsplit_once('#') {
        Some((url, frag)) => match frag.split_once('@') {
            Some((name, _)) => name,
            None => url.rsplit('/').next().unwrap_or_default(),
        },
        None => id.split(' ').next().unwrap_or_default(),
    }
}

/// The script the guest runs: bpffs (virtme-ng mounts none) and cgroup v2
/// where this machine's hybrid layout has it and the tests look for it
/// (`/sys/fs/cgroup/unified`; virtme-ng mounts it at `/sys/fs/cgroup`),
/// then each binary in its package directory as cargo runs it, with
/// privileged tests required, bracketed by [`MARK`] lines.
fn guest_script(bins: &[TestBinary], extra: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         # Written by `cargo xtask test --kernel`; runs inside the VM.\n\
         mount -t bpf bpf /sys/fs/bpf || echo \"riptide-vm: cannot mount bpffs\"\n\
         if [ ! -d /sys/fs/cgroup/unified ]; then\n\
         \x20 mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/unified &&\n\
         \x20 mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified || echo \"riptide-vm: cannot mount cgroup2\"\n\
         fi\n\
         echo \"riptide-vm: kernel $(uname -r)\"\n\
         export RIPTIDE_REQUIRE_PRIVILEGED=1\n",
    );
    let args: String = extra.iter().map(|a| format!(" {}", sh_quote(a))).collect();
    for b in bins {
        let _ = write!(
            s,
            "echo \"{MARK} run {name}\"\n\
             cd {cwd} && timeout -k 10 {BINARY_TIMEOUT_SECS} {exe}{args}\n\
             echo \"{MARK} exit $? {name}\"\n",
            name = b.name,
            cwd = sh_quote(&b.cwd.to_string_lossy()),
            exe = sh_quote(&b.exe.to_string_lossy()),
        );
    }
    let _ = writeln!(s, "echo \"{MARK} done\"");
    s
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Starts virtme-ng: `script` runs as root in the guest, its output going
/// to `log` in `dir` (shared read-write); the kernel's console goes to
/// `console`. Never KVM: nested KVM hangs on these machines.
fn boot(tools: &VmTools, dir: &Path, script: &Path, log: &Path, console: &Path) -> Result<Child> {
    let out = File::create(console).with_context(|| format!("creating {}", console.display()))?;
    let err = out.try_clone().context("duplicating the console file")?;
    // vng runs virtme-run, which sits next to it.
    let bin_dir = tools.vng.parent().context("vng has no directory")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let exec = format!(
        "sh {} > {} 2>&1",
        sh_quote(&script.to_string_lossy()),
        sh_quote(&log.to_string_lossy())
    );
    Command::new(&tools.vng)
        .arg("--run")
        .arg(&tools.kernel)
        .args(["--disable-kvm", "--cpus", VM_CPUS, "--memory", VM_MEMORY])
        .arg("--rwdir")
        .arg(dir)
        // Kernel messages in the console log: a panic or an oops is the
        // first thing to read when the script never finished.
        .arg("--verbose")
        .args(["--exec", &exec])
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", tools.vng.display()))
}

/// Kills vng and what it started (virtme-run forks QEMU), children first.
fn kill_tree(child: &mut Child) {
    for pid in descendants(child.id()).into_iter().rev() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Process ids below `pid`, parents before children.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // "pid (comm) state ppid …"; comm may hold spaces and parens.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![];
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, pp) in &parents {
            if pp == p {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

/// Follows the guest's log as it grows: echoes it, totals `test result:`
/// lines and reads the script's [`MARK`] lines.
struct Follow {
    file: File,
    pending: Vec<u8>,
    tally: Tally,
    kernel: Option<String>,
    failed_binaries: Vec<String>,
    done: bool,
}

impl Follow {
    fn new(path: &Path) -> Result<Self> {
        Ok(Self {
            file: File::open(path).with_context(|| format!("opening {}", path.display()))?,
            pending: Vec::new(),
            tally: Tally::default(),
            kernel: None,
            failed_binaries: Vec::new(),
            done: false,
        })
    }

    fn read(&mut self) -> Result<()> {
        let mut buf = Vec::new();
        // Stops at the current end; the next call continues from there.
        self.file
            .read_to_end(&mut buf)
            .context("reading the guest's log")?;
        self.pending.extend_from_slice(&buf);
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            self.line(String::from_utf8_lossy(&line[..line.len() - 1]).trim_end());
        }
        Ok(())
    }

    /// A last line without a newline (the VM died mid-line).
    fn finish(&mut self) {
        if !self.pending.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
            self.line(&line);
        }
    }

    fn line(&mut self, line: &str) {
        println!("{line}");
        self.tally.add_line(line);
        let Some(rest) = line.strip_prefix(MARK).map(str::trim) else {
            return;
        };
        if let Some(k) = rest.strip_prefix("kernel ") {
            self.kernel = Some(k.to_owned());
        } else if rest == "done" {
            self.done = true;
        } else if let Some(exit) = rest.strip_prefix("exit ") {
            // "exit <code> <binary>"; 124/137: timeout killed it.
            if let Some((code, name)) = exit.split_once(' ')
                && code != "0"
            {
                let why = match code {
                    "124" | "137" => format!("timed out after {BINARY_TIMEOUT_SECS} s"),
                    c => format!("exited with {c}"),
                };
                self.failed_binaries.push(format!("{name}: {why}"));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Follow, TestBinary, guest_script, package_name, sh_quote};

    #[test]
    fn package_names_come_out_of_every_package_id_form() {
        for (id, name) in [
            ("path+file:///w/ebpf/datapath#riptide-datapath@0.1.0", "riptide-datapath"),
            ("path+file:///w/xtask#0.1.0", "xtask"),
            ("riptide-cni 0.1.0 (path+file:///w/cni-plugin)", "riptide-cni"),
        ] {
            assert_eq!(package_name(&serde_json::Value::from(id)), name);
        }
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn script_runs_each_binary_in_its_package_dir() {
        let bins = [TestBinary {
            name: "kernel_lb_test_run".into(),
            exe: "/t/deps/kernel_lb_test_run-1".into(),
            cwd: "/w/ebpf/datapath".into(),
        }];
        let s = guest_script(&bins, &["lb".into()]);
        assert!(
            s.contains(
                "cd '/w/ebpf/datapath' && timeout -k 10 1800 '/t/deps/kernel_lb_test_run-1' 'lb'\n"
            ),
            "{s}"
        );
        assert!(
            s.contains("echo \"riptide-vm: exit $? kernel_lb_test_run\""),
            "{s}"
        );
        assert!(s.trim_end().ends_with("echo \"riptide-vm: done\""), "{s}");
    }

    #[test]
    fn follow_reads_marks_and_results() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        std::fs::write(
            &path,
            "riptide-vm: kernel 6.1.0-57-amd64\n\
             test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured\n\
             riptide-vm: exit 0 a\n\
             riptide-vm: exit 101 b\n\
             riptide-vm: exit 124 c\n\
             riptide-vm: done",
        )
        .unwrap();
        let mut f = Follow::new(&path).unwrap();
        f.read().unwrap();
        assert!(!f.done, "an unterminated line waits for its newline");
        f.finish();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(f.done);
        assert_eq!(f.kernel.as_deref(), Some("6.1.0-57-amd64"));
        assert_eq!((f.tally.passed, f.tally.ignored), (3, 1));
        assert_eq!(
            f.failed_binaries,
            ["b: exited with 101", "c: timed out after 1800 s"]
        );
    }
}
