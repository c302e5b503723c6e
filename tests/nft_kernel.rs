//! nftables over netlink against the real kernel, each test in fresh network
//! namespaces: what the netlink applier builds must list exactly like what `nft -f`
//! builds from the dry-run text; incremental syncs must converge to a full sync of the
//! final state; a refused batch must change nothing and name the failing operation.

#[path = "support/golden_cases.rs"]
mod golden_cases;
#[path = "support/netns.rs"]
mod netns;

use std::fs;
use std::path::Path;

use kproxy::cli::inputs::Inputs;
use kproxy::config::FamilySettings;
use kproxy::model::{ClusterState, NodeContext};
use kproxy::nftables::netlink::{Netlink, NetlinkError};
use kproxy::nftables::render::{NftRenderer, RenderOptions, TABLE};
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::transaction::{Family, Op, Transaction};
use kproxy::snapshot;
use netns::{canonical_listing, require_root, Netns};

fn golden_inputs(case: &str) -> Inputs {
    golden_cases::inputs(&golden_cases::case(case), "nftables")
}

fn family_name(f: Family) -> &'static str {
    f.as_str()
}

/// Applies `tx` over netlink inside `ns`.
fn apply_in(ns: &Netns, tx: Transaction) -> Result<(), String> {
    ns.run(move || {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        nl.apply(&tx).map_err(|e| e.to_string())
    })
}

#[test]
fn netlink_equals_nft_for_every_golden_case() {
    if !require_root("netlink_equals_nft_for_every_golden_case") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut cases: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    cases.sort();
    let mut compared = 0;
    for case in cases {
        let inputs = golden_inputs(&case);
        for settings in &inputs.families {
            let ps = inputs.state.proxy_state(settings.family, &inputs.node);
            let tx = NftRenderer::new(settings.clone())
                .render(&ps, &RenderOptions::default())
                .main;
            let fam = family_name(tx.family);
            let via_netlink = Netns::new("nlg");
            let via_nft = Netns::new("nftg");
            apply_in(&via_netlink, tx.clone()).unwrap_or_else(|e| panic!("{case}: {e}"));
            let (ok, _, err) = via_nft.exec_stdin(&["nft", "-f", "-"], &transaction_text(&tx));
            assert!(ok, "{case}: nft -f refused our dry-run text: {err}");
            assert_eq!(
                via_netlink.nft_list(fam),
                via_nft.nft_list(fam),
                "{case} ({fam}): netlink and nft -f give different tables"
            );
            compared += 1;
        }
    }
    assert!(compared >= 12, "{compared}");
}

fn vector_settings(dir: &Path) -> (FamilySettings, Vec<ipnet::IpNet>) {
    let cfg: serde_json::Value =
        serde_yaml_ng::from_str(&fs::read_to_string(dir.join("config.yaml")).unwrap()).unwrap();
    let mut config = kproxy::config::Config {
        cluster_cidrs: vec![cfg["localDetector"]["clusterCIDR"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()],
        ..Default::default()
    };
    config.nodeport_addresses = cfg["nodePortAddresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let addrs: Vec<ipnet::IpNet> = cfg["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["addresses"].as_array().cloned().unwrap())
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect();
    let mut s = config.family_settings(kproxy::model::IpFamily::V4, "test-node", None, &addrs);
    s.node_ip = Some("192.168.0.2".parse().unwrap());
    let cidrs = vec!["172.30.0.0/16".parse().unwrap()];
    (s, cidrs)
}

#[test]
fn incremental_syncs_converge_in_the_kernel() {
    if !require_root("incremental_syncs_converge_in_the_kernel") {
        return;
    }
    // Replay upstream's TestSyncProxyRulesRepeated over netlink; after every step the
    // kernel must hold what `nft -f` of upstream's expected text builds.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables");
    let mut steps: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("TestSyncProxyRulesRepeated_")
        })
        .collect();
    steps.sort();
    let (settings, cidrs) = vector_settings(&steps[0]);
    let ns = Netns::new("nlinc");
    let mut renderer = NftRenderer::new(settings.clone());
    let mut clock = 10_000u64;
    let mut state = ClusterState::new();
    let node = NodeContext {
        name: "test-node".into(),
        zone: None,
        prefer_same_node: true,
    };
    for dir in &steps {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let tr: serde_json::Value =
            serde_yaml_ng::from_str(&fs::read_to_string(dir.join("transition.yaml")).unwrap())
                .unwrap();
        for action in tr["actions"].as_array().unwrap() {
            match action["op"].as_str().unwrap() {
                "applyClusterYAML" => {
                    state = snapshot::load_str(
                        &fs::read_to_string(dir.join("cluster.yaml")).unwrap(),
                        "c",
                    )
                    .unwrap()
                    .state
                }
                "setEndpointSlice" => {
                    let text = serde_yaml_ng::to_string(&action["object"]).unwrap();
                    for s in snapshot::load_str(&text, "s").unwrap().state.slices() {
                        state.insert_slice(s.clone());
                    }
                }
                "ageStaleChains" => clock += 2000,
                _ => {
                    let mut ps = state.proxy_state(settings.family, &node);
                    ps.service_cidrs = cidrs.clone();
                    let out = renderer.render(
                        &ps,
                        &RenderOptions {
                            full: false,
                            now_ms: clock,
                            existing: None,
                        },
                    );
                    if let Some(c) = out.cleanup.clone() {
                        apply_in(&ns, c).unwrap_or_else(|e| panic!("{name}: cleanup: {e}"));
                    }
                    apply_in(&ns, out.main.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
                    renderer.commit(out);
                }
            }
        }
        let reference = Netns::new("nlref");
        // Upstream's literal lists elements before the chains they point at; put the
        // lines in an order `nft -f` can load.
        let raw = fs::read_to_string(dir.join("expected.nft")).unwrap();
        let rank = |l: &str| match l.split_whitespace().nth(1) {
            Some("table") => 0,
            Some("chain") => 1,
            Some("set" | "map") => 2,
            Some("rule") => 3,
            _ => 4,
        };
        let mut lines: Vec<&str> = raw
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        lines.sort_by_key(|l| rank(l));
        let expected = lines.join("\n") + "\n";
        let (ok, _, err) = reference.exec_stdin(&["nft", "-f", "-"], &expected);
        assert!(ok, "{name}: nft -f expected: {err}");
        assert_eq!(
            canonical_listing(&ns.nft_list("ip")),
            canonical_listing(&reference.nft_list("ip")),
            "{name}"
        );
    }
}

#[test]
fn takeover_and_resync_match_a_fresh_full_sync() {
    if !require_root("takeover_and_resync_match_a_fresh_full_sync") {
        return;
    }
    // A table left by another run (the demo cluster) is taken over by a full sync of a
    // different cluster: the result must equal that cluster applied to an empty netns.
    let before = golden_inputs("ingress-tcp-services");
    let after = golden_inputs("session-affinity");
    let ns = Netns::new("nltake");
    let fresh = Netns::new("nlfresh");
    let s: FamilySettings = before.families[0].clone();
    let ps = before.state.proxy_state(s.family, &before.node);
    apply_in(
        &ns,
        NftRenderer::new(s)
            .render(&ps, &RenderOptions::default())
            .main,
    )
    .unwrap();
    let s2 = after.families[0].clone();
    let ps2 = after.state.proxy_state(s2.family, &after.node);
    let (s2a, ps2a) = (s2.clone(), ps2.clone());
    let flushed = ns.run(move || {
        let mut nl = Netlink::open().unwrap();
        let existing = nl
            .read_table(Family::Ip, TABLE)
            .unwrap()
            .expect("table exists");
        assert!(existing.chains.contains("services"));
        assert!(!existing.elements.is_empty());
        let mut r = NftRenderer::new(s2a);
        let out = r.render(
            &ps2a,
            &RenderOptions {
                full: true,
                now_ms: 0,
                existing: Some(&existing),
            },
        );
        // Applied in small batches at the renderer's cut points, as a large take-over
        // or full resync is: every batch must be accepted and the end state must be
        // the same as one atomic batch (and as a fresh table).
        let parts = out.main.split(5);
        assert!(parts.len() >= 3, "{} batches", parts.len());
        for part in parts {
            nl.apply(&part).unwrap();
        }
        let flushed = out.flushed_stale.clone();
        r.commit(out.record);
        // A later sync deletes the chains this one emptied.
        let later = r.render(
            &ps2a,
            &RenderOptions {
                full: false,
                now_ms: 5_000,
                existing: None,
            },
        );
        nl.apply(later.cleanup.as_ref().expect("stale chains to delete"))
            .unwrap();
        assert!(later.main.is_empty(), "nothing else changed");
        flushed
    });
    assert!(!flushed.is_empty());
    apply_in(
        &fresh,
        NftRenderer::new(s2)
            .render(&ps2, &RenderOptions::default())
            .main,
    )
    .unwrap();
    assert_eq!(
        canonical_listing(&ns.nft_list("ip")),
        canonical_listing(&fresh.nft_list("ip"))
    );
}

#[test]
fn refused_batch_changes_nothing_and_names_the_operation() {
    if !require_root("refused_batch_changes_nothing_and_names_the_operation") {
        return;
    }
    let inputs = golden_inputs("kube-dns");
    let s = inputs.families[0].clone();
    let ps = inputs.state.proxy_state(s.family, &inputs.node);
    let ns = Netns::new("nlfail");
    apply_in(
        &ns,
        NftRenderer::new(s.clone())
            .render(&ps, &RenderOptions::default())
            .main,
    )
    .unwrap();
    let before = ns.nft_list("ip");
    let mut bad = Transaction::new(Family::Ip, TABLE);
    bad.push(Op::FlushChain("services".into()));
    bad.push(Op::DeleteChain("no-such-chain".into()));
    bad.push(Op::FlushChain("masquerading".into()));
    let err = ns.run(move || {
        let mut nl = Netlink::open().unwrap();
        match nl.apply(&bad) {
            Err(NetlinkError::Refused { index, op, .. }) => (index, op),
            other => panic!("expected a refusal, got {other:?}"),
        }
    });
    assert_eq!(err.0, 1);
    assert!(
        err.1.contains("delete chain ip kube-proxy no-such-chain"),
        "{}",
        err.1
    );
    assert_eq!(
        ns.nft_list("ip"),
        before,
        "a refused batch must not change anything"
    );
}

#[test]
fn cleanup_deletes_only_our_tables_and_is_idempotent() {
    if !require_root("cleanup_deletes_only_our_tables_and_is_idempotent") {
        return;
    }
    let ns = Netns::new("nlclean");
    let (ok, _, err) = ns.exec_stdin(
        &["nft", "-f", "-"],
        "add table ip kube-proxy\nadd table ip6 kube-proxy\nadd table ip other\nadd chain ip other c\n",
    );
    assert!(ok, "{err}");
    let kproxy = env!("CARGO_BIN_EXE_kproxy");
    for _ in 0..2 {
        let (ok, _, err) = ns.exec_status(&[kproxy, "cleanup", "--mode", "nftables"]);
        assert!(ok, "cleanup: {err}");
    }
    let (_, tables, _) = ns.exec_status(&["nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table ip other");
}

#[test]
fn single_element_lookups_find_exactly_the_elements_present() {
    if !require_root("single_element_lookups_find_exactly_the_elements_present") {
        return;
    }
    use kproxy::model::Protocol;
    use kproxy::nftables::transaction::KeyValue;
    let ns = Netns::new("nkel");
    let text = "add table ip kproxy-el-test
add set ip kproxy-el-test plain { type ipv4_addr . ipv4_addr ; }
add map ip kproxy-el-test data { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service ; }
add element ip kproxy-el-test plain { 10.1.0.1 . 10.1.0.1 }
add element ip kproxy-el-test data { 172.30.0.1 . tcp . 80 : 10.1.0.1 . 8080 }
";
    let (ok, _, err) = ns.exec_status(&["sh", "-c", &format!("printf '%s' '{text}' | nft -f -")]);
    assert!(ok, "nft -f: {err}");
    let found = ns.run(|| {
        let mut nl = Netlink::open().unwrap();
        let ip = |s: &str| KeyValue::Ip(s.parse().unwrap());
        let t = "kproxy-el-test";
        let mut q =
            |set: &str, key: &[KeyValue]| nl.element_exists(Family::Ip, t, set, key).unwrap();
        vec![
            q("plain", &[ip("10.1.0.1"), ip("10.1.0.1")]),
            q("plain", &[ip("10.1.0.1"), ip("10.1.0.2")]),
            q(
                "data",
                &[
                    ip("172.30.0.1"),
                    KeyValue::Proto(Protocol::Tcp),
                    KeyValue::Port(80),
                ],
            ),
            q(
                "data",
                &[
                    ip("172.30.0.1"),
                    KeyValue::Proto(Protocol::Udp),
                    KeyValue::Port(80),
                ],
            ),
            q("no-such-set", &[ip("10.1.0.1")]),
        ]
    });
    assert_eq!(found, vec![true, false, true, false, false]);
}
