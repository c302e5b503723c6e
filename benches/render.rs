//! Render benchmarks: synthetic clusters of N Services × 10 endpoints (one TCP port each,
//! a quarter of them NodePort). Prints time for deriving the per-family state, a full
//! iptables render, and a partial render after a one-endpoint change; plus the process's
//! resident memory holding the model. Run: `cargo bench --bench render`.

use std::time::{Duration, Instant};

use kproxy::config::Config;
use kproxy::iptables::render::{RenderOptions, Renderer};
use kproxy::model::{ClusterState, IpFamily, NodeContext};

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn build(n: usize) -> ClusterState {
    kproxy::model::synthetic::cluster(n, 10)
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed());
        last = Some(v);
    }
    (best, last.expect("runs > 0"))
}

fn measure(n: usize) {
    let cfg = Config {
        cluster_cidrs: vec!["10.128.0.0/10".parse().unwrap()],
        ..Config::default()
    };
    let addrs = vec!["192.168.0.2/24".parse().unwrap()];
    let settings = cfg.family_settings(IpFamily::V4, "node-1", None, &addrs);
    let node = NodeContext {
        name: "node-1".into(),
        zone: None,
        prefer_same_node: true,
    };
    let before = rss_kib("VmRSS:");
    let mut st = build(n);
    let model_kib = rss_kib("VmRSS:").saturating_sub(before);
    let cold = Instant::now();
    let _ = st.proxy_state(IpFamily::V4, &node);
    let t_state_cold = cold.elapsed();
    // Later calls reuse the per-Service derivations that did not change.
    let (t_state, ps) = best_of(5, || st.proxy_state(IpFamily::V4, &node));
    let mut r = Renderer::new(settings.clone());
    let opts = RenderOptions {
        full: true,
        ..RenderOptions::default()
    };
    let (t_full, full) = best_of(5, || r.render(&ps, &opts));
    let full_len = full.payload.len();
    r.commit(full);
    // One endpoint of one Service changes.
    let mut slice = st
        .slices()
        .find(|s| s.service == "svc7")
        .cloned()
        .expect("svc7 slice");
    slice.endpoints[3].ip = "10.200.0.1".parse().unwrap();
    st.insert_slice(slice);
    let t = Instant::now();
    let ps2 = st.proxy_state(IpFamily::V4, &node);
    let t_state_after_change = t.elapsed();
    // Large-cluster mode (>1000 endpoints) defers stale-chain deletion to once per
    // syncPeriod; measure the sync that does delete.
    let popts = RenderOptions {
        large_cluster_cleanup_due: true,
        ..RenderOptions::default()
    };
    let runs = if std::env::var_os("PROFILE_PARTIAL").is_some() {
        300
    } else {
        5
    };
    let (t_partial, partial) = best_of(runs, || r.render(&ps2, &popts));
    assert_eq!(partial.services_written, 1);
    assert_eq!(partial.deleted_chains.len(), 1);
    println!(
        "| {n} × 10 | {:.1} MiB | {:.1} ms / {:.1} ms / {:.1} ms | {:.1} ms | {:.1} MiB | {:.2} ms | {} KiB | {:.0} MiB |",
        model_kib as f64 / 1024.0,
        t_state_cold.as_secs_f64() * 1e3,
        t_state.as_secs_f64() * 1e3,
        t_state_after_change.as_secs_f64() * 1e3,
        t_full.as_secs_f64() * 1e3,
        full_len as f64 / 1048576.0,
        t_partial.as_secs_f64() * 1e3,
        partial.payload.len() / 1024,
        rss_kib("VmHWM:") as f64 / 1024.0,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a bare number means "measure this size only".
    if let Some(n) = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
    {
        measure(n);
        return;
    }
    println!("| services × endpoints | model RSS | proxy_state cold / unchanged / after 1 change | full render | payload | partial render (1 endpoint) | partial payload | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().expect("own path");
    for n in [1000usize, 5000, 10000] {
        // A fresh process per size, so that memory figures are not polluted.
        let status = std::process::Command::new(&exe)
            .arg(n.to_string())
            .status()
            .expect("run bench child");
        assert!(status.success());
    }
}
