//! What each fuzz target does with one input. Shared by the libFuzzer binaries
//! (fuzz/fuzz_targets/*.rs) and the regression test that replays every kept crash
//! input (tests/fuzz_regressions.rs), so a fixed crash stays fixed.
//!
//! A target may return errors freely; what it must never do is panic, overflow the
//! stack, or hang.

use std::net::IpAddr;

use kproxy::config::{Config, Mode};
use kproxy::iptables::render::{RenderOptions, Renderer};
use kproxy::model::{IpFamily, NodeContext};
use kproxy::nftables::render::{NftRenderer, RenderOptions as NftRenderOptions};
use kproxy::nftables::text::transaction_text;
use kproxy::trace::iptables::{Packet, Ruleset};
use kproxy::trace::nftables::Table;

/// A fuzz target: its name and its entry point.
pub(crate) type Target = (&'static str, fn(&[u8]));

/// The targets by name (the names of the fuzz binaries and of testdata/fuzz/<name>/).
pub(crate) const TARGETS: [Target; 4] = [
    ("snapshot", snapshot),
    ("config", config),
    ("trace_iptables", trace_iptables),
    ("trace_nftables", trace_nftables),
];

/// Snapshot decoding and model conversion, then both renderers over the result (the
/// renderers must cope with everything the model conversion lets through).
pub(crate) fn snapshot(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut snap) = kproxy::snapshot::load_str(text, "fuzz") else {
        return;
    };
    // A snapshot whose Nodes none of which is chosen is an error for the CLI; the
    // fuzz target goes on with a fixed name so conversion and rendering still run.
    let node_name = snap
        .select_node(None)
        .ok()
        .flatten()
        .unwrap_or_else(|| "node-a".to_string());
    let node = NodeContext {
        name: node_name.clone(),
        zone: snap.state.node().and_then(|n| n.zone.clone()),
        prefer_same_node: false,
    };
    let cfg = Config::default();
    let node_info = snap.state.node().cloned();
    for family in [IpFamily::V4, IpFamily::V6] {
        let settings = cfg.family_settings(family, &node_name, node_info.as_ref(), &[]);
        let state = snap.state.proxy_state(family, &node);
        let ipt = Renderer::new(settings.clone()).render(
            &state,
            &RenderOptions {
                full: true,
                ..RenderOptions::default()
            },
        );
        std::hint::black_box(ipt.payload.len());
        let nft = NftRenderer::new(settings).render(&state, &NftRenderOptions::default());
        std::hint::black_box(transaction_text(&nft.main).len());
    }
}

/// KubeProxyConfiguration loading and validation.
pub(crate) fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::from_yaml(text, "fuzz") {
        if cfg.validate().is_ok() {
            for family in [IpFamily::V4, IpFamily::V6] {
                std::hint::black_box(cfg.family_settings(family, "node-a", None, &[]));
            }
            std::hint::black_box(cfg.masquerade_mark());
            std::hint::black_box(cfg.mode == Mode::Iptables);
        }
    }
}

/// A few packets covering both directions and the protocols the tracers know.
fn packets() -> Vec<Packet> {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let mut out = Vec::new();
    for (src, dst) in [
        ("10.0.0.2", "172.30.0.41"),
        ("10.180.0.1", "192.168.99.11"),
        ("fd00::2", "fd00:10:96::1"),
    ] {
        for proto in ["tcp", "udp", "sctp"] {
            for from_node in [false, true] {
                out.push(Packet {
                    src: ip(src),
                    dst: ip(dst),
                    dport: 80,
                    proto: proto.to_string(),
                    from_node,
                });
            }
        }
    }
    out
}

/// The iptables tracer: `iptables-save` / restore text, then a trace of each packet.
pub(crate) fn trace_iptables(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(rs) = Ruleset::parse(text) else {
        return;
    };
    let local = ["192.168.99.11"
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))];
    for p in packets() {
        std::hint::black_box(rs.trace(&p, &local).output());
    }
}

/// The nftables tracer: `nft -f` text, then a trace of each packet.
pub(crate) fn trace_nftables(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = Table::parse(text) else {
        return;
    };
    let local = ["192.168.99.11"
        .parse::<IpAddr>()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]))];
    for p in packets() {
        std::hint::black_box(table.trace(&p, &local).output());
    }
}
