//! Daemon benchmark (root): `kproxy run` (minSyncPeriod 0) holding N Services × 10
//! endpoints served by the fake API server, in a fresh network namespace, per mode.
//! Reports the time to the first sync, the daemon's resident memory after it, and for 20
//! EndpointSlice changes (p50 / max): the time from the change at the API server to the
//! new endpoint's chain being in the kernel (polled over netlink: nftables mode, or
//! iptables mode on the iptables-nft backend), and the daemon's own
//! `network_programming_duration` (trigger time stamped on the slice → rules applied).
//! iptables mode runs on iptables-legacy unless IPT_BACKEND=nft: iptables-nft-restore
//! takes many minutes for a 10k-Service first sync.
//! Run: `cargo bench --bench daemon` (SIZES=1000,10000, MODES=nftables,iptables).

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use daemon::{metrics_text, KproxyRun};
use fake_apiserver::FakeApi;
use kproxy::model::{Endpoint, Protocol, ServicePortName};
use kproxy::nftables::names::endpoint_base;
use netns::Netns;

fn service(i: usize) -> String {
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"svc{i}\",\"namespace\":\"ns{}\"}},\"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"172.30.{}.{}\",\"ports\":[{{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\"}}]}}}}",
        i % 50,
        i >> 8,
        i & 255
    )
}

fn slice(i: usize, first: u8, trigger: Option<&str>) -> String {
    let eps: Vec<String> = (0..10)
        .map(|j| {
            let n = i * 10 + j;
            let ip = if j == 0 {
                format!("10.200.{}.{first}", i % 200)
            } else {
                format!("10.{}.{}.{}", 128 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
            };
            format!(
                "{{\"addresses\":[\"{ip}\"],\"nodeName\":\"node-{}\"}}",
                n % 100
            )
        })
        .collect();
    let annotations = trigger
        .map(|t| {
            format!(
                "\"annotations\":{{\"endpoints.kubernetes.io/last-change-trigger-time\":\"{t}\"}},"
            )
        })
        .unwrap_or_default();
    format!(
        "{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"svc{i}-1\",\"namespace\":\"ns{}\",{annotations}\"labels\":{{\"kubernetes.io/service-name\":\"svc{i}\"}}}},\"addressType\":\"IPv4\",\"endpoints\":[{}],\"ports\":[{{\"name\":\"http\",\"port\":8080,\"protocol\":\"TCP\"}}]}}",
        i % 50,
        eps.join(",")
    )
}

/// The table and chain the new endpoint of Service `i` gets in `mode`.
fn chain_of(mode: &str, i: usize, first: u8) -> (&'static str, String) {
    let spn = ServicePortName {
        namespace: format!("ns{}", i % 50),
        name: format!("svc{i}"),
        port: "http".into(),
        protocol: Protocol::Tcp,
    };
    let ep = Endpoint {
        ip: format!("10.200.{}.{first}", i % 200).parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: false,
        zone_hints: vec![],
        node_hints: vec![],
    };
    if mode == "iptables" {
        ("nat", kproxy::iptables::names::endpoint_chain(&spn, &ep))
    } else {
        (
            "kube-proxy",
            format!("endpoint-{}", endpoint_base(&spn, &ep)),
        )
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Polls for a chain over netlink from a thread inside the namespace (spawning `nft`
/// per poll would dominate what is measured).
fn wait_chain(ns: &Netns, target: &(&'static str, String), limit: Duration) -> Duration {
    let (table, chain) = (target.0, target.1.clone());
    ns.run(move || {
        let mut nl = kproxy::nftables::netlink::Netlink::open().unwrap();
        let t = Instant::now();
        loop {
            if nl
                .chain_exists(kproxy::nftables::transaction::Family::Ip, table, &chain)
                .unwrap_or(false)
            {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "chain {chain} never appeared");
            std::thread::sleep(Duration::from_micros(500));
        }
    })
}

/// Waits for the daemon's first successful sync (its last-sync timestamp appears).
fn wait_synced(ns: &Netns, limit: Duration) {
    let t = Instant::now();
    while !metrics_text(ns).contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{") {
        assert!(t.elapsed() < limit, "no first sync");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's own network-programming latency: `(sum, count)` of
/// `kubeproxy_network_programming_duration_seconds`.
fn programming(ns: &Netns) -> (f64, u64) {
    let out = metrics_text(ns);
    let value = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("kubeproxy_network_programming_duration_seconds_sum{"),
        value("kubeproxy_network_programming_duration_seconds_count{") as u64,
    )
}

fn p50_max(v: &mut [Duration]) -> String {
    v.sort();
    match v.len() {
        0 => "–".into(),
        n => format!(
            "{:.0} ms / {:.0} ms",
            v[n / 2].as_secs_f64() * 1e3,
            v[n - 1].as_secs_f64() * 1e3
        ),
    }
}

fn case(mode: &str, n: usize) {
    let backend = if mode == "iptables" {
        std::env::var("IPT_BACKEND").unwrap_or_else(|_| "legacy".into())
    } else {
        "netlink".into()
    };
    // Chains can be polled over netlink in nftables mode and on the iptables-nft backend.
    let polled = mode == "nftables" || backend == "nft";
    let ns = Netns::new("bdmn");
    let api = ns.run(FakeApi::start);
    api.apply("{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"node-1\"},\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"10.99.0.1\"}]}}");
    for i in 0..n {
        api.apply(&service(i));
        api.apply(&slice(i, 1, None));
    }
    let dir = std::env::temp_dir().join(format!("kproxy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kc = dir.join("kubeconfig");
    std::fs::write(&kc, api.kubeconfig()).unwrap();
    let spawn = || {
        KproxyRun::new(&ns, &kc, mode)
            .node("node-1")
            .cluster_cidr("10.128.0.0/10")
            .env(
                "KPROXY_IPTABLES_BACKEND",
                if backend == "nft" { "nft" } else { "legacy" },
            )
            .spawn()
    };
    let start = Instant::now();
    let child = spawn();
    // The daemon's own last-sync timestamp marks the first sync as complete (a chain
    // appearing is not enough: large syncs go in pieces, the dispatch rules last).
    wait_synced(&ns, Duration::from_secs(1800));
    if polled {
        wait_chain(&ns, &chain_of(mode, n - 1, 1), Duration::from_secs(60));
    }
    let first_sync = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(child.id());
    let mut lat = Vec::new();
    let mut own = Vec::new();
    for k in 0..20usize {
        let i = (k * 37) % n;
        let ip = 2 + k as u8;
        let before = programming(&ns);
        let stamp = jiff::Timestamp::now().to_string();
        let t = Instant::now();
        api.apply(&slice(i, ip, Some(&stamp)));
        if polled {
            wait_chain(&ns, &chain_of(mode, i, ip), Duration::from_secs(120));
            lat.push(t.elapsed());
        }
        // The daemon's own measure of the same change (upstream's metric).
        let waited = Instant::now();
        let after = loop {
            let p = programming(&ns);
            if p.1 > before.1 {
                break p;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(120),
                "change never applied"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        own.push(Duration::from_secs_f64((after.0 - before.0).max(0.0)));
        // Let the follow-up sync that deletes flushed chains pass.
        std::thread::sleep(Duration::from_millis(1300));
    }
    // A restart (a DaemonSet rolling update): the new process takes over the rules the
    // old one left, with a full sync over the existing table.
    drop(child);
    let restart = Instant::now();
    let child = spawn();
    wait_synced(&ns, Duration::from_secs(1800));
    let restart_sync = restart.elapsed();
    println!(
        "| {mode} ({backend}) | {n} × 10 | {:.1} s | {:.1} s | {:.0} MiB | {} | {} |",
        first_sync.as_secs_f64(),
        restart_sync.as_secs_f64(),
        rss as f64 / 1024.0,
        p50_max(&mut lat),
        p50_max(&mut own),
    );
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if !netns::require_root("daemon bench") {
        return;
    }
    let list = |var: &str, default: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let sizes: Vec<usize> = list("SIZES", "1000,10000")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    println!("| mode (backend) | services × endpoints | first sync after start | first sync after a restart | daemon RSS | change → chain in kernel, p50 / max | daemon's network_programming_duration, p50 / max |");
    println!("|---|---|---|---|---|---|---|");
    for mode in list("MODES", "nftables,iptables") {
        for &n in &sizes {
            case(&mode, n);
        }
    }
}
