# Sourced by the examples. SERVER: the daemon's --grpc-listen address; GRPCURL: the grpcurl
# binary. Both can be set in the environment.
SERVER=${SERVER:-127.0.0.1:50051}
GRPCURL=${GRPCURL:-grpcurl}
# The daemon listens in plain text on loopback by default; pass TLS flags through GRPCURL_TLS
# (e.g. "-cacert ca.pem") when it serves TLS.
if [ -n "${GRPCURL_TLS:-}" ]; then
  # shellcheck disable=SC2206
  TLS=($GRPCURL_TLS)
else
  TLS=(-plaintext)
fi
# A daemon run with --authz kubernetes wants a bearer token on every Observer call, e.g.
# RESPWATCH_TOKEN=$(kubectl create token my-sa). Health and reflection need none.
if [ -n "${RESPWATCH_TOKEN:-}" ]; then
  TLS+=(-H "authorization: Bearer $RESPWATCH_TOKEN")
fi
# Streams end after SECONDS (grpcurl reports DeadlineExceeded then: that is the normal end).
stream_for() {
  local seconds=$1
  shift
  local status=0
  "$GRPCURL" "${TLS[@]}" -max-time "$seconds" "$@" || status=$?
  # grpcurl exits non-zero when -max-time ends the stream; only other failures count.
  if [ "$status" -ne 0 ] && [ "$status" -ne 4 ] && [ "$status" -ne 68 ]; then
    return "$status"
  fi
}
