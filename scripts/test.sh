#!/usr/bin/env bash
# Runs every test: installs what is missing (scripts/bootstrap.sh), builds once in release
# mode, checks formatting and lints, then runs the unit, property and eBPF integration tests.
# Needs root: the integration tests load eBPF programs and start redis-server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --no-fail-fast
