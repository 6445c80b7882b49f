"""One round of streams built to make an observer of Redis traffic hold state, all open at once:

- MULTI without EXEC: CONNS connections each queue QUEUED commands on a real redis-server;
- requests that never get a reply: REQUESTS pipelined PINGs to a server that reads and never
  answers;
- text that starts like RESP: a POP3-like server greets with "+OK" and answers each command with
  a multi-line listing, which is not RESP.

Prints "held" once every stream has been sent (and the replies read), then keeps all connections
open until a line arrives on stdin, and closes them.
Usage: hostile_streams.py REDIS_PORT
"""

import socket
import sys
import threading

CONNS = 3
QUEUED = 80_000
REQUESTS = 200_000
LISTINGS = 20_000
BATCH = 1000


def read_until(sock, line, want, done):
    """Reads until `line` was seen `want` times (or the peer closes), then sets `done`."""
    seen, carry = 0, b""
    while seen < want:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data = carry + chunk
        seen += data.count(line)
        # Shorter than `line`: an occurrence split across chunks is counted once, whole.
        carry = data[len(data) - len(line) + 1 :]
    done.set()


def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def multi_without_exec(port, index, opened):
    sock = socket.create_connection(("127.0.0.1", port))
    opened.append(sock)
    done = threading.Event()
    # MULTI's +OK and one +QUEUED per command: one line each.
    reader = threading.Thread(
        target=read_until, args=(sock, b"\r\n", QUEUED + 1, done), daemon=True
    )
    reader.start()
    sock.sendall(command(b"MULTI"))
    one = command(b"SET", b"hostile:%d" % index, b"v")
    for _ in range(QUEUED // BATCH):
        sock.sendall(one * BATCH)
    done.wait(120)


def silent_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        while conn.recv(1 << 16):
            pass

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def unanswered_requests(opened):
    sock = socket.create_connection(("127.0.0.1", silent_server()))
    opened.append(sock)
    ping = command(b"PING")
    for _ in range(REQUESTS // BATCH):
        sock.sendall(ping * BATCH)


LISTING = b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"


def pop3_like_server():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b"+OK POP3 ready\r\n")
        pending = b""
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return
            pending += chunk
            lines = pending.count(b"\r\n")
            pending = pending[pending.rfind(b"\r\n") + 2 :]
            conn.sendall(LISTING * lines)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def text_that_looks_like_resp(opened):
    sock = socket.create_connection(("127.0.0.1", pop3_like_server()))
    opened.append(sock)
    done = threading.Event()
    reader = threading.Thread(
        target=read_until, args=(sock, b".\r\n", LISTINGS, done), daemon=True
    )
    reader.start()
    for _ in range(LISTINGS // BATCH):
        sock.sendall(b"LIST\r\n" * BATCH)
    done.wait(120)


def main():
    port = int(sys.argv[1])
    opened = []
    threads = [
        threading.Thread(target=multi_without_exec, args=(port, i, opened))
        for i in range(CONNS)
    ]
    threads.append(threading.Thread(target=unanswered_requests, args=(opened,)))
    threads.append(threading.Thread(target=text_that_looks_like_resp, args=(opened,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("held", flush=True)
    sys.stdin.readline()
    for sock in opened:
        sock.close()


main()
