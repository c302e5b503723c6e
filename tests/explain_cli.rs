//! `kproxy explain` on the demo cluster: golden text (overview table and per-Service
//! detail), JSON (validated against docs/schema/explain.v1.json) and Mermaid; every
//! statement it makes about a way in (endpoints used, masquerade, reject/drop) agrees
//! with the tracer over the rules kproxy renders, in both modes; `explain --live` reads
//! the same answer from a daemon's /debug/state; `render -o json` validates against
//! docs/schema/render.v1.json. Regenerate goldens on purpose only: `UPDATE_GOLDEN=1`.

#[path = "support/cli.rs"]
mod cli;

use std::collections::BTreeSet;
use std::fs;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use clap::Parser;
use cli::{demo_args, kproxy, root, strs};
use kproxy::cli::inputs::{InputArgs, Inputs};
use kproxy::daemon::{health, metrics, Shared};
use kproxy::dataplane::fake::{FakeControl, FakeDataplane};
use kproxy::model::IpFamily;
use serde_json::Value;

fn explain(extra: &[&str]) -> String {
    let mut args = strs(&["explain"]);
    args.extend(strs(extra));
    args.extend(demo_args());
    let (code, out, err) = kproxy(&args);
    assert_eq!(code, 0, "{extra:?}: {err}");
    out
}

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

fn schema(file: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(root().join("docs/schema").join(file)).unwrap())
        .unwrap()
}

fn validate_with(schema: &Value, name: &str, doc: &Value) {
    let v = jsonschema::validator_for(schema).unwrap();
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {errors:#?}");
}

#[test]
fn demo_goldens() {
    golden("explain-all.txt", &explain(&[]));
    for (svc, file) in [
        ("default/frontend", "explain-frontend"),
        ("web/shop:https", "explain-shop"),
        ("kube-system/kube-dns:53", "explain-dns"),
        (
            "ingress-nginx/ingress-nginx-internal-tcp:http",
            "explain-ingress",
        ),
    ] {
        golden(&format!("{file}.txt"), &explain(&[svc]));
        let json = explain(&[svc, "-o", "json"]);
        validate_with(
            &schema("explain.v1.json"),
            svc,
            &serde_json::from_str(&json).unwrap(),
        );
        golden(&format!("{file}.json"), &json);
        golden(&format!("{file}.mmd"), &explain(&[svc, "-o", "mermaid"]));
    }
    let all: Value = serde_json::from_str(&explain(&["-o", "json"])).unwrap();
    validate_with(&schema("explain.v1.json"), "all", &all);
}

#[test]
fn unknown_service_is_a_usage_error() {
    let mut args = strs(&["explain", "default/nope"]);
    args.extend(demo_args());
    let (code, _, err) = kproxy(&args);
    assert_eq!(code, 2);
    assert!(err.contains("no Service port default/nope"), "{err}");
    let mut args = strs(&["explain", "not-a-name"]);
    args.extend(demo_args());
    assert_eq!(kproxy(&args).0, 2);
}

/// The trace of one packet through the rendered demo rules: (result kind, endpoint
/// set, masquerade).
fn trace(
    mode: &str,
    src: &str,
    dst: &str,
    dport: &str,
    from_node: bool,
) -> (String, BTreeSet<String>, bool) {
    let mut args = strs(&[
        "trace", "--mode", mode, "-o", "json", "--src", src, "--dst", dst, "--dport", dport,
    ]);
    if from_node {
        args.push("--from-node".into());
    }
    args.extend(demo_args());
    let (code, out, err) = kproxy(&args);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let r = &v["result"];
    let eps = r["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["destination"].as_str().unwrap().to_string())
        .collect();
    (
        r["kind"].as_str().unwrap().to_string(),
        eps,
        r["masquerade"].as_bool().unwrap_or(false),
    )
}

#[test]
fn explain_agrees_with_the_tracer_in_both_modes() {
    let doc: Value = serde_json::from_str(&explain(&["-o", "json"])).unwrap();
    let node_ip = "172.18.0.2";
    let mut checked = 0;
    let mut failures = Vec::new();
    for port in doc["ports"].as_array().unwrap() {
        let svc = port["service"].as_str().unwrap();
        let proto = port["protocol"].as_str().unwrap();
        if proto != "tcp" {
            continue; // the trace CLI default; UDP behaves the same in these rules
        }
        let set = |key: &str| -> BTreeSet<String> {
            port["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e[key].as_f64().unwrap() > 0.0)
                .map(|e| e["address"].as_str().unwrap().to_string())
                .collect()
        };
        for fe in port["frontends"].as_array().unwrap() {
            if !fe["programmed"].as_bool().unwrap() {
                continue;
            }
            let addr = fe["address"].as_str().unwrap();
            let (ip, p) = addr.rsplit_once(':').unwrap();
            let ip = if ip == "*" { node_ip } else { ip };
            for path in fe["paths"].as_array().unwrap() {
                let client = path["client"].as_str().unwrap();
                let (src, from_node) = match client {
                    "pod" => ("10.244.1.250", false),
                    "node" => (node_ip, true),
                    _ => ("198.51.100.7", false),
                };
                let want_kind = match path["verdict"].as_str() {
                    Some("REJECT") => "rejected",
                    Some("DROP") => "dropped",
                    _ => "delivered",
                };
                let want_eps = match path["endpoints"].as_str().unwrap() {
                    "cluster" => set("cluster_probability"),
                    "local" => set("local_probability"),
                    _ => BTreeSet::new(),
                };
                let want_masq = path["masquerade"].as_bool().unwrap();
                for mode in ["iptables", "nftables"] {
                    checked += 1;
                    let got = trace(mode, src, ip, p, from_node);
                    let want = (
                        want_kind.to_string(),
                        want_eps.clone(),
                        want_masq && want_kind == "delivered",
                    );
                    if got != want {
                        failures.push(format!(
                            "{mode} {svc} {addr} from {client}: explain {want:?}, trace {got:?}"
                        ));
                    }
                }
            }
        }
    }
    assert!(checked >= 60, "only {checked}");
    assert!(
        failures.is_empty(),
        "{}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    inputs: InputArgs,
}

#[test]
fn live_reads_the_daemons_debug_state() {
    let mut argv = vec!["x".to_string()];
    argv.extend(demo_args());
    let inputs = Inputs::load(&Wrapper::parse_from(argv).inputs).unwrap();
    let families = [IpFamily::V4];
    let m = metrics::Metrics::new();
    let h = health::Health::new(&families, Duration::from_secs(30));
    let shared = Arc::new(Shared::new(&families, h, m.clone()));
    *shared.state.lock().unwrap_or_else(PoisonError::into_inner) = inputs.state.clone();
    shared.debug.set_node(inputs.node.clone());
    let mut dp = shared.debug.wrap(
        Box::new(FakeDataplane::new(IpFamily::V4, FakeControl::default())),
        inputs.families[0].clone(),
    );
    let ps = inputs.state.proxy_state(IpFamily::V4, &inputs.node);
    dp.sync(&ps, true).unwrap();
    let s2 = Arc::clone(&shared);
    let server = metrics::serve_with(
        "127.0.0.1:0".parse().unwrap(),
        m,
        kproxy::config::Mode::Nftables,
        Box::new(move |req| s2.debug.handle(&s2, req)),
    )
    .unwrap();
    let addr = server.addr().to_string();
    for (svc, out) in [
        ("web/shop", "json"),
        ("default/frontend", "text"),
        ("default/frontend", "mermaid"),
    ] {
        let (code, live, err) = kproxy(&strs(&[
            "explain",
            svc,
            "--live",
            "--metrics-address",
            &addr,
            "-o",
            out,
        ]));
        assert_eq!(code, 0, "{err}");
        assert_eq!(live, explain(&[svc, "-o", out]), "{svc} {out}");
    }
    let (code, table, err) = kproxy(&strs(&["explain", "--live", "--metrics-address", &addr]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(table, explain(&[]));
    // /debug/state itself validates (its families are explain documents).
    let (code, body, err) = kproxy(&strs(&[
        "explain",
        "--live",
        "--metrics-address",
        &addr,
        "-o",
        "json",
    ]));
    assert_eq!(code, 0, "{err}");
    validate_with(
        &schema("explain.v1.json"),
        "live",
        &serde_json::from_str(&body).unwrap(),
    );
    let mut st = schema("debug-state.v1.json");
    st["properties"]["families"]["items"] = schema("explain.v1.json");
    let raw = http_get(server.addr(), "/debug/state");
    validate_with(&st, "/debug/state", &serde_json::from_str(&raw).unwrap());
    let rules = http_get(server.addr(), "/debug/ruleset");
    assert!(
        rules.contains("# IPv4 nftables: last applied sync at"),
        "{rules}"
    );
    assert!(rules.contains("add rule ip kube-proxy"), "{rules}");
    // Off: the daemon's flag leaves the paths unanswered.
    let off = metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics::Metrics::new(),
        kproxy::config::Mode::Nftables,
    )
    .unwrap();
    let (code, _, err) = kproxy(&strs(&[
        "explain",
        "--live",
        "--metrics-address",
        &off.addr().to_string(),
    ]));
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn render_json_validates() {
    for mode in ["iptables", "nftables"] {
        let mut args = strs(&["render", "--mode", mode, "-o", "json"]);
        args.extend(demo_args());
        let (code, out, err) = kproxy(&args);
        assert_eq!(code, 0, "{err}");
        let doc: Value = serde_json::from_str(&out).unwrap();
        validate_with(&schema("render.v1.json"), mode, &doc);
        // The data is the text: rules and ops carry the rendered lines.
        let mut args = strs(&["render", "--mode", mode]);
        args.extend(demo_args());
        let text = kproxy(&args).1;
        let fam = &doc["families"][0];
        let lines: Vec<String> = if mode == "nftables" {
            fam["transaction"]["ops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["text"].as_str().unwrap().to_string())
                .collect()
        } else {
            fam["tables"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|t| t["chains"].as_array().unwrap().iter())
                .flat_map(|c| c["rules"].as_array().unwrap().iter())
                .map(|r| r.as_str().unwrap().to_string())
                .collect()
        };
        let text_lines: Vec<&str> = text
            .lines()
            .filter(|l| mode == "nftables" || l.starts_with("-A "))
            .collect();
        assert_eq!(lines.len(), text_lines.len(), "{mode}");
        for l in &lines {
            assert!(text_lines.contains(&l.as_str()), "{mode}: {l}");
        }
    }
}
