#!/usr/bin/env python3
"""A paced HTTP/1.1 load probe: CONNS keep-alive clients, each sending one
request every CONNS/RATE seconds on a fixed schedule, for SECONDS.

Unlike wrk, it does not saturate the server (a switch measured at
saturation shows the cost of the CPU a new generation's start takes, not of
the switch), and it keeps every request's timing. Latency is measured from
the request's scheduled time, so a stall also counts against the requests
that could not be sent during it (no coordinated omission).

Writes one line per request to OUT: "scheduled_epoch latency_s status".
A request that failed (connection error, timeout) has status 0.

usage: probe.py ADDR HOST RATE CONNS SECONDS OUT
"""

import http.client
import sys
import threading
import time


def client(addr, host, interval, offset, until, rows):
    conn = None
    due = time.time() + offset
    while due < until:
        now = time.time()
        if due > now:
            time.sleep(due - now)
        try:
            if conn is None:
                conn = http.client.HTTPConnection(addr, timeout=10)
            conn.request("GET", "/", headers={"Host": host})
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException):
            status = 0
            if conn is not None:
                conn.close()
            conn = None
        rows.append((due, time.time() - due, status))
        # A request that overran its slots leaves the ones it missed due:
        # they go out back to back, each measured from its own schedule
        # (so a stall counts against every request it held up).
        due += interval


def main():
    addr, host, rate, conns, seconds, out = sys.argv[1:7]
    rate, conns, seconds = float(rate), int(conns), float(seconds)
    interval = conns / rate
    until = time.time() + seconds
    rows = []
    threads = [
        threading.Thread(
            target=client,
            args=(addr, host, interval, interval * i / conns, until, rows),
        )
        for i in range(conns)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out, "w") as f:
        for due, latency, status in sorted(rows):
            f.write(f"{due:.6f} {latency:.6f} {status}\n")


if __name__ == "__main__":
    main()
