//! The nftables tracer against upstream's packet-flow expectations, run over the research
//! model's rulesets (`derived.nft`) of the nftables vectors: this checks the tracer
//! itself; `nft_flows` checks kproxy's own rulesets the same way.

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use kproxy::trace::iptables::Packet;
use kproxy::trace::nftables::Table;
use serde_json::Value;

fn yaml(path: &Path) -> Value {
    serde_yaml_ng::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn tracer_reproduces_upstream_flows_on_derived_rulesets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/upstream/nftables");
    let mut failures = Vec::new();
    let mut flows = 0;
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let (Ok(text), true) = (
            fs::read_to_string(dir.join("derived.nft")),
            dir.join("flows.yaml").exists(),
        ) else {
            continue;
        };
        let table = Table::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let spec = yaml(&dir.join("flows.yaml"));
        let local: Vec<IpAddr> = spec["tracer"]["localIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        for phase in spec["phases"].as_array().into_iter().flatten() {
            // derived.nft holds the initial state only.
            if phase.get("deleteEndpointSlices").is_some() {
                continue;
            }
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
                        "{} {}: got {:?} masq={} want {want:?} masq={masq}\n  {:#?}",
                        dir.file_name().unwrap().to_string_lossy(),
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
        }
    }
    assert!(flows >= 40, "only {flows} flows");
    assert!(
        failures.is_empty(),
        "{} of {flows} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
