//! Replays every input the fuzzers ever crashed or hung on (testdata/fuzz/<target>/),
//! through the same code the fuzz targets run (fuzz/targets.rs). Each input gets its own
//! thread with a deadline, so a hang fails the test instead of stalling it, and a stack
//! overflow aborts the run (which fails it too).

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// Generous: a fixed input takes milliseconds; a hang is what this catches.
const DEADLINE: Duration = Duration::from_secs(60);

/// The main thread of a libFuzzer run has the process's 8 MiB stack: give replays the
/// same, so a recursion that fits there passes here too.
const STACK: usize = 8 << 20;

fn replay(target: &str, run: fn(&[u8]), dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let (tx, rx) = mpsc::channel();
        let name = path.display().to_string();
        std::thread::Builder::new()
            .stack_size(STACK)
            .spawn(move || {
                run(&data);
                let _ = tx.send(());
            })
            .unwrap();
        match rx.recv_timeout(DEADLINE) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{target}: {name} still running after {DEADLINE:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{target}: {name} panicked"),
        }
    }
    files.len()
}

#[test]
fn every_kept_fuzz_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz");
    let mut total = 0;
    for (name, run) in targets::TARGETS {
        total += replay(name, run, &root.join(name));
    }
    eprintln!("replayed {total} kept fuzz inputs");
}

/// The config seeds are real configurations: they must load (so the fuzzer starts
/// from inputs that reach deep into validation, not from parse errors).
#[test]
fn config_seeds_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/fuzz/seeds/config");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap();
        let cfg = kproxy::config::Config::from_yaml(&text, &e.path().display().to_string())
            .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        cfg.validate()
            .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        n += 1;
    }
    assert!(n >= 3, "seeds missing in {}", dir.display());
}

/// The targets themselves work on ordinary inputs (a target that returned early on
/// everything would fuzz nothing).
#[test]
fn targets_accept_the_golden_inputs() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/kube-dns");
    let snap = std::fs::read(golden.join("cluster.yaml")).unwrap();
    assert!(kproxy::snapshot::load_str(std::str::from_utf8(&snap).unwrap(), "t").is_ok());
    targets::snapshot(&snap);
    let ipt = std::fs::read_to_string(golden.join("iptables.rules")).unwrap();
    assert!(kproxy::trace::iptables::Ruleset::parse(&ipt).is_ok());
    targets::trace_iptables(ipt.as_bytes());
    let nft = std::fs::read_to_string(golden.join("nftables.nft")).unwrap();
    assert!(kproxy::trace::nftables::Table::parse(&nft).is_ok());
    targets::trace_nftables(nft.as_bytes());
}
