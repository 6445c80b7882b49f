#!/usr/bin/env bash
# What respwatchd costs the processes on a node that are NOT Redis: the "node tax". Runs each
# workload below without and with the daemon, interleaved A/B per round so machine noise hits
# both alike, and prints per workload the ratio of its throughput with the daemon to without
# (for timed workloads time_without / time_with: higher is better, 1.0 = no cost; median, min
# and max over the rounds), the daemon's own CPU seconds (utime + stime) during the workload,
# and the run time of the daemon's kernel programs (kernel.bpf_stats_enabled=1 during the runs
# with the daemon): ns per invocation, invocations and total ms per workload. That time is
# spent inside the workload's own syscalls and softirqs, not in the daemon, so it shows work
# moved into the kernel. A build without the cgroup_skb/sock_ops programs (an older one, with
# syscall tracepoints) has all of its programs timed instead.
#   dd         dd if=/dev/zero of=/dev/null bs=64, 3M blocks: syscalls, no TCP (time)
#   pipe       dd | dd, 64-byte blocks through a pipe, 2M blocks: syscalls, no TCP (time)
#   tcp-bulk   one loopback TCP stream in 64 KiB writes, 4 s (MB/s)
#   tcp-rr     HTTP-like request/reply on 4 persistent loopback connections, 4 s (round trips/s)
#   tcp-churn  4 client processes each opening a connection, sending a request, reading the
#              reply and closing, as fast as they can (about 10k connections/s on 2 cores),
#              5 s (connections/s); also the daemon's RSS before and after, and its
#              respwatch_tracked_connections metric: state kept for ignored connections must
#              stay bounded
# Targets: ratio >= 0.98 for dd and pipe (no TCP: the daemon should cost nothing), >= 0.95 for
# the TCP workloads. Odd rounds run without the daemon first, even rounds with it first. The
# load generators (python3, stdlib only) are part of this script; all traffic stays on
# 127.0.0.1. On a 2-core machine the workloads keep both cores busy, so the daemon's own CPU
# competes with them and shows in the ratios too. bpf_stats_enabled adds two clock reads per
# program run (tens of ns) to every attached program while it is on, which is only during the
# runs with the daemon: the TCP ratios are slightly pessimistic. Run it on a quiet machine: other
# load, and other daemons (whose programs and Redis capture run in both A and B), add noise.
# Usage: benches/node-tax.sh [rounds]   (root; default 5 rounds: about 6 minutes on 2 cores, 9 with
#   the old syscall-tracepoint build, whose runs with it take 3x longer)
#   Uses the built target/release/respwatchd (this script does not build it);
#   RESPWATCHD=/path/to/respwatchd benches/node-tax.sh 2   measures another build, e.g. an older one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export LC_ALL=C # decimal points in EPOCHREALTIME and awk
rounds=${1:-5}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "usage: benches/node-tax.sh [rounds]" >&2; exit 2; }
daemon_bin=${RESPWATCHD:-./target/release/respwatchd}

[ "$(id -u)" = 0 ] || { echo "node-tax.sh: needs root (eBPF, sysctl)" >&2; exit 1; }
[ -x "$daemon_bin" ] || { echo "node-tax.sh: no daemon binary at $daemon_bin (build it, or set RESPWATCHD)" >&2; exit 1; }
for tool in bpftool python3 dd sysctl flock; do
  command -v "$tool" >/dev/null || { echo "node-tax.sh: needs $tool" >&2; exit 1; }
done

# One run at a time on a machine: two would time each other, and the second would take the
# first one's kernel.bpf_stats_enabled=1 for the value to restore.
exec 9>"${TMPDIR:-/tmp}/respwatch-node-tax.lock"
flock -n 9 || { echo "node-tax.sh: another run is under way" >&2; exit 1; }

tmp=$(mktemp -d)
daemon_pid=
helper_pid=
stats_before=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
  if [ -n "$helper_pid" ]; then kill "$helper_pid" 2>/dev/null || true; fi
  if [ -n "$daemon_pid" ]; then stop_daemon; fi
  sysctl -qw kernel.bpf_stats_enabled="$stats_before" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# A copy: a build finishing in the tree meanwhile must not change the daemon between runs.
cp "$daemon_bin" "$tmp/respwatchd"

# ---- load generators -----------------------------------------------------------------------
# python3 load.py bulk|rr|churn SECONDS PROCS: runs the workload, prints its rate. Workers are
# forked processes (threads would share one interpreter lock) that die with their parent.
cat >"$tmp/load.py" <<'PY'
import ctypes, os, signal, socket, sys, time

mode, seconds, procs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

def spawn(fn, *args):
    pid = os.fork()
    if pid == 0:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
        code = 0
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            print(f"{mode} worker: {e!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    return pid

def reap(pids):
    ok = True
    for pid in pids:
        ok = os.waitpid(pid, 0)[1] == 0 and ok
    return ok

def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s

def read_all(fd):
    data = b""
    while part := os.read(fd, 4096):
        data += part
    return data

def bulk():  # one stream in 64 KiB writes; MB/s that the receiver got
    lst = listener()
    port = lst.getsockname()[1]
    def sink():
        c, _ = lst.accept()
        buf = bytearray(1 << 18)
        total = 0
        while n := c.recv_into(buf):
            total += n
        c.sendall(total.to_bytes(8, "little"))
        c.close()
    pids = [spawn(sink)]
    lst.close()
    s = socket.create_connection(("127.0.0.1", port))
    chunk = b"\0" * 65536
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 8:
        part = s.recv(8 - len(got))
        if not part:
            raise SystemExit("bulk: the receiver closed early")
        got += part
    elapsed = time.monotonic() - start
    if not reap(pids):
        raise SystemExit("bulk: the receiver failed")
    print(f"{int.from_bytes(got, 'little') / elapsed / 1e6:.1f}")

def rr():  # request/reply on `procs` persistent connections; round trips/s
    lst = listener()
    port = lst.getsockname()[1]
    gate_r, gate_w = os.pipe()
    res_r, res_w = os.pipe()
    def server(c):
        buf = b""
        while part := c.recv(4096):
            buf += part
            if n := buf.count(b"\r\n\r\n"):
                buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
                c.sendall(REPLY * n)
    def client():
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        os.read(gate_r, 1)
        send, recv, now, want = s.sendall, s.recv, time.monotonic, len(REPLY)
        count = 0
        deadline = now() + seconds
        while now() < deadline:
            for _ in range(100):
                send(REQUEST)
                got = len(recv(4096))
                while got < want:
                    got += len(recv(4096))
            count += 100
        s.close()
        os.write(res_w, f"{count}\n".encode())
    pids = []
    for _ in range(procs):
        pids.append(spawn(client))
        c, _ = lst.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pids.append(spawn(server, c))
        c.close()
    lst.close()
    start = time.monotonic()
    os.write(gate_w, b"x" * procs)
    ok = reap(pids)
    elapsed = time.monotonic() - start
    os.close(res_w)
    if not ok:
        raise SystemExit("rr: a worker failed")
    print(f"{sum(int(x) for x in read_all(res_r).split()) / elapsed:.0f}")

def churn():  # open, send a request, read the reply, close; connections/s
    gate_r, gate_w = os.pipe()
    res_r, res_w = os.pipe()
    servers, clients, ports = [], [], []
    def server(lst):
        while True:
            c, _ = lst.accept()
            if not c.recv(4096):  # the parent's empty connection: stop
                return
            c.sendall(REPLY)
            c.close()  # the server closes first, as in HTTP/1.0: TIME_WAIT stays on its side
    def client(port):
        addr = ("127.0.0.1", port)
        os.read(gate_r, 1)
        new, now = socket.socket, time.monotonic
        count = 0
        deadline = now() + seconds
        while now() < deadline:
            for _ in range(20):
                s = new()
                s.connect(addr)
                s.sendall(REQUEST)
                while s.recv(4096):
                    pass
                s.close()
            count += 20
        os.write(res_w, f"{count}\n".encode())
    for _ in range(procs):  # a listener per client: 4-tuples to spare
        lst = listener()
        ports.append(lst.getsockname()[1])
        servers.append(spawn(server, lst))
        lst.close()
    for port in ports:
        clients.append(spawn(client, port))
    start = time.monotonic()
    os.write(gate_w, b"x" * procs)
    ok = reap(clients)
    elapsed = time.monotonic() - start
    for port in ports:
        socket.create_connection(("127.0.0.1", port)).close()
    ok = reap(servers) and ok
    os.close(res_w)
    if not ok:
        raise SystemExit("churn: a worker failed")
    print(f"{sum(int(x) for x in read_all(res_r).split()) / elapsed:.0f}")

{"bulk": bulk, "rr": rr, "churn": churn}[mode]()
PY

# ---- kernel programs -----------------------------------------------------------------------
# python3 bpf.py ids: ids of all loaded programs, comma-separated.
# python3 bpf.py pick OWNED BEFORE: the daemon's programs to time, then a tab, then what they
#   are. OWNED: the ids the daemon holds fds of; if none, those not loaded BEFORE it started.
#   Its cgroup_skb/sock_ops programs ingress, egress and sock_events if it has them, else all.
# python3 bpf.py loaded IDS: those of IDS still loaded.
# python3 bpf.py snap IDS: run time and run count of each of IDS, as one line of JSON.
# python3 bpf.py delta FILE BEFORE AFTER: prints "run_time_ns run_cnt" between two snaps, summed
#   over the programs, and appends each program's share to FILE (one JSON line per run).
# python3 bpf.py report FILE...: the median per program over the runs in each FILE.
cat >"$tmp/bpf.py" <<'PY'
import json, os, statistics, subprocess, sys

def progs():
    out = subprocess.run(["bpftool", "prog", "show", "-j"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "[]")

def ids(arg):
    return {int(x) for x in arg.split(",") if x}

def label(p):
    return f"{p.get('name', '?')} ({p.get('type', '?')})"

cmd = sys.argv[1]
if cmd == "ids":
    print(",".join(str(p["id"]) for p in progs()))
elif cmd == "pick":
    owned, before, loaded = ids(sys.argv[2]), ids(sys.argv[3]), progs()
    mine = [p for p in loaded if p["id"] in owned] or [p for p in loaded if p["id"] not in before]
    main = [p for p in mine if p.get("name") in ("ingress", "egress", "sock_events")
            and p.get("type") in ("cgroup_skb", "sock_ops")]
    if main:
        what = ", ".join(sorted(label(p) for p in main))
    else:
        by_type = {}
        for p in mine:
            by_type.setdefault(p.get("type", "?"), []).append(p.get("name", "?"))
        what = ("no cgroup_skb/sock_ops programs ingress/egress/sock_events; timing all "
                f"{len(mine)} of its programs: "
                + "; ".join(f"{t} x{len(n)}: {', '.join(sorted(n))}" for t, n in sorted(by_type.items())))
    print(",".join(str(p["id"]) for p in (main or mine)) + "\t" + what)
elif cmd == "loaded":
    want = ids(sys.argv[2])
    print(",".join(str(p["id"]) for p in progs() if p["id"] in want))
elif cmd == "snap":
    want = ids(sys.argv[2])
    print(json.dumps({p["id"]: [label(p), p.get("run_time_ns", 0), p.get("run_cnt", 0)]
                      for p in progs() if p["id"] in want}))
elif cmd == "delta":
    before, after = json.loads(sys.argv[3]), json.loads(sys.argv[4])
    shares = {}
    for pid, (name, ns, cnt) in after.items():
        _, ns0, cnt0 = before.get(pid, [name, 0, 0])
        s = shares.setdefault(name, [0, 0])
        s[0] += ns - ns0
        s[1] += cnt - cnt0
    with open(sys.argv[2], "a") as f:
        f.write(json.dumps(shares) + "\n")
    print(sum(s[0] for s in shares.values()), sum(s[1] for s in shares.values()))
elif cmd == "report":
    for path in sys.argv[2:]:
        workload = os.path.basename(path).removesuffix(".bpf")
        runs = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
        names = sorted({n for r in runs for n, (_, cnt) in r.items() if cnt})
        if not names:
            print(f"{workload:<10} {'(none of them ran)' if runs else '(no complete stats)'}")
        for name in names:
            ns = [r.get(name, [0, 0])[0] for r in runs]
            cnt = [r.get(name, [0, 0])[1] for r in runs]
            per = f"{sum(ns) / sum(cnt):.0f}" if sum(cnt) else "-"
            print(f"{workload:<10} {name:<40} {per:>11} {statistics.median(cnt):>11.0f}"
                  f" {statistics.median(ns) / 1e6:>9.1f}")
PY

source benches/common.sh

# Whether a child process still runs (a zombie, exited but not yet waited for, does not).
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

cpu_seconds() { # utime + stime of a process (all its threads), in seconds
  sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{ print ($12 + $13) / hz }'
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# The respwatch_tracked_connections metric of the daemon, or "-" if it has none.
tracked_connections() {
  python3 - "http://127.0.0.1:$metrics_port/metrics" <<'PY'
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
text = opener.open(sys.argv[1], timeout=10).read().decode()
values = [float(l.split()[-1]) for l in text.splitlines()
          if l.split("{")[0].split()[0:1] == ["respwatch_tracked_connections"]]
print(f"{sum(values):.0f}" if values else "-")
PY
}

ids_of_fds() { # ids of the programs a process holds fds of (programs and links), comma-separated
  { grep -h '^prog_id:' /proc/"$1"/fdinfo/* 2>/dev/null || true; } | awk '{ print $2 }' | sort -un | paste -sd, -
}

# Starts the daemon and waits, at most 60 s, until it says it is ready or serves /metrics;
# loading (the kernel's verifier) takes a second or more of CPU that must not count as the cost
# of the workload. Sets daemon_pid, metrics_port and prog_ids (the programs to time).
start_daemon() {
  local before grpc_port picked
  before=$(python3 "$tmp/bpf.py" ids)
  grpc_port=$(free_port)
  metrics_port=$(free_port)
  # Emptied here: the background job's own redirection may truncate it only after the first
  # look below, which would then find the previous daemon's "ready".
  : >"$tmp/daemon.log"
  "$tmp/respwatchd" --log info --grpc-listen "127.0.0.1:$grpc_port" \
    --metrics-listen "127.0.0.1:$metrics_port" >/dev/null 2>"$tmp/daemon.log" &
  daemon_pid=$!
  local deadline=$((SECONDS + 60))
  until grep -q "respwatchd ready" "$tmp/daemon.log" \
    || (exec 3<>"/dev/tcp/127.0.0.1/$metrics_port") 2>/dev/null; do
    if ! alive "$daemon_pid"; then
      echo "respwatchd exited during startup:" >&2
      tail -n 20 "$tmp/daemon.log" >&2
      wait "$daemon_pid" 2>/dev/null || true
      daemon_pid=
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "respwatchd was not ready within 60 s" >&2
      exit 1
    fi
    sleep 0.1
  done
  picked=$(python3 "$tmp/bpf.py" pick "$(ids_of_fds "$daemon_pid")" "$before")
  prog_ids=${picked%%$'\t'*}
  prog_what=${picked#*$'\t'}
  [ -n "$prog_ids" ] || prog_what="none found: no kernel programs to time"
  sleep 1 # let start-up work (threads, first map reads) settle before the clock starts
}

stop_daemon() { # SIGTERM, then SIGKILL after 20 s
  kill -TERM "$daemon_pid" 2>/dev/null || true
  for _ in $(seq 200); do
    alive "$daemon_pid" || break
    sleep 0.1
  done
  kill -KILL "$daemon_pid" 2>/dev/null || true
  wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=
}

# Warns if the daemon's programs outlive it by more than 2 s: they would tax the next run
# without it.
check_unloaded() {
  local still
  for _ in $(seq 20); do
    still=$(python3 "$tmp/bpf.py" loaded "$prog_ids")
    [ -z "$still" ] && return
    sleep 0.1
  done
  echo "warning: programs $still still loaded 2 s after respwatchd exited" >&2
}

bpf_snap() {
  python3 "$tmp/bpf.py" snap "$prog_ids"
}

# Runs one workload, in the background so that the exit trap can stop it; sets `value`.
run_workload() {
  local start
  case $1 in
    dd)
      start=$EPOCHREALTIME
      dd if=/dev/zero of=/dev/null bs=64 count=3000000 status=none &
      helper_pid=$!
      wait "$helper_pid" || { echo "workload dd failed" >&2; exit 1; }
      value=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
      ;;
    pipe)
      start=$EPOCHREALTIME
      dd if=/dev/zero bs=64 count=2000000 status=none | dd of=/dev/null bs=64 status=none &
      helper_pid=$!
      wait "$helper_pid" || { echo "workload pipe failed" >&2; exit 1; }
      value=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
      ;;
    tcp-bulk | tcp-rr | tcp-churn)
      local seconds=4
      [ "$1" = tcp-churn ] && seconds=5
      python3 "$tmp/load.py" "${1#tcp-}" "$seconds" 4 >"$tmp/out" &
      helper_pid=$!
      wait "$helper_pid" || { echo "workload $1 failed" >&2; exit 1; }
      value=$(cat "$tmp/out")
      ;;
  esac
  helper_pid=
}

unit_of() {
  case $1 in
    dd | pipe) echo s ;;
    tcp-bulk) echo MB/s ;;
    tcp-rr) echo rt/s ;;
    tcp-churn) echo conn/s ;;
  esac
}

target_of() {
  case $1 in
    dd | pipe) echo 0.98 ;;
    *) echo 0.95 ;;
  esac
}

# median, min and max of numbers on stdin
stats3() {
  sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - -"; exit } m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%s %s %s\n", m, v[1], v[NR] }'
}

# The median of column $2 of workload $1's results, printed with format $3; "-" if none.
median_of() {
  awk -v c="$2" '$c != "-" { print $c }' "$tmp/$1.results" | stats3 \
    | awk -v f="$3" '$1 == "-" { print "-"; next } { printf f "\n", $1 }'
}

# One run of $1 with the daemon; sets with, cpu_before/after, snap_before/after, extra and
# stats_note.
run_with() {
  start_daemon
  sysctl -qw kernel.bpf_stats_enabled=1
  extra=
  if [ "$1" = tcp-churn ]; then
    rss_before=$(rss_kib "$daemon_pid")
    tracked_before=$(tracked_connections)
  fi
  snap_before=$(bpf_snap)
  cpu_before=$(cpu_seconds "$daemon_pid")
  run_workload "$1"
  with=$value
  cpu_after=$(cpu_seconds "$daemon_pid")
  snap_after=$(bpf_snap)
  stats_note=
  if [ "$(sysctl -n kernel.bpf_stats_enabled)" != 1 ]; then
    stats_note=" (bpf stats were switched off meanwhile, by something else: bpf columns incomplete)"
  fi
  if [ "$1" = tcp-churn ]; then
    extra="RSS $rss_before → $(rss_kib "$daemon_pid"), tracked $tracked_before → $(tracked_connections)"
  fi
  sysctl -qw kernel.bpf_stats_enabled="$stats_before"
  stop_daemon
  check_unloaded
}

others=
for pid in $(pgrep -x respwatchd || true); do
  if alive "$pid"; then others="$others $pid"; fi
done
echo "daemon: $daemon_bin ($(stat -c '%y' "$daemon_bin" | cut -d. -f1)); kernel $(uname -r); $(nproc) CPUs; $rounds rounds"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "$others" ]; then
  echo "note: other respwatchd processes run (pids$others): their programs run both without and with this one"
fi
echo

workloads=(dd pipe tcp-bulk tcp-rr tcp-churn)
printf '%-10s %5s %10s %10s %-6s %7s %11s %11s %11s %9s  %s\n' workload round without with unit ratio "daemon cpu" "bpf ns/run" "bpf runs" "bpf ms" "churn: daemon RSS KiB, tracked conns"
for round in $(seq "$rounds"); do
  for workload in "${workloads[@]}"; do
    # Odd rounds run without the daemon first, even rounds with it first: whatever the first
    # run leaves behind (sockets in TIME_WAIT, a warm or cold cache) hits both sides alike.
    if [ $((round % 2)) = 1 ]; then
      run_workload "$workload"
      without=$value
      run_with "$workload"
    else
      run_with "$workload"
      run_workload "$workload"
      without=$value
    fi

    case $workload in
      dd | pipe) ratio=$(awk -v a="$without" -v b="$with" 'BEGIN { printf "%.3f", a / b }') ;;
      *) ratio=$(awk -v a="$with" -v b="$without" 'BEGIN { printf "%.3f", a / b }') ;;
    esac
    cpu=$(awk -v a="$cpu_after" -v b="$cpu_before" 'BEGIN { printf "%.2f", a - b }')
    bpf_file=$tmp/$workload.bpf
    [ -z "$stats_note" ] || bpf_file=/dev/null # left out of the medians
    read -r bpf_ns runs < <(python3 "$tmp/bpf.py" delta "$bpf_file" "$snap_before" "$snap_after")
    bpf_ms=$(awk -v t="$bpf_ns" 'BEGIN { printf "%.1f", t / 1e6 }')
    ns_run=$(awk -v t="$bpf_ns" -v n="$runs" 'BEGIN { if (n > 0) printf "%.0f", t / n; else print "-" }')
    if [ -z "$stats_note" ]; then
      echo "$ratio $cpu $ns_run $runs $bpf_ms" >>"$tmp/$workload.results"
    else
      echo "$ratio $cpu - - -" >>"$tmp/$workload.results"
    fi
    printf '%-10s %5s %10s %10s %-6s %7s %11s %11s %11s %9s  %s\n' "$workload" "$round" "$without" "$with" "$(unit_of "$workload")" "$ratio" "$cpu" "$ns_run" "$runs" "$bpf_ms" "$extra$stats_note"
  done
done

echo
echo "ratio: throughput with the daemon / without (timed: time without / time with), over $rounds rounds;"
echo "daemon cpu: its utime+stime (s) during the workload; bpf: its kernel programs' run time (medians)"
echo "kernel programs timed: $prog_what"
printf '%-10s %8s %7s %7s %7s %11s %11s %11s %9s\n' workload "ratio" min max target "daemon cpu" "bpf ns/run" "bpf runs" "bpf ms"
for workload in "${workloads[@]}"; do
  read -r median min max < <(awk '{ print $1 }' "$tmp/$workload.results" | stats3)
  target=$(target_of "$workload")
  verdict=$(awk -v m="$median" -v t="$target" 'BEGIN { print (m >= t ? "ok" : "BELOW") }')
  printf '%-10s %8.3f %7.3f %7.3f %7s %11s %11s %11s %9s  %s\n' "$workload" "$median" "$min" "$max" ">=$target" \
    "$(median_of "$workload" 2 %.2f)" "$(median_of "$workload" 3 %.0f)" \
    "$(median_of "$workload" 4 %.0f)" "$(median_of "$workload" 5 %.1f)" "$verdict"
done

echo
echo "per kernel program (ns/run over all rounds; runs and ms: median per run):"
printf '%-10s %-40s %11s %11s %9s\n' workload program "ns/run" runs ms
bpf_files=()
for workload in "${workloads[@]}"; do bpf_files+=("$tmp/$workload.bpf"); done
python3 "$tmp/bpf.py" report "${bpf_files[@]}"
