"""Exercises the protocol states that break naive request/reply pairing, with redis-py:
transactions, pipelines, pub/sub, blocking pops, WATCH aborts and RESP3.
Usage: redispy_semantics.py PORT"""
import sys
import threading
import time

import redis

port = int(sys.argv[1])
r = redis.Redis(host="127.0.0.1", port=port)

# Pipelines without and with a transaction (MULTI ... EXEC), including an error inside EXEC.
pipe = r.pipeline(transaction=False)
for i in range(50):
    pipe.set(f"p:{i}", i)
    pipe.incr(f"p:{i}")
pipe.execute()
r.set("str", "text")
tx = r.pipeline(transaction=True)
tx.incr("counter")
tx.lpush("str", "x")  # WRONGTYPE inside EXEC: a failed call of lpush
tx.get("counter")
tx.execute(raise_on_error=False)

# WATCH, then a concurrent change aborts the transaction (EXEC replies a null array).
with r.pipeline() as w:
    w.watch("watched")
    redis.Redis(host="127.0.0.1", port=port).set("watched", "changed")
    w.multi()
    w.set("watched", "mine")
    try:
        w.execute()
    except redis.WatchError:
        pass

# Blocking pop that waits for another client's push.
def push_later():
    time.sleep(0.3)
    redis.Redis(host="127.0.0.1", port=port).rpush("queue", "job")

threading.Thread(target=push_later).start()
assert r.blpop(["queue"], timeout=5) == (b"queue", b"job")
assert r.blpop(["empty"], timeout=0.2) is None  # times out: a nil reply

# Pub/sub: confirmations and pushed messages are not replies.
sub = r.pubsub()
sub.subscribe("news", "sports")
for _ in range(2):
    sub.get_message(timeout=1)
for i in range(5):
    r.publish("news", f"m{i}")
received = 0
deadline = time.time() + 5
while received < 5 and time.time() < deadline:
    if sub.get_message(timeout=0.5):
        received += 1
assert received == 5, received
sub.unsubscribe()
sub.get_message(timeout=1)
sub.get_message(timeout=1)
sub.close()

# RESP3: HELLO 3, maps, and a RESP3 pub/sub push on the same connection.
r3 = redis.Redis(host="127.0.0.1", port=port, protocol=3)
r3.hset("h", mapping={"a": 1, "b": 2})
assert r3.hgetall("h") == {b"a": b"1", b"b": b"2"}
r3.ping()
r3.close()
time.sleep(0.3)
r.close()
print("ok")
