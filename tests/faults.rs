//! Faults (root; each test in network namespaces of its own, against the fake API
//! server). Every test ends with the rules checked correct and a log line or metric
//! naming what happened:
//! - `kill -9` of `kproxy run` in the middle of its first apply, then a restart: the
//!   rules converge to exactly what a fresh `kproxy apply` of the same cluster writes
//!   into an empty namespace (nothing half-applied survives), both modes;
//! - the xtables lock held by another process (iptables-legacy, whose lock file is
//!   private to the test through XTABLES_LOCKFILE): the sync waits, fails naming the
//!   lock, retries, and applies once the lock is free;
//! - a netlink batch the kernel refuses (a foreign rule still uses a set the batch
//!   deletes): the error names the operation, the previous rules stay, and the sync
//!   applies once the obstacle is gone;
//! - the API server answering 500, 410 Gone, hanging (a timeout), and answering slowly:
//!   the watchers retry, the log names the failure, every change is applied;
//! - a watch event (and a list) holding one malformed Service: the others are applied,
//!   the bad one is named in the log and counted in `kproxy_skipped_objects_total`.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApi, Fault, Scope};
use kproxy::model::{Endpoint, Protocol, ServicePortName};
use kproxy::nftables::transaction::Family;
use netns::{canonical_listing, require_root, Netns};

const CLUSTER_CIDR: &str = "10.244.0.0/16";

struct Daemon(Child);

impl Daemon {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One test's world: a namespace, the fake API server in it, a scratch directory.
struct Bed {
    ns: Netns,
    api: FakeApi,
    dir: PathBuf,
    mode: &'static str,
    /// iptables backend (`nft` or `legacy`) in iptables mode.
    backend: &'static str,
}

impl Bed {
    fn new(tag: &str, mode: &'static str, backend: &'static str) -> Bed {
        let ns = Netns::new(tag);
        let api = ns.run(FakeApi::start);
        let dir = std::env::temp_dir().join(format!(
            "kproxy-faults-{}-{}-{}",
            std::process::id(),
            ns.name,
            mode
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig()).unwrap();
        api.apply(NODE);
        Bed {
            ns,
            api,
            dir,
            mode,
            backend,
        }
    }

    /// `kproxy run` as node-a, minSyncPeriod 0, syncPeriod 2s (the retry ceiling),
    /// stderr to `<dir>/<log>`.
    fn start(&self, log: &str, env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, "env"])
            .arg(format!("KPROXY_IPTABLES_BACKEND={}", self.backend));
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        cmd.arg(env!("CARGO_BIN_EXE_kproxy"))
            .arg("run")
            .arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .args([
                "--proxy-mode",
                self.mode,
                "--hostname-override",
                "node-a",
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--min-sync-period",
                "0s",
                "--sync-period",
                "2s",
                "-v",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        Daemon(cmd.spawn().expect("start kproxy run"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn rules(&self) -> String {
        rules_in(&self.ns, self.mode, self.backend)
    }

    /// Polls the rules until `cond` holds; panics after `limit` with the rules and log.
    fn wait_for(&self, what: &str, log: &str, limit: Duration, cond: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            let r = self.rules();
            if cond(&r) {
                return;
            }
            if start.elapsed() > limit {
                panic!(
                    "{}: timed out waiting for {what}\n--- rules:\n{r}\n--- log:\n{}",
                    self.mode,
                    self.log(log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> String {
        http_get(&self.ns, 10249, "/metrics").1
    }

    /// Waits for the daemon's first successful sync (its last-sync timestamp).
    fn wait_synced(&self, log: &str, limit: Duration) {
        let start = Instant::now();
        while !self
            .metrics()
            .contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{")
        {
            assert!(
                start.elapsed() < limit,
                "{}: no first sync\n{}",
                self.mode,
                self.log(log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rules_in(ns: &Netns, mode: &str, backend: &str) -> String {
    if mode == "nftables" {
        ns.exec_status(&["nft", "list", "table", "ip", "kube-proxy"])
            .1
    } else {
        ns.exec_status(&[&format!("iptables-{backend}-save")]).1
    }
}

fn http_get(ns: &Netns, port: u16, path: &str) -> (u16, String) {
    let path = path.to_string();
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    })
}

/// The sum of every sample of a metric (all label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

const NODE: &str = "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"node-a\"},\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"10.99.0.1\"}]}}";

fn service(name: &str, ip: &str) -> String {
    format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"app\"}},\"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"{ip}\",\"ports\":[{{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\"}}]}}}}")
}

fn affinity_service(name: &str, ip: &str) -> String {
    format!("{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"app\"}},\"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"{ip}\",\"sessionAffinity\":\"ClientIP\",\"sessionAffinityConfig\":{{\"clientIP\":{{\"timeoutSeconds\":600}}}},\"ports\":[{{\"name\":\"http\",\"port\":80,\"protocol\":\"TCP\"}}]}}}}")
}

fn slice(svc: &str, ips: &[String]) -> String {
    let eps: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{\"addresses\":[\"{ip}\"],\"nodeName\":\"node-a\"}}"))
        .collect();
    format!("{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"{svc}-1\",\"namespace\":\"app\",\"labels\":{{\"kubernetes.io/service-name\":\"{svc}\"}}}},\"addressType\":\"IPv4\",\"endpoints\":[{}],\"ports\":[{{\"name\":\"http\",\"port\":8080,\"protocol\":\"TCP\"}}]}}", eps.join(","))
}

fn many_name(i: usize) -> String {
    format!("svc{i:05}")
}

fn many_ip(i: usize) -> String {
    format!("172.30.{}.{}", i >> 8, i & 255)
}

fn many_endpoints(i: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|j| {
            let k = i * n + j;
            format!("10.244.{}.{}", (k >> 8) & 255, k & 255)
        })
        .collect()
}

/// iptables-save text as table -> chain -> rules in order (counters, comments and the
/// order of chains dropped: chains appear in creation order, which differs between a
/// take-over and a fresh apply).
fn iptables_canonical(save: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out = BTreeMap::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            out.entry((table.clone(), chain.to_string()))
                .or_insert_with(Vec::new);
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            out.entry((table.clone(), chain.to_string()))
                .or_insert_with(Vec::new)
                .push(line.to_string());
        }
    }
    out
}

fn canonical(mode: &str, rules: &str) -> String {
    if mode == "nftables" {
        canonical_listing(rules)
    } else {
        iptables_canonical(rules)
            .into_iter()
            .filter(|((t, _), _)| t == "nat" || t == "filter")
            .map(|((t, c), r)| format!("{t} {c}\n{}", r.join("\n")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The first lines where two texts differ, for a failure message.
fn first_difference(a: &str, b: &str) -> String {
    let (al, bl): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    for i in 0..al.len().max(bl.len()) {
        if al.get(i) != bl.get(i) {
            return format!(
                "line {}: daemon {:?} / fresh apply {:?}",
                i + 1,
                al.get(i),
                bl.get(i)
            );
        }
    }
    "no difference".into()
}

/// The chain that exists once Service `i`'s first endpoint is written.
fn first_endpoint_chain(mode: &str, i: usize, endpoints: usize) -> (&'static str, String) {
    let spn = ServicePortName {
        namespace: "app".into(),
        name: many_name(i),
        port: "http".into(),
        protocol: Protocol::Tcp,
    };
    let ep = Endpoint {
        ip: many_endpoints(i, endpoints)[0].parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        is_local: true,
        zone_hints: vec![],
        node_hints: vec![],
    };
    if mode == "nftables" {
        (
            "kube-proxy",
            format!(
                "endpoint-{}",
                kproxy::nftables::names::endpoint_base(&spn, &ep)
            ),
        )
    } else {
        ("nat", kproxy::iptables::names::endpoint_chain(&spn, &ep))
    }
}

/// Kills `kproxy run` while it applies its first sync, restarts it, and checks the
/// rules converge to a fresh `kproxy apply` of the same cluster in an empty namespace.
fn kill_during_apply(mode: &'static str) {
    // Enough that the first sync takes a while (nftables: several batches; iptables-nft:
    // several restore pieces), few enough for a debug build under CI.
    let services: usize = if mode == "nftables" { 2000 } else { 1200 };
    const ENDPOINTS: usize = 4;
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{mode}: {:>6.1} s {what}", t0.elapsed().as_secs_f64());
    let mut objects = vec![NODE.to_string()];
    for i in 0..services {
        objects.push(service(&many_name(i), &many_ip(i)));
        objects.push(slice(&many_name(i), &many_endpoints(i, ENDPOINTS)));
    }
    // A few attempts: the kill must land after the first rules reached the kernel and
    // before the sync completed; on a very fast (or very slow) machine one may miss.
    let mut landed = None;
    for attempt in 0..3 {
        let bed = Bed::new(&format!("k9{}", &mode[..3]), mode, "nft");
        for o in &objects[1..] {
            bed.api.apply(o);
        }
        let mut daemon = bed.start("first.log", &[]);
        // Watch for a middle Service's first endpoint chain over netlink (fast enough
        // to poll every few milliseconds; iptables-nft keeps x_tables chains there too).
        let (table, chain) = first_endpoint_chain(mode, services / 2, ENDPOINTS);
        let path = format!("/var/run/netns/{}", bed.ns.name);
        let watcher = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a valid namespace fd.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let mut nl = kproxy::nftables::netlink::Netlink::open().unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(120) {
                if nl.chain_exists(Family::Ip, table, &chain).unwrap_or(false) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        });
        assert!(
            watcher.join().unwrap(),
            "{mode}: the first rules never appeared"
        );
        let mid_sync = !bed
            .metrics()
            .contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{");
        daemon.kill9();
        phase("killed");
        if !mid_sync {
            eprintln!("{mode}: attempt {attempt}: the sync finished before the kill; again");
            continue;
        }
        landed = Some(bed);
        break;
    }
    let bed = landed.unwrap_or_else(|| panic!("{mode}: never killed in the middle of a sync"));
    let killed_state = bed.rules();

    // Restart: the new process takes over whatever the killed one left.
    let _daemon = bed.start("second.log", &[]);
    bed.wait_synced("second.log", Duration::from_secs(300));
    phase("restarted and synced");

    // A fresh apply of the same cluster into an empty namespace.
    let fresh_ns = Netns::new(&format!("k9f{}", &mode[..3]));
    let snap = bed.dir.join("cluster.json");
    let items: Vec<serde_json::Value> = objects
        .iter()
        .map(|o| serde_json::from_str(o).unwrap())
        .collect();
    std::fs::write(
        &snap,
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    )
    .unwrap();
    let snap_s = snap.display().to_string();
    let (ok, _, err) = fresh_ns.exec_status(&[
        "env",
        "KPROXY_IPTABLES_BACKEND=nft",
        env!("CARGO_BIN_EXE_kproxy"),
        "apply",
        "--snapshot",
        &snap_s,
        "--mode",
        mode,
        "--hostname-override",
        "node-a",
        "--cluster-cidr",
        CLUSTER_CIDR,
    ]);
    assert!(ok, "{mode}: fresh kproxy apply failed: {err}");
    let fresh = canonical(mode, &rules_in(&fresh_ns, mode, "nft"));
    phase("fresh apply done");
    assert!(
        canonical(mode, &killed_state) != fresh,
        "{mode}: the kill left complete rules; the test proves nothing"
    );
    // The restarted daemon's first sync rewrites everything; stale leftovers go in a
    // follow-up sync (nftables deletes flushed chains a second later).
    let start = Instant::now();
    loop {
        let now = canonical(mode, &bed.rules());
        if now == fresh {
            phase("converged");
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "{mode}: after the restart the rules differ from a fresh apply: {}\n--- log:\n{}",
                first_difference(&now, &fresh),
                bed.log("second.log")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = bed.log("second.log");
    assert!(
        log.contains("took over") || log.contains("existing"),
        "{mode}: the restarted daemon does not say it took over existing rules:\n{log}"
    );
}

#[test]
fn kill9_during_apply_then_restart_converges_nftables() {
    if !require_root("faults") {
        return;
    }
    kill_during_apply("nftables");
}

#[test]
fn kill9_during_apply_then_restart_converges_iptables() {
    if !require_root("faults") {
        return;
    }
    kill_during_apply("iptables");
}

/// Holds an exclusive flock on `path` (as another iptables user would) until dropped.
/// Held by this process itself: a helper process would pass the lock to its children.
fn hold_lock(path: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).expect("open lock file");
    // SAFETY: flock on a valid fd we own; released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    file
}

#[test]
fn xtables_lock_held_by_another_process_waits_reports_retries() {
    if !require_root("faults") {
        return;
    }
    // iptables-legacy takes the xtables lock (iptables-nft does not need it). The lock
    // file is the test's own (XTABLES_LOCKFILE), never the host's /run/xtables.lock.
    let bed = Bed::new("lock", "iptables", "legacy");
    let lock = bed.dir.join("xtables.lock");
    std::fs::write(&lock, "").unwrap();
    let lock_s = lock.display().to_string();
    bed.api.apply(&service("web", "10.96.0.10"));
    bed.api.apply(&slice("web", &["10.244.1.5".to_string()]));
    let holder = hold_lock(&lock);
    assert!(
        !Command::new("flock")
            .args(["-n", "-x", &lock_s, "true"])
            .status()
            .unwrap()
            .success(),
        "the lock is not held"
    );
    let _daemon = bed.start("kproxy.log", &[("XTABLES_LOCKFILE", &lock_s)]);
    // It waits (iptables -w 5), then reports the lock and retries.
    let t = Instant::now();
    while !bed.log("kproxy.log").contains("xtables lock") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no log line about the xtables lock:\n{}",
            bed.log("kproxy.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !bed.rules().contains("10.244.1.5"),
        "rules were written while another process held the lock"
    );
    let m = bed.metrics();
    assert!(
        metric(
            &m,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
        ) >= 1.0,
        "the failed sync is not counted:\n{m}"
    );
    // Released: the next retry applies.
    drop(holder);
    bed.wait_for(
        "the rules after the lock was released",
        "kproxy.log",
        Duration::from_secs(30),
        |r| r.contains("10.244.1.5") && r.contains("10.96.0.10"),
    );
    let log = bed.log("kproxy.log");
    assert!(
        log.contains("held by another process"),
        "the log does not say another process holds the lock:\n{log}"
    );
}

#[test]
fn netlink_batch_refused_reports_operation_and_keeps_rules() {
    if !require_root("faults") {
        return;
    }
    let bed = Bed::new("nlref", "nftables", "nft");
    bed.api.apply(&affinity_service("sticky", "10.96.0.10"));
    bed.api.apply(&slice("sticky", &["10.244.1.5".to_string()]));
    bed.api.apply(&service("web", "10.96.0.20"));
    bed.api.apply(&slice("web", &["10.244.2.5".to_string()]));
    let _daemon = bed.start("kproxy.log", &[]);
    bed.wait_for(
        "the first sync",
        "kproxy.log",
        Duration::from_secs(30),
        |r| r.contains("10.244.1.5") && r.contains("10.244.2.5"),
    );
    let listing = bed.rules();
    let set = listing
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("set ")
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|name| name.starts_with("affinity-"))
        })
        .unwrap_or_else(|| panic!("no affinity set in\n{listing}"))
        .to_string();
    // Another program's rule in kproxy's table uses the affinity set: the kernel will
    // refuse to delete it (EBUSY), so a batch that drops the affinity fails whole.
    let (ok, _, err) =
        bed.ns
            .exec_status(&["nft", "add", "chain", "ip", "kube-proxy", "zz-foreign"]);
    assert!(ok, "{err}");
    let (ok, _, err) = bed.ns.exec_status(&[
        "nft",
        "add",
        "rule",
        "ip",
        "kube-proxy",
        "zz-foreign",
        "ip",
        "saddr",
        &format!("@{set}"),
        "counter",
    ]);
    assert!(ok, "{err}");
    let before = canonical_listing(&bed.rules());
    let failures_before = metric(
        &bed.metrics(),
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    );
    // One change that needs the set gone, one that does not. They reach the daemon on
    // two watches, so the second is made only once the first was refused: from then
    // on every retry is a full sync holding both.
    let refusals = |bed: &Bed| {
        bed.log("kproxy.log")
            .matches("kernel refused operation")
            .count()
    };
    let wait_for_refusals = |bed: &Bed, n: usize| {
        let t = Instant::now();
        while refusals(bed) < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no refused operation logged:\n{}",
                bed.log("kproxy.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    bed.api.apply(&service("sticky", "10.96.0.10"));
    wait_for_refusals(&bed, 1);
    let seen = refusals(&bed);
    bed.api.apply(&slice(
        "web",
        &["10.244.2.5".to_string(), "10.244.2.6".to_string()],
    ));
    wait_for_refusals(&bed, seen + 1);
    let log = bed.log("kproxy.log");
    let line = log
        .lines()
        .find(|l| l.contains("kernel refused operation"))
        .unwrap();
    assert!(
        line.contains(&set) && line.contains("delete"),
        "the error does not name the operation (delete set {set}): {line}"
    );
    // The refused batch changed nothing: neither the affinity removal nor the other
    // Service's new endpoint.
    assert_eq!(
        canonical_listing(&bed.rules()),
        before,
        "the refused batch changed the table"
    );
    assert!(
        metric(
            &bed.metrics(),
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total"
        ) > failures_before,
        "the refused sync is not counted"
    );
    // The obstacle goes: the retry applies both changes.
    let (ok, _, err) =
        bed.ns
            .exec_status(&["nft", "delete", "chain", "ip", "kube-proxy", "zz-foreign"]);
    assert!(ok, "{err}");
    bed.wait_for(
        "the retried sync",
        "kproxy.log",
        Duration::from_secs(30),
        |r| r.contains("10.244.2.6") && !r.contains(&set),
    );
}

#[test]
fn apiserver_errors_timeouts_gone_and_slow_responses() {
    if !require_root("faults") {
        return;
    }
    let bed = Bed::new("apif", "nftables", "nft");
    bed.api.apply(&service("web", "10.96.0.10"));
    bed.api.apply(&slice("web", &["10.244.1.5".to_string()]));
    // Start against a failing server: three 500s, one request that hangs and is
    // dropped, two slow answers; then it works.
    bed.api.inject(Scope::Lists, Fault::Status(500), 3);
    bed.api
        .inject(Scope::Lists, Fault::Hang(Duration::from_secs(3)), 1);
    bed.api
        .inject(Scope::All, Fault::Delay(Duration::from_millis(1500)), 2);
    let _daemon = bed.start("kproxy.log", &[]);
    bed.wait_for(
        "the first sync after the failing lists",
        "kproxy.log",
        Duration::from_secs(60),
        |r| r.contains("10.244.1.5"),
    );
    assert!(
        bed.api.faults_served() >= 6,
        "the faults were not all served"
    );
    let log = bed.log("kproxy.log");
    assert!(
        log.contains("watch error") && log.contains("500"),
        "the 500s are not in the log:\n{log}"
    );

    // 410 Gone on the watches after a disconnect, and the history compacted, while
    // the relists first fail: the watchers relist and the change arrives.
    bed.api.inject(Scope::Watches, Fault::Status(410), 4);
    bed.api.inject(Scope::Lists, Fault::Status(500), 2);
    bed.api.apply(&slice(
        "web",
        &["10.244.1.5".to_string(), "10.244.1.6".to_string()],
    ));
    bed.api.compact();
    bed.api.disconnect_watches();
    bed.wait_for(
        "the change made during 410s",
        "kproxy.log",
        Duration::from_secs(60),
        |r| r.contains("10.244.1.6"),
    );
    // The change may arrive on the old watch just before the disconnect, so the 410s
    // (served to the re-established watches) can come after it: wait for them.
    let start = Instant::now();
    loop {
        let log = bed.log("kproxy.log");
        if log.contains("410") || log.contains("Expired") || log.contains("Gone") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the 410s are not in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Slow answers on everything, then a hang on a watch: changes still arrive.
    bed.api
        .inject(Scope::All, Fault::Delay(Duration::from_millis(2000)), 6);
    bed.api
        .inject(Scope::Watches, Fault::Hang(Duration::from_secs(4)), 2);
    bed.api.disconnect_watches();
    bed.api.apply(&service("api", "10.96.0.20"));
    bed.api.apply(&slice("api", &["10.244.2.7".to_string()]));
    bed.wait_for(
        "the change made while the server was slow",
        "kproxy.log",
        Duration::from_secs(90),
        |r| r.contains("10.96.0.20") && r.contains("10.244.2.7") && r.contains("10.244.1.6"),
    );
    let (status, _) = http_get(&bed.ns, 10256, "/healthz");
    assert_eq!(status, 200, "healthy again once the server answers");
}

#[test]
fn bad_object_in_list_and_watch_event_skips_only_that_object() {
    if !require_root("faults") {
        return;
    }
    let bed = Bed::new("badobj", "nftables", "nft");
    bed.api.apply(&service("web", "10.96.0.10"));
    bed.api.apply(&slice("web", &["10.244.1.5".to_string()]));
    // In the initial list: a Service whose port is a string.
    bed.api.apply_raw("{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"name\":\"bad-list\",\"namespace\":\"app\"},\"spec\":{\"type\":\"ClusterIP\",\"clusterIP\":\"10.96.0.66\",\"ports\":[{\"name\":\"http\",\"port\":\"eighty\",\"protocol\":\"TCP\"}]}}");
    let _daemon = bed.start("kproxy.log", &[]);
    bed.wait_for(
        "the good Service despite a bad one in the list",
        "kproxy.log",
        Duration::from_secs(30),
        |r| r.contains("10.244.1.5"),
    );
    // In a watch event: another bad Service, next to good changes.
    bed.api.apply_raw("{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"name\":\"bad-event\",\"namespace\":\"app\"},\"spec\":{\"type\":\"ClusterIP\",\"clusterIP\":\"10.96.0.67\",\"ports\":[{\"name\":\"http\",\"port\":\"eighty\",\"protocol\":\"TCP\"}]}}");
    bed.api.apply(&service("api", "10.96.0.20"));
    bed.api.apply(&slice("api", &["10.244.2.7".to_string()]));
    bed.wait_for(
        "the good Service after a bad watch event",
        "kproxy.log",
        Duration::from_secs(30),
        |r| r.contains("10.96.0.20") && r.contains("10.244.2.7"),
    );
    let rules = bed.rules();
    assert!(
        !rules.contains("10.96.0.66") && !rules.contains("10.96.0.67"),
        "a malformed Service was rendered"
    );
    let log = bed.log("kproxy.log");
    assert!(
        log.contains("bad-list") && log.contains("bad-event"),
        "the log does not name the malformed Services:\n{log}"
    );
    let m = bed.metrics();
    assert!(
        metric(&m, "kproxy_skipped_objects_total") >= 2.0,
        "the malformed Services are not counted:\n{m}"
    );
}
