//! Golden files for our own cases (testdata/golden/<case>/): `cluster.yaml` + `args`
//! rendered in iptables mode must equal `iptables.rules`, in nftables mode
//! `nftables.nft`. Regenerate on purpose only: `UPDATE_GOLDEN=1 cargo test --test golden`.

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use kproxy::cli::inputs::{InputArgs, Inputs};
use kproxy::cli::render::render_text;

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

fn render(dir: &Path, mode: &str) -> String {
    let args = fs::read_to_string(dir.join("args")).unwrap_or_default();
    let snapshot = dir.join("cluster.yaml");
    let mut argv = vec![
        "render".to_string(),
        "--snapshot".to_string(),
        snapshot.display().to_string(),
        "--mode".to_string(),
        mode.to_string(),
    ];
    argv.extend(args.split_whitespace().map(str::to_string));
    let w = Wrapper::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let inputs = Inputs::load(&w.inputs).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    render_text(&inputs).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn check_golden(mode: &str, file_name: &str) {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    let all = cases();
    assert!(all.len() >= 10, "golden cases missing");
    for dir in all {
        let got = render(&dir, mode);
        let file = dir.join(file_name);
        if update {
            fs::write(&file, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", file.display()));
        if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}\n--- got\n{got}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn golden_iptables() {
    check_golden("iptables", "iptables.rules");
}

#[test]
fn golden_nftables() {
    check_golden("nftables", "nftables.nft");
}

#[test]
fn rendering_is_deterministic() {
    for dir in cases() {
        assert_eq!(
            render(&dir, "iptables"),
            render(&dir, "iptables"),
            "{}",
            dir.display()
        );
    }
}
