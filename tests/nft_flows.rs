//! Upstream's nftables packet-flow expectations, traced through kproxy's own rendered
//! table (every phase, including those after EndpointSlices are deleted).

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use kproxy::config::Config;
use kproxy::model::{IpFamily, NodeContext};
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::nftables::text::transaction_text;
use kproxy::snapshot;
use kproxy::trace::iptables::Packet;
use kproxy::trace::nftables::Table;
use serde_json::Value;

fn yaml(p: &Path) -> Value {
    serde_yaml_ng::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn upstream_flows_through_our_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables");
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let mut failures = Vec::new();
    let mut flows = 0;
    for dir in dirs.into_iter().filter(|d| d.join("flows.yaml").exists()) {
        let cfg = yaml(&dir.join("config.yaml"));
        let family = if cfg["family"].as_str() == Some("IPv6") {
            IpFamily::V6
        } else {
            IpFamily::V4
        };
        let mut config = Config {
            masquerade_all: cfg["masqueradeAll"].as_bool().unwrap_or(false),
            ..Config::default()
        };
        config.nodeport_addresses = cfg["nodePortAddresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let det = &cfg["localDetector"];
        if det["mode"].as_str().unwrap_or("ClusterCIDR") == "ClusterCIDR" {
            config.cluster_cidrs = det["clusterCIDR"]
                .as_str()
                .and_then(|c| c.parse::<IpNet>().ok())
                .filter(|c| IpFamily::of_net(c) == family)
                .or_else(|| (family == IpFamily::V6).then(|| "fd00:10::/64".parse().unwrap()))
                .into_iter()
                .collect();
        }
        let addrs: Vec<IpNet> = cfg["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["addresses"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect();
        let mut settings = config.family_settings(family, "test-node", None, &addrs);
        settings.node_ip = cfg["nodeIP"].as_str().and_then(|s| s.parse().ok());
        let cidrs: Vec<IpNet> = cfg["serviceCIDRs"]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|c| c.trim().parse().ok())
            .filter(|c: &IpNet| IpFamily::of_net(c) == family)
            .collect();
        let mut state =
            snapshot::load_str(&fs::read_to_string(dir.join("cluster.yaml")).unwrap(), "c")
                .unwrap()
                .state;
        let spec = yaml(&dir.join("flows.yaml"));
        let local: Vec<IpAddr> = spec["tracer"]["localIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        let node = NodeContext {
            name: "test-node".into(),
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
            let mut ps = state.proxy_state(family, &node);
            ps.service_cidrs = cidrs.clone();
            let text = transaction_text(
                &NftRenderer::new(settings.clone())
                    .render(&ps, &RenderOptions::default())
                    .main,
            );
            let table = Table::parse(&text).unwrap();
            for flow in phase["flows"].as_array().into_iter().flatten() {
                flows += 1;
                let pkt = Packet {
                    src: flow["sourceIP"].as_str().unwrap().parse().unwrap(),
                    dst: flow["destIP"].as_str().unwrap().parse().unwrap(),
                    dport: flow["destPort"].as_u64().unwrap() as u16,
                    proto: flow["protocol"].as_str().unwrap_or("TCP").to_lowercase(),
                    from_node: false,
                };
                let t = table.trace(&pkt, &local);
                let want = flow["output"].as_str().unwrap_or_default();
                let masq = flow["masquerade"].as_bool().unwrap_or(false);
                if t.output() != want || t.masquerade != masq {
                    failures.push(format!(
                        "{} [{}] {}: got {:?} masq={} want {want:?} masq={masq}",
                        dir.file_name().unwrap().to_string_lossy(),
                        phase["name"].as_str().unwrap_or_default(),
                        flow["name"].as_str().unwrap_or_default(),
                        t.output(),
                        t.masquerade
                    ));
                }
            }
        }
    }
    assert!(flows >= 50, "only {flows}");
    assert!(
        failures.is_empty(),
        "{} of {flows} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
