//! The vxlan device and its per-peer entries in a network namespace this
//! test creates (needs root): created with the node's parameters, reused
//! when unchanged, recreated when changed, peers added and removed exactly.
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use ipnetwork::Ipv4Network;
use riptide_agent::tunnel::{Tunnel, VxlanConfig};
use riptide_test_support::{netns::{self, Netns}, privileged, run};

/// Runs `f` on a thread inside netns `name` with its own tokio runtime.
fn in_netns<T: Send + 'static>(name: &str, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    netns::run_in(name, move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f())
    })
}

#[test]
fn netns_tunnel_device_and_peers_follow_the_nodes() {
    if !privileged("to create network namespaces") {
        return;
    }
    let ns = Netns::new(format!("rtag-vx-{}", std::process::id()));
    let n = ns.name().to_owned();
    run(&[
        "ip", "-n", &n, "link", "add", "u0", "mtu", "1400", "type", "veth", "peer", "name", "u1",
    ]);
    run(&["ip", "-n", &n, "addr", "add", "198.18.79.1/24", "dev", "u0"]);
    run(&["ip", "-n", &n, "link", "set", "u0", "up"]);
    run(&["ip", "-n", &n, "link", "set", "u1", "up"]);
    let local: Ipv4Addr = "198.18.79.1".parse().unwrap();
    let own: Ipv4Network = "10.42.0.0/24".parse().unwrap();
    let peers: BTreeMap<Ipv4Network, Ipv4Addr> = BTreeMap::from([
        (
            "10.42.1.0/24".parse().unwrap(),
            "198.18.80.2".parse().unwrap(),
        ),
        (
            "10.42.2.0/24".parse().unwrap(),
            "198.18.81.3".parse().unwrap(),
        ),
    ]);

    let p = peers.clone();
    let (idx1, created1, idx2, created2, added) = in_netns(&n, async move || {
        let mut t = Tunnel::new(VxlanConfig::default()).unwrap();
        let (i1, c1) = t.ensure_device(local, "u0", own).await.unwrap();
        let rep = t.sync_peers(&p).await.unwrap();
        // A restarted agent: same parameters, same device.
        let mut t2 = Tunnel::new(VxlanConfig::default()).unwrap();
        let (i2, c2) = t2.ensure_device(local, "u0", own).await.unwrap();
        let again = t2.sync_peers(&p).await.unwrap();
        assert!(
            again.added.is_empty() && again.removed == 0 && again.failed.is_empty(),
            "{again:?}"
        );
        (i1, c1, i2, c2, rep.added.len())
    });
    assert!(
        created1 && !created2 && idx1 == idx2,
        "created {created1}/{created2}, ifindex {idx1}/{idx2}"
    );
    assert_eq!(added, 2);
    let link = run(&["ip", "-d", "-n", &n, "link", "show", "riptide.vxlan"]);
    for want in [
        "mtu 1350",
        "vxlan id 1",
        "local 198.18.79.1",
        "dev u0",
        "dstport 4789",
        "nolearning",
        "0e:72:c6:12:4f:01",
        "UP",
    ] {
        assert!(link.contains(want), "missing {want:?} in\n{link}");
    }
    let addr = run(&["ip", "-n", &n, "addr", "show", "dev", "riptide.vxlan"]);
    assert!(addr.contains("inet 10.42.0.0/32"), "{addr}");
    let neigh = run(&["ip", "-n", &n, "neigh", "show", "dev", "riptide.vxlan"]);
    assert!(
        neigh.contains("10.42.1.0 lladdr 0e:72:c6:12:50:02 PERMANENT"),
        "{neigh}"
    );
    assert!(
        neigh.contains("10.42.2.0 lladdr 0e:72:c6:12:51:03 PERMANENT"),
        "{neigh}"
    );
    let fdb = run(&["bridge", "-n", &n, "fdb", "show", "dev", "riptide.vxlan"]);
    assert!(
        fdb.contains("0e:72:c6:12:50:02 dst 198.18.80.2 self permanent"),
        "{fdb}"
    );
    assert!(
        fdb.contains("0e:72:c6:12:51:03 dst 198.18.81.3 self permanent"),
        "{fdb}"
    );

    let rules = run(&["ip", "-n", &n, "rule"]);
    assert!(
        rules.contains("10201:\tfrom 10.42.0.0/24 lookup 201"),
        "{rules}"
    );
    let table = run(&["ip", "-n", &n, "route", "show", "table", "201"]);
    assert!(
        table.contains("198.18.80.2 via 10.42.1.0 dev riptide.vxlan proto 201 onlink"),
        "{table}"
    );
    assert!(
        table.contains("198.18.81.3 via 10.42.2.0 dev riptide.vxlan proto 201 onlink"),
        "{table}"
    );

    // Node 10.42.2.0/24 goes away; the VNI changes (recreate).
    let one: BTreeMap<_, _> = peers.into_iter().take(1).collect();
    let (removed, idx3, created3) = in_netns(&n, async move || {
        let mut t = Tunnel::new(VxlanConfig::default()).unwrap();
        t.ensure_device(local, "u0", own).await.unwrap();
        let rep = t.sync_peers(&one).await.unwrap();
        let mut t2 = Tunnel::new(VxlanConfig { vni: 7, port: 4789 }).unwrap();
        let (i3, c3) = t2.ensure_device(local, "u0", own).await.unwrap();
        t2.sync_peers(&one).await.unwrap();
        (rep.removed, i3, c3)
    });
    assert_eq!(
        removed, 3,
        "one return-path route, one neighbour and one FDB entry"
    );
    assert!(created3 && idx3 != idx1, "a new VNI needs a new device");
    let link = run(&["ip", "-d", "-n", &n, "link", "show", "riptide.vxlan"]);
    assert!(link.contains("vxlan id 7"), "{link}");
    let neigh = run(&["ip", "-n", &n, "neigh", "show", "dev", "riptide.vxlan"]);
    assert!(
        neigh.contains("10.42.1.0") && !neigh.contains("10.42.2.0"),
        "{neigh}"
    );
    let fdb = run(&["bridge", "-n", &n, "fdb", "show", "dev", "riptide.vxlan"]);
    assert!(
        fdb.contains("198.18.80.2") && !fdb.contains("198.18.81.3"),
        "{fdb}"
    );

    let gone = in_netns(&n, async move || {
        Tunnel::new(VxlanConfig::default())
            .unwrap()
            .remove_device()
            .await
            .unwrap()
    });
    assert!(gone);
    let rules = run(&["ip", "-n", &n, "rule"]);
    assert!(!rules.contains("lookup 201"), "{rules}");
    assert!(
        !Command::new("ip")
            .args(["-n", &n, "link", "show", "riptide.vxlan"])
            .output()
            .unwrap()
            .status
            .success()
    );
}
