#!/usr/bin/env bash
# The demo: a dry run of kproxy on testdata/demo/ (a small realistic cluster: a two-tier
# app, kube-dns, an ingress controller LoadBalancer). MODE=nftables for nftables mode.
# On a fresh Debian machine (as root) it first installs the build dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh build
mode=${MODE:-iptables}
# shellcheck disable=SC2046
exec cargo run --quiet --release -- render --mode "$mode" \
  --snapshot testdata/demo/cluster.yaml $(cat testdata/demo/args) "$@"
