#!/usr/bin/env bash
# Lists the services the daemon serves (via gRPC reflection).
set -euo pipefail
. "$(dirname "$0")/common.sh"
"$GRPCURL" "${TLS[@]}" "$SERVER" list
