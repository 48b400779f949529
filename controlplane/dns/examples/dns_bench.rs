//! DNS micro benchmark for `cargo xtask bench`: riptide-dns next to dnsmasq
//! (kube-dns's front end) serving the same names from a hosts file, each
//! pinned to CPU 1 with dnsperf on CPU 0, all on loopback.
//!
//! A release apiserver gets 10,000 ClusterIP Services with 5 ready
//! endpoints each (1,000 with `--quick`); riptide-dns watches it. Per
//! server: a dnsperf run at full speed for the queries/s, then a run paced
//! at 10,000 queries/s for the latency distribution (p50/p99 of every
//! query, from dnsperf -v). Also riptide-dns's RSS, its time to ready, and
//! Service created → answerable latency. One JSON document on stdout.
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

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// dnsperf at full speed: queries/s, lost, completed.
fn throughput(ip: &str, port: u16, queries: &Path, secs: u64) -> Result<serde_json::Value> {
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "dnsperf", "-s", ip, "-p", &port.to_string(), "-d"])
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
    Ok(json!({
        "qps": num("Queries per second:").round(),
        "completed": num("Queries completed:"),
        "lost": num("Queries lost:"),
        "response_codes": noerror,
        "avg_latency_ms": round3(num("Average Latency (s):") * 1000.0),
    }))
}

/// dnsperf paced at PACED_QPS with per-query latencies: p50/p99/max in ms.
fn latency(ip: &str, port: u16, queries: &Path, secs: u64) -> Result<serde_json::Value> {
    let out = Command::new("taskset")
        .args(["-c", LOAD_CPU, "dnsperf", "-s", ip, "-p", &port.to_string(), "-d"])
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
    let quick = std::env::args().any(|a| a == "--quick");
    let (services, secs, paced_secs) = if quick { (1_000usize, 3u64, 2u64) } else { (10_000, 10, 5) };
    let endpoints_per = 5usize;
    let dir = tempfile::tempdir()?;

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

    // riptide-dns, pinned.
    let (rip_ip, mas_ip) = ("127.0.0.77", "127.0.0.78");
    let rip_port = free_port(rip_ip);
    let metrics: SocketAddr = (rip_ip.parse::<std::net::IpAddr>()?, free_port(rip_ip)).into();
    let rip_addr: SocketAddr = (rip_ip.parse::<std::net::IpAddr>()?, rip_port).into();
    let t = Instant::now();
    let rip = Command::new("taskset")
        .args(["-c", DNS_CPU])
        .arg(release_bin("riptide-dns")?)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--listen", &rip_addr.to_string(), "--metrics", &metrics.to_string(), "--resolv-conf", "/dev/null"])
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.path().join("riptide-dns.log"))?)
        .spawn()
        .context("starting riptide-dns")?;
    let rip_pid = rip.id();
    let _rip = Proc(rip);
    while !http_ok(metrics, "/ready") {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("riptide-dns not ready after 120 s: {}", std::fs::read_to_string(dir.path().join("riptide-dns.log"))?);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_s = t.elapsed().as_secs_f64();
    let rss_ready = rss_kib(rip_pid);

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
    let _mas = Proc(mas);
    let mas_addr: SocketAddr = (mas_ip.parse::<std::net::IpAddr>()?, mas_port).into();
    let t = Instant::now();
    while !resolves(mas_addr, "s0.default.svc.cluster.local.") {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("dnsmasq does not answer");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !resolves(rip_addr, "s0.default.svc.cluster.local.") {
        bail!("riptide-dns does not answer s0");
    }

    eprintln!("dns bench: dnsperf {secs} s + {paced_secs} s paced, per server");
    let rip_tp = throughput(rip_ip, rip_port, &queries_file, secs)?;
    let mas_tp = throughput(mas_ip, mas_port, &queries_file, secs)?;
    let rip_lat = latency(rip_ip, rip_port, &queries_file, paced_secs)?;
    let mas_lat = latency(mas_ip, mas_port, &queries_file, paced_secs)?;
    let rss_load = rss_kib(rip_pid);

    // Service created → answerable (the create call included).
    let mut change_ms = Vec::new();
    for i in 0..20 {
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": format!("new{i}")}, "spec": {"ports": [{"port": 80}]}}))?;
        let t = Instant::now();
        svcs.create(&PostParams::default(), &svc).await?;
        let name = format!("new{i}.default.svc.cluster.local.");
        while !resolves(rip_addr, &name) {
            if t.elapsed() > Duration::from_secs(5) {
                bail!("{name} not answerable after 5 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        change_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    change_ms.sort_by(f64::total_cmp);

    let ratio = rip_tp["qps"].as_f64().unwrap_or(f64::NAN) / mas_tp["qps"].as_f64().unwrap_or(f64::NAN);
    let doc = json!({
        "services": services,
        "endpoints": services * endpoints_per,
        "created_in_s": round3(created_s),
        "cpu": {"server": DNS_CPU, "dnsperf": LOAD_CPU},
        "run_s": secs,
        "riptide_dns": {
            "ready_after_start_s": round3(ready_s),
            "rss_kib_ready": rss_ready.0,
            "rss_kib_after_load": rss_load.0,
            "rss_kib_peak": rss_load.1,
            "throughput": rip_tp,
            "latency_paced": rip_lat,
            "service_created_to_answerable_ms": {"samples": change_ms.len(), "p50": round3(change_ms[change_ms.len() / 2]), "max": round3(change_ms[change_ms.len() - 1])},
        },
        "dnsmasq": {"throughput": mas_tp, "latency_paced": mas_lat},
        "qps_ratio_riptide_to_dnsmasq": round3(ratio),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
