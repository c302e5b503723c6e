//! Hostile and malformed input (issue #10): no object can inject rules or break other
//! Services, empty or suspicious snapshots are refused or flagged, and every rendered
//! output is accepted by `iptables-restore --test` and `nft -c -f` (in a network
//! namespace of the test's own). The last tests apply for real, in both modes.

#[path = "support/netns.rs"]
mod netns;

use std::io::Write;
use std::process::{Command, Stdio};

use netns::{require_root, Netns};
use serde_json::{json, Value};

fn kproxy_in(ns: Option<&Netns>, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_kproxy")),
    };
    let mut child = cmd
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kproxy");
    if let Some(input) = stdin {
        // kproxy may exit before reading all of its input: a broken pipe is fine.
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kproxy(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    kproxy_in(None, args, stdin)
}

fn service(ns: &str, name: &str, ip: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"type": "NodePort", "clusterIP": ip, "selector": {"app": name}, "ports": ports},
    })
}

fn slice(ns: &str, name: &str, svc: &str, ep: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ep], "conditions": {"ready": true}}],
        "ports": ports,
    })
}

fn node() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]},
    })
}

/// The good Service every hostile snapshot carries: its rules must always come out.
fn good() -> Vec<Value> {
    vec![
        service(
            "shop",
            "web",
            "10.96.0.20",
            json!([{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]),
        ),
        slice(
            "shop",
            "web-1",
            "web",
            "10.244.1.5",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        ),
        node(),
    ]
}

fn list(items: Vec<Value>) -> String {
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap()
}

/// A hostile object plus the good ones.
fn with_good(bad: Vec<Value>) -> String {
    let mut items = good();
    items.extend(bad);
    list(items)
}

fn render(mode: &str, snapshot: &str) -> (i32, String, String) {
    kproxy(
        &[
            "render",
            "--snapshot",
            "-",
            "--mode",
            mode,
            "--hostname-override",
            "node-a",
        ],
        Some(snapshot),
    )
}

/// The good Service's rules, in the mode's syntax.
fn assert_good_rules(mode: &str, out: &str) {
    match mode {
        "iptables" => {
            assert!(
                out.contains(
                    "-A KUBE-SERVICES -m comment --comment \"shop/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.20 --dport 80 -j KUBE-SVC-"
                ),
                "{out}"
            );
            assert!(
                out.contains("-j DNAT --to-destination 10.244.1.5:8080"),
                "{out}"
            );
        }
        _ => {
            assert!(
                out.contains("10.96.0.20 . tcp . 80 : goto service-"),
                "{out}"
            );
            assert!(out.contains("dnat to 10.244.1.5:8080"), "{out}");
        }
    }
}

/// Nothing but what validated objects produce: no rule jumps straight to ACCEPT from
/// KUBE-SERVICES, no second table header, no line outside the expected shapes.
fn assert_no_injection(mode: &str, out: &str) {
    for bad in [
        "-A KUBE-SERVICES -j ACCEPT",
        "*filter\n*",
        "COMMIT\n*filter\n-A",
        "-j ACCEPT\n#",
    ] {
        assert!(!out.contains(bad), "{bad:?} in\n{out}");
    }
    match mode {
        "iptables" => {
            for line in out.lines() {
                let ok = line.starts_with("*")
                    || line.starts_with(':')
                    || line.starts_with("-A ")
                    || line.starts_with("-X ")
                    || line == "COMMIT";
                assert!(ok, "unexpected restore line {line:?}");
            }
            assert_eq!(out.matches("*nat\n").count(), 1, "{out}");
            assert_eq!(out.matches("*filter\n").count(), 1, "{out}");
        }
        _ => {
            for line in out.lines() {
                let ok = ["add ", "flush ", "delete ", "destroy "]
                    .iter()
                    .any(|p| line.starts_with(p));
                assert!(ok, "unexpected nft line {line:?}");
            }
        }
    }
}

/// Renders `snapshot` in both modes: exit 0, the good Service intact, nothing injected,
/// and every `must_skip` object named in a warning.
fn check_skipped(snapshot: &str, must_skip: &[&str]) {
    for mode in ["iptables", "nftables"] {
        let (code, out, err) = render(mode, snapshot);
        assert_eq!(code, 0, "{mode}: {err}");
        assert_good_rules(mode, &out);
        assert_no_injection(mode, &out);
        for what in must_skip {
            assert!(
                err.lines()
                    .any(|l| l.contains("skipping malformed object") && l.contains(what)),
                "{mode}: no warning naming {what}:\n{err}"
            );
        }
    }
}

#[test]
fn injected_names_and_namespaces_are_skipped() {
    let snap = with_good(vec![
        service(
            "default",
            "x\n-A KUBE-SERVICES -j ACCEPT\n#",
            "10.96.0.30",
            json!([{"name": "http", "port": 80}]),
        ),
        service(
            "bad\nCOMMIT\n*filter",
            "svc",
            "10.96.0.31",
            json!([{"name": "http", "port": 80}]),
        ),
    ]);
    check_skipped(
        &snap,
        &["Service default/\"x\\n-A KUBE-SERVICES", "bad\\nCOMMIT"],
    );
}

#[test]
fn quotes_spaces_braces_unicode_and_punctuation_in_names_are_skipped() {
    let mut bad = Vec::new();
    let names = [
        "a\"b", "a b", "a}b", "a{b", "é", "a#b", "a;b", "a\\b", "a'b", "UPPER",
    ];
    for (i, n) in names.iter().enumerate() {
        bad.push(service(
            "default",
            n,
            &format!("10.96.1.{i}"),
            json!([{"name": "http", "port": 80}]),
        ));
        bad.push(service(
            n,
            "svc",
            &format!("10.96.2.{i}"),
            json!([{"name": "http", "port": 80}]),
        ));
    }
    let snap = with_good(bad);
    check_skipped(
        &snap,
        &["Service default/\"a\\\"b\"", "Service \"a b\"/svc"],
    );
    let (_, _, err) = render("iptables", &snap);
    assert_eq!(
        err.matches("skipping malformed object").count(),
        2 * names.len(),
        "{err}"
    );
}

#[test]
fn hostile_port_names_are_skipped() {
    let mut bad = Vec::new();
    for (i, pn) in ["a\"b", "a}b", "a\nb", "a\0b", "HTTP", "-a", "a--b", "1234"]
        .iter()
        .enumerate()
    {
        bad.push(service(
            "default",
            &format!("p{i}"),
            &format!("10.96.3.{i}"),
            json!([{"name": pn, "port": 80}]),
        ));
    }
    // A slice's port name goes into rules too (it selects the target port).
    bad.push(slice(
        "shop",
        "web-2",
        "web",
        "10.244.1.6",
        json!([{"name": "h\"}\n", "port": 8080}]),
    ));
    check_skipped(
        &with_good(bad),
        &["Service default/p0", "EndpointSlice shop/web-2"],
    );
}

#[test]
fn ten_megabyte_port_name_is_skipped_and_not_logged_whole() {
    let huge = "a".repeat(10 << 20);
    let snap = with_good(vec![service(
        "default",
        "huge",
        "10.96.4.1",
        json!([{"name": huge, "port": 80}]),
    )]);
    for mode in ["iptables", "nftables"] {
        let (code, out, err) = render(mode, &snap);
        assert_eq!(code, 0, "{mode}");
        assert_good_rules(mode, &out);
        assert!(err.contains("default/huge"), "{mode}");
        assert!(err.len() < 10_000, "{mode}: stderr is {} bytes", err.len());
    }
}

#[test]
fn nul_bytes_are_skipped() {
    let snap = with_good(vec![
        service(
            "default",
            "a\0b",
            "10.96.5.1",
            json!([{"name": "http", "port": 80}]),
        ),
        service(
            "default",
            "nulport",
            "10.96.5.2",
            json!([{"name": "h\0", "port": 80}]),
        ),
    ]);
    check_skipped(&snap, &["default/\"a\\0b\"", "default/nulport"]);
}

#[test]
fn affinity_timeouts_out_of_range_are_skipped() {
    let mut bad = Vec::new();
    for (i, t) in [0i64, -5, 86_401, 2_147_483_647].iter().enumerate() {
        let mut s = service(
            "default",
            &format!("aff{i}"),
            &format!("10.96.6.{i}"),
            json!([{"name": "http", "port": 80}]),
        );
        s["spec"]["sessionAffinity"] = json!("ClientIP");
        s["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
        bad.push(s);
    }
    let snap = with_good(bad);
    check_skipped(&snap, &["default/aff0", "default/aff3"]);
    let (_, out, _) = render("iptables", &snap);
    assert!(!out.contains("--seconds 0 "), "{out}");
}

#[test]
fn unknown_enums_are_skipped() {
    let mut bad = Vec::new();
    for (i, (field, value)) in [
        ("externalTrafficPolicy", "Locale"),
        ("internalTrafficPolicy", "local"),
        ("sessionAffinity", "Sticky"),
        ("trafficDistribution", "Anywhere"),
    ]
    .iter()
    .enumerate()
    {
        let mut s = service(
            "default",
            &format!("enum{i}"),
            &format!("10.96.7.{i}"),
            json!([{"name": "http", "port": 80}]),
        );
        s["spec"][field] = json!(value);
        bad.push(s);
    }
    let mut p = service(
        "default",
        "proto",
        "10.96.7.9",
        json!([{"name": "http", "port": 80, "protocol": "ICMP"}]),
    );
    p["spec"]["ipFamilies"] = json!(["IPv4"]);
    bad.push(p);
    check_skipped(
        &with_good(bad),
        &[
            "default/enum0",
            "default/enum1",
            "default/enum2",
            "default/enum3",
            "default/proto",
        ],
    );
}

#[test]
fn bad_numbers_cost_only_their_object() {
    // Port 2^64, a mistyped port, port 0 in a slice, and a node port out of range.
    let mut items: Vec<String> = good().iter().map(|v| v.to_string()).collect();
    items.extend([
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"big","namespace":"default"},"spec":{"clusterIP":"10.96.8.1","ports":[{"name":"http","port":18446744073709551616}]}}"#.to_string(),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"eighty","namespace":"default"},"spec":{"clusterIP":"10.96.8.2","ports":[{"name":"http","port":"eighty"}]}}"#.to_string(),
        r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"np","namespace":"default"},"spec":{"clusterIP":"10.96.8.3","ports":[{"name":"http","port":80,"nodePort":70000}]}}"#.to_string(),
        r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"zero-1","namespace":"default","labels":{"kubernetes.io/service-name":"zero"}},"addressType":"IPv4","endpoints":[{"addresses":["10.244.2.2"]}],"ports":[{"name":"http","port":0}]}"#.to_string(),
    ]);
    let text = format!(
        r#"{{"apiVersion":"v1","items":[{}],"kind":"List"}}"#,
        items.join(",")
    );
    let _: Value = serde_json::from_str(&text).expect("test input is JSON");
    check_skipped(
        &text,
        &[
            "default/big",
            "default/eighty",
            "default/np",
            "EndpointSlice default/zero-1",
        ],
    );
    // The same in YAML.
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec:
  clusterIP: 10.96.8.1
  ports: [{name: http, port: 18446744073709551616}]
"#;
    let snap = format!(
        "{}\n---\n{yaml}",
        serde_yaml_ng::to_string(&serde_json::from_str::<Value>(&with_good(vec![])).unwrap())
            .unwrap()
    );
    check_skipped(&snap, &["default/big"]);
}

#[test]
fn mistyped_unused_node_field_keeps_the_node() {
    let mut items = good();
    items[2]["status"]["nodeInfo"] = json!({"bootID": 1, "kubeletVersion": ["x"]});
    let (code, out, err) = render("iptables", &list(items));
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("skipping"), "{err}");
    assert!(!err.contains("holds no Node"), "{err}");
    // The Node's address made it: NodePort rules exist (nodePortAddresses unset -> all
    // local addresses, but the node IP is known; nothing fell back to the hostname).
    assert!(out.contains("--dport 30080"), "{out}");
}

#[test]
fn maximum_length_names_render_loadable_comments() {
    let ns = "n".repeat(63);
    let name = format!("s{}", "x".repeat(62));
    let pn = "p".repeat(15);
    let items = vec![
        service(
            &ns,
            &name,
            "10.96.9.1",
            json!([{"name": pn, "port": 80, "nodePort": 30090}]),
        ),
        node(),
    ];
    let snap = list(items);
    let (code, out, err) = render("nftables", &snap);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("skipping"), "{err}");
    for c in out.split("comment \"").skip(1) {
        let c = c.split('"').next().unwrap();
        assert!(c.len() <= 128, "{} bytes: {c}", c.len());
    }
    let (code, out, err) = render("iptables", &snap);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("{ns}/{name}:{pn}")), "{out}");
}

#[test]
fn utf8_bom_is_accepted() {
    let snap = format!("\u{feff}{}", with_good(vec![]));
    let (code, out, err) = render("iptables", &snap);
    assert_eq!(code, 0, "{err}");
    assert_good_rules("iptables", &out);
    let yaml = format!(
        "\u{feff}{}",
        serde_yaml_ng::to_string(&serde_json::from_str::<Value>(&with_good(vec![])).unwrap())
            .unwrap()
    );
    let (code, out, err) = render("nftables", &yaml);
    assert_eq!(code, 0, "{err}");
    assert_good_rules("nftables", &out);
}

#[test]
fn deep_nesting_is_refused_with_a_clear_error() {
    let depth = 80_000;
    let text = format!("a: {}{}", "[".repeat(depth), "]".repeat(depth));
    let started = std::time::Instant::now();
    let (code, _, err) = render("iptables", &text);
    let took = started.elapsed();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nested deeper than"), "{err}");
    // Reported, not asserted (timing belongs in benchmarks): the pre-scan is linear.
    eprintln!("depth {depth} refused in {took:?}");
    let text = format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let (code, _, err) = render("nftables", &text);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nested deeper than"), "{err}");
}

const EMPTY_INPUTS: &[(&str, &str)] = &[
    ("empty file", ""),
    ("comments only", "# nothing here\n# at all\n"),
    ("document marker", "---\n"),
    ("several markers", "---\n---\n...\n"),
    ("items null", "apiVersion: v1\nkind: List\nitems: null\n"),
    ("items empty", "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": []}"),
    (
        "pods only",
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: d}}\n",
    ),
];

#[test]
fn empty_snapshots_render_but_apply_refuses_them() {
    for (what, text) in EMPTY_INPUTS {
        let (code, _, err) = render("iptables", text);
        assert_eq!(code, 0, "render {what}: {err}");
        for mode in ["iptables", "nftables"] {
            // Refused before anything touches the kernel, so this is safe outside a
            // namespace of our own.
            let (code, _, err) = kproxy(&["apply", "--snapshot", "-", "--mode", mode], Some(text));
            assert_eq!(code, 2, "apply {what} ({mode}): {err}");
            assert!(err.contains("no Services"), "{what}: {err}");
            assert!(err.contains("--allow-empty"), "{what}: {err}");
            assert_eq!(
                err.lines().filter(|l| l.starts_with("kproxy:")).count(),
                1,
                "{err}"
            );
        }
    }
    // Every Service malformed counts as empty too.
    let text = list(vec![service(
        "default",
        "Bad",
        "10.96.0.1",
        json!([{"name": "http", "port": 80}]),
    )]);
    let (code, _, err) = kproxy(
        &["apply", "--snapshot", "-", "--mode", "iptables"],
        Some(&text),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no valid Services (1 skipped"), "{err}");
}

#[test]
fn services_without_any_slice_are_flagged() {
    let text = list(vec![
        service(
            "shop",
            "web",
            "10.96.0.20",
            json!([{"name": "http", "port": 80}]),
        ),
        node(),
    ]);
    for mode in ["iptables", "nftables"] {
        let (code, _, err) = render(mode, &text);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("1 Services have a selector but the snapshot holds no EndpointSlice"),
            "{mode}: {err}"
        );
    }
    // With slices present, no such warning.
    let (_, _, err) = render("iptables", &with_good(vec![]));
    assert!(!err.contains("holds no EndpointSlice"), "{err}");
}

#[test]
fn node_names_must_match_the_snapshot() {
    let mut second = node();
    second["metadata"]["name"] = json!("node-b");
    let mut items = good();
    items.push(second);
    let text = list(items);
    let (code, _, err) = kproxy(
        &["render", "--snapshot", "-", "--hostname-override", "node-x"],
        Some(&text),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no Node named \"node-x\"") && err.contains("node-a, node-b"),
        "{err}"
    );
    let (code, _, err) = kproxy(&["render", "--snapshot", "-"], Some(&text));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("2 Nodes") && err.contains("node-a, node-b"),
        "{err}"
    );
    let (code, _, err) = kproxy(
        &["render", "--snapshot", "-", "--hostname-override", "node-b"],
        Some(&text),
    );
    assert_eq!(code, 0, "{err}");

    // No Node at all: a warning saying where the node IP came from.
    let items: Vec<Value> = good().into_iter().take(2).collect();
    let (code, _, err) = kproxy(
        &[
            "render",
            "--snapshot",
            "-",
            "--local-address",
            "192.168.7.7/24",
        ],
        Some(&list(items.clone())),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("holds no Node: the node IP comes from --local-address 192.168.7.7"),
        "{err}"
    );
    let (code, _, err) = kproxy(&["render", "--snapshot", "-"], Some(&list(items)));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("holds no Node and no --local-address"),
        "{err}"
    );
}

/// Every hostile case of this file in one snapshot.
fn everything_hostile() -> String {
    let mut bad = vec![
        service(
            "default",
            "x\n-A KUBE-SERVICES -j ACCEPT\n#",
            "10.96.0.30",
            json!([{"name": "http", "port": 80}]),
        ),
        service(
            "bad\nCOMMIT\n*filter",
            "svc",
            "10.96.0.31",
            json!([{"name": "http", "port": 80}]),
        ),
        service(
            "default",
            "quote",
            "10.96.0.32",
            json!([{"name": "a\"}", "port": 80}]),
        ),
    ];
    let mut aff = service(
        "default",
        "aff",
        "10.96.0.33",
        json!([{"name": "http", "port": 80}]),
    );
    aff["spec"]["sessionAffinity"] = json!("ClientIP");
    aff["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 0}});
    bad.push(aff);
    // A valid Service with maximum-length names and affinity, to exercise the limits.
    let mut long = service(
        &"n".repeat(63),
        &format!("s{}", "x".repeat(62)),
        "10.96.0.34",
        json!([{"name": "p".repeat(15), "port": 81, "nodePort": 30081}]),
    );
    long["spec"]["sessionAffinity"] = json!("ClientIP");
    long["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 86400}});
    bad.push(long);
    bad.push(slice(
        &"n".repeat(63),
        &format!("s{}-abc", "x".repeat(62)),
        &format!("s{}", "x".repeat(62)),
        "10.244.3.3",
        json!([{"name": "p".repeat(15), "port": 8081}]),
    ));
    with_good(bad)
}

#[test]
fn dry_run_output_loads_in_the_tools() {
    if !require_root("dry_run_output_loads_in_the_tools") {
        return;
    }
    let ns = Netns::new("hardrun");
    let snap = everything_hostile();
    let (code, ipt, err) = render("iptables", &snap);
    assert_eq!(code, 0, "{err}");
    let (ok, _, e) = ns.exec_stdin(&["iptables-restore", "--test"], &ipt);
    assert!(ok, "iptables-restore --test: {e}\n{ipt}");
    let (code, nft, err) = render("nftables", &snap);
    assert_eq!(code, 0, "{err}");
    let (ok, _, e) = ns.exec_stdin(&["nft", "-c", "-f", "-"], &nft);
    assert!(ok, "nft -c -f: {e}\n{nft}");
}

#[test]
fn apply_keeps_good_services_and_injects_nothing() {
    if !require_root("apply_keeps_good_services_and_injects_nothing") {
        return;
    }
    let snap = everything_hostile();
    for mode in ["iptables", "nftables"] {
        let ns = Netns::new("hardapply");
        let (code, _, err) = kproxy_in(
            Some(&ns),
            &[
                "apply",
                "--snapshot",
                "-",
                "--mode",
                mode,
                "--hostname-override",
                "node-a",
            ],
            Some(&snap),
        );
        assert_eq!(code, 0, "{mode}: {err}");
        assert!(err.contains("skipping malformed object"), "{err}");
        match mode {
            "iptables" => {
                let (ok, live, e) = ns.exec(&["iptables-save"]);
                assert!(ok, "{e}");
                assert!(
                    live.contains(
                        "-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment \"shop/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-"
                    ),
                    "{live}"
                );
                assert!(live.contains("--to-destination 10.244.1.5:8080"), "{live}");
                assert!(live.contains("--seconds 86400"), "{live}");
                for bad in [
                    "10.96.0.30",
                    "10.96.0.31",
                    "10.96.0.32",
                    "10.96.0.33",
                    "--seconds 0 ",
                ] {
                    assert!(!live.contains(bad), "{bad} in\n{live}");
                }
                assert!(
                    !live
                        .lines()
                        .any(|l| l.starts_with("-A KUBE-SERVICES -j ACCEPT")),
                    "{live}"
                );
                // Each table appears once: no injected `*filter` or COMMIT.
                assert_eq!(live.lines().filter(|l| *l == "*nat").count(), 1, "{live}");
                assert_eq!(
                    live.lines().filter(|l| *l == "*filter").count(),
                    1,
                    "{live}"
                );
            }
            _ => {
                let live = ns.nft_list("ip");
                assert!(
                    live.contains("10.96.0.20 . tcp . 80 : goto service-"),
                    "{live}"
                );
                assert!(live.contains("dnat to 10.244.1.5:8080"), "{live}");
                for bad in ["10.96.0.30", "10.96.0.31", "10.96.0.32", "10.96.0.33"] {
                    assert!(!live.contains(bad), "{bad} in\n{live}");
                }
                for c in live.split("comment \"").skip(1) {
                    let c = c.split('"').next().unwrap();
                    assert!(c.len() <= 128, "{} bytes: {c}", c.len());
                }
                // What the kernel holds lists back into loadable text.
                let (ok, _, e) = ns.exec_stdin(&["nft", "-c", "-f", "-"], &live);
                assert!(ok, "nft -c -f of the listing: {e}\n{live}");
            }
        }
        // And an empty snapshot, explicitly allowed, removes the Services' rules.
        let (code, _, err) = kproxy_in(
            Some(&ns),
            &["apply", "--snapshot", "-", "--mode", mode, "--allow-empty"],
            Some(""),
        );
        assert_eq!(code, 0, "{mode} --allow-empty: {err}");
    }
}
