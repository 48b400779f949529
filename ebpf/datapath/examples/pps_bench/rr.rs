//! `--netperf`: netperf TCP_RR and TCP_CRR from the outside namespace
//! through a NodePort on node 1 to a netserver in the pod on node 2, on
//! the wiring of `topo.rs`, for the same paths as the packets/s run
//! (`direct` is outside → the pod's address through node 1, its replies
//! straight from node 2). The control connection goes through a NodePort
//! to the netserver's port too (the DSR one for `riptide-xdp-dsr`), and
//! every measurement gets a data NodePort of its own (= its port on the
//! pod: netserver binds the data port netperf asks for), so no TIME_WAIT
//! or conntrack state of one meets another. netperf and netserver run on
//! one CPU (`-T`), paths interleaved round by round. Printed: one JSON
//! object per (path, test) with median transactions/s and P50/P99
//! latency, then the ratios to `riptide-tc`, `iptables` and `direct` of
//! the same run.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use riptide_test_support::{
    kubeproxy::{Proto, SvcPort},
    netns,
};

use crate::{
    Path, enter, json_num, median, node1, node2, riptide_service, rules,
    topo::{NODE1_IP, POD_IP, Topo},
};

const NETSERVER: u16 = 12865;
/// Control NodePorts (→ the netserver), SNAT and DSR.
const CONTROL: u16 = 31_000;
const CONTROL_DSR: u16 = 31_001;
/// Data NodePorts from here, one per measurement.
const DATA: u16 = 31_010;
const TESTS: [&str; 2] = ["TCP_RR", "TCP_CRR"];
/// TCP_CRR runs for a number of transactions (a timed CRR test waits for
/// netserver's own timer, `tests/src/bench/netperf.rs`).
const CRR_PER_SECOND: f64 = 4_000.0;

struct Netserver(Child);

impl Drop for Netserver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One Service port of the run: `port` on node 1 → the pod's `target`.
fn svc(name: String, port: u16, target: u16, k: usize, dsr: bool) -> SvcPort {
    SvcPort {
        name: format!("bench/rr-{}{name}:tcp", if dsr { "dsr-" } else { "" }),
        vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 200, 0)) + k as u32),
        proto: Proto::Tcp,
        port: target,
        node_port: Some(port),
        endpoints: vec![(POD_IP, target)],
    }
}

#[derive(Clone, Copy)]
struct Rr {
    trans_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn netperf(t: &Topo, path: Path, test: &str, port: u16, seconds: u32, cpu: usize) -> Result<Rr> {
    let (host, control) = match path {
        Path::Direct => (POD_IP, NETSERVER),
        Path::RiptideXdpDsr => (NODE1_IP, CONTROL_DSR),
        _ => (NODE1_IP, CONTROL),
    };
    let length = if test == "TCP_CRR" {
        format!("-{}", (f64::from(seconds) * CRR_PER_SECOND) as u64)
    } else {
        seconds.to_string()
    };
    let out = netns::command(t.outside.name(), "netperf")
        .args(["-H", &host.to_string(), "-p", &control.to_string()])
        .args(["-t", test, "-l", &length, "-T", &format!("{cpu},{cpu}")])
        .args(["--", "-P", &format!(",{port}")])
        .args(["-o", "THROUGHPUT,P50_LATENCY,P99_LATENCY"])
        .output()
        .context("running netperf")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "netperf {test} via {host}:{control}/{port}: {}{}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Vec<f64> = stdout
        .lines()
        .rev()
        .find(|l| {
            l.split(',').count() == 3 && l.split(',').all(|f| f.trim().parse::<f64>().is_ok())
        })
        .with_context(|| format!("no result line in {stdout}"))?
        .split(',')
        .filter_map(|f| f.trim().parse().ok())
        .collect();
    Ok(Rr {
        trans_s: v[0],
        p50_us: v[1],
        p99_us: v[2],
    })
}

pub fn run(t: &Topo, rounds: u32, seconds: u32, cpu: usize) -> Result<()> {
    let (n1, n2) = (t.node1.name().to_owned(), t.node2.name().to_owned());
    // Every Service of the run up front: the controls, then a data port
    // per (round, path, test); the DSR path's in DSR mode.
    let mut list = vec![
        svc("control".into(), CONTROL, NETSERVER, 0, false),
        svc("control".into(), CONTROL_DSR, NETSERVER, 1, true),
    ];
    let port = |round: u32, p: usize, k: usize| {
        DATA + (round as usize * Path::ALL.len() * TESTS.len() + p * TESTS.len() + k) as u16
    };
    for round in 0..rounds {
        for (p, path) in Path::ALL.iter().enumerate() {
            for k in 0..TESTS.len() {
                let port = port(round, p, k);
                list.push(svc(
                    port.to_string(),
                    port,
                    port,
                    list.len(),
                    *path == Path::RiptideXdpDsr,
                ));
            }
        }
    }
    let mut rt = Some(netns::run_in(&n1, node1::Riptide::load)?);
    let mut rt2 = Some(node2::Riptide::load(&n2)?);
    if let Some(r) = rt.as_mut() {
        for s in &list {
            r.svcs.upsert(&riptide_service(s))?;
        }
    }
    let _netserver = Netserver(
        netns::command(t.pod.name(), "netserver")
            .args(["-D", "-4", "-p", &NETSERVER.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting netserver in the pod")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let load_before = crate::traffic::loadavg();
    let started = std::time::Instant::now();
    let mut results: Vec<(Path, &str, Vec<Rr>)> = Vec::new();
    for round in 0..rounds {
        let mut order: Vec<(usize, Path)> = Path::ALL.iter().copied().enumerate().collect();
        order.rotate_left(round as usize % Path::ALL.len());
        for (p, path) in order {
            let _peer = enter(t, (super::Mode::Path, path), &mut rt, &mut rt2, &list)?;
            for (k, test) in TESTS.iter().enumerate() {
                let m = netperf(t, path, test, port(round, p, k), seconds, cpu)
                    .with_context(|| format!("{} {test}", path.name()));
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        rules(&n1, None, &[])?;
                        eprintln!("{}", t.counters());
                        return Err(e);
                    }
                };
                eprintln!(
                    "[{:>4.0}s] round {} {:<16} {test:<8} {:>8.0} trans/s p50 {:>5.0} µs p99 {:>5.0} µs, load {:.2}",
                    started.elapsed().as_secs_f64(),
                    round + 1,
                    path.name(),
                    m.trans_s,
                    m.p50_us,
                    m.p99_us,
                    crate::traffic::loadavg()
                );
                match results
                    .iter_mut()
                    .find(|(q, n, _)| *q == path && *n == *test)
                {
                    Some((_, _, v)) => v.push(m),
                    None => results.push((path, test, vec![m])),
                }
            }
            rules(&n1, None, &[])?;
        }
    }
    if let Some(r) = rt.take() {
        drop(r.set(&n1, false, false)?);
    }
    if let Some(r) = rt2.take() {
        drop(r.set(&n2, false)?);
    }
    let med = |path: Path, test: &str, f: fn(&Rr) -> f64| -> f64 {
        results
            .iter()
            .find(|(q, n, _)| *q == path && *n == test)
            .map_or(f64::NAN, |(_, _, v)| median(v.iter().map(f).collect()))
    };
    for (path, test, v) in &results {
        println!(
            "{{\"path\":\"{}\",\"test\":\"{test}\",\"rounds\":{},\"trans_s_median\":{},\"p50_us_median\":{},\"p99_us_median\":{}}}",
            path.name(),
            v.len(),
            json_num(med(*path, test, |m| m.trans_s)),
            json_num(med(*path, test, |m| m.p50_us)),
            json_num(med(*path, test, |m| m.p99_us)),
        );
    }
    let mut ratios = String::new();
    for test in TESTS {
        for base in [Path::RiptideTc, Path::Iptables, Path::Direct] {
            let b = med(base, test, |m| m.trans_s);
            for path in Path::ALL {
                if path == base {
                    continue;
                }
                let _ = write!(
                    ratios,
                    "{}\"{}/{}@{test}\":{}",
                    if ratios.is_empty() { "" } else { "," },
                    path.name(),
                    base.name(),
                    json_num(med(path, test, |m| m.trans_s) / b)
                );
            }
        }
    }
    println!(
        "{{\"summary\":\"netperf\",\"ratios\":{{{ratios}}},\"seconds\":{seconds},\"rounds\":{rounds},\"cpu\":{cpu},\"loadavg_before\":{},\"loadavg_after\":{},\"elapsed_s\":{:.0}}}",
        json_num(load_before),
        json_num(crate::traffic::loadavg()),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
