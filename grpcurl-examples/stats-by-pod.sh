#!/usr/bin/env bash
# Per-pod, per-command stats since the daemon started (INFO commandstats names).
# Usage: stats-by-pod.sh [NAMESPACE]   (no argument: every namespace and host process)
set -euo pipefail
. "$(dirname "$0")/common.sh"
if [ $# -gt 0 ]; then
  filter="\"allow\": [{\"namespace\": \"$1\"}],"
else
  filter=""
fi
"$GRPCURL" "${TLS[@]}" -d "{$filter \"group_by\": [\"GROUP_BY_POD\", \"GROUP_BY_COMMAND\"]}" \
  "$SERVER" respwatch.v1.Observer/GetStats
