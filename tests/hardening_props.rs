//! Property test (issue #10): random snapshots mixing valid and hostile Services always
//! render, the hostile ones are skipped (one warning each) and never reach the output,
//! the valid ones always do, and `iptables-restore --test` and `nft -c -f` (in a network
//! namespace of the test's own) accept every rendered output.

#[path = "support/netns.rs"]
mod netns;

use std::io::Write;
use std::process::{Command, Stdio};

use netns::{require_root, Netns};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

/// Characters that must never reach a rule: each breaks some output format.
const HOSTILE: &[char] = &[
    '"', '\n', '}', '{', ' ', '#', ';', '\\', '\0', 'é', 'A', '\'', '*', '\t', '/', ':', '.', '_',
];

fn lower_alnum() -> impl Strategy<Value = char> {
    prop_oneof![
        (b'a'..=b'z').prop_map(char::from),
        (b'0'..=b'9').prop_map(char::from)
    ]
}

/// A DNS-1035 label (valid as a Service name and as a namespace), sometimes 63 bytes.
fn label() -> impl Strategy<Value = String> {
    let short = (
        (b'a'..=b'z').prop_map(char::from),
        prop::collection::vec(prop_oneof![lower_alnum(), Just('-')], 0..12),
        lower_alnum(),
    )
        .prop_map(|(a, mid, z)| {
            let mut s = String::from(a);
            s.extend(mid);
            s.push(z);
            s
        });
    prop_oneof![
        8 => short,
        1 => lower_alnum().prop_map(|c| format!("m{}{c}", "x".repeat(61))),
    ]
}

/// An IANA service name: letter-led `[a-z0-9]` segments joined by single `-`, ≤ 15.
fn port_name() -> impl Strategy<Value = String> {
    (
        (b'a'..=b'z').prop_map(char::from),
        prop::collection::vec(prop::collection::vec(lower_alnum(), 1..4), 0..3),
    )
        .prop_map(|(a, segs)| {
            let mut s = String::from(a);
            for seg in segs {
                s.push('-');
                s.extend(seg);
            }
            s.truncate(15);
            s.trim_end_matches('-').to_string()
        })
}

/// A valid string with one hostile character put in (so it is certainly invalid).
fn spoil(valid: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        valid,
        prop::sample::select(HOSTILE),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(s, c, at)| {
            let mut chars: Vec<char> = s.chars().collect();
            let i = at.index(chars.len() + 1);
            chars.insert(i, c);
            chars.into_iter().collect()
        })
}

#[derive(Debug, Clone)]
enum Affinity {
    None,
    Valid(i64),
    Invalid(i64),
}

#[derive(Debug, Clone)]
struct Svc {
    ns: String,
    name: String,
    port_name: String,
    node_port: bool,
    affinity: Affinity,
    endpoints: usize,
    valid: bool,
}

fn svc() -> impl Strategy<Value = Svc> {
    let affinity = prop_oneof![
        3 => Just(Affinity::None),
        2 => (1i64..=86_400).prop_map(Affinity::Valid),
        1 => prop_oneof![Just(0i64), Just(-1), Just(86_401), Just(2_147_483_647)]
            .prop_map(Affinity::Invalid),
    ];
    // Which field (if any) is spoiled: 0 none, 1 namespace, 2 name, 3 port name.
    (
        0u8..6,
        label(),
        label(),
        port_name(),
        spoil(label()),
        spoil(port_name()),
        any::<bool>(),
        affinity,
        0usize..4,
    )
        .prop_map(
            |(which, ns, name, pn, bad_label, bad_pn, node_port, affinity, endpoints)| {
                let mut s = Svc {
                    ns,
                    name,
                    port_name: pn,
                    node_port,
                    valid: !matches!(affinity, Affinity::Invalid(_)),
                    affinity,
                    endpoints,
                };
                match which {
                    1 => (s.ns, s.valid) = (bad_label, false),
                    2 => (s.name, s.valid) = (bad_label, false),
                    3 => (s.port_name, s.valid) = (bad_pn, false),
                    _ => {}
                }
                s
            },
        )
}

/// The snapshot, with Service `i` at cluster IP 10.96.<i>.1 (so its presence in the
/// output is easy to tell) and endpoints 10.244.<i>.<j+1>.
fn snapshot(svcs: &[Svc]) -> String {
    let mut items = vec![json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]},
    })];
    for (i, s) in svcs.iter().enumerate() {
        let mut port = json!({"name": s.port_name, "port": 80, "protocol": "TCP"});
        if s.node_port {
            port["nodePort"] = json!(30000 + i);
        }
        let mut spec = json!({
            "type": if s.node_port { "NodePort" } else { "ClusterIP" },
            "clusterIP": format!("10.96.{i}.1"),
            "selector": {"app": "x"},
            "ports": [port],
        });
        match s.affinity {
            Affinity::None => {}
            Affinity::Valid(t) | Affinity::Invalid(t) => {
                spec["sessionAffinity"] = json!("ClientIP");
                spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
            }
        }
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.ns}, "spec": spec,
        }));
        if s.endpoints > 0 {
            let eps: Vec<Value> = (0..s.endpoints)
                .map(|j| json!({"addresses": [format!("10.244.{i}.{}", j + 1)]}))
                .collect();
            items.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("slice-{i}"), "namespace": s.ns,
                             "labels": {"kubernetes.io/service-name": s.name}},
                "addressType": "IPv4", "endpoints": eps,
                "ports": [{"name": s.port_name, "port": 8080, "protocol": "TCP"}],
            }));
        }
    }
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap()
}

fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(ns: &Netns, svcs: &[Svc]) -> Result<(), TestCaseError> {
    let snap = snapshot(svcs);
    let invalid = svcs.iter().filter(|s| !s.valid).count();
    for mode in ["iptables", "nftables"] {
        let (ok, out, err) = run(
            &[
                env!("CARGO_BIN_EXE_kproxy"),
                "render",
                "--snapshot",
                "-",
                "--mode",
                mode,
                "--hostname-override",
                "node-a",
            ],
            &snap,
        );
        prop_assert!(ok, "{mode} render failed: {err}");
        // Each invalid Service is one warning; its slice (hostile namespace or port name)
        // may be one more, never zero.
        let warnings = err.matches("skipping malformed object").count();
        prop_assert!(
            warnings >= invalid,
            "{mode}: {warnings} warnings for {invalid} invalid Services:\n{err}"
        );
        for (i, s) in svcs.iter().enumerate() {
            let vip = format!("10.96.{i}.1 ");
            let present = out.contains(&vip);
            prop_assert_eq!(present, s.valid, "{} {:?} in\n{}", mode, s, out);
        }
        let tool: &[&str] = match mode {
            "iptables" => &["iptables-restore", "--test"],
            _ => &["nft", "-c", "-f", "-"],
        };
        let mut args = vec!["ip", "netns", "exec", &ns.name];
        args.extend_from_slice(tool);
        let (ok, _, e) = run(&args, &out);
        prop_assert!(
            ok,
            "{} refused the {} output: {}\n{}",
            tool[0],
            mode,
            e,
            out
        );
    }
    Ok(())
}

#[test]
fn random_valid_and_hostile_snapshots_render_loadable_rules() {
    if !require_root("random_valid_and_hostile_snapshots_render_loadable_rules") {
        return;
    }
    let ns = Netns::new("hardprop");
    let cases: u32 = std::env::var("HARDENING_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut runner = TestRunner::new(Config {
        cases,
        // Shrinking re-runs external tools; a few steps are enough to read a failure.
        max_shrink_iters: 32,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &prop::collection::vec(svc(), 1..8).prop_filter("distinct Services", |v| {
                let mut keys: Vec<(&str, &str)> =
                    v.iter().map(|s| (s.ns.as_str(), s.name.as_str())).collect();
                keys.sort();
                keys.dedup();
                keys.len() == v.len()
            }),
            |svcs| check(&ns, &svcs),
        )
        .unwrap();
}
