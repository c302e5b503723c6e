//! Where the daemon's memory goes at N Services × 10 endpoints, in nftables mode: the
//! compact model, the per-family derived state, the peak of a full render, and what the
//! renderer keeps as its record of the applied table. Uses the binary's allocator
//! (mimalloc) and releases free memory between steps, so each figure is live data.
//! Run: `cargo bench --bench memory` (SIZES=1000,10000 by default).

use kproxy::config::Config;
use kproxy::model::{IpFamily, NodeContext};
use kproxy::nftables::render::{NftRenderer, RenderOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mib() -> f64 {
    kproxy::memory::release_free_memory();
    kproxy::memory::usage_kib().map_or(0, |(rss, _)| rss) as f64 / 1024.0
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("| services × endpoints | model | derived state | full render peak (transaction) | renderer record |");
    println!("|---|---|---|---|---|");
    for n in sizes {
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
        let base = rss_mib();
        let st = kproxy::model::synthetic::cluster(n, 10);
        let model = rss_mib();
        let ps = st.proxy_state(IpFamily::V4, &node);
        let derived = rss_mib();
        let mut r = NftRenderer::new(settings);
        let rendered = r.render(
            &ps,
            &RenderOptions {
                full: true,
                now_ms: 0,
                existing: None,
            },
        );
        let peak = rss_mib();
        drop(rendered.main);
        r.commit(rendered.record);
        let record = rss_mib();
        println!(
            "| {n} × 10 | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            model - base,
            derived - model,
            peak - derived,
            record - derived
        );
        drop(r);
        drop(ps);
        drop(st);
    }
}
