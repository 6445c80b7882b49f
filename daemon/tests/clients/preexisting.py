"""Connections that exist before the daemon starts. Usage: preexisting.py PORT MODE
MODE idle: connects, sends one PING, prints "ready", waits for a line on stdin, then sends
  100 SETs one at a time and 100 GETs, prints "done" and exits half a second later.
MODE busy: connects and pipelines batches of 8 SETs of 100 KB values, reading the replies, a
  batch every 25 ms (about 30 MB/s), until a line arrives on stdin; prints "ready" after its
  first batch, and at the end one line per batch: its start and end time (CLOCK_MONOTONIC, ns)."""
import os
import select
import socket
import sys
import time

port, mode = int(sys.argv[1]), sys.argv[2]
sock = socket.create_connection(("127.0.0.1", port))


def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def read_replies(count):
    buf = b""
    while buf.count(b"\r\n") < count:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("closed")
        buf += data
    return buf


if mode == "idle":
    sock.sendall(command(b"PING"))
    read_replies(1)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(100):
        sock.sendall(command(b"SET", b"idle:%d" % i, b"v"))
        read_replies(1)
    for i in range(100):
        sock.sendall(command(b"GET", b"idle:%d" % i))
        reply = read_replies(2)
    print("done", flush=True)
    time.sleep(0.5)  # the daemon looks this older socket's process up in /proc
else:
    value = b"b" * 100000
    batch = b"".join(command(b"SET", b"busy:%d" % k, value) for k in range(8))
    spans = []
    while True:
        start = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sock.sendall(batch)
        read_replies(8)
        spans.append((start, time.clock_gettime_ns(time.CLOCK_MONOTONIC)))
        if len(spans) == 1:
            print("ready", flush=True)
        if select.select([sys.stdin], [], [], 0.025)[0]:
            sys.stdin.readline()
            break
    for start, end in spans:
        print(start, end)
sock.close()
