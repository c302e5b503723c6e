//! Daemon benchmark (root): `kproxy run` (nftables mode, minSyncPeriod 0) holding N
//! Services × 10 endpoints served by the fake API server, in a fresh network namespace.
//! Reports the daemon's resident memory after the first sync and the time from an
//! EndpointSlice change at the API server to the new endpoint's chain being in the
//! kernel (20 changes, p50 / max).
//! Run: `cargo bench --bench daemon` (SIZES=1000,10000 to choose sizes).

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "../tests/support/netns.rs"]
mod netns;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

fn slice(i: usize, first: u8) -> String {
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
    format!(
        "{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\"metadata\":{{\"name\":\"svc{i}-1\",\"namespace\":\"ns{}\",\"labels\":{{\"kubernetes.io/service-name\":\"svc{i}\"}}}},\"addressType\":\"IPv4\",\"endpoints\":[{}],\"ports\":[{{\"name\":\"http\",\"port\":8080,\"protocol\":\"TCP\"}}]}}",
        i % 50,
        eps.join(",")
    )
}

fn chain_of(i: usize, first: u8) -> String {
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
    format!("endpoint-{}", endpoint_base(&spn, &ep))
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
fn wait_chain(ns: &Netns, chain: &str, limit: Duration) -> Duration {
    let chain = chain.to_string();
    ns.run(move || {
        let mut nl = kproxy::nftables::netlink::Netlink::open().unwrap();
        let t = Instant::now();
        loop {
            if nl
                .chain_exists(
                    kproxy::nftables::transaction::Family::Ip,
                    "kube-proxy",
                    &chain,
                )
                .unwrap_or(false)
            {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "chain {chain} never appeared");
            std::thread::sleep(Duration::from_micros(500));
        }
    })
}

fn main() {
    if !netns::require_root("daemon bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("| services × endpoints | first sync after start | daemon RSS | change -> applied p50 / max (20 changes) |");
    println!("|---|---|---|---|");
    for n in sizes {
        let ns = Netns::new("bdmn");
        let api = ns.run(FakeApi::start);
        api.apply("{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"node-1\"},\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"10.99.0.1\"}]}}");
        for i in 0..n {
            api.apply(&service(i));
            api.apply(&slice(i, 1));
        }
        let dir = std::env::temp_dir().join(format!("kproxy-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = dir.join("kubeconfig");
        std::fs::write(&kc, api.kubeconfig()).unwrap();
        let start = Instant::now();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_kproxy"),
                "run",
            ])
            .arg("--kubeconfig")
            .arg(&kc)
            .args([
                "--proxy-mode",
                "nftables",
                "--hostname-override",
                "node-1",
                "--cluster-cidr",
                "10.128.0.0/10",
                "--min-sync-period",
                "0s",
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let last = chain_of(n - 1, 1);
        wait_chain(&ns, &last, Duration::from_secs(600));
        let first_sync = start.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        let rss = rss_kib(child.id());
        let mut lat = Vec::new();
        for k in 0..20usize {
            let i = (k * 37) % n;
            let ip = 2 + k as u8;
            let want = chain_of(i, ip);
            let t = Instant::now();
            api.apply(&slice(i, ip));
            wait_chain(&ns, &want, Duration::from_secs(30));
            lat.push(t.elapsed());
            // Let the follow-up sync that deletes flushed chains pass.
            std::thread::sleep(Duration::from_millis(1300));
        }
        lat.sort();
        println!(
            "| {n} × 10 | {:.1} s | {:.0} MiB | {:.0} ms / {:.0} ms |",
            first_sync.as_secs_f64(),
            rss as f64 / 1024.0,
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3
        );
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
