//! Node routing in a network namespace this test creates (needs root): the
//! routing code runs on a thread that entered the netns, as the agent runs
//! inside a node's netns in the lab.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ipnetwork::Ipv4Network;
use riptide_agent::routes::Routes;
use riptide_test_support::{ip, netns::{self, Netns}, privileged};

/// Runs `f` on a thread inside netns `name` with its own tokio runtime.
fn in_netns<T: Send + 'static>(name: &str, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    netns::run_in(name, move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f())
    })
}

#[test]
fn netns_routes_follow_nodes_and_never_touch_foreign_routes() {
    if !privileged("to create network namespaces") {
        return;
    }
    let ns = Netns::new(format!("rtag-routes-{}", std::process::id()));
    let n = ns.name().to_owned();
    ip(&["-n", &n, "link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    ip(&["-n", &n, "addr", "add", "198.18.78.1/24", "dev", "u0"]);
    ip(&["-n", &n, "link", "set", "u0", "up"]);
    ip(&["-n", &n, "link", "set", "u1", "up"]);
    // Someone else's route inside the cluster range: must survive.
    ip(&["-n", &n, "route", "add", "10.42.9.0/24", "via", "198.18.78.9", "proto", "static"]);

    let cluster: Ipv4Network = "10.42.0.0/16".parse().unwrap();
    let desired: BTreeMap<Ipv4Network, std::net::Ipv4Addr> = BTreeMap::from([
        ("10.42.1.0/24".parse().unwrap(), "198.18.78.2".parse().unwrap()),
        ("10.42.2.0/24".parse().unwrap(), "198.18.78.3".parse().unwrap()),
        // Outside the cluster range: refused.
        ("192.168.50.0/24".parse().unwrap(), "198.18.78.2".parse().unwrap()),
    ]);
    let d = desired.clone();
    let rep = in_netns(&n, async move || Routes::new(cluster).unwrap().sync(&d).await.unwrap());
    assert_eq!(rep.added.len(), 2, "{rep:?}");
    assert_eq!(rep.refused, vec!["192.168.50.0/24".parse::<Ipv4Network>().unwrap()]);
    let table = ip(&["-n", &n, "route", "show"]);
    assert!(table.contains("10.42.1.0/24 via 198.18.78.2 dev u0 proto 201"), "{table}");
    assert!(table.contains("10.42.2.0/24 via 198.18.78.3 dev u0 proto 201"), "{table}");
    assert!(!table.contains("192.168.50.0"), "{table}");

    // Idempotent: nothing to do the second time.
    let d = desired.clone();
    let rep = in_netns(&n, async move || Routes::new(cluster).unwrap().sync(&d).await.unwrap());
    assert!(rep.added.is_empty() && rep.removed.is_empty(), "{rep:?}");

    // A node moves to another address, one goes away.
    let d: BTreeMap<Ipv4Network, std::net::Ipv4Addr> =
        BTreeMap::from([("10.42.1.0/24".parse().unwrap(), "198.18.78.4".parse().unwrap())]);
    let rep = in_netns(&n, async move || Routes::new(cluster).unwrap().sync(&d).await.unwrap());
    assert_eq!(rep.removed.len(), 2, "{rep:?}");
    let table = ip(&["-n", &n, "route", "show"]);
    assert!(table.contains("10.42.1.0/24 via 198.18.78.4"), "{table}");
    assert!(!table.contains("10.42.2.0/24"), "{table}");

    // Everything goes: only riptide's routes are removed.
    let rep = in_netns(&n, async move || Routes::new(cluster).unwrap().sync(&BTreeMap::new()).await.unwrap());
    assert_eq!(rep.removed.len(), 1, "{rep:?}");
    let table = ip(&["-n", &n, "route", "show"]);
    assert!(table.contains("10.42.9.0/24 via 198.18.78.9 dev u0 proto static"), "foreign route touched: {table}");
    assert!(!table.contains("proto 201"), "{table}");
}
