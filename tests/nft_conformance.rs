//! Upstream kube-proxy nftables test vectors (testdata/upstream/nftables): every literal
//! ruleset, the TestSyncProxyRulesRepeated sequence with upstream's operation counts,
//! and the element assertions, compared after upstream's normalization.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kproxy::config::{Config, FamilySettings};
use kproxy::model::{ClusterState, IpFamily, NodeContext, ProxyState};
use kproxy::nftables::fake::Fake;
use kproxy::nftables::render::{NftRenderer, RenderOptions, Rendered};
use kproxy::nftables::text::normalize;
use kproxy::snapshot;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables")
}

fn yaml(p: &Path) -> Value {
    serde_yaml_ng::from_str(
        &fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn dirs() -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = fs::read_dir(root())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("config.yaml").exists())
        .collect();
    d.sort();
    d
}

/// Upstream's nftables fake proxier, from a vector's config.yaml.
fn settings(cfg: &Value) -> (FamilySettings, Vec<IpNet>) {
    let family = if cfg["family"].as_str() == Some("IPv6") {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let mut config = Config {
        masquerade_all: cfg["masqueradeAll"].as_bool().unwrap_or(false),
        ..Config::default()
    };
    if let Some(b) = cfg["masqueradeBit"].as_u64() {
        config.masquerade_bit = b as u32;
    }
    config.nodeport_addresses = cfg["nodePortAddresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let det = &cfg["localDetector"];
    if det["mode"].as_str().unwrap_or("ClusterCIDR") == "ClusterCIDR" {
        let field = if family == IpFamily::V6 {
            "clusterCIDRv6"
        } else {
            "clusterCIDR"
        };
        let cidr = det[field]
            .as_str()
            .or_else(|| det["clusterCIDR"].as_str())
            .and_then(|c| c.parse::<IpNet>().ok())
            .filter(|c| IpFamily::of_net(c) == family)
            .or_else(|| (family == IpFamily::V6).then(|| "fd00:10::/64".parse().unwrap()));
        config.cluster_cidrs = cidr.into_iter().collect();
    }
    let mut addrs = Vec::new();
    for iface in cfg["interfaces"].as_array().into_iter().flatten() {
        for a in iface["addresses"].as_array().into_iter().flatten() {
            if let Some(n) = a.as_str().and_then(|a| a.parse().ok()) {
                addrs.push(n);
            }
        }
    }
    let node_name = cfg["nodeName"].as_str().unwrap_or("test-node");
    let mut fs = config.family_settings(family, node_name, None, &addrs);
    fs.node_ip = cfg["nodeIP"]
        .as_str()
        .and_then(|s| s.parse::<IpAddr>().ok());
    let cidrs = cfg["serviceCIDRs"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .filter(|c| IpFamily::of_net(c) == family)
        .collect();
    (fs, cidrs)
}

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
