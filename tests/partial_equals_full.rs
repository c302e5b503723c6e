//! Property: over random sequences of cluster changes, applying each incremental sync
//! on top of the previous ones leaves exactly what a full sync of the final state
//! builds — for nftables (in the in-memory fake) and for iptables (in a small model of
//! `iptables-restore --noflush`). This is the guard against partial-sync bugs that lose
//! updates (user-pain item 3).

use std::collections::BTreeMap;

use kproxy::config::Config;
use kproxy::iptables::normalize::parse;
use kproxy::iptables::render::{RenderOptions as IptOptions, Renderer};
use kproxy::model::{ClusterState, IpFamily, NodeContext};
use kproxy::nftables::fake::Fake;
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::text::normalize;
use kproxy::snapshot;

/// A tiny deterministic generator (no external crate, reproducible by seed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn service_yaml(i: u64, variant: u64) -> String {
    let ty = ["ClusterIP", "NodePort", "LoadBalancer"][(variant % 3) as usize];
    let etp = if variant % 5 == 0 { "Local" } else { "Cluster" };
    let itp = if variant % 7 == 0 { "Local" } else { "Cluster" };
    let affinity = if variant % 4 == 0 { "ClientIP" } else { "None" };
    let np = if ty != "ClusterIP" {
        format!(", nodePort: {}", 30000 + i)
    } else {
        String::new()
    };
    let lb = if ty == "LoadBalancer" {
        format!(
            "\n  loadBalancerSourceRanges: [\"203.0.113.0/25\"]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 1.2.3.{i}}}]"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  type: {ty}\n  clusterIP: 172.30.0.{i}\n  externalTrafficPolicy: {etp}\n  internalTrafficPolicy: {itp}\n  sessionAffinity: {affinity}\n  ports: [{{name: p, port: 80, protocol: TCP{np}}}, {{name: u, port: 53, protocol: UDP}}]{lb}\n"
    )
}

fn slice_yaml(i: u64, eps: &[(u64, bool, bool)]) -> String {
    let mut body = String::new();
    for (e, ready, local) in eps {
        body.push_str(&format!(
            "- addresses: [10.0.{i}.{e}]\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n  nodeName: {}\n",
            !ready,
            if *local { "test-node" } else { "other" }
        ));
    }
    if body.is_empty() {
        body = "[]\n".into();
    } else {
        body = format!("\n{body}");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints: {body}ports: [{{name: p, port: 8080, protocol: TCP}}, {{name: u, port: 5353, protocol: UDP}}]\n"
    )
}

fn apply_yaml(state: &mut ClusterState, yaml: &str) {
    let snap = snapshot::load_str(yaml, "gen").unwrap();
    assert!(snap.skipped.is_empty(), "{:?}\n{yaml}", snap.skipped);
    for s in snap.state.services() {
        state.insert_service(s.clone());
    }
    for s in snap.state.slices() {
        state.insert_slice(s.clone());
    }
}

fn mutate(rng: &mut Lcg, state: &mut ClusterState) {
    let i = 1 + rng.next(12);
    match rng.next(4) {
        0 => apply_yaml(state, &service_yaml(i, rng.next(100))),
        1 => {
            state.remove_service("ns", &format!("s{i}"));
        }
        2 => {
            let n = rng.next(4);
            let eps: Vec<(u64, bool, bool)> = (0..n)
                .map(|e| (1 + e + rng.next(3), rng.next(4) != 0, rng.next(2) == 0))
                .collect();
            apply_yaml(state, &slice_yaml(i, &eps));
        }
        _ => {
            state.remove_slice("ns", &format!("s{i}-1"));
        }
    }
}

fn settings(family: IpFamily) -> kproxy::config::FamilySettings {
    let cfg = Config {
        cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        ..Config::default()
    };
    cfg.family_settings(
        family,
        "test-node",
        None,
        &["192.168.0.2/24".parse().unwrap()],
    )
}

fn node() -> NodeContext {
    NodeContext {
        name: "test-node".into(),
        zone: None,
        prefer_same_node: true,
    }
}

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
