//! The apiserver benchmark (the `apiserver_bench` example, through its
//! command line) runs end to end at `--tiny` sizes (60 pods, 5 idle-watch
//! samples, 6 watchers × 10 events; no timing asserted): both stores, every
//! measurement present, every watch event delivered.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use riptide_test_support::workspace_example;

#[test]
fn bench_runs_on_both_stores() {
    let server = Path::new(env!("CARGO_BIN_EXE_riptide-controlplane"));
    let bench = workspace_example(server.parent().unwrap(), "riptide-controlplane", "apiserver_bench");
    let out = std::process::Command::new(&bench)
        .arg("--tiny")
        .arg("--server-bin")
        .arg(server)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "apiserver_bench --tiny: {}", out.status);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    let stores = r["stores"].as_array().unwrap();
    let names: Vec<&str> = stores.iter().map(|s| s["store"].as_str().unwrap()).collect();
    assert_eq!(names, ["embedded", "etcd"]);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    for s in stores {
        let store = s["store"].as_str().unwrap();
        let c = &s["create"];
        assert_eq!((n(&c["pods"]), n(&c["latency"]["samples"]), n(&c["watch_latency"]["samples"])), (60, 60, 60), "{store}");
        assert_eq!(n(&s["watch_idle"]["samples"]), 5);
        assert_eq!((n(&s["list"]["items"]), n(&s["list"]["pages"])), (60, 1));
        let full_bytes = n(&s["list"]["full_bytes"]);
        assert!(full_bytes > 60 * 500, "{full_bytes} bytes for 60 pods");
        assert_eq!((n(&s["fanout"]["missing"]), n(&s["fanout"]["latency"]["samples"])), (0, 60));
        let rss = &s["server_rss"];
        assert!(n(&rss["peak_kib"]) >= n(&rss["current_kib"]) && n(&rss["current_kib"]) > 0);
        assert_eq!(!s["etcd_rss"].is_null(), store == "etcd");
    }
}
