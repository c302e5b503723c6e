#!/usr/bin/env bash
# The demo: a dry run of kproxy on testdata/demo/ (a small realistic cluster: a two-tier
# app, kube-dns, an ingress controller LoadBalancer). MODE=nftables for nftables mode.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${MODE:-iptables}
# shellcheck disable=SC2046
exec cargo run --quiet --release -- render --mode "$mode" \
  --snapshot testdata/demo/cluster.yaml $(cat testdata/demo/args) "$@"
