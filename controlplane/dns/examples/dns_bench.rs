//! DNS micro benchmark for `cargo xtask bench`: riptide-dns next to dnsmasq
//! (kube-dns's front end) serving the same names from a hosts file, each
//! pinned to CPU 1 with dnsperf on CPU 0, all on loopback.
//!
//! A release apiserver gets 10,000 ClusterIP Services with 5 ready
//! endpoints each (1,000 with `--quick`); riptide-dns watches it. Per
//! server: dnsperf at full speed for the queries/s (three rounds, the
//! servers' order reversed every other round, the median kept), then a run
//! paced at 10,000 queries/s for the latency distribution (p50/p99 of every
//! query, from dnsperf -v). Also riptide-dns's RSS, its time to ready, and
//! Service created → answerable latency. One JSON document on stdout.
//!
//! `--baseline PATH` measures another riptide-dns build the same way in
//! the same run (before/after a change).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, stream};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, api::PostParams};
use riptide_test_support::procfs;
use serde_json::json;

const DNS_CPU: &str = "1";
const LOAD_CPU: &str = "0";
const PACED_QPS: &str = "10000";

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn release_bin(name: &str) -> Result<PathBuf> {
    // target/release/examples/dns_bench → target/release/<name>
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("locating target/release")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} missing: cargo build --release -p riptide-dns -p riptide-controlplane --bins", p.display());
    }
    Ok(p)
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// VmRSS and VmHWM of `pid` in KiB (both 0 when unreadable).
fn rss_kib(pid: u32) -> (u64, u64) {
    let [rss, hwm] = procfs::status_kib(pid, ["VmRSS", "VmHWM"]).unwrap_or_default();
    (rss, hwm)
}

/// CPU time (user + system, all threads) of process `pid` so far, in
/// seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command: state is the 3rd field,
    // utime and stime the 14th and 15th; clock ticks are 1/100 s on Linux.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// dnsperf at full speed: queries/s, lost, completed, and the server's CPU
/// time per query. The machine may be shared: queries per CPU second of
/// the server (its queries/s on a core of its own) does not depend on how
/// much of the core it got.
fn throughput(server: SocketAddr, pid: u32, queries: &Path, secs: u64) -> Result<serde_json::Value> {
    let cpu0 = cpu_s(pid);
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "dnsperf", "-s", &server.ip().to_string(), "-p", &server.port().to_string(), "-d"])
        .arg(queries)
        .args(["-l", &secs.to_string()])
        .output()
        .context("running dnsperf (Debian package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let num = |k: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let noerror = text.lines().find_map(|l| l.trim().strip_prefix("Response codes:")).unwrap_or("").trim().to_owned();
    let cpu = cpu_s(pid) - cpu0;
    Ok(json!({
        "server_cpu_s": round3(cpu),
        "queries_per_cpu_s": (num("Queries completed:") / cpu).round(),
        "qps": num("Queries per second:").round(),
        "completed": num("Queries completed:"),
        "lost": num("Queries lost:"),
        "response_codes": noerror,
        "avg_latency_ms": round3(num("Average Latency (s):") * 1000.0),
    }))
}

/// dnsperf paced at PACED_QPS with per-query latencies: p50/p99/max in ms.
fn latency(server: SocketAddr, queries: &Path, secs: u64) -> Result<serde_json::Value> {
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "dnsperf", "-s", &server.ip().to_string(), "-p", &server.port().to_string(), "-d"])
        .arg(queries)
        .args(["-l", &secs.to_string(), "-Q", PACED_QPS, "-v"])
        .output()
        .context("running dnsperf -v")?;
    // "> NOERROR name A 0.000123"
    let mut ms: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| round3(ms.get(((ms.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN));
    Ok(json!({ "qps": PACED_QPS.parse::<u32>()?, "samples": ms.len(), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0) }))
}

/// A riptide-dns process, pinned to DNS_CPU, watching the bench's apiserver.
struct Riptide {
    _proc: Proc,
    pid: u32,
    addr: SocketAddr,
    ready_s: f64,
    rss_ready: (u64, u64),
}

impl Riptide {
    async fn start(bin: &Path, ip: &str, kubeconfig: &Path, dir: &Path) -> Result<Self> {
        let addr: SocketAddr = (ip.parse::<std::net::IpAddr>()?, free_port(ip)).into();
        let metrics: SocketAddr = (ip.parse::<std::net::IpAddr>()?, free_port(ip)).into();
        let log = dir.join(format!("riptide-dns-{ip}.log"));
        let t = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", DNS_CPU])
            .arg(bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--listen", &addr.to_string(), "--metrics", &metrics.to_string(), "--resolv-conf", "/dev/null"])
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let proc = Proc(child);
        while !http_ok(metrics, "/ready") {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("riptide-dns not ready after 120 s: {}", std::fs::read_to_string(&log)?);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { _proc: proc, pid, addr, ready_s: t.elapsed().as_secs_f64(), rss_ready: rss_kib(pid) })
    }
}

/// The 1-minute load average: how busy the (possibly shared) machine was.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(f64::NAN)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn resolves(server: SocketAddr, name: &str) -> bool {
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let _ = s.send_to(&q.to_vec().unwrap(), server);
    let mut buf = [0u8; 1500];
    let Ok(n) = s.recv(&mut buf) else { return false };
    Message::from_vec(&buf[..n]).is_ok_and(|m| !m.answers.is_empty())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // A second riptide-dns binary measured in the same run (before/after).
    let baseline = args.iter().position(|a| a == "--baseline").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let (services, secs, paced_secs, rounds) = if quick { (1_000usize, 3u64, 2u64, 1usize) } else { (10_000, 10, 5, 3) };
    let endpoints_per = 5usize;
    let dir = tempfile::tempdir()?;
    let load_at_start = load_average();

    // The apiserver (release), kubeconfig from its stdout.
    let mut api = Command::new(release_bin("riptide-controlplane")?)
        .args(["apiserver", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("cp"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("apiserver.log"))?)
        .spawn()
        .context("starting the apiserver")?;
    let stdout = api.stdout.take().context("apiserver stdout")?;
    let _api = Proc(api);
    let mut kubeconfig = None;
    for line in BufReader::new(stdout).lines() {
        if let Some(p) = line?.strip_prefix("kubeconfig ") {
            kubeconfig = Some(PathBuf::from(p));
            break;
        }
    }
    let Some(kubeconfig) = kubeconfig else {
        bail!("the apiserver did not start:\n{}", std::fs::read_to_string(dir.path().join("apiserver.log")).unwrap_or_default());
    };
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let client = kube::Client::try_from(kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?)?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");

    eprintln!("dns bench: creating {services} Services with {endpoints_per} endpoints each");
    let t = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..services)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}")},
                    "spec": {"ports": [{"name": "http", "port": 80}]},
                }))?;
                svcs.create(&PostParams::default(), &svc).await?;
                let eps: Vec<_> = (0..endpoints_per)
                    .map(|e| json!({"addresses": [format!("10.42.{}.{}", (i * endpoints_per + e) / 250, (i * endpoints_per + e) % 250 + 1)], "conditions": {"ready": true}}))
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("s{i}-1"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080}],
                    "endpoints": eps,
                }))?;
                slices.create(&PostParams::default(), &slice).await?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let created_s = t.elapsed().as_secs_f64();
    let list = svcs.list(&Default::default()).await?;
    let mut hosts = String::new();
    let mut queries = String::new();
    for s in &list.items {
        let (Some(name), Some(ip)) = (s.metadata.name.as_deref(), s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref())) else { continue };
        if name.starts_with('s') {
            hosts.push_str(&format!("{ip} {name}.default.svc.cluster.local\n"));
            queries.push_str(&format!("{name}.default.svc.cluster.local A\n"));
        }
    }
    let (hosts_file, queries_file) = (dir.path().join("hosts"), dir.path().join("queries"));
    std::fs::write(&hosts_file, hosts)?;
    std::fs::write(&queries_file, queries)?;

    // riptide-dns (and the baseline build, if any), pinned.
    let (rip_ip, mas_ip, base_ip) = ("127.0.0.77", "127.0.0.78", "127.0.0.79");
    let rip = Riptide::start(&release_bin("riptide-dns")?, rip_ip, &kubeconfig, dir.path()).await?;
    let base = match &baseline {
        Some(bin) => Some(Riptide::start(bin, base_ip, &kubeconfig, dir.path()).await?),
        None => None,
    };

    // dnsmasq with the same names, pinned the same way.
    let mas_port = free_port(mas_ip);
    let mas = Command::new("taskset")
        .args(["-c", DNS_CPU, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces", "--pid-file=", "--user=root"])
        .arg(format!("--addn-hosts={}", hosts_file.display()))
        .arg(format!("--listen-address={mas_ip}"))
        .arg(format!("--port={mas_port}"))
        // Authoritative for the zone: unknown names are NXDOMAIN, not forwarded.
        .arg("--local=/cluster.local/")
        .stderr(Stdio::null())
        .spawn()
        .context("starting dnsmasq (Debian package dnsmasq-base)")?;
    let mas_pid = mas.id();
    let _mas = Proc(mas);
    let mas_addr: SocketAddr = (mas_ip.parse::<std::net::IpAddr>()?, mas_port).into();
    let t = Instant::now();
    while !resolves(mas_addr, "s0.default.svc.cluster.local.") {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("dnsmasq does not answer");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in std::iter::once(&rip).chain(&base) {
        if !resolves(r.addr, "s0.default.svc.cluster.local.") {
            bail!("riptide-dns at {} does not answer s0", r.addr);
        }
    }

    // Throughput in rounds, the servers' order reversed every other round
    // so drift in the machine's load hits them alike; each server's median
    // round is its result.
    let mut servers: Vec<(SocketAddr, u32)> = vec![(rip.addr, rip.pid), (mas_addr, mas_pid)];
    servers.extend(base.as_ref().map(|b| (b.addr, b.pid)));
    eprintln!("dns bench: {rounds} rounds of dnsperf {secs} s per server, then {paced_secs} s paced");
    let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); servers.len()];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 { (0..servers.len()).collect() } else { (0..servers.len()).rev().collect() };
        for i in order {
            runs[i].push(throughput(servers[i].0, servers[i].1, &queries_file, secs)?);
        }
    }
    let median = |runs: &[serde_json::Value]| -> serde_json::Value {
        let mut v = runs.to_vec();
        v.sort_by(|a, b| a["qps"].as_f64().unwrap_or(0.0).total_cmp(&b["qps"].as_f64().unwrap_or(0.0)));
        let mut m = v[v.len() / 2].clone();
        m["qps_rounds"] = runs.iter().map(|r| r["qps"].clone()).collect();
        let mut per_cpu: Vec<f64> = runs.iter().map(|r| r["queries_per_cpu_s"].as_f64().unwrap_or(f64::NAN)).collect();
        per_cpu.sort_by(f64::total_cmp);
        m["queries_per_cpu_s_rounds"] = runs.iter().map(|r| r["queries_per_cpu_s"].clone()).collect();
        m["queries_per_cpu_s_median"] = json!(per_cpu[per_cpu.len() / 2]);
        m
    };
    let tp: Vec<serde_json::Value> = runs.iter().map(|r| median(r)).collect();
    let lat: Vec<serde_json::Value> = servers.iter().map(|s| latency(s.0, &queries_file, paced_secs)).collect::<Result<_>>()?;
    let rss_load = rss_kib(rip.pid);

    // Service created → answerable (the create call included).
    let mut change_ms = Vec::new();
    for i in 0..20 {
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": format!("new{i}")}, "spec": {"ports": [{"port": 80}]}}))?;
        let t = Instant::now();
        svcs.create(&PostParams::default(), &svc).await?;
        let name = format!("new{i}.default.svc.cluster.local.");
        while !resolves(rip.addr, &name) {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("{name} not answerable after 5 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        change_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    change_ms.sort_by(f64::total_cmp);

    let qps = |v: &serde_json::Value| v["qps"].as_f64().unwrap_or(f64::NAN);
    let per_cpu = |v: &serde_json::Value| v["queries_per_cpu_s_median"].as_f64().unwrap_or(f64::NAN);
    let mut doc = json!({
        "services": services,
        "endpoints": services * endpoints_per,
        "created_in_s": round3(created_s),
        "cpu": {"server": DNS_CPU, "dnsperf": LOAD_CPU},
        "run_s": secs,
        "rounds": rounds,
        "load_average_1m": {"start": load_at_start, "end": load_average()},
        "riptide_dns": {
            "ready_after_start_s": round3(rip.ready_s),
            "rss_kib_ready": rip.rss_ready.0,
            "rss_kib_after_load": rss_load.0,
            "rss_kib_peak": rss_load.1,
            "throughput": tp[0],
            "latency_paced": lat[0],
            "service_created_to_answerable_ms": {"samples": change_ms.len(), "p50": round3(change_ms[change_ms.len() / 2]), "max": round3(change_ms[change_ms.len() - 1])},
        },
        "dnsmasq": {"throughput": tp[1], "latency_paced": lat[1]},
        "qps_ratio_riptide_to_dnsmasq": round3(qps(&tp[0]) / qps(&tp[1])),
        "per_cpu_ratio_riptide_to_dnsmasq": round3(per_cpu(&tp[0]) / per_cpu(&tp[1])),
    });
    if let (Some(bin), Some(b)) = (&baseline, &base) {
        doc["baseline"] = json!({
            "binary": bin.display().to_string(),
            "rss_kib_after_load": rss_kib(b.pid).0,
            "throughput": tp[2],
            "latency_paced": lat[2],
            "qps_ratio_to_dnsmasq": round3(qps(&tp[2]) / qps(&tp[1])),
            "per_cpu_ratio_to_dnsmasq": round3(per_cpu(&tp[2]) / per_cpu(&tp[1])),
        });
    }
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
