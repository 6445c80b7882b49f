#!/usr/bin/env bash
# Ring records of real redis-benchmark runs, for the pipeline bench's `captured-p1` and
# `captured-p16` cases: a daemon built with the `record-dump` feature (into its own target
# directory) writes every record it takes while `redis-benchmark -c 50 -t set,get` runs against
# a local redis-server, once at -P 1 and once at -P 16: both ends of every connection, packets
# split and batched as the kernel delivered them. Writes target/bench-records/p1.records and
# p16.records, each with the number of commands the server ran meanwhile beside it (.commands).
# Usage: benches/capture-records.sh [requests]   (root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requests=${1:-20000}
bash scripts/bootstrap.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
CARGO_TARGET_DIR=target/record-dump cargo build --release -q -p respwatchd --features record-dump
daemon=target/record-dump/release/respwatchd
out=target/bench-records
mkdir -p "$out"

source benches/common.sh
start_redis
commands() { redis-cli -p "$port" info stats | awk -F: '/^total_commands_processed/ { print $2 + 0 }'; }

for pipeline in 1 16; do
  metrics_port=$(free_port)
  RESPWATCH_RECORD_DUMP="$out/p$pipeline.records" "$daemon" --log warn \
    --grpc-listen "127.0.0.1:$(free_port)" --metrics-listen "127.0.0.1:$metrics_port" &
  daemon_pid=$!
  until curl -sf "127.0.0.1:$metrics_port/metrics" >/dev/null; do
    kill -0 "$daemon_pid" || { echo "respwatchd exited during startup" >&2; exit 1; }
    sleep 0.1
  done
  before=$(commands)
  redis-benchmark -p "$port" -c 50 -n "$requests" -t set,get -P "$pipeline" -q >/dev/null
  after=$(commands)
  # Both INFO calls are seen too: the first counts in the difference, the second does not.
  echo $((after - before + 1)) > "$out/p$pipeline.commands"
  sleep 0.5
  kill -TERM "$daemon_pid"
  wait "$daemon_pid" || true
  daemon_pid=
  printf 'p%s: %s commands, %s bytes of records\n' "$pipeline" \
    "$(cat "$out/p$pipeline.commands")" "$(stat -c %s "$out/p$pipeline.records")"
done
