//! Maglev next to random (`lb_bench maglev [SAMPLES]`, run by `cargo xtask
//! bench` as `ebpf-maglev`). What each number includes:
//!
//! * `table_ms` — building one Maglev table in user space
//!   (`maglev::table`: sort, permutations, the fill loop) for `backends`
//!   backends at size `m`; median of `rounds`.
//! * `upsert_ms` / `random_upsert_ms` — `Services::upsert` of a ClusterIP
//!   service of `backends` backends whose backend set just changed (one
//!   backend in, one out, alternating): the plan, the backend and slot
//!   writes and, for Maglev, the table build plus its `ceil(m / 1024)`
//!   chunk writes. `upsert_ratio` is Maglev over random.
//! * `maglev_new_ns` / `random_new_ns` — the first packet of a flow through
//!   `rt_from_pod` (one run per syscall, fresh source port each), median;
//!   two services with the same backends in one datapath, measured
//!   alternately so drift hits both. Maglev adds the 5-tuple hash and one
//!   chunk lookup in place of the random slot lookup. `new_ratio` is Maglev
//!   over random.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::Result;
use riptide_common::Config;
use riptide_datapath::{
    Datapath, Pinning,
    maglev::{self, TableSize},
    service::{Algorithm, Backend},
};

use crate::bench::{clusterip, frame, median_mean, remote, run_ns};

fn backends(n: u32, first: u32) -> Vec<Backend> {
    (first..first + n)
        .map(|i| {
            remote(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 42, 0, 0)) + 256 + i),
                8080,
            )
        })
        .collect()
}

fn ms(v: Vec<f64>) -> f64 {
    let mut v = v;
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub struct Rebuild {
    pub backends: u32,
    pub m: TableSize,
    pub table_ms: f64,
    pub upsert_ms: f64,
    pub random_upsert_ms: f64,
}

/// Table build and service update times at `n` backends, table size `m`.
pub fn rebuild(n: u32, m: TableSize, rounds: u32) -> Result<Rebuild> {
    let entries: Vec<(u32, Ipv4Addr, u16)> = backends(n, 0)
        .iter()
        .zip(1..)
        .map(|(b, id)| (id, *b.addr.ip(), b.addr.port()))
        .collect();
    let mut table = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let _ = std::hint::black_box(maglev::table(&entries, m));
        table.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let upsert = |algorithm: Algorithm| -> Result<f64> {
        let mut dp = Datapath::load(&Pinning::None)?;
        dp.set_config(&Config::default())?;
        let mut svcs = dp.services()?;
        let vip = Ipv4Addr::new(10, 43, 0, 10);
        let mut svc = clusterip("bench/maglev:p".into(), vip, 80, backends(n, 0));
        svc.algorithm = algorithm;
        svcs.upsert(&svc)?;
        let mut v = Vec::new();
        for r in 0..rounds {
            // One backend replaced per round: the set changes, the table
            // is rebuilt and rewritten.
            svc.backends = backends(n, r % 2);
            let t = Instant::now();
            svcs.upsert(&svc)?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(ms(v))
    };
    let upsert_ms = upsert(Algorithm::Maglev(m))?;
    let random_upsert_ms = upsert(Algorithm::Random)?;
    Ok(Rebuild {
        backends: n,
        m,
        table_ms: ms(table),
        upsert_ms,
        random_upsert_ms,
    })
}

pub struct NewFlow {
    pub backends: u32,
    pub maglev_new_ns: u64,
    pub random_new_ns: u64,
}

/// First-packet cost of a Maglev and a random service of `n` backends.
pub fn new_flow(n: u32, samples: u32) -> Result<NewFlow> {
    let mut dp = Datapath::load(&Pinning::None)?;
    dp.set_config(&Config {
        node_ip_be: u32::from(Ipv4Addr::new(198, 18, 0, 1)).to_be(),
        ..Default::default()
    })?;
    let mut svcs = dp.services()?;
    let (mag_vip, rnd_vip) = (Ipv4Addr::new(10, 43, 0, 10), Ipv4Addr::new(10, 43, 0, 11));
    let mut mag = clusterip("bench/maglev:p".into(), mag_vip, 80, backends(n, 0));
    mag.algorithm = Algorithm::Maglev(TableSize::DEFAULT);
    svcs.upsert(&mag)?;
    svcs.upsert(&clusterip(
        "bench/random:p".into(),
        rnd_vip,
        80,
        backends(n, 0),
    ))?;
    let (mut m, mut r) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let sport = 1024 + (i % 60_000) as u16;
        m.push(run_ns(&mut dp, &frame(sport, mag_vip, 80, 0x02))?);
        r.push(run_ns(&mut dp, &frame(sport, rnd_vip, 80, 0x02))?);
    }
    Ok(NewFlow {
        backends: n,
        maglev_new_ns: median_mean(m).0,
        random_new_ns: median_mean(r).0,
    })
}

/// Prints one JSON object per measurement.
pub fn main(samples: u32) -> Result<()> {
    for m in [16381, 65521] {
        let r = rebuild(1000, TableSize::new(m)?, 11)?;
        println!(
            "{{\"path\":\"maglev_rebuild\",\"backends\":{},\"m\":{},\"table_ms\":{:.2},\"upsert_ms\":{:.2},\"random_upsert_ms\":{:.2},\"upsert_ratio\":{:.2}}}",
            r.backends,
            r.m,
            r.table_ms,
            r.upsert_ms,
            r.random_upsert_ms,
            r.upsert_ms / r.random_upsert_ms.max(1e-9)
        );
    }
    for n in [10, 1000] {
        let r = new_flow(n, samples)?;
        println!(
            "{{\"path\":\"maglev_new_flow\",\"backends\":{},\"samples\":{samples},\"maglev_new_ns\":{},\"random_new_ns\":{},\"new_ratio\":{:.3}}}",
            r.backends,
            r.maglev_new_ns,
            r.random_new_ns,
            r.maglev_new_ns as f64 / (r.random_new_ns as f64).max(1.0)
        );
    }
    Ok(())
}
