//! `kproxy run --shadow` end to end against the fake API server, in a fresh network
//! namespace (root; mandatory under CI), both modes: rules written by `kproxy apply`
//! stand in for kube-proxy's; the shadow reports 0 differences; a change at the API
//! server that the rules do not follow shows in the metric and on /debug/diff; the
//! shadow never writes the rules and leaves kube-proxy's ports alone.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_apiserver::FakeApi;
use netns::{require_root, Netns};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-a\nstatus:\n  addresses: [{type: InternalIP, address: 10.99.0.1}]\n";

fn service() -> String {
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: app}\nspec:\n  type: ClusterIP\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, protocol: TCP}]\n".to_string()
}

fn slice(ips: &[&str]) -> String {
    let eps: String = ips
        .iter()
        .map(|ip| format!("- addresses: [{ip}]\n  nodeName: node-a\n"))
        .collect();
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: app\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n{eps}ports: [{{name: http, port: 8080, protocol: TCP}}]\n")
}

/// The rules as they stand, without the dump's timestamp comment.
fn rules(ns: &Netns, mode: &str) -> String {
    let (_, out, _) = if mode == "nftables" {
        ns.exec_status(&["nft", "list", "ruleset"])
    } else {
        ns.exec_status(&["iptables-save"])
    };
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn http_get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Some((status, body))
    })
}

fn metric(ns: &Netns, series: &str) -> Option<String> {
    let (_, body) = http_get(ns, 10269, "/metrics")?;
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

fn wait_for_diff(
    ns: &Netns,
    what: &str,
    log: &std::path::Path,
    cond: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        if let Some((200, body)) = http_get(ns, 10269, "/debug/diff") {
            if cond(&body) {
                return body;
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            panic!(
                "timed out waiting for {what}; /debug/diff: {:?}\nlog:\n{}",
                http_get(ns, 10269, "/debug/diff"),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn case(mode: &str) {
    let ns = Netns::new(&format!("shd{}", &mode[..3]));
    let api = ns.run(FakeApi::start);
    let dir = std::env::temp_dir().join(format!("kproxy-shadow-{}-{mode}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let two = ["10.244.1.5", "10.244.1.6"];
    api.apply(NODE);
    api.apply(&service());
    api.apply(&slice(&two));

    // "kube-proxy": the same cluster's rules written once.
    let snapshot = dir.join("cluster.yaml");
    std::fs::write(
        &snapshot,
        format!("{NODE}---\n{}---\n{}", service(), slice(&two)),
    )
    .unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_kproxy"),
            "apply",
        ])
        .args(["--mode", mode, "--hostname-override", "node-a"])
        .args(["--cluster-cidr", "10.244.0.0/16", "--snapshot"])
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = rules(&ns, mode);
    assert!(before.contains("10.244.1.6"), "{before}");

    let log = dir.join("shadow.log");
    let _daemon = Daemon(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_kproxy"),
                "run",
                "--shadow",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--proxy-mode", mode, "--hostname-override", "node-a"])
            .args(["--cluster-cidr", "10.244.0.0/16", "--min-sync-period", "0s"])
            .args(["--metrics-bind-address", "127.0.0.1:10269", "-v", "2"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let same = wait_for_diff(&ns, "the first comparison", &log, |b| b.contains("same: "));
    assert!(!same.contains("different"), "{same}");
    let series = format!("kproxy_shadow_differences{{mode=\"{mode}\"}}");
    assert_eq!(metric(&ns, &series).as_deref(), Some("0"));
    // The shadow's health port is its own; kube-proxy's stays free.
    assert_eq!(http_get(&ns, 10266, "/livez").map(|r| r.0), Some(200));
    assert!(
        http_get(&ns, 10256, "/livez").is_none(),
        "the shadow bound 10256"
    );

    // The Service scales at the API server; the "kube-proxy" rules do not follow.
    api.apply(&slice(&["10.244.1.5", "10.244.1.6", "10.244.1.7"]));
    let diff = wait_for_diff(&ns, "the difference", &log, |b| b.contains("different: "));
    assert!(diff.contains("app/web:http"), "{diff}");
    assert!(diff.contains("10.244.1.7"), "{diff}");
    let n: usize = metric(&ns, &series).unwrap().parse().unwrap();
    assert!(n > 0, "{series} = {n}");

    assert_eq!(rules(&ns, mode), before, "the shadow changed the rules");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("shadow: different"),
        "the difference is logged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shadow_iptables() {
    if !require_root("shadow_iptables") {
        return;
    }
    case("iptables");
}

#[test]
fn shadow_nftables() {
    if !require_root("shadow_nftables") {
        return;
    }
    case("nftables");
}
