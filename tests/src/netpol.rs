//! The NetworkPolicy truth table on the lab, modelled on Kubernetes' netpol
//! e2e suite (`test/e2e/network/netpol`: `model.go`, `reachability.go`,
//! `truthtable.go`): namespaces x, y and z, each with pods a, b and c
//! labelled `pod=a|b|c`, every pod serving TCP, UDP and SCTP on ports 80
//! and 81 (containerPorts named `serve-80-tcp`, … as upstream names them).
//! Every pod probes every pod on the four TCP and UDP ports (the suite
//! probes SCTP in cases of its own); the observed 9×9 matrix
//! per port is compared with the expected one and both are printed on a
//! mismatch.
//!
//! A probe is `riptide-netexec --probe` started in the client pod's netns
//! and cgroup (as a process of the pod, [`e2e::pod_command_by_uid`]): a
//! fresh TCP connection (`GET /hostname`) or UDP socket (`hostname`) per
//! attempt, so every attempt is a new flow for the datapath, and the answer
//! names the pod that was reached. Cells expected to connect get a few
//! attempts (a busy 2-core machine may drop one); cells expected to be
//! blocked get one, bounded by a short timeout.

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub use crate::netexec::Protocol;
use crate::{
    e2e::{self, eventually},
    lab::Lab,
    netexec::Probe,
    netns,
};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const POD_NAMES: [&str; 3] = ["a", "b", "c"];
const N: usize = NAMESPACES.len() * POD_NAMES.len();

/// Bound of one probe attempt (connect and answer).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts of a probe expected to connect; a blocked one gets one.
const TRIES_ALLOWED: u32 = 3;
/// Probes in flight per client process (nine clients run at once).
const PROBE_PARALLEL: usize = 12;

/// One of the nine pods, `ns/pod`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Peer {
    pub ns: &'static str,
    pub pod: &'static str,
}

impl Peer {
    /// Every pod, namespace-major (x/a, x/b, …, z/c): the matrix order.
    pub fn all() -> impl Iterator<Item = Peer> {
        NAMESPACES.iter().flat_map(|ns| POD_NAMES.iter().map(move |pod| Peer { ns, pod }))
    }

    fn index(self) -> usize {
        let n = NAMESPACES.iter().position(|n| *n == self.ns).unwrap_or(0);
        let p = POD_NAMES.iter().position(|p| *p == self.pod).unwrap_or(0);
        n * POD_NAMES.len() + p
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ns, self.pod)
    }
}

/// A served port: protocol and number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    pub protocol: Protocol,
    pub port: u16,
}

pub const TCP80: Port = Port { protocol: Protocol::Tcp, port: 80 };
pub const TCP81: Port = Port { protocol: Protocol::Tcp, port: 81 };
pub const UDP80: Port = Port { protocol: Protocol::Udp, port: 80 };
pub const UDP81: Port = Port { protocol: Protocol::Udp, port: 81 };
/// Every port of the truth table, in the order matrices are printed.
pub const PORTS: [Port; 4] = [TCP80, TCP81, UDP80, UDP81];
/// Each pod serves SCTP on 80 and 81 too (raw sockets, see
/// [`crate::netexec::sctp`]); the SCTP cases probe them on their own.
pub const SCTP80: Port = Port {
    protocol: Protocol::Sctp,
    port: 80,
};
pub const SCTP81: Port = Port {
    protocol: Protocol::Sctp,
    port: 81,
};

impl Port {
    /// The containerPort name, upstream's `serve-<port>-<protocol>`.
    pub fn name(self) -> String {
        format!("serve-{}-{}", self.port, self.protocol.lower())
    }

    /// A probe of this port at `ip`.
    pub fn probe(self, ip: Ipv4Addr, tries: u32) -> Probe {
        Probe {
            protocol: self.protocol,
            target: (ip, self.port).into(),
            tries,
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol.lower().to_uppercase(), self.port)
    }
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The intended pod answered.
    Connected,
    /// No answer (the error: timeout, refused, …).
    Blocked(String),
    /// Something else answered: never what a policy can make happen.
    Wrong(String),
}

impl Outcome {
    fn mark(&self) -> char {
        match self {
            Outcome::Connected => '.',
            Outcome::Blocked(_) => 'X',
            Outcome::Wrong(_) => '?',
        }
    }
}

/// The expected verdict of every (port, from, to), upstream's `Reachability`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    cells: BTreeMap<Port, [[bool; N]; N]>,
}

impl Expected {
    /// `allowed(from, to, port)` for every cell, except that a pod always
    /// reaches itself (its own address is local to its netns, so no policy
    /// applies; upstream's `AllowLoopback`).
    pub fn new(allowed: impl Fn(Peer, Peer, Port) -> bool) -> Self {
        let mut cells = BTreeMap::new();
        for port in PORTS {
            let mut t = [[false; N]; N];
            for from in Peer::all() {
                for to in Peer::all() {
                    t[from.index()][to.index()] = from == to || allowed(from, to, port);
                }
            }
            cells.insert(port, t);
        }
        Self { cells }
    }

    /// Everyone reaches everyone on every port: no policy in force.
    pub fn all_allowed() -> Self {
        Self::new(|_, _, _| true)
    }

    pub fn get(&self, from: Peer, to: Peer, port: Port) -> bool {
        self.cells.get(&port).is_some_and(|t| t[from.index()][to.index()])
    }

    /// Cells that connect, per port.
    fn count_allowed(&self, port: Port) -> usize {
        self.cells.get(&port).map_or(0, |t| t.iter().flatten().filter(|v| **v).count())
    }
}

/// One measured cell: port, from, to, what the probe found.
type Cell = (Port, Peer, Peer, Outcome);

/// One measured matrix.
#[derive(Clone, Debug)]
pub struct Observed {
    cells: BTreeMap<(Port, Peer, Peer), Outcome>,
    pub took: Duration,
}

impl Observed {
    pub fn outcome(&self, from: Peer, to: Peer, port: Port) -> Option<&Outcome> {
        self.cells.get(&(port, from, to))
    }

    /// Cells whose outcome differs from `want`.
    pub fn mismatches(&self, want: &Expected) -> Vec<Cell> {
        let mut out = Vec::new();
        for port in PORTS {
            for from in Peer::all() {
                for to in Peer::all() {
                    let got = self.outcome(from, to, port);
                    let ok = match got {
                        Some(Outcome::Connected) => want.get(from, to, port),
                        Some(Outcome::Blocked(_)) => !want.get(from, to, port),
                        Some(Outcome::Wrong(_)) | None => false,
                    };
                    if !ok {
                        out.push((port, from, to, got.cloned().unwrap_or_else(|| Outcome::Wrong(String::from("not probed")))));
                    }
                }
            }
        }
        out
    }

    /// Expected and observed matrices side by side for every port with a
    /// mismatch (`.` connected, `X` blocked, `?` wrong answer, `!` marks an
    /// observed cell that differs), then each differing cell with what the
    /// probe said.
    pub fn report(&self, want: &Expected) -> String {
        let bad = self.mismatches(want);
        let mut s = format!("{} of {} cells differ from the expected matrix (rows: from, columns: to)\n", bad.len(), PORTS.len() * N * N);
        for port in PORTS {
            if !bad.iter().any(|b| b.0 == port) {
                continue;
            }
            let header: String = Peer::all().map(|p| format!("{:<4}", p.to_string())).collect();
            s.push_str(&format!("{port}: expected {} connected\n      {header}   | {header}\n", want.count_allowed(port)));
            for from in Peer::all() {
                let mut line = format!("{:<6}", from.to_string());
                for to in Peer::all() {
                    line.push_str(&format!("{:<4}", if want.get(from, to, port) { '.' } else { 'X' }));
                }
                line.push_str("   | ");
                for to in Peer::all() {
                    let o = self.outcome(from, to, port);
                    let differs = bad.iter().any(|b| b.0 == port && b.1 == from && b.2 == to);
                    let mark = o.map_or('-', Outcome::mark);
                    line.push_str(&format!("{:<4}", format!("{mark}{}", if differs { "!" } else { "" })));
                }
                s.push_str(line.trim_end());
                s.push('\n');
            }
        }
        const DETAILS: usize = 30;
        for (port, from, to, o) in bad.iter().take(DETAILS) {
            let want = if want.get(*from, *to, *port) { "connected" } else { "blocked" };
            s.push_str(&format!("  {from} → {to} {port}: expected {want}, observed {o:?}\n"));
        }
        if bad.len() > DETAILS {
            s.push_str(&format!("  … {} more\n", bad.len() - DETAILS));
        }
        s
    }
}

/// A served pod as the suite found it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ip: Ipv4Addr,
    pub node: String,
    pub uid: String,
}

/// Where a probe runs from.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// A process of the pod: its netns and cgroup (socket LB applies).
    Pod(Peer),
    /// Only the pod's netns: Service addresses go out untranslated and tc
    /// on the pod's veth balances them.
    PodNetnsOnly(Peer),
    /// A process on lab node `i` (its netns and cgroup).
    Node(u32),
    /// The outside namespace (a client beyond the nodes).
    Outside,
}

/// The nine pods of the model, deployed on a lab.
pub struct Model {
    pub pods: BTreeMap<Peer, Pod>,
}

/// The pod manifest of `peer` on `node`: one netexec container per port
/// number, each serving TCP, UDP and SCTP on it, with named containerPorts.
fn pod_manifest(lab: &Lab, peer: Peer, node: &str) -> Result<String> {
    let netexec = lab.config().bin_dir.join("riptide-netexec");
    ensure!(netexec.exists(), "{} is missing: build the workspace first (cargo build --bins)", netexec.display());
    let mut containers = String::new();
    for port in [80, 81] {
        containers.push_str(&format!(
            r#"  - name: cont-{port}
    image: riptide.local/netexec:latest
    command: ["{netexec}", "--http-port={port}", "--udp-port={port}", "--sctp-port={port}"]
    ports:
    - {{name: serve-{port}-tcp, containerPort: {port}}}
    - {{name: serve-{port}-udp, containerPort: {port}, protocol: UDP}}
    - {{name: serve-{port}-sctp, containerPort: {port}, protocol: SCTP}}
    readinessProbe:
      httpGet: {{path: /healthz, port: {port}}}
      periodSeconds: 2
"#,
            netexec = netexec.display()
        ));
    }
    Ok(format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: \"{ns}\"\n  labels: {{pod: {pod}}}\nspec:\n  nodeName: {node}\n  containers:\n{containers}",
        pod = peer.pod,
        ns = peer.ns,
    ))
}

impl Model {
    /// Creates namespaces x, y, z and the nine pods, spread so that every
    /// namespace and every pod label has a pod on each node (`(namespace +
    /// pod) mod nodes`), then waits until all are ready.
    pub fn deploy(lab: &Lab, within: Duration) -> Result<Self> {
        let c = lab.config();
        let mut manifest = String::new();
        for ns in NAMESPACES {
            manifest.push_str(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: \"{ns}\"}}\n---\n"));
        }
        e2e::apply(lab, &manifest)?;
        let docs: Vec<String> = Peer::all()
            .map(|p| {
                let i = (p.index() / POD_NAMES.len() + p.index() % POD_NAMES.len()) as u32 % c.nodes + 1;
                pod_manifest(lab, p, &c.node_name(i))
            })
            .collect::<Result<_>>()?;
        e2e::apply(lab, &docs.join("---\n"))?;
        eventually(within, || Self::read(lab, true))
    }

    /// The pods as the API shows them; with `ready`, fails unless all nine
    /// run, have an address and are ready.
    pub fn read(lab: &Lab, ready: bool) -> Result<Self> {
        let mut pods = BTreeMap::new();
        for ns in NAMESPACES {
            let v = e2e::kubectl_json(lab, &["get", "pods", "-n", ns])?;
            for p in v["items"].as_array().into_iter().flatten() {
                let Some(peer) = Peer::all().find(|x| x.ns == ns && p["metadata"]["name"] == x.pod) else {
                    continue;
                };
                let is_ready = p["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
                ensure!(!ready || is_ready, "{peer} is not ready: {}", p["status"]);
                let ip = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("{peer} has no address"))?;
                pods.insert(peer, Pod {
                    ip,
                    node: p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
                    uid: p["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        ensure!(pods.len() == N, "{} of {N} pods exist: {:?}", pods.len(), pods.keys().collect::<Vec<_>>());
        Ok(Self { pods })
    }

    pub fn pod(&self, p: Peer) -> Result<&Pod> {
        self.pods.get(&p).with_context(|| format!("pod {p} is not in the model"))
    }

    /// The command that runs `riptide-netexec` as `client`.
    fn client_command(&self, lab: &Lab, client: Client) -> Result<Command> {
        let c = lab.config();
        let netexec = c.bin_dir.join("riptide-netexec");
        match client {
            Client::Pod(p) | Client::PodNetnsOnly(p) => {
                let pod = self.pod(p)?;
                e2e::pod_command_by_uid(lab, &pod.node, &pod.uid, matches!(client, Client::Pod(_)), netexec)
            }
            Client::Node(i) => netns::command_in_cgroup(&c.node_netns(i), &c.node_cgroup(i), netexec),
            Client::Outside => netns::command(&c.outside_netns(), netexec),
        }
    }

    /// Runs `probes` from `client`; per probe the answer (a hostname) or
    /// the error.
    pub fn probe(&self, lab: &Lab, client: Client, probes: &[Probe]) -> Result<Vec<Result<String, String>>> {
        let mut cmd = self.client_command(lab, client)?;
        cmd.arg("--probe")
            .args(probes.iter().map(ToString::to_string))
            .arg(format!("--probe-timeout-ms={}", PROBE_TIMEOUT.as_millis()))
            .arg(format!("--probe-parallel={PROBE_PARALLEL}"));
        let out = cmd.output().with_context(|| format!("running the probe client as {client:?}"))?;
        ensure!(
            out.status.success(),
            "probe client as {client:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        ensure!(lines.len() == probes.len(), "probe client as {client:?}: {} answers to {} probes:\n{text}", lines.len(), probes.len());
        probes
            .iter()
            .zip(lines)
            .map(|(p, line)| {
                let rest = line.strip_prefix(&format!("{p} ")).with_context(|| format!("answer {line:?} to probe {p}"))?;
                Ok(match rest.split_once(' ') {
                    Some(("ok", answer)) => Ok(answer.to_owned()),
                    Some(("fail", e)) => Err(e.to_owned()),
                    _ if rest == "ok" => Ok(String::new()),
                    _ => bail!("answer {line:?} to probe {p}"),
                })
            })
            .collect()
    }

    /// One measurement of the whole matrix: every pod probes every pod on
    /// every port, the nine clients at once.
    pub fn measure(&self, lab: &Lab, want: &Expected) -> Result<Observed> {
        let started = Instant::now();
        let results: Vec<Result<Vec<Cell>>> = std::thread::scope(|s| {
            let handles: Vec<_> = Peer::all()
                .map(|from| {
                    s.spawn(move || -> Result<Vec<Cell>> {
                        let mut cells = Vec::new();
                        let mut probes = Vec::new();
                        for to in Peer::all() {
                            let ip = self.pod(to)?.ip;
                            for port in PORTS {
                                let tries = if want.get(from, to, port) { TRIES_ALLOWED } else { 1 };
                                cells.push((port, to));
                                probes.push(port.probe(ip, tries));
                            }
                        }
                        let answers = self.probe(lab, Client::Pod(from), &probes)?;
                        Ok(cells
                            .into_iter()
                            .zip(answers)
                            .map(|((port, to), a)| (port, from, to, judge(to.pod, a)))
                            .collect())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked"))))
                .collect()
        });
        let mut cells = BTreeMap::new();
        for r in results {
            for (port, from, to, o) in r? {
                cells.insert((port, from, to), o);
            }
        }
        Ok(Observed { cells, took: started.elapsed() })
    }

    /// Measures until the matrix is `want` (a policy change takes effect
    /// after the agents program it), for at most `within`; fails with the
    /// last matrix printed.
    pub fn converge(&self, lab: &Lab, want: &Expected, within: Duration) -> Result<Observed> {
        let started = Instant::now();
        let mut rounds = 0;
        loop {
            let got = self.measure(lab, want)?;
            rounds += 1;
            if got.mismatches(want).is_empty() {
                eprintln!(
                    "     matrix as expected after {:.1}s ({rounds} round(s), the last took {:.1}s)",
                    started.elapsed().as_secs_f64(),
                    got.took.as_secs_f64()
                );
                return Ok(got);
            }
            if started.elapsed() >= within {
                bail!("after {rounds} rounds in {:.1}s:\n{}", started.elapsed().as_secs_f64(), got.report(want));
            }
            // A breather for the agents on a small machine.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A probe's answer as a cell: the hostname must be the target pod's.
pub fn judge(want_pod: &str, answer: Result<String, String>) -> Outcome {
    match answer {
        Ok(h) if h == want_pod => Outcome::Connected,
        Ok(h) => Outcome::Wrong(h),
        Err(e) => Outcome::Blocked(e),
    }
}

/// Deletes every NetworkPolicy of the model's namespaces.
pub fn delete_policies(lab: &Lab) -> Result<()> {
    for ns in NAMESPACES {
        e2e::kubectl(lab, &["delete", "networkpolicy", "--all", "-n", ns])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const XA: Peer = Peer { ns: "x", pod: "a" };
    const YB: Peer = Peer { ns: "y", pod: "b" };

    #[test]
    fn peers_are_numbered_in_matrix_order() {
        let all: Vec<Peer> = Peer::all().collect();
        assert_eq!(all.len(), N);
        for (i, p) in all.iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!((p.ns, p.pod), (NAMESPACES[i / 3], POD_NAMES[i % 3]));
        }
        assert_eq!(YB.to_string(), "y/b");
        assert_eq!(UDP81.name(), "serve-81-udp");
        assert_eq!(TCP80.to_string(), "TCP/80");
    }

    #[test]
    fn a_pod_always_reaches_itself() {
        let deny = Expected::new(|_, _, _| false);
        assert!(deny.get(XA, XA, UDP80));
        assert!(!deny.get(XA, YB, UDP80));
        assert_eq!(deny.count_allowed(TCP80), N);
    }

    #[test]
    fn mismatches_are_found_and_printed() {
        let want = Expected::new(|_, to, port| to.ns != "x" || port == TCP81);
        let mut cells = BTreeMap::new();
        for port in PORTS {
            for from in Peer::all() {
                for to in Peer::all() {
                    let o = if want.get(from, to, port) { Outcome::Connected } else { Outcome::Blocked("timed out".into()) };
                    cells.insert((port, from, to), o);
                }
            }
        }
        let mut got = Observed { cells, took: Duration::ZERO };
        assert!(got.mismatches(&want).is_empty());
        got.cells.insert((UDP80, YB, XA), Outcome::Connected);
        got.cells.insert((TCP80, XA, YB), Outcome::Wrong("c".into()));
        let bad = got.mismatches(&want);
        assert_eq!(bad.len(), 2);
        let r = got.report(&want);
        assert!(r.contains("2 of 324 cells differ"), "{r}");
        assert!(r.contains("y/b → x/a UDP/80: expected blocked, observed Connected"), "{r}");
        assert!(r.contains("?!"), "{r}");
        assert!(!r.contains("TCP/81:"), "{r}");
        assert_eq!(judge("a", Ok("a".into())), Outcome::Connected);
        assert_eq!(judge("a", Ok("b".into())), Outcome::Wrong("b".into()));
    }
}
