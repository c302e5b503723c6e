//! The upstream flow vectors traced over rules *read back from the kernel*: each
//! vector's rules are applied in a fresh network namespace (nftables over netlink as
//! the daemon does, iptables with iptables-restore), then read back with `nft list
//! table`, `nft -j list table`, `iptables-save` and `kproxy trace --live`; every flow
//! must get upstream's answer (endpoints, verdict, masquerade) from each of them.

#[path = "support/netns.rs"]
mod netns;
#[path = "support/vectors.rs"]
mod vectors;

use std::net::IpAddr;

use kproxy::iptables::render::{RenderOptions as IptOptions, Renderer};
use kproxy::model::IpFamily;
use kproxy::nftables::netlink::Netlink;
use kproxy::nftables::render::{NftRenderer, RenderOptions};
use kproxy::trace::core::Packet;
use kproxy::trace::iptables::Ruleset;
use kproxy::trace::nftables::Table;
use netns::{require_root, Netns};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kproxy");

/// `kproxy trace --live -o json` inside the namespace: the result object.
fn live_result(ns: &Netns, mode: &str, pkt: &Packet, local: &[IpAddr]) -> Value {
    let (src, dst, dport) = (
        pkt.src.to_string(),
        pkt.dst.to_string(),
        pkt.dport.to_string(),
    );
    let mut args = vec![
        BIN, "trace", "--live", "--mode", mode, "--src", &src, "--dst", &dst, "--dport", &dport,
        "--proto", &pkt.proto, "-o", "json",
    ];
    let locals: Vec<String> = local.iter().map(|l| l.to_string()).collect();
    for l in &locals {
        args.push("--local-address");
        args.push(l);
    }
    let (ok, out, err) = ns.exec_status(&args);
    assert!(ok, "kproxy trace --live: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["result"].clone()
}

#[test]
fn nft_flows_over_kernel_read_back() {
    if !require_root("nft_flows_over_kernel_read_back") {
        return;
    }
    let mut failures = Vec::new();
    let mut flows = 0;
    let ns = Netns::new("trace-nft");
    vectors::for_each_nft_flow_phase(|dir, settings, ps, phase, local| {
        let fam = if settings.family == IpFamily::V6 {
            "ip6"
        } else {
            "ip"
        };
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        {
            let tx = NftRenderer::new(settings.clone())
                .render(ps, &RenderOptions::default())
                .main;
            let _ = ns.exec_status(&["nft", "delete", "table", fam, "kube-proxy"]);
            ns.run(move || Netlink::open().unwrap().apply(&tx).unwrap());
            let (ok, listing, err) = ns.exec_status(&["nft", "list", "table", fam, "kube-proxy"]);
            assert!(ok, "{err}");
            let (ok, json, err) =
                ns.exec_status(&["nft", "-j", "list", "table", fam, "kube-proxy"]);
            assert!(ok, "{err}");
            let from_listing = Table::parse(&listing).unwrap_or_else(|e| panic!("{name}: {e}"));
            let from_json = Table::parse(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
            for flow in phase["flows"].as_array().into_iter().flatten() {
                flows += 1;
                let pkt = Packet {
                    src: flow["sourceIP"].as_str().unwrap().parse().unwrap(),
                    dst: flow["destIP"].as_str().unwrap().parse().unwrap(),
                    dport: flow["destPort"].as_u64().unwrap() as u16,
                    proto: flow["protocol"].as_str().unwrap_or("TCP").to_lowercase(),
                    from_node: false,
                };
                let want = flow["output"].as_str().unwrap_or_default();
                let masq = flow["masquerade"].as_bool().unwrap_or(false);
                let fname = flow["name"].as_str().unwrap_or_default();
                let mut outcomes = Vec::new();
                for (how, table) in [("nft list", &from_listing), ("nft -j", &from_json)] {
                    let t = table.trace(&pkt, local);
                    if t.output() != want || t.masquerade != masq {
                        failures.push(format!(
                            "{name} {fname} ({how}): got {:?} masq={} want {want:?} masq={masq}",
                            t.output(),
                            t.masquerade
                        ));
                    }
                    outcomes.push(serde_json::to_value(t.outcome()).unwrap());
                }
                if !pkt.dst.is_loopback() && !pkt.src.is_loopback() {
                    let live = live_result(&ns, "nftables", &pkt, local);
                    if live != outcomes[0] {
                        failures.push(format!(
                            "{name} {fname} (--live): {live} != {}",
                            outcomes[0]
                        ));
                    }
                }
            }
        }
    });
    assert!(flows >= 50, "only {flows}");
    assert!(
        failures.is_empty(),
        "{} of {flows} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn iptables_flows_over_kernel_read_back() {
    if !require_root("iptables_flows_over_kernel_read_back") {
        return;
    }
    let ns = Netns::new("trace-ipt");
    let mut failures = Vec::new();
    let mut flows = 0;
    for dir in vectors::vector_dirs() {
        if !dir.join("flows.yaml").exists() || dir.join("input-rules.iptables").exists() {
            continue;
        }
        let spec = vectors::yaml(&dir.join("flows.yaml"));
        let local: Vec<IpAddr> = spec
            .get("tracer_local_ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        let cfg = vectors::yaml(&dir.join("config.yaml"));
        let mut settings = vectors::settings_for(&cfg);
        // nfacct objects are not created in the test namespace.
        settings.nfacct_invalid = false;
        settings.nfacct_localhost = false;
        let family = settings.family;
        let renderer = Renderer::new(settings);
        let (state, node) = vectors::state_for(&dir, &cfg);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        // The first phase: the state as loaded (later phases delete objects, which the
        // flow test covers on rendered rules).
        let Some(phase) = spec
            .get("phases")
            .and_then(Value::as_array)
            .and_then(|p| p.first())
        else {
            continue;
        };
        if phase
            .get("apply_before_flows")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            continue;
        }
        let ps = state.proxy_state(family, &node);
        let payload = renderer
            .render(
                &ps,
                &IptOptions {
                    full: true,
                    ..IptOptions::default()
                },
            )
            .payload;
        let (save, restore) = match family {
            IpFamily::V4 => ("iptables-nft-save", "iptables-nft-restore"),
            IpFamily::V6 => ("ip6tables-nft-save", "ip6tables-nft-restore"),
        };
        // A clean slate, then the payload and kube-proxy's jump from PREROUTING.
        let _ = ns.exec_stdin(&[restore], "*nat\nCOMMIT\n*filter\nCOMMIT\n");
        let mut text = String::new();
        for line in payload.lines() {
            if line == "COMMIT" && text.contains("*nat") && !text.contains("-A PREROUTING") {
                text.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
            }
            text.push_str(line);
            text.push('\n');
        }
        let (ok, _, err) = ns.exec_stdin(&[restore], &text);
        if !ok {
            failures.push(format!("{name}: restore failed: {err}"));
            continue;
        }
        let (ok, saved, err) = ns.exec_status(&[save]);
        assert!(ok, "{err}");
        let rs = Ruleset::parse(&saved).unwrap_or_else(|e| panic!("{name}: {e}"));
        for flow in phase
            .get("flows")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            flows += 1;
            let pkt = Packet {
                src: vectors::s(flow, "source_ip").unwrap().parse().unwrap(),
                dst: vectors::s(flow, "dest_ip").unwrap().parse().unwrap(),
                dport: flow.get("dest_port").and_then(Value::as_u64).unwrap() as u16,
                proto: vectors::s(flow, "protocol").unwrap_or("TCP").to_lowercase(),
                from_node: false,
            };
            let t = rs.trace(&pkt, &local);
            let want = vectors::s(flow, "output").unwrap_or_default();
            let want_masq = flow.get("masq").and_then(Value::as_bool).unwrap_or(false);
            let fname = vectors::s(flow, "name").unwrap_or_default();
            if t.output() != want || t.masquerade != want_masq {
                failures.push(format!(
                    "{name} {fname} (iptables-save): got {:?} masq={} want {want:?} masq={want_masq}",
                    t.output(),
                    t.masquerade
                ));
            }
            if !pkt.dst.is_loopback() && !pkt.src.is_loopback() {
                let live = live_result(&ns, "iptables", &pkt, &local);
                let mut with_lo = local.clone();
                with_lo.push(IpAddr::from([127, 0, 0, 1]));
                with_lo.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
                let expect = serde_json::to_value(rs.trace(&pkt, &with_lo).outcome()).unwrap();
                if live != expect {
                    failures.push(format!("{name} {fname} (--live): {live} != {expect}"));
                }
            }
        }
    }
    assert!(flows >= 20, "only {flows}");
    assert!(
        failures.is_empty(),
        "{} of {flows} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The maps layout (`--nftables-layout=maps`) read back from the kernel: each upstream
/// nftables vector's maps-layout table is applied with `nft -f` in a namespace, read
/// back with `nft list table ip kproxy`, and every flow traced over the listing and
/// with `kproxy trace --live` must get upstream's answer.
#[test]
fn maps_flows_over_kernel_read_back() {
    if !require_root("maps_flows_over_kernel_read_back") {
        return;
    }
    use kproxy::nftables::maps::MapsRenderer;
    use kproxy::nftables::text::transaction_text;
    let mut failures = Vec::new();
    let mut flows = 0;
    let ns = Netns::new("trace-maps");
    vectors::for_each_nft_flow_phase(|dir, settings, ps, phase, local| {
        let fam = if settings.family == IpFamily::V6 {
            "ip6"
        } else {
            "ip"
        };
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        {
            let text = transaction_text(&MapsRenderer::new(settings.clone()).render_full(ps));
            let _ = ns.exec_status(&["nft", "delete", "table", fam, "kproxy"]);
            let (ok, _, err) = ns.exec_stdin(&["nft", "-f", "-"], &text);
            assert!(ok, "{name}: nft -f refused the maps layout: {err}");
            let (ok, listing, err) = ns.exec_status(&["nft", "list", "table", fam, "kproxy"]);
            assert!(ok, "{err}");
            let table = Table::parse(&listing).unwrap_or_else(|e| panic!("{name}: {e}"));
            for flow in phase["flows"].as_array().into_iter().flatten() {
                flows += 1;
                let pkt = Packet {
                    src: flow["sourceIP"].as_str().unwrap().parse().unwrap(),
                    dst: flow["destIP"].as_str().unwrap().parse().unwrap(),
                    dport: flow["destPort"].as_u64().unwrap() as u16,
                    proto: flow["protocol"].as_str().unwrap_or("TCP").to_lowercase(),
                    from_node: false,
                };
                let want = flow["output"].as_str().unwrap_or_default();
                let masq = flow["masquerade"].as_bool().unwrap_or(false);
                let fname = flow["name"].as_str().unwrap_or_default();
                let t = table.trace(&pkt, local);
                if t.output() != want || t.masquerade != masq {
                    failures.push(format!(
                        "{name} {fname} (nft list): got {:?} masq={} want {want:?} masq={masq}",
                        t.output(),
                        t.masquerade
                    ));
                }
                if !pkt.dst.is_loopback() && !pkt.src.is_loopback() {
                    let live = live_result(&ns, "nftables", &pkt, local);
                    let listed = serde_json::to_value(t.outcome()).unwrap();
                    if live != listed {
                        failures.push(format!("{name} {fname} (--live): {live} != {listed}"));
                    }
                }
            }
        }
    });
    assert!(flows >= 50, "only {flows}");
    assert!(
        failures.is_empty(),
        "{} of {flows} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
