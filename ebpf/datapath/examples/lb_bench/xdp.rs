//! XDP NodePort acceleration next to the tc path (`lb_bench xdp
//! [SAMPLES]`, run by `cargo xtask bench` as `ebpf-xdp`), at 1, 1k and 10k
//! Services, inside a namespace shaped like a node's uplink
//! (`riptide_test_support::uplink_lab`; `rt_xdp_net` attached natively to
//! its veth, which BPF_PROG_TEST_RUN needs to name it as the ingress
//! device). Each Service has a LoadBalancer IP (NodePorts run out at
//! 2,768) and one backend on another node. All numbers are medians of
//! single runs (`repeat` = 1: XDP rewrites the frame in place, so a
//! repeated run would see a translated packet), each including one
//! `ktime_get_ns()`:
//!
//! * `xdp_new_ns` — the first packet of a flow (SYN, fresh source port):
//!   service lookup, backend choice, SNAT port, two NAT and two conntrack
//!   inserts, FIB lookup, DNAT+SNAT, `XDP_TX`.
//! * `xdp_est_ns` — a packet of an established flow: conntrack and NAT
//!   hits, FIB lookup, DNAT+SNAT, `XDP_TX`.
//! * `tc_est_ns` — the same packet through `rt_from_net` (DNAT; its FIB
//!   redirect does not apply in a test run) plus `rt_to_net` (SNAT): the
//!   two tc hooks the packet meets without XDP, without the skb
//!   allocation and stack traversal between them that XDP also saves.
//! * `xdp_pass_ns` — a packet for no frontend (to the node's port 22):
//!   what XDP adds to every other packet.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions, XdpMode};
use riptide_common::{Config, names};
use riptide_datapath::{
    Datapath, Pinning,
    service::{Backend, BackendState, Frontend, FrontendKind},
};
use riptide_test_support::{
    netns,
    uplink_lab::{NODE, uplink_lab, xdp_md},
};

use crate::bench::{clusterip, median_mean};

const XDP_TX: u32 = 3;
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

fn lb_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + i)
}

/// A TCP frame from the client to `dst:80` (checksums valid enough for
/// timing; the program updates them incrementally).
fn frame(sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = crate::bench::frame(sport, dst, dport, flags);
    f[26..30].copy_from_slice(&CLIENT.octets());
    f
}

fn xdp_run(dp: &mut Datapath, ifindex: u32, data: &[u8]) -> Result<(u32, u64)> {
    let mut out = vec![0u8; data.len() + 128];
    let md = xdp_md(data.len(), ifindex);
    let r = dp
        .xdp(names::PROG_XDP_NET)?
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            ..Default::default()
        })
        .context("rt_xdp_net: BPF_PROG_TEST_RUN")?;
    Ok((
        r.return_value,
        u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
    ))
}

fn tc_run(dp: &mut Datapath, prog: &'static str, data: &[u8]) -> Result<(Vec<u8>, u64)> {
    let mut out = vec![0u8; data.len() + 128];
    let r = dp
        .classifier(prog)?
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .with_context(|| format!("{prog}: BPF_PROG_TEST_RUN"))?;
    out.truncate(r.data_size_out as usize);
    Ok((
        out,
        u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX),
    ))
}

fn measure(services: u32, samples: u32) -> Result<String> {
    let mut dp = Datapath::load(&Pinning::None)?;
    dp.set_config(&Config {
        node_ip_be: u32::from(NODE.parse::<Ipv4Addr>()?).to_be(),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ..Default::default()
    })?;
    let mut svcs = dp.services()?;
    for i in 0..services {
        let be = Backend {
            addr: SocketAddrV4::new(Ipv4Addr::new(10, 42, 1, (i % 250) as u8 + 1), 8080),
            state: BackendState::Active,
            local: false,
        };
        let mut s = clusterip(format!("bench/lb{i}:p"), lb_ip(i), 80, vec![be]);
        s.frontends = vec![Frontend {
            kind: FrontendKind::LoadBalancer,
            addr: lb_ip(i),
            port: 80,
        }];
        svcs.upsert(&s)?;
    }
    dp.xdp(names::PROG_XDP_NET)?
        .attach("up0", XdpMode::Driver)
        .context("attaching rt_xdp_net natively to up0")?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"up0".as_ptr()) };
    let vip = lb_ip(0);
    let (mut new, mut est, mut tc, mut pass) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let (v, ns) = xdp_run(
            &mut dp,
            ifindex,
            &frame(1025 + (i % 60_000) as u16, vip, 80, 0x02),
        )?;
        if v != XDP_TX {
            bail!("a new flow to a remote backend was not sent with XDP_TX ({v})");
        }
        new.push(ns);
    }
    // The flow of source port 1025 is established now.
    let ack = frame(1025, vip, 80, 0x10);
    let other = frame(1025, NODE.parse()?, 22, 0x02);
    for _ in 0..samples {
        let (v, ns) = xdp_run(&mut dp, ifindex, &ack)?;
        if v != XDP_TX {
            bail!("an established flow was not sent with XDP_TX ({v})");
        }
        est.push(ns);
        let (mid, a) = tc_run(&mut dp, names::PROG_FROM_NET, &ack)?;
        let (_, b) = tc_run(&mut dp, names::PROG_TO_NET, &mid)?;
        tc.push(a + b);
        pass.push(xdp_run(&mut dp, ifindex, &other)?.1);
    }
    let (new, est, tc, pass) = (
        median_mean(new).0,
        median_mean(est).0,
        median_mean(tc).0,
        median_mean(pass).0,
    );
    Ok(format!(
        "{{\"path\":\"xdp_nodeport\",\"services\":{services},\"samples\":{samples},\"xdp_new_ns\":{new},\"xdp_est_ns\":{est},\"tc_est_ns\":{tc},\"xdp_pass_ns\":{pass},\"est_ratio_tc_over_xdp\":{:.2}}}",
        tc as f64 / (est as f64).max(1.0)
    ))
}

/// Prints one JSON object per Service count.
pub fn main(samples: u32) -> Result<()> {
    let ns = uplink_lab(&format!("rtxdpb{}", std::process::id()));
    let lines = netns::run_in(ns.name(), move || -> Result<Vec<String>> {
        [1, 1_000, 10_000]
            .into_iter()
            .map(|n| measure(n, samples))
            .collect()
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
