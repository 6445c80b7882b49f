#!/usr/bin/env bash
# Runs respwatchd on this host (no Kubernetes needed), after installing whatever is missing.
# Arguments go to respwatchd, e.g. `scripts/run-daemon.sh --keys hash`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p respwatchd -p redisctl
exec ./target/release/respwatchd "$@"
