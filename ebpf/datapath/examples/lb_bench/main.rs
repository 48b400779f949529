//! ns/packet of the tc LB path at 1, 1k and 10k services, and the cost of
//! the socket-LB connect hook (needs root; see `bench.rs` for what each
//! number includes).
//!
//! `cargo run -p riptide-datapath --example lb_bench --release [-- SAMPLES]`
//! prints one JSON object per scenario; `cargo xtask bench` collects them.
//!
//! `lb_bench profile MODE [N]` runs one LB path in a loop for a profiler
//! (`perf record -e cpu-clock -- target/release/examples/lb_bench profile
//! est`): MODE `est` (established flow, `repeat` = N in one syscall), `new`
//! (N new flows, one syscall each) or `sock` (N UDP connects through the
//! socket-LB hook). It only drives load; the numbers come from the default
//! mode.
//!
//! `lb_bench maglev [SAMPLES]`: Maglev next to random (`maglev.rs`): table
//! rebuild at 1k backends, first-packet cost. `lb_bench xdp [SAMPLES]`:
//! ns/packet of `rt_xdp_net` next to the tc path at 1, 1k, 10k Services
//! (`xdp.rs`).
mod bench;
mod maglev;
mod xdp;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("profile") {
        return profile(args.get(1).map_or("", String::as_str), args.get(2));
    }
    if args.first().map(String::as_str) == Some("maglev") {
        return maglev::main(args.get(1).map_or(Ok(5000), |s| s.parse())?);
    }
    if args.first().map(String::as_str) == Some("xdp") {
        return xdp::main(args.get(1).map_or(Ok(5000), |s| s.parse())?);
    }
    let samples: u32 = args.first().map_or(Ok(5000), |s| s.parse())?;
    for n in [1, 1_000, 10_000] {
        let r = bench::tc_lb(n, samples)?;
        println!(
            "{{\"path\":\"tc\",\"services\":{},\"samples\":{},\"ct_hit_repeat_ns\":{:.1},\"ct_hit_median_ns\":{},\"ct_hit_mean_ns\":{:.1},\"new_flow_median_ns\":{},\"new_flow_mean_ns\":{:.1},\"passthrough_ns\":{:.1},\"passthrough_single_median_ns\":{},\"passthrough_new_median_ns\":{},\"floor_ns\":{:.1}}}",
            r.services,
            r.samples,
            r.ct_hit_repeat_ns,
            r.ct_hit_median_ns,
            r.ct_hit_mean_ns,
            r.new_flow_median_ns,
            r.new_flow_mean_ns,
            r.passthrough_ns,
            r.passthrough_single_median_ns,
            r.passthrough_new_median_ns,
            r.floor_ns
        );
    }
    for n in [1, 10_000] {
        let r = bench::sock_connect(n, samples)?;
        println!(
            "{{\"path\":\"sock_connect4\",\"services\":{},\"connects\":{},\"prog_hit_ns\":{:.1},\"prog_miss_ns\":{:.1},\"connect_hit_median_ns\":{},\"connect_miss_median_ns\":{}}}",
            r.services,
            r.connects,
            r.prog_hit_ns,
            r.prog_miss_ns,
            r.connect_hit_median_ns,
            r.connect_miss_median_ns
        );
    }
    Ok(())
}

fn profile(mode: &str, n: Option<&String>) -> anyhow::Result<()> {
    let n: u32 = n.map_or(Ok(20_000_000), |s| s.parse())?;
    match mode {
        "sock" => println!("{:?}", bench::sock_connect(1000, n)?),
        "new" => bench::new_flows(1000, n)?,
        _ => println!("{} ns/run", bench::established_repeat(1000, n)?),
    }
    Ok(())
}
