//! Upstream kube-proxy iptables test vectors (testdata/upstream/iptables): every vector
//! with an expected full output, an expected chain, or line assertions is rendered with
//! kproxy and compared after upstream's normalization.

#[path = "support/vectors.rs"]
mod vectors;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use kproxy::iptables::normalize::{chain_rules, normalize};
use kproxy::iptables::render::{RenderOptions, Rendered, Renderer};
use kproxy::model::IpFamily;
use kproxy::snapshot;
use serde_json::Value;
use vectors::{s, settings_for, state_for, vector_dirs, vectors_dir, yaml};

fn existing_chains(cfg: &Value) -> Option<BTreeSet<String>> {
    let list = cfg.get("existing_nat_chains_before_sync")?.as_array()?;
    Some(
        list.iter()
            .filter_map(Value::as_str)
            // The extractor annotates some entries: "NAME (why)".
            .map(|c| c.split_whitespace().next().unwrap_or_default().to_string())
            .collect(),
    )
}

fn render(
    renderer: &Renderer,
    dir: &Path,
    cfg: &Value,
    full: bool,
    existing: Option<&BTreeSet<String>>,
) -> Rendered {
    let (state, node) = state_for(dir, cfg);
    let family = renderer.settings().family;
    let ps = state.proxy_state(family, &node);
    renderer.render(
        &ps,
        &RenderOptions {
            full,
            existing_nat_chains: existing,
            large_cluster_cleanup_due: false,
        },
    )
}

fn assert_same(dir: &Path, expected: &str, actual_payload: &str) {
    let actual = normalize(actual_payload).unwrap_or_else(|e| {
        panic!(
            "{}: our output does not parse: {e}\n{actual_payload}",
            dir.display()
        )
    });
    let expected = expected.trim_start_matches([' ', '\t', '\n']);
    if actual != expected {
        panic!(
            "{}: output differs\n{}",
            dir.display(),
            line_diff(expected, &actual)
        );
    }
}

fn line_diff(expected: &str, actual: &str) -> String {
    let e: BTreeSet<&str> = expected.lines().collect();
    let a: BTreeSet<&str> = actual.lines().collect();
    let mut out = String::new();
    for l in expected.lines().filter(|l| !a.contains(l)) {
        out.push_str(&format!("- {l}\n"));
    }
    for l in actual.lines().filter(|l| !e.contains(l)) {
        out.push_str(&format!("+ {l}\n"));
    }
    if out.is_empty() {
        out = format!("(same lines, different order)\nexpected:\n{expected}\nactual:\n{actual}");
    }
    out
}

fn is_sequence(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("TestSyncProxyRulesRepeated_"))
}

#[test]
fn full_output_vectors() {
    let mut checked = 0;
    for dir in vector_dirs() {
        if is_sequence(&dir) || !dir.join("expected.iptables").exists() {
            continue;
        }
        let cfg = yaml(&dir.join("config.yaml"));
        let renderer = Renderer::new(settings_for(&cfg));
        let out = render(&renderer, &dir, &cfg, true, None);
        let expected = fs::read_to_string(dir.join("expected.iptables")).unwrap();
        assert_same(&dir, &expected, &out.payload);
        checked += 1;
    }
    assert!(checked >= 1, "no full-output vectors found");
}

#[test]
fn single_chain_vectors() {
    let mut checked = 0;
    for dir in vector_dirs() {
        if !dir.join("expected-chain.txt").exists() {
            continue;
        }
        let cfg = yaml(&dir.join("config.yaml"));
        let assertion = yaml(&dir.join("assertion.yaml"));
        let table = s(&assertion, "table").expect("assertion.table");
        let chain = s(&assertion, "chain").expect("assertion.chain");
        let renderer = Renderer::new(settings_for(&cfg));
        let out = render(&renderer, &dir, &cfg, true, None);
        let rules = chain_rules(&out.payload, table, chain).unwrap();
        let actual: String = rules.iter().map(|r| format!("{r}\n")).collect();
        let expected = fs::read_to_string(dir.join("expected-chain.txt")).unwrap();
        assert_eq!(
            actual,
            expected,
            "{}: {table}/{chain} differs\nfull output:\n{}",
            dir.display(),
            out.payload
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} chain vectors found");
}

#[test]
fn sync_proxy_rules_repeated_sequence() {
    let steps: Vec<PathBuf> = vector_dirs()
        .into_iter()
        .filter(|d| is_sequence(d))
        .collect();
    assert!(steps.len() >= 9, "sequence steps missing: {}", steps.len());
    let first_cfg = yaml(&steps[0].join("config.yaml"));
    let mut renderer = Renderer::new(settings_for(&first_cfg));
    for dir in &steps {
        let cfg = yaml(&dir.join("config.yaml"));
        let sync = cfg.get("sync").expect("sync");
        let full = s(sync, "kind") == Some("full");
        let existing = existing_chains(&cfg);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("full_resync_after_partial_failure") {
            // The partial restore of this step fails in the kernel (a chain to delete is
            // still referenced by an injected rule); the failure forces a full sync.
            let failed = render(&renderer, dir, &cfg, false, existing.as_ref());
            assert!(!failed.full, "{name}: the failing sync should be partial");
            assert!(
                failed.payload.contains("-X KUBE-SEP-AYCN5HPXMIRJNJXU"),
                "{name}: the failing partial sync should delete svc4's endpoint chain"
            );
            renderer.invalidate();
            assert!(renderer.needs_full_sync());
        }
        let out = render(&renderer, dir, &cfg, full, existing.as_ref());
        assert_eq!(out.full, full, "{name}: sync kind");
        let expected = fs::read_to_string(dir.join("expected.iptables")).unwrap();
        assert_same(dir, &expected, &out.payload);
        renderer.commit(out);
    }
}

#[test]
fn load_balancer_ip_mode_vectors() {
    let mut checked = 0;
    for dir in vector_dirs() {
        let Ok(text) = fs::read_to_string(dir.join("assertions.yaml")) else {
            continue;
        };
        let a: Value = serde_yaml_ng::from_str(&text).unwrap();
        if s(&a, "kind") != Some("rule-presence") {
            continue;
        }
        let cfg = yaml(&dir.join("config.yaml"));
        let renderer = Renderer::new(settings_for(&cfg));
        let out = render(&renderer, &dir, &cfg, true, None);
        let rules = chain_rules(
            &out.payload,
            s(&a, "table").unwrap(),
            s(&a, "chain").unwrap(),
        )
        .unwrap();
        let pred = s(&a, "predicate").unwrap();
        let ip = pred.rsplit(' ').next().unwrap();
        let present = rules
            .iter()
            .any(|r| kproxy::iptables::normalize::rule_param(r, "-d").as_deref() == Some(ip));
        let expected = a.get("expected").and_then(Value::as_bool).unwrap();
        assert_eq!(present, expected, "{}: {pred}", dir.display());
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} ipMode vectors");
}

#[test]
fn large_cluster_mode_vector() {
    let dir = vectors_dir().join("TestSyncProxyRulesLargeClusterMode");
    let cfg = yaml(&dir.join("config.yaml"));
    let a = yaml(&dir.join("assertions.yaml"));
    let (mut state, node) = state_for(&dir, &cfg);
    let mut renderer = Renderer::new(settings_for(&cfg));
    let dnat = |payload: &str| -> Vec<String> {
        payload
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SEP-") && l.contains("-j DNAT"))
            .map(str::to_string)
            .collect()
    };
    for step in a.get("steps").and_then(Value::as_array).unwrap() {
        let mut full = false;
        let mut cleanup_due = false;
        for action in step.get("do").and_then(Value::as_array).unwrap() {
            if let Some(obj) = action.get("add") {
                let text = serde_yaml_ng::to_string(obj).unwrap();
                let snap = snapshot::load_str(&text, "step").unwrap();
                for svc in snap.state.services() {
                    state.insert_service(svc.clone());
                }
                for sl in snap.state.slices() {
                    state.insert_slice(sl.clone());
                }
            } else if let Some(obj) = action.get("delete") {
                let kind = s(obj, "kind").unwrap_or_default();
                let (ns, name) = (s(obj, "namespace").unwrap(), s(obj, "name").unwrap());
                match kind {
                    "Service" => assert!(state.remove_service(ns, name)),
                    _ => assert!(state.remove_slice(ns, name)),
                }
            } else if let Some(text) = action.as_str() {
                if text.contains("forced full sync") || text.contains("(first, full)") {
                    full = true;
                }
                if text.contains("now - syncPeriod") {
                    cleanup_due = true;
                }
            }
        }
        let ps = state.proxy_state(IpFamily::V4, &node);
        let expect = step.get("expect").unwrap();
        let total = step.get("total_endpoints").and_then(Value::as_u64).unwrap();
        assert_eq!(ps.total_endpoints() as u64, total, "step {step:?}");
        let out = renderer.render(
            &ps,
            &RenderOptions {
                full,
                existing_nat_chains: None,
                large_cluster_cleanup_due: cleanup_due,
            },
        );
        let large = step
            .get("large_cluster_mode")
            .and_then(Value::as_bool)
            .unwrap();
        assert_eq!(out.large_cluster, large);
        let lines = dnat(&out.payload);
        for (k, v) in expect.as_object().unwrap() {
            if let Some(sub) = k
                .strip_prefix("line_matching(\"")
                .and_then(|k| k.strip_suffix("\")"))
            {
                let got = lines
                    .iter()
                    .rev()
                    .find(|l| l.contains(sub))
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(got, v.as_str().unwrap_or_default(), "{k}");
            } else if k == "count(dnat_lines)" {
                assert_eq!(lines.len() as u64, v.as_u64().unwrap(), "{k}");
            } else if k == "comments" {
                let with = lines.iter().filter(|l| l.contains("--comment")).count();
                match v {
                    Value::Number(n) => assert_eq!(with as u64, n.as_u64().unwrap(), "{k}"),
                    _ => assert_eq!(with, lines.len(), "{k}"),
                }
            } else if let Some(chain) = k
                .strip_prefix("contains(\"")
                .and_then(|k| k.strip_suffix("\")"))
            {
                assert_eq!(
                    out.payload.lines().any(|l| l == chain),
                    v.as_bool().unwrap(),
                    "{k}\n{}",
                    out.payload
                );
            } else if k == "restore_input_contains" {
                for want in v.as_array().unwrap() {
                    let want = want.as_str().unwrap();
                    assert!(
                        out.payload.lines().any(|l| l == want),
                        "missing {want}\n{}",
                        out.payload
                    );
                }
            } else if k == "restore_input_does_not_contain" {
                for bad in v.as_array().unwrap() {
                    let bad = bad.as_str().unwrap();
                    assert!(
                        !out.payload.contains(bad),
                        "unexpected {bad}\n{}",
                        out.payload
                    );
                }
            }
        }
        renderer.commit(out);
    }
}

#[test]
fn normalization_cases() {
    let dir = vectors_dir().join("normalization-cases");
    let mut checked = 0;
    for case in fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
        let input = fs::read_to_string(case.path().join("input.iptables")).unwrap();
        let output = fs::read_to_string(case.path().join("output.iptables")).unwrap();
        assert_eq!(
            normalize(&input).unwrap(),
            output.trim_start_matches([' ', '\t', '\n']),
            "{}",
            case.path().display()
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// Upstream's packet-flow expectations (flows.yaml): our rendered rules, traced with
/// upstream's tracer semantics, must send every packet where upstream's rules send it,
/// with the same masquerade decision.
mod flows {
    use crate::vectors::{s, settings_for, state_for, vector_dirs, yaml};
    use kproxy::iptables::render::{RenderOptions, Renderer};
    use kproxy::trace::iptables::{Packet, Ruleset};
    use serde_json::Value;
    use std::fs;
    use std::net::IpAddr;
    use std::path::Path;

    fn check_flows(
        dir: &Path,
        rules: &str,
        phase: &Value,
        local: &[IpAddr],
        failures: &mut Vec<String>,
    ) {
        let mut rs = Ruleset::parse(rules).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        // The jump from the built-in chain that kube-proxy ensures outside the payload.
        rs.append(
            "nat",
            "PREROUTING",
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        )
        .unwrap();
        for flow in phase
            .get("flows")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let pkt = Packet {
                src: s(flow, "source_ip").unwrap().parse().unwrap(),
                dst: s(flow, "dest_ip").unwrap().parse().unwrap(),
                dport: flow.get("dest_port").and_then(Value::as_u64).unwrap() as u16,
                proto: s(flow, "protocol").unwrap_or("TCP").to_lowercase(),
                from_node: false,
            };
            let t = rs.trace(&pkt, local);
            let want = s(flow, "output").unwrap_or_default();
            let want_masq = flow.get("masq").and_then(Value::as_bool).unwrap_or(false);
            if t.output() != want || t.masquerade != want_masq {
                failures.push(format!(
                    "{} [{}] {}: got {:?} masq={} want {:?} masq={}\n  path: {:#?}",
                    dir.file_name().unwrap().to_string_lossy(),
                    s(phase, "name").unwrap_or_default(),
                    s(flow, "name").unwrap_or_default(),
                    t.output(),
                    t.masquerade,
                    want,
                    want_masq,
                    t.steps.iter().map(|s| &s.rule).collect::<Vec<_>>()
                ));
            }
        }
    }

    #[test]
    fn upstream_flow_vectors() {
        let mut failures = Vec::new();
        let mut flows = 0;
        for dir in vector_dirs() {
            let Ok(_) = fs::metadata(dir.join("flows.yaml")) else {
                continue;
            };
            let spec = yaml(&dir.join("flows.yaml"));
            let local: Vec<IpAddr> = spec
                .get("tracer_local_ips")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect();
            let phases = spec
                .get("phases")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if dir.join("input-rules.iptables").exists() {
                // The tracer's own self-test: a static ruleset.
                let rules = fs::read_to_string(dir.join("input-rules.iptables")).unwrap();
                for phase in &phases {
                    flows += phase
                        .get("flows")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    check_flows(&dir, &rules, phase, &local, &mut failures);
                }
                continue;
            }
            let cfg = yaml(&dir.join("config.yaml"));
            let renderer = Renderer::new(settings_for(&cfg));
            let (mut state, node) = state_for(&dir, &cfg);
            for phase in &phases {
                for action in phase
                    .get("apply_before_flows")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(d) = action.get("delete") {
                        let (ns, name) = (s(d, "namespace").unwrap(), s(d, "name").unwrap());
                        let removed = match s(d, "kind") {
                            Some("Service") => state.remove_service(ns, name),
                            _ => state.remove_slice(ns, name),
                        };
                        assert!(removed, "{}: nothing to delete for {d}", dir.display());
                    }
                }
                // The kernel's state after the sync: what a full render of this state writes.
                let ps = state.proxy_state(renderer.settings().family, &node);
                let out = renderer.render(
                    &ps,
                    &RenderOptions {
                        full: true,
                        ..RenderOptions::default()
                    },
                );
                flows += phase
                    .get("flows")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                check_flows(&dir, &out.payload, phase, &local, &mut failures);
            }
        }
        assert!(flows >= 50, "only {flows} flows found");
        assert!(
            failures.is_empty(),
            "{} of {flows} flows differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}
