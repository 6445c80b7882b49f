#!/usr/bin/env bash
# Builds the respwatchd image with buildah, FROM scratch (no registry needed): the release
# respwatchd and redisctl, the shared libraries `ldd` says they load and the dynamic loader,
# nothing else. Prints the image's size and every file in it.
#
#   scripts/build-image.sh [--tag NAME] [--bin-dir DIR]
#
# --tag      image name (default ghcr.io/respwatch/respwatchd:<workspace version>)
# --bin-dir  take respwatchd and redisctl from DIR instead of building them (`cargo build
#            --release`); the tests pass the binaries they were built with.
#
# Storage: containers' default store with the vfs driver (works on any file system and
# kernel); pass the same `--storage-driver vfs` to podman to run, save or push the image.
# Needs root and buildah + podman (scripts/bootstrap.sh installs them).
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

version=$(awk '/^\[workspace.package\]/ { section = 1; next } /^\[/ { section = 0 }
               section && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml)
[ -n "$version" ] || { echo "no [workspace.package] version in Cargo.toml" >&2; exit 1; }
tag="ghcr.io/respwatch/respwatchd:$version"
bin_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    *) echo "usage: scripts/build-image.sh [--tag NAME] [--bin-dir DIR]" >&2; exit 2 ;;
  esac
done
storage=(--storage-driver vfs)

if [ -z "$bin_dir" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --locked -p respwatchd -p redisctl
  bin_dir="$root_dir/target/release"
fi

context=$(mktemp -d "${TMPDIR:-/tmp}/respwatch-image.XXXXXX")
container=""
cleanup() {
  rm -rf "$context"
  [ -z "$container" ] || podman "${storage[@]}" rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
rootfs="$context/rootfs"
mkdir -p "$rootfs/usr/local/bin"
for bin in respwatchd redisctl; do
  [ -x "$bin_dir/$bin" ] || { echo "$bin_dir/$bin: no such executable" >&2; exit 1; }
  install -m 0755 "$bin_dir/$bin" "$rootfs/usr/local/bin/$bin"
  # Drop debug info: the release profile keeps line tables for local profiling.
  strip --strip-debug "$rootfs/usr/local/bin/$bin"
  # Every library the loader resolves (`name => /path (addr)`) and the loader itself
  # (`/path (addr)`), copied to the path it was found at.
  ldd "$bin_dir/$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    while read -r lib; do
      install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
    done
done

# The image this tag named before, removed below once the tag moves: rebuilds must not pile up.
previous=$(podman "${storage[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
buildah "${storage[@]}" build --quiet --layers=false --build-arg "VERSION=$version" \
  -f "$root_dir/deploy/Containerfile" -t "$tag" "$context" >/dev/null

current=$(podman "${storage[@]}" image inspect --format '{{.Id}}' "$tag")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman "${storage[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
echo "image $tag: $(podman "${storage[@]}" image inspect --format '{{.Size}}' "$tag") bytes"
container=$(podman "${storage[@]}" create "$tag")
podman "${storage[@]}" export "$container" | tar -tv | awk '{ print $1, $3, $6 }' | sort -k3
