//! Privileged end-to-end check of XDP NodePort acceleration on a 2-node
//! lab (native routing) with `xdp: native` on every node's uplink, set as
//! an operator would (ConfigMap and `rollout restart`, `Lab::set_xdp`,
//! which also gives the lab's veth underlay what XDP on veths needs: an
//! `XDP_PASS` program on the underlay end of each node link, transmit
//! checksum offload off where packets are sent). From the outside
//! namespace:
//!
//! - NodePort on node 1 to the only backend, a pod on node 2, in lb-mode
//!   snat (the backend sees node 1) and dsr (it sees the client; replies
//!   bypass node 1), TCP and UDP, with node 1's `xdp_tx` counter moving
//!   (`riptide drops`, read from the maps);
//! - a Service without backends answered from XDP: a RST for TCP (to its
//!   NodePort), an ICMP port unreachable for UDP (to its load-balancer IP:
//!   a new UDP flow to a node address is tc's), each with an `xdp-net`
//!   event;
//! - `loadBalancerSourceRanges` without the client: dropped at XDP
//!   (`lb_src_range`, `xdp-net` event);
//! - `riptide status` naming the attachment, the metrics endpoint the
//!   counter.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use riptide_test_support::privileged;
use riptide_tests::{
    e2e::{self, Counters, Curl, Suite, counter_delta, eventually},
    lab::{Lab, LabConfig},
    netns,
};

const SETTLE: Duration = Duration::from_secs(60);
const SNAT_TCP: u16 = 30280;
const SNAT_UDP: u16 = 30281;
const DSR_TCP: u16 = 30282;
const DSR_UDP: u16 = 30283;
const EMPTY_TCP: u16 = 30284;
const REQUESTS: u64 = 5;

/// Both nodes' datapath counters.
fn counters(lab: &Lab) -> Result<[Counters; 2]> {
    Ok([e2e::agent_counters(lab, 1)?, e2e::agent_counters(lab, 2)?])
}

/// `rounds` `clientip` queries from the outside namespace over one
/// connected UDP socket (so every query after the first belongs to an
/// established flow, and only answers from `to` are taken): the answers,
/// or the socket's error (ECONNREFUSED: an ICMP port unreachable came).
fn outside_udp(lab: &Lab, to: SocketAddrV4, rounds: u64) -> Result<std::io::Result<Vec<String>>> {
    netns::run_in(
        &lab.config().outside_netns(),
        move || -> std::io::Result<Vec<String>> {
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            sock.connect(to)?;
            let mut answers = Vec::new();
            for _ in 0..rounds {
                sock.send(b"clientip")?;
                let mut buf = [0u8; 256];
                let n = sock.recv(&mut buf)?;
                answers.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
            }
            Ok(answers)
        },
    )
}

/// The load-balancer IP the cluster gave Service `name`.
fn lb_ip(lab: &Lab, name: &str) -> Result<Ipv4Addr> {
    eventually(SETTLE, || {
        let ip = e2e::kubectl(
            lab,
            &[
                "get",
                "service",
                name,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ],
        )?;
        Ok(ip.trim().parse()?)
    })
}

/// Whether some node's agent kept an event of `reason` from `rt_xdp_net`
/// about a packet to `dst`.
fn xdp_event(lab: &Lab, reason: &str, dst: &str) -> Result<()> {
    for i in 1..=lab.config().nodes {
        let events = e2e::agent_events(lab, i)?;
        if events
            .iter()
            .any(|e| e["reason"] == reason && e["program"] == "xdp-net" && e["dst"] == dst)
        {
            return Ok(());
        }
    }
    anyhow::bail!("no node has a {reason} event from xdp-net about {dst}")
}

#[test]
fn netns_e2e_xdp_nodeport_rejects_and_source_ranges() {
    if !privileged("for network namespaces and eBPF") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(2).expect("config")).expect("lab up");
    lab.start_cluster(Duration::from_secs(120))
        .expect("cluster");
    let node2 = lab.config().node_name(2);
    let manifest = manifest(&lab, &node2).expect("manifest");
    e2e::apply(&lab, &manifest).expect("apply the workload");
    let mut s = Suite::new(&mut lab);

    s.check_mut(
        "xdp: native from the ConfigMap on every node's uplink",
        |lab| {
            lab.set_xdp("native", Duration::from_secs(120))?;
            for i in 1..=2 {
                let st = e2e::agent_status(lab, i)?;
                let att = st["attachments"].as_array().context("attachments")?;
                ensure!(
                    att.iter().any(|a| a == "xdp:eth0 (native)"),
                    "node {i}'s attachments: {att:?}"
                );
            }
            Ok(())
        },
    );

    s.check("the backend runs on node 2 and is ready", |lab| {
        let pods = eventually(SETTLE, || {
            let p = e2e::pods(lab, "app=xdp")?;
            ensure!(p.len() == 1 && p[0].ready, "want one ready pod: {p:?}");
            Ok(p)
        })?;
        ensure!(
            pods[0].node == lab.config().node_name(2),
            "backend on {}, want node 2",
            pods[0].node
        );
        Ok(())
    });

    s.check(
        "TCP NodePort to node 2's pod through node 1's XDP: snat and dsr",
        |lab| {
            let c = lab.config();
            for (port, mode, client) in [
                (SNAT_TCP, "snat", c.node_ip(1)),
                (DSR_TCP, "dsr", c.outside_ip()),
            ] {
                let url = format!("http://{}:{port}/clientip", c.node_ip(1));
                // The first connection may find node 1 without node 2's MAC:
                // XDP leaves it to tc, whose forwarding resolves it.
                eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())?;
                let before = counters(lab)?;
                for _ in 0..REQUESTS {
                    let seen = e2e::outside_curl(lab, &url, 3)?.ok()?;
                    ensure!(
                        seen.starts_with(&format!("{client}:")),
                        "{mode}: the backend saw {seen}, want {client}"
                    );
                }
                let after = counters(lab)?;
                let tx = counter_delta(&before[0], &after[0], "xdp_tx")?;
                eprintln!(
                    "     {mode}: node 1 xdp_tx +{tx} xdp_to_tc +{} revnat +{} dsr_opt_set +{}",
                    counter_delta(&before[0], &after[0], "xdp_to_tc")?,
                    counter_delta(&before[0], &after[0], "revnat")?,
                    counter_delta(&before[0], &after[0], "dsr_opt_set")?
                );
                // Per connection at least the SYN, the request, the ACK of the
                // reply and a FIN went out with XDP_TX (and with snat the
                // replies too).
                ensure!(
                    tx >= 4 * REQUESTS,
                    "{mode}: node 1 sent {tx} packets with XDP_TX for {REQUESTS} connections"
                );
                if mode == "dsr" {
                    ensure!(
                        counter_delta(&before[0], &after[0], "dsr_opt_set")? >= REQUESTS,
                        "dsr: the option on every SYN"
                    );
                    ensure!(
                        counter_delta(&before[0], &after[0], "revnat")? == 0
                            && counter_delta(&before[0], &after[0], "unsnat")? == 0,
                        "dsr: no reply went through node 1: {:?} → {:?}",
                        before[0],
                        after[0]
                    );
                }
            }
            Ok(())
        },
    );

    s.check(
        "UDP NodePort: the established flow's datagrams through node 1's XDP",
        |lab| {
            let c = lab.config();
            for (port, mode, client) in [
                (SNAT_UDP, "snat", c.node_ip(1)),
                (DSR_UDP, "dsr", c.outside_ip()),
            ] {
                let to = SocketAddrV4::new(c.node_ip(1), port);
                eventually(SETTLE, || Ok(outside_udp(lab, to, 1)??))?;
                let before = counters(lab)?;
                // A new UDP flow to a node address starts in tc (a host socket
                // may own it); the flow's later datagrams are XDP's.
                let answers = outside_udp(lab, to, REQUESTS)?
                    .with_context(|| format!("{mode}: UDP to {to}"))?;
                for seen in &answers {
                    ensure!(
                        seen.starts_with(&format!("{client}:")),
                        "{mode}: the backend saw {seen}, want {client}"
                    );
                }
                let after = counters(lab)?;
                let tx = counter_delta(&before[0], &after[0], "xdp_tx")?;
                eprintln!("     udp {mode}: node 1 xdp_tx +{tx}");
                ensure!(
                    tx >= REQUESTS - 1,
                    "{mode}: node 1 sent {tx} datagrams with XDP_TX for {REQUESTS} queries"
                );
            }
            Ok(())
        },
    );

    s.check(
        "no backends: TCP gets a RST and UDP an ICMP port unreachable from XDP",
        |lab| {
            let c = lab.config();
            let before = counters(lab)?;
            let url = format!("http://{}:{EMPTY_TCP}/", c.node_ip(1));
            match e2e::outside_curl(lab, &url, 3)? {
                Curl::Failed(7, _) => {}
                other => anyhow::bail!("{url}: {other:?}, want connection refused (curl exit 7)"),
            }
            let after = counters(lab)?;
            ensure!(
                counter_delta(&before[0], &after[0], "reject_rst")? >= 1,
                "node 1 counted no reject_rst"
            );
            xdp_event(
                lab,
                "drop_no_backend",
                &format!("{}:{EMPTY_TCP}", c.node_ip(1)),
            )?;

            let ip = lb_ip(lab, "xdp-empty-udp")?;
            let to = SocketAddrV4::new(ip, 53);
            let before = counters(lab)?;
            // Until the outside has the announcing node's MAC, a query times out.
            eventually(SETTLE, || match outside_udp(lab, to, 1)? {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => anyhow::bail!("UDP to {to}: {e}, want connection refused"),
                Ok(a) => anyhow::bail!("{to} answered {a:?} without backends"),
            })?;
            let after = counters(lab)?;
            let icmp = (0..2)
                .map(|i| counter_delta(&before[i], &after[i], "reject_icmp"))
                .sum::<Result<u64>>()?;
            ensure!(icmp >= 1, "no node counted a reject_icmp: {before:?} → {after:?}");
            xdp_event(lab, "drop_no_backend", &to.to_string())
        },
    );

    s.check(
        "loadBalancerSourceRanges without the client: dropped at XDP",
        |lab| {
            let ip = lb_ip(lab, "xdp-ranges")?;
            let url = format!("http://{ip}/clientip");
            let before = counters(lab)?;
            match e2e::outside_curl(lab, &url, 2)? {
                Curl::Failed(28, _) => {}
                other => anyhow::bail!("{url}: {other:?}, want a timeout (curl exit 28)"),
            }
            let after = counters(lab)?;
            let denied = (0..2)
                .map(|i| counter_delta(&before[i], &after[i], "lb_src_range"))
                .sum::<Result<u64>>()?;
            ensure!(denied >= 1, "no node counted an lb_src_range drop: {before:?} → {after:?}");
            xdp_event(lab, "lb_src_range", &format!("{ip}:80"))
        },
    );

    s.check("the metrics endpoint shows node 1's xdp_tx", |lab| {
        // Folded into the metrics every --map-sample-interval-s (10 s).
        eventually(SETTLE, || {
            let by_reason = e2e::agent_metrics(lab, 1)?
                .counters_by("riptide_agent_datapath_packets_total", "reason")?;
            let tx = by_reason
                .get("xdp_tx")
                .copied()
                .with_context(|| format!("no xdp_tx counter in node 1's metrics: {by_reason:?}"))?;
            ensure!(tx >= 4 * REQUESTS, "node 1's metrics show xdp_tx {tx}: {by_reason:?}");
            Ok(())
        })
    });

    s.finish();
}

/// One netexec pod (`xdp`) pinned to `node`; NodePorts to it in lb-mode
/// snat (the cluster default) and dsr (annotation), TCP and UDP each; a
/// NodePort and a UDP LoadBalancer without backends; a LoadBalancer to it
/// whose source ranges leave the outside client out (TEST-NET-3 holds no
/// lab address).
fn manifest(lab: &Lab, node: &str) -> Result<String> {
    let nodeport = |name: &str, ann: &str, tcp: u16, udp: u16| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}{ann}\nspec:\n  type: NodePort\n  selector: {{app: xdp}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, nodePort: {tcp}, protocol: TCP}}\n  - {{name: udp, port: 81, targetPort: 8081, nodePort: {udp}, protocol: UDP}}\n"
        )
    };
    Ok(format!(
        "{}{}{}---
apiVersion: v1
kind: Service
metadata: {{name: xdp-empty}}
spec:
  type: NodePort
  selector: {{app: nothing}}
  ports: [{{port: 80, nodePort: {EMPTY_TCP}, protocol: TCP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: xdp-empty-udp}}
spec:
  type: LoadBalancer
  selector: {{app: nothing}}
  ports: [{{port: 53, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{name: xdp-ranges}}
spec:
  type: LoadBalancer
  selector: {{app: xdp}}
  ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]
  loadBalancerSourceRanges: [203.0.113.0/24]
",
        e2e::netexec_pod(lab, "xdp", node)?,
        nodeport("xdp-snat", "", SNAT_TCP, SNAT_UDP),
        nodeport(
            "xdp-dsr",
            "\n  annotations: {service.riptide.io/lb-mode: dsr}",
            DSR_TCP,
            DSR_UDP
        ),
    ))
}
