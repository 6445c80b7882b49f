#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/bootstrap.sh), builds once in release
# mode, checks formatting and lints, then runs the unit, property and eBPF integration tests.
# Needs root: the integration tests load eBPF programs and start redis-server.
# With --fast: formatting, lints, the unit and property tests and the allocation test, which need no root
# (a quick loop while editing; CI runs everything).
# Each tier prints its wall time, so the CI limit (90 minutes) stays in view.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Runs one tier (its name, then the command) and prints how long it took.
tier() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  echo "== $name: $((SECONDS - start)) s (total $((SECONDS - suite_start)) s)"
}
suite_start=$SECONDS
fast=false
case "${1:-}" in
  "") ;;
  --fast) fast=true ;;
  *) echo "usage: scripts/test.sh [--fast]" >&2; exit 2 ;;
esac
if $fast && [ "$(id -u)" -ne 0 ]; then
  # The bootstrap installs packages, which needs root; the fast tier only needs what it built.
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || { echo "no cargo: run scripts/bootstrap.sh as root once" >&2; exit 1; }
else
  tier "bootstrap" bash scripts/bootstrap.sh
  export PATH="$HOME/.cargo/bin:$PATH"
fi

tier "cargo fmt --check" cargo fmt --all -- --check
tier "cargo clippy" cargo clippy --release --all-targets -- -D warnings
# The tests' build also lets them crash the pipeline on purpose (never in a user's build).
features=(--features respwatchd/fault-injection)
tier "cargo clippy (fault-injection)" cargo clippy --release --all-targets "${features[@]}" -- -D warnings
if $fast; then
  tier "cargo test: unit and property tests" cargo test --release --lib --bins "${features[@]}"
  tier "cargo test: decoder tests" cargo test --release -p respwatch-resp --test "*"
  tier "cargo test: allocations" cargo test --release -p respwatchd --test allocations "${features[@]}"
  exit 0
fi
tier "cargo test (everything)" cargo test --release --no-fail-fast "${features[@]}"
