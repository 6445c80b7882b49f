# Shared by the bench scripts (sourced): free ports, a local redis-server, and stopping what a
# script started when it exits.

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts redis-server on a free loopback port (extra arguments are passed on) and waits until it
# answers: sets $port and $redis_pid. Whatever runs as $daemon_pid and redis-server are stopped
# when the script exits.
start_redis() {
  port=$(free_port)
  redis-server --port "$port" --save '' --appendonly no --daemonize no --loglevel warning "$@" \
    >/dev/null &
  redis_pid=$!
  daemon_pid=${daemon_pid:-}
  trap stop_started EXIT
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

stop_started() {
  [ -n "${daemon_pid:-}" ] && kill "$daemon_pid" 2>/dev/null || true
  kill "$redis_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
