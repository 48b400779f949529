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
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use riptide_test_support::{ip, netns, netns::Netns};

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
        netns::run_in(self.sw.name(), || xdp_pass("p-n1"))
    }

    /// Transmit checksum offload off on the namespaces whose sockets send
    /// (outside, pod). A veth passes a local socket's packet with only the
    /// pseudo-header sum in its checksum field (CHECKSUM_PARTIAL, completed
    /// by whoever transmits it for real); an XDP program on the path sees
    /// bytes only, and the frame it sends with `XDP_TX` leaves as a new
    /// buffer whose partial sum is now taken as complete: measured, every
    /// datagram XDP forwarded counted as `UdpInCsumErrors` at the receiver.
    /// Traffic from a physical network always carries full checksums; this
    /// makes the namespaces send it that way.
    pub fn full_checksums(&self) {
        for ns in [&self.outside, &self.pod] {
            let st = netns::command(ns.name(), "ethtool")
                .args(["-K", "eth0", "tx", "off"])
                .stdout(std::process::Stdio::null())
                .status()
                .expect("running ethtool");
            assert!(st.success(), "ethtool -K eth0 tx off in {}", ns.name());
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

/// `struct bpf_insn` as the kernel reads it.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 32]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed;
    // every pointer in it outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of::<[u64; 32]>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = XDP_PASS; exit` and attaches it natively to `ifname` of the
/// calling thread's namespace as a bpf_link (raw `bpf(2)`: two
/// instructions need no object file).
fn xdp_pass(ifname: &str) -> std::io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_XDP: u64 = 6;
    const BPF_XDP: u64 = 37;
    const XDP_FLAGS_DRV_MODE: u64 = 1 << 2;
    let insns = [
        // mov64 r0, XDP_PASS (2)
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 2,
        },
        // exit
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut attr = [0u64; 32];
    // prog_type, insn_cnt; insns; license; (log: none); expected_attach_type
    // at byte 68 (the high half of word 8).
    attr[0] = BPF_PROG_TYPE_XDP | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[8] = BPF_XDP << 32;
    let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut attr = [0u64; 32];
    // prog_fd, target_ifindex; attach_type, flags.
    attr[0] = prog.as_raw_fd() as u64 | (u64::from(ifindex) << 32);
    attr[1] = BPF_XDP | (XDP_FLAGS_DRV_MODE << 32);
    bpf(BPF_LINK_CREATE, &mut attr)
}
