//! The `riptide` CLI's pieces: a minimal HTTP/1.1 GET over the agent's unix
//! socket (no HTTP client stack needed for one request) and table output.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use crate::{
    api::{CounterView, StatusView},
    views::{CtView, EndpointView, FrontendView, PolicyCheckView, PolicyEndpointView},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("encoding the output as {format}")]
    Encode {
        format: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Io(#[source] std::io::Error),
    #[error("malformed HTTP response from the agent")]
    Malformed,
    #[error("agent answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// GETs `path` from the agent at `sock`; the body on 2xx.
pub fn get(sock: &Path, path: &str) -> Result<String, Error> {
    let mut s = UnixStream::connect(sock).map_err(|source| Error::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30))).map_err(Error::Io)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: riptide-agent\r\nConnection: close\r\n\r\n").map_err(Error::Io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(Error::Io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(Error::Malformed)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(Error::Malformed)?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(body).ok_or(Error::Malformed)? } else { body.to_owned() };
    if !(200..300).contains(&status) {
        return Err(Error::Status { status, body });
    }
    Ok(body)
}

fn dechunk(mut s: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        s = rest.get(n + 2..)?;
    }
}

/// `-o`: how list commands print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The table (the default).
    Table,
    /// The table with every column.
    Wide,
    Json,
    Yaml,
}

/// Prints `items` in `format`: JSON and YAML from serde, the tables from
/// `table(items, wide)`. Every list command goes through here.
pub fn render<T: serde::Serialize + ?Sized>(items: &T, format: Format, table: impl FnOnce(&T, bool) -> String) -> Result<String, Error> {
    match format {
        Format::Table => Ok(table(items, false)),
        Format::Wide => Ok(table(items, true)),
        Format::Json => serde_json::to_string_pretty(items).map_err(|e| Error::Encode { format: "json", source: Box::new(e) }),
        Format::Yaml => serde_norway::to_string(items).map_err(|e| Error::Encode { format: "yaml", source: Box::new(e) }),
    }
}

/// `riptide ct list` filters.
#[derive(Clone, Debug, Default)]
pub struct CtFilter {
    /// Source or destination address.
    pub ip: Option<std::net::Ipv4Addr>,
    /// Source or destination port.
    pub port: Option<u16>,
    /// Reverse-NAT ids of the Service asked for (`--service ns/name[:port]`).
    pub revnat_ids: Option<std::collections::HashSet<u16>>,
}

impl CtFilter {
    pub fn matches(&self, c: &CtView) -> bool {
        self.ip.is_none_or(|ip| *c.src.ip() == ip || *c.dst.ip() == ip)
            && self.port.is_none_or(|p| c.src.port() == p || c.dst.port() == p)
            && self.revnat_ids.as_ref().is_none_or(|ids| ids.contains(&c.revnat_id))
    }
}

/// Reverse-NAT ids of the frontends of `service` (`ns/name` for every
/// port, `ns/name:port` for one).
pub fn revnat_ids_of(frontends: &[FrontendView], service: &str) -> std::collections::HashSet<u16> {
    frontends
        .iter()
        .filter(|f| {
            f.service.as_deref().is_some_and(|s| s == service || s.strip_prefix(service).is_some_and(|rest| rest.starts_with(':')))
        })
        .map(|f| f.revnat_id)
        .collect()
}

/// `riptide map list`.
pub fn maps_table(v: &[crate::map_usage::MapUsage], wide: bool) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|m| {
            let mut row = vec![
                m.name.clone(),
                m.entries.map_or_else(|| "-".into(), |n| n.to_string()),
                m.max_entries.to_string(),
                m.pressure.map_or_else(|| "-".into(), |p| format!("{:.1}%", p * 100.0)),
            ];
            if wide {
                row.push(m.kind.clone());
            }
            row
        })
        .collect();
    let mut header = vec!["NAME", "ENTRIES", "MAX", "PRESSURE"];
    if wide {
        header.push("TYPE");
    }
    table(&header, &rows)
}

/// `riptide bpf nat list`.
pub fn nat_table(v: &[crate::views::NatView], wide: bool) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|n| {
            let mut row = vec![n.protocol.clone(), n.src.to_string(), n.dst.to_string(), n.direction.clone(), n.xlate.to_string()];
            if wide {
                row.push(if n.kind.is_empty() { "-".into() } else { n.kind.join(",") });
                row.push(n.table.clone());
            }
            row.push(format!("{}s", n.idle_s));
            row
        })
        .collect();
    let mut header = vec!["PROTO", "SOURCE", "DESTINATION", "DIR", "XLATE"];
    if wide {
        header.extend(["KIND", "TABLE"]);
    }
    header.push("IDLE");
    table(&header, &rows)
}

/// `riptide node list`.
pub fn nodes_table(v: &[crate::views::NodeView], _wide: bool) -> String {
    let opt = |s: Option<String>| s.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|n| vec![n.name.clone(), opt(n.internal_ip.map(|i| i.to_string())), opt(n.pod_cidr.clone()), n.state.clone()])
        .collect();
    table(&["NAME", "INTERNAL-IP", "POD-CIDR", "STATE"], &rows)
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `cilium service list`-style: one row per backend, the frontend on the
/// first row of its group.
pub fn services_table(v: &[FrontendView]) -> String {
    let mut rows = Vec::new();
    for (i, f) in v.iter().enumerate() {
        let id = (i + 1).to_string();
        let mut kind = f.kind.clone();
        if f.scope == "internal" {
            kind.push_str(" (internal)");
        }
        if !f.flags.is_empty() {
            let _ = write!(kind, " [{}]", f.flags.join(","));
        }
        let service = f.service.clone().unwrap_or_else(|| "-".into());
        if f.backends.is_empty() {
            rows.push(vec![id, f.frontend.clone(), kind, service, "(none: rejects)".into()]);
            continue;
        }
        for (j, b) in f.backends.iter().enumerate() {
            let be = format!("{}) {} ({}{})", j + 1, b.addr, b.state, if b.local { ", local" } else { "" });
            if j == 0 {
                rows.push(vec![id.clone(), f.frontend.clone(), kind.clone(), service.clone(), be]);
            } else {
                rows.push(vec![String::new(), String::new(), String::new(), String::new(), be]);
            }
        }
    }
    table(&["ID", "FRONTEND", "TYPE", "SERVICE", "BACKENDS"], &rows)
}

pub fn ct_table(v: &[CtView], wide: bool) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|c| {
            let mut row = vec![
                c.protocol.clone(),
                c.src.to_string(),
                c.dst.to_string(),
                c.direction.clone(),
                c.backend_id.to_string(),
                c.revnat_id.to_string(),
            ];
            if wide {
                row.push(format!("{:#x}", c.flags));
            }
            row.push(format!("{}s", c.idle_s));
            row
        })
        .collect();
    let mut header = vec!["PROTO", "SOURCE", "DESTINATION", "DIR", "BACKEND", "REVNAT"];
    if wide {
        header.push("FLAGS");
    }
    header.push("IDLE");
    table(&header, &rows)
}

pub fn affinity_table(v: &[crate::views::AffinityView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|a| {
            vec![
                a.frontend.clone(),
                a.client.clone(),
                a.backend.map_or_else(|| format!("#{} (gone)", a.backend_id), |b| b.to_string()),
                format!("{}s", a.idle_s),
            ]
        })
        .collect();
    table(&["FRONTEND", "CLIENT", "BACKEND", "IDLE"], &rows)
}

pub fn endpoints_table(v: &[EndpointView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| vec![e.ip.to_string(), e.ifindex.to_string(), e.mac.clone(), format!("{:#x}", e.flags)])
        .collect();
    table(&["IP", "IFINDEX", "MAC", "FLAGS"], &rows)
}

/// `riptide events`: age relative to `now_unix_s`, newest last. Policy
/// events read `policy-denied ingress` (or `policy-audit egress`) and
/// addresses carry their pod (`10.42.0.5:40312 (x/a)`).
pub fn events_table(v: &[crate::events::EventView], now_unix_s: f64) -> String {
    let with_pod = |addr: String, pod: &Option<String>| match pod {
        Some(p) => format!("{addr} ({p})"),
        None => addr,
    };
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            let reason = match (&e.verdict, &e.direction) {
                (Some(verdict), Some(dir)) => format!("{verdict} {dir}"),
                _ => e.reason.clone(),
            };
            vec![
                e.seq.to_string(),
                format!("{:.1}s", (now_unix_s - e.time_unix_s).max(0.0)),
                e.program.clone(),
                reason,
                e.protocol.clone(),
                with_pod(e.src.to_string(), &e.src_pod),
                with_pod(e.dst.to_string(), &e.dst_pod),
                e.service.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["SEQ", "AGE", "PROGRAM", "REASON", "PROTO", "SOURCE", "DESTINATION", "SERVICE"], &rows)
}

/// `riptide policy list`: one row per local pod.
pub fn policy_table(v: &[PolicyEndpointView]) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let list = |l: &[String]| if l.is_empty() { "-".to_owned() } else { l.join(",") };
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|e| {
            let mut state = Vec::new();
            if e.fail_closed {
                state.push("FAIL-CLOSED");
            }
            if e.pending {
                state.push("pending");
            }
            vec![
                e.pod.clone(),
                e.ip.to_string(),
                format!("{} ({})", e.identity, e.labels),
                yes(e.isolated_in),
                yes(e.isolated_out),
                list(&e.policies_in),
                list(&e.policies_out),
                e.rules.to_string(),
                yes(e.audit),
                if state.is_empty() { "ok".to_owned() } else { state.join(",") },
            ]
        })
        .collect();
    table(&["POD", "IP", "IDENTITY", "INGRESS-ISOLATED", "EGRESS-ISOLATED", "INGRESS-POLICIES", "EGRESS-POLICIES", "RULES", "AUDIT", "STATE"], &rows)
}

/// `riptide policy check`: the verdict, then one line per direction.
pub fn policy_check_text(c: &PolicyCheckView) -> String {
    let end = |ip: std::net::Ipv4Addr, pod: &Option<String>| pod.as_ref().map_or_else(|| ip.to_string(), |p| format!("{p} ({ip})"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} -> {} {}/{}",
        if c.allowed { "ALLOWED" } else { "DENIED" },
        end(c.from_ip, &c.from_pod),
        end(c.to_ip, &c.to_pod),
        c.port,
        c.protocol
    );
    let by = |l: &[String]| if l.is_empty() { String::new() } else { format!(" (isolated by {}; no rule allows the peer)", l.join(", ")) };
    let _ = writeln!(out, "  egress of the source:       {}{}  [peer {}]", c.egress, by(&c.egress_isolated_by), c.to_identity);
    let _ = writeln!(out, "  ingress of the destination: {}{}  [peer {}]", c.ingress, by(&c.ingress_isolated_by), c.from_identity);
    out
}

pub fn drops_table(v: &[CounterView]) -> String {
    let rows: Vec<Vec<String>> = v.iter().map(|c| vec![c.reason.clone(), c.count.to_string()]).collect();
    table(&["REASON", "COUNT"], &rows)
}

pub fn status_table(s: &StatusView) -> String {
    let mut out = String::new();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(out, "Node:              {}", s.node);
    let _ = writeln!(out, "Ready:             {}", yes(s.ready));
    let _ = writeln!(out, "Kubernetes:        {}", if s.kubernetes { "connected" } else { "not configured (datapath only)" });
    let _ = writeln!(out, "Pins:              {}", s.pin_dir.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "Node IP:           {}", s.node_ip.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "PodCIDR:           {}", s.pod_cidr.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "Service ports:     {}", s.service_ports);
    let _ = writeln!(out, "Frontends:         {}", s.frontends);
    let _ = writeln!(out, "Backends:          {}", s.backends);
    let per_table = |tables: &std::collections::BTreeMap<String, usize>| {
        let tables: Vec<String> = tables.iter().map(|(t, n)| format!("{t} {n}")).collect();
        if tables.is_empty() { String::new() } else { format!(" ({})", tables.join(", ")) }
    };
    let _ = writeln!(out, "Conntrack entries: {}{}", s.conntrack_entries, per_table(&s.conntrack_tables));
    let _ = writeln!(out, "NAT entries:       {}{}", s.nat_entries, per_table(&s.nat_tables));
    let last = s.last_sync_ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"));
    let _ = writeln!(out, "Syncs:             {} (last {last})", s.syncs);
    let gc = &s.gc;
    let _ = writeln!(
        out,
        "GC:                {} passes (last {}), deleted {} expired / {} stale, {} UDP sockets aborted{}",
        gc.passes,
        gc.last_pass_ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
        gc.expired_deleted,
        gc.stale_deleted,
        gc.udp_sockets_destroyed,
        gc.last_error.as_deref().map_or_else(String::new, |e| format!(" (last error: {e})"))
    );
    let _ = writeln!(out, "Attachments:       {}", if s.attachments.is_empty() { "-".into() } else { s.attachments.join(", ") });
    let _ = writeln!(out, "Health checks:     {:?}", s.health_check_ports);
    if s.routing_mode == "vxlan" {
        let _ = writeln!(out, "Routing:           vxlan, {}", s.tunnel.as_deref().unwrap_or("device not created yet"));
        let _ = writeln!(out, "Tunnel peers:");
        for p in &s.tunnel_peers {
            let _ = writeln!(out, "  {p}");
        }
    } else {
        let _ = writeln!(out, "Routes:");
        for (cidr, via) in &s.routes {
            let _ = writeln!(out, "  {cidr} via {via}");
        }
    }
    let p = &s.policy;
    let _ = writeln!(
        out,
        "NetworkPolicy:     {}, {} policies, {} isolated pods, {} rules, {} identities{}",
        if !p.synced { "not synced yet" } else if p.enforcing { "enforcing" } else { "no local pod isolated" },
        p.policies,
        p.endpoints,
        p.rules,
        p.identities,
        p.last_pass_ms.map_or_else(String::new, |ms| format!(" (last pass {ms:.1} ms)"))
    );
    if !p.fail_closed.is_empty() {
        let _ = writeln!(out, "  FAIL-CLOSED (rules not written; denying all but node and self): {}", p.fail_closed.join(", "));
    }
    for e in &p.errors {
        let _ = writeln!(out, "  error: {e}");
    }
    for w in &p.warnings {
        let _ = writeln!(out, "  warning: {w}");
    }
    if !s.not_ready.is_empty() {
        let _ = writeln!(out, "Not ready because:");
        for r in &s.not_ready {
            let _ = writeln!(out, "  {r}");
        }
    }
    if !s.failing_services.is_empty() {
        let _ = writeln!(out, "Failing Services (retried every second; the others are served):");
        for (svc, err) in &s.failing_services {
            let _ = writeln!(out, "  {svc}: {err}");
        }
    }
    if !s.truncated_services.is_empty() {
        let _ = writeln!(out, "Truncated Services (--max-backends-per-service):");
        for t in &s.truncated_services {
            let _ = writeln!(out, "  {}: {} of {} backends written", t.service, t.kept, t.backends);
        }
    }
    if !s.conflicts.is_empty() {
        let _ = writeln!(out, "Conflicting frontends (first owner wins):");
        for (fe, owners) in &s.conflicts {
            let _ = writeln!(out, "  {fe}: {}", owners.join(", "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_deref(), Some("hello world"));
        assert_eq!(dechunk("5\r\nhel"), None);
    }

    #[test]
    fn policy_events_read_verdict_direction_and_pods() {
        let e = crate::events::EventView {
            seq: 3,
            time_unix_s: 100.0,
            reason: "policy_deny_in".into(),
            program: "to-pod".into(),
            protocol: "TCP".into(),
            src: "10.42.1.7:40312".parse().unwrap(),
            dst: "10.42.0.5:80".parse().unwrap(),
            ifindex: 7,
            service: None,
            verdict: Some("policy-denied".into()),
            direction: Some("ingress".into()),
            src_pod: Some("y/c".into()),
            dst_pod: Some("x/a".into()),
        };
        let t = events_table(&[e], 101.0);
        let row = t.lines().nth(1).unwrap();
        for want in ["to-pod", "policy-denied ingress", "10.42.1.7:40312 (y/c)", "10.42.0.5:80 (x/a)"] {
            assert!(row.contains(want), "{want} missing: {t}");
        }
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }

    #[test]
    fn ct_filters_and_output_formats() {
        let ct = |src: &str, dst: &str, revnat_id: u16| CtView {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: "TCP".into(),
            direction: "forward".into(),
            backend_id: 1,
            revnat_id,
            flags: 0,
            idle_s: 3,
        };
        let all = vec![ct("10.42.0.5:4000", "10.43.0.10:80", 7), ct("10.42.0.6:4001", "10.43.0.11:53", 8)];
        let by_ip = CtFilter { ip: Some("10.43.0.11".parse().unwrap()), ..CtFilter::default() };
        assert_eq!(all.iter().filter(|c| by_ip.matches(c)).count(), 1);
        let by_port = CtFilter { port: Some(4000), ..CtFilter::default() };
        assert!(by_port.matches(&all[0]) && !by_port.matches(&all[1]));
        let fe = |service: &str, revnat_id: u16| FrontendView {
            frontend: String::new(),
            ip: "10.43.0.10".parse().unwrap(),
            port: 80,
            protocol: "TCP".into(),
            scope: "external".into(),
            kind: "ClusterIP".into(),
            flags: vec![],
            revnat_id,
            affinity_timeout: None,
            backends: vec![],
            service: Some(service.into()),
        };
        let fes = [fe("default/web:http", 7), fe("default/webhook:http", 9)];
        let ids = revnat_ids_of(&fes, "default/web");
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), [7], "default/web is not default/webhook");
        let by_svc = CtFilter { revnat_ids: Some(revnat_ids_of(&fes, "default/web:http")), ..CtFilter::default() };
        assert!(by_svc.matches(&all[0]) && !by_svc.matches(&all[1]));

        let json = render(&all, Format::Json, |v, w| ct_table(v, w)).unwrap();
        assert_eq!(serde_json::from_str::<Vec<CtView>>(&json).unwrap(), all);
        let yaml = render(&all, Format::Yaml, |v, w| ct_table(v, w)).unwrap();
        assert_eq!(serde_norway::from_str::<Vec<CtView>>(&yaml).unwrap(), all);
        let wide = render(&all, Format::Wide, |v, w| ct_table(v, w)).unwrap();
        assert!(wide.starts_with("PROTO") && wide.contains("FLAGS"), "{wide}");
        assert!(!render(&all, Format::Table, |v, w| ct_table(v, w)).unwrap().contains("FLAGS"));
    }

}
