//! Device cgroups, privileged: a container that is not `privileged` may
//! make any device node but open only runc's default devices (`/dev/null`,
//! `zero`, `full`, `random`, `urandom`, `tty`, `ptmx`, the pseudo-terminals),
//! never the node's disks, whatever path reaches them; a privileged one
//! opens them. The cgroup device hook has no BPF_PROG_TEST_RUN, so the
//! program is judged by the kernel: processes placed in a filtered cgroup
//! (and, for contrast, an unfiltered one), and pods run by a real kubelet.
//! Where the program cannot be attached the container does not start.
//! Every open of the node's disk is read-only and reads nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    fs::OpenOptions,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
};

mod common;

use common::kubelet::Node;
use riptide_datapath::devices::{DeviceFilter, attached_programs};
use riptide_test_support::privileged;

/// Shell functions that report one line `<label>=ok` or `<label>=<error>`:
/// `r PATH LABEL` opens for reading, `w PATH LABEL` for writing (neither
/// transfers a byte), `m PATH LABEL TYPE MAJOR MINOR` makes a node.
const PROBES: &str = r#"r() { if e=$(dd if="$1" of=/dev/null count=0 status=none 2>&1); then echo "$2=ok"; else echo "$2=$e"; fi; }
w() { if e=$(dd if=/dev/null of="$1" count=0 conv=notrunc status=none 2>&1); then echo "$2=ok"; else echo "$2=$e"; fi; }
m() { if e=$(mknod "$1" "$3" "$4" "$5" 2>&1); then echo "$2=ok"; else echo "$2=$e"; fi; }
"#;

const EPERM: &str = "Operation not permitted";

/// `label → outcome` of the probe lines in `out`.
fn outcomes(out: &str) -> BTreeMap<String, String> {
    out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// A block device of this machine that root may open here: the one `/`
/// is on first (major 0 is the kernel's anonymous devices: overlay,
/// tmpfs), then the disks of /sys/block in order (a sandbox may refuse the
/// root disk even to root, which would prove nothing). (name, major, minor).
fn node_disk() -> (String, u32, u32) {
    let parse = |mm: &str| {
        let (a, b) = mm.trim().split_once(':')?;
        Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
    };
    let root = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&"/")).then(|| parse(f.get(2)?)).flatten()
        })
        .filter(|(major, _)| *major != 0);
    let mut disks: Vec<PathBuf> = std::fs::read_dir("/sys/block").unwrap().flatten().map(|e| e.path()).collect();
    disks.sort();
    let candidates = root.into_iter().chain(disks.iter().filter_map(|d| parse(&std::fs::read_to_string(d.join("dev")).ok()?)));
    let mut tried = Vec::new();
    for (major, minor) in candidates {
        let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).unwrap_or_default();
        let Some(name) = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME=")) else { continue };
        // Read-only, and nothing is read.
        match std::fs::File::open(Path::new("/dev").join(name)) {
            Ok(_) => return (name.to_owned(), major, minor),
            Err(e) => tried.push(format!("/dev/{name}: {e}")),
        }
    }
    panic!("no block device of this machine opens for root: {tried:?}");
}

/// A cgroup of the test's own under the unified hierarchy, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(tag: &str) -> Self {
        let dir = PathBuf::from(format!("/sys/fs/cgroup/unified/rtdev{}{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Runs `script` with `sh` in this cgroup; its stdout and stderr.
    fn run(&self, script: &str) -> String {
        let procs = OpenOptions::new().write(true).open(self.0.join("cgroup.procs")).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        // SAFETY: write(2) on an fd opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The program itself, in the kernel: in a cgroup it is attached to, every
/// device node can be made, runc's default devices opened, nothing else;
/// the same nodes open in a cgroup without it (so the denials are its).
#[test]
fn device_program_allows_runc_defaults_only() {
    if !privileged("to load and attach a cgroup device program") {
        return;
    }
    let (disk, major, minor) = node_disk();
    let (filtered, open) = (Cgroup::new("f"), Cgroup::new("o"));
    let filter = DeviceFilter::load().unwrap();
    filter.attach(&filtered.0).unwrap();
    assert_eq!(attached_programs(&filtered.0).unwrap(), [filter.program_id().unwrap()], "one attachment, ours");
    assert!(attached_programs(&open.0).unwrap().is_empty());

    // Device nodes need a filesystem mounted without nodev: the build
    // tree's, not a tmpfs /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nodes: [(&str, &str, u32, u32, bool); 13] = [
        ("null", "c", 1, 3, true),
        ("zero", "c", 1, 5, true),
        ("full", "c", 1, 7, true),
        ("random", "c", 1, 8, true),
        ("urandom", "c", 1, 9, true),
        ("tty", "c", 5, 0, true),
        ("ptmx", "c", 5, 2, true),
        ("pts", "c", 136, 3, true),
        ("mem", "c", 1, 1, false),
        ("kmsg", "c", 1, 11, false),
        ("console", "c", 5, 1, false),
        ("tun", "c", 10, 200, false),
        ("disk", "b", major, minor, false),
    ];
    let mut script = String::from(PROBES);
    for (name, ty, ma, mi, _) in &nodes {
        let path = dir.path().join(name);
        script.push_str(&format!("m {p} mknod-{name} {ty} {ma} {mi}\nr {p} read-{name}\n", p = path.display()));
        if *ty == "c" {
            script.push_str(&format!("w {p} write-{name}\n", p = path.display()));
        }
        script.push_str(&format!("rm -f {}\n", path.display()));
    }
    let out = filtered.run(&script);
    let got = outcomes(&out);
    for (name, ty, _, _, allowed) in &nodes {
        assert_eq!(got.get(&format!("mknod-{name}")).map(String::as_str), Some("ok"), "mknod {name} is allowed ('m' for every device):\n{out}");
        let accesses: &[&str] = if *ty == "c" { &["read", "write"] } else { &["read"] };
        for a in accesses {
            let o = got.get(&format!("{a}-{name}")).unwrap_or_else(|| panic!("no {a}-{name} line:\n{out}"));
            if *allowed {
                // The driver may still refuse (no controlling tty, no such
                // pty): only the cgroup answers EPERM.
                assert!(!o.contains(EPERM), "{a} {name} is allowed:\n{out}");
            } else {
                assert!(o.contains(EPERM), "{a} {name} ({disk} for the disk) is denied with EPERM:\n{out}");
            }
        }
    }
    for name in ["null", "zero", "full", "random", "urandom"] {
        assert_eq!(got[&format!("read-{name}")], "ok", "{out}");
    }
    assert_eq!(got["write-null"], "ok", "{out}");

    // Without the program the same nodes open: the denials above are its.
    let p = dir.path().join("disk");
    let out = open.run(&format!("{PROBES}m {p} mknod b {major} {minor}\nr {p} read\nr /dev/{disk} read-dev\n", p = p.display()));
    let got = outcomes(&out);
    assert_eq!(got.get("read").map(String::as_str), Some("ok"), "an unfiltered root process opens {disk}:\n{out}");
}

/// A pod with an unprivileged root container and a privileged one: the
/// first cannot open the node's disk through a hostPath `/dev`, through
/// the node's `/dev` it sees, nor through a node it made itself (also not
/// from `kubectl exec`, also after the kubelet restarted), but uses
/// `/dev/null`, `/dev/zero` and `/dev/urandom`; the second opens the disk.
#[test]
fn kubelet_denies_node_devices_to_unprivileged_containers() {
    let Some(mut n) = Node::start("d", false, "for cgroups, device nodes and eBPF") else { return };
    let (disk, major, minor) = node_disk();
    // Routes to the disk: the node's `/dev` as a hostPath volume (hostPath
    // /dev is the machine's own), the node's `/dev` as the container sees
    // it, a node made in a hostPath directory and one made in an emptyDir.
    let plain = format!(
        "{PROBES}r /host-dev/{disk} disk\nr /dev/{disk} devdisk\nm /host-dir/blk mknod-blk b {major} {minor}\nr /host-dir/blk blk\n\
         m /host-dir/mem mknod-mem c 1 1\nr /host-dir/mem mem\nm /scratch/blk mknod-scratch b {major} {minor}\nr /scratch/blk scratch\n\
         r /dev/null null\nw /dev/null write-null\nr /dev/zero zero\nr /dev/urandom urandom\necho done-plain\nsleep 1000\n"
    );
    let privileged =
        format!("{PROBES}r /host-dev/{disk} disk\nm /host-dir/pblk mknod-blk b {major} {minor}\nr /host-dir/pblk blk\necho done-priv\nsleep 1000\n");
    let pod = n.pod_yaml("devs").spec("");
    n.apply(&format!(
        r#"{pod}  restartPolicy: Never
  volumes:
  - {{name: dev, hostPath: {{path: /dev, type: Directory}}}}
  - {{name: dir, hostPath: {{path: /var/lib/devices-test, type: DirectoryOrCreate}}}}
  - {{name: scratch, emptyDir: {{}}}}
  containers:
  - name: plain
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {plain}]
    volumeMounts: [{{name: dev, mountPath: /host-dev}}, {{name: dir, mountPath: /host-dir}}, {{name: scratch, mountPath: /scratch}}]
  - name: priv
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", {privileged}]
    securityContext: {{privileged: true}}
    volumeMounts: [{{name: dev, mountPath: /host-dev}}, {{name: dir, mountPath: /host-dir}}]
"#,
        plain = serde_json::to_string(&plain).unwrap(),
        privileged = serde_json::to_string(&privileged).unwrap(),
    ));
    let out = n.logs_with("devs", "plain", "done-plain");
    let got = outcomes(&out);
    for denied in ["disk", "blk", "mem"] {
        assert!(got[denied].contains(EPERM), "{denied}: the device cgroup denies it:\n{out}");
    }
    // The container's own /dev may not hold the disk at all, and an
    // emptyDir may be `nodev` (EACCES before the cgroup is asked); neither
    // opens.
    for closed in ["devdisk", "scratch"] {
        assert_ne!(got[closed], "ok", "{closed}:\n{out}");
    }
    for made in ["mknod-blk", "mknod-mem", "mknod-scratch"] {
        assert_eq!(got[made], "ok", "mknod is allowed ({made}):\n{out}");
    }
    for allowed in ["null", "write-null", "zero", "urandom"] {
        assert_eq!(got[allowed], "ok", "{allowed}:\n{out}");
    }
    let out = n.logs_with("devs", "priv", "done-priv");
    let got = outcomes(&out);
    assert_eq!(got["disk"], "ok", "a privileged container opens the node's disk:\n{out}");
    assert_eq!(got["blk"], "ok", "and a node it made:\n{out}");

    // One program on the unprivileged container's cgroup, none on the
    // privileged one's or the pod's.
    let uid = n.pod("devs")["metadata"]["uid"].as_str().unwrap().to_owned();
    let pod_cgroup = n.cgroup.join(format!("pod-{uid}"));
    assert_eq!(attached_programs(&pod_cgroup.join("plain")).unwrap().len(), 1);
    assert!(attached_programs(&pod_cgroup.join("priv")).unwrap().is_empty());
    assert!(attached_programs(&pod_cgroup).unwrap().is_empty());

    let host_disk = format!("if=/host-dev/{disk}");
    let exec_disk = |n: &Node| n.kubectl_raw(&["exec", "devs", "-c", "plain", "--", "dd", &host_disk, "of=/dev/null", "count=0", "status=none"], None);
    let (ok, out) = exec_disk(&n);
    assert!(!ok && out.contains(EPERM), "kubectl exec joins the container's device cgroup: {out}");

    // A restarted kubelet adopts the pod; the attachment outlived the old
    // kubelet and is not doubled.
    let mut old = n.kubelet.take().unwrap();
    old.kill().unwrap();
    old.wait().unwrap();
    n.start_kubelet(&[]);
    let (ok, out) = n.wait("exec after the kubelet restarted", 60, |n| {
        let (ok, out) = exec_disk(n);
        (ok || out.contains(EPERM)).then_some((ok, out))
    });
    assert!(!ok, "still denied after the kubelet restarted: {out}");
    assert_eq!(attached_programs(&pod_cgroup.join("plain")).unwrap().len(), 1, "no second attachment on adoption");
    let (ok, out) = n.kubectl_raw(&["exec", "devs", "-c", "plain", "--", "dd", "if=/dev/zero", "of=/dev/null", "count=1", "status=none"], None);
    assert!(ok, "/dev/zero and /dev/null through exec: {out}");
}

/// Fail closed: where the device program cannot be attached (here: a
/// `--cgroup-root` on a cgroup v1 hierarchy, which cgroup BPF does not
/// apply to), a container that is not privileged never runs; it waits
/// with `RunContainerError` and a `Failed` event saying why, while its
/// privileged neighbour runs.
#[test]
fn kubelet_fails_closed_when_devices_cannot_be_restricted() {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    let is_v1 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/cgroup/pids") && l.contains(" - cgroup "));
    if !is_v1 {
        eprintln!("SKIP: no cgroup v1 hierarchy at {} to make the attach fail", v1.display());
        return;
    }
    let Some(mut n) = Node::start("f", false, "for cgroups and eBPF") else { return };
    let mut old = n.kubelet.take().unwrap();
    old.kill().unwrap();
    old.wait().unwrap();
    let _ = std::fs::remove_dir(&n.cgroup);
    n.cgroup = v1.join(format!("rtk{}f", std::process::id()));
    let _v1 = V1Cleanup(n.cgroup.clone());
    n.start_kubelet(&[]);
    let pod = n.pod_yaml("closed").spec("");
    n.apply(&format!(
        r#"{pod}  restartPolicy: Never
  containers:
  - name: plain
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "echo ran-plain; sleep 30"]
  - name: priv
    image: riptide.test/host:1
    command: ["/bin/sh", "-c", "echo done-priv; sleep 30"]
    securityContext: {{privileged: true}}
"#
    ));
    n.logs_with("closed", "priv", "done-priv");
    let waiting = n.wait("plain to wait with RunContainerError", 60, |n| {
        let p = n.pod("closed");
        let s = p["status"]["containerStatuses"].as_array()?.iter().find(|s| s["name"] == "plain")?.clone();
        (s["state"]["waiting"]["reason"] == "RunContainerError").then_some(s)
    });
    let msg = waiting["state"]["waiting"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains("restricting devices") && msg.contains("BPF_PROG_ATTACH"), "the waiting message says why: {waiting}");
    let (_, events) = n.kubectl_raw(&["get", "events", "--field-selector", "involvedObject.name=closed"], None);
    assert!(events.contains("Failed") && events.contains("restricting devices"), "a Failed event says why:\n{events}");
    let (_, logs) = n.kubectl_raw(&["logs", "closed", "-c", "plain"], None);
    assert!(!logs.contains("ran-plain"), "the container never ran: {logs}");
    let mut k = n.kubelet.take().unwrap();
    k.kill().unwrap();
    k.wait().unwrap();
}

/// Kills what is left in a cgroup v1 tree (no `cgroup.kill` there) and
/// removes it.
struct V1Cleanup(PathBuf);

impl Drop for V1Cleanup {
    fn drop(&mut self) {
        fn tree(d: &Path, out: &mut Vec<PathBuf>) {
            out.push(d.to_owned());
            for e in std::fs::read_dir(d).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
                tree(&e.path(), out);
            }
        }
        for _ in 0..50 {
            let mut dirs = Vec::new();
            tree(&self.0, &mut dirs);
            for d in &dirs {
                for pid in std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) of a process in the test's own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            for d in dirs.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
            if !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
