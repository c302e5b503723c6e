//! Loading upstream's test vectors for both modes (testdata/upstream/iptables and
//! testdata/upstream/nftables: each mode's vectors describe upstream's fake proxier in
//! their own config format), and the nftables flow checker.
// Each including crate uses a different part, through a private module.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use kproxy::config::{Config, FamilySettings};
use kproxy::model::{ClusterState, IpFamily, NodeContext};
use kproxy::snapshot;
use kproxy::trace::iptables::Packet;
use kproxy::trace::nftables::Table;
use serde_json::Value;

pub fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/iptables")
}

pub fn yaml(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

pub fn b(v: &Value, key: &str, default: bool) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// The fake proxier of upstream's tests, from a vector's config.yaml.
pub fn settings_for(cfg: &Value) -> FamilySettings {
    let family = match s(cfg, "ip_family") {
        Some("IPv6") => IpFamily::V6,
        _ => IpFamily::V4,
    };
    let mut config = Config {
        masquerade_all: b(cfg, "masquerade_all", false),
        localhost_nodeports: b(cfg, "localhost_nodeports", true),
        ..Config::default()
    };
    if let Some(bit) = cfg.get("masquerade_bit").and_then(Value::as_u64) {
        config.masquerade_bit = bit as u32;
    }
    if let Some(list) = cfg.get("nodeport_addresses").and_then(Value::as_array) {
        config.nodeport_addresses = list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
    }
    let detector = cfg.get("local_traffic_detector");
    let cidr = detector
        .and_then(|d| s(d, "cluster_cidr"))
        .and_then(|c| c.parse::<IpNet>().ok());
    let mode = detector.and_then(|d| s(d, "mode")).unwrap_or("ClusterCIDR");
    if mode == "ClusterCIDR" {
        // Upstream's IPv6 fake proxier detects pods by fd00:10::/64.
        let cidr = match (cidr, family) {
            (Some(c), f) if IpFamily::of_net(&c) == f => Some(c),
            (_, IpFamily::V6) => Some("fd00:10::/64".parse().unwrap()),
            (c, _) => c,
        };
        config.cluster_cidrs = cidr.into_iter().collect();
    } else {
        config.cluster_cidrs.clear();
    }
    let mut addrs: Vec<IpNet> = Vec::new();
    if let Some(ifaces) = cfg.get("host_interfaces").and_then(Value::as_object) {
        for list in ifaces.values() {
            for a in list.as_array().into_iter().flatten() {
                if let Some(n) = a.as_str().and_then(|a| a.parse().ok()) {
                    addrs.push(n);
                }
            }
        }
    }
    let node_name = s(cfg, "node_name").unwrap_or("test-node");
    let mut fs = config.family_settings(family, node_name, None, &addrs);
    fs.node_ip = s(cfg, "node_ip").and_then(|ip| ip.parse().ok());
    fs.mark_text = s(cfg, "masquerade_mark").unwrap_or("0x4000").to_string();
    let nfacct = cfg.get("nfacct_counters");
    fs.nfacct_invalid = nfacct
        .map(|n| b(n, "ct_state_invalid_dropped_pkts", false))
        .unwrap_or(true);
    fs.nfacct_localhost = nfacct
        .map(|n| b(n, "localhost_nps_accepted_pkts", false))
        .unwrap_or(true);
    fs.tcp_be_liberal = b(cfg, "conntrack_tcp_be_liberal", false);
    fs.random_fully = b(cfg, "iptables_has_random_fully", false);
    fs
}

pub fn state_for(dir: &Path, cfg: &Value) -> (ClusterState, NodeContext) {
    let text = fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let snap = snapshot::load_str(&text, "cluster.yaml").unwrap();
    assert!(
        snap.skipped.is_empty(),
        "{}: skipped objects {:?}",
        dir.display(),
        snap.skipped
    );
    let mut state = snap.state;
    let gates = cfg.get("feature_gates");
    if let Some(g) = gates
        .and_then(|g| g.get("LoadBalancerIPMode"))
        .and_then(Value::as_bool)
    {
        state.set_lb_ip_mode_gate(g);
    }
    let node = NodeContext {
        name: s(cfg, "node_name").unwrap_or("test-node").to_string(),
        zone: None,
        prefer_same_node: true,
    };
    (state, node)
}

pub fn vector_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(vectors_dir())
        .expect("testdata/upstream/iptables exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("config.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Upstream's nftables vectors.
pub fn nft_vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables")
}

/// Every nftables vector directory (those with a config.yaml), sorted.
pub fn nft_vector_dirs() -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = fs::read_dir(nft_vectors_dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("config.yaml").exists())
        .collect();
    d.sort();
    d
}

/// Upstream's nftables fake proxier, from a vector's config.yaml.
pub fn nft_settings(cfg: &Value) -> (FamilySettings, Vec<IpNet>) {
    let family = if cfg["family"].as_str() == Some("IPv6") {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let mut config = Config {
        masquerade_all: cfg["masqueradeAll"].as_bool().unwrap_or(false),
        ..Config::default()
    };
    if let Some(b) = cfg["masqueradeBit"].as_u64() {
        config.masquerade_bit = b as u32;
    }
    config.nodeport_addresses = cfg["nodePortAddresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let det = &cfg["localDetector"];
    if det["mode"].as_str().unwrap_or("ClusterCIDR") == "ClusterCIDR" {
        let field = if family == IpFamily::V6 {
            "clusterCIDRv6"
        } else {
            "clusterCIDR"
        };
        let cidr = det[field]
            .as_str()
            .or_else(|| det["clusterCIDR"].as_str())
            .and_then(|c| c.parse::<IpNet>().ok())
            .filter(|c| IpFamily::of_net(c) == family)
            .or_else(|| (family == IpFamily::V6).then(|| "fd00:10::/64".parse().unwrap()));
        config.cluster_cidrs = cidr.into_iter().collect();
    }
    let mut addrs = Vec::new();
    for iface in cfg["interfaces"].as_array().into_iter().flatten() {
        for a in iface["addresses"].as_array().into_iter().flatten() {
            if let Some(n) = a.as_str().and_then(|a| a.parse().ok()) {
                addrs.push(n);
            }
        }
    }
    let node_name = cfg["nodeName"].as_str().unwrap_or("test-node");
    let mut fs = config.family_settings(family, node_name, None, &addrs);
    fs.node_ip = cfg["nodeIP"]
        .as_str()
        .and_then(|s| s.parse::<IpAddr>().ok());
    let cidrs = cfg["serviceCIDRs"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .filter_map(|c| c.trim().parse::<IpNet>().ok())
        .filter(|c| IpFamily::of_net(c) == family)
        .collect();
    (fs, cidrs)
}

/// The tracer's local addresses of an nftables flows.yaml.
pub fn nft_local_ips(spec: &Value) -> Vec<IpAddr> {
    spec["tracer"]["localIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str()?.parse().ok())
        .collect()
}

/// Traces every flow of one flows.yaml phase through `table`; records each flow whose
/// output or masquerade decision differs from upstream's in `failures`. Returns the
/// number of flows checked.
pub fn nft_check_flows(
    dir: &Path,
    phase: &Value,
    table: &Table,
    local: &[IpAddr],
    failures: &mut Vec<String>,
) -> usize {
    let mut flows = 0;
    for flow in phase["flows"].as_array().into_iter().flatten() {
        flows += 1;
        let pkt = Packet {
            src: flow["sourceIP"].as_str().unwrap().parse().unwrap(),
            dst: flow["destIP"].as_str().unwrap().parse().unwrap(),
            dport: flow["destPort"].as_u64().unwrap() as u16,
            proto: flow["protocol"].as_str().unwrap_or("TCP").to_lowercase(),
            from_node: false,
        };
        let t = table.trace(&pkt, local);
        let want = flow["output"].as_str().unwrap_or_default();
        let masq = flow["masquerade"].as_bool().unwrap_or(false);
        if t.output() != want || t.masquerade != masq {
            failures.push(format!(
                "{} [{}] {}: got {:?} masq={} want {want:?} masq={masq}\n  {:#?}",
                dir.file_name().unwrap().to_string_lossy(),
                phase["name"].as_str().unwrap_or_default(),
                flow["name"].as_str().unwrap_or_default(),
                t.output(),
                t.masquerade,
                t.steps
                    .iter()
                    .map(|s| format!("{}: {}", s.chain, s.rule))
                    .collect::<Vec<_>>()
            ));
        }
    }
    flows
}

/// Every nftables vector with flows, phase by phase: calls `f` with the vector's
/// directory, its renderer settings, the proxy state after the phase's EndpointSlice
/// deletions (with the vector's ServiceCIDRs), the phase, and the tracer's local IPs.
pub fn for_each_nft_flow_phase(
    mut f: impl FnMut(&Path, &FamilySettings, &kproxy::model::ProxyState, &Value, &[IpAddr]),
) {
    for dir in nft_vector_dirs()
        .into_iter()
        .filter(|d| d.join("flows.yaml").exists())
    {
        let cfg = yaml(&dir.join("config.yaml"));
        let (settings, cidrs) = nft_settings(&cfg);
        let mut state =
            snapshot::load_str(&fs::read_to_string(dir.join("cluster.yaml")).unwrap(), "c")
                .unwrap()
                .state;
        let spec = yaml(&dir.join("flows.yaml"));
        let local = nft_local_ips(&spec);
        let node = NodeContext {
            name: settings.node_name.clone(),
            zone: None,
            prefer_same_node: true,
        };
        for phase in spec["phases"].as_array().into_iter().flatten() {
            for d in phase["deleteEndpointSlices"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let (ns, name) = match d {
                    Value::String(s) => {
                        let (ns, n) = s.split_once('/').unwrap();
                        (ns.to_string(), n.to_string())
                    }
                    _ => (
                        d["namespace"].as_str().unwrap().to_string(),
                        d["name"].as_str().unwrap().to_string(),
                    ),
                };
                assert!(
                    state.remove_slice(&ns, &name),
                    "{}: no slice {ns}/{name}",
                    dir.display()
                );
            }
            let mut ps = state.proxy_state(settings.family, &node);
            ps.service_cidrs = cidrs.clone();
            f(&dir, &settings, &ps, phase, &local);
        }
    }
}
