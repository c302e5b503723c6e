//! Property: over random sequences of cluster changes, applying each incremental sync
//! on top of the previous ones leaves exactly what a full sync of the final state
//! builds — for nftables (in the in-memory fake) and for iptables (in a small model of
//! `iptables-restore --noflush`). This is the guard against partial-sync bugs that lose
//! updates (user-pain item 3).

#[path = "support/cluster_gen.rs"]
mod cluster_gen;

use std::collections::BTreeMap;

use cluster_gen::{mutate, node, settings, Lcg};
use kproxy::iptables::normalize::parse;
use kproxy::iptables::render::{RenderOptions as IptOptions, Renderer};
use kproxy::model::{ClusterState, IpFamily};
use kproxy::nftables::fake::Fake;
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::text::normalize;

#[test]
fn nftables_partial_syncs_equal_full_sync() {
    for seed in 1..=25u64 {
        let mut rng = Lcg(seed);
        let mut state = ClusterState::new();
        let mut renderer = NftRenderer::new(settings(IpFamily::V4));
        let mut fake = Fake::new();
        let mut clock = 0u64;
        for step in 0..30 {
            mutate(&mut rng, &mut state);
            clock += rng.next(1500);
            let ps = state.proxy_state(IpFamily::V4, &node());
            let out = renderer.render(
                &ps,
                &RenderOptions {
                    full: false,
                    now_ms: clock,
                    existing: None,
                },
            );
            if let Some(c) = &out.cleanup {
                fake.apply(c)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: cleanup {e}"));
            }
            fake.apply(&out.main)
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            renderer.commit(out);

            let mut fresh = Fake::new();
            let full =
                NftRenderer::new(settings(IpFamily::V4)).render(&ps, &RenderOptions::default());
            fresh.apply(&full.main).unwrap();
            // Stale chains still waiting for deletion are empty and unreferenced; the
            // rest must be identical.
            let strip_stale = |dump: String| -> String {
                dump.lines()
                    .filter(|l| {
                        !renderer
                            .stale_chains()
                            .iter()
                            .any(|c| l.starts_with(&format!("add chain ip kube-proxy {c}")))
                    })
                    .map(|l| format!("{l}\n"))
                    .collect()
            };
            assert_eq!(
                normalize(&strip_stale(fake.dump())),
                normalize(&fresh.dump()),
                "seed {seed} step {step}"
            );
        }
    }
}

/// `iptables-restore --noflush` on a model: declared chains are flushed (created if
/// missing), rules appended, `-X` deletes.
fn restore(model: &mut BTreeMap<String, BTreeMap<String, Vec<String>>>, payload: &str) {
    for table in parse(payload).unwrap() {
        let t = model.entry(table.name.clone()).or_default();
        for c in &table.chains {
            t.insert(c.name.clone(), Vec::new());
        }
        for c in &table.chains {
            if c.deleted {
                t.remove(&c.name);
            } else {
                t.insert(c.name.clone(), c.rules.clone());
            }
        }
    }
}

#[test]
fn iptables_partial_syncs_equal_full_sync() {
    for seed in 1..=25u64 {
        let mut rng = Lcg(seed * 7919);
        let mut state = ClusterState::new();
        let mut renderer = Renderer::new(settings(IpFamily::V4));
        let mut model = BTreeMap::new();
        for step in 0..30 {
            mutate(&mut rng, &mut state);
            let ps = state.proxy_state(IpFamily::V4, &node());
            let out = renderer.render(&ps, &IptOptions::default());
            restore(&mut model, &out.payload);
            renderer.commit(out);

            let mut fresh = BTreeMap::new();
            let full = Renderer::new(settings(IpFamily::V4)).render(
                &ps,
                &IptOptions {
                    full: true,
                    ..IptOptions::default()
                },
            );
            restore(&mut fresh, &full.payload);
            assert_eq!(model, fresh, "seed {seed} step {step}");
        }
    }
}
