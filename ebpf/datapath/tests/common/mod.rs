//! Shared helpers of the kernel tests: privilege check, frame building,
//! checksum verification by recomputation, BPF_PROG_TEST_RUN wrapper.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use riptide_common::{Config, EndpointValue};
// The Service vocabulary every BPF_PROG_TEST_RUN suite builds its services
// from (`use common::*`); not every suite uses all of it.
#[allow(unused_imports)]
pub use riptide_datapath::{
    Datapath, MapSizes, Pinning,
    service::{
        Algorithm, Backend, BackendState, Frontend, FrontendKind, Protocol, Service, Services,
        TrafficPolicy,
    },
};

/// One node: its own datapath instance (no pins) and its service writer.
pub struct Node {
    pub dp: Datapath,
    pub svcs: Services,
}

impl Node {
    /// Loads a datapath, configures it with `config` and adds `endpoints`
    /// (the pods on this node), as the agent and the CNI would.
    pub fn load(
        config: &Config,
        endpoints: impl IntoIterator<Item = (Ipv4Addr, EndpointValue)>,
    ) -> Self {
        Self::load_sized(config, endpoints, &MapSizes::default())
    }

    /// [`Node::load`] with maps of `sizes` (tiny ones, for tests of full
    /// maps).
    pub fn load_sized(
        config: &Config,
        endpoints: impl IntoIterator<Item = (Ipv4Addr, EndpointValue)>,
        sizes: &MapSizes,
    ) -> Self {
        let mut dp = Datapath::load_sized(&Pinning::None, sizes).expect("load datapath");
        dp.set_config(config).expect("config");
        for (addr, value) in endpoints {
            dp.endpoints()
                .expect("endpoints")
                .upsert(addr, value)
                .expect("endpoint");
        }
        let svcs = dp.services().expect("services");
        Self { dp, svcs }
    }
}

/// What a failing suite prints about a datapath: each flow table (the
/// conntrack and NAT tables, by name) with its size and first entries
/// (the pressure suites fill them with thousands), and every counter that
/// moved.
pub fn dump(dp: &Datapath) -> String {
    use std::fmt::Write as _;

    use riptide_common::names;
    const SHOWN: usize = 16;
    fn table<E: std::fmt::Debug>(out: &mut String, name: &str, entries: Result<Vec<E>, riptide_datapath::Error>) {
        let _ = match entries {
            Ok(e) => writeln!(out, "{name}: {} entries {:?}", e.len(), &e[..e.len().min(SHOWN)]),
            Err(e) => writeln!(out, "{name}: {e}"),
        };
    }
    let mut out = String::new();
    for name in [names::CT4, names::CT_ANY4] {
        table(&mut out, name, dp.conntrack_table(name));
    }
    for name in [names::NAT4, names::NAT_ANY4] {
        table(&mut out, name, dp.nat_table(name));
    }
    let _ = match dp.stats() {
        Ok(s) => write!(out, "stats: {:?}", s.named().filter(|(_, v)| *v > 0).collect::<Vec<_>>()),
        Err(e) => write!(out, "stats: {e}"),
    };
    out
}

/// A pod's endpoint entry: host veth `ifindex`, pod and host-side MACs
/// ending in `tail`.
pub fn pod_endpoint(ifindex: u32, tail: [u8; 2]) -> EndpointValue {
    EndpointValue {
        ifindex,
        flags: 0,
        mac: [0x0a, 0x58, 0, 0, tail[0], tail[1]],
        node_mac: [0x0e, 0xee, 0, 0, tail[0], tail[1]],
    }
}

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub fn csum16(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A parsed view of an Ethernet/IPv4/{TCP,UDP,ICMP} frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

pub fn view(f: &[u8]) -> View {
    assert!(f.len() >= 34, "frame too short: {f:02x?}");
    assert_eq!(&f[12..14], &[0x08, 0x00], "not IPv4");
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let (sport, dport) = if f[23] == 6 || f[23] == 17 {
        (
            u16::from_be_bytes([f[l4], f[l4 + 1]]),
            u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        )
    } else {
        (0, 0)
    };
    View {
        src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        proto: f[23],
        sport,
        dport,
        ttl: f[22],
    }
}

/// Recomputes every checksum of the frame from scratch and asserts it.
pub fn assert_checksums(f: &[u8]) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    assert_eq!(f.len(), 14 + tot, "IP total length matches the frame");
    assert_eq!(csum16(&f[14..14 + ihl]), 0, "IPv4 header checksum");
    let l4 = &f[14 + ihl..14 + tot];
    let proto = f[23];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    match proto {
        6 => assert_eq!(csum16(&pseudo), 0, "TCP checksum"),
        // Checksum 0 means "none" for UDP.
        17 if l4[6..8] != [0, 0] => assert_eq!(csum16(&pseudo), 0, "UDP checksum"),
        1 => assert_eq!(csum16(l4), 0, "ICMP checksum"),
        _ => {}
    }
}

fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize, ttl: u8) -> Vec<u8> {
    let tot = (20 + l4_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, ttl, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = csum16(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

fn l4_csum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    csum16(&pseudo)
}

fn eth(out: &mut Vec<u8>) {
    out.extend_from_slice(&NODE_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
}

/// TCP segment with `flags`, seq 1000, ack 0 and `payload`, checksums valid.
pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&src.1.to_be_bytes());
    t.extend_from_slice(&dst.1.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&(if flags & 0x10 != 0 { 5000u32 } else { 0 }).to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    let c = l4_csum(src.0, dst.0, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    eth(&mut f);
    f.extend_from_slice(&ip_header(src.0, dst.0, 6, t.len(), 64));
    f.extend_from_slice(&t);
    f
}

pub fn syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    tcp(src, dst, 0x02, &[])
}

/// UDP datagram; `zero_csum` sends checksum 0 ("none").
pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8], zero_csum: bool) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&src.1.to_be_bytes());
    u.extend_from_slice(&dst.1.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    if !zero_csum {
        let mut c = l4_csum(src.0, dst.0, 17, &u);
        if c == 0 {
            c = 0xffff;
        }
        u[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = Vec::new();
    eth(&mut f);
    f.extend_from_slice(&ip_header(src.0, dst.0, 17, u.len(), 64));
    f.extend_from_slice(&u);
    f
}

/// Runs tc program `name` on `frame`; returns (verdict, output frame).
pub fn run(dp: &mut Datapath, name: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
    try_run(dp, name, frame).expect("BPF_PROG_TEST_RUN")
}

/// [`run`] that returns the kernel's refusal instead of panicking (the
/// fuzz suite judges it). The output buffer has room for the largest reply
/// the datapath builds from a minimal frame (an ICMP error quoting 576
/// bytes).
pub fn try_run(dp: &mut Datapath, name: &'static str, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
    let mut out = vec![0u8; frame.len() + 1024];
    let prog = dp.classifier(name).map_err(|e| e.to_string())?;
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .map_err(|e| format!("{e:?}"))?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Attaches `rt_from_pod` to the ingress of the host veth `hif`, as the
/// CNI does: before 6.6 (no tcx) aya attaches through netlink, onto the
/// clsact qdisc, which the device must have first.
pub fn attach_from_pod(dp: &mut Datapath, hif: &str) {
    use aya::programs::{TcAttachType, tc};
    use riptide_common::names;
    use riptide_datapath::TcMode;
    if TcMode::detect() == TcMode::Netlink {
        tc::qdisc_add_clsact(hif).expect("clsact qdisc");
    }
    dp.classifier(names::PROG_FROM_POD)
        .unwrap()
        .attach(hif, TcAttachType::Ingress)
        .expect("attach rt_from_pod");
}

/// Runs `rt_xdp_net` on `frame` arriving on `ifindex` (a device whose XDP
/// receive queue is registered: see `kernel_xdp_test_run.rs`); returns
/// (verdict, frame after).
pub fn xdp(dp: &mut Datapath, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let md = riptide_test_support::uplink_lab::xdp_md(frame.len(), ifindex);
    let r = dp
        .xdp(riptide_common::names::PROG_XDP_NET)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN (xdp)");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// ICMP error (`ty`/`code`) from `src` to `dst` quoting `quoted` (an IP
/// packet: header + at least 8 bytes), checksums valid.
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0x05, 0xdc]; // next-hop MTU 1500
    icmp.extend_from_slice(quoted);
    let c = csum16(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    eth(&mut f);
    f.extend_from_slice(&ip_header(src, dst, 1, icmp.len(), 64));
    f.extend_from_slice(&icmp);
    f
}
