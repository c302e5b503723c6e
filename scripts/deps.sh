#!/usr/bin/env bash
# Installs the Debian packages kproxy needs, shared by scripts/demo.sh and scripts/test.sh
# so that a fresh machine builds and tests with one command.
#
#   scripts/deps.sh            build dependencies (C headers for libnftnl/libmnl, pkg-config,
#                              a C compiler) — enough for `cargo build` and the demo
#   scripts/deps.sh test       + the kernel-test tools (iptables, nftables, conntrack,
#                              nfacct, iproute2)
#   scripts/deps.sh image      + what scripts/image.sh uses (mmdebstrap, buildah, podman)
#
# Already-installed packages are skipped; as non-root it only reports what is missing.
# Also checks that a Rust toolchain (cargo) is on PATH and says how to get one.
set -euo pipefail

build=(pkg-config libnftnl-dev libmnl-dev gcc libc6-dev)
test=(iptables nftables conntrack nfacct iproute2)
image=(mmdebstrap buildah podman uidmap)

wanted=("${build[@]}")
for group in "$@"; do
  case "$group" in
    build) ;;
    test) wanted+=("${test[@]}") ;;
    image) wanted+=("${image[@]}") ;;
    *)
      echo "deps.sh: unknown group $group (build, test, image)" >&2
      exit 2
      ;;
  esac
done

missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "deps.sh: missing Debian packages (run as root to install): ${missing[*]}" >&2
    exit 1
  fi
  echo "== installing ${missing[*]}" >&2
  # Another apt run may hold the lock for a while; wait for it rather than fail.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps.sh: cargo not found: install Rust 1.85 or newer (https://rustup.rs, or" \
    "Debian's rustc/cargo packages if recent enough)" >&2
  exit 1
fi
