//! Every kustomize overlay in deploy/overlays renders (`kubectl kustomize`, or a
//! standalone `kustomize`), parses, and carries the fields a safe kube-proxy
//! replacement needs. Needs kubectl or kustomize on PATH: skipped without them, a
//! failure under CI.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Renders one overlay; `None` when no kustomize is installed (outside CI).
fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = root().join("deploy/overlays").join(overlay);
    let tools: [(&str, &[&str]); 2] = [("kubectl", &["kustomize"]), ("kustomize", &["build"])];
    for (tool, args) in tools {
        let Ok(out) = Command::new(tool).args(args).arg(&dir).output() else {
            continue;
        };
        assert!(
            out.status.success(),
            "{tool} {args:?} {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect();
        return Some(docs);
    }
    if std::env::var_os("CI").is_some() {
        panic!("neither kubectl nor kustomize on PATH: CI must render the manifests");
    }
    eprintln!("manifests: skipped (no kubectl or kustomize)");
    None
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let all = find(docs, kind);
    assert_eq!(all.len(), 1, "one {kind} expected, got {}", all.len());
    all[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// What every overlay must hold; returns the DaemonSet's main container.
fn common(overlay: &str, docs: &[Value]) -> Value {
    let ds = one(docs, "DaemonSet");
    assert_eq!(ds["metadata"]["namespace"], "kube-system", "{overlay}");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true, "{overlay}");
    let prio = spec["priorityClassName"].as_str().unwrap();
    assert!(
        prio.starts_with("system-") && prio.ends_with("-critical"),
        "{overlay}: {prio}"
    );
    let tolerations = spec["tolerations"].as_array().unwrap();
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists"
            && t.get("key").is_none()
            && t.get("effect").is_none()),
        "{overlay}: must tolerate every taint"
    );
    let host_paths: Vec<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert!(host_paths.contains(&"/run/xtables.lock"), "{overlay}");
    assert!(host_paths.contains(&"/lib/modules"), "{overlay}");

    let c = spec["containers"][0].clone();
    let image = c["image"].as_str().unwrap();
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    assert!(
        !tag.is_empty() && tag != "latest",
        "{overlay}: image {image} needs a fixed tag"
    );
    let sc = &c["securityContext"];
    assert_eq!(
        sc["privileged"], false,
        "{overlay}: capabilities, not privileged"
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{overlay}");
    let caps = strings(&sc["capabilities"]["add"]);
    assert!(
        caps.contains(&"NET_ADMIN".into()) && caps.contains(&"NET_RAW".into()),
        "{overlay}"
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"], "/healthz",
        "{overlay}"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez", "{overlay}");
    assert!(c["resources"]["limits"]["memory"].is_string(), "{overlay}");
    assert!(
        c["resources"]["requests"]["memory"].is_string(),
        "{overlay}"
    );
    let cmd = strings(&c["command"]);
    // No subcommand: the daemon with kube-proxy's command line.
    assert_eq!(cmd[0], "/usr/local/bin/kproxy", "{overlay}");
    assert!(cmd[1].starts_with("--"), "{overlay}: {cmd:?}");
    assert!(
        cmd.iter().any(|a| a.starts_with("--kubeconfig=")),
        "{overlay}"
    );
    assert!(
        cmd.iter().any(|a| a == "--hostname-override=$(NODE_NAME)"),
        "{overlay}"
    );

    // Least privilege: read-only verbs on exactly what kproxy watches.
    let role = one(docs, "ClusterRole");
    for rule in role["rules"].as_array().unwrap() {
        for verb in strings(&rule["verbs"]) {
            assert!(verb == "list" || verb == "watch", "{overlay}: verb {verb}");
        }
        for r in strings(&rule["resources"]) {
            assert!(
                ["services", "nodes", "endpointslices", "servicecidrs"].contains(&r.as_str()),
                "{overlay}: resource {r}"
            );
        }
    }
    let binding = one(docs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"]["name"], role["metadata"]["name"],
        "{overlay}"
    );
    let sa = one(docs, "ServiceAccount");
    assert_eq!(
        binding["subjects"][0]["name"], sa["metadata"]["name"],
        "{overlay}"
    );
    assert_eq!(
        spec["serviceAccountName"], sa["metadata"]["name"],
        "{overlay}"
    );
    c
}

/// Our ConfigMaps: the configuration kproxy accepts, and a kubeconfig that does not go
/// through the `kubernetes` Service.
fn own_config(overlay: &str, docs: &[Value]) -> kproxy::config::Config {
    let cms = find(docs, "ConfigMap");
    let config = cms
        .iter()
        .find_map(|c| c["data"]["config.conf"].as_str())
        .unwrap_or_else(|| panic!("{overlay}: no config.conf"));
    let cfg = kproxy::config::Config::from_yaml(config, overlay)
        .unwrap_or_else(|e| panic!("{overlay}: kproxy refuses its own config: {e}"));
    let kubeconfig = cms
        .iter()
        .find_map(|c| c["data"]["kubeconfig.conf"].as_str())
        .unwrap_or_else(|| panic!("{overlay}: no kubeconfig.conf"));
    let kc: Value = serde_yaml_ng::from_str(kubeconfig).unwrap();
    let server = kc["clusters"][0]["cluster"]["server"].as_str().unwrap();
    for bad in ["kubernetes.default", "10.96.0.1", "//kubernetes"] {
        assert!(
            !server.contains(bad),
            "{overlay}: {server} goes through the Service"
        );
    }
    assert!(server.starts_with("https://"), "{overlay}: {server}");
    assert!(kc["users"][0]["user"]["tokenFile"].is_string(), "{overlay}");
    cfg
}

#[test]
fn iptables_overlay() {
    let Some(docs) = render("iptables") else {
        return;
    };
    let c = common("iptables", &docs);
    let cfg = own_config("iptables", &docs);
    assert_eq!(cfg.mode, kproxy::config::Mode::Iptables);
    assert!(!strings(&c["command"]).contains(&"--shadow".to_string()));
    // The sysctls: upstream's --init-only, in the one privileged (init) container.
    let ds = one(&docs, "DaemonSet");
    let init = &ds["spec"]["template"]["spec"]["initContainers"][0];
    assert!(strings(&init["command"]).contains(&"--init-only".to_string()));
    assert_eq!(init["securityContext"]["privileged"], true);
}

#[test]
fn nftables_overlay() {
    let Some(docs) = render("nftables") else {
        return;
    };
    common("nftables", &docs);
    let cfg = own_config("nftables", &docs);
    assert_eq!(cfg.mode, kproxy::config::Mode::Nftables);
    assert_eq!(cfg.healthz_bind_address.unwrap().port(), 10256);
}

fn assert_shadow(overlay: &str, docs: &[Value], c: &Value) {
    assert!(
        strings(&c["command"]).contains(&"--shadow".to_string()),
        "{overlay}"
    );
    let caps = strings(&c["securityContext"]["capabilities"]["add"]);
    assert!(
        caps.contains(&"SYS_ADMIN".into()),
        "{overlay}: scratch netns needs SYS_ADMIN"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], 10266, "{overlay}: {probe}");
    }
    let ds = one(docs, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "kproxy-shadow", "{overlay}");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["k8s-app"], "kproxy-shadow",
        "{overlay}"
    );
    // Nothing privileged: the shadow changes no sysctls.
    assert!(
        ds["spec"]["template"]["spec"]["initContainers"].is_null(),
        "{overlay}"
    );
}

#[test]
fn shadow_overlay() {
    let Some(docs) = render("shadow") else { return };
    let c = common("shadow", &docs);
    own_config("shadow", &docs);
    assert_shadow("shadow", &docs, &c);
}

fn assert_kubeadm(overlay: &str, docs: &[Value], c: &Value) {
    assert!(
        find(docs, "ConfigMap").is_empty(),
        "{overlay}: kubeadm's ConfigMap is reused"
    );
    let ds = one(docs, "DaemonSet");
    let cms: Vec<&str> = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["configMap"]["name"].as_str())
        .collect();
    assert_eq!(cms, ["kube-proxy", "kube-proxy"], "{overlay}");
    let cmd = strings(&c["command"]);
    // kubeadm's ConfigMap keys.
    assert!(cmd
        .iter()
        .any(|a| a.ends_with("/config.conf") && a.starts_with("--config=")));
    assert!(cmd.iter().any(|a| a.ends_with("/kubeconfig.conf")));
}

#[test]
fn kubeadm_overlay() {
    let Some(docs) = render("kubeadm") else {
        return;
    };
    let c = common("kubeadm", &docs);
    assert_kubeadm("kubeadm", &docs, &c);
    assert!(!strings(&c["command"]).contains(&"--shadow".to_string()));
}

#[test]
fn kubeadm_shadow_overlay() {
    let Some(docs) = render("kubeadm-shadow") else {
        return;
    };
    let c = common("kubeadm-shadow", &docs);
    assert_kubeadm("kubeadm-shadow", &docs, &c);
    assert_shadow("kubeadm-shadow", &docs, &c);
}

#[test]
fn every_overlay_is_tested() {
    let mut found: Vec<String> = std::fs::read_dir(root().join("deploy/overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "iptables",
            "kubeadm",
            "kubeadm-shadow",
            "nftables",
            "shadow"
        ]
    );
}

/// The `config.conf` of the `kube-proxy` ConfigMap that `kubeadm init` writes (zero
/// values where the operator set nothing), which overlays/kubeadm feeds to kproxy.
const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForProxy: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

#[test]
fn kubeadm_kube_proxy_config_is_accepted() {
    let cfg = kproxy::config::Config::from_yaml(KUBEADM_CONFIG, "kubeadm")
        .unwrap_or_else(|e| panic!("kubeadm's kube-proxy config refused: {e}"));
    // Zero values take upstream's defaults.
    assert_eq!(cfg.sync_period, std::time::Duration::from_secs(30));
    assert_eq!(cfg.healthz_bind_address.unwrap().port(), 10256);
    assert_eq!(cfg.cluster_cidrs.len(), 1);
}
