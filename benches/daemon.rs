//! Daemon benchmark (root): `kproxy run` (minSyncPeriod 0) holding N Services × 10
//! endpoints served by the fake API server, in a fresh network namespace, per mode —
//! `nftables` (upstream's layout), `nftables-maps` (`--nftables-layout=maps`) and
//! `iptables` — each case in its own child process. Reports the time to the first sync,
//! the daemon's resident memory after it (and its peak), and for `CHANGES` (default 50)
//! single-endpoint EndpointSlice changes (p50 / p99): the time from the change at the
//! API server to the new endpoint being in the kernel (polled over netlink: its chain in
//! upstream's nftables layout or on the iptables-nft backend, its `hairpin` element in
//! the maps layout), the daemon's own
//! `kubeproxy_sync_partial_proxy_rules_duration_seconds` for the sync that applied the
//! change, and its `kubeproxy_network_programming_duration_seconds` (trigger time stamped
//! on the slice → rules applied). Then, unless `RESTART=0`, the first sync after a
//! restart (the new process takes over the rules the old one left).
//! iptables mode runs on iptables-legacy unless IPT_BACKEND=nft: iptables-nft-restore
//! takes many minutes for a 10k-Service first sync.
//! Run: `cargo bench --bench daemon` (SIZES=1000,10000, MODES=nftables,nftables-maps
//! (add iptables), CHANGES, RESTART, BENCH_OUT=dir for daemon.csv and daemon-change.svg,
//! APPEND=1 to keep the rows of the CSV there that this run does not measure again).

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "../tests/support/netns.rs"]
mod netns;
#[path = "support/report.rs"]
mod report;

use std::time::{Duration, Instant};

use daemon::{metrics_text, KproxyRun};
use fake_apiserver::FakeApi;
use kproxy::model::{Endpoint, Protocol, ServicePortName};
use kproxy::nftables::names::endpoint_base;
use kproxy::nftables::transaction::{Family, KeyValue};
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

/// What shows that the new endpoint of Service `i` is in the kernel.
#[derive(Debug, Clone)]
enum Target {
    /// Upstream's nftables layout (`kube-proxy` table) and iptables-nft (`nat`): the
    /// endpoint's chain.
    Chain(&'static str, String),
    /// The maps layout: the endpoint's `hairpin` pair, written in the same atomic batch
    /// as its `backends-*` map entries.
    Element(Vec<KeyValue>),
}

/// Where the new endpoint (`10.200.<i % 200>.<first>`) of Service `i` shows in `mode`.
fn target_of(mode: &str, i: usize, first: u8) -> Target {
    let ip: std::net::IpAddr = format!("10.200.{}.{first}", i % 200).parse().unwrap();
    if mode == "nftables-maps" {
        return Target::Element(vec![KeyValue::Ip(ip), KeyValue::Ip(ip)]);
    }
    let spn = ServicePortName {
        namespace: format!("ns{}", i % 50),
        name: format!("svc{i}"),
        port: "http".into(),
        protocol: Protocol::Tcp,
    };
    let ep = Endpoint {
        ip,
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: false,
        zone_hints: vec![],
        node_hints: vec![],
    };
    if mode == "iptables" {
        Target::Chain("nat", kproxy::iptables::names::endpoint_chain(&spn, &ep))
    } else {
        Target::Chain(
            "kube-proxy",
            format!("endpoint-{}", endpoint_base(&spn, &ep)),
        )
    }
}

/// Polls for the target over netlink from a thread inside the namespace (spawning `nft`
/// per poll would dominate what is measured): one GETCHAIN or GETSETELEM per poll.
fn wait_target(ns: &Netns, target: &Target, limit: Duration) -> Duration {
    let target = target.clone();
    ns.run(move || {
        let mut nl = kproxy::nftables::netlink::Netlink::open().unwrap();
        let t = Instant::now();
        loop {
            let present = match &target {
                Target::Chain(table, chain) => nl.chain_exists(Family::Ip, table, chain),
                Target::Element(key) => {
                    nl.element_exists(Family::Ip, kproxy::nftables::maps::TABLE, "hairpin", key)
                }
            };
            if present.unwrap_or(false) {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "{target:?} never appeared");
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

/// `(sum, count)` of the daemon's histogram `name` (IPv4), e.g.
/// `kubeproxy_network_programming_duration_seconds`.
fn histogram(out: &str, name: &str) -> (f64, u64) {
    let value = |suffix: &str| {
        let prefix = format!("{name}{suffix}{{");
        out.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count") as u64)
}

const PROGRAMMING: &str = "kubeproxy_network_programming_duration_seconds";
const PARTIAL: &str = "kubeproxy_sync_partial_proxy_rules_duration_seconds";

/// The mean of the observations a histogram gained between two readings.
fn observed(before: (f64, u64), after: (f64, u64)) -> Option<Duration> {
    let n = after.1.checked_sub(before.1).filter(|n| *n > 0)?;
    Some(Duration::from_secs_f64(
        ((after.0 - before.0) / n as f64).max(0.0),
    ))
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One mode at one size.
#[derive(Debug, Default)]
struct Row {
    mode: String,
    backend: String,
    services: usize,
    first_sync_s: f64,
    restart_sync_s: Option<f64>,
    rss_mib: f64,
    peak_rss_mib: f64,
    /// change at the API server → the endpoint in the kernel (ms): p50, p99
    kernel: (Option<f64>, Option<f64>),
    partial: (Option<f64>, Option<f64>),
    programming: (Option<f64>, Option<f64>),
    changes: usize,
    load: String,
}

impl Row {
    const HEADER: &'static str = "mode,backend,services,endpoints_per_service,first_sync_s,restart_sync_s,rss_after_first_sync_mib,peak_rss_mib,change_to_kernel_p50_ms,change_to_kernel_p99_ms,partial_sync_p50_ms,partial_sync_p99_ms,network_programming_p50_ms,network_programming_p99_ms,changes,load_1_5_15";

    fn csv(&self) -> String {
        format!(
            "{},{},{},10,{:.3},{},{:.1},{:.1},{},{},{},{},{},{},{},{}",
            self.mode,
            self.backend,
            self.services,
            self.first_sync_s,
            report::opt(self.restart_sync_s, 3),
            self.rss_mib,
            self.peak_rss_mib,
            report::opt(self.kernel.0, 3),
            report::opt(self.kernel.1, 3),
            report::opt(self.partial.0, 3),
            report::opt(self.partial.1, 3),
            report::opt(self.programming.0, 3),
            report::opt(self.programming.1, 3),
            self.changes,
            self.load
        )
    }

    fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        Some(Row {
            mode: f.first()?.to_string(),
            backend: f.get(1)?.to_string(),
            services: f.get(2)?.parse().ok()?,
            first_sync_s: num(4)?,
            restart_sync_s: num(5),
            rss_mib: num(6)?,
            peak_rss_mib: num(7)?,
            kernel: (num(8), num(9)),
            partial: (num(10), num(11)),
            programming: (num(12), num(13)),
            changes: f.get(14)?.parse().ok()?,
            load: f.get(15).unwrap_or(&"").to_string(),
        })
    }
}

fn p50_p99(v: &mut [Duration]) -> (Option<f64>, Option<f64>) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (report::pct(v, 0.5).map(ms), report::pct(v, 0.99).map(ms))
}

fn case(mode_label: &str, n: usize) -> Row {
    let (mode, maps) = match mode_label {
        "nftables-maps" => ("nftables", true),
        other => (other, false),
    };
    let backend = if mode == "iptables" {
        std::env::var("IPT_BACKEND").unwrap_or_else(|_| "legacy".into())
    } else {
        "netlink".into()
    };
    let changes: usize = report::env_or("CHANGES", 50);
    // Polled over netlink: nftables (a chain, or the maps layout's element) and the
    // iptables-nft backend (a chain).
    let polled = mode == "nftables" || backend == "nft";
    let ns =
        Netns::create(format!("{}-dmn", netns::unique_stem())).unwrap_or_else(|e| panic!("{e}"));
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
    let layout: &[&str] = if maps {
        &["--nftables-layout", "maps"]
    } else {
        &[]
    };
    let spawn = || {
        KproxyRun::new(&ns, &kc, mode)
            .node("node-1")
            .cluster_cidr("10.128.0.0/10")
            .args(layout)
            .env(
                "KPROXY_IPTABLES_BACKEND",
                if backend == "nft" { "nft" } else { "legacy" },
            )
            .spawn()
    };
    let load = report::load();
    let start = Instant::now();
    let child = spawn();
    // The daemon's own last-sync timestamp marks the first sync as complete (a chain
    // appearing is not enough: large syncs go in pieces, the dispatch rules last).
    wait_synced(&ns, Duration::from_secs(1800));
    if polled && !maps {
        wait_target(&ns, &target_of(mode, n - 1, 1), Duration::from_secs(60));
    }
    let first_sync = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = status_kib(child.id(), "VmRSS:");
    let mut lat = Vec::new();
    let mut partial = Vec::new();
    let mut own = Vec::new();
    // Upstream's layout deletes the chains a change flushed in a follow-up sync a second
    // later; let it pass so that it does not overlap the next change.
    let settle = Duration::from_millis(if maps { 300 } else { 1300 });
    for k in 0..changes {
        let i = (k * 37) % n;
        let ip = 2 + (k % 250) as u8;
        let before = metrics_text(&ns);
        let (prog0, part0) = (histogram(&before, PROGRAMMING), histogram(&before, PARTIAL));
        let stamp = jiff::Timestamp::now().to_string();
        let t = Instant::now();
        api.apply(&slice(i, ip, Some(&stamp)));
        if polled {
            wait_target(&ns, &target_of(mode_label, i, ip), Duration::from_secs(120));
            lat.push(t.elapsed());
        }
        // The daemon's own measure of the same change (upstream's metric).
        let waited = Instant::now();
        let after = loop {
            let m = metrics_text(&ns);
            if histogram(&m, PROGRAMMING).1 > prog0.1 {
                break m;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(120),
                "change never applied"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        own.extend(observed(prog0, histogram(&after, PROGRAMMING)));
        partial.extend(observed(part0, histogram(&after, PARTIAL)));
        std::thread::sleep(settle);
    }
    let peak = status_kib(child.id(), "VmHWM:");
    // A restart (a DaemonSet rolling update): the new process takes over the rules the
    // old one left, with a full sync over the existing table.
    drop(child);
    let restart_sync = (report::env_or("RESTART", 1) != 0).then(|| {
        let restart = Instant::now();
        let child = spawn();
        wait_synced(&ns, Duration::from_secs(1800));
        let t = restart.elapsed().as_secs_f64();
        drop(child);
        t
    });
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        mode: mode_label.to_string(),
        backend,
        services: n,
        first_sync_s: first_sync.as_secs_f64(),
        restart_sync_s: restart_sync,
        rss_mib: rss as f64 / 1024.0,
        peak_rss_mib: peak as f64 / 1024.0,
        kernel: p50_p99(&mut lat),
        partial: p50_p99(&mut partial),
        programming: p50_p99(&mut own),
        changes,
        load,
    }
}

fn fmt_pair(v: (Option<f64>, Option<f64>)) -> String {
    match v {
        (Some(a), Some(b)) => format!("{a:.1} / {b:.1} ms"),
        _ => "–".into(),
    }
}

fn main() {
    if !netns::require_root("daemon bench") {
        return;
    }
    if let Ok(one) = std::env::var("BENCH_ONE") {
        report::child_init();
        let (mode, n) = one.split_once(':').expect("BENCH_ONE=mode:size");
        let row = case(mode, n.parse().expect("size"));
        println!("ROW,{}", row.csv());
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
    let started = jiff::Timestamp::now();
    let mut rows = Vec::new();
    for mode in list("MODES", "nftables,nftables-maps") {
        for &n in &sizes {
            let t = Instant::now();
            let (_, out) = report::run_child(("BENCH_ONE", format!("{mode}:{n}")));
            match out
                .lines()
                .find_map(|l| l.strip_prefix("ROW,"))
                .and_then(Row::parse)
            {
                Some(r) => {
                    eprintln!("{} ({:.0} s)", r.csv(), t.elapsed().as_secs_f64());
                    rows.push(r);
                }
                None => eprintln!("{mode} at {n}: failed"),
            }
        }
    }
    if std::env::var_os("BENCH_OUT").is_some() {
        let dir = report::out_dir();
        std::fs::create_dir_all(&dir).expect("output directory");
        if report::env_or("APPEND", 0) != 0 {
            // Keep the rows of an earlier run that this one did not measure again.
            let old = std::fs::read_to_string(dir.join("daemon.csv")).unwrap_or_default();
            let kept: Vec<Row> = old
                .lines()
                .skip(1)
                .filter_map(Row::parse)
                .filter(|o| {
                    !rows
                        .iter()
                        .any(|r| r.mode == o.mode && r.services == o.services)
                })
                .collect();
            rows.extend(kept);
            rows.sort_by(|a, b| (&a.mode, a.services).cmp(&(&b.mode, b.services)));
        }
        let mut csv = format!("{}\n", Row::HEADER);
        for r in &rows {
            csv.push_str(&r.csv());
            csv.push('\n');
        }
        std::fs::write(dir.join("daemon.csv"), &csv).expect("csv");
        let mut series = Vec::new();
        for mode in ["nftables", "nftables-maps", "iptables"] {
            for (what, metric) in [
                (
                    "network_programming",
                    (|r: &Row| r.programming.0) as fn(&Row) -> Option<f64>,
                ),
                ("partial sync", |r: &Row| r.partial.0),
            ] {
                let points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| r.mode == mode)
                    .filter_map(|r| metric(r).map(|y| (r.services as f64, y)))
                    .collect();
                if !points.is_empty() {
                    series.push(report::Series {
                        label: format!("{mode}: {what}"),
                        points,
                        timeouts: Vec::new(),
                    });
                }
            }
        }
        if let Err(e) = report::plot(
            &dir.join("daemon-change.svg"),
            &series,
            "kproxy run: one endpoint changed, daemon's own metrics, p50 (ms, log scale)",
            "milliseconds",
            true,
        ) {
            eprintln!("plot daemon-change.svg: {e}");
        }
    }
    println!("started {started}");
    println!("| mode (backend) | services × endpoints | first sync after start | first sync after a restart | daemon RSS (peak) | change → in the kernel (chain, maps: element), p50 / p99 | partial sync, p50 / p99 | network_programming_duration, p50 / p99 | load |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} ({}) | {} × 10 | {:.1} s | {} | {:.0} MiB ({:.0} MiB) | {} | {} | {} | {} |",
            r.mode,
            r.backend,
            r.services,
            r.first_sync_s,
            r.restart_sync_s
                .map(|t| format!("{t:.1} s"))
                .unwrap_or_else(|| "–".into()),
            r.rss_mib,
            r.peak_rss_mib,
            fmt_pair(r.kernel),
            fmt_pair(r.partial),
            fmt_pair(r.programming),
            r.load
        );
    }
}
