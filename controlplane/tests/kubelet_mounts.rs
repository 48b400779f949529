//! What a container's mount namespace shows of the node and lets reach it,
//! under a real kubelet (see `common::kubelet`): `mountPropagation` in each
//! direction, the minimal `/dev` of unprivileged containers, `nodev` on the
//! writable places the kubelet makes, and a host command under `/tmp`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

mod common;

use common::kubelet::Node;

/// A tmpfs the test mounts on the node, unmounted on drop (also on panic).
struct NodeMount(PathBuf);

impl NodeMount {
    fn tmpfs(at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "riptide-test"]).arg(at).status().unwrap().success();
        assert!(ok, "mounting a tmpfs on {}", at.display());
        Self(at.to_owned())
    }
}

impl Drop for NodeMount {
    fn drop(&mut self) {
        // Gone already when the kubelet released the shared mount above it.
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(std::process::Stdio::null()).status();
    }
}

/// Whether `p` is the root of a mount in the test's (the node's) namespace.
fn is_mount_point(p: &Path) -> bool {
    let p = p.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(p))
}

/// `kubectl exec pod -- cat path`: the file's content, or None.
fn cat(n: &Node, pod: &str, path: &str) -> Option<String> {
    let (ok, out) = n.kubectl_raw(&["exec", pod, "--", "cat", path], None);
    ok.then(|| out.trim().to_owned())
}

/// Mounts the node makes below a hostPath after the pod started reach
/// `HostToContainer` and `Bidirectional` volumes, not `None` ones; a
/// privileged `Bidirectional` container's mount reaches the node (and the
/// `HostToContainer` pod) and goes when the pods go; a `None` container's
/// never leaves it.
#[test]
fn kubelet_mount_propagation_both_ways() {
    let Some(n) = Node::start("p", false, "for mount namespaces") else { return };
    let pod = |name: &str, mode: &str, privileged: bool, script: &str| {
        n.pod_yaml(name).spec(&format!(
            "  volumes: [{{name: v, hostPath: {{path: /prop, type: DirectoryOrCreate}}}}]\n  containers:\n  - name: c\n    image: riptide.test/host:1\n    command: [/bin/sh, -c, {script:?}]\n    securityContext: {{privileged: {privileged}}}\n    volumeMounts: [{{name: v, mountPath: /data, mountPropagation: {mode}}}]\n"
        ))
    };
    let mount_and_wait = |dir: &str| format!("mkdir -p /data/{dir} && mount -t tmpfs pod /data/{dir} && echo from-{dir} > /data/{dir}/marker && echo mounted; exec sleep 1000");
    n.apply(&pod("h2c", "HostToContainer", false, "echo up; exec sleep 1000"));
    n.apply(&pod("bidi", "Bidirectional", true, &mount_and_wait("bidi")));
    n.apply(&pod("none", "None", true, &mount_and_wait("none")));
    for p in ["h2c", "bidi", "none"] {
        n.logs_with(p, "c", if p == "h2c" { "up" } else { "mounted" });
    }
    let prop = n.node_root().join("prop");
    assert_eq!(std::fs::read_to_string(prop.join("bidi/marker")).ok().as_deref(), Some("from-bidi\n"), "a Bidirectional mount reaches the node\n{}", n.diagnostics());
    assert!(!prop.join("none/marker").exists(), "a None volume's mount stayed in its container");
    assert_eq!(cat(&n, "h2c", "/data/bidi/marker").as_deref(), Some("from-bidi"), "the node passes it on to HostToContainer");

    let from_node = NodeMount::tmpfs(&prop.join("node"));
    std::fs::write(from_node.0.join("marker"), "from-node").unwrap();
    assert_eq!(cat(&n, "h2c", "/data/node/marker").as_deref(), Some("from-node"), "HostToContainer sees the node's later mount\n{}", n.diagnostics());
    assert_eq!(cat(&n, "bidi", "/data/node/marker").as_deref(), Some("from-node"), "so does Bidirectional");
    assert_eq!(cat(&n, "none", "/data/node/marker"), None, "None does not");

    let (ok, out) = n.kubectl_raw(&["delete", "pod", "h2c", "bidi", "none", "--wait=false"], None);
    assert!(ok, "{out}");
    n.wait("the pods' mounts to leave the node", 60, |_| (!prop.join("bidi/marker").exists() && !is_mount_point(&prop)).then_some(()));
}

/// The kernel's name of the block device `/` is mounted from, if it is one.
fn root_block_device() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some("/"))?;
    let source = PathBuf::from(line.split(" - ").nth(1)?.split(' ').nth(1)?);
    std::fs::metadata(&source).is_ok_and(|m| m.file_type().is_block_device()).then_some(source)
}

/// An unprivileged container's `/dev` holds runc's minimal set and a
/// devpts of its own, never the node's disks; a privileged one keeps the
/// node's. A device node made where the kubelet lets the container write
/// cannot be opened (`nodev`).
#[test]
fn kubelet_minimal_dev_and_nodev_scratch() {
    let Some(n) = Node::start("d", false, "for mount namespaces and devices") else { return };
    let disk = root_block_device().unwrap_or_else(|| PathBuf::from("/dev/vda"));
    let disk = disk.display();
    let script = format!(
        r#"echo "dev=$(ls -A /dev | tr '\n' ' ')"
echo "pts=$(ls -A /dev/pts | tr '\n' ' ')"
echo x > /dev/null && echo null-ok
echo "zero=$(head -c 4 /dev/zero | wc -c)"
[ -e {disk} ] && echo disk-visible || echo disk-hidden
for d in /tmp /var/tmp /dev/shm /scratch; do
  if mknod $d/n c 1 3; then
    if err=$( (echo x > $d/n) 2>&1 ); then echo "opened $d"; else echo "nodev $d: $err"; fi
  else echo "mknod-failed $d"; fi
done
echo done; exec sleep 1000"#
    );
    n.apply(&n.pod_yaml("dev").spec(&format!(
        "  volumes: [{{name: s, emptyDir: {{}}}}]\n  containers:\n  - name: c\n    image: riptide.test/host:1\n    command: [/bin/sh, -c, {script:?}]\n    volumeMounts: [{{name: s, mountPath: /scratch}}]\n  - name: p\n    image: riptide.test/host:1\n    command: [/bin/sh, -c, \"[ -e {disk} ] && echo priv-disk-visible; exec sleep 1000\"]\n    securityContext: {{privileged: true}}\n"
    )));
    let out = n.logs_with("dev", "c", "done");
    let line = |k: &str| out.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("").split_whitespace().collect::<Vec<_>>();
    let mut dev = line("dev=");
    dev.sort_unstable();
    assert_eq!(dev, ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"], "{out}");
    assert_eq!(line("pts="), ["ptmx"], "a devpts of its own:\n{out}");
    assert!(out.contains("null-ok") && out.contains("zero=4"), "{out}");
    assert!(out.contains("disk-hidden"), "{disk} stays out of the container's /dev:\n{out}");
    for d in ["/tmp", "/var/tmp", "/dev/shm", "/scratch"] {
        let l = out.lines().find(|l| l.ends_with(d) || l.contains(&format!(" {d}:"))).unwrap_or("");
        assert!(l.starts_with(&format!("nodev {d}:")) && l.contains("Permission denied"), "{d}: {l}\n{out}");
    }
    n.logs_with("dev", "p", "priv-disk-visible");
}

/// A host command reached through a symlink below the node's `/tmp` runs:
/// the link is made again in the container's `/tmp` and the file it leads
/// to is carried over; nothing else of the node's `/tmp` is.
#[test]
fn kubelet_runs_a_host_command_through_a_symlink_under_tmp() {
    let Some(n) = Node::start("s", false, "for mount namespaces") else { return };
    let dir = tempfile::Builder::new().prefix("riptide-cmd-").tempdir_in("/tmp").unwrap();
    let real = dir.path().join("bin/cmd.sh");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::write(&real, "#!/bin/sh\necho \"ran $(ls -A /tmp | wc -l) $(ls -A $(dirname $(readlink -f $0)))\"\nexec sleep 1000\n").unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("bin/sibling"), "").unwrap();
    let link = dir.path().join("cmd");
    std::os::unix::fs::symlink("bin/cmd.sh", &link).unwrap();
    n.apply(&n.pod_yaml("link").spec(&format!("  containers:\n  - {{name: c, image: \"riptide.test/host:1\", command: [{:?}]}}\n", link.display().to_string())));
    let out = n.logs_with("link", "c", "ran ");
    assert!(out.contains("ran 1 cmd.sh"), "only the command's way is in the container's /tmp:\n{out}\n{}", n.diagnostics());
}
