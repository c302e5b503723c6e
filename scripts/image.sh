#!/usr/bin/env bash
# Builds the kproxy OCI image on this machine without pulling from any container
# registry, then smoke-tests it. Needs root.
#
#   1. the stripped release binary (cargo build --release);
#   2. a Debian root filesystem from this machine's configured apt mirror (mmdebstrap,
#      minbase + iptables, nftables, conntrack, libnftnl, libmnl), no docs, no apt lists;
#   3. buildah: image = that rootfs + the binary, entrypoint /usr/local/bin/kproxy;
#   4. smoke tests with podman (or, where this host cannot start containers, the image's
#      root filesystem chrooted read-only with the same capabilities): `kproxy version`, the demo render (must equal the host
#      binary's), `kproxy apply` in both modes inside a fresh network namespace with the
#      capabilities the DaemonSet grants (NET_ADMIN, NET_RAW; read-only root), and
#      `kproxy diff` there with shadow mode's extra SYS_ADMIN.
#
# IMAGE=name:tag (default localhost/kproxy:<Cargo version>), SUITE (default: the host's
# Debian suite), ROOTFS_TAR=file to reuse a root filesystem tarball this script made
# before (it is written to target/image/rootfs-<suite>.tar), KEEP_ROOTFS=1 to keep the
# work directory. Storage: vfs (works anywhere,
# including inside containers); set STORAGE_DRIVER=overlay for speed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "image.sh: run as root (mmdebstrap, buildah and network namespaces)" >&2
  exit 2
fi
bash scripts/deps.sh build image

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${IMAGE:-localhost/kproxy:$version}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
suite=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}

# The machine's own Debian mirror (deb822 .sources or one-line .list), never a registry.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
  grep -m1 -v -- -security || true)
if [ -z "$mirror" ]; then
  mirror=$(grep -h -m1 '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    awk '{print $2}' | head -1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d /tmp/kproxy-image.XXXXXX)
ns=kp-img-$$
cleanup() {
  ip netns del "$ns" 2>/dev/null || true
  if [ -n "${ctr:-}" ]; then buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true; fi
  [ "${KEEP_ROOTFS:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

echo "== release binary"
cargo build --release --bin kproxy
bin=target/release/kproxy
ls -l "$bin"

rootfs=${ROOTFS_TAR:-}
if [ -n "$rootfs" ] && [ -f "$rootfs" ]; then
  echo "== root filesystem: reusing $rootfs"
else
  rootfs=target/image/rootfs-$suite.tar
  mkdir -p target/image
  echo "== root filesystem: $suite from $mirror"
  mmdebstrap --variant=minbase --quiet \
    --include=iptables,nftables,conntrack,libnftnl11,libmnl0 \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$suite" "$rootfs" "$mirror"
fi
ls -l "$rootfs"

echo "== image $image"
ctr=$(buildah from scratch)
buildah add "$ctr" "$rootfs" / >/dev/null
buildah copy --chmod 0755 "$ctr" "$bin" /usr/local/bin/kproxy >/dev/null
buildah config \
  --entrypoint '["/usr/local/bin/kproxy"]' --cmd run \
  --label org.opencontainers.image.title=kproxy \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.description="A Rust replacement for kube-proxy" \
  "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
buildah rm "$ctr" >/dev/null
ctr=
buildah images "$image"

# The smoke tests run the image two ways. With podman when this host can start
# containers; on hosts that cannot (a sandbox without CAP_SYS_RESOURCE, where crun's
# setrlimit calls fail) with a faithful stand-in: the image's own root filesystem
# (buildah mount of a container made from the committed image), bind-mounted read-only
# in a private mount namespace, chrooted, with the same capability bounding set and the
# same network namespace. Everything executed (kproxy, its libraries, iptables, nft)
# comes from the image either way.
run_podman=(podman run --rm --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=$(ulimit -Su):$(ulimit -Hu)")
if "${run_podman[@]}" --network none "$image" version >/dev/null 2>"$work/podman.err"; then
  runner=podman
else
  runner=chroot
  echo "== podman cannot start containers here ($(tail -1 "$work/podman.err")); smoke tests run the image's root filesystem in a chroot instead"
  ctr=$(buildah from "$image")
  root=$(buildah mount "$ctr")
  mkdir -p "$root/demo"
fi

# in_image NETNS CAPS ARGS...: run `kproxy ARGS` from the image. NETNS "" = no network
# (podman: --network none; chroot: a fresh throw-away namespace), CAPS "" = all (root),
# else a comma list such as NET_ADMIN,NET_RAW. testdata/demo is at /demo (read-only),
# the root filesystem is read-only with tmpfs /run and /tmp, as in the DaemonSet.
in_image() {
  local netns=$1 caps=$2
  shift 2
  if [ "$runner" = podman ]; then
    local args=(--read-only --user 0 -v "$PWD/testdata/demo:/demo:ro")
    if [ -n "$netns" ]; then args+=(--network "ns:/var/run/netns/$netns"); else args+=(--network none); fi
    if [ -n "$caps" ]; then args+=(--cap-drop all --cap-add "$caps"); fi
    "${run_podman[@]}" "${args[@]}" "$image" "$@"
    return
  fi
  local bounding=-all
  if [ -n "$caps" ]; then
    bounding=-all,$(echo "$caps" | tr 'A-Z' 'a-z' | sed 's/\([a-z_]*\)/+\1/g')
  else
    bounding=+all
  fi
  local pre=(unshare --net)
  [ -n "$netns" ] && pre=(ip netns exec "$netns")
  "${pre[@]}" unshare --mount --propagation private /bin/sh -eu -c '
    root=$1 demo=$2 bounding=$3
    shift 3
    mount --bind "$root" "$root"
    mount --bind "$demo" "$root/demo"
    mount -o remount,bind,ro "$root/demo"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/run"
    mount -t tmpfs tmpfs "$root/tmp"
    mount -o remount,bind,ro "$root"
    exec chroot "$root" /usr/bin/setpriv --bounding-set "$bounding" --inh-caps -all \
      -- /usr/local/bin/kproxy "$@"
  ' sh "$root" "$PWD/testdata/demo" "$bounding" "$@"
}

echo "== smoke ($runner): version"
in_image "" "" version | tee "$work/version"
grep -q "kproxy $version" "$work/version"

echo "== smoke ($runner): demo render (image = host binary)"
# shellcheck disable=SC2046
demo=(--snapshot /demo/cluster.yaml $(cat testdata/demo/args))
for mode in iptables nftables; do
  in_image "" "" render --mode "$mode" "${demo[@]}" >"$work/render-$mode.image"
  # shellcheck disable=SC2046
  "$bin" render --mode "$mode" --snapshot testdata/demo/cluster.yaml $(cat testdata/demo/args) \
    >"$work/render-$mode.host"
  cmp "$work/render-$mode.image" "$work/render-$mode.host"
  echo "$mode: $(wc -l <"$work/render-$mode.image") lines, identical"
done

echo "== smoke ($runner): apply in network namespace $ns with the DaemonSet's capabilities"
for mode in iptables nftables; do
  ip netns add "$ns"
  in_image "$ns" NET_ADMIN,NET_RAW apply --mode "$mode" "${demo[@]}"
  if [ "$mode" = iptables ]; then
    n=$(ip netns exec "$ns" iptables-save | grep -c '^-A KUBE-')
  else
    n=$(ip netns exec "$ns" nft list table ip kube-proxy | grep -c .)
  fi
  echo "$mode: applied ($n lines of kube-proxy rules in $ns)"
  [ "$n" -gt 10 ]
  # kproxy diff (shadow mode's capabilities: + SYS_ADMIN for its scratch namespace).
  in_image "$ns" NET_ADMIN,NET_RAW,SYS_ADMIN diff --mode "$mode" "${demo[@]}"
  # Without NET_ADMIN the image must fail cleanly, not half-apply.
  if in_image "$ns" NET_RAW apply --mode "$mode" "${demo[@]}" 2>"$work/nocap.err"; then
    echo "$mode: apply without NET_ADMIN succeeded" >&2
    exit 1
  fi
  echo "$mode: without NET_ADMIN: refused ($(tail -1 "$work/nocap.err"))"
  ip netns del "$ns"
done

echo "== ok: $image ($(buildah inspect --type image --format '{{.Size}}' "$image" 2>/dev/null || podman image inspect --format '{{.Size}}' "$image") bytes), smoke-tested with $runner"
