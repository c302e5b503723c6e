//! The daemon's command line as kube-proxy's: no subcommand, kube-proxy's flags in
//! pflag syntax, `--version`, `--write-config-to`, `--cleanup`, `--init-only`, and
//! clear exit-2 errors naming the field for bad configuration (nothing touched).

#[path = "support/netns.rs"]
mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netns::{require_root, Netns};

const KUBEADM: &str = include_str!("../testdata/config/kubeadm-config.conf");

fn kproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .output()
        .expect("run kproxy")
}

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kproxy-dropin-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_as_kproxy_and_as_kube_proxy() {
    let o = kproxy(&["--version"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("kproxy") && out.contains("Kubernetes v1.34"),
        "{out}"
    );
    let d = dir("version");
    let kp = d.join("kube-proxy");
    std::fs::copy(env!("CARGO_BIN_EXE_kproxy"), &kp).unwrap();
    let o = Command::new(&kp).arg("--version=true").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Kubernetes v1.34"));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn write_config_to_with_kubeadm_config_and_flags() {
    let d = dir("write");
    let conf = d.join("config.conf");
    std::fs::write(&conf, KUBEADM).unwrap();
    let out = d.join("written.yaml");
    let o = kproxy(&[
        &format!("--config={}", conf.display()),
        "--hostname-override=Node-A",
        &format!("--write-config-to={}", out.display()),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let written = std::fs::read_to_string(&out).unwrap();
    for want in [
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1",
        "kind: KubeProxyConfiguration",
        "hostnameOverride: node-a",
        "syncPeriod: 30s",
        "minSyncPeriod: 1s",
        "healthzBindAddress: 0.0.0.0:10256",
        "metricsBindAddress: 127.0.0.1:10249",
        "oomScoreAdj: -999",
        "maxPerCore: 32768",
        "kubeconfig: /var/lib/kube-proxy/kubeconfig.conf",
        "clusterCIDR: 10.244.0.0/16",
    ] {
        assert!(written.contains(want), "missing {want:?} in:\n{written}");
    }
    // The written file is itself a config kproxy (and kube-proxy) loads unchanged.
    let again = d.join("again.yaml");
    let o = kproxy(&[
        &format!("--config={}", out.display()),
        &format!("--write-config-to={}", again.display()),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), written);

    // Without a file, flags land in the written config (zero min-sync kept).
    let o = kproxy(&[
        "--proxy-mode=nftables",
        "--iptables-min-sync-period=0s",
        "--masquerade-all=true",
        "--feature-gates=LoadBalancerIPMode=false",
        "--ipvs-scheduler=rr",
        &format!("--write-config-to={}", out.display()),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let written = std::fs::read_to_string(&out).unwrap();
    for want in [
        "mode: nftables",
        "minSyncPeriod: 0s",
        "masqueradeAll: true",
        "LoadBalancerIPMode: false",
        "scheduler: rr",
        "- primary",
    ] {
        assert!(written.contains(want), "missing {want:?} in:\n{written}");
    }
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("--ipvs-scheduler") && stderr.contains("no effect"),
        "ignored flags are named once: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// Every upstream flag in one command line is accepted.
#[test]
fn every_upstream_flag_is_accepted() {
    let d = dir("allflags");
    let out = d.join("w.yaml");
    let mut args: Vec<String> = [
        "--bind-address=0.0.0.0",
        "--bind-address-hard-fail=false",
        "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
        "--config-sync-period=15m",
        "--conntrack-max-per-core=0",
        "--conntrack-min=131072",
        "--conntrack-tcp-be-liberal=false",
        "--conntrack-tcp-timeout-close-wait=1h",
        "--conntrack-tcp-timeout-established=24h",
        "--conntrack-udp-timeout=0s",
        "--conntrack-udp-timeout-stream=0s",
        "--detect-local-mode=ClusterCIDR",
        "--feature-gates=LoadBalancerIPMode=true,SidecarContainers=true",
        "--healthz-bind-address=0.0.0.0:10256",
        "--healthz-port=10256",
        "--hostname-override=node-a",
        "--iptables-localhost-nodeports=true",
        "--iptables-masquerade-bit=14",
        "--iptables-min-sync-period=1s",
        "--iptables-sync-period=30s",
        "--ipvs-exclude-cidrs=10.0.0.0/8",
        "--ipvs-min-sync-period=0s",
        "--ipvs-scheduler=rr",
        "--ipvs-strict-arp=false",
        "--ipvs-sync-period=30s",
        "--ipvs-tcp-timeout=0s",
        "--ipvs-tcpfin-timeout=0s",
        "--ipvs-udp-timeout=0s",
        "--kube-api-burst=10",
        "--kube-api-content-type=application/vnd.kubernetes.protobuf",
        "--kube-api-qps=5",
        "--kubeconfig=/var/lib/kube-proxy/kubeconfig.conf",
        "--log-flush-frequency=5s",
        "--log-json-info-buffer-size=0",
        "--log-json-split-stream=false",
        "--log-text-info-buffer-size=0",
        "--log-text-split-stream=false",
        "--logging-format=text",
        "--masquerade-all=false",
        "--master=https://10.0.0.1:6443",
        "--metrics-bind-address=127.0.0.1:10249",
        "--metrics-port=10249",
        "--nodeport-addresses=10.0.0.0/8",
        "--oom-score-adj=-999",
        "--pod-bridge-interface=cbr0",
        "--pod-interface-name-prefix=veth",
        "--profiling=false",
        "--proxy-mode=iptables",
        "--show-hidden-metrics-for-version=1.33",
        "--v=2",
        "--vmodule=proxier=4",
        "--cleanup=false",
        "--init-only=false",
        "--version=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--write-config-to={}", out.display()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = kproxy(&refs);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("scheduler: rr"));
    let _ = std::fs::remove_dir_all(&d);
}

fn expect_usage_error(args: &[&str], want: &[&str]) {
    let o = kproxy(args);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for w in want {
        assert!(err.contains(w), "{args:?}: want {w:?} in {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
}

fn config_file(d: &Path, name: &str, text: &str) -> String {
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    format!("--config={}", p.display())
}

#[test]
fn bad_input_exits_2_naming_the_field() {
    let d = dir("bad");
    let wrong_type = config_file(
        &d,
        "type.conf",
        &KUBEADM.replace("  syncPeriod: 0s\nipvs", "  syncPeriod: 5\nipvs"),
    );
    expect_usage_error(&[&wrong_type], &["iptables.syncPeriod"]);
    let negative = config_file(
        &d,
        "neg.conf",
        &KUBEADM.replace("  syncPeriod: 0s\nipvs", "  syncPeriod: -1s\nipvs"),
    );
    expect_usage_error(&[&negative], &["iptables.syncPeriod"]);
    let bit = config_file(
        &d,
        "bit.conf",
        &KUBEADM.replace("mode: \"\"", "mode: nftables").replace(
            "nftables:\n  masqueradeAll: false\n  masqueradeBit: null",
            "nftables:\n  masqueradeAll: false\n  masqueradeBit: 99",
        ),
    );
    expect_usage_error(&[&bit], &["nftables.masqueradeBit", "99"]);
    let version = config_file(&d, "ver.conf", &KUBEADM.replace("v1alpha1", "v2"));
    expect_usage_error(&[&version], &["kubeproxy.config.k8s.io/v2"]);
    expect_usage_error(&["--frobnicate"], &["unknown flag: --frobnicate"]);
    expect_usage_error(&["--proxy-mode=ipvs"], &["ipvs", "not supported"]);
    expect_usage_error(&["--masquerade-all=maybe"], &["--masquerade-all"]);
    expect_usage_error(
        &["--iptables-sync-period=soon"],
        &["--iptables-sync-period"],
    );
    expect_usage_error(&["stray"], &["does not take any arguments"]);
    expect_usage_error(
        &[
            "--shadow",
            "--proxy-mode=nftables",
            "--nftables-layout=maps",
        ],
        &["--shadow", "--nftables-layout=maps", "kproxy diff"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A refused configuration touches nothing: no rules appear in the namespace.
#[test]
fn bad_config_touches_nothing() {
    if !require_root("bad_config_touches_nothing") {
        return;
    }
    let ns = Netns::new("dropbad");
    let d = dir("touch");
    let bad = config_file(
        &d,
        "bad.conf",
        &KUBEADM.replace("oomScoreAdj: null", "oomScoreAdj: 5000"),
    );
    let (ok, _, err) = ns.exec_status(&[env!("CARGO_BIN_EXE_kproxy"), &bad]);
    assert!(!ok && err.contains("oomScoreAdj"), "{err}");
    let (_, rules, _) = ns.exec_status(&["nft", "list", "ruleset"]);
    assert!(rules.trim().is_empty(), "something was written:\n{rules}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn cleanup_and_init_only() {
    if !require_root("cleanup_and_init_only") {
        return;
    }
    let ns = Netns::new("dropcln");
    let d = dir("cleanup");
    let snap = d.join("snap.yaml");
    std::fs::write(
        &snap,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: app}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, protocol: TCP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: app\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.5]\nports: [{name: http, port: 8080, protocol: TCP}]\n",
    )
    .unwrap();
    let snap = snap.display().to_string();
    for mode in ["iptables", "nftables"] {
        let (ok, _, err) = ns.exec_status(&[
            env!("CARGO_BIN_EXE_kproxy"),
            "apply",
            "--snapshot",
            &snap,
            "--mode",
            mode,
            "--hostname-override",
            "node-a",
        ]);
        assert!(ok, "{mode} apply: {err}");
    }
    let (_, before, _) = ns.exec_status(&["nft", "list", "ruleset"]);
    assert!(before.contains("10.96.0.10"), "{before}");
    let (ok, out, err) = ns.exec_status(&[env!("CARGO_BIN_EXE_kproxy"), "--cleanup"]);
    assert!(ok, "--cleanup: {err}");
    assert!(out.contains("kproxy cleanup"), "one-line summary: {out}");
    let (_, after, _) = ns.exec_status(&["nft", "list", "ruleset"]);
    assert!(
        !after.contains("10.96.0.10")
            && !after.contains("KUBE-SVC")
            && !after.contains("kube-proxy"),
        "--cleanup left rules:\n{after}"
    );
    let (ok, _, err) = ns.exec_status(&[env!("CARGO_BIN_EXE_kproxy"), "--init-only", "-v=2"]);
    assert!(ok, "--init-only: {err}");
    assert!(err.contains("initialization done"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn json_logs_and_no_colour_in_pipes() {
    let d = dir("json");
    let out = d.join("w.yaml");
    let o = kproxy(&[
        "--logging-format=json",
        "--ipvs-scheduler=rr",
        &format!("--write-config-to={}", out.display()),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty(), "expected log lines");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// `--oom-score-adj` reaches the process (raising it needs no capability).
#[test]
fn oom_score_adj_is_applied() {
    if !require_root("oom_score_adj_is_applied") {
        return;
    }
    let ns = Netns::new("dropoom");
    let d = dir("oom");
    let kubeconfig = d.join("kubeconfig");
    // A server nobody answers on: the daemon starts and keeps retrying its watches.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"http://127.0.0.1:9\"}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .unwrap();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_kproxy")])
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args([
            "--oom-score-adj=500",
            "--healthz-bind-address=127.0.0.1:10256",
            "--metrics-bind-address=",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let path = format!("/proc/{}/oom_score_adj", child.id());
    let start = std::time::Instant::now();
    let mut seen = String::new();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        seen = std::fs::read_to_string(&path).unwrap_or_default();
        if seen.trim() == "500" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen.trim(), "500");
    let _ = std::fs::remove_dir_all(&d);
}
