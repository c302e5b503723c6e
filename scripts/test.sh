#!/usr/bin/env bash
# Runs every kproxy test. Installs the system packages the tests need (Debian), so it
# works on a clean machine; network-namespace and kernel tests need root (CI is root).
set -euo pipefail
cd "$(dirname "$0")/.."

# Build and kernel-test packages (one list, shared with scripts/demo.sh). Without root
# the kernel tests skip (outside CI), so a missing package is only reported then.
if [ "$(id -u)" = 0 ]; then
  bash scripts/deps.sh test
else
  bash scripts/deps.sh test || true
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo test"
# Kernel and dataplane tests create their own uniquely named network namespaces.
log=$(mktemp)
set +e
cargo test --lib --bins --tests --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
ignored=$(grep -Eo '[0-9]+ ignored' "$log" | awk '{s+=$1} END {print s+0}')
echo "${passed} passed, ${failed} failed, ${ignored} skipped"
exit "$status"
