//! `--hop node1`: node 1's forwarding rate alone. The whole-path mode
//! measures one core that carries an `AF_PACKET` generator's syscalls and
//! skbs, the bridge twice, node 1, node 2 and the pod's UDP layer; node 1,
//! the part a NodePort datapath changes, is a fraction of it, and it
//! receives skbs, so XDP on its veth has to turn an skb into an XDP buffer
//! first. Here, on the same namespaces and with the same node 1 setup per
//! path:
//!
//! * the generator is `riptide_test_support::veth_xdp::Generator` (XDP in
//!   `BPF_PROG_TEST_RUN` live-frames mode) run in the switch namespace,
//!   redirecting each frame into `p-n1`: it reaches node 1's `eth0` as an
//!   `xdp_frame` on its veth ring, no skb and no bridge on the way. (From
//!   the outside namespace the frames would cross the bridge, which
//!   builds an skb.) Node 1's `eth0` needs NAPI for that ring: its XDP
//!   program in the XDP paths, GRO on in every path;
//! * the sink is `veth_xdp::Sink` on `p-n1`, node 1's uplink peer: it
//!   counts what node 1 sends back out (forwarded skbs, or `XDP_TX`
//!   frames) by addresses and drops it there; only UDP to the pod from the
//!   address the path must leave with (node 1 after SNAT; the client for
//!   `direct` and DSR) counts as forwarded, anything else fails the run.
//!
//! Both run on the generator's CPU in one `bpf(2)` call: the program for
//! a batch, then at its end the softirq that runs node 1's and the sink's
//! NAPI. The rate is frames counted at the sink over the time of the
//! calls; it still includes the generator's program and the sink, the
//! same for every path.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use riptide_test_support::{
    netns,
    veth_xdp::{self, Generator, Sink, SinkCounts},
};

use super::{
    FLOWS, MAX_PACKETS, Opts, Path, Point, frames, pod_rx,
    topo::{NODE1_IP, OUTSIDE_IP, POD_IP, Topo},
    traffic,
};

/// Frames per `BPF_PROG_TEST_RUN` call: the time bound is checked between
/// calls (about 0.1 s each at this machine's rates).
const CHUNK: u32 = 1 << 17;

pub struct Hop {
    gens: Vec<(Path, Arc<Generator>)>,
    sw: String,
    batch: u32,
    gro: bool,
}

impl Hop {
    /// A generator per path. `gro`: GRO on node 1's `eth0` while this
    /// mode measures (false: the experiment of what a veth without NAPI
    /// does with redirected frames).
    pub fn new(t: &Topo, batch: u32, gro: bool) -> Result<Self> {
        let sw = t.sw.name().to_owned();
        let ifindex = netns::run_in(&sw, || {
            // SAFETY: a NUL-terminated name.
            unsafe { libc::if_nametoindex(c"p-n1".as_ptr()) }
        });
        ensure!(ifindex != 0, "p-n1 in {sw}");
        let mut gens = Vec::new();
        for path in Path::ALL {
            // Every flow's frame differs in the source port only; the
            // generator makes the others from the first.
            let f = frames(path);
            let g = Generator::new(&f[0], FLOWS, ifindex)
                .with_context(|| format!("loading the generator of {}", path.name()))?;
            gens.push((path, Arc::new(g)));
        }
        Ok(Self {
            gens,
            sw,
            batch,
            gro,
        })
    }

    fn send(&self, path: Path, packets: u64, time: Duration, cpu: usize) -> Result<traffic::Sent> {
        let g = self
            .gens
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, g)| Arc::clone(g))
            .context("generator")?;
        let batch = self.batch;
        netns::run_in(&self.sw, move || -> Result<traffic::Sent> {
            traffic::pin(cpu)?;
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < packets && start.elapsed() < time {
                let n = (packets - sent).min(u64::from(CHUNK)) as u32;
                g.run(n, batch).context("BPF_PROG_TEST_RUN (live frames)")?;
                sent += u64::from(n);
            }
            Ok(traffic::Sent {
                packets: sent,
                elapsed: start.elapsed(),
            })
        })
    }

    /// One measurement of `path` (node 1 set up by the caller): GRO on
    /// node 1's `eth0` and the sink on `p-n1` for its duration only, so
    /// the whole-path mode meets the devices as it always did.
    pub fn measure(&self, t: &Topo, path: Path, o: &Opts) -> Result<Point> {
        gro(t, self.gro)?;
        let sink = netns::run_in(t.sw.name(), || {
            Sink::attach("p-n1", POD_IP, [NODE1_IP, OUTSIDE_IP])
        })
        .context("attaching the sink to p-n1")?;
        let r = self.measure_with(t, path, o, &sink);
        drop(sink);
        let checked = r.is_ok().then(|| self.check(t, path, o.cpu));
        gro(t, false)?;
        if let Some(c) = checked {
            c?;
        }
        r
    }

    /// The floor: node 1's `eth0` runs a two-instruction `XDP_TX` program
    /// (riptide and the rules off, set up by the caller), so each frame of
    /// the `direct` path leaves unchanged right away. What the rate costs
    /// besides node 1's forwarding (generator, veth rings, sink); a path's
    /// own cost per packet is 1/rate − 1/floor.
    pub fn floor(&self, t: &Topo, o: &Opts) -> Result<Point> {
        let _tx = netns::run_in(t.node1.name(), || veth_xdp::attach_tx("eth0"))
            .context("attaching XDP_TX to node 1's eth0")?;
        let sink = netns::run_in(t.sw.name(), || {
            Sink::attach("p-n1", POD_IP, [NODE1_IP, OUTSIDE_IP])
        })
        .context("attaching the sink to p-n1")?;
        self.measure_with(t, Path::Direct, o, &sink)
    }

    /// The sink checks addresses only; this checks the rest of a sample:
    /// the path's frames, with the sink replaced by the `XDP_PASS` program
    /// that `XDP_TX` into a veth needs, must reach the pod's UDP layer
    /// through node 2 with valid checksums (each generated source port
    /// carries its compensated payload word).
    fn check(&self, t: &Topo, path: Path, cpu: usize) -> Result<()> {
        const SAMPLE: u64 = 4096;
        let _pass = t
            .xdp_pass_on_peer()
            .context("attaching XDP_PASS to node 1's uplink peer")?;
        let (rx0, bad0) = pod_rx(t)?;
        // Paced: the rest of the path (node 2, the pod's backlog) takes a
        // fraction of what node 1 forwards, a burst would overflow it.
        for _ in 0..SAMPLE / 256 {
            self.send(path, 256, Duration::from_secs(1), cpu)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(50));
        let (rx1, bad1) = pod_rx(t)?;
        ensure!(
            bad1 == bad0 && rx1 - rx0 >= SAMPLE * 99 / 100,
            "{}: of {SAMPLE} generated frames the pod received {} valid, {} with a bad checksum",
            path.name(),
            rx1 - rx0,
            bad1 - bad0
        );
        Ok(())
    }

    fn measure_with(&self, t: &Topo, path: Path, o: &Opts, sink: &Sink) -> Result<Point> {
        // Every flow's first packets (conntrack, riptide's tc-made flows)
        // before the clock starts: flows are picked at random, 64 × 64
        // frames miss one with a chance of 64 · (63/64)^4096 ≈ 1e-26.
        self.send(path, u64::from(FLOWS) * 64, Duration::from_secs(1), o.cpu)?;
        std::thread::sleep(Duration::from_millis(100));
        let c0 = sink.counts()?;
        let (si0, _) = traffic::softirq_seconds()?;
        let cpu0 = traffic::cpu_times(o.cpu)?;
        let sent = self.send(path, MAX_PACKETS, Duration::from_secs_f64(o.seconds), o.cpu)?;
        let (si1, _) = traffic::softirq_seconds()?;
        let cpu1 = traffic::cpu_times(o.cpu)?;
        let c1 = sink.counts()?;
        let d = SinkCounts {
            from_first: c1.from_first - c0.from_first,
            from_second: c1.from_second - c0.from_second,
            other: c1.other - c0.other,
        };
        // SNAT paths leave node 1 from node 1; `direct` and DSR keep the
        // client's address.
        let (delivered, wrong) = match path {
            Path::Direct | Path::RiptideXdpDsr => (d.from_second, d.from_first + d.other),
            _ => (d.from_first, d.from_second + d.other),
        };
        if wrong > sent.packets / 1000 {
            eprintln!("{}", t.counters());
            bail!(
                "{}: the sink saw {wrong} packets that were not translated as this path must ({d:?})",
                path.name()
            );
        }
        Ok(Point {
            sent: sent.packets,
            delivered,
            pps: delivered as f64 / sent.elapsed.as_secs_f64(),
            softirq_s_per_mpkt: if delivered == 0 {
                f64::NAN
            } else {
                (si1 - si0) / (delivered as f64 / 1e6)
            },
            gen_cpu_us: (delivered > 0).then(|| {
                let per = 1e6 / delivered as f64;
                ((cpu1.0 - cpu0.0) * per, (cpu1.1 - cpu0.1) * per)
            }),
        })
    }
}

/// GRO on or off on node 1's `eth0` (off is the veth's default).
fn gro(t: &Topo, on: bool) -> Result<()> {
    let n1 = t.node1.name();
    let st = netns::try_command(n1, "ethtool")?
        .args(["-K", "eth0", "gro", if on { "on" } else { "off" }])
        .status()?;
    ensure!(st.success(), "ethtool -K eth0 gro in {n1}");
    Ok(())
}
