#!/usr/bin/env bash
# The daemon's version, uptime, attached programs, counters and losses.
set -euo pipefail
. "$(dirname "$0")/common.sh"
"$GRPCURL" "${TLS[@]}" "$SERVER" respwatch.v1.Observer/GetStatus
