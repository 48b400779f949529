//! Privileged tests (root: eBPF pins, network namespaces) of the agent as a
//! process: one agent per node (a second one for the same node exits naming
//! the first one's PID, and the first keeps serving), and `riptide status`
//! exiting non-zero while the agent is not ready.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{Netns, agent_log_tail, apply, eventually, set_node_ip, start_agent, start_apiserver};
use riptide_test_support::privileged;
use serde_json::Value;

/// `riptide status -o json` against `socket`, with its exit code.
fn status(socket: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_riptide"))
        .arg("--socket")
        .arg(socket)
        .args(["status", "-o", "json"])
        .output()
        .unwrap()
}

/// Waits for `child` to exit within `limit`; kills it and fails otherwise.
fn wait_exit(mut child: std::process::Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn privileged_second_agent_for_a_node_exits_naming_the_first() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("one");
    ns.underlay();
    let kc = start_apiserver(&mut ns);
    let me = ns.node.clone();
    apply(
        &ns,
        &kc,
        &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {me}\nspec:\n  podCIDR: 10.42.7.0/24\n  podCIDRs: [10.42.7.0/24]\n"),
    );
    set_node_ip(&ns, &kc, &me, "198.18.77.1");
    let first = start_agent(&mut ns, &kc, &[]);
    let first_pid = ns.procs[first].id();
    let sock = ns.path("agent.sock");
    eventually(&ns, "first agent ready", || status(&sock).status.success());

    // Same node, its own socket and no metrics port: only the node is shared.
    let second = ns
        .cmd(env!("CARGO_BIN_EXE_riptide-agent"))
        .args(["--node-name", &me, "--kubeconfig", kc.to_str().unwrap(), "--metrics-addr", "off"])
        .arg("--api-socket")
        .arg(ns.path("agent2.sock"))
        .arg("--pod-cidr-file")
        .arg(ns.path("podcidr2"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_exit(second, Duration::from_secs(30), "second agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second agent must fail: {stderr}");
    assert!(
        stderr.contains(&format!("already has a running agent (pid {first_pid})")),
        "the message names the first agent's pid {first_pid}: {stderr}"
    );
    assert!(!ns.path("agent2.sock").exists(), "the second agent never served");

    // The first one is untouched: still running, still answering, ready.
    assert!(ns.procs[first].try_wait().unwrap().is_none(), "first agent exited:\n{}", agent_log_tail(&ns, 30));
    let out = status(&sock);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["node"], me.as_str(), "{v}");
}

#[test]
fn privileged_status_exits_non_zero_until_the_agent_is_ready() {
    if !privileged("to load eBPF programs and create network namespaces") {
        return;
    }
    let mut ns = Netns::new("nready");
    // No Kubernetes API at all: the agent serves the datapath only and never
    // turns ready.
    let sock = ns.path("agent.sock");
    let child = ns
        .cmd(env!("CARGO_BIN_EXE_riptide-agent"))
        .args(["--node-name", &ns.node, "--metrics-addr", "off"])
        .arg("--api-socket")
        .arg(&sock)
        .arg("--pod-cidr-file")
        .arg(ns.path("podcidr"))
        .env_remove("KUBECONFIG")
        .env("HOME", ns.path("home"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(ns.path("agent.log")).unwrap())
        .spawn()
        .unwrap();
    ns.procs.push(child);
    // The agent answers (a report on stdout) but says not ready: exit 1.
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = status(&sock);
        if !out.stdout.is_empty() {
            last = Some(out);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let Some(out) = last else {
        panic!("the agent never answered on its socket:\n{}", agent_log_tail(&ns, 30));
    };
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(out.status.code(), Some(1), "not ready is exit code 1: {v}");
    // The table form exits the same way.
    let table = Command::new(env!("CARGO_BIN_EXE_riptide")).arg("--socket").arg(&sock).arg("status").output().unwrap();
    assert_eq!(table.status.code(), Some(1));
    assert!(!table.stdout.is_empty(), "the report still prints");
    // No agent at all is an error too.
    let gone = status(&ns.path("nothing.sock"));
    assert!(!gone.status.success() && gone.stdout.is_empty());
}
