//! The `maps` layout over netlink against the real kernel, each test in fresh network
//! namespaces: what the netlink encoder builds lists like what `nft -f` builds from
//! the same transaction's text, for every golden cluster.

#[path = "support/golden_cases.rs"]
mod golden_cases;
#[path = "support/netns.rs"]
mod netns;

use std::path::Path;

use golden_cases::cases;
use kproxy::cli::inputs::Inputs;
use kproxy::nftables::maps::{MapsRenderer, TABLE};
use kproxy::nftables::netlink::Netlink;
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::transaction::Transaction;
use netns::{canonical_listing, require_root, Netns};

fn inputs(dir: &Path) -> Inputs {
    golden_cases::inputs(dir, "nftables")
}

/// `nft list table <family> kproxy` in `ns`.
fn listing(ns: &Netns, family: &str) -> String {
    let (ok, out, err) = ns.exec_status(&["nft", "list", "table", family, TABLE]);
    assert!(ok, "nft list: {err}");
    out
}

fn apply_in(ns: &Netns, tx: Transaction) -> Result<(), String> {
    ns.run(move || {
        let mut nl = Netlink::open().map_err(|e| e.to_string())?;
        nl.apply(&tx).map_err(|e| e.to_string())
    })
}

#[test]
fn maps_layout_over_netlink_lists_like_nft_f_for_every_golden_case() {
    if !require_root("maps_layout_over_netlink_lists_like_nft_f_for_every_golden_case") {
        return;
    }
    let mut compared = 0;
    for dir in cases() {
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        let inputs = inputs(&dir);
        for settings in &inputs.families {
            let state = inputs.state.proxy_state(settings.family, &inputs.node);
            let tx = MapsRenderer::new(settings.clone()).render_full(&state);
            let fam = tx.family.as_str();
            let via_netlink = Netns::new("mnl");
            let via_nft = Netns::new("mnft");
            let text = transaction_text(&tx);
            apply_in(&via_netlink, tx).unwrap_or_else(|e| panic!("{case} ({fam}): {e}"));
            let (ok, _, err) = via_nft.exec_stdin(&["nft", "-f", "-"], &text);
            assert!(ok, "{case}: nft -f refused the maps text: {err}");
            let (a, b) = (listing(&via_netlink, fam), listing(&via_nft, fam));
            assert_eq!(
                canonical_listing(&a),
                canonical_listing(&b),
                "{case} ({fam}): netlink and nft -f give different tables\n--- netlink\n{a}\n--- nft -f\n{b}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 13, "{compared}");
}

#[test]
fn the_feature_probe_passes_here_and_leaves_nothing_behind() {
    if !require_root("the_feature_probe_passes_here_and_leaves_nothing_behind") {
        return;
    }
    let ns = Netns::new("mprobe");
    ns.run(|| {
        let mut nl = Netlink::open().expect("netlink");
        for family in [
            kproxy::nftables::transaction::Family::Ip,
            kproxy::nftables::transaction::Family::Ip6,
        ] {
            kproxy::nftables::maps::probe::probe(&mut nl, family)
                .unwrap_or_else(|e| panic!("{e}: {:?}", std::error::Error::source(&e)));
        }
    });
    let (ok, out, err) = ns.exec_status(&["nft", "list", "tables"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "", "the probe's tables are gone");
}

/// The typed read-back (data values, interval ends as prefixes, verdict-map elements,
/// rules' comments) gives back exactly what was written, for every golden cluster:
/// the same as the in-memory fake's answer for the same transaction.
#[test]
fn the_read_back_of_every_golden_table_equals_what_was_written() {
    if !require_root("the_read_back_of_every_golden_table_equals_what_was_written") {
        return;
    }
    use kproxy::nftables::fake::Fake;
    use kproxy::nftables::transaction::{Op, SetFlag};
    let mut compared = 0;
    let mut kinds = (0, 0, 0);
    for dir in cases() {
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        let inputs = inputs(&dir);
        for settings in &inputs.families {
            let state = inputs.state.proxy_state(settings.family, &inputs.node);
            let tx = MapsRenderer::new(settings.clone()).render_full(&state);
            let family = tx.family;
            // Every set the transaction declares, except the packet path's own.
            let declared: Vec<_> = tx
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::AddSet(s) if !s.flags.contains(&SetFlag::Dynamic) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            let spec = {
                let d = declared.clone();
                move |name: &str| d.iter().find(|s| s.name == name).cloned()
            };
            let mut fake = Fake::new();
            fake.apply(&tx).unwrap();
            let want = fake.contents(&spec).unwrap();
            let ns = Netns::new("mread");
            let got = ns.run(move || {
                let mut nl = Netlink::open().unwrap();
                assert!(nl.read_contents(family, TABLE, &spec).unwrap().is_none());
                nl.apply(&tx).unwrap();
                nl.read_contents(family, TABLE, &spec).unwrap().unwrap()
            });
            let sorted = |c: &kproxy::nftables::existing::TableContents| {
                let mut e: Vec<String> = c.elements.iter().map(|e| format!("{e:?}")).collect();
                e.sort();
                e
            };
            assert_eq!(got.sets, want.sets, "{case}: sets");
            assert_eq!(got.chains, want.chains, "{case}: chains and rules");
            assert_eq!(sorted(&got), sorted(&want), "{case}: elements");
            for e in &got.elements {
                kinds.0 += usize::from(!e.data.is_empty());
                kinds.1 += usize::from(e.value.is_some());
                kinds.2 += usize::from(
                    e.key
                        .iter()
                        .any(|k| matches!(k, kproxy::nftables::transaction::KeyValue::Net(_))),
                );
            }
            compared += 1;
        }
    }
    assert!(compared >= 13, "{compared}");
    assert!(
        kinds.0 > 0 && kinds.1 > 0 && kinds.2 > 0,
        "data, verdict and interval elements all read back: {kinds:?}"
    );
}

/// The maps dataplane against the kernel: a cold sync, a partial sync of one moved
/// endpoint (elements only), and a restarted dataplane taking the table over, which
/// finds nothing to change; then a changed cluster taken over writes the difference.
#[test]
fn the_dataplane_takes_over_its_table_after_a_restart_writing_only_the_difference() {
    if !require_root(
        "the_dataplane_takes_over_its_table_after_a_restart_writing_only_the_difference",
    ) {
        return;
    }
    use kproxy::config::Config;
    use kproxy::dataplane::Dataplane;
    use kproxy::model::{synthetic, IpFamily, NodeContext};
    use kproxy::nftables::maps::dataplane::MapsDataplane;
    use std::sync::Arc;
    let ns = Netns::new("mtake");
    let (cold, change, take_over, changed, elements) = ns.run(|| {
        let settings = Config::default().family_settings(IpFamily::V4, "node-1", None, &[]);
        let node = NodeContext::default();
        let st = synthetic::cluster(40, 3).proxy_state(IpFamily::V4, &node);
        let mut dp = MapsDataplane::new(settings.clone());
        let cold = dp.sync(&st, false).unwrap();
        assert!(cold.full);
        let mut moved = st.clone();
        let mut p = (*moved.ports[0]).clone();
        p.endpoints[0].ip = "10.255.0.9".parse().unwrap();
        moved.ports = moved.ports.replaced(0, Arc::new(p));
        let change = dp.sync(&moved, false).unwrap();
        assert!(!change.full);
        let mut again = MapsDataplane::new(settings.clone());
        let take_over = again.sync(&moved, false).unwrap();
        assert!(again.last_stats().read_back, "a new dataplane reads back");
        // Nobody committed since: a full resync needs no read-back.
        let resync = again.sync(&moved, true).unwrap();
        assert_eq!(resync.operations, 0);
        assert!(!again.last_stats().read_back, "the generation is unchanged");
        let bigger = synthetic::cluster(45, 4).proxy_state(IpFamily::V4, &node);
        let mut third = MapsDataplane::new(settings.clone()).with_batch_ops(50);
        let changed = third.sync(&bigger, false).unwrap();
        // A fourth finds the third's table complete.
        let mut fourth = MapsDataplane::new(settings);
        let last = fourth.sync(&bigger, true).unwrap();
        assert_eq!(last.operations, 1, "only `add table`");
        (
            cold.operations,
            change.operations,
            take_over.operations,
            changed.operations,
            fourth.element_count(),
        )
    });
    assert!(cold > 200, "{cold}");
    assert!(change <= 8, "one endpoint moved: {change} operations");
    assert_eq!(take_over, 1, "an identical table: only `add table`");
    assert!(changed > 8 && changed < cold * 3, "{changed}");
    let listing = listing(&ns, "ip");
    let backends = listing.matches(" : 10.").count();
    assert!(
        backends >= 45 * 4,
        "{backends} backends listed, {elements} elements"
    );
}

/// A table taken over from a run with other session-affinity timeouts gets its
/// affinity sets re-created with the wanted timeout (the kernel does not redefine a
/// set in place); a second take-over then finds nothing to change.
#[test]
fn a_take_over_re_creates_affinity_sets_whose_timeout_differs() {
    if !require_root("a_take_over_re_creates_affinity_sets_whose_timeout_differs") {
        return;
    }
    use kproxy::config::Config;
    use kproxy::dataplane::Dataplane;
    use kproxy::model::{synthetic, IpFamily, NodeContext, ProxyState};
    use kproxy::nftables::maps::dataplane::MapsDataplane;
    use std::sync::Arc;
    fn with_affinity(st: &ProxyState, timeout: u32) -> ProxyState {
        let ports: Vec<_> = st
            .ports
            .iter()
            .map(|p| {
                let mut q = (**p).clone();
                q.svc.affinity_timeout = Some(timeout);
                Arc::new(q)
            })
            .collect();
        ProxyState {
            ports: ports.into(),
            ..st.clone()
        }
    }
    let ns = Netns::new("mretime");
    let (retimed, again) = ns.run(|| {
        let settings = Config::default().family_settings(IpFamily::V4, "node-1", None, &[]);
        let base = synthetic::cluster(5, 2).proxy_state(IpFamily::V4, &NodeContext::default());
        MapsDataplane::new(settings.clone())
            .sync(&with_affinity(&base, 600), true)
            .unwrap();
        let long = with_affinity(&base, 10800);
        let retimed = MapsDataplane::new(settings.clone())
            .sync(&long, true)
            .unwrap();
        let again = MapsDataplane::new(settings).sync(&long, true).unwrap();
        (retimed.operations, again.operations)
    });
    let listing = listing(&ns, "ip");
    assert_eq!(listing.matches("timeout 3h").count(), 10, "{listing}");
    assert!(!listing.contains("timeout 10m"), "{listing}");
    // 10 sets re-created (delete + add), their 10 chains flushed and refilled.
    assert!(retimed >= 40, "{retimed} operations");
    assert_eq!(again, 1, "only `add table`");
}
