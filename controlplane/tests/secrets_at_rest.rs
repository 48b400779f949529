//! Secrets at rest and per-component identities, with the real binary:
//! `control-plane` on a fresh data directory and `kubelet-credentials`,
//! both run with umask 000 so that only the modes the code asks for can
//! protect anything. Every secret (database, CA and ServiceAccount keys,
//! serving key, token file, kubeconfigs, kubelet key) is 0600 in a 0700
//! directory; each component's kubeconfig is its own identity (`kubectl
//! auth whoami`), with its own rights only.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

fn with_umask_000(cmd: &mut Command) -> &mut Command {
    // SAFETY: umask is async-signal-safe and only changes the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

struct ControlPlane(Child);

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kubectl's success and stdout.
fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .env("HOME", cache)
        .output()
        .expect("kubectl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("$ kubectl --kubeconfig {} {} → {text}{}", kubeconfig.display(), args.join(" "), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn secrets_are_owner_only_and_components_have_their_own_identity() {
    let tmp = tempfile::tempdir().unwrap();
    // Not created yet: the binary creates it.
    let data = tmp.path().join("controlplane");
    let bin = env!("CARGO_BIN_EXE_riptide-controlplane");
    let mut cmd = Command::new(bin);
    cmd.args(["control-plane", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = with_umask_000(&mut cmd).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let cp = ControlPlane(child);
    let mut admin = None;
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(a) = line.strip_prefix("listening ") {
            url = Some(format!("https://{a}"));
        }
        if let Some(p) = line.strip_prefix("kubeconfig ") {
            admin = Some(PathBuf::from(p));
            break;
        }
    }
    let (admin, url) = (admin.expect("no kubeconfig line"), url.expect("no listening line"));
    let cm = data.join("controller-manager.kubeconfig");
    let sched = data.join("scheduler.kubeconfig");
    for _ in 0..100 {
        if cm.exists() && sched.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&data.join("pki")), 0o700, "pki directory");
    for f in ["state.redb", "tokens.csv", "admin.kubeconfig", "controller-manager.kubeconfig", "scheduler.kubeconfig"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    for f in ["ca.key", "sa.key", "apiserver.key"] {
        assert_eq!(mode(&data.join("pki").join(f)), 0o600, "pki/{f}");
    }
    assert_eq!(mode(&data.join("pki").join("ca.crt")), 0o644, "the CA certificate is public");
    assert_eq!(admin, data.join("admin.kubeconfig"));

    let creds = tmp.path().join("node-a");
    let mut issue = Command::new(bin);
    issue
        .arg("kubelet-credentials")
        .arg("--data-dir")
        .arg(&data)
        .args(["--server", &url, "--node-name", "node-a", "--node-ip", "127.0.0.1", "--out-dir"])
        .arg(&creds);
    let out = with_umask_000(&mut issue).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&creds), 0o700, "kubelet credentials directory");
    for f in ["kubelet.kubeconfig", "kubelet.key"] {
        assert_eq!(mode(&creds.join(f)), 0o600, "{f}");
    }
    for f in ["kubelet.crt", "ca.crt"] {
        assert_eq!(mode(&creds.join(f)), 0o644, "{f}");
    }
    let leftovers: Vec<_> = [&data, &data.join("pki"), &creds]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Who each kubeconfig is, and that it is no admin.
    let cache = tmp.path().join("kubectl-cache");
    for (kc, user, groups) in [
        (cm.clone(), "system:kube-controller-manager", vec![]),
        (sched.clone(), "system:kube-scheduler", vec![]),
        (creds.join("kubelet.kubeconfig"), "system:node:node-a", vec!["system:nodes"]),
    ] {
        let (ok, who) = kubectl(&kc, &cache, &["auth", "whoami", "-o", "json"]);
        assert!(ok, "{who}");
        let v: serde_json::Value = serde_json::from_str(&who).unwrap();
        assert_eq!(v["status"]["userInfo"]["username"], user, "{who}");
        let got: Vec<&str> = v["status"]["userInfo"]["groups"].as_array().unwrap().iter().filter_map(|g| g.as_str()).collect();
        for g in groups {
            assert!(got.contains(&g), "{user} in {g}: {got:?}");
        }
        assert!(!got.contains(&"system:masters"), "{user} is no admin: {got:?}");
        let (_, can) = kubectl(&kc, &cache, &["auth", "can-i", "create", "clusterrolebindings"]);
        assert_eq!(can.trim(), "no", "{user} may not grant itself rights");
    }
    // Each has what its role needs.
    assert_eq!(kubectl(&sched, &cache, &["auth", "can-i", "create", "pods", "--subresource=binding"]).1.trim(), "yes");
    assert_eq!(kubectl(&sched, &cache, &["auth", "can-i", "create", "secrets"]).1.trim(), "no");
    assert_eq!(kubectl(&cm, &cache, &["auth", "can-i", "create", "replicasets.apps"]).1.trim(), "yes");
    assert_eq!(kubectl(&creds.join("kubelet.kubeconfig"), &cache, &["auth", "can-i", "patch", "nodes/node-a", "--subresource=status"]).1.trim(), "yes");
    assert_eq!(kubectl(&creds.join("kubelet.kubeconfig"), &cache, &["auth", "can-i", "patch", "nodes/node-b", "--subresource=status"]).1.trim(), "no");
    drop(cp);
}
