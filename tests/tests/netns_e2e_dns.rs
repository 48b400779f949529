//! Privileged end-to-end suite for cluster DNS on a real 3-node lab:
//! `manifests/riptide-dns.yaml` deployed through the apiserver (2 replicas
//! behind `kube-system/kube-dns` at 10.43.0.10, reached through riptide's
//! Service load balancing), queried from pods. `getent` resolves through
//! the pod's own `/etc/resolv.conf` (search path, ndots:5) as any libc
//! program does; `dig @10.43.0.10` asks for exact records (SRV, CNAME,
//! NXDOMAIN versus NODATA).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_test_support::privileged;
use riptide_tests::{
    e2e::{self, Suite, eventually},
    lab::{CLUSTER_DNS, Lab, LabConfig},
};

const SETTLE: Duration = Duration::from_secs(60);
const ZONE: &str = "cluster.local";

/// `dig` from `pod`'s network namespace and cgroup (so the node's socket LB
/// translates 10.43.0.10), straight to the cluster DNS Service.
fn dig(lab: &Lab, pod: &str, args: &[&str]) -> Result<String> {
    let out = e2e::pod_command(lab, pod, "dig")?
        .arg(format!("@{CLUSTER_DNS}"))
        .args(["+time=1", "+tries=2"])
        .args(args)
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "dig {}: exit {:?}: {text}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// `dig +short` as a sorted set of lines.
fn dig_short(lab: &Lab, pod: &str, args: &[&str]) -> Result<BTreeSet<String>> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    Ok(dig(lab, pod, &a)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The header status of a full `dig` answer (`NOERROR`, `NXDOMAIN`, …) and
/// its answer count.
fn dig_status(lab: &Lab, pod: &str, args: &[&str]) -> Result<(String, u32, String)> {
    let out = dig(lab, pod, args)?;
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .with_context(|| format!("no status in {out}"))?
        .to_owned();
    let answers = out
        .split("ANSWER: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no answer count in {out}"))?;
    Ok((status, answers, out))
}

/// Addresses `getaddrinfo` gives inside `pod` (`kubectl exec`, so through
/// the pod's own /etc/resolv.conf and /etc/hosts).
fn getent(lab: &Lab, pod: &str, ns: &str, name: &str) -> Result<BTreeSet<String>> {
    let out = e2e::kubectl(
        lab,
        &["exec", "-n", ns, pod, "--", "getent", "ahostsv4", name],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn one(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(",")
}

/// The ready `app=demo` pods' addresses.
fn demo_ips(lab: &Lab) -> Result<BTreeSet<String>> {
    Ok(e2e::pods(lab, "app=demo")?
        .into_iter()
        .filter(|p| p.ready)
        .map(|p| p.ip.to_string())
        .collect())
}

/// What cluster DNS looks like, for a failing check.
fn dns_diagnostics(lab: &Lab) -> String {
    let run = |args: &[&str]| match lab.kubectl().args(args).output() {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("kubectl: {e}"),
    };
    format!(
        "--- kube-system pods, endpoints\n{}{}--- riptide-dns logs\n{}",
        run(&["get", "pods", "-n", "kube-system", "-o", "wide"]),
        run(&["get", "endpointslices", "-n", "kube-system", "-o", "wide"]),
        run(&[
            "logs",
            "-n",
            "kube-system",
            "-l",
            "k8s-app=kube-dns",
            "--tail=30",
            "--prefix"
        ]),
    )
}

/// `f`, with the DNS add-on's state appended to its error.
fn with_dns<T>(lab: &Lab, f: impl FnOnce() -> Result<T>) -> Result<T> {
    f().map_err(|e| e.context(dns_diagnostics(lab)))
}

#[test]
fn netns_e2e_cluster_dns_from_pods() {
    if !privileged("for network namespaces, mounts and eBPF") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(3).expect("config")).expect("lab up");
    lab.start_cluster(Duration::from_secs(120))
        .expect("cluster");
    if let Err(e) = lab.deploy_dns(Duration::from_secs(120)) {
        panic!("deploying cluster DNS: {e:#}\n{}", dns_diagnostics(&lab));
    }
    lab.deploy_demo().expect("demo");
    let client = eventually(SETTLE, || {
        let p = e2e::pods(&lab, "app=demo")?;
        ensure!(
            p.len() == 3 && p.iter().all(|p| p.ready),
            "demo pods: {p:?}"
        );
        Ok(p[0].name.clone())
    })
    .expect("demo pods ready");
    let mut s = Suite::new(&mut lab);

    s.check(
        "a pod's /etc/resolv.conf names the cluster DNS with the namespace's search path",
        |lab| {
            let rc = e2e::pod_exec(lab, &client, &["cat", "/etc/resolv.conf"])?;
            let search = format!("search default.svc.{ZONE} svc.{ZONE} {ZONE}");
            ensure!(
                rc.lines().any(|l| l.starts_with(&search))
                    && rc.contains(&format!("nameserver {CLUSTER_DNS}\n"))
                    && rc.contains("options ndots:5"),
                "{rc}"
            );
            Ok(())
        },
    );

    s.check(
        "getaddrinfo of demo, demo.default, demo.default.svc and the FQDN give the ClusterIP",
        |lab| {
            with_dns(lab, || {
                let cip = e2e::cluster_ip(lab, "demo")?.to_string();
                for name in [
                    "demo",
                    "demo.default",
                    "demo.default.svc",
                    &format!("demo.default.svc.{ZONE}"),
                    &format!("demo.default.svc.{ZONE}."),
                ] {
                    let got = eventually(SETTLE, || getent(lab, &client, "default", name))?;
                    ensure!(
                        got == BTreeSet::from([cip.clone()]),
                        "getent ahostsv4 {name}: {} (ClusterIP {cip})",
                        one(&got)
                    );
                    eprintln!("     {name} → {cip}");
                }
                // The README's example.
            let out = e2e::kubectl(lab, &["exec", "deploy/demo", "--", "getent", "hosts", "demo"])?;
            ensure!(out.starts_with(&format!("{cip} ")), "kubectl exec deploy/demo -- getent hosts demo: {out}");
            // Over TCP too.
                let tcp = dig_short(lab, &client, &["+tcp", &format!("demo.default.svc.{ZONE}")])?;
                ensure!(
                    tcp == BTreeSet::from([cip.clone()]),
                    "dig +tcp: {}",
                    one(&tcp)
                );
                Ok(())
            })
        },
    );

    s.check(
        "another namespace resolves demo.default but not the short name demo",
        |lab| {
            with_dns(lab, || {
                e2e::kubectl(lab, &["create", "namespace", "dns-other"])?;
                e2e::kubectl(
                    lab,
                    &[
                        "run",
                        "-n",
                        "dns-other",
                        "client",
                        "--image=busybox",
                        "--restart=Never",
                        "--command",
                        "--",
                        "sleep",
                        "3600",
                    ],
                )?;
                eventually(SETTLE, || {
                    let v = e2e::kubectl_json(lab, &["get", "pod", "-n", "dns-other", "client"])?;
                    ensure!(v["status"]["phase"] == "Running", "client: {}", v["status"]);
                    Ok(())
                })?;
                let cip = e2e::cluster_ip(lab, "demo")?.to_string();
                let got = eventually(SETTLE, || {
                    getent(lab, "client", "dns-other", "demo.default")
                })?;
                ensure!(
                    got == BTreeSet::from([cip.clone()]),
                    "demo.default from dns-other: {}",
                    one(&got)
                );
                match getent(lab, "client", "dns-other", "demo") {
                    Err(e) if format!("{e:#}").contains("exit code 2") => Ok(()),
                    other => bail!(
                        "short name demo from namespace dns-other must not resolve: {other:?}"
                    ),
                }
            })
        },
    );

    s.check("a headless Service's A set follows scale down and up", |lab| {
        with_dns(lab, || {
            let yaml = lab.config().state_dir.join("dns-headless.yaml");
            std::fs::write(
                &yaml,
                "apiVersion: v1\nkind: Service\nmetadata: {name: demo-headless}\nspec:\n  clusterIP: None\n  selector: {app: demo}\n  ports: [{name: http, port: 80, targetPort: http}]\n",
            )?;
            e2e::kubectl(lab, &["apply", "-f", yaml.to_str().context("path")?])?;
            let fqdn = format!("demo-headless.default.svc.{ZONE}");
            for replicas in [3, 2, 3] {
                e2e::kubectl(lab, &["scale", "deployment", "demo", &format!("--replicas={replicas}")])?;
                let (want, got) = eventually(SETTLE, || {
                    let want = demo_ips(lab)?;
                    ensure!(want.len() == replicas, "{} ready demo pods, want {replicas}", want.len());
                    let got = dig_short(lab, &client_of(lab)?, &["A", &fqdn])?;
                    ensure!(got == want, "A {fqdn}: {} (ready pods {})", one(&got), one(&want));
                    Ok((want, got))
                })?;
                eprintln!("     {replicas} replicas: {fqdn} → {}", one(&got));
                // getaddrinfo through the search path sees the same set.
                let via_libc = eventually(SETTLE, || {
                    let g = getent(lab, &client_of(lab)?, "default", "demo-headless")?;
                    ensure!(g == want, "getent demo-headless: {} (want {})", one(&g), one(&want));
                    Ok(g)
                })?;
                ensure!(via_libc == want);
            }
            Ok(())
        })
    });

    s.check(
        "SRV for named ports: the Service name for a ClusterIP, one per endpoint for headless",
        |lab| {
            with_dns(lab, || {
                let c = client_of(lab)?;
                let srv = dig_short(
                    lab,
                    &c,
                    &["SRV", &format!("_http._tcp.demo.default.svc.{ZONE}")],
                )?;
                ensure!(srv.len() == 1, "SRV _http._tcp.demo: {srv:?}");
                let rec: Vec<&str> = srv
                    .iter()
                    .next()
                    .map(|r| r.split_whitespace().collect())
                    .unwrap_or_default();
                ensure!(
                    rec.len() == 4
                        && rec[2] == "80"
                        && rec[3] == format!("demo.default.svc.{ZONE}."),
                    "SRV _http._tcp.demo: {srv:?}"
                );
                let udp = dig_short(
                    lab,
                    &c,
                    &["SRV", &format!("_udp._udp.demo.default.svc.{ZONE}")],
                )?;
                ensure!(
                    udp.iter()
                        .any(|r| r.split_whitespace().nth(2) == Some("81")),
                    "SRV _udp._udp.demo: {udp:?}"
                );
                let headless = dig_short(
                    lab,
                    &c,
                    &[
                        "SRV",
                        &format!("_http._tcp.demo-headless.default.svc.{ZONE}"),
                    ],
                )?;
                let pods = demo_ips(lab)?;
                ensure!(
                    headless.len() == pods.len()
                        && headless
                            .iter()
                            .all(|r| r.split_whitespace().nth(2) == Some("8080")
                                && r.ends_with(&format!(".demo-headless.default.svc.{ZONE}."))),
                    "SRV _http._tcp.demo-headless: {headless:?} ({} ready pods)",
                    pods.len()
                );
                eprintln!("     {} | {}", one(&srv), one(&headless));
                Ok(())
            })
        },
    );

    s.check("an ExternalName Service is a CNAME", |lab| {
        with_dns(lab, || {
            e2e::kubectl(
                lab,
                &[
                    "create",
                    "service",
                    "externalname",
                    "ext",
                    "--external-name=www.example.com",
                ],
            )?;
            let got = eventually(SETTLE, || {
                let g = dig_short(
                    lab,
                    &client_of(lab)?,
                    &["CNAME", &format!("ext.default.svc.{ZONE}")],
                )?;
                ensure!(
                    g == BTreeSet::from(["www.example.com.".to_owned()]),
                    "CNAME ext: {g:?}"
                );
                Ok(g)
            })?;
            eprintln!("     ext → {}", one(&got));
            Ok(())
        })
    });

    s.check("pod A records a-b-c-d.<ns>.pod.<zone>", |lab| {
        with_dns(lab, || {
            let c = client_of(lab)?;
            for ip in demo_ips(lab)? {
                let name = format!("{}.default.pod.{ZONE}", ip.replace('.', "-"));
                let got = dig_short(lab, &c, &["A", &name])?;
                ensure!(got == BTreeSet::from([ip.clone()]), "A {name}: {got:?}");
            }
            Ok(())
        })
    });

    s.check(
        "missing names are NXDOMAIN, existing names without the type are NODATA",
        |lab| {
            with_dns(lab, || {
                let c = client_of(lab)?;
                let (status, n, out) =
                    dig_status(lab, &c, &["A", &format!("nosuch.default.svc.{ZONE}")])?;
                ensure!(
                    status == "NXDOMAIN" && n == 0 && out.contains("SOA"),
                    "nosuch: {out}"
                );
                let (status, n, out) =
                    dig_status(lab, &c, &["AAAA", &format!("demo.default.svc.{ZONE}")])?;
                ensure!(
                    status == "NOERROR" && n == 0 && out.contains("SOA"),
                    "AAAA demo (NODATA): {out}"
                );
                match getent(lab, &c, "default", "nosuch") {
                    Err(e) if format!("{e:#}").contains("exit code 2") => Ok(()),
                    other => bail!("getent ahostsv4 nosuch must find nothing: {other:?}"),
                }
            })
        },
    );

    s.check("a new Service resolves within 2 s of its creation", |lab| {
        with_dns(lab, || {
            let c = client_of(lab)?;
            let fqdn = format!("fresh.default.svc.{ZONE}");
            e2e::kubectl(
                lab,
                &["create", "service", "clusterip", "fresh", "--tcp=80:8080"],
            )?;
            let created = Instant::now();
            let cip = e2e::cluster_ip(lab, "fresh")?.to_string();
            let mut seen = Vec::new();
            while created.elapsed() < Duration::from_secs(2) {
                let got = dig_short(lab, &c, &["A", &fqdn])?;
                if got == BTreeSet::from([cip.clone()]) {
                    eprintln!("     {fqdn} → {cip} after {:?}", created.elapsed());
                    return Ok(());
                }
                seen.push(format!("{:?}: {}", created.elapsed(), one(&got)));
                std::thread::sleep(Duration::from_millis(50));
            }
            bail!("{fqdn} did not resolve to {cip} within 2 s: {seen:?}")
        })
    });

    s.check("DNS keeps answering while a DNS pod is deleted and replaced", |lab| {
        with_dns(lab, || {
            let c = client_of(lab)?;
            let before = lab.ready_endpoints("kube-system", "kube-dns")?;
            ensure!(before.len() == 2, "kube-dns endpoints before: {before:?}");
            let pods = e2e::kubectl(lab, &["get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-dns", "-o", "name"])?;
            let victim = pods.lines().next().context("no DNS pod")?.to_owned();
            e2e::kubectl(lab, &["delete", "-n", "kube-system", &victim, "--wait=false"])?;
            let fqdn = format!("demo.default.svc.{ZONE}");
            let cip = e2e::cluster_ip(lab, "demo")?.to_string();
            let started = Instant::now();
            let deadline = started + Duration::from_secs(90);
            let (mut ok, mut failed) = (0, Vec::new());
            let (mut gone_at, mut replaced_at) = (None, None);
            // Queries (UDP and TCP, each a new socket, so each balanced
            // anew) until the old pod is gone from the API, a new replica
            // is a ready endpoint beside the survivor, and at least 3 s.
            while gone_at.is_none() || replaced_at.is_none() || started.elapsed() < Duration::from_secs(3) {
                for tcp in [false, true] {
                    let args: &[&str] = if tcp { &["+tcp", "A", &fqdn] } else { &["A", &fqdn] };
                    match dig_short(lab, &c, args) {
                        Ok(g) if g == BTreeSet::from([cip.clone()]) => ok += 1,
                        other => failed.push(format!("{:?} tcp={tcp}: {other:?}", started.elapsed())),
                    }
                }
                if gone_at.is_none() && e2e::kubectl(lab, &["get", "-n", "kube-system", &victim]).is_err_and(|e| format!("{e:#}").contains("NotFound")) {
                    gone_at = Some(started.elapsed());
                }
                let now = lab.ready_endpoints("kube-system", "kube-dns")?;
                if replaced_at.is_none() && now.len() == 2 && now != before {
                    replaced_at = Some(started.elapsed());
                }
                ensure!(Instant::now() < deadline, "after 90 s: {victim} gone at {gone_at:?}, endpoints {now:?} (before {before:?})");
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!(
                "     {ok} answers over {:?}: {victim} gone at {gone_at:?}, replacement ready at {replaced_at:?}, {} failed",
                started.elapsed(),
                failed.len()
            );
            ensure!(failed.is_empty(), "{} of {} queries failed while a DNS pod was replaced: {failed:?}", failed.len(), ok + failed.len());
            Ok(())
        })
    });

    s.finish();
}

/// A ready demo pod to query from (pods come and go with scaling).
fn client_of(lab: &Lab) -> Result<String> {
    e2e::pods(lab, "app=demo")?
        .into_iter()
        .find(|p| p.ready)
        .map(|p| p.name)
        .context("no ready demo pod")
}
