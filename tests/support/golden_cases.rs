//! The golden cases (`testdata/golden/<case>/`: `cluster.yaml`, `args`, expected
//! outputs), shared by the tests that walk them.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use clap::Parser;
use kproxy::cli::inputs::{InputArgs, Inputs};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    inputs: InputArgs,
}

/// Every case directory, sorted.
pub fn cases() -> Vec<PathBuf> {
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

/// The case directory named `case`.
pub fn case(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/golden")
        .join(case)
}

/// The render inputs of `cluster` with the arguments of case `dir`, in `mode`.
pub fn inputs_of(dir: &Path, cluster: &Path, mode: &str) -> Inputs {
    let args = fs::read_to_string(dir.join("args")).unwrap_or_default();
    let mut argv = vec![
        "render".to_string(),
        "--snapshot".to_string(),
        cluster.display().to_string(),
        "--mode".to_string(),
        mode.to_string(),
    ];
    argv.extend(args.split_whitespace().map(str::to_string));
    let w = Wrapper::try_parse_from(&argv).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    Inputs::load(&w.inputs).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The render inputs of case `dir` in `mode`.
pub fn inputs(dir: &Path, mode: &str) -> Inputs {
    inputs_of(dir, &dir.join("cluster.yaml"), mode)
}
