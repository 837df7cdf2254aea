#!/usr/bin/env python3
"""Edge mode measurements for bench/edge.sh, over one keep-alive connection
per instance (sequential requests: each latency is one request's alone).

    edge.py A_ADDR B_ADDR REDIS_PORT PAGES PURGES

Prints Markdown rows:
- L1 hit, L2 hit (promotion), miss on B: latency p50/p99 and the sequential
  rate (1 / mean latency);
- a plain GET of the same stored bytes straight from Redis (RESP over one
  socket), for the L2 hit's cost beyond Redis itself;
- renders: PAGES pages requested on both instances, with and without
  sharing (the one-instance-vs-two row);
- purge propagation: PURGES tag purges on A, each timed until B's answer
  is a miss (p50/p99).
"""
import http.client
import socket
import statistics
import sys
import time

a_addr, b_addr, redis_port, pages, purges = sys.argv[1:6]
pages, purges, redis_port = int(pages), int(purges), int(redis_port)
HOST = "site.test"


def conn(addr):
    host, port = addr.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


def get(c, path):
    c.request("GET", path, headers={"Host": HOST})
    r = c.getresponse()
    body = r.read()
    return r.getheader("x-bext-cache", ""), body


def timed(c, paths, expect):
    times = []
    for p in paths:
        t = time.perf_counter()
        state, _ = get(c, p)
        times.append(time.perf_counter() - t)
        if state != expect:
            sys.exit(f"edge.py: {p}: {state}, expected {expect}")
    return times


def row(name, times):
    times = sorted(times)
    p50 = times[len(times) // 2] * 1e6
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6
    rate = 1 / statistics.mean(times)
    print(f"| {name} | {len(times)} | {p50:.0f} | {p99:.0f} | {rate:.0f} |")


a, b = conn(a_addr), conn(b_addr)
page = lambda i: f"/page/edge-{i}?cc=public,max-age=3600&size=1024"
print("| request (one connection, sequential) | n | p50 µs | p99 µs | req/s |")
print("|---|---:|---:|---:|---:|")
# Misses on A store PAGES pages (and put them in Redis).
row("miss (render, stored in memory and Redis), on A", timed(a, [page(i) for i in range(pages)], "MISS"))
# B has none of them in memory: each is an L2 hit, promoted.
row("L2 hit (from Redis, promoted), on B", timed(b, [page(i) for i in range(pages)], "HIT"))
row("L1 hit (memory), on B", timed(b, [page(i) for i in range(pages)], "HIT"))

# The same bytes straight from Redis: GET of one stored object's key.
s = socket.create_connection(("127.0.0.1", redis_port))


def resp(*args):
    out = f"*{len(args)}\r\n".encode()
    for arg in args:
        arg = arg.encode() if isinstance(arg, str) else arg
        out += f"${len(arg)}\r\n".encode() + arg + b"\r\n"
    s.sendall(out)
    data = b""
    while True:
        data += s.recv(65536)
        if data.startswith(b"$"):
            header, _, rest = data.partition(b"\r\n")
            n = int(header[1:])
            if n < 0 or len(rest) >= n + 2:
                return rest[:n]
        elif data.endswith(b"\r\n") and not data.startswith(b"*"):
            return data
        elif data.startswith(b"*") and data.endswith(b"\r\n"):
            return data


keys = resp("KEYS", "bext:*:o:*").split(b"\r\n")
key = next(k for k in keys if b":o:" in k and not k.startswith((b"*", b"$")))
times = []
for _ in range(pages):
    t = time.perf_counter()
    value = resp("GET", key)
    times.append(time.perf_counter() - t)
row(f"plain Redis GET of one stored object ({len(value)} bytes)", times)

# Renders with and without sharing: PAGES new pages asked of both.
def renders(c, path):
    c.request("GET", f"/count?path={path}", headers={"Host": HOST})
    r = c.getresponse()
    import json
    return json.loads(r.read())["renders"]


for i in range(pages):
    get(a, f"/page/share-{i}?cc=public,max-age=3600&size=1024")
    get(b, f"/page/share-{i}?cc=public,max-age=3600&size=1024")
rendered = sum(renders(c, f"/page/share-{i}") for c in (a, b) for i in range(pages))
print()
print(f"- renders for {pages} pages asked of both instances: **{rendered}** with Redis shared "
      f"({2 * pages} without: each instance renders each page)")

# Purge propagation: each round stores a page on A, B takes it (promoted
# into its memory), A purges its tag; timed until B's answer is a miss
# (its copy dropped, Redis's deleted).
times = []
for i in range(purges):
    path = f"/page/purged?cc=public,max-age=3600&tags=round{i}&size=512"
    get(a, path)
    get(b, path)
    if get(b, path)[0] != "HIT":
        sys.exit("edge.py: B does not hold the page")
    t = time.perf_counter()
    a.request("POST", "/__bext/cache/invalidate", body=f'{{"tags":["round{i}"]}}',
              headers={"Host": HOST, "Authorization": "Bearer bench-token"})
    a.getresponse().read()
    while True:
        state, _ = get(b, path)
        if state == "MISS":
            break
        if time.perf_counter() - t > 5:
            sys.exit("edge.py: B never saw the purge")
    times.append(time.perf_counter() - t)
times.sort()
p50 = times[len(times) // 2] * 1e3
p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3
print(f"- purge on A → B misses (no longer serves the purged copy): p50 **{p50:.1f} ms**, p99 **{p99:.1f} ms** "
      f"over {purges} purges (target p99 ≤ 50 ms; includes B's render of the page again)")
