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

pub fn ct_table(v: &[CtView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|c| {
            vec![
                c.protocol.clone(),
                c.src.to_string(),
                c.dst.to_string(),
                c.direction.clone(),
                c.backend_id.to_string(),
                c.revnat_id.to_string(),
                format!("{}s", c.idle_s),
            ]
        })
        .collect();
    table(&["PROTO", "SOURCE", "DESTINATION", "DIR", "BACKEND", "REVNAT", "IDLE"], &rows)
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
    let _ = writeln!(out, "Conntrack entries: {}", s.conntrack_entries);
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
}
