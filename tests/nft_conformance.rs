//! Upstream kube-proxy nftables test vectors (testdata/upstream/nftables): every literal
//! ruleset, the TestSyncProxyRulesRepeated sequence with upstream's operation counts,
//! and the element assertions, compared after upstream's normalization.

#[path = "support/cluster_gen.rs"]
mod cluster_gen;
#[path = "support/vectors.rs"]
mod vectors;

use std::fs;
use std::path::PathBuf;

use ipnet::IpNet;
use kproxy::config::FamilySettings;
use kproxy::model::{ClusterState, NodeContext, ProxyState};
use kproxy::nftables::fake::Fake;
use kproxy::nftables::render::{NftRenderer, RenderOptions, Rendered};
use kproxy::nftables::text::normalize;
use kproxy::snapshot;
use serde_json::Value;
use vectors::{nft_settings as settings, nft_vector_dirs as dirs, yaml};

fn load_state(text: &str) -> ClusterState {
    let snap = snapshot::load_str(text, "cluster.yaml").unwrap();
    assert!(snap.skipped.is_empty(), "{:?}", snap.skipped);
    snap.state
}

fn proxy_state(state: &ClusterState, fs: &FamilySettings, cidrs: &[IpNet]) -> ProxyState {
    let node = NodeContext {
        name: fs.node_name.clone(),
        zone: None,
        prefer_same_node: true,
    };
    let mut ps = state.proxy_state(fs.family, &node);
    ps.service_cidrs = cidrs.to_vec();
    ps
}

fn apply(fake: &mut Fake, r: &Rendered, what: &str) {
    if let Some(c) = &r.cleanup {
        fake.apply(c)
            .unwrap_or_else(|e| panic!("{what}: cleanup: {e}"));
    }
    fake.apply(&r.main).unwrap_or_else(|e| {
        panic!(
            "{what}: {e}\n{}",
            kproxy::nftables::text::transaction_text(&r.main)
        )
    });
}

fn compare(what: &str, expected_normalized: &str, fake: &Fake) {
    let got = normalize(&fake.dump());
    if got != expected_normalized {
        let want: std::collections::BTreeSet<&str> = expected_normalized.lines().collect();
        let have: std::collections::BTreeSet<&str> = got.lines().collect();
        let mut diff = String::new();
        for l in want.difference(&have) {
            diff.push_str(&format!("- {l}\n"));
        }
        for l in have.difference(&want) {
            diff.push_str(&format!("+ {l}\n"));
        }
        panic!("{what}: ruleset differs\n{diff}");
    }
}

#[test]
fn normalizer_reproduces_expected_normalized() {
    for dir in dirs() {
        let (Ok(nft), Ok(norm)) = (
            fs::read_to_string(dir.join("expected.nft")),
            fs::read_to_string(dir.join("expected.normalized")),
        ) else {
            continue;
        };
        assert_eq!(normalize(&nft), norm, "{}", dir.display());
    }
}

#[test]
fn literal_ruleset_vectors() {
    let mut checked = 0;
    for dir in dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("TestSyncProxyRulesRepeated")
            || !dir.join("expected.normalized").exists()
        {
            continue;
        }
        let cfg = yaml(&dir.join("config.yaml"));
        let (fs_, cidrs) = settings(&cfg);
        let state = load_state(&fs::read_to_string(dir.join("cluster.yaml")).unwrap());
        let r = NftRenderer::new(fs_.clone());
        let out = r.render(
            &proxy_state(&state, &fs_, &cidrs),
            &RenderOptions::default(),
        );
        let mut fake = Fake::new();
        apply(&mut fake, &out, &name);
        compare(
            &name,
            &fs::read_to_string(dir.join("expected.normalized")).unwrap(),
            &fake,
        );
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn derived_rulesets_match() {
    // derived.nft is the research model's output for the flow vectors, not upstream
    // text; a mismatch here is a signal to investigate rather than gospel.
    let mut checked = 0;
    for dir in dirs() {
        let Ok(derived) = fs::read_to_string(dir.join("derived.nft")) else {
            continue;
        };
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cfg = yaml(&dir.join("config.yaml"));
        let (fs_, cidrs) = settings(&cfg);
        let state = load_state(&fs::read_to_string(dir.join("cluster.yaml")).unwrap());
        let r = NftRenderer::new(fs_.clone());
        let out = r.render(
            &proxy_state(&state, &fs_, &cidrs),
            &RenderOptions::default(),
        );
        let mut fake = Fake::new();
        apply(&mut fake, &out, &name);
        compare(&name, &normalize(&derived), &fake);
        checked += 1;
    }
    assert!(checked >= 10, "{checked}");
}

#[test]
fn sync_proxy_rules_repeated_sequence() {
    let steps: Vec<PathBuf> = dirs()
        .into_iter()
        .filter(|d| {
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("TestSyncProxyRulesRepeated_")
        })
        .collect();
    assert!(steps.len() >= 12, "{}", steps.len());
    let cfg = yaml(&steps[0].join("config.yaml"));
    let (fs_, cidrs) = settings(&cfg);
    let mut renderer = NftRenderer::new(fs_.clone());
    let mut fake = Fake::new();
    let mut clock: u64 = 10_000;
    let mut state = ClusterState::new();
    for dir in &steps {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tr = yaml(&dir.join("transition.yaml"));
        let mut last: Option<Rendered> = None;
        let mut deleted_before = Vec::new();
        for action in tr["actions"].as_array().unwrap() {
            match action["op"].as_str().unwrap() {
                "applyClusterYAML" => {
                    state = load_state(&fs::read_to_string(dir.join("cluster.yaml")).unwrap());
                }
                "setEndpointSlice" => {
                    let text = serde_yaml_ng::to_string(&action["object"]).unwrap();
                    let snap = snapshot::load_str(&text, "slice").unwrap();
                    for s in snap.state.slices() {
                        state.insert_slice(s.clone());
                    }
                }
                "ageStaleChains" => clock += 2000,
                "sync" => {
                    let ps = proxy_state(&state, &fs_, &cidrs);
                    let out = renderer.render(
                        &ps,
                        &RenderOptions {
                            full: false,
                            now_ms: clock,
                            existing: None,
                        },
                    );
                    apply(&mut fake, &out, &name);
                    deleted_before = out.deleted_stale.clone();
                    renderer.commit(out.clone());
                    last = Some(out);
                }
                other => panic!("{name}: unknown action {other}"),
            }
        }
        let out = last.expect("a sync");
        assert_eq!(
            out.full,
            tr["syncKind"].as_str() == Some("full"),
            "{name}: sync kind"
        );
        if let Some(n) = tr["expectedLastTransactionOperations"].as_u64() {
            assert_eq!(
                out.main.len() as u64,
                n,
                "{name}: operations\n{}",
                kproxy::nftables::text::transaction_text(&out.main)
            );
        }
        let mut want_flushed: Vec<String> = tr["chainsFlushedAndMarkedStaleThisSync"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        want_flushed.sort();
        let mut got_flushed = out.flushed_stale.clone();
        got_flushed.sort();
        assert_eq!(got_flushed, want_flushed, "{name}: flushed stale chains");
        let mut want_deleted: Vec<String> = tr
            ["staleChainsDeletedInSeparateTransactionBeforeThisSync"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        want_deleted.sort();
        deleted_before.sort();
        assert_eq!(deleted_before, want_deleted, "{name}: deleted stale chains");
        compare(
            &name,
            &fs::read_to_string(dir.join("expected.normalized")).unwrap(),
            &fake,
        );
    }
}

#[test]
fn load_balancer_ip_mode_element_assertions() {
    let mut checked = 0;
    for dir in dirs() {
        let Ok(text) = fs::read_to_string(dir.join("assertions.yaml")) else {
            continue;
        };
        let a: Value = serde_yaml_ng::from_str(&text).unwrap();
        let cfg = yaml(&dir.join("config.yaml"));
        let (fs_, cidrs) = settings(&cfg);
        let state = load_state(&fs::read_to_string(dir.join("cluster.yaml")).unwrap());
        let out = NftRenderer::new(fs_.clone()).render(
            &proxy_state(&state, &fs_, &cidrs),
            &RenderOptions::default(),
        );
        let mut fake = Fake::new();
        apply(&mut fake, &out, "ipmode");
        for check in a["assertions"].as_array().unwrap() {
            let key: Vec<&str> = check["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let key = key.join(" . ");
            let exists = fake
                .elements(check["map"].as_str().unwrap())
                .iter()
                .any(|e| e.key_text() == key);
            assert_eq!(
                exists,
                check["elementExists"].as_bool().unwrap(),
                "{}: {key}",
                dir.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

/// Upstream's packet-flow expectations (flows.yaml), traced through kproxy's own
/// rendered table (every phase, including those after EndpointSlices are deleted), and
/// through the research model's rulesets (`derived.nft`), which checks the tracer itself.
mod flows {
    use crate::vectors::{
        for_each_nft_flow_phase, nft_check_flows, nft_local_ips, nft_vector_dirs, yaml,
    };
    use kproxy::nftables::render::{NftRenderer, RenderOptions};
    use kproxy::nftables::text::transaction_text;
    use kproxy::trace::nftables::Table;
    use std::fs;

    #[test]
    fn upstream_flows_through_our_rules() {
        let mut failures = Vec::new();
        let mut flows = 0;
        for_each_nft_flow_phase(|dir, settings, ps, phase, local| {
            let text = transaction_text(
                &NftRenderer::new(settings.clone())
                    .render(ps, &RenderOptions::default())
                    .main,
            );
            let table = Table::parse(&text).unwrap();
            flows += nft_check_flows(dir, phase, &table, local, &mut failures);
        });
        assert!(flows >= 50, "only {flows}");
        assert!(
            failures.is_empty(),
            "{} of {flows} differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn tracer_reproduces_upstream_flows_on_derived_rulesets() {
        let mut failures = Vec::new();
        let mut flows = 0;
        for dir in nft_vector_dirs() {
            let (Ok(text), true) = (
                fs::read_to_string(dir.join("derived.nft")),
                dir.join("flows.yaml").exists(),
            ) else {
                continue;
            };
            let table = Table::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let spec = yaml(&dir.join("flows.yaml"));
            let local = nft_local_ips(&spec);
            for phase in spec["phases"].as_array().into_iter().flatten() {
                // derived.nft holds the initial state only.
                if phase.get("deleteEndpointSlices").is_some() {
                    continue;
                }
                flows += nft_check_flows(&dir, phase, &table, &local, &mut failures);
            }
        }
        assert!(flows >= 40, "only {flows} flows");
        assert!(
            failures.is_empty(),
            "{} of {flows} differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// The `maps` layout (`--nftables-layout=maps`) through the tracer: every upstream
/// nftables flow vector's expectation, and every iptables one wherever upstream's own
/// nftables layout agrees with iptables (where the two upstream modes differ — e.g.
/// localhost NodePorts exist only in iptables mode — the maps layout must do what
/// upstream's nftables layout does).
mod maps_flows {
    use crate::vectors::{
        for_each_nft_flow_phase, nft_check_flows, s, settings_for, state_for, vector_dirs, yaml,
    };
    use kproxy::model::ProxyState;
    use kproxy::nftables::maps::MapsRenderer;
    use kproxy::nftables::render::{NftRenderer, RenderOptions};
    use kproxy::nftables::text::transaction_text;
    use kproxy::trace::nftables::{Packet, Table};
    use std::net::IpAddr;

    fn maps_table(settings: &kproxy::config::FamilySettings, ps: &ProxyState) -> Table {
        let text = transaction_text(&MapsRenderer::new(settings.clone()).render_full(ps));
        Table::parse(&text).unwrap_or_else(|e| panic!("maps layout does not parse: {e}\n{text}"))
    }

    #[test]
    fn upstream_nftables_flows_through_the_maps_layout() {
        let mut failures = Vec::new();
        let mut flows = 0;
        for_each_nft_flow_phase(|dir, settings, ps, phase, local| {
            let table = maps_table(settings, ps);
            flows += nft_check_flows(dir, phase, &table, local, &mut failures);
        });
        eprintln!("maps layout: {flows} upstream nftables flows");
        assert!(flows >= 50, "only {flows}");
        assert!(
            failures.is_empty(),
            "{} of {flows} differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn upstream_iptables_flows_through_the_maps_layout() {
        let mut failures = Vec::new();
        let (mut flows, mut as_iptables, mut as_nft_upstream) = (0, 0, 0);
        for dir in vector_dirs() {
            if !dir.join("flows.yaml").exists() || dir.join("input-rules.iptables").exists() {
                continue;
            }
            let spec = yaml(&dir.join("flows.yaml"));
            let local: Vec<IpAddr> = spec["tracer_local_ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect();
            let cfg = yaml(&dir.join("config.yaml"));
            let settings = settings_for(&cfg);
            let (mut state, node) = state_for(&dir, &cfg);
            for phase in spec["phases"].as_array().into_iter().flatten() {
                for action in phase["apply_before_flows"].as_array().into_iter().flatten() {
                    if let Some(d) = action.get("delete") {
                        let (ns, name) = (s(d, "namespace").unwrap(), s(d, "name").unwrap());
                        let removed = match s(d, "kind") {
                            Some("Service") => state.remove_service(ns, name),
                            _ => state.remove_slice(ns, name),
                        };
                        assert!(removed, "{}: nothing to delete for {d}", dir.display());
                    }
                }
                let ps = state.proxy_state(settings.family, &node);
                let maps = maps_table(&settings, &ps);
                let upstream = Table::parse(&transaction_text(
                    &NftRenderer::new(settings.clone())
                        .render(&ps, &RenderOptions::default())
                        .main,
                ))
                .unwrap();
                for flow in phase["flows"].as_array().into_iter().flatten() {
                    flows += 1;
                    let pkt = Packet {
                        src: s(flow, "source_ip").unwrap().parse().unwrap(),
                        dst: s(flow, "dest_ip").unwrap().parse().unwrap(),
                        dport: flow["dest_port"].as_u64().unwrap() as u16,
                        proto: s(flow, "protocol").unwrap_or("TCP").to_lowercase(),
                        from_node: false,
                    };
                    let want = (
                        s(flow, "output").unwrap_or_default().to_string(),
                        flow["masq"].as_bool().unwrap_or(false),
                    );
                    let got = maps.trace(&pkt, &local);
                    let got = (got.output(), got.masquerade);
                    if got == want {
                        as_iptables += 1;
                        continue;
                    }
                    let up = upstream.trace(&pkt, &local);
                    let up = (up.output(), up.masquerade);
                    if up != want && got == up {
                        as_nft_upstream += 1;
                        continue;
                    }
                    failures.push(format!(
                        "{} [{}] {}: maps {got:?}, iptables {want:?}, upstream nftables {up:?}",
                        dir.file_name().unwrap().to_string_lossy(),
                        s(phase, "name").unwrap_or_default(),
                        s(flow, "name").unwrap_or_default(),
                    ));
                }
            }
        }
        eprintln!(
            "maps layout: {flows} upstream iptables flows, {as_iptables} as iptables expects, \
             {as_nft_upstream} where upstream's nftables mode differs from iptables and maps does as nftables"
        );
        assert!(flows >= 50, "only {flows}");
        assert!(
            failures.is_empty(),
            "{} of {flows} differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// Property: over random clusters (the generator the partial-sync property uses), for
/// sampled packets — pods, the Services' own endpoints (hairpin), allowed and
/// refused outside sources and the node itself, to every ClusterIP, NodePort and
/// load-balancer IP, an unused port and an unallocated ServiceCIDR address — the
/// maps layout and upstream's layout give the same endpoint sets with the same
/// probabilities (exactly 1/N each), the same masquerade decision and the same
/// drop/reject/accept/no-service outcome.
mod maps_props {
    use crate::cluster_gen::{mutate, node, settings, Lcg};
    use kproxy::model::{ClusterState, IpFamily, ProxyState};
    use kproxy::nftables::maps::MapsRenderer;
    use kproxy::nftables::render::{NftRenderer, RenderOptions};
    use kproxy::nftables::text::transaction_text;
    use kproxy::trace::core::{Outcome, Trace};
    use kproxy::trace::nftables::{Packet, Table};
    use std::net::IpAddr;

    /// What must agree: the outcome without its reasons, the endpoints with their
    /// probabilities, masquerade, and upstream's one-line output.
    fn summary(t: &Trace) -> (String, Vec<(String, f64)>, bool, String) {
        let kind = match t.outcome() {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Accepted { .. } => "accepted",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Dropped { .. } => "dropped",
            Outcome::NotService => "not-service",
            Outcome::Unknown { .. } => "unknown",
        };
        let eps = t
            .endpoints
            .iter()
            .map(|d| (d.destination.clone(), (d.probability * 1e9).round() / 1e9))
            .collect();
        (kind.to_string(), eps, t.masquerade, t.output())
    }

    fn packets(ps: &ProxyState) -> Vec<Packet> {
        let node_ip: IpAddr = "192.168.0.2".parse().unwrap();
        let mut dests: Vec<(IpAddr, u16, String)> =
            vec![("172.30.0.250".parse().unwrap(), 80, "tcp".to_string())];
        let mut sources: Vec<IpAddr> = ["10.0.99.9", "203.0.113.5", "203.0.113.200"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for p in &ps.ports {
            let proto = p.svc.name.protocol.lower().to_string();
            dests.push((p.svc.cluster_ip, p.svc.port, proto.clone()));
            dests.push((p.svc.cluster_ip, 9999, proto.clone()));
            if p.svc.node_port != 0 {
                dests.push((node_ip, p.svc.node_port, proto.clone()));
            }
            for ip in p.svc.lb_ips.iter().chain(&p.svc.external_ips) {
                dests.push((*ip, p.svc.port, proto.clone()));
            }
            sources.extend(p.endpoints.first().map(|e| e.ip));
        }
        sources.sort();
        sources.dedup();
        let mut out = Vec::new();
        for (dst, dport, proto) in &dests {
            for src in &sources {
                out.push(Packet {
                    src: *src,
                    dst: *dst,
                    dport: *dport,
                    proto: proto.clone(),
                    from_node: false,
                });
            }
            out.push(Packet {
                src: node_ip,
                dst: *dst,
                dport: *dport,
                proto: proto.clone(),
                from_node: true,
            });
        }
        out
    }

    #[test]
    fn maps_layout_equals_upstream_layout_on_random_clusters() {
        let local: Vec<IpAddr> = vec!["192.168.0.2".parse().unwrap()];
        let (mut packets_checked, mut delivered, mut states, mut masq) = (0usize, 0, 0, 0);
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for seed in 1..=25u64 {
            let mut rng = Lcg(seed * 104_729);
            let mut state = ClusterState::new();
            for step in 0..20 {
                mutate(&mut rng, &mut state);
                let fs = settings(IpFamily::V4);
                let mut ps = state.proxy_state(IpFamily::V4, &node());
                ps.service_cidrs = vec!["172.30.0.0/16".parse().unwrap()];
                let upstream = Table::parse(&transaction_text(
                    &NftRenderer::new(fs.clone())
                        .render(&ps, &RenderOptions::default())
                        .main,
                ))
                .unwrap();
                let maps_text = transaction_text(&MapsRenderer::new(fs).render_full(&ps));
                let maps = Table::parse(&maps_text).unwrap();
                states += 1;
                for pkt in packets(&ps) {
                    let want = summary(&upstream.trace(&pkt, &local));
                    let got = summary(&maps.trace(&pkt, &local));
                    packets_checked += 1;
                    assert_ne!(want.0, "unknown", "seed {seed} step {step} {pkt:?}");
                    assert_eq!(
                        got, want,
                        "seed {seed} step {step} {pkt:?}: maps layout (left) vs upstream (right)"
                    );
                    masq += usize::from(got.2);
                    if !got.1.is_empty() {
                        delivered += 1;
                        let n = got.1.len() as f64;
                        for (ep, p) in &got.1 {
                            assert!(
                                (p - 1.0 / n).abs() < 1e-9,
                                "seed {seed} step {step} {pkt:?}: {ep} has {p}, not 1/{n}"
                            );
                        }
                    }
                    *kinds.entry(got.0.clone()).or_default() += 1;
                }
            }
        }
        eprintln!(
            "maps vs upstream: {states} clusters, {packets_checked} packets ({delivered} \
             delivered, {masq} masqueraded), outcomes {kinds:?}"
        );
        assert!(
            packets_checked > 15_000 && delivered > 1500 && masq > 300,
            "{packets_checked} / {delivered} / {masq}"
        );
    }
}
