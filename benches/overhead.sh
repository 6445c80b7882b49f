#!/usr/bin/env bash
# What respwatchd costs a busy Redis: redis-benchmark against a local redis-server with and
# without the daemon, interleaved A/B so machine noise hits both alike. Prints the throughput
# ratio (with/without) per workload, the daemon's CPU seconds per million commands, and the CPU
# redis-server itself spends per command without and with the daemon: the share of the cost
# that the kernel programs add inside Redis' own syscalls, which a spare core does not absorb;
# and how much of the machine's CPU time stayed idle without and with the daemon (on a small
# machine, the daemon's runs also leave the benchmark and Redis waiting on each other).
# Usage: benches/overhead.sh [rounds] [requests]   (root; builds the daemon first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-5}
requests=${2:-200000}
bash scripts/bootstrap.sh >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -q -p respwatchd

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --save '' --appendonly no --daemonize no --loglevel warning >/dev/null &
redis_pid=$!
daemon_pid=
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  kill "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done

# The daemon serves /metrics only once its programs are loaded and attached. Loading (the
# kernel's verifier) takes a second or more of CPU: counted as the daemon's cost of the first
# commands, it would inflate that cost, and it would slow the benchmark's start.
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
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

printf '%-14s %6s %14s %14s %8s %14s %22s %14s\n' workload round "rps without" "rps with" ratio "cpu s/Mcmd" "redis us/cmd w/o→with" "idle% w/o→with"
for workload in "-P 1" "-P 16"; do
  total_ratio=0
  for round in $(seq "$rounds"); do
    redis_before=$(cpu_seconds "$redis_pid")
    jiffies_before=$(cpu_jiffies)
    # shellcheck disable=SC2086
    without=$(bench $workload)
    idle_without=$(idle_percent "$jiffies_before" "$(cpu_jiffies)")
    redis_without=$(us_per_cmd "$redis_before" "$(cpu_seconds "$redis_pid")" "${workload#-P }")
    ./target/release/respwatchd --log error --metrics-listen "127.0.0.1:$metrics_port" &
    daemon_pid=$!
    wait_until_serving
    before=$(cpu_seconds "$daemon_pid")
    redis_before=$(cpu_seconds "$redis_pid")
    jiffies_before=$(cpu_jiffies)
    # shellcheck disable=SC2086
    with=$(bench $workload)
    idle_with=$(idle_percent "$jiffies_before" "$(cpu_jiffies)")
    after=$(cpu_seconds "$daemon_pid")
    redis_with=$(us_per_cmd "$redis_before" "$(cpu_seconds "$redis_pid")" "${workload#-P }")
    kill "$daemon_pid"; wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
    ratio=$(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.3f", a / b }')
    # Two commands (SET and GET) per request slot: 2 × requests commands per run.
    # shellcheck disable=SC2086
    cpu=$(awk -v a="$after" -v b="$before" -v n="$(run_requests $workload)" 'BEGIN { printf "%.2f", (a - b) / (2 * n / 1e6) }')
    total_ratio=$(awk -v t="$total_ratio" -v r="$ratio" 'BEGIN { print t + r }')
    printf '%-14s %6s %14s %14s %8s %14s %22s %14s\n' "GET/SET $workload" "$round" "$without" "$with" "$ratio" "$cpu" "$redis_without → $redis_with" "$idle_without → $idle_with"
  done
  printf '%-14s %6s %14s %14s %8s\n' "GET/SET $workload" mean "" "" "$(awk -v t="$total_ratio" -v n="$rounds" 'BEGIN { printf "%.3f", t / n }')"
done
