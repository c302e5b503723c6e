//! `kproxy run` with malformed objects in the API server's lists and watch events
//! (issue #10): one bad Service (`"port": "eighty"`, an injected name) must not stall
//! the others; it is logged once per version, never with the whole list body, and
//! counted in `kproxy_skipped_objects_total{kind,reason}`. Both modes, in a network
//! namespace of the test's own.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use daemon::{http_get, metrics_text, rules, KproxyRun};
use fake_apiserver::FakeApi;
use netns::{require_root, Netns};
use serde_json::json;

fn service(name: &str, ip: &str, port: serde_json::Value) -> String {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "app"},
        "spec": {"type": "ClusterIP", "clusterIP": ip,
                 "ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
    })
    .to_string()
}

fn slice(svc: &str, ip: &str) -> String {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{svc}-1"), "namespace": "app",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "nodeName": "node-a"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
    .to_string()
}

fn wait_for(
    ns: &Netns,
    mode: &str,
    what: &str,
    log: &dyn Fn() -> String,
    cond: impl Fn(&str) -> bool,
) {
    let start = Instant::now();
    loop {
        let r = rules(ns, mode);
        if cond(&r) {
            return;
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!(
                "{mode}: timed out waiting for {what}; rules now:\n{r}\nlog:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn case(mode: &str) {
    let ns = Netns::new(&format!("hdmn{}", &mode[..3]));
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-hard-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let log_path = dir.join("kproxy.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    api.apply(
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.99.0.1"}]}})
        .to_string(),
    );
    api.apply(&service("web", "10.96.0.10", json!(80)));
    api.apply(&slice("web", "10.244.1.5"));
    // In the initial list: a mistyped port (typed decoding of the list would fail).
    api.apply(&service("eighty", "10.96.0.80", json!("eighty")));

    let _daemon = KproxyRun::new(&ns, &kubeconfig, mode)
        .args(&["--sync-period", "2s"])
        .env("NO_COLOR", "1")
        .log(&log_path)
        .spawn();

    wait_for(&ns, mode, "the good Service from the list", &log, |r| {
        r.contains("10.244.1.5")
    });
    // Watch events: a bad object (an injected name) and, after it, a good one.
    api.apply(&service(
        "x\n-A KUBE-SERVICES -j ACCEPT\n#",
        "10.96.0.66",
        json!(80),
    ));
    api.apply(&service("api", "10.96.0.20", json!(80)));
    api.apply(&slice("api", "10.244.2.7"));
    wait_for(&ns, mode, "the Service after the bad event", &log, |r| {
        r.contains("10.244.2.7")
    });
    // A relist (410 after compaction) meets the same bad objects again.
    api.compact();
    api.disconnect_watches();
    api.apply(&service("late", "10.96.0.30", json!(80)));
    api.apply(&slice("late", "10.244.3.3"));
    wait_for(&ns, mode, "a Service after the relist", &log, |r| {
        r.contains("10.244.3.3")
    });

    let r = rules(&ns, mode);
    for bad in ["10.96.0.80", "10.96.0.66"] {
        assert!(!r.contains(bad), "{mode}: {bad} in\n{r}");
    }
    assert!(
        !r.lines()
            .any(|l| l.starts_with("-A KUBE-SERVICES -j ACCEPT")),
        "{mode}:\n{r}"
    );
    let text = log();
    // Logged once per object and version, although the relist met them again.
    for name in ["app/eighty", "app/\"x\\n-A KUBE-SERVICES"] {
        let n = text
            .lines()
            .filter(|l| l.contains("skipping malformed object") && l.contains(name))
            .count();
        assert_eq!(n, 1, "{mode}: {name} logged {n} times:\n{text}");
    }
    assert!(
        !text.contains("\"eighty\"}]"),
        "{mode}: a list body was logged:\n{text}"
    );
    // Watch errors here are the 410s and dropped connections the test causes; none
    // may be a list or event that failed to decode.
    assert!(
        !text.lines().any(|l| l.contains("watch error")
            && ["deserializ", "invalid type", "expected i32", "Serde"]
                .iter()
                .any(|d| l.contains(d))),
        "{mode}: a list or event failed to decode:\n{text}"
    );
    let m = metrics_text(&ns);
    for (series, value) in [
        (
            "kproxy_skipped_objects_total{kind=\"Service\",reason=\"decode\"}",
            "1",
        ),
        (
            "kproxy_skipped_objects_total{kind=\"Service\",reason=\"name\"}",
            "1",
        ),
    ] {
        let got = m
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next());
        assert_eq!(got, Some(value), "{mode}: {series} in\n{m}");
    }
    // /healthz shows them too (issue #10), and they do not make it fail.
    let (code, body) = http_get(&ns, 10256, "/healthz");
    assert_eq!(code, 200, "{mode}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["skippedObjects"], 2, "{mode}: {body}");
    assert!(
        v["lastSkipped"]["object"]
            .as_str()
            .is_some_and(|o| o.starts_with("Service app/")),
        "{mode}: {body}"
    );
}

#[test]
fn bad_objects_in_lists_and_watches_do_not_stall_the_daemon() {
    if !require_root("bad_objects_in_lists_and_watches_do_not_stall_the_daemon") {
        return;
    }
    for mode in ["iptables", "nftables"] {
        case(mode);
    }
}
