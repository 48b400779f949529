//! Rules with the structure kube-proxy writes, for the baseline paths.
//!
//! iptables mode (pkg/proxy/iptables/proxier.go): `KUBE-SERVICES` holds one
//! rule per Service port jumping to `KUBE-SVC-<hash>`, which marks
//! out-of-cluster sources for masquerade and picks an endpoint with
//! `statistic --mode random --probability 1/n`, jumping to `KUBE-SEP-<hash>`
//! (mark hairpin for masquerade, DNAT). First-packet cost grows with the
//! number of Services, because `KUBE-SERVICES` is a linear list.
//!
//! NodePorts: the last rule of `KUBE-SERVICES` sends packets for a local
//! address to `KUBE-NODEPORTS` (one rule per NodePort → `KUBE-EXT-<hash>`:
//! mark for masquerade, then the Service's `KUBE-SVC-<hash>`), so a NodePort
//! packet first walks every ClusterIP rule.
//!
//! nftables mode (pkg/proxy/nftables/proxier.go): one verdict map keyed by
//! (daddr, l4proto, dport) → `goto service-<hash>`, whose `numgen random`
//! vmap picks `endpoint-<hash>` chains; NodePorts in a second map keyed by
//! (l4proto, dport) for local destinations (`fib daddr type local`); cost
//! independent of Service count.
//!
//! One deliberate difference: the masquerade rules take source ports from
//! 32768-60999 (the kernel's default ephemeral range) instead of kube-proxy's
//! whole range, because riptide's programs share the node in the bench: a
//! reply to a masqueraded port that happens to be one of riptide's NodePorts
//! would be taken by riptide's uplink program for a new NodePort flow. A real
//! cluster runs one or the other, and reserves the NodePort range the same way.

use std::{fmt::Write as _, net::Ipv4Addr};

/// One Service port with its endpoints.
#[derive(Debug, Clone)]
pub struct SvcPort {
    pub name: String,
    pub vip: Ipv4Addr,
    pub proto: Proto,
    pub port: u16,
    /// The NodePort of this Service port, if it has one.
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// Source ports the baselines' masquerade uses (see the module doc).
pub const MASQ_PORTS: &str = "32768-60999";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

pub const CLUSTER_CIDR: &str = "10.42.0.0/16";

/// kube-proxy's chain-name hash: base32 of a SHA-256, first 16 chars. Any
/// stable 16-char hash keeps the same rule shape; this is FNV-1a based.
fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in s.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    (0..16)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// `iptables-restore` input for the nat table with `services`.
pub fn iptables_restore(services: &[SvcPort]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    rules.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    for p in ["tcp", "udp"] {
        let _ = writeln!(
            rules,
            "-A KUBE-POSTROUTING -p {p} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --to-ports {MASQ_PORTS} --random-fully"
        );
    }
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let mut nodeports = String::new();
    for svc in services {
        let p = svc.proto.as_str();
        let svc_chain = format!("KUBE-SVC-{}", chain_hash(&format!("{}{p}", svc.name)));
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {} -j {svc_chain}",
            svc.vip, svc.name, svc.port
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {}/32 -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
            svc.vip, svc.name, svc.port
        );
        if let Some(np) = svc.node_port {
            let ext_chain = format!("KUBE-EXT-{}", chain_hash(&format!("{}{p}", svc.name)));
            let _ = writeln!(chains, ":{ext_chain} - [0:0]");
            let _ = writeln!(
                nodeports,
                "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{}\" -m {p} --dport {np} -j {ext_chain}",
                svc.name
            );
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
                svc.name
            );
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
        }
        let n = svc.endpoints.len();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let sep = format!(
                "KUBE-SEP-{}",
                chain_hash(&format!("{}{p}{ip}:{port}", svc.name))
            );
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = n - i;
            if remaining > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{} -> {ip}:{port}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    svc.name,
                    1.0 / remaining as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{} -> {ip}:{port}\" -j {sep}",
                    svc.name
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {ip}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                svc.name
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p {p} -m comment --comment \"{}\" -m {p} -j DNAT --to-destination {ip}:{port}",
                svc.name
            );
        }
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    format!("{chains}{rules}{nodeports}COMMIT\n")
}

/// `nft -f` input: kube-proxy's nftables-mode table with `services`.
pub fn nft_script(services: &[SvcPort]) -> String {
    let mut s =
        String::from("table ip kube-proxy\ndelete table ip kube-proxy\ntable ip kube-proxy {\n");
    let chain = |s: &mut String, name: &str, body: &[&str]| {
        let _ = writeln!(s, "  chain {name} {{");
        for line in body {
            let _ = writeln!(s, "    {line}");
        }
        s.push_str("  }\n");
    };
    chain(
        &mut s,
        "mark-for-masquerade",
        &["meta mark set meta mark | 0x4000"],
    );
    chain(
        &mut s,
        "masquerading",
        &[
            "meta mark & 0x4000 == 0 return",
            "meta mark set meta mark ^ 0x4000",
            &format!("meta l4proto {{ tcp, udp }} masquerade to :{MASQ_PORTS} fully-random"),
            "masquerade fully-random",
        ],
    );
    let mut elements = Vec::new();
    let mut nodeports = Vec::new();
    for svc in services {
        let p = svc.proto.as_str();
        let svc_chain = format!(
            "service-{}-{}",
            chain_hash(&format!("{}{p}", svc.name)),
            sanitize(&svc.name)
        );
        elements.push(format!(
            "{} . {p} . {} : goto {svc_chain}",
            svc.vip, svc.port
        ));
        let mut vmap = Vec::new();
        for (i, (ip, port)) in svc.endpoints.iter().enumerate() {
            let ep = format!(
                "endpoint-{}",
                chain_hash(&format!("{}{p}{ip}:{port}", svc.name))
            );
            vmap.push(format!("{i} : goto {ep}"));
            chain(
                &mut s,
                &ep,
                &[
                    &format!("ip saddr {ip} jump mark-for-masquerade"),
                    &format!("meta l4proto {p} dnat to {ip}:{port}"),
                ],
            );
        }
        if let Some(np) = svc.node_port {
            let ext_chain = format!(
                "external-{}-{}",
                chain_hash(&format!("{}{p}", svc.name)),
                sanitize(&svc.name)
            );
            nodeports.push(format!("{p} . {np} : goto {ext_chain}"));
            chain(
                &mut s,
                &ext_chain,
                &["jump mark-for-masquerade", &format!("goto {svc_chain}")],
            );
        }
        chain(
            &mut s,
            &svc_chain,
            &[
                &format!(
                    "ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
                    svc.vip, svc.port
                ),
                &format!(
                    "numgen random mod {} vmap {{ {} }}",
                    svc.endpoints.len().max(1),
                    vmap.join(", ")
                ),
            ],
        );
    }
    s.push_str("  map service-ips {\n    type ipv4_addr . inet_proto . inet_service : verdict\n");
    if !elements.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", elements.join(",\n      "));
    }
    s.push_str("  }\n");
    s.push_str("  map service-nodeports {\n    type inet_proto . inet_service : verdict\n");
    if !nodeports.is_empty() {
        let _ = writeln!(s, "    elements = {{ {} }}", nodeports.join(",\n      "));
    }
    s.push_str("  }\n");
    chain(
        &mut s,
        "services",
        &[
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
        ],
    );
    chain(
        &mut s,
        "nat-output",
        &[
            "type nat hook output priority -100; policy accept;",
            "jump services",
        ],
    );
    chain(
        &mut s,
        "nat-prerouting",
        &[
            "type nat hook prerouting priority -100; policy accept;",
            "jump services",
        ],
    );
    chain(
        &mut s,
        "nat-postrouting",
        &[
            "type nat hook postrouting priority 100; policy accept;",
            "jump masquerading",
        ],
    );
    s.push_str("}\n");
    s
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect()
}

/// `n` Services: `n - 1` filler Services with real backends on
/// `backend_ip`, and the measured one (`measured`) placed in the middle of
/// the list, i.e. an average position in kube-proxy's linear chain.
pub fn services_with(n: usize, measured: &[SvcPort], backend_ip: Ipv4Addr) -> Vec<SvcPort> {
    let fillers = n.saturating_sub(1);
    let mut out = Vec::with_capacity(fillers + measured.len());
    for i in 0..fillers {
        // 10.43.64.0 and up: clear of the measured Service's VIP.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 64, 0)) + i as u32);
        out.push(SvcPort {
            name: format!("bench/filler-{i}:http"),
            vip,
            proto: Proto::Tcp,
            port: 80,
            node_port: None,
            endpoints: vec![(backend_ip, 30_000 + (i % 10_000) as u16)],
        });
    }
    let mid = out.len() / 2;
    for (k, m) in measured.iter().enumerate() {
        out.insert(mid + k, m.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> SvcPort {
        SvcPort {
            name: "default/web:http".into(),
            vip: Ipv4Addr::new(10, 43, 0, 10),
            proto: Proto::Tcp,
            port: 80,
            node_port: Some(30080),
            endpoints: vec![
                (Ipv4Addr::new(10, 42, 1, 5), 8080),
                (Ipv4Addr::new(10, 42, 2, 5), 8080),
            ],
        }
    }

    #[test]
    fn iptables_rules_have_kube_proxy_structure() {
        let r = iptables_restore(&[svc()]);
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"));
        assert_eq!(r.matches(":KUBE-SVC-").count(), 1);
        assert_eq!(r.matches(":KUBE-SEP-").count(), 2);
        // First endpoint with probability 1/2, the last unconditionally.
        assert!(r.contains("--probability 0.50000000000"));
        assert_eq!(r.matches("-j DNAT --to-destination").count(), 2);
        assert!(r.contains("-d 10.43.0.10/32 -p tcp"));
        // The NodePort: reached from the catch-all last rule of
        // KUBE-SERVICES, marked for masquerade, then the Service chain.
        assert_eq!(r.matches(":KUBE-EXT-").count(), 1);
        assert!(r.contains("-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 30080 -j KUBE-EXT-"));
        let last_services_rule = r
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES"))
            .unwrap();
        assert!(
            last_services_rule.ends_with("-j KUBE-NODEPORTS"),
            "{last_services_rule}"
        );
        assert!(r.contains(&format!(
            "MASQUERADE --to-ports {MASQ_PORTS} --random-fully"
        )));
    }

    #[test]
    fn measured_service_sits_in_the_middle() {
        let all = services_with(1000, &[svc()], Ipv4Addr::new(198, 18, 0, 12));
        assert_eq!(all.len(), 1000);
        assert_eq!(all[499].name, "default/web:http");
        let hashes: std::collections::HashSet<String> =
            all.iter().map(|s| chain_hash(&s.name)).collect();
        assert_eq!(hashes.len(), 1000, "chain names must not collide");
    }

    #[test]
    fn nft_script_uses_one_verdict_map() {
        let s = nft_script(&[svc()]);
        assert_eq!(s.matches("map service-ips").count(), 1);
        assert!(s.contains("10.43.0.10 . tcp . 80 : goto service-"));
        assert!(s.contains("numgen random mod 2 vmap"));
        assert!(s.contains("tcp . 30080 : goto external-"));
        assert!(s.contains("fib daddr type local"));
    }
}
