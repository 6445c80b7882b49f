"""Sends a known RESP byte stream to Redis over a plain socket (send/recv: the sendto/recvfrom
syscalls) and writes what it sent and what it received to two files, so a test can compare them
with what the capture saw. Usage: raw_exchange.py PORT SENT_FILE RECEIVED_FILE"""
import socket
import sys
import time

port, sent_path, received_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def skip_reply(buf, pos):
    """Returns the end of the reply starting at pos, or None if it is incomplete."""
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind, header = buf[pos:pos + 1], buf[pos + 1:line_end]
    pos = line_end + 2
    if kind == b"$":
        length = int(header)
        if length < 0:
            return pos
        return pos + length + 2 if len(buf) >= pos + length + 2 else None
    if kind == b"*":
        for _ in range(max(int(header), 0)):
            pos = skip_reply(buf, pos)
            if pos is None:
                return None
    return pos


def count_replies(buf):
    pos, count = 0, 0
    while pos < len(buf):
        pos = skip_reply(buf, pos)
        if pos is None:
            break
        count += 1
    return count


# Small pipelined commands, then a value far larger than the kernel's copy window.
batch = [command(b"SET", b"k%d" % i, b"v" * (i % 50)) for i in range(200)]
batch += [command(b"GET", b"k%d" % i) for i in range(200)]
big = command(b"SET", b"big", bytes(range(256)) * 400)  # a 102400-byte value
rounds = [batch, [big], [command(b"GET", b"big")], [command(b"PING")]]

sock = socket.create_connection(("127.0.0.1", port))
sent = b""
received = b""
for commands in rounds:
    message = b"".join(commands)
    sock.sendall(message)
    sent += message
    want = count_replies(received) + len(commands)
    while count_replies(received) < want:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("connection closed early")
        received += data

time.sleep(0.3)  # stay alive while the daemon looks the socket up
sock.close()
with open(sent_path, "wb") as f:
    f.write(sent)
with open(received_path, "wb") as f:
    f.write(received)
