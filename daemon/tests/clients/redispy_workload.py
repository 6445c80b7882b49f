"""Drives Redis with redis-py (sendto/recvfrom family). Usage: redispy_workload.py PORT"""
import sys
import time

import redis

r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
for i in range(100):
    r.set(f"py:{i}", "z" * i)
    r.get(f"py:{i}")
pipe = r.pipeline(transaction=False)
for i in range(100):
    pipe.incr("py:counter")
pipe.execute()
r.set("py:big", b"w" * 300000)
r.get("py:big")
time.sleep(0.3)
r.close()
