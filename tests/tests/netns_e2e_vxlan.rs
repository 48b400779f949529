//! Privileged end-to-end checks of `--tunnel vxlan` on a lab where native
//! routing cannot work: the two nodes are not on one L2 segment but each on
//! its own link to a router namespace that knows nothing of pod CIDRs
//! (`LabNet::routed`) and drops packets whose source it cannot route back
//! (pod addresses). Pods on different nodes, ClusterIP and NodePort to a
//! backend on the other node (its replies too) must all go through
//! `riptide.vxlan`; an agent crash keeps the device, and switching the
//! cluster back to native routing removes it from every node.

use std::{collections::BTreeSet, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use riptide_tests::{
    e2e::{self, Suite, eventually},
    lab::{Lab, LabConfig, LabNet},
};
use riptide_test_support::privileged;

const SETTLE: Duration = Duration::from_secs(60);

fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip -n {ns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// ifindex of node `i`'s vxlan device.
fn vxlan_ifindex(lab: &Lab, i: u32) -> Result<u64> {
    let out = ip_in(
        &lab.config().node_netns(i),
        &["-j", "link", "show", "riptide.vxlan"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["ifindex"].as_u64().context("no ifindex")
}

/// Node `i`'s routes to the other nodes' podCIDRs: every one through the
/// vxlan device, one per other node.
fn tunnel_routes_present(lab: &Lab, i: u32) -> Result<()> {
    let routes = ip_in(
        &lab.config().node_netns(i),
        &["route", "show", "proto", "201"],
    )?;
    let n = routes
        .lines()
        .filter(|l| l.contains("dev riptide.vxlan") && l.contains("onlink"))
        .count();
    ensure!(
        n == lab.config().nodes as usize - 1 && routes.lines().count() == n,
        "node {i}: want {} routes through riptide.vxlan, have:\n{routes}",
        lab.config().nodes - 1
    );
    Ok(())
}

/// Hostnames answered by `url` from the outside namespace over `tries`
/// fresh connections.
fn hostnames_from_outside(lab: &Lab, url: &str, tries: u32) -> Result<BTreeSet<String>> {
    let mut got = BTreeSet::new();
    for _ in 0..tries {
        got.insert(e2e::outside_curl(lab, url, 3)?.ok()?.trim().to_owned());
    }
    Ok(got)
}

#[test]
fn netns_e2e_vxlan_on_a_routed_underlay() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let net = LabNet {
        routed: true,
        tunnel: Some("vxlan".into()),
    };
    let mut lab = Lab::up_with(LabConfig::for_test(2).expect("config"), net).expect("lab up");
    lab.start_cluster(Duration::from_secs(120))
        .expect("cluster");
    lab.deploy_demo().expect("demo");
    let mut s = Suite::new(&mut lab);

    s.check(
        "routed underlay: nodes not on-link, router has no pod routes; pods on both nodes",
        |lab| {
            let c = lab.config();
            let router = ip_in(&c.underlay_netns(), &["route"])?;
            ensure!(
                !router.contains("10.42."),
                "the router must not know pod CIDRs:\n{router}"
            );
            // Native routing's route would be refused: node 2 is not on-link for node 1.
            let n1 = c.node_netns(1);
            let r = Command::new("ip")
                .args([
                    "-n",
                    &n1,
                    "route",
                    "add",
                    "10.42.250.0/24",
                    "via",
                    &c.node_ip(2).to_string(),
                ])
                .output()?;
            ensure!(
                !r.status.success(),
                "node 2 is on-link for node 1: the underlay is not routed"
            );
            let pods = eventually(SETTLE, || {
                let p = e2e::pods(lab, "app=demo")?;
                ensure!(p.len() == 3 && p.iter().all(|p| p.ready), "pods: {p:?}");
                Ok(p)
            })?;
            let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
            ensure!(nodes.len() == 2, "replicas not on both nodes: {pods:?}");
            for i in 1..=c.nodes {
                eventually(Duration::from_secs(20), || tunnel_routes_present(lab, i))?;
            }
            Ok(())
        },
    );

    s.check(
        "pod to pod across nodes through the tunnel, without NAT",
        |lab| {
            let pods = e2e::pods(lab, "app=demo")?;
            for a in &pods {
                for b in pods.iter().filter(|b| b.node != a.node) {
                    let url = format!("http://{}:8080/clientip", b.ip);
                    let seen = eventually(Duration::from_secs(15), || {
                        e2e::pod_curl(lab, &a.name, &url, 3)?.ok()
                    })?;
                    ensure!(
                        seen.starts_with(&format!("{}:", a.ip)),
                        "{} → {}: backend saw {seen}",
                        a.name,
                        b.name
                    );
                }
            }
            Ok(())
        },
    );

    s.check(
        "a pod reaches the other node's address (return path through the tunnel)",
        |lab| {
            let pods = e2e::pods(lab, "app=demo")?;
            for a in &pods {
                let i = (1..=lab.config().nodes)
                    .find(|i| lab.config().node_name(*i) != a.node)
                    .context("no other node")?;
                // The other node's agent serves /healthz on its address.
                let url = format!("http://{}:{}/healthz", lab.config().node_ip(i), e2e::AGENT_METRICS_PORT);
                eventually(Duration::from_secs(15), || {
                    e2e::pod_curl(lab, &a.name, &url, 3)?.ok()
                })
                .with_context(|| format!("{} → node {i}", a.name))?;
            }
            Ok(())
        },
    );

    s.check("ClusterIP over TCP and UDP reaches the endpoints on both nodes", |lab| {
        let cip = e2e::cluster_ip(lab, "demo")?;
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        eventually(SETTLE, || {
            let got = e2e::hostnames_from_pod(lab, &pods[0].name, &format!("http://{cip}/hostname"), 30)?;
            ensure!(got == want, "TCP hostnames {got:?}, want {want:?}");
            let got = e2e::udp_dial_hostnames(lab, &pods[0].name, cip, 81, 30)?;
            ensure!(got.hostnames == want, "UDP hostnames {:?}, want {want:?} (netexec: {:?})", got.hostnames, got.errors);
            Ok(())
        })
    });

    s.check("NodePort from outside reaches backends on the other node", |lab| {
        let pods = e2e::pods(lab, "app=demo")?;
        let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
        for i in 1..=lab.config().nodes {
            let url = format!("http://{}:30080/hostname", lab.config().node_ip(i));
            eventually(SETTLE, || {
                let got = hostnames_from_outside(lab, &url, 24)?;
                ensure!(got == want, "via node {i}: hostnames {got:?}, want {want:?} (remote ones cross the tunnel)");
                Ok(())
            })?;
        }
        Ok(())
    });

    s.check(
        "riptide status shows vxlan mode and one tunnel peer",
        |lab| {
            for i in 1..=lab.config().nodes {
                let st = e2e::agent_status(lab, i)?;
                ensure!(st["routing_mode"] == "vxlan", "node {i}: {st}");
                let peers = st["tunnel_peers"].as_array().context("tunnel_peers")?;
                ensure!(
                    peers.len() == 1
                        && peers[0]
                            .as_str()
                            .is_some_and(|p| p.contains("dev riptide.vxlan")),
                    "node {i}: {peers:?}"
                );
                ensure!(
                    st["attachments"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == "tunnel:riptide.vxlan")),
                    "node {i}: no programs on the vxlan device: {st}"
                );
            }
            Ok(())
        },
    );

    s.check_mut(
        "agent kill -9 and restart keeps the vxlan device, its routes and cross-node traffic",
        |lab| {
            let before = vxlan_ifindex(lab, 1)?;
            lab.kill_agent(1)?;
            lab.start_agent(1)?;
            eventually(SETTLE, || {
                let st = e2e::agent_status(lab, 1)?;
                ensure!(st["ready"] == true && st["tunnel"].is_string(), "{st}");
                Ok(())
            })?;
            let after = vxlan_ifindex(lab, 1)?;
            ensure!(
                before == after,
                "the device was recreated ({before} → {after}) although nothing changed"
            );
            tunnel_routes_present(lab, 1)?;
            let pods = e2e::pods(lab, "app=demo")?;
            let n1 = lab.config().node_name(1);
            let local = pods
                .iter()
                .find(|p| p.node == n1)
                .context("no pod on node 1")?;
            let remote = pods
                .iter()
                .find(|p| p.node != n1)
                .context("no pod on node 2")?;
            let seen = eventually(Duration::from_secs(15), || {
                e2e::pod_curl(
                    lab,
                    &local.name,
                    &format!("http://{}:8080/clientip", remote.ip),
                    3,
                )?
                .ok()
            })?;
            ensure!(
                seen.starts_with(&format!("{}:", local.ip)),
                "after restart: backend saw {seen}"
            );
            let url = format!("http://{}:30080/hostname", lab.config().node_ip(1));
            let want: BTreeSet<String> = pods.iter().map(|p| p.name.clone()).collect();
            eventually(SETTLE, || {
                let got = hostnames_from_outside(lab, &url, 24)?;
                ensure!(
                    got == want,
                    "NodePort after restart: {got:?}, want {want:?}"
                );
                Ok(())
            })
        },
    );

    // What an operator does to leave the overlay: `routing-mode: native`
    // in the ConfigMap and a rollout (hand-wired: every agent restarted
    // without --tunnel). Native routing cannot carry pods across this
    // routed underlay, so this is the suite's last check.
    s.check_mut(
        "switching the cluster to native routing removes every node's device, rule and pins",
        |lab| {
            let c = lab.config().clone();
            let tunnel_pins = |i: u32| -> Result<Vec<String>> {
                let pins = std::path::Path::new(riptide_tests::lab::PIN_ROOT).join(c.node_name(i)).join("links");
                Ok(std::fs::read_dir(&pins)?
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("tunnel_"))
                    .collect())
            };
            for i in 1..=c.nodes {
                let pins = tunnel_pins(i)?;
                ensure!(pins.len() == 2, "node {i} before: tunnel link pins {pins:?}");
            }
            lab.set_routing_mode(None, SETTLE)?;
            for i in 1..=c.nodes {
                let ns = c.node_netns(i);
                eventually(SETTLE, || {
                    let st = e2e::agent_status(lab, i)?;
                    ensure!(st["ready"] == true && st["routing_mode"] == "native", "node {i}: {st}");
                    let links = ip_in(&ns, &["link"])?;
                    ensure!(!links.contains("riptide.vxlan"), "node {i}: device still there:\n{links}");
                    let rules = ip_in(&ns, &["rule"])?;
                    ensure!(!rules.contains("lookup 201"), "node {i}: rule still there:\n{rules}");
                    Ok(())
                })?;
                let left = tunnel_pins(i)?;
                ensure!(left.is_empty(), "node {i}: tunnel link pins left: {left:?}");
            }
            Ok(())
        },
    );

    s.finish();
}
