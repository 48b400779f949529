//! Running netperf 2.7 and reading its omni output selectors.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns;

/// The netperf tests the benchmarks report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Test {
    #[serde(rename = "TCP_RR")]
    TcpRr,
    #[serde(rename = "TCP_CRR")]
    TcpCrr,
    #[serde(rename = "TCP_STREAM")]
    TcpStream,
    #[serde(rename = "UDP_RR")]
    UdpRr,
}

impl Test {
    pub const ALL: [Test; 4] = [Test::TcpRr, Test::TcpCrr, Test::TcpStream, Test::UdpRr];

    pub fn name(self) -> &'static str {
        match self {
            Test::TcpRr => "TCP_RR",
            Test::TcpCrr => "TCP_CRR",
            Test::TcpStream => "TCP_STREAM",
            Test::UdpRr => "UDP_RR",
        }
    }
    pub fn is_udp(self) -> bool {
        self == Test::UdpRr
    }
    /// What the throughput column means.
    pub fn unit(self) -> &'static str {
        match self {
            Test::TcpStream => "Mbit/s",
            _ => "trans/s",
        }
    }
}

/// One netperf result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measurement {
    pub throughput: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Local CPU microseconds per transaction (or per KB for streams).
    pub cpu_us_per_unit: f64,
    pub retransmits: f64,
}

pub const CONTROL_PORT: u16 = 12865;

/// TCP_CRR transactions per requested second (about this machine's rate).
const CRR_PER_SECOND: u64 = 4_000;

/// Transactions of a TCP_CRR measurement planned for `seconds`.
pub fn crr_transactions(seconds: u32) -> u64 {
    u64::from(seconds) * CRR_PER_SECOND
}

/// Where netperf connects: the control connection to `addr:control_port`,
/// the data connection to `addr:data_port` (netserver binds `data_port`,
/// so through a NodePort it is the NodePort's own number). Each measurement
/// gets its own data port, so TIME_WAIT and conntrack state of one never
/// meets another (REFERENCES.md).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub addr: Ipv4Addr,
    pub control_port: u16,
    pub data_port: u16,
    /// Source address of the data connection (`-- -L`), if not the default.
    pub local: Option<Ipv4Addr>,
}

/// Runs `netperf` in netns `ns` against `target`.
pub fn run(
    ns: &str,
    target: &Target,
    test: Test,
    seconds: u32,
    cpu: Option<usize>,
) -> Result<Measurement> {
    run_with(netns::command(ns, "netperf")?, target, test, seconds, cpu)
}

/// Like [`run`], with a prepared `netperf` command (netns, cgroup).
///
/// `cpu`: netperf and the netserver child serving it both bind to this CPU
/// (`-T cpu,cpu`). On the 2-vCPU VMs this runs on, a request/response
/// between two CPUs costs an inter-processor interrupt (a VM exit) per
/// wake-up: about 2.5× the latency of the same exchange on one CPU, so
/// where the scheduler happens to put the two processes decides the result
/// more than the data path does. One CPU takes that out.
pub fn run_with(
    mut cmd: std::process::Command,
    target: &Target,
    test: Test,
    seconds: u32,
    cpu: Option<usize>,
) -> Result<Measurement> {
    // TCP_CRR runs for a number of transactions instead of a time: a timed
    // CRR test ends only when netserver's own timer (test length + 4 s of
    // PAD_TIME) takes it out of accept(), 4 idle seconds per measurement.
    let length = match test {
        Test::TcpCrr => format!("-{}", crr_transactions(seconds)),
        _ => seconds.to_string(),
    };
    cmd.args([
        "-H",
        &target.addr.to_string(),
        "-p",
        &target.control_port.to_string(),
    ])
    .args(["-t", test.name(), "-l", &length, "-c"]);
    if let Some(c) = cpu {
        cmd.args(["-T", &format!("{c},{c}")]);
    }
    cmd.args(["--", "-P", &format!(",{}", target.data_port)]);
    if let Some(local) = target.local {
        cmd.args(["-L", &local.to_string()]);
    }
    let out = cmd
        .args([
            "-o",
            "THROUGHPUT,P50_LATENCY,P90_LATENCY,P99_LATENCY,LOCAL_SD,LOCAL_TRANSPORT_RETRANS",
        ])
        .output()
        .context("running netperf")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "netperf {} to {}:{}/{}: {}{}",
            test.name(),
            target.addr,
            target.control_port,
            target.data_port,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&stdout).with_context(|| format!("parsing netperf output: {stdout}"))
}

/// Parses the last line of `-o` CSV output.
pub fn parse(stdout: &str) -> Result<Measurement> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| {
            l.split(',').count() >= 6 && l.split(',').all(|f| f.trim().parse::<f64>().is_ok())
        })
        .context("no result line")?;
    let v: Vec<f64> = line
        .split(',')
        .filter_map(|f| f.trim().parse().ok())
        .collect();
    Ok(Measurement {
        throughput: v[0],
        p50_us: v[1],
        p90_us: v[2],
        p99_us: v[3],
        cpu_us_per_unit: v[4],
        retransmits: v[5],
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_omni_csv() {
        let out = "MIGRATED TCP REQUEST/RESPONSE TEST ...\nThroughput,50th Percentile Latency Microseconds,90th,99th,Local Service Demand,Local Transport Retransmissions\n56456.02,15,17,44,12.5,0\n";
        let m = super::parse(out).expect("parse");
        assert!((m.throughput - 56456.02).abs() < 1e-6);
        assert_eq!(
            (m.p50_us, m.p90_us, m.p99_us, m.retransmits),
            (15.0, 17.0, 44.0, 0.0)
        );
        assert!(super::parse("garbage\n").is_err());
    }
}
