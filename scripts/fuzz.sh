#!/usr/bin/env bash
# Runs every coverage-guided fuzz target (cargo-fuzz / libFuzzer, fuzz/) for a bounded
# time each. Not part of CI: a run costs minutes of CPU.
#
#   scripts/fuzz.sh                  # every target, FUZZ_SECONDS (default 60) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh snapshot trace_nftables
#
# Needs a nightly toolchain (`rustup toolchain list`; AddressSanitizer needs -Zsanitizer)
# and cargo-fuzz (`cargo install cargo-fuzz`). Without a nightly, RUSTC_BOOTSTRAP=1 lets
# the stable compiler take the nightly flags: FUZZ_TOOLCHAIN=stable scripts/fuzz.sh.
#
# The corpus starts from the repository's own inputs (golden snapshots and rules,
# upstream vectors, config seeds) and grows in fuzz/corpus/<target> (not committed).
# A crash leaves its input in fuzz/artifacts/<target>/; the script copies each into
# testdata/fuzz/<target>/ so tests/fuzz_regressions.rs replays it from then on, and
# exits 1. Fix the crash, then commit the input with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${FUZZ_SECONDS:-60}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
# AddressSanitizer by default; FUZZ_SANITIZER=none builds only the coverage
# instrumentation (several times faster to build and run; Rust code is memory-safe, so
# what it finds are panics, overflows, hangs and OOMs, which are what kproxy's targets
# look for).
sanitizer=${FUZZ_SANITIZER:-address}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(snapshot config trace_iptables trace_nftables)

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi
run_cargo() {
    if [ "$toolchain" = stable ]; then
        RUSTC_BOOTSTRAP=1 cargo fuzz "$@"
    else
        cargo "+$toolchain" fuzz "$@"
    fi
}

seed() { # target, files...
    local dir=fuzz/corpus/$1
    shift
    mkdir -p "$dir"
    for f in "$@"; do
        [ -f "$f" ] || continue
        cp "$f" "$dir/seed-$(sha256sum "$f" | cut -c1-16)"
    done
}
shopt -s nullglob
seed snapshot testdata/golden/*/cluster.yaml testdata/demo/cluster.yaml \
    testdata/upstream/*/*/cluster.yaml
seed config testdata/fuzz/seeds/config/* testdata/upstream/*/*/config.yaml
seed trace_iptables testdata/golden/*/iptables.rules testdata/upstream/iptables/*/*.rules
seed trace_nftables testdata/golden/*/nftables.nft testdata/upstream/nftables/*/*.nft

status=0
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${seconds}s"
    mkdir -p "fuzz/artifacts/$t"
    # -rss_limit_mb: the renderers of a large snapshot legitimately use a few hundred MB.
    if ! run_cargo run --fuzz-dir fuzz -O -s "$sanitizer" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=262144 -timeout=10 \
        -print_final_stats=1 2>&1 | tee "fuzz/artifacts/$t/last-run.log" | grep -E '^(#[0-9]+ +DONE|stat::|==|SUMMARY|Done)'; then
        :
    fi
    for a in fuzz/artifacts/"$t"/crash-* fuzz/artifacts/"$t"/timeout-* fuzz/artifacts/"$t"/oom-* fuzz/artifacts/"$t"/slow-unit-*; do
        mkdir -p "testdata/fuzz/$t"
        cp "$a" "testdata/fuzz/$t/$(basename "$a")"
        echo "fuzz.sh: $t: kept $(basename "$a") in testdata/fuzz/$t/" >&2
        status=1
    done
done
cd "$root"
exit $status
