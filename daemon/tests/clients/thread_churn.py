"""One connection used by many short-lived threads in turn: each sends one PING and reads the
PONG, then exits. Usage: thread_churn.py PORT THREADS"""
import socket
import sys
import threading

PING = b"*1\r\n$4\r\nPING\r\n"


def main():
    port, threads = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.create_connection(("127.0.0.1", port))

    def ping():
        sock.sendall(PING)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(64)
            if not chunk:
                sys.exit("server closed the connection")
            reply += chunk
        if reply != b"+PONG\r\n":
            sys.exit(f"unexpected reply {reply!r}")

    for _ in range(threads):
        thread = threading.Thread(target=ping)
        thread.start()
        thread.join()
    sock.close()


if __name__ == "__main__":
    main()
