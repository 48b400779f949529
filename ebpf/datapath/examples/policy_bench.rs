//! ns/packet of NetworkPolicy in the tc path (needs root): the first
//! packet of a flow and established packets with 0, 100 and 1,000
//! policies over 1,000 local pods, each next to the no-policy baseline
//! measured in the same run (`cargo xtask bench` collects the output).
//!
//! `cargo run -p riptide-datapath --example policy_bench --release [-- SAMPLES]`
//! prints one JSON object per (direction, policies).
//!
//! The node has 1,000 local pods in 50 label sets. Policy `p` selects the
//! 100 pods of group `p % 10`, isolates them both ways and allows ingress
//! from label set `p % 50` on TCP port `1000 + p` and egress to label set
//! `(p + 1) % 50` on TCP port `2000 + p`: `policies × 200` rule entries. The
//! remote peer (a pod on another node) has label set 1, so
//!
//! * egress (`rt_from_pod`, pod 10 of group 0 → peer:2000) is allowed by
//!   policy 0, and
//! * ingress (`rt_from_net`, peer → pod 21 of group 1 on port 1001) by
//!   policy 1.
//!
//! With 0 policies nothing is isolated and `CFG_F_POLICY` is off: the
//! baseline. What each number includes:
//!
//! * `new_median_ns` — one run per syscall (`repeat` = 1) of a SYN with a
//!   fresh source port: parse, conntrack miss, service miss, and with
//!   policy the verdict and the two conntrack inserts. Includes the
//!   kernel's per-run bookkeeping (one `ktime_get_ns()`), the same in both.
//! * `est_ns` — the kernel's mean over `repeat` runs of one established
//!   packet in one syscall: with policy a conntrack hit on the flow's
//!   policy entry; without, the same lookups that miss (a plain flow has no
//!   conntrack entry). Ingress delivers with `bpf_redirect_peer`, which
//!   decrements the TTL on every run, so its runs go in batches of 200 from
//!   TTL 255 (every run a delivery) and the batches' means are averaged.
//! * `est_reply_ns` (egress) — like `est_ns` for the reply of the egress
//!   flow (peer → pod through `rt_from_net`, batches as for ingress): with
//!   policy a conntrack hit on the entry the reply tuple got after the
//!   flow's first `CT_BIDIR_REPLIES` replies; without, the plain path's
//!   lookups.
//! * `first_replies_ns` (egress) — those first `CT_BIDIR_REPLIES` replies of
//!   a flow (one batch of that many runs per new flow, the mean over
//!   `SAMPLES / CT_BIDIR_REPLIES` flows): with policy their own tuple
//!   misses, the pod's policy state is found and the flow's entry under the
//!   reverse tuple says it is established; without, the plain path.
//! * `policy_unselected` — a local pod no policy selects talking to the
//!   peer: with policy on, each of its packets reads its slot in
//!   `rt_polidx4_v1`, which says it has no policy state (no conntrack
//!   entry is recorded for such flows).
//! * `denied_new_median_ns` (egress) — like `new_median_ns` for a flow no
//!   rule allows: the verdict alone, without the two conntrack inserts an
//!   allowed flow pays (with 0 policies the same plain new flow).

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use riptide_common::{
    CFG_F_POLICY, CT_BIDIR_REPLIES, Config, EndpointValue, IpcacheValue, PE_F_EXACT_IN, PE_F_EXACT_OUT,
    PE_F_ISOLATED_IN, PE_F_ISOLATED_OUT, POL_DIR_EGRESS, POL_DIR_INGRESS, PolicyEndpointValue, PolicyKey,
    PolicyValue, identity, names, proto, stats,
};
use riptide_datapath::{Datapath, Pinning};

const PODS: u32 = 1_000;
const LABEL_SETS: u32 = 50;
const GROUPS: u32 = 10;
const PEER: Ipv4Addr = Ipv4Addr::new(10, 42, 100, 7);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Egress client: pod 10 (group 0); ingress server: pod 21 (group 1).
const CLIENT: u32 = 10;
const SERVER: u32 = 21;
/// A local pod outside the 1,000 that no policy selects.
const UNSELECTED: u32 = PODS;
/// A port no policy opens (egress of the client).
const DENIED_PORT: u16 = 2999;
/// Runs per ingress `repeat` batch (each run decrements the TTL).
const INGRESS_BATCH: u32 = 200;

fn pod(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 0, 0)) + 1 + i)
}

fn label_set(i: u32) -> u32 {
    identity::FIRST_LABELS + i % LABEL_SETS
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// A TCP frame (checksums are not needed for timing).
fn frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8, ttl: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, ttl, 6, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// Runs `prog` `repeat` times on `data`: the kernel's mean ns per run.
fn run(dp: &mut Datapath, prog: &'static str, data: &[u8], repeat: u32) -> Result<f64> {
    let mut out = vec![0u8; data.len() + 128];
    let r = dp
        .classifier(prog)?
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("{prog}: BPF_PROG_TEST_RUN"))?;
    Ok(r.duration.as_nanos() as f64)
}

/// A private datapath with 1,000 local pods and `policies` policies.
fn setup(policies: u32) -> Result<Datapath> {
    let mut dp = Datapath::load(&Pinning::None)?;
    dp.set_config(&Config {
        node_ip_be: be(NODE_IP),
        flags: if policies > 0 { CFG_F_POLICY } else { 0 },
        ..Default::default()
    })?;
    let mut pol = dp.policy()?;
    let mut eps = dp.endpoints()?;
    let cache = |identity| IpcacheValue {
        identity,
        cidr_identity: 0,
    };
    // As the agent writes them: addresses in the exact hash, prefixes in
    // the trie; single-port rules in the exact hash.
    pol.upsert_ipcache(Ipv4Addr::UNSPECIFIED, 0, cache(identity::WORLD))?;
    pol.upsert_ipcache_exact(NODE_IP, cache(identity::HOST))?;
    pol.upsert_ipcache_exact(PEER, cache(label_set(1)))?;
    // One more local pod that no policy selects (`UNSELECTED`).
    for i in 0..=PODS {
        let tail = [(i >> 8) as u8, i as u8];
        eps.upsert(
            pod(i),
            EndpointValue {
                ifindex: 100 + i,
                flags: 0,
                mac: [0x0a, 0x58, 0, 0, tail[0], tail[1]],
                node_mac: [0x0e, 0xee, 0, 0, tail[0], tail[1]],
            },
        )?;
        pol.upsert_ipcache_exact(pod(i), cache(label_set(i)))?;
    }
    let rule = |ep: u32, peer: u32, dir: u8, port: u16| PolicyKey {
        ep_id_be: (ep + 1).to_be(),
        identity_be: peer.to_be(),
        dir,
        proto: proto::TCP,
        port_be: port.to_be(),
    };
    let value = |p: u32| PolicyValue {
        policy_ref: p + 1,
        flags: 0,
    };
    for p in 0..policies {
        for i in (p % GROUPS..PODS).step_by(GROUPS as usize) {
            let port = u16::try_from(p).context("policy number")?;
            let ingress = rule(i, label_set(p), POL_DIR_INGRESS, 1000 + port);
            pol.upsert_rule_exact(ingress, value(p))?;
            let egress = rule(i, label_set(p + 1), POL_DIR_EGRESS, 2000 + port);
            pol.upsert_rule_exact(egress, value(p))?;
        }
    }
    if policies > 0 {
        for i in 0..PODS {
            pol.upsert_endpoint(
                pod(i),
                PolicyEndpointValue {
                    ep_id: i + 1,
                    identity: label_set(i),
                    flags: PE_F_ISOLATED_IN | PE_F_ISOLATED_OUT | PE_F_EXACT_IN | PE_F_EXACT_OUT,
                    _pad: 0,
                },
            )?;
        }
    }
    Ok(dp)
}

struct Sample {
    new_median_ns: f64,
    est_ns: f64,
    /// First packet of a flow no rule allows (egress only): the verdict
    /// without the conntrack insert of an allowed flow (a drop, counted;
    /// events beyond the per-CPU rate are only counted too).
    denied_new_median_ns: Option<f64>,
    /// Established reply packets of the flow (egress only).
    est_reply_ns: Option<f64>,
    /// The first `CT_BIDIR_REPLIES` replies of a flow (egress only).
    first_replies_ns: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median ns of `samples` first packets (SYNs from fresh source ports,
/// one run per syscall) from `src` to `dst:dport` through `prog`; source
/// port 1024's flow is the first.
fn first_packets(
    dp: &mut Datapath,
    prog: &'static str,
    (src, dst, dport): (Ipv4Addr, Ipv4Addr, u16),
    samples: u32,
) -> Result<f64> {
    let mut v = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        let sport = 1024 + (i % 60_000) as u16;
        v.push(run(dp, prog, &frame(src, sport, dst, dport, 0x02, 64), 1)?);
    }
    Ok(median(v))
}

/// From the local pod `src` to the remote peer through `rt_from_pod`: first
/// packets, then the established flow of source port 1024.
fn from_pod(dp: &mut Datapath, src: Ipv4Addr, samples: u32) -> Result<Sample> {
    let new_median_ns = first_packets(dp, names::PROG_FROM_POD, (src, PEER, 2000), samples)?;
    let ack = frame(src, 1024, PEER, 2000, 0x10, 64);
    let est_ns = run(dp, names::PROG_FROM_POD, &ack, samples.max(1))?;
    Ok(Sample {
        new_median_ns,
        est_ns,
        denied_new_median_ns: None,
        est_reply_ns: None,
        first_replies_ns: None,
    })
}

/// Egress: pod `CLIENT` → the remote peer, the replies of that flow, and
/// a port no rule opens.
fn egress(dp: &mut Datapath, samples: u32) -> Result<Sample> {
    let mut s = from_pod(dp, pod(CLIENT), samples)?;
    let reply = frame(PEER, 2000, pod(CLIENT), 1024, 0x10, 255);
    s.est_reply_ns = Some(from_net_est(dp, &reply, samples)?);
    let denied = (pod(CLIENT), PEER, DENIED_PORT);
    s.denied_new_median_ns = Some(first_packets(dp, names::PROG_FROM_POD, denied, samples)?);
    s.first_replies_ns = Some(first_replies(dp, samples)?);
    Ok(s)
}

/// Mean ns of the first `CT_BIDIR_REPLIES` replies of new egress flows
/// (source ports above those of [`first_packets`]): one SYN per flow, then
/// its replies in one batch.
fn first_replies(dp: &mut Datapath, samples: u32) -> Result<f64> {
    let flows = (samples / u32::from(CT_BIDIR_REPLIES)).clamp(1, 4_000);
    let mut sum = 0.0;
    for i in 0..flows {
        let sport = 61_000 + i as u16;
        let syn = frame(pod(CLIENT), sport, PEER, 2000, 0x02, 64);
        run(dp, names::PROG_FROM_POD, &syn, 1)?;
        let reply = frame(PEER, 2000, pod(CLIENT), sport, 0x10, 255);
        let replies = u32::from(CT_BIDIR_REPLIES);
        sum += run(dp, names::PROG_FROM_NET, &reply, replies)?;
    }
    Ok(sum / f64::from(flows))
}

/// Mean ns of the established packet `frame` (TTL 255) through
/// `rt_from_net`, in batches of `INGRESS_BATCH` runs.
fn from_net_est(dp: &mut Datapath, frame: &[u8], samples: u32) -> Result<f64> {
    let batches = (samples / INGRESS_BATCH).max(1);
    let mut sum = 0.0;
    for _ in 0..batches {
        sum += run(dp, names::PROG_FROM_NET, frame, INGRESS_BATCH)?;
    }
    Ok(sum / f64::from(batches))
}

/// A pod no policy selects → the remote peer: with policy on, every packet
/// of its flows asks whether either side has policy state (nothing is
/// recorded for such flows).
fn unselected(dp: &mut Datapath, samples: u32) -> Result<Sample> {
    from_pod(dp, pod(UNSELECTED), samples)
}

/// Ingress: the remote peer → pod `SERVER` through `rt_from_net`.
fn ingress(dp: &mut Datapath, samples: u32) -> Result<Sample> {
    let new_median_ns =
        first_packets(dp, names::PROG_FROM_NET, (PEER, pod(SERVER), 1001), samples)?;
    let ack = frame(PEER, 1024, pod(SERVER), 1001, 0x10, 255);
    Ok(Sample {
        new_median_ns,
        est_ns: from_net_est(dp, &ack, samples)?,
        denied_new_median_ns: None,
        est_reply_ns: None,
        first_replies_ns: None,
    })
}

fn main() -> Result<()> {
    let samples: u32 = std::env::args()
        .nth(1)
        .map_or(Ok(5000), |s| s.parse())
        .context("SAMPLES must be a number")?;
    type Path = fn(&mut Datapath, u32) -> Result<Sample>;
    let paths: [(&str, Path); 3] = [
        ("egress", egress),
        ("ingress", ingress),
        ("unselected", unselected),
    ];
    // Every setup measures both paths; the baseline (0 policies) first.
    let mut results = Vec::new();
    for policies in [0, 100, 1_000] {
        let mut dp = setup(policies)?;
        for (name, path) in paths {
            results.push((name, policies, path(&mut dp, samples)?));
        }
        // The numbers only mean something if the flows were judged and
        // allowed (a denied flow would take another path).
        let st = dp.stats()?;
        let allowed = st.get(stats::POLICY_ALLOW_IN) + st.get(stats::POLICY_ALLOW_OUT);
        let denied = st.get(stats::POLICY_DENY_IN) + st.get(stats::POLICY_DENY_OUT);
        let want_denied = if policies > 0 { u64::from(samples) } else { 0 };
        if denied != want_denied || (policies > 0) != (allowed > 0) {
            bail!("{policies} policies: {allowed} flows allowed, {denied} denied");
        }
    }
    for (name, policies, s) in &results {
        let Some((_, _, base)) = results.iter().find(|(n, p, _)| n == name && *p == 0) else {
            continue;
        };
        let mut denied = s.denied_new_median_ns.map_or(String::new(), |d| {
            format!(
                ",\"denied_new_median_ns\":{d:.0},\"denied_new_delta_ns\":{:.0}",
                d - base.new_median_ns
            )
        });
        if let (Some(r), Some(b)) = (s.est_reply_ns, base.est_reply_ns) {
            denied.push_str(&format!(
                ",\"est_reply_ns\":{r:.1},\"est_reply_delta_ns\":{:.1}",
                r - b
            ));
        }
        if let (Some(r), Some(b)) = (s.first_replies_ns, base.first_replies_ns) {
            denied.push_str(&format!(
                ",\"first_replies_ns\":{r:.1},\"first_replies_delta_ns\":{:.1}",
                r - b
            ));
        }
        println!(
            "{{\"path\":\"policy_{name}\",\"pods\":{PODS},\"policies\":{policies},\"samples\":{samples},\"new_median_ns\":{:.0},\"est_ns\":{:.1},\"new_delta_ns\":{:.0},\"est_delta_ns\":{:.1},\"new_ratio\":{:.3},\"est_ratio\":{:.3}{denied}}}",
            s.new_median_ns,
            s.est_ns,
            s.new_median_ns - base.new_median_ns,
            s.est_ns - base.est_ns,
            s.new_median_ns / base.new_median_ns,
            s.est_ns / base.est_ns,
        );
    }
    Ok(())
}
