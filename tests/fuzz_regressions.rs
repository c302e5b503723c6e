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

/// A small xorshift generator: the mutation smoke below is deterministic, so a failure
/// reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens the parsers care about, spliced in by the mutator.
const DICTIONARY: [&str; 12] = [
    "add rule ip kube-proxy ",
    "add element ip kube-proxy ",
    "-A KUBE-SERVICES ",
    "*nat\n",
    "{ ",
    " }",
    "\"",
    ": ",
    "- ",
    "items: null\n",
    "jump ",
    "-j ",
];

/// One mutation of `data`: a byte changed, a span removed or repeated, the text cut,
/// a line swapped or a dictionary token inserted.
fn mutate(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len().max(1);
        match rng.below(6) {
            0 if !d.is_empty() => {
                let i = rng.below(len);
                d[i] = b" \n{}[]:-\"#0123456789az"[rng.below(22)];
            }
            1 if !d.is_empty() => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(d.len());
                d.drain(a..b);
            }
            2 if !d.is_empty() => {
                let a = rng.below(len);
                let b = (a + rng.below(128)).min(d.len());
                let span = d[a..b].to_vec();
                let at = rng.below(len);
                d.splice(at..at, span);
            }
            3 => d.truncate(rng.below(len)),
            4 => {
                let text = String::from_utf8_lossy(&d).into_owned();
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.len() > 1 {
                    let (a, b) = (rng.below(lines.len()), rng.below(lines.len()));
                    lines.swap(a, b);
                }
                d = lines.join("\n").into_bytes();
            }
            _ => {
                let at = rng.below(len).min(d.len());
                let tok = DICTIONARY[rng.below(DICTIONARY.len())].as_bytes();
                d.splice(at..at, tok.iter().copied());
            }
        }
    }
    d
}

/// The targets' seed inputs.
fn seeds(target: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let golden = root.join("testdata/golden");
    let mut out = Vec::new();
    for case in std::fs::read_dir(&golden).into_iter().flatten().flatten() {
        let file = match target {
            "snapshot" => "cluster.yaml",
            "trace_iptables" => "iptables.rules",
            "trace_nftables" => "nftables.nft",
            _ => continue,
        };
        out.push(case.path().join(file));
    }
    if target == "config" {
        let dir = root.join("testdata/fuzz/seeds/config");
        out.extend(
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
    }
    out.retain(|p| p.is_file());
    out.sort();
    out
}

/// Not a substitute for the coverage-guided fuzzers (scripts/fuzz.sh): a deterministic
/// mutation smoke over the same targets that runs in every test run, so the shallow
/// crashes (an index past a short line, an unexpected token) never come back. A
/// failure names the seed and the mutation number; the input is written next to the
/// kept crash inputs.
#[test]
fn mutated_seeds_do_not_crash() {
    const MUTATIONS: usize = 60;
    let mut total = 0;
    for (name, run) in targets::TARGETS {
        let seeds = seeds(name);
        assert!(!seeds.is_empty(), "{name}: no seeds");
        for (s, seed) in seeds.iter().enumerate() {
            let data = std::fs::read(seed).unwrap();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (s as u64 + 1));
            for m in 0..MUTATIONS {
                let input = mutate(&mut rng, &data);
                let copy = input.clone();
                let ok = std::thread::Builder::new()
                    .stack_size(STACK)
                    .spawn(move || run(&copy))
                    .unwrap()
                    .join()
                    .is_ok();
                if !ok {
                    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("target/fuzz-smoke")
                        .join(name);
                    std::fs::create_dir_all(&dir).unwrap();
                    let out = dir.join(format!("crash-seed{s}-m{m}"));
                    std::fs::write(&out, &input).unwrap();
                    panic!(
                        "{name}: mutation {m} of {} crashed; input in {}",
                        seed.display(),
                        out.display()
                    );
                }
                total += 1;
            }
        }
    }
    eprintln!("ran {total} mutated inputs");
}
