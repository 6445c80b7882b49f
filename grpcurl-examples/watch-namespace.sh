#!/usr/bin/env bash
# Live commands of one Kubernetes namespace for a few seconds.
# Usage: watch-namespace.sh [NAMESPACE] [SECONDS]   ("" = host processes, the default)
set -euo pipefail
. "$(dirname "$0")/common.sh"
namespace=${1:-}
seconds=${2:-10}
stream_for "$seconds" -d "{\"allow\": [{\"namespace\": \"$namespace\"}]}" "$SERVER" respwatch.v1.Observer/Watch
