//! What one partial sync costs as the number of changed Services grows (the churn
//! soak's question: at 200 changes/s, does one sync of the changes of the last second
//! fit in that second?). nftables mode, upstream's layout, over netlink, in a fresh
//! network namespace: a cold sync of N Services × 10 endpoints, then for each K one
//! partial sync in which K Services each had one endpoint replaced, timed in its parts
//! (derive the proxy state, render, kernel apply).
//! Run (root): `cargo bench --bench partial_sync` (N=10000, K=1,10,50,200,1000).
//! Profiling only the partial syncs: `mkfifo /tmp/ctl; PERF_CTL=/tmp/ctl perf record -g
//! -D -1 --control fifo:/tmp/ctl -- target/release/deps/partial_sync-…` (the bench
//! enables perf after the cold sync and disables it at the end).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::IpAddr;
use std::time::Instant;

use kproxy::config::Config;
use kproxy::model::{synthetic, IpFamily, NodeContext};
use kproxy::nftables::netlink::Netlink;
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::SYNC_BATCH_OPS;
use netns::Netns;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn main() {
    if !netns::require_root("partial_sync bench") {
        return;
    }
    let n = env_list("N", "10000")[0];
    let ks = env_list("K", "1,10,50,200,1000");
    let cfg = Config {
        cluster_cidrs: vec!["10.128.0.0/10".parse().unwrap()],
        ..Config::default()
    };
    let settings = cfg.family_settings(
        IpFamily::V4,
        "node-1",
        None,
        &["192.168.0.2/24".parse().unwrap()],
    );
    let node = NodeContext {
        name: "node-1".into(),
        zone: None,
        prefer_same_node: true,
    };
    let ns = Netns::new("bpart");
    let rows = ns.run(move || {
        let mut state = synthetic::cluster(n, 10);
        let mut nl = Netlink::open().unwrap();
        let mut r = NftRenderer::new(settings);
        let t = Instant::now();
        let ps = state.proxy_state(IpFamily::V4, &node);
        let out = r.render(&ps, &RenderOptions::default());
        for part in out.main.into_batches(SYNC_BATCH_OPS) {
            nl.apply(&part).unwrap();
        }
        r.commit(out.record);
        eprintln!("cold sync of {n} × 10: {:.2} s", t.elapsed().as_secs_f64());
        let perf = |cmd: &str| {
            if let Some(ctl) = std::env::var_os("PERF_CTL") {
                std::fs::write(ctl, format!("{cmd}\n")).unwrap();
            }
        };
        perf("enable");
        let mut rows = Vec::new();
        let mut next = 0usize;
        for (round, &k) in ks.iter().enumerate() {
            for i in 0..k {
                let svc = format!("svc{}", (next + i) % n);
                let mut slice = state.slices().find(|s| s.service == svc).cloned().unwrap();
                slice.endpoints[0].ip =
                    IpAddr::from([10, 200 + round as u8, (i >> 8) as u8, i as u8]);
                state.insert_slice(slice);
            }
            next += k;
            let t = Instant::now();
            let ps = state.proxy_state(IpFamily::V4, &node);
            let derived = t.elapsed();
            let out = r.render(
                &ps,
                &RenderOptions {
                    full: false,
                    now_ms: 0,
                    existing: None,
                },
            );
            let rendered = t.elapsed() - derived;
            let ops = out.main.len();
            let t_apply = Instant::now();
            if let Some(c) = &out.cleanup {
                nl.apply(c).unwrap();
            }
            for part in out.main.into_batches(SYNC_BATCH_OPS) {
                nl.apply(&part).unwrap();
            }
            let applied = t_apply.elapsed();
            r.commit(out.record);
            rows.push((k, ops, derived, rendered, applied));
        }
        perf("disable");
        rows
    });
    println!(
        "| changed Services (K) | operations | derive state | render | kernel apply | total |"
    );
    println!("|---|---|---|---|---|---|");
    for (k, ops, d, r, a) in rows {
        let ms = |x: std::time::Duration| x.as_secs_f64() * 1e3;
        println!(
            "| {k} | {ops} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            ms(d),
            ms(r),
            ms(a),
            ms(d + r + a)
        );
    }
}
