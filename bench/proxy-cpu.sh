#!/usr/bin/env bash
# CPU cost per proxied request, bext vs nginx, in front of the same Hono
# worker socket (both pinned with the worker to one CPU, wrk on the other):
# user and system CPU microseconds per request of the proxy and of the app,
# read from /proc before and after one wrk run each.
#
# Usage: bench/proxy-cpu.sh     (BENCH_DURATION=5s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx taskset python3
DURATION="${BENCH_DURATION:-5s}"
HONO="$ROOT/tests/fixtures/hono"

start_bext addr "$HONO" "$WORK/bext.log" --workers 1
bext_pid=${PIDS[-1]}
sock="$(ls "$WORK"/bext-*-hono-*/w0.*.sock)"
node_pid="$(cat /proc/"$bext_pid"/task/*/children | awk '{print $1; exit}')"

port="$(free_port)"
write_nginx_proxy_conf "$sock" "$port"
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" &
PIDS+=($!)
wait_until 10 curl -sf "http://127.0.0.1:$port/"
nginx_worker="$(pgrep -P "${PIDS[-1]}" nginx)"


echo "## CPU per proxied request ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- command: \`BENCH_DURATION=$DURATION bench/proxy-cpu.sh\`"
echo
echo "| proxy | req/s | proxy user µs/req | proxy sys µs/req | proxy total | app (node) µs/req |"
echo "|---|---:|---:|---:|---:|---:|"
hz="$(getconf CLK_TCK)"
for target in "bext $bext_pid http://$addr/" "nginx $nginx_worker http://127.0.0.1:$port/"; do
  set -- $target
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d1s "$3" >/dev/null  # warm-up
  read -r pu0 ps0 < <(ticks "$2"); read -r nu0 ns0 < <(ticks "$node_pid")
  rps="$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "$3" | awk '/Requests\/sec/ {print $2}')"
  read -r pu1 ps1 < <(ticks "$2"); read -r nu1 ns1 < <(ticks "$node_pid")
  python3 - "$1" "$rps" "$DURATION" "$hz" "$pu0" "$ps0" "$pu1" "$ps1" "$nu0" "$ns0" "$nu1" "$ns1" <<'PY'
import sys
name, rps, dur, hz, pu0, ps0, pu1, ps1, nu0, ns0, nu1, ns1 = sys.argv[1:]
reqs = float(rps) * float(dur.rstrip("s"))
us = lambda ticks: ticks * 1e6 / int(hz) / reqs
pu, ps = us(int(pu1) - int(pu0)), us(int(ps1) - int(ps0))
node = us(int(nu1) + int(ns1) - int(nu0) - int(ns0))
print(f"| {name} | {float(rps):.0f} | {pu:.2f} | {ps:.2f} | {pu + ps:.2f} | {node:.2f} |")
PY
done
