"""Opens CONNECTIONS connections to Redis and pipelines ROUNDS batches of SETs (values of many
sizes, up to 40 KB) and GETs on each, reading every reply; then prints one JSON object per
connection with its local port and the exact bytes it sent and received, so a test can hold the
capture to them. Usage: per_connection_bytes.py PORT CONNECTIONS ROUNDS"""
import json
import socket
import sys

port, connections, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def replies_in(buf):
    """Complete replies at the start of buf (+, $ and * of bulk strings only)."""
    pos, count = 0, 0
    while pos < len(buf):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            break
        kind, header = buf[pos:pos + 1], buf[pos + 1:end]
        nxt = end + 2
        if kind == b"$" and int(header) >= 0:
            nxt += int(header) + 2
            if nxt > len(buf):
                break
        pos = nxt
        count += 1
    return count


socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
totals = {s.getsockname()[1]: [0, 0] for s in socks}
for r in range(rounds):
    for i, s in enumerate(socks):
        batch = []
        for k in range(20):
            size = (r * 7919 + i * 104729 + k * 3001) % 40000
            batch.append(command(b"SET", b"c%d:%d" % (i, k), b"v" * size))
            batch.append(command(b"GET", b"c%d:%d" % (i, k)))
        message = b"".join(batch)
        s.sendall(message)
        totals[s.getsockname()[1]][0] += len(message)
        received = b""
        while replies_in(received) < len(batch):
            data = s.recv(1 << 20)
            if not data:
                raise SystemExit("connection closed early")
            received += data
        totals[s.getsockname()[1]][1] += len(received)
for s in socks:
    s.close()
for local_port, (sent, received) in totals.items():
    print(json.dumps({"port": local_port, "sent": sent, "received": received}))
