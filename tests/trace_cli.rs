//! `kproxy trace` as a user runs it: golden text and JSON on the demo cluster (both
//! modes), the JSON against docs/schema/trace.v1.json, one answer whatever form the
//! rules come in (rendered, kproxy's dry-run text, `nft list table`, `nft -j`,
//! `iptables-save`), a real host's iptables-save, and every malformed-ruleset case of
//! issue 13 (an error or an explicit unknown, never a panic or a changed answer).
//! Regenerate the goldens on purpose only: `UPDATE_GOLDEN=1 cargo test --test trace_cli`.

#[path = "support/cli.rs"]
mod cli;

use std::fs;
use std::path::{Path, PathBuf};

use cli::{demo_args, kproxy, root, strs};
use serde_json::Value;

fn golden(name: &str, got: &str) {
    let file = root().join("testdata/trace/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, got).unwrap();
        return;
    }
    let want = fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", file.display()));
    pretty_assertions::assert_eq!(want, got, "{name}");
}

fn validate(schema_file: &str, doc: &Value) {
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(root().join("docs/schema").join(schema_file)).unwrap(),
    )
    .unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{schema_file}: {errors:#?}");
}

/// (golden name, mode, src, dst, dport, proto, from node)
const DEMO_PACKETS: &[(&str, &str, &str, &str, &str, &str, bool)] = &[
    (
        "pod-to-clusterip",
        "iptables",
        "10.244.1.9",
        "10.96.20.10",
        "80",
        "tcp",
        false,
    ),
    (
        "outside-to-etp-local-nodeport",
        "iptables",
        "198.51.100.7",
        "172.18.0.2",
        "31443",
        "tcp",
        false,
    ),
    (
        "node-to-clusterip",
        "iptables",
        "172.18.0.2",
        "10.96.51.94",
        "3000",
        "tcp",
        true,
    ),
    (
        "clusterip-unknown-port",
        "iptables",
        "10.244.1.9",
        "10.96.20.10",
        "81",
        "tcp",
        false,
    ),
    (
        "pod-to-dns",
        "iptables",
        "10.244.1.9",
        "10.96.0.10",
        "53",
        "udp",
        false,
    ),
    (
        "pod-to-clusterip",
        "nftables",
        "10.244.1.9",
        "10.96.20.10",
        "80",
        "tcp",
        false,
    ),
    (
        "outside-to-etp-local-nodeport",
        "nftables",
        "198.51.100.7",
        "172.18.0.2",
        "31443",
        "tcp",
        false,
    ),
    (
        "node-to-clusterip",
        "nftables",
        "172.18.0.2",
        "10.96.51.94",
        "3000",
        "tcp",
        true,
    ),
    (
        "clusterip-unknown-port",
        "nftables",
        "10.244.1.9",
        "10.96.20.10",
        "81",
        "tcp",
        false,
    ),
    (
        "outside-to-lb",
        "nftables",
        "198.51.100.7",
        "203.0.113.10",
        "443",
        "tcp",
        false,
    ),
];

fn packet_args(src: &str, dst: &str, dport: &str, proto: &str, from_node: bool) -> Vec<String> {
    let mut a = strs(&[
        "--src", src, "--dst", dst, "--dport", dport, "--proto", proto,
    ]);
    if from_node {
        a.push("--from-node".into());
    }
    a
}

#[test]
fn demo_goldens_text_and_json() {
    for (name, mode, src, dst, dport, proto, from_node) in DEMO_PACKETS {
        let mut args = strs(&["trace", "--mode", mode]);
        args.extend(demo_args());
        args.extend(packet_args(src, dst, dport, proto, *from_node));
        let (code, text, err) = kproxy(&args);
        assert_eq!(code, 0, "{name}: {err}");
        golden(&format!("{mode}-{name}.txt"), &text);
        args.extend(strs(&["-o", "json"]));
        let (code, json, err) = kproxy(&args);
        assert_eq!(code, 0, "{name}: {err}");
        let doc: Value = serde_json::from_str(&json).unwrap();
        validate("trace.v1.json", &doc);
        golden(&format!("{mode}-{name}.json"), &json);
    }
}

/// The result of a trace through a ruleset file (any format), as JSON.
fn result_over(file: &Path, mode: &str, p: &(&str, &str, &str, &str, &str, &str, bool)) -> Value {
    let mut args = strs(&["trace", "--mode", mode, "--ruleset"]);
    args.push(file.display().to_string());
    // The node's addresses, as the snapshot would give them.
    args.extend(strs(&["--local-address", "172.18.0.2"]));
    args.extend(packet_args(p.2, p.3, p.4, p.5, p.6));
    args.extend(strs(&["-o", "json"]));
    let (code, out, err) = kproxy(&args);
    assert_eq!(code, 0, "{}: {err}", file.display());
    let v: Value = serde_json::from_str(&out).unwrap();
    validate("trace.v1.json", &v);
    v["result"].clone()
}

/// The kernel prints rules in its own words (option order, `meta mark set meta mark |
/// 0x00004000` for `mark set mark or 0x4000`): the marking rule's chain must agree,
/// its text may not.
fn without_rule_text(mut v: Value) -> Value {
    if let Some(m) = v.get_mut("masquerade_by").and_then(Value::as_object_mut) {
        m.remove("rule");
    }
    v
}

#[test]
fn one_answer_whatever_the_rules_format() {
    let dir = std::env::temp_dir().join(format!("kproxy-trace-cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for mode in ["iptables", "nftables"] {
        let mut args = strs(&["render", "--mode", mode]);
        args.extend(demo_args());
        let (code, rendered, err) = kproxy(&args);
        assert_eq!(code, 0, "{err}");
        let dry = dir.join(format!("{mode}.dry"));
        fs::write(&dry, rendered).unwrap();
        let kernel: Vec<PathBuf> = if mode == "nftables" {
            vec![
                root().join("testdata/trace/demo-nft-list-table.txt"),
                root().join("testdata/trace/demo-nft-list-table.json"),
            ]
        } else {
            vec![root().join("testdata/trace/demo-iptables-save.txt")]
        };
        for p in DEMO_PACKETS.iter().filter(|p| p.1 == mode) {
            let mut args = strs(&["trace", "--mode", mode, "-o", "json"]);
            args.extend(demo_args());
            args.extend(packet_args(p.2, p.3, p.4, p.5, p.6));
            let (code, out, err) = kproxy(&args);
            assert_eq!(code, 0, "{err}");
            let want =
                without_rule_text(serde_json::from_str::<Value>(&out).unwrap()["result"].clone());
            let got = without_rule_text(result_over(&dry, mode, p));
            assert_eq!(got, want, "{mode} {} dry-run text", p.0);
            for k in &kernel {
                let got = without_rule_text(result_over(k, mode, p));
                assert_eq!(got, want, "{mode} {} {}", p.0, k.display());
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn clusterip_on_a_port_no_service_has() {
    // iptables mode writes no rule for it (upstream): every source says so; nftables
    // mode rejects it, and says why from the rule, not "no usable endpoints".
    let p = DEMO_PACKETS
        .iter()
        .find(|p| p.0 == "clusterip-unknown-port")
        .unwrap();
    let ipt = result_over(
        &root().join("testdata/trace/demo-iptables-save.txt"),
        "iptables",
        p,
    );
    assert_eq!(ipt, serde_json::json!({"kind": "not_service"}));
    let nft = result_over(
        &root().join("testdata/trace/demo-nft-list-table.txt"),
        "nftables",
        p,
    );
    assert_eq!(
        nft,
        serde_json::json!({"kind": "rejected", "reason": "Reject traffic to invalid ports of ClusterIPs"})
    );
}

#[test]
fn real_host_iptables_save() {
    let host = root().join("testdata/trace/host-iptables-save.txt");
    let run = |src: &str, dst: &str, dport: &str| -> Value {
        let p = ("", "iptables", src, dst, dport, "tcp", false);
        result_over(&host, "iptables", &p)
    };
    // kube-proxy's Services work as on a bare node.
    let r = run("10.244.1.9", "10.96.20.10", "80");
    assert_eq!(r["kind"], "delivered");
    assert_eq!(r["endpoints"].as_array().unwrap().len(), 3);
    assert_eq!(r["masquerade"], false);
    let r = run("198.51.100.7", "172.18.0.2", "30000");
    assert_eq!(r["masquerade"], true);
    assert!(r["masquerade_by"]["chain"]
        .as_str()
        .unwrap()
        .starts_with("KUBE-EXT-"));
    // The CNI portmap plugin's hostPort (multiport, mark, comments with quotes).
    let r = run("198.51.100.7", "172.18.0.2", "8443");
    assert_eq!(
        r["endpoints"],
        serde_json::json!([{"destination": "10.244.1.77:443", "probability": 1.0}])
    );
    // Docker's port mapping depends on the input interface: explicit unknown steps.
    let mut args = strs(&["trace", "--ruleset"]);
    args.push(host.display().to_string());
    args.extend(strs(&[
        "--local-address",
        "172.18.0.2",
        "--src",
        "198.51.100.7",
        "--dst",
        "172.18.0.2",
        "--dport",
        "8080",
    ]));
    let (code, text, err) = kproxy(&args);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("unknown, not taken: ! -i docker0"), "{text}");
    assert!(
        text.contains("note: 2 rule(s) on the path could not be decided"),
        "{text}"
    );
    golden("host-docker-port.txt", &text);
}

/// A ruleset file with `body`, traced to 172.30.0.1:80.
fn trace_file(name: &str, body: &str, mode: &str) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("kproxy-trace-bad-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let f = dir.join(name);
    fs::write(&f, body).unwrap();
    let mut args = strs(&["trace", "--mode", mode, "--ruleset"]);
    args.push(f.display().to_string());
    args.extend(strs(&[
        "--src",
        "10.0.0.9",
        "--dst",
        "172.30.0.1",
        "--dport",
        "80",
    ]));
    kproxy(&args)
}

const NFT: &str = r#"add table ip kube-proxy
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy services
add chain ip kube-proxy svc
add chain ip kube-proxy ep-a
add chain ip kube-proxy ep-b
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy svc numgen random mod 2 vmap { 0 : goto ep-a , 1 : goto ep-b }
add rule ip kube-proxy ep-a meta l4proto tcp dnat to 10.1.0.1:80
add rule ip kube-proxy ep-b meta l4proto tcp dnat to 10.1.0.2:80
add element ip kube-proxy service-ips { 172.30.0.1 . tcp . 80 : goto svc }
"#;

const IPT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n:KUBE-SEP-1 - [0:0]\n:KUBE-SEP-2 - [0:0]\n\
-A PREROUTING -j KUBE-SERVICES\n\
-A KUBE-SERVICES -d 172.30.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A\n\
-A KUBE-SVC-A -m statistic --mode random --probability PROB -j KUBE-SEP-1\n\
-A KUBE-SVC-A -j KUBE-SEP-2\n\
-A KUBE-SEP-1 -p tcp -m tcp -j DNAT --to-destination DEST\n\
-A KUBE-SEP-2 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:80\n\
COMMIT\n";

fn ipt(prob: &str, dest: &str) -> String {
    IPT.replace("PROB", prob).replace("DEST", dest)
}

#[test]
fn malformed_rulesets_are_errors_or_explicit_unknowns() {
    // The well-formed ones first: the answer the broken variants must not silently give.
    let (code, ok, err) = trace_file("ok.nft", NFT, "nftables");
    assert_eq!(code, 0, "{err}");
    assert!(
        ok.contains("10.1.0.1:80 50.0%") && ok.contains("10.1.0.2:80 50.0%"),
        "{ok}"
    );
    let (code, ok, err) = trace_file("ok.ipt", &ipt("0.5", "10.1.0.1:80"), "iptables");
    assert_eq!(code, 0, "{err}");
    assert!(ok.contains("10.1.0.1:80 50.0%"), "{ok}");

    let errors: Vec<(&str, String, &str, &str)> = vec![
        (
            "truncated-rule.nft",
            format!("{NFT}add rule ip\n"),
            "nftables",
            "truncated line",
        ),
        (
            "truncated-rule2.nft",
            format!("{NFT}add rule ip kube-proxy\n"),
            "nftables",
            "truncated line",
        ),
        (
            "open-quote.nft",
            format!("{NFT}add rule ip kube-proxy svc comment \"oops\n"),
            "nftables",
            "unterminated quote",
        ),
        (
            "open-block.nft",
            "table ip kube-proxy {\n\tchain svc {\n\t\tjump x\n".into(),
            "nftables",
            "ends inside a block",
        ),
        (
            "bad.json",
            "{\"nftables\": [".into(),
            "nftables",
            "nft JSON",
        ),
        (
            "json-as-iptables",
            format!("{{\"nftables\": [{}]}}", "{\"x\": 1},".repeat(4000)),
            "iptables",
            "outside a table",
        ),
        (
            "open-quote.ipt",
            IPT.replace(
                "-A PREROUTING -j KUBE-SERVICES",
                "-A PREROUTING -m comment --comment \"x -j KUBE-SERVICES",
            ),
            "iptables",
            "unterminated quote",
        ),
        (
            "nan.ipt",
            ipt("NaN", "10.1.0.1:80"),
            "iptables",
            "bad argument for --probability: \"NaN\"",
        ),
        (
            "negative.ipt",
            ipt("-7", "10.1.0.1:80"),
            "iptables",
            "bad argument for --probability: \"-7\"",
        ),
        (
            "bad-dest.ipt",
            ipt("0.5", "999.1.1.1:99999"),
            "iptables",
            "bad argument for --to-destination",
        ),
        (
            "bad-port.ipt",
            ipt("0.5", "10.1.0.1:99999"),
            "iptables",
            "bad argument for --to-destination",
        ),
    ];
    for (name, body, mode, want) in errors {
        let (code, out, err) = trace_file(name, &body, mode);
        assert_eq!(code, 2, "{name}: exit {code}, out {out}, err {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Some("),
            "{name}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{name}: one line: {err}");
        assert!(err.len() < 400, "{name}: short: {err}");
    }

    // On the path but not decidable: explicit, never a silently different answer.
    let unknown = format!("{NFT}add rule ip kube-proxy ep-b frobnicate 7\n").replace(
        "add rule ip kube-proxy ep-b meta l4proto tcp dnat to 10.1.0.2:80\n",
        "",
    ) + "add rule ip kube-proxy ep-b meta l4proto tcp dnat to 10.1.0.2:80\n";
    let (code, out, err) = trace_file("unknown-stmt.nft", &unknown, "nftables");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("? (50.0%)") && out.contains("statement \"frobnicate\""),
        "{out}"
    );
    assert!(out.contains("note: 1 rule(s)"), "{out}");
    let looped = format!("{NFT}add rule ip kube-proxy ep-a jump services\n").replace(
        "add rule ip kube-proxy ep-a meta l4proto tcp dnat to 10.1.0.1:80\n",
        "",
    );
    let (code, out, err) = trace_file("loop.nft", &looped, "nftables");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "result: unknown (jump loop: nat-prerouting -> services -> svc -> ep-a -> services)"
        ),
        "{out}"
    );
    assert!(
        out.matches("=> jump services").count() <= 2,
        "printed round and round: {out}"
    );
    let bad_dnat = NFT.replace("dnat to 10.1.0.1:80", "dnat to 999.1.1.1:99999");
    let (code, out, _) = trace_file("bad-dnat.nft", &bad_dnat, "nftables");
    assert_eq!(code, 0);
    assert!(
        out.contains("result: unknown (bad DNAT target \"999.1.1.1:99999\""),
        "{out}"
    );
    assert!(!out.contains("delivered"), "{out}");
}

#[test]
fn ruleset_or_live_needs_no_snapshot_but_render_does() {
    let (code, _, err) = kproxy(&strs(&[
        "trace", "--src", "10.0.0.1", "--dst", "10.0.0.2", "--dport", "1",
    ]));
    assert_eq!(code, 2);
    assert!(err.contains("--snapshot FILE is required"), "{err}");
    let (code, _, err) = trace_file("ok2.nft", NFT, "nftables");
    assert_eq!(code, 0, "{err}");
}

/// `kproxy trace --nftables-layout=maps` renders kproxy's data-map layout and traces
/// through it: a session-affinity Service reaches all three endpoints (a new client),
/// an endpoint reaching its own Service is masqueraded (hairpin, decided in
/// postrouting), another pod is not.
#[test]
fn trace_renders_the_maps_layout() {
    let dir = root().join("testdata/golden/session-affinity");
    let mut base = strs(&["trace", "--snapshot"]);
    base.push(dir.join("cluster.yaml").display().to_string());
    base.extend(
        fs::read_to_string(dir.join("args"))
            .unwrap()
            .split_whitespace()
            .map(str::to_string),
    );
    base.extend(strs(&[
        "--mode",
        "nftables",
        "--nftables-layout",
        "maps",
        "--dst",
        "10.96.80.80",
        "--dport",
        "8080",
        "-o",
        "json",
    ]));
    for (src, masq) in [("10.244.1.91", true), ("10.244.1.50", false)] {
        let mut args = base.clone();
        args.extend(strs(&["--src", src]));
        let (code, out, err) = kproxy(&args);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let r = &v["result"];
        assert_eq!(r["kind"], "delivered", "{out}");
        assert_eq!(r["endpoints"].as_array().unwrap().len(), 3, "{out}");
        assert_eq!(r["masquerade"], masq, "{src}: {out}");
        assert!(out.contains("ip kproxy"), "{out}");
    }
}
