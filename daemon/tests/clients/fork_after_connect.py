"""Connects to Redis and sends PING, then forks: the child sends five SETs on the inherited
socket and exits. Prints the parent's and the child's pid. Usage: fork_after_connect.py PORT"""
import os
import socket
import sys

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.sendall(b"*1\r\n$4\r\nPING\r\n")
assert sock.recv(64) == b"+PONG\r\n"
child = os.fork()
if child == 0:
    for i in range(5):
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nfork\r\n$1\r\n%d\r\n" % i)
        assert sock.recv(64) == b"+OK\r\n"
    os._exit(0)
os.waitpid(child, 0)
print(os.getpid(), child)
sock.close()
