//! Privileged end-to-end check of Direct Server Return on a 2-node lab with
//! native routing: an outside client reaches a NodePort on node 1 whose
//! only backend runs on node 2. With `service.riptide.io/lb-mode: dsr` the
//! backend sees the client's own address and its replies leave node 2
//! straight to the client (node 2's `dsr_revnat` counts them, node 1's
//! `revnat`/`unsnat`, which every reply through it would bump, stay put);
//! the same backend behind a NodePort without the annotation (SNAT, the
//! control) sees node 1 and node 1 does count the replies. TCP and UDP.

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use riptide_tests::{
    e2e::{self, Counters, Suite, counter_delta, eventually},
    lab::{Lab, LabConfig},
    netns,
};
use riptide_test_support::privileged;

const SETTLE: Duration = Duration::from_secs(60);
const DSR_TCP: u16 = 30180;
const DSR_UDP: u16 = 30181;
const SNAT_TCP: u16 = 30182;
const SNAT_UDP: u16 = 30183;
const REQUESTS: u64 = 5;

/// The agent folds the datapath counters into its metrics every
/// `--map-sample-interval-s` (10 s): a read after this long includes every
/// packet sent before it.
const SAMPLE: Duration = Duration::from_secs(12);

/// Both nodes' counters once every packet sent so far is in them.
fn settled(lab: &Lab) -> Result<(Counters, Counters)> {
    std::thread::sleep(SAMPLE);
    Ok((counters(lab, 1)?, counters(lab, 2)?))
}

/// `riptide_agent_datapath_packets_total` of node `i` by reason, from its
/// metrics endpoint.
fn counters(lab: &Lab, i: u32) -> Result<Counters> {
    let out = e2e::agent_metrics(lab, i)?.counters_by("riptide_agent_datapath_packets_total", "reason")?;
    ensure!(out.contains_key("dsr_opt_set"), "no dsr_opt_set among node {i}'s datapath counters: {out:?}");
    Ok(out)
}

/// One UDP `clientip` query from the outside namespace to `to`: the
/// answer and the address it came from.
fn udp_clientip(lab: &Lab, to: SocketAddrV4) -> Result<(String, SocketAddrV4)> {
    netns::run_in(&lab.config().outside_netns(), move || -> Result<(String, SocketAddrV4)> {
        let sock = UdpSocket::bind("0.0.0.0:0").context("udp bind")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.send_to(b"clientip", to).with_context(|| format!("udp send to {to}"))?;
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).with_context(|| format!("no UDP answer from {to}"))?;
        let std::net::SocketAddr::V4(from) = from else { anyhow::bail!("IPv6 answer from {from}") };
        Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
    })?
}

#[test]
fn netns_e2e_dsr_nodeport_to_a_remote_backend() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(2).expect("config")).expect("lab up");
    lab.start_cluster(Duration::from_secs(120)).expect("cluster");
    let node2 = lab.config().node_name(2);
    let manifest = dsr_manifest(&lab, &node2).expect("manifest");
    e2e::apply(&lab, &manifest).expect("apply the DSR workload");
    let mut s = Suite::new(&mut lab);

    s.check("the backend runs on node 2 and is ready", |lab| {
        let pods = eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=dsr")?;
            ensure!(p.len() == 1 && p[0].ready, "want one ready pod: {p:?}");
            Ok(p)
        })?;
        ensure!(pods[0].node == lab.config().node_name(2), "backend on {}, want node 2", pods[0].node);
        Ok(())
    });

    s.check("TCP: DSR keeps the client address and replies bypass node 1; SNAT does not", |lab| {
        let c = lab.config();
        let dsr_url = format!("http://{}:{DSR_TCP}/clientip", c.node_ip(1));
        eventually(SETTLE, || e2e::outside_curl(lab, &dsr_url, 3)?.ok())?;
        let (n1, n2) = settled(lab)?;
        for _ in 0..REQUESTS {
            let seen = e2e::outside_curl(lab, &dsr_url, 3)?.ok()?;
            ensure!(
                seen.starts_with(&format!("{}:", c.outside_ip())),
                "DSR: the backend saw {seen}, the client is {}",
                c.outside_ip()
            );
        }
        let (n1b, n2b) = settled(lab)?;
        eprintln!(
            "     node 1: dsr_opt_set +{} revnat +{} unsnat +{}; node 2: dsr_opt_recv +{} dsr_revnat +{}",
            counter_delta(&n1, &n1b, "dsr_opt_set")?,
            counter_delta(&n1, &n1b, "revnat")?,
            counter_delta(&n1, &n1b, "unsnat")?,
            counter_delta(&n2, &n2b, "dsr_opt_recv")?,
            counter_delta(&n2, &n2b, "dsr_revnat")?
        );
        ensure!(counter_delta(&n1, &n1b, "dsr_opt_set")? >= REQUESTS, "node 1 wrote the option for every SYN");
        ensure!(counter_delta(&n2, &n2b, "dsr_opt_recv")? >= REQUESTS, "node 2 took it");
        // Every reply segment (SYN-ACK, data, FIN) leaves node 2 from the frontend.
        ensure!(counter_delta(&n2, &n2b, "dsr_revnat")? >= 3 * REQUESTS, "node 2 sent the replies");
        ensure!(
            counter_delta(&n1, &n1b, "revnat")? == 0 && counter_delta(&n1, &n1b, "unsnat")? == 0,
            "no reply went through node 1: {n1:?} → {n1b:?}"
        );

        // The control: the same backend without DSR, through node 1.
        let snat_url = format!("http://{}:{SNAT_TCP}/clientip", c.node_ip(1));
        eventually(SETTLE, || e2e::outside_curl(lab, &snat_url, 3)?.ok())?;
        let (n1, _) = settled(lab)?;
        let seen = e2e::outside_curl(lab, &snat_url, 3)?.ok()?;
        ensure!(seen.starts_with(&format!("{}:", c.node_ip(1))), "SNAT: the backend saw {seen}, want node 1");
        let (n1b, _) = settled(lab)?;
        ensure!(counter_delta(&n1, &n1b, "revnat")? >= 2, "SNAT replies return through node 1: {n1:?} → {n1b:?}");
        Ok(())
    });

    s.check("UDP: the same, the answer from the NodePort address", |lab| {
        let c = lab.config();
        let frontend = SocketAddrV4::new(c.node_ip(1), DSR_UDP);
        eventually(SETTLE, || udp_clientip(lab, frontend))?;
        let (n1, n2) = settled(lab)?;
        for _ in 0..REQUESTS {
            let (seen, from) = udp_clientip(lab, frontend)?;
            ensure!(from == frontend, "DSR answer from {from}, want the frontend {frontend}");
            ensure!(seen.starts_with(&format!("{}:", c.outside_ip())), "DSR: the backend saw {seen}");
        }
        let (n1b, n2b) = settled(lab)?;
        ensure!(counter_delta(&n1, &n1b, "dsr_opt_set")? >= REQUESTS, "node 1 wrote the option on every datagram");
        ensure!(counter_delta(&n2, &n2b, "dsr_revnat")? >= REQUESTS, "node 2 sent the answers");
        ensure!(
            counter_delta(&n1, &n1b, "revnat")? == 0 && counter_delta(&n1, &n1b, "unsnat")? == 0,
            "no answer went through node 1: {n1:?} → {n1b:?}"
        );
        let control = SocketAddrV4::new(c.node_ip(1), SNAT_UDP);
        let (seen, from) = eventually(SETTLE, || udp_clientip(lab, control))?;
        ensure!(from == control, "SNAT answer from {from}");
        ensure!(seen.starts_with(&format!("{}:", c.node_ip(1))), "SNAT: the backend saw {seen}, want node 1");
        Ok(())
    });

    s.finish();
}

/// One netexec pod (`dsr`) pinned to `node` and four NodePorts to it: DSR
/// by annotation (TCP, UDP) and the cluster default, SNAT (TCP, UDP).
fn dsr_manifest(lab: &Lab, node: &str) -> Result<String> {
    let svc = |name: &str, proto: &str, port: u16, target: u16, node_port: u16, dsr: bool| {
        let ann = if dsr { "\n  annotations: {service.riptide.io/lb-mode: dsr}" } else { "" };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}{ann}\nspec:\n  type: NodePort\n  selector: {{app: dsr}}\n  ports:\n  - {{port: {port}, targetPort: {target}, nodePort: {node_port}, protocol: {proto}}}\n"
        )
    };
    Ok(format!(
        "{}{}{}{}{}",
        e2e::netexec_pod(lab, "dsr", node)?,
        svc("dsr-tcp", "TCP", 80, 8080, DSR_TCP, true),
        svc("dsr-udp", "UDP", 81, 8081, DSR_UDP, true),
        svc("snat-tcp", "TCP", 80, 8080, SNAT_TCP, false),
        svc("snat-udp", "UDP", 81, 8081, SNAT_UDP, false),
    ))
}
