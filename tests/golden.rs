//! Golden files for our own cases (testdata/golden/<case>/): `cluster.yaml` + `args`
//! rendered in iptables mode must equal `iptables.rules`, in nftables mode
//! `nftables.nft`. Regenerate on purpose only: `UPDATE_GOLDEN=1 cargo test --test golden`.

#[path = "support/golden_cases.rs"]
mod golden_cases;

use std::fs;
use std::path::Path;

use golden_cases::cases;
use kproxy::cli::render::render_text;

fn render(dir: &Path, mode: &str) -> String {
    render_text(&golden_cases::inputs(dir, mode))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
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
