//! Upstream's packet-flow expectations (flows.yaml in testdata/upstream/iptables): our
//! rendered rules, traced with upstream's tracer semantics, must send every packet where
//! upstream's rules send it, with the same masquerade decision.

mod vectors;

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use kproxy::iptables::render::{RenderOptions, Renderer};
use kproxy::trace::iptables::{Packet, Ruleset};
use serde_json::Value;
use vectors::{s, settings_for, state_for, vector_dirs, yaml};

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
