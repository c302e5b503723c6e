//! `kproxy diff` against real kernels, each case in its own network namespace (root;
//! mandatory under CI): "same" after `kproxy apply` and on every upstream vector's
//! expected rules (loaded as upstream kube-proxy writes them), and each kind of
//! tampering reported under the right Service port with exit 1.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/vectors.rs"]
mod vectors;

use std::fs;
use std::path::{Path, PathBuf};

use kproxy::config::{FamilySettings, Mode, NftablesLayout};
use kproxy::diff::live::{self, Scratch};
use kproxy::diff::Outcome;
use kproxy::iptables::apply::Backend;
use kproxy::model::{IpFamily, NodeContext};
use netns::{require_root, Netns};

/// `mode` is `iptables`, `nftables`, or `nftables-maps` (the maps layout).
fn demo_args(mode: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mode, layout) = match mode.split_once('-') {
        Some((m, layout)) => (m, layout),
        None => (mode, "upstream"),
    };
    let mut v = vec![
        "--mode".to_string(),
        mode.to_string(),
        "--nftables-layout".to_string(),
        layout.to_string(),
        "--snapshot".into(),
        root.join("testdata/demo/cluster.yaml")
            .display()
            .to_string(),
    ];
    let args = fs::read_to_string(root.join("testdata/demo/args")).unwrap();
    v.extend(args.split_whitespace().map(str::to_string));
    v
}

/// Runs `kproxy <cmd> <demo inputs>` in `ns`: (exit code, stdout, stderr).
fn kproxy(ns: &Netns, cmd: &str, mode: &str) -> (i32, String, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy"), cmd])
        .args(demo_args(mode))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sh(ns: &Netns, script: &str) -> String {
    let (ok, out, err) = ns.exec_status(&["sh", "-c", script]);
    assert!(ok, "{script}: {err}");
    out
}

/// The lines of the report under the heading `service`.
fn section<'a>(report: &'a str, service: &str) -> Vec<&'a str> {
    report
        .lines()
        .skip_while(|l| *l != service)
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect()
}

fn applied(tag: &str, mode: &str) -> Netns {
    let ns = Netns::new(tag);
    let (code, _, err) = kproxy(&ns, "apply", mode);
    assert_eq!(code, 0, "apply: {err}");
    let (code, out, err) = kproxy(&ns, "diff", mode);
    assert_eq!(code, 0, "diff right after apply: {out}{err}");
    assert!(out.starts_with("same: "), "{out}");
    ns
}

fn expect_difference(ns: &Netns, mode: &str, service: &str, line_start: &str) {
    let (code, out, err) = kproxy(ns, "diff", mode);
    assert_eq!(code, 1, "{out}{err}");
    let lines = section(&out, service);
    assert!(
        lines.iter().any(|l| l.trim_start().starts_with(line_start)),
        "expected `{line_start}` under {service}:\n{out}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("different: "),
        "{out}"
    );
}

#[test]
fn iptables_same_after_apply_and_tampering_reported_per_service() {
    if !require_root("iptables_same_after_apply_and_tampering_reported_per_service") {
        return;
    }
    // A deleted rule: an endpoint's DNAT rule.
    let ns = applied("dfi1", "iptables");
    let rule = sh(
        &ns,
        "iptables-save -t nat | grep -m1 -- '-A KUBE-SEP-.*DNAT'",
    );
    let svc = kproxy::iptables::normalize::rule_param(&rule, "--comment").unwrap();
    sh(&ns, &format!("iptables -t nat -D {}", &rule.trim()[3..]));
    expect_difference(
        &ns,
        "iptables",
        &svc,
        "missing   rule in IPv4 nat KUBE-SEP-",
    );
    drop(ns);

    // A changed probability in a Service chain.
    let ns = applied("dfi2", "iptables");
    let rule = sh(&ns, "iptables-save -t nat | grep -m1 -- '--probability'");
    let comment = kproxy::iptables::normalize::rule_param(&rule, "--comment").unwrap();
    let svc = comment.split_whitespace().next().unwrap().to_string();
    let chain = rule.split_whitespace().nth(1).unwrap().to_string();
    let changed = rule.trim()[3..].replace(
        &kproxy::iptables::normalize::rule_param(&rule, "--probability").unwrap(),
        "0.25",
    );
    let n = sh(
        &ns,
        &format!("iptables -t nat -S {chain} | grep -n -- '--probability' | head -1 | cut -d: -f1"),
    );
    // -S lists the chain's -N line first.
    let pos: usize = n.trim().parse::<usize>().unwrap() - 1;
    let args: String = changed.split_once(' ').unwrap().1.to_string();
    sh(&ns, &format!("iptables -t nat -R {chain} {pos} {args}"));
    expect_difference(
        &ns,
        "iptables",
        &svc,
        &format!("missing   rule in IPv4 nat {chain}"),
    );
    expect_difference(
        &ns,
        "iptables",
        &svc,
        &format!("extra     rule in IPv4 nat {chain}"),
    );
    drop(ns);

    // A stale endpoint chain left behind, and another program's chain (ignored).
    let ns = applied("dfi3", "iptables");
    sh(
        &ns,
        "iptables -t nat -N KUBE-SEP-STALESTALESTALE && \
         iptables -t nat -A KUBE-SEP-STALESTALESTALE -m comment --comment web/shop:https -s 10.244.9.9 -j KUBE-MARK-MASQ && \
         iptables -t nat -N DOCKER && iptables -t nat -A PREROUTING -j DOCKER",
    );
    expect_difference(
        &ns,
        "iptables",
        "web/shop:https",
        "extra     chain IPv4 nat KUBE-SEP-STALESTALESTALE (1 rules)",
    );
    let (_, out, _) = kproxy(&ns, "diff", "iptables");
    assert!(!out.contains("DOCKER"), "{out}");
    assert!(out.contains("1 differences in 1 Service ports"), "{out}");
}

/// `nft -a list chain` handle of the first rule containing `needle`.
fn handle(ns: &Netns, chain: &str, needle: &str) -> String {
    let out = sh(ns, &format!("nft -a list chain ip kube-proxy '{chain}'"));
    let line = out
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} in {chain}:\n{out}"));
    line.rsplit("# handle ").next().unwrap().trim().to_string()
}

fn chain_with(ns: &Netns, needle: &str) -> String {
    let out = sh(ns, "nft list table ip kube-proxy");
    let mut chain = String::new();
    for l in out.lines() {
        let t = l.trim();
        if let Some(c) = t.strip_prefix("chain ").and_then(|c| c.strip_suffix(" {")) {
            chain = c.to_string();
        } else if t.contains(needle) && chain.contains('/') {
            return chain;
        }
    }
    panic!("no per-Service chain has {needle}:\n{out}");
}

#[test]
fn nftables_same_after_apply_and_tampering_reported_per_service() {
    if !require_root("nftables_same_after_apply_and_tampering_reported_per_service") {
        return;
    }
    let svc_of = |chain: &str| kproxy::diff::nftables::service_of_chain(chain).unwrap();

    // A deleted rule: an endpoint's DNAT rule.
    let ns = applied("dfn1", "nftables");
    let chain = chain_with(&ns, "dnat to");
    let h = handle(&ns, &chain, "dnat to");
    sh(
        &ns,
        &format!("nft delete rule ip kube-proxy '{chain}' handle {h}"),
    );
    expect_difference(
        &ns,
        "nftables",
        &svc_of(&chain),
        "missing   rule in ip kube-proxy endpoint-",
    );
    drop(ns);

    // A changed probability: the endpoint choice of a Service with two endpoints.
    let ns = applied("dfn2", "nftables");
    let chain = chain_with(&ns, "numgen random mod 2");
    let h = handle(&ns, &chain, "numgen random mod 2");
    let out = sh(&ns, &format!("nft list chain ip kube-proxy '{chain}'"));
    let first = out
        .split("0 : goto ")
        .nth(1)
        .and_then(|r| r.split([',', ' ', '}']).next())
        .unwrap()
        .to_string();
    sh(
        &ns,
        &format!(
            "nft replace rule ip kube-proxy '{chain}' handle {h} numgen random mod 1 vmap {{ 0 : goto {first} }}"
        ),
    );
    expect_difference(
        &ns,
        "nftables",
        &svc_of(&chain),
        &format!("missing   rule in ip kube-proxy {chain}"),
    );
    expect_difference(
        &ns,
        "nftables",
        &svc_of(&chain),
        &format!("extra     rule in ip kube-proxy {chain}"),
    );
    drop(ns);

    // A missing element: a ClusterIP's entry in the service-ips map.
    let ns = applied("dfn3", "nftables");
    let out = sh(&ns, "nft list map ip kube-proxy service-ips");
    let element = out
        .split("elements = { ")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .unwrap()
        .trim()
        .to_string();
    let key = element.split(" : ").next().unwrap().to_string();
    let target = element.rsplit(' ').next().unwrap().to_string();
    sh(
        &ns,
        &format!("nft delete element ip kube-proxy service-ips '{{ {key} }}'"),
    );
    expect_difference(
        &ns,
        "nftables",
        &svc_of(&target),
        &format!("missing   element of ip kube-proxy service-ips: {key}"),
    );
    drop(ns);

    // An extra stale chain of an endpoint that is gone (still holding its rules; a
    // flushed, unreferenced one is only awaiting its delayed deletion).
    let ns = applied("dfn4", "nftables");
    let stale = "endpoint-AAAAAAAA-web/shop/tcp/https__10.244.9.9/8443";
    sh(&ns, &format!("nft add chain ip kube-proxy '{stale}'"));
    sh(
        &ns,
        &format!(
            "nft add rule ip kube-proxy '{stale}' ip saddr 10.244.9.9 jump mark-for-masquerade"
        ),
    );
    expect_difference(
        &ns,
        "nftables",
        "web/shop:https",
        &format!("extra     chain ip kube-proxy {stale}"),
    );
}

#[test]
fn nftables_maps_layout_same_after_apply_and_tampering_reported_per_service() {
    if !require_root("nftables_maps_layout_same_after_apply_and_tampering_reported_per_service") {
        return;
    }
    const MAPS: &str = "nftables-maps";
    // The maps layout's `kproxy` table is compared, not upstream's.
    let ns = applied("dfm1", MAPS);
    let (code, out, err) = kproxy(&ns, "diff", "nftables");
    assert_eq!(code, 1, "upstream's table is not there: {out}{err}");
    assert!(out.contains("missing   table ip kube-proxy"), "{out}");

    // A missing backend: one endpoint element of a load-balancing map, attributed to
    // its Service port through the destination it is keyed by.
    let listing = sh(&ns, "nft -j list table ip kproxy");
    let maps: Vec<String> = listing
        .split("\"name\": \"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .filter(|n| n.starts_with("backends-ips-"))
        .map(str::to_string)
        .collect();
    let map = maps.first().expect("a backends map").clone();
    let out = sh(&ns, &format!("nft list map ip kproxy {map}"));
    let element = out
        .split("elements = { ")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .unwrap()
        .trim()
        .to_string();
    let key = element.split(" : ").next().unwrap().to_string();
    sh(
        &ns,
        &format!("nft delete element ip kproxy {map} '{{ {key} }}'"),
    );
    let (code, report, err) = kproxy(&ns, "diff", MAPS);
    assert_eq!(code, 1, "{report}{err}");
    let line = format!("missing   element of ip kproxy {map}: {key} : ");
    let heading = report
        .lines()
        .take_while(|l| !l.trim_start().starts_with(&line))
        .filter(|l| !l.starts_with(' '))
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        report.lines().any(|l| l.trim_start().starts_with(&line)),
        "expected `{line}`:\n{report}"
    );
    assert!(
        heading.contains('/'),
        "the element is reported under its Service port, not `{heading}`:\n{report}"
    );

    // An extra element, and a changed fixed rule.
    sh(
        &ns,
        "nft add element ip kproxy cluster-ips '{ 172.30.255.254 }'; nft flush chain ip kproxy cluster-ips-check",
    );
    let (code, report, _) = kproxy(&ns, "diff", MAPS);
    assert_eq!(code, 1);
    assert!(
        report.contains("extra     element of ip kproxy cluster-ips: 172.30.255.254"),
        "{report}"
    );
    assert!(
        report.contains("missing   rule in ip kproxy cluster-ips-check"),
        "{report}"
    );

    // Applying again repairs it: same.
    let (code, _, err) = kproxy(&ns, "apply", MAPS);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = kproxy(&ns, "diff", MAPS);
    assert_eq!(code, 0, "{out}{err}");
}

fn expect_same(
    what: &str,
    mode: Mode,
    ns: &Netns,
    settings: &FamilySettings,
    ps: kproxy::model::ProxyState,
) {
    let family = settings.family;
    let settings = settings.clone();
    let (want, have) = ns.run(move || {
        let scratch = Scratch::new().unwrap();
        let want = live::desired(
            &scratch,
            mode,
            NftablesLayout::Upstream,
            &settings,
            &ps,
            Backend::Default,
        )
        .unwrap_or_else(|e| panic!("desired: {e}"));
        let have = live::read(mode, NftablesLayout::Upstream, family, Backend::Default).unwrap();
        (want, have)
    });
    let label = family.label();
    let outcome = Outcome::new(
        mode,
        live::parse(mode, label, &want).unwrap(),
        live::parse(mode, label, &have).unwrap(),
    );
    assert!(
        outcome.is_same(),
        "{what}: upstream's rules differ from kproxy's:\n{}",
        outcome.report()
    );
    assert!(outcome.desired.counts().1 > 0, "{what}: nothing compared");
}

/// Upstream's jump rules (reference §3.2), inserted the way upstream does: `-I` at
/// position 1, in upstream's order; then its canaries.
const UPSTREAM_JUMPS: &str = r#"
iptables -t filter -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
iptables -t filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
iptables -t filter -I INPUT 1 -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
iptables -t filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
iptables -t filter -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
iptables -t filter -I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
iptables -t filter -I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
iptables -t filter -I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
iptables -t filter -I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
iptables -t nat -I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
iptables -t nat -I PREROUTING 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
iptables -t nat -I POSTROUTING 1 -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
iptables -t filter -I INPUT 1 -j KUBE-FIREWALL
iptables -t filter -I OUTPUT 1 -j KUBE-FIREWALL
for t in mangle nat filter; do iptables -t $t -N KUBE-PROXY-CANARY; done
"#;

#[test]
fn iptables_upstream_vectors_are_same() {
    if !require_root("iptables_upstream_vectors_are_same") {
        return;
    }
    let mut checked = 0;
    for dir in vectors::vector_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let Ok(expected) = fs::read_to_string(dir.join("expected.iptables")) else {
            continue;
        };
        let cfg = vectors::yaml(&dir.join("config.yaml"));
        // A partial sync's expected file is a restore input, not the whole state.
        let sync_kind = cfg.get("sync").and_then(|s| vectors::s(s, "kind"));
        if name.starts_with("TestSyncProxyRulesRepeated_") && sync_kind != Some("full") {
            continue;
        }
        let settings = vectors::settings_for(&cfg);
        assert_eq!(settings.family, IpFamily::V4, "{name}");
        let (state, node) = vectors::state_for(&dir, &cfg);
        let ps = state.proxy_state(settings.family, &node);
        let ns = Netns::new("dvi");
        // Upstream kube-proxy creates its nfacct counters before writing rules.
        for counter in [
            "ct_state_invalid_dropped_pkts",
            "localhost_nps_accepted_pkts",
        ] {
            if expected.contains(counter) {
                sh(&ns, &format!("nfacct add {counter}"));
            }
        }
        let body = expected.trim_start_matches([' ', '\t', '\n']);
        let (ok, _, err) = ns.exec_stdin(&["iptables-restore", "--noflush"], body);
        assert!(
            ok,
            "{name}: iptables-restore refused upstream's rules: {err}"
        );
        sh(&ns, UPSTREAM_JUMPS);
        expect_same(&name, Mode::Iptables, &ns, &settings, ps);
        checked += 1;
    }
    // TestOverallIPTablesRules and the full syncs of the Repeated sequence (the other
    // full-dump vectors are held back from this repository).
    assert!(checked >= 3, "only {checked} iptables vectors");
}

fn nft_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables");
    let mut d: Vec<PathBuf> = fs::read_dir(root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("expected.nft").exists())
        .collect();
    d.sort();
    d
}

/// The same `add` commands with every object declared before the rules and elements that
/// refer to it (upstream's test text lists rules right after their chain; `nft -f`
/// resolves references in file order).
fn declarations_first(text: &str) -> String {
    let rank = |l: &str| match l.split_whitespace().nth(1) {
        Some("table") => 0,
        Some("chain") | Some("set") | Some("map") => 1,
        Some("element") => 2,
        _ => 3,
    };
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    lines.sort_by_key(|l| rank(l));
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[test]
fn nftables_upstream_vectors_are_same() {
    if !require_root("nftables_upstream_vectors_are_same") {
        return;
    }
    let mut checked = 0;
    for dir in nft_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expected = fs::read_to_string(dir.join("expected.nft")).unwrap();
        let cfg = vectors::yaml(&dir.join("config.yaml"));
        let (settings, cidrs) = vectors::nft_settings(&cfg);
        let text = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
        let state = kproxy::snapshot::load_str(&text, "cluster.yaml")
            .unwrap()
            .state;
        let node = NodeContext {
            name: settings.node_name.clone(),
            zone: None,
            prefer_same_node: true,
        };
        let mut ps = state.proxy_state(settings.family, &node);
        ps.service_cidrs = cidrs;
        let ns = Netns::new("dvn");
        let (ok, _, err) = ns.exec_stdin(&["nft", "-f", "-"], &declarations_first(&expected));
        assert!(ok, "{name}: nft -f refused upstream's ruleset: {err}");
        expect_same(&name, Mode::Nftables, &ns, &settings, ps);
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} nftables vectors");
}

#[test]
fn diff_reads_the_cluster_from_the_api_server() {
    if !require_root("diff_reads_the_cluster_from_the_api_server") {
        return;
    }
    let ns = Netns::new("dfapi");
    let api = ns.run(fake_apiserver::FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-diff-api-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let node = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses: [{type: InternalIP, address: 10.99.0.1}]\n";
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: app}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, protocol: TCP}]\n";
    let slice = |ip: &str| {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: app\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- addresses: [{ip}]\nports: [{{name: http, port: 8080, protocol: TCP}}]\n")
    };
    for o in [node.to_string(), svc.to_string(), slice("10.244.1.5")] {
        api.apply(&o);
    }
    let snapshot = dir.join("cluster.yaml");
    fs::write(
        &snapshot,
        format!("{node}---\n{svc}---\n{}", slice("10.244.1.5")),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")])
            .args(args)
            .args(["--mode", "iptables", "--hostname-override", "node-a"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code().unwrap_or(-1),
            text + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let snap = snapshot.display().to_string();
    let kc = kubeconfig.display().to_string();
    assert_eq!(run(&["apply", "--snapshot", &snap]).0, 0);
    let (code, out) = run(&["diff", "--kubeconfig", &kc]);
    assert_eq!(code, 0, "{out}");
    api.apply(&slice("10.244.1.6"));
    let (code, out) = run(&["diff", "--kubeconfig", &kc]);
    assert_eq!(code, 1, "{out}");
    assert!(
        section(&out, "app/web:http")
            .iter()
            .any(|l| l.contains("10.244.1.6")),
        "{out}"
    );
    let (code, _) = run(&["diff", "--kubeconfig", &kc, "--snapshot", &snap]);
    assert_eq!(code, 2);
    let _ = fs::remove_dir_all(&dir);
}
