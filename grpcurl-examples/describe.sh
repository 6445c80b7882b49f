#!/usr/bin/env bash
# Describes the Observer service and its main messages (via gRPC reflection).
set -euo pipefail
. "$(dirname "$0")/common.sh"
for symbol in respwatch.v1.Observer respwatch.v1.Filter respwatch.v1.CommandEvent respwatch.v1.StatsRow; do
  "$GRPCURL" "${TLS[@]}" "$SERVER" describe "$symbol"
done
