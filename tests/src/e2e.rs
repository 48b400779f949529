//! Helpers for the end-to-end suites: commands run from pods (kubectl exec),
//! nodes (the node's netns and cgroup, like a process on the node) and the
//! outside namespace, object queries, polling, and failure diagnostics.

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Here too, beside [`agent_metrics`] that reads it.
pub use crate::lab::AGENT_METRICS_PORT;
use crate::{lab::Lab, netns};

/// A pod as the tests see it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub ready: bool,
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kubectl …` against the lab; fails with its output on non-zero exit.
pub fn kubectl(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.kubectl().args(args).output().context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), text(&out).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl … -o json` parsed.
pub fn kubectl_json(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&kubectl(lab, &a)?)?)
}

/// Pods matching `selector` in the default namespace.
pub fn pods(lab: &Lab, selector: &str) -> Result<Vec<PodInfo>> {
    let v = kubectl_json(lab, &["get", "pods", "-l", selector])?;
    let mut out = Vec::new();
    for p in v["items"].as_array().cloned().unwrap_or_default() {
        if p["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let Some(ip) = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let ready = p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
        out.push(PodInfo {
            name: p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            ip,
            node: p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
            ready,
        });
    }
    Ok(out)
}

/// The ClusterIP of Service `name`.
pub fn cluster_ip(lab: &Lab, name: &str) -> Result<Ipv4Addr> {
    let v = kubectl_json(lab, &["get", "service", name])?;
    v["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("service {name} has no clusterIP"))
}

/// Runs `cmd` inside `pod` (kubectl exec) and returns stdout.
pub fn pod_exec(lab: &Lab, pod: &str, cmd: &[&str]) -> Result<String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    kubectl(lab, &args)
}

/// Outcome of a curl: body, or curl's exit code (7 refused, 28 timeout).
#[derive(Debug)]
pub enum Curl {
    Ok(String),
    Failed(i32, String),
}

impl Curl {
    pub fn ok(self) -> Result<String> {
        match self {
            Curl::Ok(b) => Ok(b),
            Curl::Failed(code, msg) => bail!("curl exit {code}: {msg}"),
        }
    }
}

fn curl_in(mut cmd: Command, url: &str, timeout_s: u32) -> Result<Curl> {
    let out = cmd
        .args(["-sS", "-m", &timeout_s.to_string(), url])
        .output()
        .context("running curl")?;
    Ok(if out.status.success() {
        Curl::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Curl::Failed(out.status.code().unwrap_or(-1), text(&out).trim().to_owned())
    })
}

/// curl from node `i` (its netns and cgroup, like a process on the node).
pub fn node_curl(lab: &Lab, i: u32, url: &str, timeout_s: u32) -> Result<Curl> {
    let c = lab.config();
    curl_in(netns::command_in_cgroup(&c.node_netns(i), &c.node_cgroup(i), "curl")?, url, timeout_s)
}

/// curl from the outside namespace (an external client on the underlay).
pub fn outside_curl(lab: &Lab, url: &str, timeout_s: u32) -> Result<Curl> {
    curl_in(netns::command(&lab.config().outside_netns(), "curl")?, url, timeout_s)
}

/// curl from inside `pod`.
pub fn pod_curl(lab: &Lab, pod: &str, url: &str, timeout_s: u32) -> Result<Curl> {
    let mut cmd = lab.kubectl();
    cmd.args(["exec", pod, "--", "curl"]);
    curl_in(cmd, url, timeout_s)
}

/// A command that runs `program` as a process of `pod` does: in the pod's
/// network namespace and its cgroup (where the node's socket-LB hooks
/// apply), as `kubectl exec` would, but started by the test so it can hold
/// a connection and be driven over stdin. The layout is the lab kubelet's
/// (`controlplane/src/kubelet/sandbox.rs`): netns `<node>-pod-<uid>`,
/// cgroup `<node cgroup>/pod-<uid>`.
pub fn pod_command(lab: &Lab, pod: &str, program: impl AsRef<OsStr>) -> Result<Command> {
    let v = kubectl_json(lab, &["get", "pod", pod])?;
    let uid = v["metadata"]["uid"].as_str().with_context(|| format!("pod {pod} has no uid"))?;
    let node = v["spec"]["nodeName"].as_str().with_context(|| format!("pod {pod} is not bound"))?;
    pod_command_by_uid(lab, node, uid, true, program)
}

/// [`pod_command`] for a pod already looked up (its node and uid). Without
/// `in_cgroup` the process joins only the pod's network namespace, so the
/// node's socket-LB hooks do not apply and Service addresses are translated
/// by tc on the pod's veth instead.
pub fn pod_command_by_uid(lab: &Lab, node: &str, uid: &str, in_cgroup: bool, program: impl AsRef<OsStr>) -> Result<Command> {
    let c = lab.config();
    let i = c.node_index(node).with_context(|| format!("pod {uid} runs on {node}, not a lab node"))?;
    let ns = format!("{node}-pod-{uid}");
    if in_cgroup {
        netns::command_in_cgroup(&ns, &c.node_cgroup(i).join(format!("pod-{uid}")), program)
    } else {
        netns::command(&ns, program)
    }
}

/// A Pod `name` (label `app: <name>`) pinned to `node`, running
/// `riptide-netexec` (HTTP 8080, UDP 8081) with a readiness probe. The
/// image is a label: the kubelet runs `command` from this machine.
pub fn netexec_pod(lab: &Lab, name: &str, node: &str) -> Result<String> {
    let netexec = lab.config().bin_dir.join("riptide-netexec");
    if !netexec.exists() {
        bail!("{} is missing: cargo build --bins", netexec.display());
    }
    Ok(format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  nodeName: {node}
  containers:
  - name: netexec
    image: riptide.local/netexec:latest
    command: ["{}", "--http-port=8080", "--udp-port=8081"]
    readinessProbe:
      httpGet: {{path: /healthz, port: 8080}}
      periodSeconds: 2
"#,
        netexec.display()
    ))
}

/// Scales the demo Deployment to `replicas` and waits (at most `timeout`)
/// until exactly that many of its pods exist, all ready; returns them.
pub fn scale_demo(lab: &Lab, replicas: usize, timeout: Duration) -> Result<Vec<PodInfo>> {
    kubectl(lab, &["scale", "deployment", "demo", &format!("--replicas={replicas}")])?;
    eventually(timeout, || {
        let p = pods(lab, "app=demo")?;
        if p.len() != replicas || !p.iter().all(|p| p.ready) {
            bail!("want {replicas} ready demo pods: {p:?}");
        }
        Ok(p)
    })
}

/// `kubectl apply -f -` with `manifest` (YAML or JSON) on stdin.
pub fn apply(lab: &Lab, manifest: &str) -> Result<()> {
    let mut child = lab
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl apply")?;
    let mut stdin = child.stdin.take().context("kubectl stdin")?;
    stdin.write_all(manifest.as_bytes()).context("writing the manifest to kubectl")?;
    drop(stdin);
    let out = child.wait_with_output().context("waiting for kubectl apply")?;
    if !out.status.success() {
        bail!("kubectl apply: {}\n{manifest}", text(&out).trim());
    }
    Ok(())
}

/// How long [`KeepAlive`] waits for a line from its client before calling
/// the connection stuck; longer than the client's own timeout, so the
/// client's message (what failed) normally arrives first.
const KEEPALIVE_WAIT: Duration = Duration::from_secs(25);

/// One long-lived HTTP/1.1 connection held by `riptide-netexec
/// --keepalive-client` (see `netexec::keepalive_client`), driven line by
/// line: every [`KeepAlive::get`] goes over the same TCP connection, and the
/// client never reconnects, so a break shows up as an error.
pub struct KeepAlive {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// The client's `ip:port` as its socket shows it.
    pub local: String,
    /// The peer as `getpeername` shows it (the Service address under socket LB).
    pub peer: String,
}

impl KeepAlive {
    /// Starts `cmd` (a `riptide-netexec --keepalive-client ADDR` command,
    /// already placed in its netns/cgroup) and waits for it to connect.
    pub fn open(what: &str, mut cmd: Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the keep-alive client for {what}: {cmd:?}"))?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().context("client stdout")?;
        let err = child.stderr.take().context("client stderr")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(std::result::Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(std::result::Result::ok) {
                let _ = tx2.send(format!("stderr {l}"));
            }
        });
        let mut k = Self {
            what: what.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            local: String::new(),
            peer: String::new(),
        };
        let first = k.line()?;
        let mut words = first.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("connected"), Some(local), Some(peer)) => {
                k.local = local.to_owned();
                k.peer = peer.to_owned();
                Ok(k)
            }
            _ => bail!("{what}: client said {first:?}"),
        }
    }

    fn line(&mut self) -> Result<String> {
        self.lines
            .recv_timeout(KEEPALIVE_WAIT)
            .with_context(|| format!("{}: no answer from the client within {KEEPALIVE_WAIT:?} (connection stuck or client gone)", self.what))
    }

    /// `GET path` over the held connection; the body.
    pub fn get(&mut self, path: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().context("client stdin closed")?;
        writeln!(stdin, "{path}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("{}: sending {path} to the client (it exited?)", self.what))?;
        let line = self.line()?;
        match line.strip_prefix("ok ") {
            Some(body) => Ok(body.to_owned()),
            None => bail!("{} ({} → {}): GET {path}: {line}", self.what, self.local, self.peer),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `riptide` CLI pointed at node `i`'s agent. Errors (an agent that is
/// down) without anyhow's backtrace, which would bury the report.
fn riptide_cli(lab: &Lab, i: u32) -> Command {
    let c = lab.config();
    let mut cmd = Command::new(c.bin_dir.join("riptide"));
    cmd.arg("--socket").arg(c.agent_socket(i)).env("RUST_LIB_BACKTRACE", "0");
    cmd
}

/// `riptide -o json <args>` from node `i`'s agent, parsed.
fn riptide_json(lab: &Lab, i: u32, args: &[&str]) -> Result<serde_json::Value> {
    let out = riptide_cli(lab, i)
        .args(["-o", "json"])
        .args(args)
        .output()
        .context("running the riptide CLI")?;
    if !out.status.success() {
        bail!("riptide {} on {}: {}", args.join(" "), lab.config().node_name(i), text(&out).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `riptide status` from node `i`'s agent.
pub fn agent_status(lab: &Lab, i: u32) -> Result<serde_json::Value> {
    riptide_json(lab, i, &["status"])
}

/// `riptide service list` from node `i`'s agent (read from the maps).
pub fn agent_services(lab: &Lab, i: u32) -> Result<serde_json::Value> {
    riptide_json(lab, i, &["service", "list"])
}

/// `riptide events` from node `i`'s agent: the drop and policy events it
/// kept, oldest first, with pods resolved.
pub fn agent_events(lab: &Lab, i: u32) -> Result<Vec<serde_json::Value>> {
    let v = riptide_json(lab, i, &["events"])?;
    v.as_array().cloned().with_context(|| format!("riptide events answered {v}"))
}

/// `riptide drops` from node `i`'s agent: every datapath counter by
/// reason, read from the maps as it is asked (the metrics endpoint folds
/// them in only every `--map-sample-interval-s`).
pub fn agent_counters(lab: &Lab, i: u32) -> Result<std::collections::BTreeMap<String, u64>> {
    let v = riptide_json(lab, i, &["drops"])?;
    let rows = v.as_array().with_context(|| format!("riptide drops answered {v}"))?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r["reason"].as_str()?.to_owned(), r["count"].as_u64()?)))
        .collect())
}

/// `riptide affinity list` from node `i`'s agent (read from the maps).
pub fn agent_affinity(lab: &Lab, i: u32) -> Result<serde_json::Value> {
    riptide_json(lab, i, &["affinity", "list"])
}

/// Hostnames answered by `url` over `tries` fresh connections from `pod`.
pub fn hostnames_from_pod(lab: &Lab, pod: &str, url: &str, tries: u32) -> Result<BTreeSet<String>> {
    let script = format!("for i in $(seq {tries}); do curl -sS -m 3 {url}; echo; done");
    let out = pod_exec(lab, pod, &["sh", "-c", &script])?;
    Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// What `pod`'s netexec heard back dialling `host:port` over UDP: the
/// hostname answers, and an error per datagram left unanswered.
#[derive(Debug)]
pub struct UdpDial {
    pub hostnames: BTreeSet<String>,
    pub errors: Vec<String>,
}

/// `tries` UDP `hostname` requests from `pod` to `host:port` through
/// netexec's `/dial`. The error names netexec's reply when it is not JSON.
pub fn udp_dial_hostnames(lab: &Lab, pod: &str, host: Ipv4Addr, port: u16, tries: u32) -> Result<UdpDial> {
    let url = format!("http://127.0.0.1:8080/dial?request=hostname&protocol=udp&host={host}&port={port}&tries={tries}");
    let body = pod_curl(lab, pod, &url, 2 * tries)?.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).with_context(|| format!("netexec /dial answered {body:?}"))?;
    let strings = |key: &str| v[key].as_array().into_iter().flatten().filter_map(|r| r.as_str().map(str::to_owned));
    Ok(UdpDial { hostnames: strings("responses").collect(), errors: strings("errors").collect() })
}

/// Counters by name, as `riptide drops` ([`agent_counters`]) and
/// [`Metrics::counters_by`] give them.
pub type Counters = std::collections::BTreeMap<String, u64>;

/// How much counter `name` grew from `before` to `after`. A counter absent
/// from a reading is 0: a reason may appear only once it has counted.
///
/// A counter that went down is an error naming it, neither a panic nor a
/// saturated 0. It means the agent restarted, or its maps were recreated,
/// between the two readings, so the growth over the window is unknown; a
/// 0 would let a check such as "no reply went through node 1 (`revnat`
/// +0)" pass because of the reset rather than because of the datapath.
pub fn counter_delta(before: &Counters, after: &Counters, name: &str) -> Result<u64> {
    let read = |c: &Counters| c.get(name).copied().unwrap_or(0);
    let (b, a) = (read(before), read(after));
    a.checked_sub(b).with_context(|| {
        format!("counter {name} went down from {b} to {a} (agent restarted or maps recreated?): its growth is unknown")
    })
}

/// One scrape of an agent's `/metrics` (Prometheus text format), kept
/// whole so that a failing check can print what the agent exported.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Where the text was read from, for error messages.
    pub source: String,
    pub text: String,
}

/// Node `i`'s agent metrics, read from the outside namespace over the
/// node's address, as a Prometheus server outside the cluster would.
pub fn agent_metrics(lab: &Lab, i: u32) -> Result<Metrics> {
    let url = format!("http://{}:{AGENT_METRICS_PORT}/metrics", lab.config().node_ip(i));
    let text = outside_curl(lab, &url, 3)?.ok().with_context(|| format!("node {i}'s agent metrics"))?;
    Ok(Metrics { source: url, text })
}

impl Metrics {
    /// The samples of metric `name`: each one's labels (the text between
    /// the braces, empty without) and value. The name must be followed by
    /// `{` or a space, so `x` does not match `x_total`; comments never match.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.text.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            // The value may be followed by a timestamp.
            Some((labels, value.split_whitespace().next()?))
        })
    }

    /// What a failure shows of metric `name`: its sample lines, or the
    /// whole scrape when there are none.
    fn seen(&self, name: &str) -> String {
        let lines: Vec<&str> = self.text.lines().filter(|l| l.starts_with(name)).collect();
        let shown = if lines.is_empty() { self.text.clone() } else { lines.join("\n") };
        format!("{}:\n{shown}", self.source)
    }

    /// The sum of `name`'s samples whose labels include every `key="value"`
    /// of `labels` (label values with commas are not supported; the agent
    /// exports none). An error, showing the scrape, when no sample matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let mut matched = false;
        let mut total = 0.0;
        for (have, value) in self.samples(name) {
            if !labels.iter().all(|(k, v)| label(have, k) == Some(v)) {
                continue;
            }
            matched = true;
            total += value.parse::<f64>().with_context(|| format!("{name}{{{have}}} = {value:?}: {}", self.seen(name)))?;
        }
        if !matched {
            bail!("no {name} sample with {labels:?} in {}", self.seen(name));
        }
        Ok(total)
    }

    /// Counter `name` by the value of its label `key` (e.g. `reason`). An
    /// error, showing the scrape, when it has no samples or a value is not
    /// a whole number.
    pub fn counters_by(&self, name: &str, key: &str) -> Result<Counters> {
        let mut out = Counters::new();
        for (labels, value) in self.samples(name) {
            let k = label(labels, key).with_context(|| format!("{name}{{{labels}}} has no {key}: {}", self.seen(name)))?;
            let n = value.parse().with_context(|| format!("{name}{{{labels}}} = {value:?}: {}", self.seen(name)))?;
            out.insert(k.to_owned(), n);
        }
        if out.is_empty() {
            bail!("no {name} samples in {}", self.seen(name));
        }
        Ok(out)
    }
}

/// The value of label `key` in `labels` (`a="x",b="y"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
}

/// Polls `f` until it returns Ok, for at most `timeout`; returns the last error.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("still failing after {timeout:?}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Rows of `riptide ct list` (the first) and `riptide events` (the latest)
/// a failure report shows per node: both grow with every flow of the suite.
const CT_ROWS: usize = 60;
const EVENT_ROWS: usize = 30;

/// `table` with at most `rows` rows after its header line: the first ones,
/// or the last ones when `latest`.
fn clip(table: &str, rows: usize, latest: bool) -> String {
    let lines: Vec<&str> = table.lines().collect();
    let Some((header, body)) = lines.split_first() else {
        return String::new();
    };
    if body.len() <= rows {
        return format!("{table}\n");
    }
    let more = format!("… {} more rows", body.len() - rows);
    let kept = if latest {
        [&[*header, more.as_str()][..], &body[body.len() - rows..]].concat()
    } else {
        [&[*header][..], &body[..rows], &[more.as_str()][..]].concat()
    };
    format!("{}\n", kept.join("\n"))
}

/// What a failing check prints: the datapath's view on every node (agent
/// status, service table, conntrack, drop counters and the latest drop
/// events — all read from the maps by the node's agent), routes, and the
/// last log lines of every component.
pub fn diagnostics(lab: &Lab) -> String {
    let c = lab.config();
    let mut s = String::new();
    for i in 1..=c.nodes {
        for what in [&["status"][..], &["service", "list"], &["ct", "list"], &["affinity", "list"], &["drops"], &["events"]] {
            let out = riptide_cli(lab, i).args(what).output();
            s.push_str(&format!("--- {} riptide {} ---\n", c.node_name(i), what.join(" ")));
            let out = out.map(|o| text(&o)).unwrap_or_else(|e| e.to_string());
            s.push_str(&match what[0] {
                "ct" | "affinity" => clip(out.trim_end(), CT_ROWS, false),
                "events" => clip(out.trim_end(), EVENT_ROWS, true),
                _ => out,
            });
        }
        let routes = Command::new("ip").args(["-n", &c.node_netns(i), "route"]).output();
        s.push_str(&format!("--- {} routes ---\n", c.node_name(i)));
        s.push_str(&routes.map(|o| text(&o)).unwrap_or_else(|e| e.to_string()));
        if lab.net().tunnel.is_some() {
            let ns = c.node_netns(i);
            for (prog, args) in [
                ("ip", &["-d", "link", "show", "riptide.vxlan"][..]),
                ("ip", &["neigh", "show", "dev", "riptide.vxlan"]),
                ("bridge", &["fdb", "show", "dev", "riptide.vxlan"]),
            ] {
                let out = Command::new(prog).args(["-n", &ns]).args(args).output();
                s.push_str(&format!("--- {} {prog} {} ---\n", c.node_name(i), args.join(" ")));
                s.push_str(&out.map(|o| text(&o)).unwrap_or_else(|e| e.to_string()));
            }
        }
        s.push_str(&format!("--- {} agent log ---\n{}\n", c.node_name(i), lab.agent_log_tail(i, 15)));
        let label = format!("{}-kubelet", c.node_name(i));
        s.push_str(&format!("--- {label} log ---\n{}\n", lab.log_tail(&label, 15)));
    }
    s.push_str(&format!("--- apiserver log ---\n{}\n", lab.log_tail("apiserver", 15)));
    if let Ok(p) = kubectl(lab, &["get", "pods,svc,endpointslices", "-o", "wide"]) {
        s.push_str(&format!("--- objects ---\n{p}"));
    }
    s
}

/// Runs named checks in order, keeps going after a failure, and reports
/// every failure with diagnostics (printed at once) at the end.
pub struct Suite<'a> {
    lab: &'a mut Lab,
    failures: Vec<String>,
}

impl<'a> Suite<'a> {
    pub fn new(lab: &'a mut Lab) -> Self {
        Self { lab, failures: Vec::new() }
    }

    pub fn check(&mut self, name: &str, f: impl FnOnce(&Lab) -> Result<()>) {
        self.check_mut(name, |lab| f(lab));
    }

    /// A check that changes the lab itself (kills and restarts processes).
    pub fn check_mut(&mut self, name: &str, f: impl FnOnce(&mut Lab) -> Result<()>) {
        let started = Instant::now();
        match f(self.lab) {
            Ok(()) => eprintln!("ok   {name} ({:.1}s)", started.elapsed().as_secs_f64()),
            Err(e) => {
                eprintln!("FAIL {name}: {e:#}");
                eprintln!("{}", diagnostics(self.lab));
                self.failures.push(format!("{name}: {e:#}"));
            }
        }
    }

    /// Panics listing every failed check.
    pub fn finish(self) {
        assert!(self.failures.is_empty(), "{} check(s) failed:\n{}", self.failures.len(), self.failures.join("\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::{Counters, Metrics, clip, counter_delta};

    #[test]
    fn clip_keeps_the_header_and_the_first_or_latest_rows() {
        let t = "H\n1\n2\n3\n4";
        assert_eq!(clip(t, 2, false), "H\n1\n2\n… 2 more rows\n");
        assert_eq!(clip(t, 2, true), "H\n… 2 more rows\n3\n4\n");
        assert_eq!(clip(t, 4, true), "H\n1\n2\n3\n4\n");
        assert_eq!(clip("", 4, true), "");
    }

    fn counters(kv: &[(&str, u64)]) -> Counters {
        kv.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn counter_delta_counts_growth_and_names_a_counter_that_went_down() {
        let before = counters(&[("revnat", 5), ("unsnat", 2)]);
        let after = counters(&[("revnat", 9), ("xdp_tx", 3)]);
        assert_eq!(counter_delta(&before, &after, "revnat").unwrap(), 4);
        assert_eq!(counter_delta(&before, &after, "xdp_tx").unwrap(), 3);
        assert_eq!(counter_delta(&before, &after, "absent").unwrap(), 0);
        let err = counter_delta(&after, &before, "revnat").unwrap_err();
        assert!(format!("{err:#}").contains("revnat went down from 9 to 5"), "{err:#}");
        let err = counter_delta(&before, &after, "unsnat").unwrap_err();
        assert!(format!("{err:#}").contains("unsnat went down from 2 to 0"), "{err:#}");
    }

    #[test]
    fn metrics_parse_samples_by_name_and_labels() {
        let text = "# HELP riptide_drop_count_total Datapath drops.\n\
            # TYPE riptide_drop_count_total counter\n\
            riptide_drop_count_total{reason=\"lb_src_range\",direction=\"ingress\"} 3\n\
            riptide_drop_count_total{reason=\"lb_src_range\",direction=\"unknown\"} 4\n\
            riptide_drop_count_total{reason=\"policy_deny_in\",direction=\"ingress\"} 1\n\
            riptide_agent_refused_frontends 2\n\
            riptide_agent_refused_frontends_total 7\n\
            riptide_agent_datapath_packets_total{reason=\"xdp_tx\"} 20\n\
            riptide_agent_datapath_packets_total{reason=\"revnat\"} 0\n";
        let m = Metrics { source: "test".to_owned(), text: text.to_owned() };
        assert_eq!(m.sum("riptide_drop_count_total", &[("reason", "lb_src_range")]).unwrap(), 7.0);
        assert_eq!(m.sum("riptide_drop_count_total", &[("reason", "policy_deny_in"), ("direction", "ingress")]).unwrap(), 1.0);
        assert_eq!(m.sum("riptide_agent_refused_frontends", &[]).unwrap(), 2.0);
        let err = m.sum("riptide_drop_count_total", &[("reason", "nope")]).unwrap_err();
        assert!(format!("{err:#}").contains("policy_deny_in"), "a miss shows the family's samples: {err:#}");
        let by = m.counters_by("riptide_agent_datapath_packets_total", "reason").unwrap();
        assert_eq!(by, counters(&[("revnat", 0), ("xdp_tx", 20)]));
        let err = m.counters_by("riptide_missing_total", "reason").unwrap_err();
        assert!(format!("{err:#}").contains("refused_frontends"), "a missing family shows the whole scrape: {err:#}");
    }
}
