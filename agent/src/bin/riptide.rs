//! `riptide`: asks the local agent what the datapath is doing.
//!
//! ```text
//! riptide status
//! riptide service list [-o json]
//! riptide ct list
//! riptide affinity list
//! riptide endpoint list
//! riptide drops
//! riptide events [--follow]
//! riptide policy list
//! riptide policy check --from ns/pod|IP --to ns/pod|IP --port 80/TCP
//! ```
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use riptide_agent::{
    api::{CounterView, StatusView},
    cli,
    events::EventView,
    views::{AffinityView, CtView, EndpointView, FrontendView, PolicyCheckView, PolicyEndpointView},
};

#[derive(Parser, Debug)]
#[command(name = "riptide", version, about = "Inspect the riptide agent on this node")]
struct Args {
    /// Node whose agent to ask (default: RIPTIDE_NODE_NAME, or the only node under /run/riptide).
    #[arg(long, global = true, env = "RIPTIDE_NODE_NAME")]
    node: Option<String>,
    /// The agent's socket (overrides --node).
    #[arg(long, global = true, env = "RIPTIDE_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Agent status: sync, map sizes, routes, health checks.
    Status,
    /// Service frontends and their backends, as in the maps.
    #[command(subcommand)]
    Service(ListCmd),
    /// Conntrack entries.
    #[command(subcommand)]
    Ct(ListCmd),
    /// sessionAffinity entries: which client sticks to which backend.
    #[command(subcommand)]
    Affinity(ListCmd),
    /// Local pod endpoints.
    #[command(subcommand)]
    Endpoint(ListCmd),
    /// Datapath counters by reason (drops included).
    Drops,
    /// Recent drop/failure events: which flow, which reason, which Service.
    Events {
        /// Keep printing new events as they arrive (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// Only events from this sequence number on.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// NetworkPolicy: local pods' isolation, and the verdict for a flow.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Every local pod: identity, isolation per direction, the policies
    /// selecting it, audit mode, fail-closed.
    List,
    /// Would a new flow be allowed? Judged on the agent's compiled state as
    /// the datapath judges it (after Service translation: --to is the pod
    /// that serves). Exits 1 when denied.
    Check {
        /// The client: `namespace/pod` or an IPv4 address (or CIDR: its
        /// address is judged).
        #[arg(long)]
        from: String,
        /// The server: `namespace/pod` or an IPv4 address.
        #[arg(long)]
        to: String,
        /// Destination port and protocol, e.g. `80/TCP`, `53/UDP`.
        #[arg(long)]
        port: String,
    },
}

/// Percent-encodes a query value (pod names and addresses need none; a
/// user's typo should still reach the agent intact).
fn query_value(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Subcommand, Debug)]
enum ListCmd {
    List,
}

fn socket(a: &Args) -> anyhow::Result<PathBuf> {
    if let Some(s) = &a.socket {
        return Ok(s.clone());
    }
    let root = PathBuf::from("/run/riptide");
    let node = match &a.node {
        Some(n) => n.clone(),
        None => {
            let nodes: Vec<String> = std::fs::read_dir(&root)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.path().join("agent.sock").exists())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default();
            match nodes.as_slice() {
                [one] => one.clone(),
                [] => bail!("no agent socket under {}: is riptide-agent running? (or pass --node/--socket)", root.display()),
                many => bail!("several agents on this machine ({}): pass --node", many.join(", ")),
            }
        }
    };
    Ok(root.join(node).join("agent.sock"))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let sock = socket(&a)?;
    let get = |path: &str| -> anyhow::Result<String> {
        cli::get(&sock, path).with_context(|| format!("asking the agent at {} for {path}", sock.display()))
    };
    let json = matches!(a.output, Output::Json);
    if let Cmd::Events { follow, since } = a.cmd {
        return events(&get, json, follow, since);
    }
    let out = match a.cmd {
        Cmd::Status => {
            let body = get("/v1/status")?;
            let view: StatusView = serde_json::from_str(&body)?;
            // Scripts and probes test the exit code (as `cilium-dbg status
            // --brief`): the report still prints, then 1 when not ready.
            println!("{}", if json { body } else { cli::status_table(&view) }.trim_end());
            if !view.ready {
                std::process::exit(NOT_READY);
            }
            return Ok(());
        }
        Cmd::Service(ListCmd::List) => {
            let body = get("/v1/services")?;
            if json { body } else { cli::services_table(&serde_json::from_str::<Vec<FrontendView>>(&body)?) }
        }
        Cmd::Ct(ListCmd::List) => {
            let body = get("/v1/ct")?;
            if json { body } else { cli::ct_table(&serde_json::from_str::<Vec<CtView>>(&body)?) }
        }
        Cmd::Affinity(ListCmd::List) => {
            let body = get("/v1/affinity")?;
            if json { body } else { cli::affinity_table(&serde_json::from_str::<Vec<AffinityView>>(&body)?) }
        }
        Cmd::Endpoint(ListCmd::List) => {
            let body = get("/v1/endpoints")?;
            if json { body } else { cli::endpoints_table(&serde_json::from_str::<Vec<EndpointView>>(&body)?) }
        }
        Cmd::Drops => {
            let body = get("/v1/drops")?;
            if json { body } else { cli::drops_table(&serde_json::from_str::<Vec<CounterView>>(&body)?) }
        }
        Cmd::Policy(PolicyCmd::List) => {
            let body = get("/v1/policy")?;
            if json { body } else { cli::policy_table(&serde_json::from_str::<Vec<PolicyEndpointView>>(&body)?) }
        }
        Cmd::Policy(PolicyCmd::Check { from, to, port }) => {
            let body = get(&format!(
                "/v1/policy/check?from={}&to={}&port={}",
                query_value(&from),
                query_value(&to),
                query_value(&port)
            ))?;
            let view: PolicyCheckView = serde_json::from_str(&body)?;
            println!("{}", if json { body } else { cli::policy_check_text(&view) }.trim_end());
            if !view.allowed {
                std::process::exit(DENIED);
            }
            return Ok(());
        }
        Cmd::Events { .. } => unreachable!("handled above"),
    };
    println!("{}", out.trim_end());
    Ok(())
}

/// Exit code of `riptide status` when the agent answers but is not ready
/// (an agent that does not answer is an error, non-zero as well).
const NOT_READY: i32 = 1;

/// Exit code of `riptide policy check` when the flow would be denied.
const DENIED: i32 = 1;

fn now_unix_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Prints events from `since`; with `follow`, polls for new ones every
/// half second (JSON: one object per line).
fn events(get: &dyn Fn(&str) -> anyhow::Result<String>, json: bool, follow: bool, mut since: u64) -> anyhow::Result<()> {
    let mut header = true;
    loop {
        let list: Vec<EventView> = serde_json::from_str(&get(&format!("/v1/events?since={since}"))?)?;
        if let Some(last) = list.last() {
            since = last.seq + 1;
        }
        if json {
            if follow {
                for e in &list {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
        } else if !list.is_empty() || (header && !follow) {
            let table = cli::events_table(&list, now_unix_s());
            // In follow mode the header is printed once.
            let body = if header { table.as_str() } else { table.split_once('\n').map_or("", |(_, rest)| rest) };
            print!("{body}");
            header = false;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
