//! `riptide`: asks the local agent what the datapath is doing.
//!
//! ```text
//! riptide status
//! riptide service list [-o json]
//! riptide ct list [--ip IP] [--port N] [--service ns/name[:port]]
//! riptide map list
//! riptide bpf nat list
//! riptide node list
//! riptide affinity list
//! riptide endpoint list
//! riptide drops
//! riptide events [--follow]
//! riptide policy list
//! riptide policy check --from ns/pod|IP --to ns/pod|IP --port 80/TCP
//! ```
//!
//! `-o json|yaml|wide` on every list (wide: every column of the table).
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
    Wide,
    Json,
    Yaml,
}

impl From<Output> for cli::Format {
    fn from(o: Output) -> Self {
        match o {
            Output::Table => Self::Table,
            Output::Wide => Self::Wide,
            Output::Json => Self::Json,
            Output::Yaml => Self::Yaml,
        }
    }
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
    Ct(CtCmd),
    /// Every datapath map: entries, capacity and pressure.
    #[command(subcommand)]
    Map(ListCmd),
    /// Raw datapath tables.
    #[command(subcommand)]
    Bpf(BpfCmd),
    /// Nodes this agent routes to (podCIDR, address, what it wrote).
    #[command(subcommand)]
    Node(ListCmd),
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

#[derive(Subcommand, Debug)]
enum CtCmd {
    /// Conntrack entries, optionally only some.
    List {
        /// Entries with this source or destination address.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Entries with this source or destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Entries of this Service's frontends: `namespace/name` or
        /// `namespace/name:port`.
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum BpfCmd {
    /// The SNAT/masquerade tables (`rt_nat4_v2` TCP, `rt_natany4_v2` the rest).
    #[command(subcommand)]
    Nat(ListCmd),
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
    let format = cli::Format::from(a.output);
    if let Cmd::Events { follow, since } = a.cmd {
        return events(&get, json, follow, since);
    }
    // GET `path`, decode it as `T`, print it in the asked format.
    fn list<T: serde::de::DeserializeOwned + serde::Serialize>(
        get: &dyn Fn(&str) -> anyhow::Result<String>,
        path: &str,
        format: cli::Format,
        table: impl FnOnce(&T, bool) -> String,
    ) -> anyhow::Result<String> {
        let v: T = serde_json::from_str(&get(path)?).with_context(|| format!("decoding the agent's {path}"))?;
        Ok(cli::render(&v, format, table)?)
    }
    let out = match a.cmd {
        Cmd::Status => {
            let view: StatusView = serde_json::from_str(&get("/v1/status")?)?;
            // Scripts and probes test the exit code (as `cilium-dbg status
            // --brief`): the report still prints, then 1 when not ready.
            println!("{}", cli::render(&view, format, |v, _| cli::status_table(v))?.trim_end());
            if !view.ready {
                std::process::exit(NOT_READY);
            }
            return Ok(());
        }
        Cmd::Service(ListCmd::List) => list(&get, "/v1/services", format, |v: &Vec<FrontendView>, _| cli::services_table(v))?,
        Cmd::Ct(CtCmd::List { ip, port, service }) => {
            let revnat_ids = match &service {
                Some(svc) => {
                    let frontends: Vec<FrontendView> = serde_json::from_str(&get("/v1/services")?)?;
                    let ids = cli::revnat_ids_of(&frontends, svc);
                    if ids.is_empty() {
                        bail!("no frontend of Service {svc} in the maps (namespace/name or namespace/name:port)");
                    }
                    Some(ids)
                }
                None => None,
            };
            let filter = cli::CtFilter { ip, port, revnat_ids };
            let mut all: Vec<CtView> = serde_json::from_str(&get("/v1/ct")?)?;
            all.retain(|c| filter.matches(c));
            cli::render(&all, format, |v, wide| cli::ct_table(v, wide))?
        }
        Cmd::Map(ListCmd::List) => list(&get, "/v1/maps", format, |v: &Vec<riptide_agent::map_usage::MapUsage>, wide| cli::maps_table(v, wide))?,
        Cmd::Bpf(BpfCmd::Nat(ListCmd::List)) => list(&get, "/v1/nat", format, |v: &Vec<riptide_agent::views::NatView>, wide| cli::nat_table(v, wide))?,
        Cmd::Node(ListCmd::List) => list(&get, "/v1/nodes", format, |v: &Vec<riptide_agent::views::NodeView>, wide| cli::nodes_table(v, wide))?,
        Cmd::Affinity(ListCmd::List) => list(&get, "/v1/affinity", format, |v: &Vec<AffinityView>, _| cli::affinity_table(v))?,
        Cmd::Endpoint(ListCmd::List) => list(&get, "/v1/endpoints", format, |v: &Vec<EndpointView>, _| cli::endpoints_table(v))?,
        Cmd::Drops => list(&get, "/v1/drops", format, |v: &Vec<CounterView>, _| cli::drops_table(v))?,
        Cmd::Policy(PolicyCmd::List) => list(&get, "/v1/policy", format, |v: &Vec<PolicyEndpointView>, _| cli::policy_table(v))?,
        Cmd::Policy(PolicyCmd::Check { from, to, port }) => {
            let body = get(&format!(
                "/v1/policy/check?from={}&to={}&port={}",
                query_value(&from),
                query_value(&to),
                query_value(&port)
            ))?;
            let view: PolicyCheckView = serde_json::from_str(&body)?;
            println!("{}", cli::render(&view, format, |v, _| cli::policy_check_text(v))?.trim_end());
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
