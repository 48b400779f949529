//! The install path end to end: the real `riptide-agent install-cni` writes
//! plugin and conflist, and the real installed plugin, fed that conflist
//! the way a runtime feeds it, gives a pod in a fresh netns an address.
//! A cluster range with host bits (`10.42.0.1/16`) is refused at install
//! time with the network meant, so a node never gets a conflist on which
//! every ADD fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use common::{BIN, CniOut, Netns, Node, result_ip, tag};
use serde_json::Value;
use riptide_test_support::privileged;

/// `riptide-agent`, built next to the plugin on demand (same target dir).
fn agent_bin() -> PathBuf {
    let dir = Path::new(BIN).parent().unwrap();
    let path = dir.join("riptide-agent");
    if !path.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "riptide-agent", "--bin", "riptide-agent"])
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .status()
            .unwrap();
        assert!(st.success(), "building riptide-agent");
    }
    path
}

/// `riptide-agent install-cni` for `node` with everything under `root`.
fn install_cni(node: &str, root: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(agent_bin())
        .arg("install-cni")
        .args(["--node-name", node])
        .arg("--cni-bin-src")
        .arg(BIN)
        .arg("--cni-bin-dir")
        .arg(root.join("bin"))
        .arg("--cni-conf-dir")
        .arg(root.join("conf"))
        .arg("--run-dir")
        .arg(root.join("run"))
        .arg("--cni-state-dir")
        .arg(root.join("state"))
        .args(extra)
        .env_remove("RIPTIDE_CONFIG_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const MEANT: &str = "cluster-cidr 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?";

#[test]
fn install_cni_refuses_a_cluster_cidr_with_host_bits() {
    let root = tempfile::tempdir().unwrap();
    let (ok, out) = install_cni("n1", root.path(), &["--cluster-cidr", "10.42.0.1/16"]);
    assert!(!ok && out.contains(MEANT), "flag: {out}");
    // The same value from the ConfigMap directory.
    let cm = root.path().join("cm");
    std::fs::create_dir_all(&cm).unwrap();
    std::fs::write(cm.join("cluster-cidr"), "10.42.0.1/16\n").unwrap();
    let (ok, out) = install_cni("n1", root.path(), &["--config-dir", cm.to_str().unwrap()]);
    assert!(!ok && out.contains(MEANT), "config key: {out}");
    // Nothing was installed: the runtime never sees a broken conflist.
    assert!(!root.path().join("conf").exists() && !root.path().join("bin").exists());
}

#[test]
fn netns_installed_conflist_gives_a_pod_an_address() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    // Node::new pins the node's datapath; its own config is not used here.
    let node = Node::new(66).unwrap();
    let root = tempfile::tempdir().unwrap();
    let (ok, out) = install_cni(&node.name, root.path(), &["--cluster-cidr", "10.42.0.0/16", "--mtu", "1400"]);
    assert!(ok, "install-cni: {out}");
    let conflist: Value =
        serde_json::from_str(&std::fs::read_to_string(root.path().join("conf/10-riptide.conflist")).unwrap()).unwrap();
    // What the agent writes once the Node has a range.
    let pod_cidr_file = root.path().join("run").join(&node.name).join("podcidr");
    assert_eq!(conflist["plugins"][0]["podCIDRFile"], pod_cidr_file.to_str().unwrap());
    std::fs::create_dir_all(pod_cidr_file.parent().unwrap()).unwrap();
    std::fs::write(&pod_cidr_file, "10.42.66.0/24\n").unwrap();

    // The runtime's stdin: the plugin entry with name and cniVersion.
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    let plugin = root.path().join("bin/riptide");
    let pod = Netns::new(&format!("rtcni-inst-{}", tag())).unwrap();
    let id = format!("install{}", tag());
    let run = |command: &str, conf: &Value| {
        let mut cmd = node.ns.command(plugin.to_str().unwrap()).unwrap();
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", root.path().join("bin"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &serde_json::to_vec(conf).unwrap()).unwrap();
        CniOut::wait(child).unwrap()
    };

    let res = run("ADD", &conf).expect_ok("ADD with the installed conflist");
    let ip = result_ip(&res);
    assert!(ip.to_string().starts_with("10.42.66.") && ip.octets()[3] >= 2, "{res}");
    let eth0 = pod.ip_json(&["addr", "show", "dev", "eth0"]).unwrap();
    assert_eq!(eth0[0]["mtu"], 1400, "{eth0}");
    assert!(
        eth0[0]["addr_info"].as_array().unwrap().iter().any(|a| a["local"] == ip.to_string().as_str()),
        "{eth0}"
    );

    // A conflist with host bits (hand-written, or from an older agent) is
    // invalid config with the same message, as CNI error JSON.
    let mut bad = conf.clone();
    bad["clusterCIDR"] = "10.42.0.1/16".into();
    run("ADD", &bad).expect_err(7, "clusterCIDR 10.42.0.1/16 has host bits set; did you mean 10.42.0.0/16?");

    let ipam = root.path().join("state").join(&node.name).join("ipam");
    assert!(ipam.join(ip.to_string()).exists(), "reservation under the conflist's stateDir");
    run("DEL", &conf).expect_ok("DEL");
    assert!(!ipam.join(ip.to_string()).exists() && node.host_veths().is_empty(), "{:?}", node.host_veths());
}
