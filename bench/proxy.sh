#!/usr/bin/env bash
# Proxy and static-file throughput, bext vs nginx, in one run:
#
#   1. Hono "hello" alone (the app on its own TCP socket, no proxy)
#   2. Hono through bext (one worker)
#   3. Hono through nginx: proxy_pass to the same worker socket bext uses,
#      one nginx worker, upstream keep-alive
#   4. a static file through bext, and through nginx (sendfile on)
#
# The two proxied runs alternate, BENCH_ROUNDS times (3 by default), each
# first in every other round: this shared machine drifts by more than the
# difference being measured, so the ratio is taken per round (each pair
# run back to back) and the median reported, with every round shown.
#
# Usage: bench/proxy.sh            (BENCH_DURATION=10s by default)
#        BENCH_DURATION=1s bench/proxy.sh   (smoke run, as CI does)
# Prints a markdown report; `make bench` saves it to bench/results/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx taskset python3 node

HONO="$ROOT/tests/fixtures/hono"
STATIC="$ROOT/tests/fixtures/static"
STATIC_FILE="/index.html"
[[ -f "$HONO/dist/index.js" ]] || { echo "bench: run tests/fixtures/setup.sh first" >&2; exit 1; }

# 1. The app alone: the unmodified Hono app, its listen() pointed at a TCP
#    socket by bext's own Node adapter (the app hard-codes port 3000).
direct_port="$(free_port)"
adapter="$WORK/node-adapter.cjs"
cp "$ROOT/worker/js/node-adapter.cjs" "$adapter"
python3 - "$direct_port" "$adapter" "$HONO" "$WORK/direct.log" <<'PY' &
import os, socket, sys
port, adapter, app, log = sys.argv[1:]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(port))); s.listen(1024)
os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
os.environ.update(BEXT_LISTEN_FD="3", BEXT_READY_TOKEN="ready-token", NODE_ENV="production",
                  NODE_OPTIONS=f"--require {adapter}")
out = os.open(log, os.O_WRONLY | os.O_CREAT)
os.dup2(out, 1); os.dup2(out, 2)
os.chdir(app)
os.execvp("taskset", ["taskset", "-c", os.environ.get("BENCH_SERVER_CPU", "0"), "node", "dist/index.js"])
PY
PIDS+=($!)
wait_until 30 grep -q ready-token "$WORK/direct.log"

# 2. bext with one worker.
start_bext bext_addr "$HONO" "$WORK/bext-hono.log" --workers 1
sock="$(ls "$WORK"/bext-*-hono-*/w0.*.sock)"

# 3. nginx in front of the same worker socket.
nginx_port="$(free_port)"
static_port="$(free_port)"
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGINX
user root;
worker_processes 1;
worker_cpu_affinity auto;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  include /etc/nginx/mime.types;
  access_log $WORK/nginx/access.log combined buffer=64k flush=1s;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  upstream hono { server unix:$sock; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
$(nginx_proxy_location)
    }
  }
  server {
    listen 127.0.0.1:$static_port;
    root $STATIC;
  }
}
NGINX
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
PIDS+=($!)
wait_until 10 curl -sf "http://127.0.0.1:$nginx_port/"

# 4. bext serving the static site.
start_bext bext_static "$STATIC" "$WORK/bext-static.log"

for url in "http://127.0.0.1:$direct_port/" "http://$bext_addr/" "http://127.0.0.1:$nginx_port/"; do
  [[ "$(curl -sf "$url")" == "Hello Hono!" ]] || { echo "bench: $url does not answer Hello Hono!" >&2; exit 1; }
done

ROUNDS="${BENCH_ROUNDS:-3}"
results=()
results+=("$(run_wrk "hono alone (TCP)" "http://127.0.0.1:$direct_port/")")
round_ratios=()
for round in $(seq 1 "$ROUNDS"); do
  # Each goes first in every other round: the machine's speed drifts
  # within a run, and the one run second would gain by it every time.
  if (( round % 2 )); then
    results+=("$(run_wrk "hono via bext, round $round" "http://$bext_addr/")")
    results+=("$(run_wrk "hono via nginx, round $round" "http://127.0.0.1:$nginx_port/")")
  else
    results+=("$(run_wrk "hono via nginx, round $round" "http://127.0.0.1:$nginx_port/")")
    results+=("$(run_wrk "hono via bext, round $round" "http://$bext_addr/")")
  fi
  round_ratios+=("$(ratio "$(rps_of "hono via bext, round $round")" "$(rps_of "hono via nginx, round $round")")")
done
results+=("$(run_wrk "static via bext" "http://$bext_static$STATIC_FILE")")
results+=("$(run_wrk "static via nginx" "http://127.0.0.1:$static_port$STATIC_FILE")")


echo "## Proxy and static throughput ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- static file: tests/fixtures/static$STATIC_FILE ($(stat -c %s "$STATIC$STATIC_FILE") bytes); access logs on for both (bext: JSON to a file; nginx: combined to a file, \`buffer=64k\`, \`keepalive_requests 100000\`)"
echo "- command: \`BENCH_DURATION=$DURATION bench/proxy.sh\`"
echo
results_table
echo
median="$(printf '%s\n' "${round_ratios[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')"
echo "- proxied: bext / nginx = **$median** (median of $ROUNDS rounds: ${round_ratios[*]}; target ≥ 1.0); bext / app alone = $(ratio "$(rps_of "hono via bext, round 1")" "$(rps_of "hono alone (TCP)")") (round 1)"
echo "- static: bext / nginx = **$(ratio "$(rps_of "static via bext")" "$(rps_of "static via nginx")")** (target ≥ 0.9)"
