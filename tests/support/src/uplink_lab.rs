//! A network namespace shaped like a node's uplink, for code that asks the
//! kernel's FIB about next hops (`rt_xdp_net` through BPF_PROG_TEST_RUN in
//! the datapath's kernel tests and `lb_bench xdp`): a veth `up0` with the
//! node's address, forwarding on, a route to another node's pod CIDR and
//! one to an outside client range, each via a next hop with a permanent
//! neighbour entry (so no ARP is ever needed).

use crate::{ip, netns::Netns};

/// The node (address of `up0`).
pub const NODE: &str = "198.18.0.1";
/// Another node: next hop of the remote pod CIDR [`REMOTE_PODS`].
pub const NODE2: &str = "198.18.0.2";
/// The router towards [`CLIENTS`].
pub const ROUTER: &str = "198.18.0.254";
pub const REMOTE_PODS: &str = "10.42.1.0/24";
pub const CLIENTS: &str = "203.0.113.0/24";
pub const UP0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Creates the namespace `name` as described in the module docs (deleted
/// when the returned guard drops).
pub fn uplink_lab(name: &str) -> Netns {
    let ns = Netns::new(name);
    let n = ns.name();
    ip(&["-n", n, "link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ip(&["-n", n, "link", "set", "up0", "address", &mac(UP0_MAC)]);
    ip(&["-n", n, "addr", "add", &format!("{NODE}/24"), "dev", "up0"]);
    ip(&["-n", n, "link", "set", "up0", "up"]);
    ip(&["-n", n, "link", "set", "up1", "up"]);
    ip(&["-n", n, "route", "add", REMOTE_PODS, "via", NODE2, "dev", "up0"]);
    ip(&["-n", n, "route", "add", CLIENTS, "via", ROUTER, "dev", "up0"]);
    for (addr, m) in [(NODE2, NODE2_MAC), (ROUTER, ROUTER_MAC)] {
        ip(&["-n", n, "neigh", "replace", addr, "lladdr", &mac(m), "nud", "permanent", "dev", "up0"]);
    }
    for key in ["net.ipv4.conf.all.forwarding", "net.ipv4.conf.up0.forwarding"] {
        let st = crate::netns::command(n, "sysctl")
            .args(["-qw", &format!("{key}=1")])
            .status()
            .expect("running sysctl");
        assert!(st.success(), "sysctl {key}=1 in {n}");
    }
    ns
}

/// `struct xdp_md` for BPF_PROG_TEST_RUN: a frame of `len` bytes arriving
/// on `ifindex` (the device must have a registered XDP receive queue: a
/// veth with an XDP program attached in native mode).
pub fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    md
}
