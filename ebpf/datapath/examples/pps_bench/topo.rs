//! The namespaces of a NodePort-to-a-remote-backend path, all created here
//! and deleted when [`Topo`] drops (also on a panic): an outside client,
//! node 1 and node 2 on one L2 segment (a bridge in its own namespace), and
//! a backend pod behind node 2. Shared by `pps_bench` and the netns test
//! `kernel_netns_xdp_nodeport` (`#[path]`), so the test proves delivery on
//! exactly the wiring the benchmark measures.
//!
//! ```text
//!  outside 198.18.0.100 ─┐
//!  node 1  198.18.0.1  ──┼── br0 (namespace `sw`)      node 2 ─pod0─ pod 10.42.2.10
//!  node 2  198.18.0.2  ──┘   ports p-o, p-n1, p-n2
//! ```
//!
//! Every address lives only inside these namespaces (RFC 2544 underlay,
//! the cluster's pod range); no route is added in the caller's namespace.
//! Neighbours are permanent and the bridge's forwarding entries static, so
//! no ARP and no flooding: each frame crosses exactly the ports its path
//! names. Node 1 routes the pod's /24 via node 2, as a cluster's native
//! routing does.
//!
//! XDP_TX on node 1's `eth0` puts the frame on the receive ring of its
//! veth peer `p-n1`, which needs NAPI there (`veth_xdp_xmit`). GRO on the
//! peer turns NAPI on but is not enough: measured here, the first 256
//! frames (the ring's size) went out and every later `XDP_TX` failed
//! (`rx_queue_0_xdp_tx_errors` in node 1's `ethtool -S eth0`), because the
//! sender's flush (`veth_xdp_flush`) schedules the peer's NAPI only when
//! the peer has an XDP program, so nothing drains the ring. An `XDP_PASS`
//! program on the peer ([`Topo::xdp_pass_on_peer`]) does both.

use std::{
    net::Ipv4Addr,
    os::fd::OwnedFd,
};

use riptide_test_support::{ip, netns, netns::Netns, veth_xdp};

pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const NODE1_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 2, 10);
pub const POD_CIDR: &str = "10.42.2.0/24";
pub const OUTSIDE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x64];
pub const NODE1_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const NODE2_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
pub const POD_HOST_MAC: [u8; 6] = [0x0e, 0xee, 0x00, 0x00, 0x02, 0x0a];
pub const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x2a, 0x02, 0x0a];
/// The pod's gateway (a link-local next hop, as riptide's CNI sets it).
const POD_GW: &str = "169.254.1.1";

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The namespaces of one run (see the module docs).
pub struct Topo {
    pub outside: Netns,
    pub node1: Netns,
    pub node2: Netns,
    pub pod: Netns,
    /// Last, so the bridge goes after the namespaces whose veths it holds.
    pub sw: Netns,
}

fn sysctl(ns: &str, key: &str, value: &str) {
    let st = netns::command(ns, "sysctl")
        .args(["-qw", &format!("{key}={value}")])
        .status()
        .expect("running sysctl");
    assert!(st.success(), "sysctl {key}={value} in {ns}");
}

impl Topo {
    /// The names of its namespaces, in the order they are removed.
    pub fn netns_names(&self) -> Vec<String> {
        [&self.outside, &self.node1, &self.node2, &self.pod, &self.sw]
            .iter()
            .map(|n| n.name().to_owned())
            .collect()
    }

    /// Builds the wiring under namespace names starting with `prefix`
    /// (callers put their pid in it).
    pub fn new(prefix: &str) -> Self {
        let t = Self {
            outside: Netns::new(format!("{prefix}-out")),
            node1: Netns::new(format!("{prefix}-n1")),
            node2: Netns::new(format!("{prefix}-n2")),
            pod: Netns::new(format!("{prefix}-pod")),
            sw: Netns::new(format!("{prefix}-sw")),
        };
        let sw = t.sw.name();
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", sw, "link", "set", "br0", "up"]);
        for (port, ns, addr, m) in [
            ("p-o", t.outside.name(), OUTSIDE_IP, OUTSIDE_MAC),
            ("p-n1", t.node1.name(), NODE1_IP, NODE1_MAC),
            ("p-n2", t.node2.name(), NODE2_IP, NODE2_MAC),
        ] {
            ip(&[
                "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&["-n", sw, "link", "set", port, "master", "br0"]);
            ip(&["-n", sw, "link", "set", port, "up"]);
            ip(&["-n", ns, "link", "set", "eth0", "address", &mac(m)]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            riptide_test_support::run(&[
                "bridge",
                "-n",
                sw,
                "fdb",
                "replace",
                &mac(m),
                "dev",
                port,
                "master",
                "static",
            ]);
        }
        for (ns, peers) in [
            (t.outside.name(), &[(NODE1_IP, NODE1_MAC)][..]),
            (
                t.node1.name(),
                &[(NODE2_IP, NODE2_MAC), (OUTSIDE_IP, OUTSIDE_MAC)][..],
            ),
            (
                t.node2.name(),
                &[(NODE1_IP, NODE1_MAC), (OUTSIDE_IP, OUTSIDE_MAC)][..],
            ),
        ] {
            for (addr, m) in peers {
                ip(&[
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &addr.to_string(),
                    "lladdr",
                    &mac(*m),
                    "nud",
                    "permanent",
                    "dev",
                    "eth0",
                ]);
            }
        }
        // Node 1: forwards, the pod CIDR via node 2.
        let n1 = t.node1.name();
        ip(&[
            "-n",
            n1,
            "route",
            "add",
            POD_CIDR,
            "via",
            &NODE2_IP.to_string(),
            "dev",
            "eth0",
        ]);
        // The outside client routes the cluster's pods via node 1 (the
        // direct reference path; the generator's frames carry node 1's
        // MAC anyway).
        ip(&[
            "-n",
            t.outside.name(),
            "route",
            "add",
            "10.42.0.0/16",
            "via",
            &NODE1_IP.to_string(),
        ]);
        // Node 2: the pod behind pod0, wired as riptide's CNI wires one.
        let n2 = t.node2.name();
        let pod = t.pod.name();
        ip(&[
            "-n",
            n2,
            "link",
            "add",
            "pod0",
            "address",
            &mac(POD_HOST_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod,
        ]);
        ip(&["-n", pod, "link", "set", "eth0", "address", &mac(POD_MAC)]);
        ip(&["-n", pod, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("{POD_IP}/32"),
            "dev",
            "eth0",
        ]);
        ip(&[
            "-n",
            pod,
            "neigh",
            "add",
            POD_GW,
            "lladdr",
            &mac(POD_HOST_MAC),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ip(&[
            "-n", pod, "route", "add", "default", "via", POD_GW, "dev", "eth0", "onlink",
        ]);
        ip(&["-n", n2, "link", "set", "pod0", "up"]);
        ip(&[
            "-n",
            n2,
            "route",
            "add",
            &format!("{POD_IP}/32"),
            "dev",
            "pod0",
            "scope",
            "link",
        ]);
        ip(&[
            "-n",
            n2,
            "neigh",
            "replace",
            &POD_IP.to_string(),
            "lladdr",
            &mac(POD_MAC),
            "nud",
            "permanent",
            "dev",
            "pod0",
        ]);
        for ns in [n1, n2] {
            sysctl(ns, "net.ipv4.conf.all.forwarding", "1");
            sysctl(ns, "net.ipv4.conf.all.rp_filter", "0");
            sysctl(ns, "net.ipv4.conf.eth0.rp_filter", "0");
        }
        // With br_netfilter loaded, bridged frames would meet the switch
        // namespace's (empty) netfilter hooks; a real switch has none.
        if std::path::Path::new("/proc/sys/net/bridge").exists() {
            for f in ["bridge-nf-call-iptables", "bridge-nf-call-arptables"] {
                let _ = netns::command(sw, "sysctl")
                    .args(["-qw", &format!("net.bridge.{f}=0")])
                    .status();
            }
        }
        t
    }

    /// An `XDP_PASS` program on `p-n1`, node 1's uplink peer: what a veth
    /// needs to take the frames an XDP program on the other end sends with
    /// `XDP_TX` (see the module docs). The returned link detaches when it
    /// is dropped or the device goes.
    pub fn xdp_pass_on_peer(&self) -> std::io::Result<OwnedFd> {
        netns::run_in(self.sw.name(), || veth_xdp::attach_pass("p-n1"))
    }

    /// Transmit checksum offload off on the namespaces whose sockets send
    /// (outside, pod): XDP forwards bytes, so they must carry full
    /// checksums (`riptide_test_support::veth_xdp`).
    pub fn full_checksums(&self) {
        for ns in [&self.outside, &self.pod] {
            veth_xdp::tx_checksum_off(ns.name(), "eth0").expect("transmit checksum offload off");
        }
    }

    /// Every device's counters (`ip -s link`, and `ethtool -S` of node 1's
    /// uplink and its peer): what a run that lost packets prints.
    pub fn counters(&self) -> String {
        let mut out = String::new();
        for ns in [&self.outside, &self.sw, &self.node1, &self.node2, &self.pod] {
            let o = netns::command(ns.name(), "ip")
                .args(["-s", "link"])
                .output();
            out.push_str(&format!("--- {} ip -s link\n", ns.name()));
            if let Ok(o) = o {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        for ns in [&self.outside, &self.pod] {
            let o = netns::command(ns.name(), "nstat").args(["-as"]).output();
            out.push_str(&format!("--- {} nstat -as\n", ns.name()));
            if let Ok(o) = o {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        for (ns, dev) in [(&self.node1, "eth0"), (&self.sw, "p-n1")] {
            let o = netns::command(ns.name(), "ethtool")
                .args(["-S", dev])
                .output();
            out.push_str(&format!("--- {} ethtool -S {dev}\n", ns.name()));
            if let Ok(o) = o {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        out
    }
}
