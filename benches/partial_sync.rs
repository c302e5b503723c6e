//! What one partial sync costs as the number of changed Services grows (the churn
//! soak's question: at 200 changes/s, does one sync of the changes of the last second
//! fit in that second?). nftables mode, upstream's layout, over netlink, in a fresh
//! network namespace: a cold sync of N Services × 10 endpoints, then for each K one
//! partial sync in which K Services each had one endpoint replaced, timed in its parts
//! (derive the proxy state, render, kernel apply).
//! Run (root): `cargo bench --bench partial_sync` (N=10000, K=1,10,50,200,1000).
//! `LAYOUT=maps`: the same for the opt-in maps layout through its dataplane
//! (`MapsDataplane` over netlink: cold sync, the K rows, then `CHANGES` (default 100)
//! one-endpoint changes for p50/p99 and one Service removed and added back), each
//! sync split into its parts (derive the proxy state; the dataplane's own derive,
//! plan and kernel commit).
//! Profiling only the partial syncs: `mkfifo /tmp/ctl; PERF_CTL=/tmp/ctl perf record -g
//! -D -1 --control fifo:/tmp/ctl -- target/release/deps/partial_sync-…` (the bench
//! enables perf after the cold sync and disables it at the end).

#[path = "../tests/support/netns.rs"]
mod netns;

use std::net::IpAddr;
use std::time::Instant;

use kproxy::config::{Config, FamilySettings};
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

/// The node both layouts' runs render for: IPv4, pod CIDR 10.128.0.0/10, one address.
fn bench_node() -> (FamilySettings, NodeContext) {
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
    (settings, node)
}

fn main() {
    if !netns::require_root("partial_sync bench") {
        return;
    }
    if std::env::var("LAYOUT").as_deref() == Ok("maps") {
        maps();
        return;
    }
    let n = env_list("N", "10000")[0];
    let ks = env_list("K", "1,10,50,200,1000");
    let (settings, node) = bench_node();
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The maps layout: cold sync, K-Service partial syncs, one-endpoint changes.
fn maps() {
    use kproxy::dataplane::Dataplane;
    use kproxy::nftables::maps::dataplane::MapsDataplane;
    let n = env_list("N", "10000")[0];
    let ks = env_list("K", "1,10,50,200,1000");
    let changes = env_list("CHANGES", "100")[0];
    let (settings, node) = bench_node();
    let ns = Netns::new("bpmaps");
    ns.run(move || {
        let ms = |x: std::time::Duration| x.as_secs_f64() * 1e3;
        let mut state = synthetic::cluster(n, 10);
        let mut dp = MapsDataplane::new(settings);
        if let Some(b) = env_list("BATCH", "").first() {
            dp = dp.with_batch_ops(*b);
        }
        let t = Instant::now();
        let ps = state.proxy_state(IpFamily::V4, &node);
        let derived = t.elapsed();
        let t_sync = Instant::now();
        dp.sync(&ps, true).unwrap();
        let synced = t_sync.elapsed();
        let st = dp.last_stats();
        println!(
            "maps layout, {n} Services × 10 endpoints, {} elements",
            dp.element_count()
        );
        println!(
            "cold sync: {:.0} ms total = derive state {:.0} ms + dataplane {:.0} ms (probe + record {:.0} ms, read-back {:.0} ms, plan {:.0} ms, kernel {:.0} ms in {} batches, {} operations)",
            ms(derived + synced),
            ms(derived),
            ms(synced),
            ms(synced - st.read - st.plan - st.apply),
            ms(st.read),
            ms(st.plan),
            ms(st.apply),
            st.batches,
            st.operations
        );
        // A periodic full resync of the unchanged table: read back, nothing written
        // (RESYNC=0 skips it: the kernel's set dumps are quadratic in the set size).
        if env_list("RESYNC", "1") == [1] {
        let t = Instant::now();
        dp.sync(&ps, true).unwrap();
        let st = dp.last_stats();
        println!(
            "full resync (read-back diff, nothing changed): {:.0} ms (read-back {:.0} ms, plan {:.0} ms, {} operations)",
            ms(t.elapsed()),
            ms(st.read),
            ms(st.plan),
            st.operations
        );
        }
        let perf = |cmd: &str| {
            if let Some(ctl) = std::env::var_os("PERF_CTL") {
                std::fs::write(ctl, format!("{cmd}\n")).unwrap();
            }
        };
        let change = |state: &mut kproxy::model::ClusterState, svc: usize, tag: u32| {
            let svc = format!("svc{}", svc % n);
            let mut slice = state.slices().find(|s| s.service == svc).cloned().unwrap();
            slice.endpoints[0].ip = IpAddr::from(std::net::Ipv4Addr::from(0x0ac8_0000 + tag));
            state.insert_slice(slice);
        };
        perf("enable");
        println!();
        println!("| changed Services (K) | operations | derive state | dataplane derive | plan | kernel commit | dataplane total |");
        println!("|---|---|---|---|---|---|---|");
        let mut tag = 0u32;
        let mut next = 0usize;
        for &k in &ks {
            for i in 0..k {
                tag += 1;
                change(&mut state, next + i, tag);
            }
            next += k;
            let t = Instant::now();
            let ps = state.proxy_state(IpFamily::V4, &node);
            let derived = t.elapsed();
            let t = Instant::now();
            let out = dp.sync(&ps, false).unwrap();
            let total = t.elapsed();
            let st = dp.last_stats();
            println!(
                "| {k} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
                out.operations,
                ms(derived),
                ms(st.derive),
                ms(st.plan),
                ms(st.apply),
                ms(total)
            );
        }
        let mut dataplane = Vec::new();
        let mut derive = Vec::new();
        for i in 0..changes {
            tag += 1;
            change(&mut state, next + i * 7919, tag);
            let t = Instant::now();
            let ps = state.proxy_state(IpFamily::V4, &node);
            derive.push(ms(t.elapsed()));
            let t = Instant::now();
            dp.sync(&ps, false).unwrap();
            dataplane.push(ms(t.elapsed()));
        }
        perf("disable");
        dataplane.sort_by(f64::total_cmp);
        derive.sort_by(f64::total_cmp);
        println!();
        println!(
            "one-endpoint change ({changes} changes): dataplane sync p50 {:.2} ms, p99 {:.2} ms; state derivation p50 {:.2} ms, p99 {:.2} ms",
            percentile(&dataplane, 0.5),
            percentile(&dataplane, 0.99),
            percentile(&derive, 0.5),
            percentile(&derive, 0.99)
        );
        // One Service removed, then added back.
        let svc = state.services().find(|s| s.key.name == "svc1").cloned().unwrap();
        for (what, add) in [("removed", false), ("added", true)] {
            if add {
                state.insert_service(svc.clone());
            } else {
                state.remove_service(&svc.key.namespace, &svc.key.name);
            }
            let t = Instant::now();
            let ps = state.proxy_state(IpFamily::V4, &node);
            let derived = t.elapsed();
            let t = Instant::now();
            let out = dp.sync(&ps, false).unwrap();
            println!(
                "one Service {what}: derive state {:.2} ms, dataplane {:.2} ms ({} operations)",
                ms(derived),
                ms(t.elapsed()),
                out.operations
            );
        }
    });
}
