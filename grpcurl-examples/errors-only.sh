#!/usr/bin/env bash
# Live commands that got an error reply (WRONGTYPE, OOM, NOAUTH...), for a few seconds.
# Usage: errors-only.sh [SECONDS]
set -euo pipefail
. "$(dirname "$0")/common.sh"
seconds=${1:-10}
stream_for "$seconds" -d '{"allow": [{"errors_only": true}]}' "$SERVER" respwatch.v1.Observer/Watch
