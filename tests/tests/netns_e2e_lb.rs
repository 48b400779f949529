//! Privileged end-to-end checks of LoadBalancer Services on a real 3-node
//! lab: an address from the lab's default pool (lbipam), reached from the
//! outside namespace with no route because exactly one node answers ARP for
//! it (L2 announcement), failover with a gratuitous ARP when that node
//! goes away (its kubelet and agent killed), `loadBalancerSourceRanges`
//! enforced and updated live,
//! and an externalIPs takeover of a node address refused
//! by the apiserver and, with admission opened up, by every agent.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use riptide_agent::l2announce::{ARP_REPLY, ARP_REQUEST, ArpSocket, BROADCAST_MAC, build, parse};
use riptide_tests::{
    e2e::{self, Suite, eventually},
    lab::{Lab, LabConfig},
    netns,
};
use riptide_test_support::privileged;

const SETTLE: Duration = Duration::from_secs(60);

/// The MAC addresses that answer an ARP request for `ip` sent from
/// `from_ip` on `dev` of netns `ns`, within ~1.5 s.
fn arp_who_has(ns: &str, dev: &'static str, from_ip: Ipv4Addr, ip: Ipv4Addr) -> Result<BTreeSet<[u8; 6]>> {
    netns::run_in(ns, move || -> Result<BTreeSet<[u8; 6]>> {
        let sock = ArpSocket::open(dev).with_context(|| format!("AF_PACKET socket on {dev}"))?;
        let req = build(ARP_REQUEST, BROADCAST_MAC, sock.mac(), from_ip, [0; 6], ip);
        sock.send(&req, BROADCAST_MAC)?;
        let mut macs = BTreeSet::new();
        let mut buf = [0u8; 1600];
        for _ in 0..3 {
            while let Some(n) = sock.recv(&mut buf)? {
                if let Some((ARP_REPLY, sha, spa, _)) = parse(&buf[..n])
                    && spa == ip
                {
                    macs.insert(sha);
                }
            }
        }
        Ok(macs)
    })?
}

/// Node `i`'s uplink MAC.
fn node_mac(lab: &Lab, i: u32) -> Result<[u8; 6]> {
    netns::run_in(&lab.config().node_netns(i), || ArpSocket::open("eth0").map(|s| s.mac()))?.context("node uplink")
}

/// The node whose uplink has `mac`.
fn node_with_mac(lab: &Lab, mac: [u8; 6]) -> Result<u32> {
    for i in 1..=lab.config().nodes {
        if node_mac(lab, i)? == mac {
            return Ok(i);
        }
    }
    anyhow::bail!("{mac:02x?} is no node's uplink")
}

/// The one node answering ARP for `ip` (fails unless exactly one does).
fn announcer(lab: &Lab, ip: Ipv4Addr) -> Result<u32> {
    let c = lab.config();
    let macs = arp_who_has(&c.outside_netns(), "eth0", c.outside_ip(), ip)?;
    ensure!(macs.len() == 1, "ARP for {ip} answered by {} MACs: {macs:02x?}", macs.len());
    node_with_mac(lab, *macs.first().context("one MAC")?)
}

/// The outside namespace's neighbour entry for `ip`, as a MAC.
fn outside_neighbour(lab: &Lab, ip: Ipv4Addr) -> Result<Option<[u8; 6]>> {
    let out = netns::command(&lab.config().outside_netns(), "ip")?.args(["-j", "neigh", "show", &ip.to_string()]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let Some(mac) = v.get(0).and_then(|e| e["lladdr"].as_str()) else { return Ok(None) };
    let bytes: Vec<u8> = mac.split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
    Ok(bytes.try_into().ok())
}

fn lease_holder(lab: &Lab, svc: &str) -> Result<String> {
    let name = riptide_agent::l2announce::lease_name("default", svc);
    Ok(e2e::kubectl(lab, &["-n", "kube-system", "get", "lease", &name, "-o", "jsonpath={.spec.holderIdentity}"])?.trim().to_owned())
}

/// `riptide_agent_refused_frontends` of node `i`'s agent.
fn refused_frontends(lab: &Lab, i: u32) -> Result<f64> {
    e2e::agent_metrics(lab, i)?.sum("riptide_agent_refused_frontends", &[])
}

/// `riptide_drop_count_total{reason="lb_src_range"}` of node `i`'s agent,
/// every direction.
fn lb_src_range_drops(lab: &Lab, i: u32) -> Result<f64> {
    e2e::agent_metrics(lab, i)?.sum("riptide_drop_count_total", &[("reason", "lb_src_range")])
}

#[test]
fn netns_e2e_loadbalancer_l2_announcement_and_external_ip_guard() {
    if !privileged("for network namespaces, eBPF and AF_PACKET sockets") {
        return;
    }
    let mut lab = Lab::up(LabConfig::for_test(3).expect("config")).expect("lab up");
    lab.start_cluster(Duration::from_secs(120)).expect("cluster");
    lab.deploy_demo().expect("demo");
    let mut s = Suite::new(&mut lab);
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  type: LoadBalancer\n  selector: {app: demo}\n  ports: [{port: 80, targetPort: 8080}]\n";
    let lbip = std::cell::Cell::new(Ipv4Addr::UNSPECIFIED);

    s.check("a LoadBalancer Service gets an address from the lab's default pool", |lab| {
        e2e::apply(lab, web)?;
        let ip: Ipv4Addr = eventually(SETTLE, || {
            let ip = e2e::kubectl(lab, &["get", "service", "web", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"])?;
            Ok(ip.trim().parse()?)
        })?;
        let sub = lab.config().subnet;
        ensure!(ip.octets()[..3] == [198, 18, sub] && (208..=223).contains(&ip.octets()[3]), "{ip} is not in {}", lab.config().lb_pool());
        lbip.set(ip);
        Ok(())
    });

    s.check("reachable from outside with no route: exactly one node answers ARP", |lab| {
        let (c, ip) = (lab.config(), lbip.get());
        // On-link for the outside namespace: no route names a node.
        let route = netns::command(&c.outside_netns(), "ip")?.args(["route", "get", &ip.to_string()]).output()?;
        let route = String::from_utf8_lossy(&route.stdout);
        ensure!(!route.contains(" via "), "outside routes {ip} through a gateway: {route}");
        let body = eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{ip}/hostname"), 3)?.ok())?;
        ensure!(body.starts_with("demo-"), "answered by {body:?}");
        let n = eventually(SETTLE, || announcer(lab, ip))?;
        let holder = lease_holder(lab, "web")?;
        ensure!(holder == c.node_name(n), "node {n} answers ARP but the Lease names {holder:?}");
        // Stable: the same single node, a few seconds (several renewals) later.
        std::thread::sleep(Duration::from_secs(5));
        ensure!(announcer(lab, ip)? == n, "the announcer moved without a failure");
        Ok(())
    });

    s.check("loadBalancerSourceRanges: a range without the client drops it, live updates open it again", |lab| {
        let (c, ip) = (lab.config().clone(), lbip.get());
        let url = format!("http://{ip}/hostname");
        let with_ranges = |ranges: &str| format!("{web}  loadBalancerSourceRanges: {ranges}\n");
        // TEST-NET-3 holds no lab address: the outside client is not in it.
        e2e::apply(lab, &with_ranges("[203.0.113.0/24]"))?;
        eventually(SETTLE, || {
            match e2e::outside_curl(lab, &url, 2)? {
                e2e::Curl::Failed(..) => Ok(()),
                e2e::Curl::Ok(body) => anyhow::bail!("still answered ({body:?}) with the client outside every range"),
            }
        })?;
        // Dropped by the datapath, counted under its own reason.
        eventually(SETTLE, || {
            // A node that dropped nothing may not export the reason at all.
            let mut denied = 0.0;
            let mut seen = String::new();
            for i in 1..=c.nodes {
                match lb_src_range_drops(lab, i) {
                    Ok(n) => {
                        denied += n;
                        seen.push_str(&format!("\nnode {i}: {n}"));
                    }
                    Err(e) => seen.push_str(&format!("\nnode {i}: {e:#}")),
                }
            }
            ensure!(denied > 0.0, "no node counted an lb_src_range drop:{seen}");
            Ok(())
        })?;
        // The ClusterIP and NodePort stay open (kube-proxy filters the
        // load-balancer IPs only).
        let np = e2e::kubectl(lab, &["get", "service", "web", "-o", "jsonpath={.spec.ports[0].nodePort}"])?;
        let body = eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{}:{}/hostname", c.node_ip(1), np.trim()), 3)?.ok())?;
        ensure!(body.starts_with("demo-"), "NodePort answered by {body:?}");
        // A range holding the client: reachable again, without recreating
        // anything.
        e2e::apply(lab, &with_ranges(&format!("[203.0.113.0/24, {}/32]", c.outside_ip())))?;
        let body = eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())?;
        ensure!(body.starts_with("demo-"), "answered by {body:?}");
        // Narrowed again, then the field removed: no ranges = everyone.
        e2e::apply(lab, &with_ranges("[203.0.113.0/24]"))?;
        eventually(SETTLE, || match e2e::outside_curl(lab, &url, 2)? {
            e2e::Curl::Failed(..) => Ok(()),
            e2e::Curl::Ok(body) => anyhow::bail!("answered ({body:?}) after narrowing again"),
        })?;
        e2e::apply(lab, web)?;
        let body = eventually(SETTLE, || e2e::outside_curl(lab, &url, 3)?.ok())?;
        ensure!(body.starts_with("demo-"), "answered by {body:?}");
        Ok(())
    });

    s.check_mut("failover: the announcing node goes away, another takes over with a gratuitous ARP", |lab| {
        let ip = lbip.get();
        let before = announcer(lab, ip)?;
        let old_mac = node_mac(lab, before)?;
        ensure!(outside_neighbour(lab, ip)? == Some(old_mac), "the outside's neighbour entry should name node {before}");
        // The node dies: its kubelet first, so nothing restarts the agent
        // (the DaemonSet's kubelet would, within its crash back-off), then
        // the agent. Its Lease is no longer renewed.
        lab.stop_kubelet(before)?;
        lab.kill_agent(before)?;
        let after = eventually(SETTLE, || {
            let n = announcer(lab, ip)?;
            ensure!(n != before, "node {before} still answers");
            Ok(n)
        })?;
        // The gratuitous ARP moved the existing entry: the client needed no
        // ARP timeout of its own.
        let new_mac = node_mac(lab, after)?;
        eventually(Duration::from_secs(10), || {
            let got = outside_neighbour(lab, ip)?;
            ensure!(got == Some(new_mac), "outside neighbour of {ip}: {got:02x?}, want node {after}'s {new_mac:02x?}");
            Ok(())
        })?;
        ensure!(lease_holder(lab, "web")? == lab.config().node_name(after), "Lease holder");
        eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{ip}/hostname"), 3)?.ok())?;
        // The node comes back (its kubelet restarts the agent container;
        // hand-wired, the lab starts the agent): it follows the Lease and
        // does not take the address back.
        lab.start_kubelet(before)?;
        lab.start_agent(before)?;
        std::thread::sleep(Duration::from_secs(8));
        ensure!(announcer(lab, ip)? == after, "the restarted agent took the address back");
        Ok(())
    });

    s.check("externalTrafficPolicy=Local: only a node with a ready local endpoint announces", |lab| {
        let c = lab.config();
        let one = e2e::scale_demo(lab, 1, SETTLE)?.remove(0);
        let with = c.node_index(&one.node).context("pod's node")?;
        e2e::apply(lab, "apiVersion: v1\nkind: Service\nmetadata: {name: webl}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: demo}\n  ports: [{port: 80, targetPort: 8080}]\n")?;
        let ip: Ipv4Addr = eventually(SETTLE, || {
            let ip = e2e::kubectl(lab, &["get", "service", "webl", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"])?;
            Ok(ip.trim().parse()?)
        })?;
        eventually(SETTLE, || {
            let n = announcer(lab, ip)?;
            ensure!(n == with, "node {n} announces {ip}, the only endpoint is on node {with}");
            Ok(())
        })?;
        // The client address survives (no SNAT to another node's address).
        let seen = eventually(SETTLE, || e2e::outside_curl(lab, &format!("http://{ip}/clientip"), 3)?.ok())?;
        ensure!(seen.starts_with(&format!("{}:", c.outside_ip())), "backend saw {seen}");
        e2e::kubectl(lab, &["delete", "service", "webl"])?;
        e2e::scale_demo(lab, 3, SETTLE).map(|_| ())
    });

    s.check_mut("an externalIPs takeover of a node address: refused by the apiserver, then by every agent", |lab| {
        let c = lab.config().clone();
        let victim = c.node_ip(2);
        let evil = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: evil}}\nspec:\n  selector: {{app: demo}}\n  externalIPs: [{victim}]\n  ports:\n  - {{name: kubelet, port: 10250, targetPort: 8080}}\n  - {{name: ssh, port: 22, targetPort: 8080}}\n"
        );
        let err = e2e::apply(lab, &evil).err().context("the apiserver admitted an external IP of a node")?;
        ensure!(format!("{err:#}").contains("forbidden"), "{err:#}");
        // Opened up: the whole underlay is allowed, so the Service is stored.
        lab.restart_control_plane_allowing_external_ips(&format!("198.18.{}.0/24", c.subnet))?;
        eventually(SETTLE, || e2e::apply(lab, &evil))?;
        for i in 1..=c.nodes {
            eventually(SETTLE, || {
                let n = refused_frontends(lab, i)?;
                ensure!(n >= 1.0, "node {i}: refused_frontends {n}");
                Ok(())
            })?;
        }
        // The kubelet still answers as itself on 10250 (TLS; the demo pod
        // speaks plain HTTP), and nothing answers on port 22.
        let code = netns::command(&c.outside_netns(), "curl")?
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", &format!("https://{victim}:10250/healthz")])
            .output()?;
        let code = String::from_utf8_lossy(&code.stdout).into_owned();
        ensure!(code != "000" && !code.is_empty(), "the kubelet on {victim}:10250 did not answer over TLS (code {code:?})");
        if let e2e::Curl::Ok(body) = e2e::outside_curl(lab, &format!("http://{victim}:22/hostname"), 3)? {
            anyhow::bail!("{victim}:22 answered as a Service backend: {body}");
        }
        // From a node, through socket LB, too.
        if let e2e::Curl::Ok(body) = e2e::node_curl(lab, 1, &format!("http://{victim}:22/hostname"), 3)? {
            anyhow::bail!("{victim}:22 from node 1 answered as a Service backend: {body}");
        }
        e2e::kubectl(lab, &["delete", "service", "evil"]).map(|_| ())
    });

    s.finish();
}
