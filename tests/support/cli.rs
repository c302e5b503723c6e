//! Running the `kproxy` binary the way a user does, on the demo cluster: shared by the
//! CLI tests (`explain_cli`, `trace_cli`). Include it with `#[path]` as module `cli`.
// Each including crate uses a different part, through a private module.
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kproxy");

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `--snapshot testdata/demo/cluster.yaml` and the demo's own flags
/// (`testdata/demo/args`).
pub fn demo_args() -> Vec<String> {
    let mut a = vec![
        "--snapshot".to_string(),
        root()
            .join("testdata/demo/cluster.yaml")
            .display()
            .to_string(),
    ];
    a.extend(
        fs::read_to_string(root().join("testdata/demo/args"))
            .unwrap()
            .split_whitespace()
            .map(str::to_string),
    );
    a
}

/// Runs kproxy; (exit code, stdout, stderr).
pub fn kproxy(args: &[String]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `&str`s as owned arguments.
pub fn strs(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
