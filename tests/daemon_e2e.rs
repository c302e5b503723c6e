//! `kproxy run` end to end, inside a fresh network namespace, against the fake API
//! server: the rules follow creates, scaling and deletes; a watch disconnect during
//! which a Service is deleted and the history compacted (410 Gone -> relist) still
//! converges; health and metrics answer; SIGTERM stops the daemon and keeps the rules.
//! Both modes.

#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use daemon::{http_get, rules, Daemon, KproxyRun};
use fake_apiserver::FakeApi;
use netns::{require_root, Netns};

/// `kproxy run` in `ns` as node-a against the fake API server, health on 10256 and
/// metrics on 10249, minSyncPeriod 0, stderr to `log`.
fn start_kproxy(
    ns: &Netns,
    kubeconfig: &std::path::Path,
    mode: &str,
    cluster_cidr: &str,
    extra: &[&str],
    log: &std::path::Path,
) -> Daemon {
    KproxyRun::new(ns, kubeconfig, mode)
        .cluster_cidr(cluster_cidr)
        .args(extra)
        .log(log)
        .spawn()
}

fn node_yaml() -> &'static str {
    "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\n  labels: {topology.kubernetes.io/zone: zone-a}\nstatus:\n  addresses: [{type: InternalIP, address: 10.99.0.1}]\n"
}

fn service(name: &str, ip: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: app}}\nspec:\n  type: ClusterIP\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n")
}

fn slice(svc: &str, ips: &[&str]) -> String {
    slice_at(svc, ips, None)
}

/// A slice, optionally carrying `endpoints.kubernetes.io/last-change-trigger-time`.
fn slice_at(svc: &str, ips: &[&str], trigger: Option<&str>) -> String {
    let annotations = trigger
        .map(|t| {
            format!(
                "  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{t}\"}}\n"
            )
        })
        .unwrap_or_default();
    let eps: String = ips
        .iter()
        .map(|ip| format!("- addresses: [{ip}]\n  nodeName: node-a\n"))
        .collect();
    let eps = if eps.is_empty() {
        " []\n".to_string()
    } else {
        format!("\n{eps}")
    };
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  namespace: app\n{annotations}  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nendpoints:{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n")
}

fn wait_for(ns: &Netns, mode: &str, what: &str, cond: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let r = rules(ns, mode);
        if cond(&r) {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("{mode}: timed out waiting for {what}; rules now:\n{r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn case(mode: &str) {
    let ns = Netns::new(&format!("dmn{}", &mode[..3]));
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-e2e-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.apply(node_yaml());
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&slice("web", &["10.244.1.5"]));

    let mut daemon = start_kproxy(
        &ns,
        &kubeconfig,
        mode,
        "10.244.0.0/16",
        &["--sync-period", "2s", "-v", "2"],
        &dir.join("kproxy.log"),
    );
    let log_text = || std::fs::read_to_string(dir.join("kproxy.log")).unwrap_or_default();

    // Initial list -> first sync.
    wait_for(&ns, mode, "the first endpoint", |r| {
        r.contains("10.244.1.5")
    });
    // Scale up.
    api.apply(&slice("web", &["10.244.1.5", "10.244.1.6"]));
    wait_for(&ns, mode, "the second endpoint", |r| {
        r.contains("10.244.1.6")
    });
    // A second Service, then a disconnect during which it is deleted and the history
    // compacted: the watcher gets 410 Gone, relists, and the deletion takes effect.
    api.apply(&service("api", "10.96.0.20"));
    api.apply(&slice("api", &["10.244.2.7"]));
    wait_for(&ns, mode, "the second service", |r| {
        r.contains("10.96.0.20")
    });
    // (The deletion and compaction happen first, so no watch can resume in between
    // and miss them without a 410.)
    api.delete("Service", "app", "api", true);
    api.delete("EndpointSlice", "app", "api-1", true);
    api.compact();
    api.disconnect_watches();
    wait_for(&ns, mode, "the deleted service to go", |r| {
        !r.contains("10.96.0.20") && !r.contains("10.244.2.7")
    });
    // Scale to zero: the ClusterIP rejects.
    api.apply(&slice("web", &[]));
    wait_for(&ns, mode, "the endpoints to go", |r| {
        !r.contains("10.244.1.6")
    });
    assert!(
        rules(&ns, mode).contains("10.96.0.10"),
        "the ClusterIP keeps a reject rule\n{}",
        log_text()
    );

    // The API server goes away for a while: the rules stay as they are and the proxy
    // stays healthy (nothing is waiting to be synced); changes flow again once it is back.
    api.set_down(true);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        rules(&ns, mode).contains("10.96.0.10"),
        "rules kept while the API server is down"
    );
    let (code, body) = http_get(&ns, 10256, "/livez");
    assert_eq!(code, 200, "/livez while the API server is down: {body}");
    api.set_down(false);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let trigger = format!("{}", jiff::Timestamp::from_second(now as i64).unwrap());
    api.apply(&slice_at("web", &["10.244.1.8"], Some(&trigger)));
    wait_for(&ns, mode, "a change after the API server came back", |r| {
        r.contains("10.244.1.8")
    });
    api.apply(&slice("web", &[]));
    wait_for(&ns, mode, "the endpoints to go again", |r| {
        !r.contains("10.244.1.8")
    });

    let (code, body) = http_get(&ns, 10256, "/livez");
    assert_eq!(code, 200, "/livez: {body}");
    assert!(body.contains("\"healthy\":true"), "{body}");
    let (code, body) = http_get(&ns, 10256, "/healthz");
    assert_eq!(code, 200, "/healthz: {body}");
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
    let (code, body) = http_get(&ns, 10249, "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}"),
        "{body}"
    );
    assert!(
        body.contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1"
        ),
        "{body}"
    );
    // The trigger-time annotation fed the network-programming latency histogram.
    assert!(
        body.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("kubeproxy_proxy_healthz_total{code=\"200\"}"),
        "{body}"
    );
    assert!(
        body.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total"),
        "{body}"
    );
    if mode == "iptables" {
        let nat_total = body
            .lines()
            .find(|l| {
                l.starts_with("kubeproxy_sync_proxy_rules_iptables_total{")
                    && l.contains("table=\"nat\"")
                    && l.contains("IPv4")
            })
            .unwrap_or_else(|| panic!("no iptables_total for nat\n{body}"));
        let n: f64 = nat_total.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0.0, "{nat_total}");
    }
    let (_, mode_body) = http_get(&ns, 10249, "/proxyMode");
    assert_eq!(mode_body, mode);

    if mode == "iptables" {
        // Someone flushes the tables: the canary chain goes, and the next periodic
        // check (every syncPeriod) rewrites everything.
        let (ok, _, err) = ns.exec_status(&[
            "sh",
            "-c",
            "for t in nat mangle filter; do iptables -t $t -F && iptables -t $t -X; done",
        ]);
        assert!(ok, "{err}");
        assert!(!rules(&ns, mode).contains("10.96.0.10"));
        wait_for(&ns, mode, "the rules to come back after a flush", |r| {
            r.contains("10.96.0.10") && r.contains(":KUBE-PROXY-CANARY")
        });
    }

    if mode == "nftables" {
        // Someone deletes the table: the next periodic check notices and rewrites it.
        let (ok, _, err) = ns.exec_status(&["nft", "delete", "table", "ip", "kube-proxy"]);
        assert!(ok, "{err}");
        wait_for(&ns, mode, "the table to come back after a delete", |r| {
            r.contains("10.96.0.10")
        });
    }

    // SIGTERM: clean exit, rules stay.
    let pid = daemon.0.id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = daemon.0.try_wait() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kproxy did not stop on SIGTERM\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rules(&ns, mode).contains("10.96.0.10"),
        "rules must survive a stop"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn daemon_follows_the_api_server_nftables() {
    if require_root("daemon_follows_the_api_server_nftables") {
        case("nftables");
    }
}

#[test]
fn daemon_follows_the_api_server_iptables() {
    if require_root("daemon_follows_the_api_server_iptables") {
        case("iptables");
    }
}

#[test]
fn failed_restore_is_retried_as_a_full_sync() {
    if !require_root("failed_restore_is_retried_as_a_full_sync") {
        return;
    }
    // An iptables-restore that fails once, then works: the sync is retried, the
    // failure is counted, and the rules arrive whole.
    let ns = Netns::new("dmnfail");
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-e2e-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let marker = dir.join("failed-once");
    let real = Command::new("sh")
        .args(["-c", "command -v iptables-nft-restore"])
        .output()
        .unwrap();
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    assert!(!real.is_empty(), "iptables-nft-restore not installed");
    let script = dir.join("iptables-nft-restore");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then touch {m}; echo 'iptables-restore: line 1 failed' >&2; exit 1; fi\nexec {real} \"$@\"\n",
            m = marker.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    api.apply(node_yaml());
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&slice("web", &["10.244.1.5"]));
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "env",
            &format!("PATH={path}"),
            "KPROXY_IPTABLES_BACKEND=nft",
        ])
        .arg(env!("CARGO_BIN_EXE_kproxy"))
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--proxy-mode",
            "iptables",
            "--hostname-override",
            "node-a",
            "--healthz-bind-address",
            "127.0.0.1:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--min-sync-period",
            "0s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    wait_for(&ns, "iptables", "the rules after a retried restore", |r| {
        r.contains("10.244.1.5")
    });
    assert!(marker.exists(), "the broken restore must have run");
    let (_, body) = http_get(&ns, 10249, "/metrics");
    assert!(
        body.contains(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2"
        ),
        "the failed first sync and its retry are both full syncs (upstream observes every attempt): {body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Rules of one family: `ip`/`ip6` table (nftables) or `iptables-save`/`ip6tables-save`.
fn family_rules(ns: &Netns, mode: &str, v6: bool) -> String {
    let (_, out, _) = match (mode, v6) {
        ("nftables", false) => ns.exec_status(&["nft", "list", "table", "ip", "kube-proxy"]),
        ("nftables", true) => ns.exec_status(&["nft", "list", "table", "ip6", "kube-proxy"]),
        (_, false) => ns.exec_status(&["iptables-save"]),
        (_, true) => ns.exec_status(&["ip6tables-save"]),
    };
    out
}

fn wait_family(ns: &Netns, mode: &str, v6: bool, what: &str, cond: impl Fn(&str) -> bool) {
    let start = Instant::now();
    loop {
        let r = family_rules(ns, mode, v6);
        if cond(&r) {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            panic!("{mode} v6={v6}: timed out waiting for {what}; rules now:\n{r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dual_stack_slice(name: &str, family: &str, ips: &[&str]) -> String {
    let eps: String = ips
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  nodeName: node-a\n"))
        .collect();
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: app\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nendpoints:\n{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n")
}

/// A node with IPv4 and IPv6 addresses runs one dataplane per family (upstream's
/// meta-proxier): a dual-stack Service gets rules in both, each family follows its own
/// EndpointSlices, and /healthz reports both families.
fn dual_stack(mode: &str) {
    let ns = Netns::new(&format!("dual{}", &mode[..3]));
    // (This kernel has no dummy interfaces; a veth pair inside the namespace serves
    // as the node's interface.)
    let setup: [&[&str]; 5] = [
        &[
            "ip", "link", "add", "node0", "type", "veth", "peer", "name", "node0p",
        ],
        &["ip", "addr", "add", "10.99.0.1/24", "dev", "node0"],
        &[
            "ip",
            "addr",
            "add",
            "fd00:99::1/64",
            "dev",
            "node0",
            "nodad",
        ],
        &["ip", "link", "set", "node0", "up"],
        &["ip", "link", "set", "node0p", "up"],
    ];
    for cmd in setup {
        let (ok, _, err) = ns.exec_status(cmd);
        assert!(ok, "{cmd:?}: {err}");
    }
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-dual-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses: [{type: InternalIP, address: 10.99.0.1}, {type: InternalIP, address: \"fd00:99::1\"}]\n");
    api.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: app}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:96::10\"]\n  ports: [{name: http, port: 80, nodePort: 30080, protocol: TCP}]\n");
    api.apply(&dual_stack_slice("web-v4", "IPv4", &["10.244.1.5"]));
    api.apply(&dual_stack_slice("web-v6", "IPv6", &["fd00:244::5"]));

    let _daemon = start_kproxy(
        &ns,
        &kubeconfig,
        mode,
        "10.244.0.0/16,fd00:244::/64",
        &[],
        &dir.join("kproxy.log"),
    );

    wait_family(&ns, mode, false, "the IPv4 endpoint", |r| {
        r.contains("10.244.1.5") && r.contains("10.96.0.10")
    });
    wait_family(&ns, mode, true, "the IPv6 endpoint", |r| {
        r.contains("fd00:244::5") && r.contains("fd00:96::10")
    });
    let v4 = family_rules(&ns, mode, false);
    assert!(!v4.contains("fd00:"), "IPv6 addresses in IPv4 rules:\n{v4}");
    let v6 = family_rules(&ns, mode, true);
    assert!(
        !v6.contains("10.244.1.5"),
        "IPv4 endpoint in IPv6 rules:\n{v6}"
    );
    assert!(v6.contains("30080"), "the NodePort in IPv6 too:\n{v6}");

    // Only the IPv6 slice changes: only the IPv6 rules follow.
    api.apply(&dual_stack_slice("web-v6", "IPv6", &["fd00:244::6"]));
    wait_family(&ns, mode, true, "the new IPv6 endpoint", |r| {
        r.contains("fd00:244::6") && !r.contains("fd00:244::5")
    });
    assert!(family_rules(&ns, mode, false).contains("10.244.1.5"));

    let (code, body) = http_get(&ns, 10256, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"IPv4\"") && body.contains("\"IPv6\""),
        "both families in /healthz: {body}"
    );
    let (_, metrics) = http_get(&ns, 10249, "/metrics");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"}"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dual_stack_nftables() {
    if require_root("dual_stack_nftables") {
        dual_stack("nftables");
    }
}

#[test]
fn dual_stack_iptables() {
    if require_root("dual_stack_iptables") {
        dual_stack("iptables");
    }
}

#[test]
fn bind_failure_is_logged_unless_hard_fail() {
    if !require_root("bind_failure_is_logged_unless_hard_fail") {
        return;
    }
    let ns = Netns::new("dmnbind");
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-e2e-bind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.apply(node_yaml());
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&slice("web", &["10.244.1.5"]));
    // Something else already holds the healthz port (a socket keeps its namespace).
    let _busy = ns.run(|| std::net::TcpListener::bind("127.0.0.1:10256").expect("bind"));

    // Upstream: logged, and the proxy goes on.
    let soft_log = dir.join("soft.log");
    let mut soft = start_kproxy(
        &ns,
        &kubeconfig,
        "nftables",
        "10.244.0.0/16",
        &[],
        &soft_log,
    );
    wait_for(
        &ns,
        "nftables",
        "rules despite the busy healthz port",
        |r| r.contains("10.244.1.5"),
    );
    assert!(
        soft.0.try_wait().unwrap().is_none(),
        "the daemon must keep running"
    );
    let log = std::fs::read_to_string(&soft_log).unwrap_or_default();
    assert!(log.contains("failed to start the healthz server"), "{log}");
    drop(soft);

    // bindAddressHardFail: fatal.
    let hard_log = dir.join("hard.log");
    let mut hard = start_kproxy(
        &ns,
        &kubeconfig,
        "nftables",
        "10.244.0.0/16",
        &["--bind-address-hard-fail"],
        &hard_log,
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = hard.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "hard fail did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(&hard_log).unwrap_or_default();
    assert!(log.contains("healthz server on 127.0.0.1:10256"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
