//! Churn soak (root): `kproxy run` (the bench profile's optimised binary) in a fresh
//! network namespace, against the fake API server holding N Services × E endpoints,
//! while EndpointSlices change at a steady rate for a fixed time, in each mode.
//!
//! Every change moves one Service's first endpoint to a new address, stamped with
//! `endpoints.kubernetes.io/last-change-trigger-time`. A verifier inside the namespace
//! checks, change by change in order, that the new endpoint's chain is in the kernel
//! (over netlink: nftables mode, and iptables mode on the iptables-nft backend), so each
//! latency is an upper bound: "at the API server" to "seen in the kernel". Services are
//! changed round-robin, so no change is superseded by a later one before a sync can
//! apply it. A sampler records the daemon's RSS (VmRSS / VmHWM from /proc) and its
//! metrics (syncs, sync durations, failed syncs, network_programming_duration) twice a
//! second.
//!
//! Output (CHURN_OUT, default target/soak): churn-<mode>.csv (one row per sample),
//! churn-latency-<mode>.csv (one row per change), churn-rss.svg (RSS over time, every
//! mode), churn-summary.md (the table docs/soak.md quotes). The run fails (exit 1) when
//! a change is never seen, a sync fails, or the daemon dies.
//!
//! Settings (environment): CHURN_SERVICES (10000), CHURN_ENDPOINTS (10), CHURN_SECONDS
//! (300), CHURN_RATE (changes/s, 200), CHURN_MIN_SYNC (1s, upstream's default),
//! MODES (nftables,iptables; also nftables-maps: the maps layout, verified through its
//! `hairpin` element of the new endpoint), IPT_BACKEND (nft | legacy; legacy is verified by
//! reading the nat table with iptables-legacy-save every 3 s: latencies up to 3 s
//! coarser).
//! Smoke check: `CHURN_SECONDS=30 CHURN_SERVICES=2000 cargo bench --bench churn`.

#[path = "../tests/support/daemon.rs"]
mod daemon;
#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::{metrics_text, Daemon, KproxyRun};
use fake_apiserver::FakeApi;
use kproxy::model::{Endpoint, Protocol, ServicePortName};
use kproxy::nftables::names::endpoint_base;
use kproxy::nftables::transaction::{Family, KeyValue};
use netns::Netns;

/// Run settings.
#[derive(Debug, Clone)]
struct Settings {
    services: usize,
    endpoints: usize,
    seconds: u64,
    rate: u64,
    min_sync: String,
    ipt_backend: String,
    out: PathBuf,
}

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn service(i: usize) -> String {
    format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"svc{i}\",\"namespace\":\"ns{}\"}},\"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"172.30.{}.{}\",\"ports\":[{{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\"}}]}}}}",
        i % 50,
        i >> 8,
        i & 255
    )
}

/// The address of Service `i`'s first endpoint in generation `generation`: unique per
/// (Service, generation) for 50 generations of up to 64k Services (a 5-minute run at
/// 200 changes/s over 10k Services makes 6), and apart from the other endpoints
/// (10.128.0.0/10), so the maps layout's `hairpin` element of the address says which
/// generation reached the kernel.
fn first_ip(i: usize, generation: usize) -> String {
    format!(
        "10.{}.{}.{}",
        200 + generation % 50,
        (i >> 8) & 255,
        i & 255
    )
}

fn slice(i: usize, endpoints: usize, generation: usize, trigger: Option<&str>) -> String {
    let eps: Vec<String> = (0..endpoints)
        .map(|j| {
            let n = i * endpoints + j;
            let ip = if j == 0 {
                first_ip(i, generation)
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

/// What shows that Service `i`'s first endpoint of `generation` is in the kernel.
#[derive(Debug, Clone)]
enum Target {
    /// A chain (upstream's nftables layout: `endpoint-…`; iptables-nft: `KUBE-SEP-…`).
    Chain(Family, &'static str, String),
    /// An element (the maps layout: the endpoint's `hairpin` pair, written in the same
    /// atomic batch as its `backends-*` map entries).
    Element(Family, &'static str, &'static str, Vec<KeyValue>),
}

impl Target {
    fn present(&self, nl: &mut kproxy::nftables::netlink::Netlink) -> bool {
        match self {
            Target::Chain(f, table, chain) => nl.chain_exists(*f, table, chain),
            Target::Element(f, table, set, key) => nl.element_exists(*f, table, set, key),
        }
        .unwrap_or(false)
    }

    fn name(&self) -> String {
        match self {
            Target::Chain(_, _, chain) => format!("chain {chain}"),
            Target::Element(_, _, set, key) => format!("element {key:?} of {set}"),
        }
    }
}

/// The chains of the nat table of iptables-legacy in this thread's network namespace.
fn legacy_nat_chains() -> std::collections::HashSet<String> {
    let out = std::process::Command::new("iptables-legacy-save")
        .args(["-t", "nat"])
        .output()
        .expect("iptables-legacy-save");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Where Service `i`'s first endpoint of `generation` shows in `mode`.
fn target_of(mode: &str, i: usize, generation: usize) -> Target {
    let ip: std::net::IpAddr = first_ip(i, generation).parse().expect("endpoint ip");
    if mode == "nftables-maps" {
        return Target::Element(
            Family::Ip,
            "kproxy",
            "hairpin",
            vec![KeyValue::Ip(ip), KeyValue::Ip(ip)],
        );
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
        Target::Chain(
            Family::Ip,
            "nat",
            kproxy::iptables::names::endpoint_chain(&spn, &ep),
        )
    } else {
        Target::Chain(
            Family::Ip,
            "kube-proxy",
            format!("endpoint-{}", endpoint_base(&spn, &ep)),
        )
    }
}

/// (VmRSS, VmHWM) in KiB; zeros once the process is gone.
fn memory_kib(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The sum of every sample of metric `name` (all label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

/// What the sampler reads from /metrics.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    syncs: f64,
    sync_seconds: f64,
    failures: f64,
    programmed: f64,
    programmed_seconds: f64,
}

fn counters(text: &str) -> Counters {
    Counters {
        syncs: metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
        sync_seconds: metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_sum"),
        failures: metric(
            text,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        ) + metric(
            text,
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
        ) + metric(
            text,
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
        ),
        programmed: metric(text, "kubeproxy_network_programming_duration_seconds_count"),
        programmed_seconds: metric(text, "kubeproxy_network_programming_duration_seconds_sum"),
    }
}

/// One sampler row.
#[derive(Debug, Clone, Default)]
struct Sample {
    t: f64,
    rss_kib: u64,
    hwm_kib: u64,
    c: Counters,
    made: usize,
    verified: usize,
}

/// A change made at the API server, for the verifier.
struct Change {
    at: Instant,
    service: usize,
    generation: usize,
    target: Target,
}

/// `mode`: `iptables`, `nftables` (upstream's layout) or `nftables-maps` (the maps
/// layout).
fn spawn(ns: &Netns, s: &Settings, mode: &str, kubeconfig: &Path, log: &Path) -> Daemon {
    let (proxy_mode, layout) = match mode {
        "nftables-maps" => ("nftables", "maps"),
        m => (m, "upstream"),
    };
    KproxyRun::new(ns, kubeconfig, proxy_mode)
        .args(&["--nftables-layout", layout])
        .node("node-1")
        .cluster_cidr("10.128.0.0/10")
        .min_sync(&s.min_sync)
        .args(&["--sync-period", "30s"])
        .env("KPROXY_IPTABLES_BACKEND", &s.ipt_backend)
        .log(log)
        .spawn()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One mode's result, for the summary and the plot.
struct Outcome {
    mode: String,
    samples: Vec<Sample>,
    summary_row: String,
    ok: bool,
}

fn case(s: &Settings, mode: &str) -> Outcome {
    // Every mode is verified in the kernel: over netlink (nftables, iptables-nft), or
    // for iptables-legacy (whose x_tables blob netlink cannot see) by reading the nat
    // table with iptables-legacy-save once per round: a coarser upper bound (each
    // round costs one save of the whole table).
    let polled = true;
    let legacy = mode == "iptables" && s.ipt_backend == "legacy";
    let backend = if mode == "iptables" {
        format!("iptables-{}", s.ipt_backend)
    } else {
        "netlink".to_string()
    };
    eprintln!(
        "churn: {mode} ({backend}): {} Services × {} endpoints, {} changes/s for {} s, minSyncPeriod {}",
        s.services, s.endpoints, s.rate, s.seconds, s.min_sync
    );
    let ns = Arc::new(Netns::new("churn"));
    let api = ns.run(FakeApi::start);
    // A watch that falls this far behind relists (410) instead of the history growing
    // by every version of every slice.
    api.set_history_limit(50_000);
    api.apply("{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"node-1\"},\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"10.99.0.1\"}]}}");
    for i in 0..s.services {
        api.apply(&service(i));
        api.apply(&slice(i, s.endpoints, 0, None));
    }
    std::fs::create_dir_all(&s.out).expect("output dir");
    let kubeconfig = s.out.join(format!("kubeconfig-{mode}"));
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let log = s.out.join(format!("churn-{mode}.log"));
    let started = Instant::now();
    let mut daemon = spawn(&ns, s, mode, &kubeconfig, &log);
    let pid = daemon.0.id();
    loop {
        if metrics_text(&ns).contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{") {
            break;
        }
        if let Ok(Some(st)) = daemon.0.try_wait() {
            panic!(
                "{mode}: kproxy exited before its first sync ({st}); see {}",
                log.display()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "{mode}: no first sync"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_sync = started.elapsed();
    let base = counters(&metrics_text(&ns));

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let verified = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let missed = Arc::new(AtomicUsize::new(0));
    let superseded = Arc::new(AtomicUsize::new(0));

    // The verifier: a thread in the namespace, checking each change in order.
    let (tx, rx) = mpsc::channel::<Change>();
    let verifier = if polled {
        let path = format!("/var/run/netns/{}", ns.name);
        let (verified, latencies, missed, superseded) = (
            Arc::clone(&verified),
            Arc::clone(&latencies),
            Arc::clone(&missed),
            Arc::clone(&superseded),
        );
        Some(std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            let mut nl = kproxy::nftables::netlink::Netlink::open().expect("netlink");
            let mut saved: std::collections::HashSet<String> = Default::default();
            // One save of a 10k-Service nat table costs ~1.5 s of CPU: saving back to
            // back would take a core from the daemon being measured.
            const LEGACY_ROUND: Duration = Duration::from_secs(3);
            let mut last_save = Instant::now() - LEGACY_ROUND;
            // A change not seen after this long counts as missed.
            let limit = Duration::from_secs(60);
            // Every outstanding change is checked each round, so one slow change does
            // not delay the measurement of the others.
            let mut outstanding: Vec<Change> = Vec::new();
            let mut seen_generation: std::collections::HashMap<usize, usize> =
                std::collections::HashMap::new();
            let mut open = true;
            while open || !outstanding.is_empty() {
                loop {
                    match rx.try_recv() {
                        Ok(ch) => outstanding.push(ch),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                if legacy && !outstanding.is_empty() && last_save.elapsed() >= LEGACY_ROUND {
                    saved = legacy_nat_chains();
                    last_save = Instant::now();
                }
                outstanding.retain(|ch| {
                    let present = match &ch.target {
                        Target::Chain(_, _, chain) if legacy => saved.contains(chain),
                        t => t.present(&mut nl),
                    };
                    if present {
                        latencies.lock().unwrap().push(ch.at.elapsed());
                        verified.fetch_add(1, Ordering::SeqCst);
                        let g = seen_generation.entry(ch.service).or_default();
                        *g = (*g).max(ch.generation);
                        return false;
                    }
                    true
                });
                outstanding.retain(|ch| {
                    // A later change of the same Service reached the kernel first: this
                    // one was folded into it (a sync took longer than a round of
                    // changes), and the kernel never needed its intermediate state.
                    if seen_generation
                        .get(&ch.service)
                        .is_some_and(|g| *g > ch.generation)
                    {
                        latencies.lock().unwrap().push(ch.at.elapsed());
                        superseded.fetch_add(1, Ordering::SeqCst);
                        verified.fetch_add(1, Ordering::SeqCst);
                        return false;
                    }
                    if ch.at.elapsed() > limit {
                        missed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("churn: {} never appeared", ch.target.name());
                        return false;
                    }
                    true
                });
                std::thread::sleep(Duration::from_millis(5));
            }
        }))
    } else {
        drop(rx);
        None
    };

    // The sampler.
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let sampler = {
        let (stop, made, verified, samples) = (
            Arc::clone(&stop),
            Arc::clone(&made),
            Arc::clone(&verified),
            Arc::clone(&samples),
        );
        let ns = Arc::clone(&ns);
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut next = t0;
            while !stop.load(Ordering::SeqCst) {
                let (rss_kib, hwm_kib) = memory_kib(pid);
                let c = counters(&metrics_text(&ns));
                samples.lock().unwrap().push(Sample {
                    t: t0.elapsed().as_secs_f64(),
                    rss_kib,
                    hwm_kib,
                    c,
                    made: made.load(Ordering::SeqCst),
                    verified: verified.load(Ordering::SeqCst),
                });
                next += Duration::from_millis(500);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };

    // The changes, at a steady rate (an absolute schedule, so a slow apply does not
    // lower the rate). A stride coprime with the Service count visits every Service
    // once per round.
    let total = (s.rate * s.seconds) as usize;
    let stride = (1..)
        .map(|k| s.services / 2 + k)
        .find(|c| gcd(*c, s.services) == 1)
        .unwrap_or(1);
    let mut generation = vec![0usize; s.services];
    let t0 = Instant::now();
    let mut died = false;
    for k in 0..total {
        let due = t0 + Duration::from_secs_f64(k as f64 / s.rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let i = (k * stride) % s.services;
        generation[i] += 1;
        let stamp = jiff::Timestamp::now().to_string();
        api.apply(&slice(i, s.endpoints, generation[i], Some(&stamp)));
        let at = Instant::now();
        made.fetch_add(1, Ordering::SeqCst);
        if polled {
            let _ = tx.send(Change {
                at,
                service: i,
                generation: generation[i],
                target: target_of(mode, i, generation[i]),
            });
        }
        if k % 1000 == 0 {
            if let Ok(Some(_)) = daemon.0.try_wait() {
                died = true;
                break;
            }
        }
    }
    let churn_time = t0.elapsed();
    drop(tx);
    if let Some(v) = verifier {
        let _ = v.join();
    }
    // Let the daemon's metrics catch up with the last changes (and a follow-up sync).
    let settle = Instant::now();
    let mut end = counters(&metrics_text(&ns));
    while (end.programmed - base.programmed) < made.load(Ordering::SeqCst) as f64
        && settle.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(200));
        end = counters(&metrics_text(&ns));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let end = counters(&metrics_text(&ns));
    died |= matches!(daemon.0.try_wait(), Ok(Some(_)));
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    drop(daemon);

    // Figures.
    let made = made.load(Ordering::SeqCst);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort();
    let missed = missed.load(Ordering::SeqCst);
    let superseded = superseded.load(Ordering::SeqCst);
    let syncs = end.syncs - base.syncs;
    let failures = end.failures - base.failures;
    let programmed = end.programmed - base.programmed;
    let mean_programming = if programmed > 0.0 {
        (end.programmed_seconds - base.programmed_seconds) / programmed
    } else {
        0.0
    };
    // The longest sync: per-sample deltas (samples are 0.5 s apart, about one sync
    // each at minSyncPeriod 1 s; a sample holding two syncs shows their mean).
    let longest_sync = samples
        .windows(2)
        .filter(|w| w[1].c.syncs > w[0].c.syncs)
        .map(|w| (w[1].c.sync_seconds - w[0].c.sync_seconds) / (w[1].c.syncs - w[0].c.syncs))
        .fold(0.0f64, f64::max);
    let min_sync = kproxy::config::parse_go_duration(&s.min_sync)
        .unwrap_or(Duration::from_secs(1))
        .as_secs_f64();
    let bound = Duration::from_secs_f64(min_sync + longest_sync);
    let within = lat.iter().filter(|l| **l <= bound).count();
    let within2 = lat
        .iter()
        .filter(|l| **l <= Duration::from_secs_f64(min_sync + 2.0 * longest_sync))
        .count();
    let rss: Vec<u64> = samples
        .iter()
        .filter(|x| x.rss_kib > 0)
        .map(|x| x.rss_kib)
        .collect();
    let mib = |k: u64| k as f64 / 1024.0;
    let (rss_first, rss_last) = (
        rss.first().copied().unwrap_or(0),
        rss.last().copied().unwrap_or(0),
    );
    let rss_max = rss.iter().copied().max().unwrap_or(0);
    let rss_min = rss.iter().copied().min().unwrap_or(0);
    let hwm = samples.iter().map(|x| x.hwm_kib).max().unwrap_or(0);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let failed_lines = log_text
        .lines()
        .filter(|l| l.contains("sync failed"))
        .count();
    let verified_n = lat.len();
    let ok = !died
        && failures == 0.0
        && failed_lines == 0
        && missed == 0
        && (!polled || verified_n == made);
    let verdict = if ok { "pass" } else { "FAIL" };
    let summary_row = format!(
        "| {mode} ({backend}) | {} × {} | {:.0} s at {:.0}/s ({made} changes) | {:.1} s | {:.0} / {:.0} / {:.0} / {:.0} MiB | {:.0} MiB | {syncs:.0} | {failures:.0} | {} | {:.0} / {:.0} / {:.0} ms | {:.1} s | {} | {:.0} ms | {verdict} |",
        s.services,
        s.endpoints,
        churn_time.as_secs_f64(),
        made as f64 / churn_time.as_secs_f64(),
        first_sync.as_secs_f64(),
        mib(rss_first),
        mib(rss_min),
        mib(rss_max),
        mib(rss_last),
        mib(hwm),
        if polled {
            format!("{verified_n} / {made} ({missed} missed, {superseded} superseded)")
        } else {
            format!("– (daemon metric only: {programmed:.0} / {made})")
        },
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        longest_sync,
        if polled {
            format!(
                "{within} / {verified_n} (≤ {:.2} s); {within2} / {verified_n} (≤ minSync + 2 syncs)",
                bound.as_secs_f64()
            )
        } else {
            "–".into()
        },
        mean_programming * 1e3,
    );
    eprintln!("{summary_row}");

    // Per-mode CSVs.
    let mut csv = String::from("t_s,rss_kib,hwm_kib,syncs,sync_seconds,failed_syncs,programmed,changes_made,changes_verified\n");
    for x in &samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{:.0},{:.3},{:.0},{:.0},{},{}",
            x.t,
            x.rss_kib,
            x.hwm_kib,
            x.c.syncs - base.syncs,
            x.c.sync_seconds - base.sync_seconds,
            x.c.failures - base.failures,
            x.c.programmed - base.programmed,
            x.made,
            x.verified
        );
    }
    std::fs::write(s.out.join(format!("churn-{mode}.csv")), csv).expect("write csv");
    let mut lcsv = String::from("change,latency_ms\n");
    for (k, l) in lat.iter().enumerate() {
        let _ = writeln!(lcsv, "{k},{:.1}", ms(*l));
    }
    std::fs::write(s.out.join(format!("churn-latency-{mode}.csv")), lcsv)
        .expect("write latency csv");
    let _ = std::fs::remove_file(&kubeconfig);
    Outcome {
        mode: format!("{mode} ({backend})"),
        samples,
        summary_row,
        ok,
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn plot(out: &Path, outcomes: &[Outcome], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let path = out.join("churn-rss.svg");
    let root = SVGBackend::new(&path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let t_max = outcomes
        .iter()
        .flat_map(|o| o.samples.iter().map(|x| x.t))
        .fold(1.0f64, f64::max);
    let y_max = outcomes
        .iter()
        .flat_map(|o| o.samples.iter().map(|x| x.rss_kib as f64 / 1024.0))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first sync")
        .y_desc("daemon RSS (MiB)")
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        GREEN,
        MAGENTA,
    ];
    for (o, color) in outcomes.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(
                o.samples
                    .iter()
                    .filter(|x| x.rss_kib > 0)
                    .map(|x| (x.t, x.rss_kib as f64 / 1024.0)),
                color.stroke_width(2),
            ))?
            .label(o.mode.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    if !netns::require_root("churn bench") {
        return;
    }
    let s = Settings {
        services: env_or("CHURN_SERVICES", 10_000usize).max(1),
        endpoints: env_or("CHURN_ENDPOINTS", 10usize).max(1),
        seconds: env_or("CHURN_SECONDS", 300u64).max(1),
        rate: env_or("CHURN_RATE", 200u64).max(1),
        min_sync: std::env::var("CHURN_MIN_SYNC").unwrap_or_else(|_| "1s".into()),
        ipt_backend: std::env::var("IPT_BACKEND").unwrap_or_else(|_| "nft".into()),
        out: std::env::var_os("CHURN_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak")),
    };
    let modes: Vec<String> = std::env::var("MODES")
        .unwrap_or_else(|_| "nftables,iptables".into())
        .split(',')
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    let mut outcomes = Vec::new();
    for mode in &modes {
        outcomes.push(case(&s, mode));
    }
    let title = format!(
        "kproxy run: {} Services × {} endpoints, {} EndpointSlice changes/s for {} s",
        s.services, s.endpoints, s.rate, s.seconds
    );
    if let Err(e) = plot(&s.out, &outcomes, &title) {
        eprintln!("churn: plot: {e}");
    }
    let mut md = String::from("| mode (backend) | cluster | churn | first sync | RSS first / min / max / last | RSS peak (VmHWM) | syncs | failed syncs | changes seen in the kernel | change → kernel p50 / p99 / max | longest sync | within minSyncPeriod + one sync | daemon's mean network_programming_duration | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for o in &outcomes {
        md.push_str(&o.summary_row);
        md.push('\n');
    }
    std::fs::write(s.out.join("churn-summary.md"), &md).expect("write summary");
    println!("{md}");
    println!("written to {}", s.out.display());
    if outcomes.iter().any(|o| !o.ok) {
        std::process::exit(1);
    }
}
