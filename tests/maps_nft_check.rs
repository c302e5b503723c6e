//! The `maps` layout's `nft -f` text is accepted by `nft -c -f` for every golden
//! case's cluster (inside a throw-away network namespace), and its shape holds: only
//! element operations depend on Services.

#[path = "support/netns.rs"]
mod netns;

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use kproxy::cli::inputs::{InputArgs, Inputs};
use kproxy::nftables::maps::MapsRenderer;
use kproxy::nftables::text::transaction_text;
use kproxy::nftables::transaction::Op;

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

/// Each family's maps-layout transaction text for one golden case.
fn render(dir: &Path) -> Vec<String> {
    let args = fs::read_to_string(dir.join("args")).unwrap_or_default();
    let mut argv = vec![
        "render".to_string(),
        "--snapshot".to_string(),
        dir.join("cluster.yaml").display().to_string(),
        "--mode".to_string(),
        "nftables".to_string(),
    ];
    argv.extend(args.split_whitespace().map(str::to_string));
    let w = Wrapper::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let inputs = Inputs::load(&w.inputs).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    inputs
        .families
        .iter()
        .map(|settings| {
            let state = inputs.state.proxy_state(settings.family, &inputs.node);
            let r = MapsRenderer::new(settings.clone());
            let tx = r.render_full(&state);
            // Rules never name a Service's address: they are the fixed part.
            for op in &tx.ops {
                if let Op::AddRule(rule) = op {
                    for p in &state.ports {
                        let text = kproxy::nftables::text::rule_body(tx.family, rule);
                        assert!(
                            !text.contains(&format!(" {} ", p.svc.cluster_ip)),
                            "{}: rule names a ClusterIP: {text}",
                            dir.display()
                        );
                    }
                }
            }
            transaction_text(&tx)
        })
        .collect()
}

#[test]
fn nft_accepts_the_maps_layout_of_every_golden_case() {
    if !netns::require_root("nft_accepts_the_maps_layout_of_every_golden_case") {
        return;
    }
    let ns = netns::Netns::new("maps-check");
    let mut failures = Vec::new();
    let all = cases();
    assert!(all.len() >= 10, "golden cases missing");
    for dir in all {
        for text in render(&dir) {
            // MAPS_DUMP=dir writes each case's text there, for reading.
            if let Some(out) = std::env::var_os("MAPS_DUMP") {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let _ = fs::write(Path::new(&out).join(format!("{name}.nft")), &text);
            }
            let (ok, _out, err) = ns.exec_stdin(&["nft", "-c", "-f", "-"], &text);
            if !ok {
                failures.push(format!("{}:\n{err}\n--- input\n{text}", dir.display()));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
