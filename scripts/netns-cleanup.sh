#!/usr/bin/env bash
# Removes network namespaces left by dataplane test runs (tests/dataplane.rs) that were
# killed before their Drop guards ran. Only namespaces named kpdp-<pid>-... whose pid no
# longer exists are removed, so a suite that is still running is left alone.
set -euo pipefail
for path in /run/netns/kpdp-*; do
  [ -e "$path" ] || continue
  name=$(basename "$path")
  pid=${name#kpdp-}
  pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then
    ip netns del "$name" && echo "removed $name"
  fi
done
