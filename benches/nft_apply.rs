//! nftables apply benchmark (root): a full 10k Services × 10 endpoints ruleset applied
//! (a) over kproxy's netlink batches and (b) as `nft -f` of the dry-run text (upstream's
//! way), each into a fresh network namespace; then one-endpoint changes at 10k Services
//! over netlink, end to end (derive state + render + encode + kernel ack).
//! Run: `cargo bench --bench nft_apply`: both layouts and upstream's `nft -f` side by
//! side ([`side_by_side`], its options there). `LEGACY=1` runs the upstream-layout-only
//! bench below (SIZES=2000,10000 to choose sizes, SKIP_NFT, BATCH_OPS, CHANGES, PROBE,
//! RESYNC).

#[allow(dead_code)]
#[path = "../tests/dataplane/echo.rs"]
mod echo;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "support/report.rs"]
mod report;
#[path = "nft_apply/side_by_side.rs"]
mod side_by_side;

use std::time::{Duration, Instant};

use kproxy::config::Config;
use kproxy::model::{synthetic, IpFamily, NodeContext};
use kproxy::nftables::netlink::Netlink;
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::SYNC_BATCH_OPS;
use netns::Netns;

// The allocator the `kproxy` binary uses, so the figures are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if !netns::require_root("nft_apply bench") {
        return;
    }
    if std::env::var_os("LEGACY").is_none() {
        side_by_side::main();
        return;
    }
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
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
    println!("| services × endpoints | operations | netlink full apply | nft -f full apply | speed-up | 1-endpoint change p50 / max (20 runs) |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let mut state = synthetic::cluster(n, 10);
        let ps = state.proxy_state(IpFamily::V4, &node);
        let tx = NftRenderer::new(settings.clone())
            .render(&ps, &RenderOptions::default())
            .main;
        let ops = tx.len();
        let text = transaction_text(&tx);

        // (b) upstream's way: the whole text through nft -f (SKIP_NFT=1 skips it).
        let t_nft = if std::env::var_os("SKIP_NFT").is_some() {
            Duration::ZERO
        } else {
            let b_ns = Netns::new("bnft");
            let t = Instant::now();
            let (ok, _, err) = b_ns.exec_stdin(&["nft", "-f", "-"], &text);
            assert!(ok, "nft -f: {err}");
            t.elapsed()
        };
        let batch_ops: usize = std::env::var("BATCH_OPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(SYNC_BATCH_OPS);

        // (a) netlink, with the renderer's full sync split into bounded batches.
        let a_ns = Netns::new("bnl");
        let settings2 = settings.clone();
        let node2 = node.clone();
        let (t_netlink, changes) = a_ns.run(move || {
            let mut nl = Netlink::open().unwrap();
            let mut r = NftRenderer::new(settings2);
            let t = Instant::now();
            let ps = state.proxy_state(IpFamily::V4, &node2);
            let out = r.render(&ps, &RenderOptions::default());
            for part in out.main.split(batch_ops) {
                nl.apply(&part).unwrap();
            }
            let t_full = t.elapsed();
            r.commit(out.record);
            if std::env::var_os("RESYNC").is_some() {
                // A full resync over the existing table (the hourly resync, a retry after a
                // failure, or taking over upstream's table), as the daemon does it.
                let t = Instant::now();
                let existing = nl
                    .read_table(kproxy::nftables::transaction::Family::Ip, "kube-proxy")
                    .unwrap();
                let t_read = t.elapsed();
                let out = r.render(
                    &ps,
                    &RenderOptions {
                        full: true,
                        now_ms: 0,
                        existing: existing.as_ref(),
                    },
                );
                let n_ops = out.main.len();
                let parts = out.main.split(batch_ops);
                let batches = parts.len();
                for part in parts {
                    nl.apply(&part).unwrap();
                }
                eprintln!(
                    "full resync over the existing table: {n_ops} operations in {batches} batches, read-back {:.2} s, total {:.2} s",
                    t_read.as_secs_f64(),
                    t.elapsed().as_secs_f64()
                );
                r.commit(out.record);
            }
            let mut changes: Vec<Duration> = Vec::new();
            let runs: usize = std::env::var("CHANGES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(20);
            for k in 0..runs {
                // One endpoint of one Service moves.
                let mut slice = state
                    .slices()
                    .find(|s| s.service == format!("svc{}", 7 + k))
                    .cloned()
                    .unwrap();
                slice.endpoints[3].ip = std::net::IpAddr::from([10, 200, 0, k as u8]);
                state.insert_slice(slice);
                let t = Instant::now();
                let ps = state.proxy_state(IpFamily::V4, &node2);
                let out = r.render(
                    &ps,
                    &RenderOptions {
                        full: false,
                        now_ms: 0,
                        existing: None,
                    },
                );
                let rendered_at = t.elapsed();
                nl.apply(&out.main).unwrap();
                changes.push(t.elapsed());
                if k == 0 {
                    eprintln!(
                        "1-endpoint change: derive+render {:.2} ms, {} operations, apply {:.2} ms",
                        rendered_at.as_secs_f64() * 1e3,
                        out.main.len(),
                        (t.elapsed() - rendered_at).as_secs_f64() * 1e3
                    );
                }
                r.commit(out);
            }
            // What a commit costs the kernel with and without table validation: one
            // element without a verdict (no validation) vs one rule with a jump in a
            // chain nothing reaches (the kernel re-validates the whole table anyway).
            if std::env::var_os("PROBE").is_some() {
                use kproxy::nftables::transaction::{
                    Chain, Element, Expr, KeyValue, Op, Rule, Transaction, Verdict,
                };
                let fam = kproxy::nftables::transaction::Family::Ip;
                let mut plain = Vec::new();
                let mut validated = Vec::new();
                for k in 0..10u8 {
                    let mut tx = Transaction::new(fam, "kube-proxy");
                    tx.push(Op::AddElement(Element {
                        set: "cluster-ips".into(),
                        key: vec![KeyValue::Ip(std::net::IpAddr::from([192, 0, 2, k]))],
                        comment: None,
                        value: None,
                        data: Vec::new(),
                    }));
                    let t = Instant::now();
                    nl.apply(&tx).unwrap();
                    plain.push(t.elapsed());
                    let mut tx = Transaction::new(fam, "kube-proxy");
                    let name = format!("probe-{k}");
                    tx.push(Op::AddChain(Chain {
                        name: name.clone(),
                        base: None,
                        comment: None,
                    }));
                    tx.push(Op::AddRule(Rule {
                        chain: name,
                        exprs: vec![Expr::Verdict(Verdict::Jump("mark-for-masquerade".into()))],
                        comment: None,
                    }));
                    let t = Instant::now();
                    nl.apply(&tx).unwrap();
                    validated.push(t.elapsed());
                }
                plain.sort();
                validated.sort();
                eprintln!(
                    "kernel commit, p50 of 10: one element (no validation) {:.2} ms; one rule with a jump in an unreachable chain (whole-table validation) {:.2} ms",
                    plain[5].as_secs_f64() * 1e3,
                    validated[5].as_secs_f64() * 1e3
                );
            }
            changes.sort();
            if changes.is_empty() {
                changes.push(Duration::ZERO);
            }
            (t_full, changes)
        });
        println!(
            "| {n} × 10 | {ops} | {:.2} s | {:.2} s | {:.1}× | {:.2} ms / {:.2} ms |",
            t_netlink.as_secs_f64(),
            t_nft.as_secs_f64(),
            t_nft.as_secs_f64() / t_netlink.as_secs_f64(),
            changes[changes.len() / 2].as_secs_f64() * 1e3,
            changes[changes.len() - 1].as_secs_f64() * 1e3,
        );
    }
}
