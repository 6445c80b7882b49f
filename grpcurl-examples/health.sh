#!/usr/bin/env bash
# Standard gRPC health check (grpc.health.v1), overall and for the Observer service.
set -euo pipefail
. "$(dirname "$0")/common.sh"
"$GRPCURL" "${TLS[@]}" "$SERVER" grpc.health.v1.Health/Check
"$GRPCURL" "${TLS[@]}" -d '{"service": "respwatch.v1.Observer"}' "$SERVER" grpc.health.v1.Health/Check
