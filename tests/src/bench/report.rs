//! The bench report: every sample as JSON, markdown tables (one per
//! scenario) of medians with their spread and the ratio to the matching
//! direct path in bold, the targets next to what was measured, and
//! an SVG plot of throughput against the number of Services.

use std::{collections::BTreeSet, fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::{DataPath, Sample, Scenario, netperf::Test};

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub quick: bool,
    /// Why the run stopped early, if it did (the samples are those taken).
    pub error: Option<String>,
    pub runs: u32,
    pub seconds_per_run: u32,
    pub elapsed_s: f64,
    pub host: Host,
    pub samples: Vec<Sample>,
    /// Measurements that failed (the run went on without them).
    #[serde(default)]
    pub failures: Vec<Failure>,
}

/// A measurement that failed, with netperf's complaint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub scenario: Scenario,
    pub path: DataPath,
    pub test: Test,
    pub services: usize,
    pub run: u32,
    pub data_port: u16,
    pub error: String,
}

/// The machine the numbers come from.
#[derive(Debug, Serialize, Deserialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// /proc/loadavg when the report was written: other work on the machine.
    pub loadavg: String,
}

impl Host {
    fn current() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu_model: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                })
                .unwrap_or_default(),
            loadavg: read("/proc/loadavg").trim().to_owned(),
        }
    }
}

/// Median, min and max of a set of values.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    })
}

/// A target from the issue: path/test in a scenario against its direct path.
struct Target {
    what: &'static str,
    scenario: Scenario,
    path: DataPath,
    test: Test,
    min_ratio: f64,
    /// Compare against this path instead of `path`'s own baseline.
    against: Option<DataPath>,
}

const TARGETS: &[Target] = &[
    Target {
        what: "ClusterIP via riptide socket LB, TCP_CRR",
        scenario: Scenario::ClusterIp,
        path: DataPath::RiptideSock,
        test: Test::TcpCrr,
        min_ratio: 0.97,
        against: None,
    },
    Target {
        what: "ClusterIP via riptide socket LB, TCP_RR",
        scenario: Scenario::ClusterIp,
        path: DataPath::RiptideSock,
        test: Test::TcpRr,
        min_ratio: 0.98,
        against: None,
    },
    Target {
        what: "ClusterIP via riptide tc, TCP_CRR",
        scenario: Scenario::ClusterIp,
        path: DataPath::RiptideTc,
        test: Test::TcpCrr,
        min_ratio: 0.97,
        against: None,
    },
    Target {
        what: "ClusterIP via riptide tc, TCP_RR",
        scenario: Scenario::ClusterIp,
        path: DataPath::RiptideTc,
        test: Test::TcpRr,
        min_ratio: 0.98,
        against: None,
    },
    // NodePort to a remote backend, against the hop-matched direct path
    // (`direct-sym`) and against `direct`, whose reply skips node 1: the
    // limit no source-NATed NodePort can reach by the hops it takes.
    Target {
        what: "NodePort via riptide, TCP_RR",
        scenario: Scenario::NodePort,
        path: DataPath::Riptide,
        test: Test::TcpRr,
        min_ratio: 0.9,
        against: None,
    },
    Target {
        what: "NodePort via riptide, TCP_CRR",
        scenario: Scenario::NodePort,
        path: DataPath::Riptide,
        test: Test::TcpCrr,
        min_ratio: 0.9,
        against: None,
    },
    Target {
        what: "NodePort via riptide, TCP_RR",
        scenario: Scenario::NodePort,
        path: DataPath::Riptide,
        test: Test::TcpRr,
        min_ratio: 0.9,
        against: Some(DataPath::Direct),
    },
    Target {
        what: "NodePort via riptide, TCP_CRR",
        scenario: Scenario::NodePort,
        path: DataPath::Riptide,
        test: Test::TcpCrr,
        min_ratio: 0.9,
        against: Some(DataPath::Direct),
    },
    // NetworkPolicy: 100 policies selecting the server against no policy.
    Target {
        what: "pod → pod (other node) with 100 NetworkPolicies, TCP_RR",
        scenario: Scenario::NetPol,
        path: DataPath::Policy,
        test: Test::TcpRr,
        min_ratio: 0.97,
        against: None,
    },
    Target {
        what: "pod → pod (other node) with 100 NetworkPolicies, TCP_CRR",
        scenario: Scenario::NetPol,
        path: DataPath::Policy,
        test: Test::TcpCrr,
        min_ratio: 0.97,
        against: None,
    },
    Target {
        what: "pod → pod (same node) with 100 NetworkPolicies, TCP_RR",
        scenario: Scenario::NetPolLocal,
        path: DataPath::Policy,
        test: Test::TcpRr,
        min_ratio: 0.97,
        against: None,
    },
    Target {
        what: "pod → pod (same node) with 100 NetworkPolicies, TCP_CRR",
        scenario: Scenario::NetPolLocal,
        path: DataPath::Policy,
        test: Test::TcpCrr,
        min_ratio: 0.97,
        against: None,
    },
];

impl Report {
    pub fn new(
        samples: Vec<Sample>,
        elapsed: Duration,
        quick: bool,
        runs: u32,
        seconds_per_run: u32,
    ) -> Self {
        Self {
            quick,
            error: None,
            runs,
            seconds_per_run,
            elapsed_s: elapsed.as_secs_f64(),
            host: Host::current(),
            samples,
            failures: Vec::new(),
        }
    }

    #[must_use]
    pub fn with_failures(mut self, failures: Vec<Failure>) -> Self {
        self.failures = failures;
        self
    }

    /// Marks the report as a partial one, stopped by `error`.
    #[must_use]
    pub fn failed(mut self, error: Option<String>) -> Self {
        self.error = error;
        self
    }

    fn tests(&self) -> Vec<Test> {
        let mut seen = Vec::new();
        for s in &self.samples {
            if !seen.contains(&s.test) {
                seen.push(s.test);
            }
        }
        seen
    }

    fn scenarios(&self) -> Vec<Scenario> {
        self.samples
            .iter()
            .map(|s| s.scenario)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Paths of `scenario` in the order the scenario lists them.
    fn paths(&self, scenario: Scenario) -> Vec<DataPath> {
        scenario
            .paths()
            .iter()
            .copied()
            .filter(|p| {
                self.samples
                    .iter()
                    .any(|s| s.scenario == scenario && s.path == *p)
            })
            .collect()
    }

    fn counts(&self) -> Vec<usize> {
        self.samples
            .iter()
            .map(|s| s.services)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    pub fn throughput(
        &self,
        scenario: Scenario,
        path: DataPath,
        test: Test,
        n: usize,
    ) -> Option<Stat> {
        self.metric(scenario, path, test, n, |m| m.throughput)
    }

    /// Median & spread of one field of the matching samples.
    fn metric(
        &self,
        scenario: Scenario,
        path: DataPath,
        test: Test,
        n: usize,
        field: impl Fn(&super::netperf::Measurement) -> f64,
    ) -> Option<Stat> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.scenario == scenario && s.path == path && s.test == test && s.services == n
            })
            .map(|s| field(&s.m))
            .collect();
        stat(&v)
    }

    /// Ratio of the medians of one field of `path` and of `base`.
    fn metric_ratio(
        &self,
        scenario: Scenario,
        path: DataPath,
        base: DataPath,
        test: Test,
        n: usize,
        field: impl Fn(&super::netperf::Measurement) -> f64,
    ) -> Option<f64> {
        let d = self.metric(scenario, base, test, n, &field)?;
        let v = self.metric(scenario, path, test, n, &field)?;
        (d.median > 0.0).then(|| v.median / d.median)
    }

    /// Median ratio of `path` to `base` (throughput).
    fn ratio_to(
        &self,
        scenario: Scenario,
        path: DataPath,
        base: DataPath,
        test: Test,
        n: usize,
    ) -> Option<f64> {
        self.metric_ratio(scenario, path, base, test, n, |m| m.throughput)
    }

    /// Median ratio of `path` to its direct path; a path measured only at
    /// the first count (references) is compared at that count.
    pub fn ratio(&self, scenario: Scenario, path: DataPath, test: Test, n: usize) -> Option<f64> {
        self.ratio_to(scenario, path, path.baseline(scenario)?, test, n)
    }

    /// Median P50 latency of `path` over `base`'s (lower is better).
    fn p50_ratio_to(
        &self,
        scenario: Scenario,
        path: DataPath,
        base: DataPath,
        test: Test,
        n: usize,
    ) -> Option<f64> {
        self.metric_ratio(scenario, path, base, test, n, |m| m.p50_us)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        if let Some(e) = &self.error {
            let _ = writeln!(
                md,
                "**Partial run**: stopped after {} measurements: {e}\n",
                self.samples.len()
            );
        }
        let _ = writeln!(
            md,
            "Median (min–max) of {} run(s) of {} s per point; **bold** = ratio to the direct path from the same client \
             (riptide: `direct`; kube-proxy-shaped baselines in ClusterIP scenarios: `direct-plain`, a ptp-style pod; \
             NodePort scenarios: `direct`, outside → pod IP via node 1, and for the remote backend `direct-sym`, the same with the reply back through node 1 as a source-NATed NodePort's must go); *italic* = P50 latency over the direct path's (lower is better). Machine: {} CPUs ({}), kernel {}, load average at the end {}.\n",
            self.runs,
            self.seconds_per_run,
            self.host.cpus,
            self.host.cpu_model,
            self.host.kernel,
            self.host.loadavg
        );
        md.push_str(&self.summary());
        for scenario in self.scenarios() {
            let paths = self.paths(scenario);
            let _ = writeln!(md, "### {} (`{}`)\n", scenario.title(), scenario.name());
            let _ = write!(md, "| test | Services |");
            for p in &paths {
                let _ = write!(md, " {} |", p.name());
            }
            let _ = write!(md, "\n| --- | ---: |");
            for _ in &paths {
                md.push_str(" ---: |");
            }
            md.push('\n');
            for test in self.tests() {
                for n in self.counts() {
                    let _ = write!(md, "| {} ({}) | {n} |", test.name(), test.unit());
                    self.cells(&mut md, scenario, &paths, test, n, |m| m.throughput, 0, Some("**"));
                }
            }
            // P50 latency of the request/response tests: far steadier than
            // transactions/s on a shared machine, whose mean the tail of
            // preempted transactions drags down.
            for test in self.tests().into_iter().filter(|t| *t != Test::TcpStream) {
                for n in self.counts() {
                    let _ = write!(md, "| {} P50 latency (µs) | {n} |", test.name());
                    self.cells(&mut md, scenario, &paths, test, n, |m| m.p50_us, 0, Some("*"));
                }
            }
            // The tail and the cost: P99 latency of the request/response
            // tests, and netperf's local CPU per unit of work (µs per
            // transaction; per KB for the stream) on the client side.
            for test in self.tests().into_iter().filter(|t| *t != Test::TcpStream) {
                for n in self.counts() {
                    let _ = write!(md, "| {} P99 latency (µs) | {n} |", test.name());
                    self.cells(&mut md, scenario, &paths, test, n, |m| m.p99_us, 0, None);
                }
            }
            for test in self.tests() {
                let unit = if test == Test::TcpStream {
                    "KB"
                } else {
                    "trans."
                };
                for n in self.counts() {
                    let _ = write!(md, "| {} CPU (µs/{unit}) | {n} |", test.name());
                    self.cells(&mut md, scenario, &paths, test, n, |m| m.cpu_us_per_unit, 2, None);
                }
            }
            let retrans: f64 = self
                .samples
                .iter()
                .filter(|s| s.scenario == scenario && s.test == Test::TcpStream)
                .map(|s| s.m.retransmits.max(0.0))
                .sum();
            md.push('\n');
            if self.tests().contains(&Test::TcpStream) {
                let _ = writeln!(
                    md,
                    "TCP retransmits over every TCP_STREAM run of this scenario: {retrans:.0}.\n"
                );
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(
                md,
                "### Failed measurements\n\n{} measurement(s) failed; their points keep the runs that worked.\n",
                self.failures.len()
            );
            for f in &self.failures {
                let _ = writeln!(
                    md,
                    "- `{}` {} {} at {} Services, run {} (data port {}): {}",
                    f.scenario.name(),
                    f.path.name(),
                    f.test.name(),
                    f.services,
                    f.run + 1,
                    f.data_port,
                    f.error.replace('\n', " ")
                );
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "### Targets\n\n| target | Services | measured | |\n| --- | ---: | ---: | --- |"
        );
        for t in TARGETS {
            let Some(base) = t.against.or_else(|| t.path.baseline(t.scenario)) else {
                continue;
            };
            for n in self.counts() {
                if let Some(r) = self.ratio_to(t.scenario, t.path, base, t.test, n) {
                    let verdict = if r >= t.min_ratio { "met" } else { "short" };
                    let lat = self
                        .p50_ratio_to(t.scenario, t.path, base, t.test, n)
                        .map(|l| format!(" (P50 latency {l:.2}×)"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        md,
                        "| {} ≥ {:.2}× `{}` | {n} | {r:.3}×{lat} | {verdict} |",
                        t.what,
                        t.min_ratio,
                        base.name()
                    );
                }
            }
        }
        md
    }

    /// The headline: per scenario and request/response test, each
    /// translated path's ratio to its direct path at the fewest and the
    /// most Services (transactions/s; higher is better).
    pub fn summary(&self) -> String {
        let counts = self.counts();
        let (Some(&lo), Some(&hi)) = (counts.first(), counts.last()) else {
            return String::new();
        };
        let at = if lo == hi {
            format!("{lo} Services")
        } else {
            format!("{lo} → {hi} Services")
        };
        let mut md = format!(
            "### Summary\n\nTransactions/s over the matching direct path, {at} (1.00× = as fast as no Service at all).\n\n\
             | scenario | test | riptide | iptables | nftables |\n| --- | --- | ---: | ---: | ---: |\n"
        );
        for scenario in self.scenarios() {
            for test in self.tests().into_iter().filter(|t| *t != Test::TcpStream) {
                let cell = |path: DataPath| -> String {
                    let r = |n| self.ratio(scenario, path, test, n);
                    match (r(lo), r(hi)) {
                        (Some(a), Some(b)) if lo != hi => format!("{a:.2}× → {b:.2}×"),
                        (Some(a), _) => format!("{a:.2}×"),
                        _ => "–".into(),
                    }
                };
                let riptide: Vec<String> = [
                    DataPath::RiptideSock,
                    DataPath::RiptideTc,
                    DataPath::Riptide,
                    DataPath::Policy,
                ]
                .into_iter()
                .filter(|p| self.paths(scenario).contains(p))
                .map(|p| {
                    let c = cell(p);
                    match p {
                        DataPath::RiptideSock => format!("{c} (socket LB)"),
                        DataPath::RiptideTc => format!("{c} (tc)"),
                        DataPath::Policy => format!("{c} (100 NetworkPolicies)"),
                        _ => c,
                    }
                })
                .collect();
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} | {} | {} |",
                    scenario.name(),
                    test.name(),
                    riptide.join("<br>"),
                    cell(DataPath::Iptables),
                    cell(DataPath::Nftables)
                );
            }
        }
        md.push('\n');
        md
    }

    /// One table row's cells: median (min–max) of `field` per path, and
    /// with `ratio_mark` the median's ratio to the path's direct path, set
    /// off by that mark (markdown emphasis).
    fn cells(
        &self,
        md: &mut String,
        scenario: Scenario,
        paths: &[DataPath],
        test: Test,
        n: usize,
        field: impl Fn(&super::netperf::Measurement) -> f64,
        decimals: usize,
        ratio_mark: Option<&str>,
    ) {
        for p in paths {
            match self.metric(scenario, *p, test, n, &field) {
                Some(s) => {
                    let _ = write!(
                        md,
                        " {:.d$} ({:.d$}–{:.d$})",
                        s.median,
                        s.min,
                        s.max,
                        d = decimals
                    );
                    if let Some(mark) = ratio_mark
                        && let Some(r) = p
                            .baseline(scenario)
                            .and_then(|base| self.metric_ratio(scenario, *p, base, test, n, &field))
                    {
                        let _ = write!(md, " {mark}{r:.2}×{mark}");
                    }
                    md.push_str(" |");
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }

    /// A report written earlier (`results.json`), to render again.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// results.md and plot.svg again from the samples (results.json is
    /// left as it is).
    pub fn render(&self, dir: &Path) -> Result<()> {
        std::fs::write(dir.join("results.md"), self.markdown()).context("writing results.md")?;
        self.plot(&dir.join("plot.svg"))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        std::fs::write(dir.join("results.json"), json).context("writing results.json")?;
        std::fs::write(dir.join("results.md"), self.markdown()).context("writing results.md")?;
        self.plot(&dir.join("plot.svg"))
    }

    /// One panel per (test, scenario): throughput against Service count,
    /// a line per path.
    fn plot(&self, path: &Path) -> Result<()> {
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
        let tests = self.tests();
        let scenarios = self.scenarios();
        let counts = self.counts();
        let (rows, cols) = (tests.len().max(1), scenarios.len().max(1));
        let root =
            SVGBackend::new(path, (430 * cols as u32, 300 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let areas = root.split_evenly((rows, cols));
        // Direct paths in blues/greys, riptide's in green/cyan, the
        // baselines in red/orange; riptide-tc and riptide never share a
        // scenario, nor do direct-plain and direct-sym.
        let color_of = |p: DataPath| match p {
            DataPath::Direct => BLUE,
            DataPath::DirectPlain | DataPath::DirectSym => RGBColor(90, 90, 200),
            DataPath::DirectNode => RGBColor(150, 150, 150),
            DataPath::RiptideSock => GREEN,
            DataPath::RiptideTc | DataPath::Riptide => CYAN,
            DataPath::Iptables => RED,
            DataPath::Nftables => RGBColor(255, 140, 0),
            DataPath::Policy => MAGENTA,
        };
        for (r, test) in tests.iter().enumerate() {
            for (c, scenario) in scenarios.iter().enumerate() {
                let area = &areas[r * cols + c];
                let max = self
                    .samples
                    .iter()
                    .filter(|s| s.test == *test && s.scenario == *scenario)
                    .map(|s| s.m.throughput)
                    .fold(0.0_f64, f64::max)
                    * 1.15;
                let mut chart = ChartBuilder::on(area)
                    .caption(
                        format!("{} ({}) — {}", test.name(), test.unit(), scenario.name()),
                        ("sans-serif", 15),
                    )
                    .margin(10)
                    .margin_right(30)
                    .x_label_area_size(30)
                    .y_label_area_size(60)
                    .build_cartesian_2d(0..counts.len().saturating_sub(1).max(1), 0.0..max.max(1.0))
                    .map_err(|e| err(&e))?;
                let labels = counts.clone();
                chart
                    .configure_mesh()
                    .x_labels(counts.len())
                    .x_label_formatter(&|i| {
                        labels
                            .get(*i)
                            .map(|n| format!("{n} svc"))
                            .unwrap_or_default()
                    })
                    .y_label_formatter(&|y| format!("{y:.0}"))
                    .draw()
                    .map_err(|e| err(&e))?;
                for p in self.paths(*scenario) {
                    let color = color_of(p);
                    let pts: Vec<(usize, f64)> = counts
                        .iter()
                        .enumerate()
                        .filter_map(|(i, n)| {
                            self.throughput(*scenario, p, *test, *n)
                                .map(|s| (i, s.median))
                        })
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(|e| err(&e))?
                        .label(p.name())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                    chart
                        .draw_series(
                            pts.into_iter()
                                .map(|(x, y)| Circle::new((x, y), 3, color.filled())),
                        )
                        .map_err(|e| err(&e))?;
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerRight)
                    .label_font(("sans-serif", 11))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::netperf::Measurement;

    fn sample(scenario: Scenario, path: DataPath, n: usize, t: f64) -> Sample {
        Sample {
            scenario,
            path,
            test: Test::TcpCrr,
            services: n,
            run: 0,
            data_port: 1,
            cpu: Some(0),
            probe: None,
            m: Measurement {
                throughput: t,
                p50_us: 1e6 / t,
                ..Default::default()
            },
        }
    }

    #[test]
    fn median_and_spread() {
        let s = stat(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(stat(&[1.0, 2.0, 3.0, 4.0]).unwrap().median, 2.5);
        assert!(stat(&[]).is_none());
    }

    #[test]
    fn tables_show_ratios_to_the_matching_direct_path_and_plot_renders() {
        let r = Report::new(
            vec![
                sample(Scenario::ClusterIp, DataPath::Direct, 1, 1000.0),
                sample(Scenario::ClusterIp, DataPath::RiptideSock, 1, 900.0),
                sample(Scenario::ClusterIp, DataPath::DirectPlain, 1, 2000.0),
                sample(Scenario::ClusterIp, DataPath::Iptables, 1, 1000.0),
                sample(Scenario::NodePortLocal, DataPath::Direct, 1, 800.0),
                sample(Scenario::NodePortLocal, DataPath::Iptables, 1, 600.0),
            ],
            Duration::from_secs(1),
            true,
            1,
            1,
        );
        let md = r.markdown();
        assert!(md.contains("**0.90×**"), "riptide-sock vs direct: {md}");
        assert!(md.contains("**0.50×**"), "iptables vs direct-plain: {md}");
        assert!(md.contains("**2.00×**"), "direct-plain vs direct: {md}");
        assert!(
            md.contains("**0.75×**"),
            "NodePort iptables vs outside direct: {md}"
        );
        assert!(
            md.contains("### outside → NodePort on node 1 → pod on node 1"),
            "{md}"
        );
        assert!(md.contains("| ClusterIP via riptide socket LB, TCP_CRR ≥ 0.97× `direct` | 1 | 0.900× (P50 latency 1.11×) | short |"), "{md}");
        // A failed measurement is listed, and the report loads back.
        let r = r.with_failures(vec![Failure {
            scenario: Scenario::ClusterIp,
            path: DataPath::DirectNode,
            test: Test::TcpCrr,
            services: 1,
            run: 1,
            data_port: 40054,
            error: "netperf: connect_data_socket failed".into(),
        }]);
        let md = r.markdown();
        assert!(md.contains("- `clusterip` direct-node TCP_CRR at 1 Services, run 2 (data port 40054): netperf: connect_data_socket failed"), "{md}");
        let back: Report = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back.markdown(), md);
        let dir = std::env::temp_dir().join(format!("riptide-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        r.write(&dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("plot.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("TCP_CRR") && svg.contains("nodeport-local"));
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
        assert_eq!(json["samples"][4]["scenario"], "nodeport-local");
        assert!(json["error"].is_null());
        let partial = r.failed(Some("netperf failed".into()));
        assert!(
            partial
                .markdown()
                .starts_with("**Partial run**: stopped after 6 measurements: netperf failed")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
