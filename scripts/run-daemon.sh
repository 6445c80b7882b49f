#!/usr/bin/env bash
# Runs respwatchd on this host (no Kubernetes needed), after installing whatever is missing.
# Arguments go to respwatchd, e.g. `scripts/run-daemon.sh --keys truncate:16`. Server
# reflection is on here (for the grpcurl examples; the API listens on loopback only), unless
# RESPWATCH_REFLECTION=false.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p respwatchd -p redisctl
RESPWATCH_REFLECTION=${RESPWATCH_REFLECTION:-true} exec ./target/release/respwatchd "$@"
