#!/usr/bin/env bash
# Live commands slower than a threshold, as Redis servers see them, for a few seconds.
# Usage: slow-commands.sh [MIN_USEC] [SECONDS]   (default 5000 µs = 5 ms)
set -euo pipefail
. "$(dirname "$0")/common.sh"
min_usec=${1:-5000}
seconds=${2:-10}
stream_for "$seconds" -d "{\"allow\": [{\"role\": \"ROLE_SERVER\", \"min_latency_usec\": $min_usec}]}" \
  "$SERVER" respwatch.v1.Observer/Watch
