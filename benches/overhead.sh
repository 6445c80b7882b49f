#!/usr/bin/env bash
# What respwatchd costs a busy Redis: redis-benchmark against a local redis-server with and
# without the daemon, interleaved A/B so machine noise hits both alike. Prints the throughput
# ratio (with/without) per workload, the daemon's CPU seconds per million commands, and the CPU
# redis-server itself spends per command without and with the daemon (the part of the cost the
# kernel programs add inside Redis' own sends, which a spare core does not absorb), and how much
# of the machine's CPU time stayed idle without and with the daemon.
#
# With RESPWATCHD_BASELINE=/path/to/an/older/respwatchd, every round also runs that build, in
# the same rotation: before/after numbers from one run, on one machine state.
# Usage: benches/overhead.sh [rounds] [requests]   (root; builds the daemon first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-5}
requests=${2:-200000}
bash scripts/bootstrap.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p respwatchd
builds=("current:./target/release/respwatchd")
if [ -n "${RESPWATCHD_BASELINE:-}" ]; then
  builds+=("baseline:$RESPWATCHD_BASELINE")
fi

source benches/common.sh
start_redis

# The daemon serves /metrics only once its programs are loaded and attached. Loading (the
# kernel's verifier) takes CPU: counted as the daemon's cost of the first commands, it would
# inflate that cost, and it would slow the benchmark's start.
metrics_port=$(free_port)
wait_until_serving() {
  for _ in $(seq 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$metrics_port") 2>/dev/null; then
      sleep 0.5
      return
    fi
    kill -0 "$daemon_pid" 2>/dev/null || { echo "respwatchd exited during startup" >&2; exit 1; }
    sleep 0.1
  done
  echo "respwatchd did not serve /metrics within 30 s" >&2
  exit 1
}

cpu_seconds() { # utime + stime of a process, in seconds
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

# rps for one run of redis-benchmark: the sum of the SET and GET rates. Pipelined runs send
# 10x the requests so that both workloads run for about as long.
bench() {
  redis-benchmark -p "$port" -c 50 -n "$(run_requests "$@")" -t set,get "$@" --csv \
    | awk -F, 'NR > 1 { gsub(/"/, "", $2); sum += $2 } END { printf "%.0f", sum }'
}

run_requests() {
  if [ "$2" = 1 ]; then echo "$requests"; else echo $((requests * 10)); fi
}

# Idle and total jiffies of all CPUs, from /proc/stat's "cpu" line.
cpu_jiffies() {
  awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}

# Percentage of CPU time left idle between two cpu_jiffies readings.
idle_percent() {
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]) }'
}

# CPU microseconds per command between two cpu_seconds readings ($3: the bench's -P value).
us_per_cmd() {
  awk -v a="$2" -v b="$1" -v n="$(run_requests -P "$3")" 'BEGIN { printf "%.2f", (a - b) * 1e6 / (2 * n) }'
}

# One measured run: `rps daemon_cpu_s_per_Mcmd redis_us_per_cmd idle%`, with the daemon binary
# $2 running (none when empty) for workload $1 ("-P 1" or "-P 16").
measure() {
  local workload=$1 binary=$2 daemon_before=0 daemon_after=0
  if [ -n "$binary" ]; then
    "$binary" --log error --metrics-listen "127.0.0.1:$metrics_port" \
      --grpc-listen "127.0.0.1:$(free_port)" &
    daemon_pid=$!
    wait_until_serving
    daemon_before=$(cpu_seconds "$daemon_pid")
  fi
  local redis_before jiffies_before rps
  redis_before=$(cpu_seconds "$redis_pid")
  jiffies_before=$(cpu_jiffies)
  # shellcheck disable=SC2086
  rps=$(bench $workload)
  local idle redis_us
  idle=$(idle_percent "$jiffies_before" "$(cpu_jiffies)")
  redis_us=$(us_per_cmd "$redis_before" "$(cpu_seconds "$redis_pid")" "${workload#-P }")
  if [ -n "$binary" ]; then
    daemon_after=$(cpu_seconds "$daemon_pid")
    kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
  fi
  # Two commands (SET and GET) per request slot: 2 × requests commands per run.
  # shellcheck disable=SC2086
  local cpu
  cpu=$(awk -v a="$daemon_after" -v b="$daemon_before" -v n="$(run_requests $workload)" 'BEGIN { printf "%.2f", (a - b) / (2 * n / 1e6) }')
  echo "$rps $cpu $redis_us $idle"
}

printf '%-14s %6s %-9s %12s %12s %8s %12s %22s %16s\n' workload round build "rps without" "rps with" ratio "cpu s/Mcmd" "redis us/cmd w/o→with" "idle% w/o→with"
for workload in "-P 1" "-P 16"; do
  declare -A ratios=()
  for round in $(seq "$rounds"); do
    read -r without _ redis_without idle_without <<<"$(measure "$workload" "")"
    for build in "${builds[@]}"; do
      name=${build%%:*}
      read -r with cpu redis_with idle_with <<<"$(measure "$workload" "${build#*:}")"
      ratio=$(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.3f", a / b }')
      ratios[$name]="${ratios[$name]:-} $ratio"
      printf '%-14s %6s %-9s %12s %12s %8s %12s %22s %16s\n' "GET/SET $workload" "$round" "$name" \
        "$without" "$with" "$ratio" "$cpu" "$redis_without → $redis_with" "$idle_without → $idle_with"
    done
  done
  for build in "${builds[@]}"; do
    name=${build%%:*}
    # shellcheck disable=SC2086
    printf '%-14s %6s %-9s %12s %12s %8s\n' "GET/SET $workload" median "$name" "" "" \
      "$(printf '%s\n' ${ratios[$name]} | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
  done
  unset ratios
done
