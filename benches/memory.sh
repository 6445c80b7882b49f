#!/usr/bin/env bash
# respwatchd's memory on a busy node: 1,000 client connections from 100 processes, each process
# counting in 50 stats rows (5,000 client rows, plus the server's), at about 100,000 commands/s
# (benches/memory_load.py). Prints the daemon's heap (RssAnon) idle, at its largest under the
# load and after it, with the rows and connections it tracked and the rate reached. The rings
# are file-backed mappings sized by --ring-bytes, resident from the start: RssFile, shown apart.
# Usage: benches/memory.sh [seconds] [rate]   (root; builds the daemon first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-30}
rate=${2:-100000}
bash scripts/bootstrap.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p respwatchd

source benches/common.sh
start_redis --maxclients 4000
metrics_port=$(free_port)
./target/release/respwatchd --grpc-listen "127.0.0.1:$(free_port)" \
  --metrics-listen "127.0.0.1:$metrics_port" --log warn &
daemon_pid=$!
until curl -sf "127.0.0.1:$metrics_port/metrics" >/dev/null; do
  kill -0 "$daemon_pid" || { echo "respwatchd exited during startup" >&2; exit 1; }
  sleep 0.1
done
sleep 2

kib() { awk -v field="$2:" '$1 == field { print $2 }' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }
metric() { curl -s "127.0.0.1:$metrics_port/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
commands() { redis-cli -p "$port" info stats | awk -F: '/^total_commands_processed/ { print $2 + 0 }'; }

idle=$(kib "$daemon_pid" RssAnon)
ring=$(kib "$daemon_pid" RssFile)
before=$(commands)
python3 benches/memory_load.py "$port" 100 10 "$seconds" "$rate" &
load_pid=$!
peak=0 rows=0 connections=0
while kill -0 "$load_pid" 2>/dev/null; do
  now=$(kib "$daemon_pid" RssAnon)
  [ "$now" -gt "$peak" ] && peak=$now
  r=$(metric respwatch_stats_rows); [ "${r:-0}" -gt "$rows" ] && rows=$r
  c=$(metric respwatch_tracked_connections); [ "${c:-0}" -gt "$connections" ] && connections=$c
  sleep 1
done
wait "$load_pid"
reached=$(( ($(commands) - before) / seconds ))
sleep 3
after=$(kib "$daemon_pid" RssAnon)
printf 'load: %d commands/s for %d s, %d stats rows, %d tracked connections\n' \
  "$reached" "$seconds" "$rows" "$connections"
printf 'heap (RssAnon): idle %s MiB, peak under load %s MiB, after %s MiB; rings (RssFile) %s MiB\n' \
  "$(mib "$idle")" "$(mib "$peak")" "$(mib "$after")" "$(mib "$ring")"
