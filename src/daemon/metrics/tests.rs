//! Unit tests of the metrics: names, types, help text and values as upstream exposes
//! them, and the answers of the metrics address.

use super::server::TEXT_CONTENT_TYPE;
use super::*;
use crate::daemon::http::get as http_get;

/// Every metric family the exposition declares, with its type, in order.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect()
}

/// The value of the one sample line that is exactly `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<String> {
    let mut hits = text
        .lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '));
    let v = hits.next().map(str::to_string);
    assert!(hits.next().is_none(), "{series} twice in\n{text}");
    v
}

/// The `le` boundaries of one histogram series, in order.
/// One histogram bucket's cumulative count.
fn bucket(text: &str, name: &str, le: &str, labels: &str) -> Option<String> {
    sample(text, &format!("{name}_bucket{{le=\"{le}\",{labels}}}"))
}

fn les(text: &str, name: &str, labels: &str) -> Vec<String> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once('"')?;
            rest.starts_with(&format!(",{labels}}}"))
                .then(|| le.to_string())
        })
        .collect()
}

fn exercise_everything(m: &Metrics) {
    m.synced(IpFamily::V4, true, Duration::from_millis(3));
    m.sync_attempt(IpFamily::V4, false, Duration::from_millis(20));
    m.sync_attempt(IpFamily::V6, false, Duration::from_millis(5));
    m.queued(&[IpFamily::V4, IpFamily::V6]);
    m.apply_failed(IpFamily::V4, Mode::Iptables, false);
    m.apply_failed(IpFamily::V4, Mode::Iptables, true);
    m.apply_failed(IpFamily::V4, Mode::Iptables, true);
    m.apply_failed(IpFamily::V6, Mode::Nftables, false);
    m.nft_cleanup_failed(IpFamily::V6);
    m.iptables_rules(IpFamily::V4, "nat", 10, 3);
    m.iptables_rules(IpFamily::V4, "filter", 7, 0);
    m.network_programming(IpFamily::V4, Duration::from_millis(300));
    m.changes_pending(2, 3);
    m.no_local_endpoints(IpFamily::V4, 1, 2);
    m.healthz_served(200);
    m.healthz_served(200);
    m.healthz_served(503);
    m.livez_served(503);
    m.conntrack_reconciled(IpFamily::V4, Duration::from_millis(1), 4);
    m.change(true);
    m.change(true);
    m.change(false);
    m.skipped_object("Service", "port_name");
}

const ALL: &[(&str, &str)] = &[
    ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
    ),
    ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
    ),
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
    ),
    ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
    ),
    ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
    (
        "kubeproxy_sync_proxy_rules_iptables_restore_failures",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
        "counter",
    ),
    ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
    ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
    (
        "kubeproxy_sync_proxy_rules_nftables_sync_failures",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
        "counter",
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
    ),
    ("kubeproxy_proxy_healthz", "counter"),
    ("kubeproxy_proxy_livez", "counter"),
    (
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
        "histogram",
    ),
    ("kubeproxy_conntrack_reconciler_deleted_entries", "counter"),
    ("kproxy_skipped_objects", "counter"),
];

#[test]
fn fresh_metrics_expose_only_unlabelled_ones_at_zero() {
    let text = Metrics::new().render();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let fams: Vec<(String, String)> = families(&text);
    let want: Vec<(String, String)> = [
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
        ),
        ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
        ),
        ("kubeproxy_sync_proxy_rules_service_changes", "counter"),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect();
    assert_eq!(fams, want, "{text}");
    for s in [
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_total",
    ] {
        assert_eq!(sample(&text, s).as_deref(), Some("0"), "{s} in\n{text}");
    }
}

#[test]
fn every_upstream_metric_with_its_type_and_help() {
    let m = Metrics::new();
    exercise_everything(&m);
    let text = m.render();
    let want: Vec<(String, String)> = ALL
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(families(&text), want, "{text}");
    // Help text verbatim (no full stop appended).
    for line in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds\n",
            "# HELP kubeproxy_sync_proxy_rules_service_changes Cumulative proxy rules Service changes\n",
            "# HELP kubeproxy_sync_proxy_rules_nftables_cleanup_failures Cumulative proxy nftables cleanup failures\n",
            "# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total Number of services with a Local traffic policy and no endpoints\n",
            "# HELP kubeproxy_proxy_healthz Cumulative proxy healthz HTTP status\n",
            "# HELP kubeproxy_conntrack_reconciler_deleted_entries Cumulative conntrack flows deleted by conntrack reconciler\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    assert_eq!(
        text.lines().filter(|l| l.starts_with("# HELP ")).count(),
        ALL.len()
    );
    assert!(!text.contains("_total_total"), "{text}");
    // Every sample belongs to a declared family with exactly the suffix its type calls
    // for (counters `_total` once, histograms `_sum`/`_count`/`_bucket`).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let ok = ALL.iter().any(|(f, t)| match *t {
            "counter" => name == format!("{f}_total"),
            "histogram" => ["_sum", "_count", "_bucket"]
                .iter()
                .any(|sfx| name == format!("{f}{sfx}")),
            _ => name == *f,
        });
        assert!(ok, "undeclared sample {name}");
    }
}

#[test]
fn values_and_labels_after_calls() {
    let m = Metrics::new();
    exercise_everything(&m);
    let text = m.render();
    for (series, value) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}", "2"),
            ("kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}", "0.023"),
            ("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}", "1"),
            ("kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}", "1"),
            ("kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}", "1"),
            (
                "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv4\"}",
                "2",
            ),
            ("kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv6\"}", "1"),
            ("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv6\"}", "1"),
            ("kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"}", "10"),
            ("kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"}", "3"),
            ("kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"filter\"}", "7"),
            ("kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"filter\"}", "0"),
            ("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv4\"}", "0.3"),
            ("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\",ip_family=\"IPv4\"}", "0"),
            ("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\",ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_network_programming_duration_seconds_bucket{le=\"+Inf\",ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", "2"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "3"),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
                "1",
            ),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}",
                "2",
            ),
            ("kubeproxy_proxy_healthz_total{code=\"200\"}", "2"),
            ("kubeproxy_proxy_healthz_total{code=\"503\"}", "1"),
            ("kubeproxy_proxy_livez_total{code=\"503\"}", "1"),
            ("kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"}", "1"),
            ("kubeproxy_conntrack_reconciler_sync_duration_seconds_sum{ip_family=\"IPv4\"}", "0.001"),
            ("kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}", "4"),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", "2"),
            ("kubeproxy_sync_proxy_rules_service_changes_total", "1"),
            (
                "kproxy_skipped_objects_total{kind=\"Service\",reason=\"port_name\"}",
                "1",
            ),
        ] {
            assert_eq!(sample(&text, series).as_deref(), Some(value), "{series} in\n{text}");
        }
    // Only the successful IPv4 sync set the last-sync time; both families were queued.
    assert!(sample(
        &text,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"}"
    )
    .is_none());
    let now = unix_now();
    for series in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv6\"}",
    ] {
        let v: f64 = sample(&text, series).unwrap().parse().unwrap();
        assert!((now - 60.0..=now).contains(&v), "{series} = {v}, now {now}");
    }
    // Families that did not see a call have no series.
    assert!(
        !text.contains("restore_failures_total{ip_family=\"IPv6\"}"),
        "{text}"
    );
    assert!(!text.contains("livez_total{code=\"200\"}"), "{text}");
}

#[test]
fn sync_duration_buckets_are_upstreams() {
    let m = Metrics::new();
    m.sync_attempt(IpFamily::V4, true, Duration::from_millis(3));
    m.conntrack_reconciled(IpFamily::V4, Duration::from_millis(3), 0);
    let text = m.render();
    let want = [
        "0.001", "0.002", "0.004", "0.008", "0.016", "0.032", "0.064", "0.128", "0.256", "0.512",
        "1.024", "2.048", "4.096", "8.192", "16.384", "+Inf",
    ];
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_conntrack_reconciler_sync_duration_seconds",
    ] {
        assert_eq!(
            les(&text, name, "ip_family=\"IPv4\""),
            want,
            "{name} in\n{text}"
        );
    }
    // 3 ms: above 0.002, within 0.004; cumulative counts.
    let b = |le: &str| {
        bucket(
            &text,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            le,
            "ip_family=\"IPv4\"",
        )
    };
    assert_eq!(b("0.002").as_deref(), Some("0"));
    assert_eq!(b("0.004").as_deref(), Some("1"));
    assert_eq!(b("+Inf").as_deref(), Some("1"));
    assert_eq!(
        sample(
            &text,
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}"
        )
        .as_deref(),
        Some("0")
    );
}

#[test]
fn network_programming_buckets_are_upstreams() {
    let m = Metrics::new();
    m.network_programming(IpFamily::V6, Duration::from_secs(116));
    let text = m.render();
    let got = les(
        &text,
        "kubeproxy_network_programming_duration_seconds",
        "ip_family=\"IPv6\"",
    );
    let mut want: Vec<String> = vec!["0.0".into(), "0.25".into(), "0.5".into()];
    want.extend((1..=59).map(|i| format!("{i}.0")));
    want.extend((60..=115).step_by(5).map(|i| format!("{i}.0")));
    want.extend((120..=300).step_by(30).map(|i| format!("{i}.0")));
    want.push("+Inf".into());
    assert_eq!(want.len(), 82);
    assert_eq!(got, want, "{text}");
    let b = |le: &str| {
        bucket(
            &text,
            "kubeproxy_network_programming_duration_seconds",
            le,
            "ip_family=\"IPv6\"",
        )
    };
    assert_eq!(b("115.0").as_deref(), Some("0"));
    assert_eq!(b("120.0").as_deref(), Some("1"));
    assert_eq!(b("300.0").as_deref(), Some("1"));
}

#[test]
fn failed_is_a_full_apply_failure() {
    let m = Metrics::new();
    m.failed(IpFamily::V4, Mode::Iptables);
    m.failed(IpFamily::V4, Mode::Nftables);
    let text = m.render();
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"}"
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}"
        )
        .as_deref(),
        Some("1")
    );
    assert!(!text.contains("partial_restore_failures_total{"), "{text}");
    assert!(
        !text.contains("kubeproxy_sync_proxy_rules_duration_seconds"),
        "{text}"
    );
}

#[test]
fn clones_share_and_threads_record_concurrently() {
    let m = Metrics::new();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for _ in 0..250 {
                    m.change(true);
                    m.healthz_served(200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let text = m.render();
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total").as_deref(),
        Some("1000")
    );
    assert_eq!(
        sample(&text, "kubeproxy_proxy_healthz_total{code=\"200\"}").as_deref(),
        Some("1000")
    );
}

#[test]
fn metrics_server_serves_the_exposition() {
    let m = Metrics::new();
    m.change(false);
    let server = serve("127.0.0.1:0".parse().unwrap(), m.clone(), Mode::Nftables).unwrap();
    let (code, head, body) = crate::daemon::http::get_accepting(
        server.addr(),
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(code, 200);
    assert!(
        head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
        "{head}"
    );
    assert_eq!(body, m.render());
    // A plain request gets the classic text format, counters named as upstream's.
    let (code, head, text) = http_get(server.addr(), "/metrics");
    assert_eq!(code, 200);
    assert!(
        head.contains(&format!("Content-Type: {TEXT_CONTENT_TYPE}")),
        "{head}"
    );
    assert!(
        text.contains("# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# HELP kubeproxy_sync_proxy_rules_service_changes_total "),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge\n"),
        "{text}"
    );
    assert!(
        text.contains("\nkubeproxy_sync_proxy_rules_service_changes_total 1\n"),
        "{text}"
    );
    assert!(
        body.contains("\nkubeproxy_sync_proxy_rules_service_changes_total 1\n"),
        "{body}"
    );
    assert_eq!(http_get(server.addr(), "/healthz").2, "ok");
    assert_eq!(http_get(server.addr(), "/proxyMode").2, "nftables");
    assert_eq!(http_get(server.addr(), "/nope").0, 404);
}
