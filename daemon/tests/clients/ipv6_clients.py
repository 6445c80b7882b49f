"""redis-py over IPv6 (::1) and over an IPv4-mapped IPv6 socket (::ffff:127.0.0.1): N SETs
each, on keys of their own. Usage: ipv6_clients.py PORT N"""
import sys

import redis

port, n = int(sys.argv[1]), int(sys.argv[2])
for host, tag in (("::1", "v6"), ("::ffff:127.0.0.1", "mapped")):
    client = redis.Redis(host=host, port=port)
    for i in range(n):
        client.set(f"{tag}:{i}", "x")
    client.close()
