//! The `maps` layout over netlink against the real kernel, each test in fresh network
//! namespaces: what the netlink encoder builds lists like what `nft -f` builds from
//! the same transaction's text, for every golden cluster.

#[path = "support/netns.rs"]
mod netns;

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use kproxy::cli::inputs::{InputArgs, Inputs};
use kproxy::nftables::maps::{MapsRenderer, TABLE};
use kproxy::nftables::netlink::Netlink;
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::transaction::Transaction;
use netns::{canonical_listing, require_root, Netns};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    inputs: InputArgs,
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .expect("testdata/golden exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("cluster.yaml").exists())
        .collect();
    dirs.sort();
    dirs
}

fn inputs(dir: &Path) -> Inputs {
    let args = fs::read_to_string(dir.join("args")).unwrap_or_default();
    let mut argv = vec![
        "x".to_string(),
        "--snapshot".into(),
        dir.join("cluster.yaml").display().to_string(),
        "--mode".into(),
        "nftables".into(),
    ];
    argv.extend(args.split_whitespace().map(str::to_string));
    Inputs::load(&Wrapper::parse_from(argv).inputs).unwrap()
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
