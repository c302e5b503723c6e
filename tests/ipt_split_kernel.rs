//! A large `iptables-restore` applied in pieces (as kproxy does on iptables-nft) leaves
//! exactly the rules the single restore leaves, for a first sync and for a full resync
//! over existing rules that deletes stale chains. Root; each case in its own network
//! namespaces.

#[path = "support/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};

use kproxy::config::Config;
use kproxy::iptables::chunk::split_restore;
use kproxy::iptables::render::{RenderOptions, Renderer};
use kproxy::model::{synthetic, IpFamily, NodeContext};
use netns::{require_root, Netns};

/// `iptables-nft-save` as chain → rules, counters and comments dropped (chain order in
/// the listing follows creation order, which pieces change on purpose).
fn rules(ns: &Netns) -> BTreeMap<(String, String), Vec<String>> {
    let (ok, out, err) = ns.exec_status(&["iptables-nft-save"]);
    assert!(ok, "{err}");
    let mut table = String::new();
    let mut m: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for l in out.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(rest) = l.strip_prefix(':') {
            let c = rest.split_whitespace().next().unwrap().to_string();
            m.entry((table.clone(), c)).or_default();
        } else if let Some(rest) = l.strip_prefix("-A ") {
            let c = rest.split_whitespace().next().unwrap().to_string();
            m.entry((table.clone(), c)).or_default().push(l.to_string());
        }
    }
    m
}

fn restore(ns: &Netns, payload: &str) {
    let (ok, _, err) = ns.exec_stdin(
        &["iptables-nft-restore", "--noflush", "--counters"],
        payload,
    );
    assert!(ok, "iptables-nft-restore: {err}");
}

fn nat_chains(ns: &Netns) -> BTreeSet<String> {
    rules(ns)
        .into_keys()
        .filter(|(t, _)| t == "nat")
        .map(|(_, c)| c)
        .collect()
}

#[test]
fn pieces_equal_one_restore_in_the_kernel() {
    if !require_root("pieces_equal_one_restore_in_the_kernel") {
        return;
    }
    let cfg = Config {
        cluster_cidrs: vec!["10.128.0.0/10".parse().unwrap()],
        ..Config::default()
    };
    let mut settings = cfg.family_settings(
        IpFamily::V4,
        "node-1",
        None,
        &["192.168.0.2/24".parse().unwrap()],
    );
    settings.nfacct_invalid = false;
    settings.nfacct_localhost = false;
    let node = NodeContext {
        name: "node-1".into(),
        zone: None,
        prefer_same_node: false,
    };
    let whole = Netns::new("iptw");
    let pieces = Netns::new("iptp");
    for ns in [&whole, &pieces] {
        for t in ["filter", "nat"] {
            let (ok, _, err) = ns.exec_status(&["iptables-nft", "-t", t, "-S"]);
            assert!(ok, "{err}");
        }
    }

    // First sync: 300 Services × 5 endpoints.
    let v1 = synthetic::cluster(300, 5).proxy_state(IpFamily::V4, &node);
    let r = Renderer::new(settings.clone());
    let first = r.render(
        &v1,
        &RenderOptions {
            full: true,
            existing_nat_chains: None,
            large_cluster_cleanup_due: true,
        },
    );
    restore(&whole, &first.payload);
    let parts = split_restore(&first.payload, 400);
    assert!(parts.len() > 5, "{} pieces", parts.len());
    for p in &parts {
        restore(&pieces, p);
    }
    assert_eq!(rules(&pieces), rules(&whole), "first sync");

    // A full resync over those rules to a different cluster (other endpoints, fewer
    // Services): stale chains are deleted in the last piece.
    let v2 = synthetic::cluster(250, 3).proxy_state(IpFamily::V4, &node);
    let existing = nat_chains(&whole);
    assert_eq!(existing, nat_chains(&pieces));
    let second = Renderer::new(settings).render(
        &v2,
        &RenderOptions {
            full: true,
            existing_nat_chains: Some(&existing),
            large_cluster_cleanup_due: true,
        },
    );
    assert!(!second.deleted_chains.is_empty());
    restore(&whole, &second.payload);
    let parts = split_restore(&second.payload, 400);
    assert!(parts.len() > 5, "{} pieces", parts.len());
    for p in &parts {
        restore(&pieces, p);
    }
    let after = rules(&whole);
    assert_eq!(rules(&pieces), after, "full resync");
    for c in &second.deleted_chains {
        assert!(
            !after.contains_key(&("nat".to_string(), c.clone())),
            "{c} deleted"
        );
    }
}
