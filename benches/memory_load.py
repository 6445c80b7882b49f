"""Load for benches/memory.sh: PROCESSES client processes, each with CONNECTIONS connections,
each connection sending the same 50 commands (one of each, pipelined) in rounds for SECONDS, at
RATE commands per second in all: every process counts in 50 stats rows of its own.
Usage: memory_load.py PORT PROCESSES CONNECTIONS SECONDS RATE"""
import os
import socket
import sys
import time

port, processes, connections, seconds, rate = (int(a) for a in sys.argv[1:6])


def commands(p):
    s, h, z, l, c, t = (f"m{p}:{k}".encode() for k in ("s", "h", "z", "l", "c", "t"))
    return [
        [b"SET", s, b"value"], [b"GET", s], [b"INCR", c], [b"DECR", c], [b"EXISTS", s],
        [b"TYPE", s], [b"TTL", s], [b"PTTL", s], [b"STRLEN", s], [b"SETRANGE", s, b"0", b"v"],
        [b"GETRANGE", s, b"0", b"2"], [b"SETNX", s, b"x"], [b"MGET", s, c], [b"MSET", t, b"1"],
        [b"DEL", b"m-none"], [b"UNLINK", b"m-none"], [b"TOUCH", s], [b"PERSIST", s],
        [b"INCRBY", c, b"2"], [b"DECRBY", c, b"2"], [b"INCRBYFLOAT", t, b"0.5"],
        [b"HSET", h, b"f", b"v"], [b"HGET", h, b"f"], [b"HEXISTS", h, b"f"], [b"HLEN", h],
        [b"HINCRBY", h, b"n", b"1"], [b"HGETALL", h], [b"HKEYS", h], [b"HVALS", h],
        [b"SADD", f"m{p}:set".encode(), b"a"], [b"SISMEMBER", f"m{p}:set".encode(), b"a"],
        [b"SCARD", f"m{p}:set".encode()], [b"SMEMBERS", f"m{p}:set".encode()],
        [b"ZADD", z, b"1", b"a"], [b"ZSCORE", z, b"a"], [b"ZCARD", z], [b"ZRANK", z, b"a"],
        [b"ZRANGE", z, b"0", b"-1"], [b"ZCOUNT", z, b"0", b"10"], [b"RPUSH", l, b"x"],
        [b"LPOP", l], [b"LLEN", l], [b"LINDEX", l, b"0"], [b"PING"], [b"ECHO", b"hi"],
        [b"DBSIZE"], [b"TIME"], [b"BITCOUNT", s], [b"GETBIT", s, b"1"],
        [b"PFADD", f"m{p}:hll".encode(), b"a"],
    ]


def encode(command):
    out = b"*%d\r\n" % len(command)
    for arg in command:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def reply_end(data, at):
    """Where the RESP2 reply starting at `at` ends, or None while it is incomplete."""
    line_end = data.find(b"\r\n", at)
    if line_end < 0:
        return None
    kind, value = data[at:at + 1], data[at + 1:line_end]
    if kind == b"$":
        length = int(value)
        end = line_end + 2 + (length + 2 if length >= 0 else 0)
        return end if end <= len(data) else None
    if kind == b"*":
        at = line_end + 2
        for _ in range(max(int(value), 0)):
            at = reply_end(data, at)
            if at is None:
                return None
        return at
    return line_end + 2


def read_replies(sock, count):
    data, at = b"", 0
    while count:
        end = reply_end(data, at) if at < len(data) else None
        if end is None:
            data += sock.recv(65536)
            continue
        at, count = end, count - 1


def client(p):
    batch = b"".join(encode(c) for c in commands(p))
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    start = time.monotonic()
    per_round = 50 * connections / (rate / processes)
    rounds = 0
    while time.monotonic() < start + seconds:
        rounds += 1
        for sock in socks:
            sock.sendall(batch)
        for sock in socks:
            read_replies(sock, 50)
        time.sleep(max(0.0, start + rounds * per_round - time.monotonic()))


children = []
for p in range(processes):
    pid = os.fork()
    if pid == 0:
        client(p)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
