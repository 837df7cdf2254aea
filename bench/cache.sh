#!/usr/bin/env bash
# Cache-hit throughput, in one run: bext vs nginx proxy_cache vs Varnish on
# the same origin pages of 1 KiB and 32 KiB, then `next start` alone vs bext
# in front of it on the Next.js ISR page.
#
# Every server gets one worker (nginx: worker_processes 1; Varnish: one
# thread pool; bext: one Tokio worker thread) and is pinned with the origin
# to CPU 0; wrk (1 thread, 50 connections) is pinned to CPU 1. Each page is
# fetched until it is a cache hit before the measured run.
#
# Usage: bench/cache.sh     (BENCH_DURATION=10s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx varnishd taskset python3 node curl

ORIGIN="$ROOT/tests/fixtures/origin"
NEXT="$ROOT/tests/fixtures/next"
[[ -f "$NEXT/.next/BUILD_ID" ]] || { echo "bench: run tests/fixtures/setup.sh first" >&2; exit 1; }
PAGE_1K="/page/bench-1k?cc=public,max-age=3600&size=1024"
PAGE_32K="/page/bench-32k?cc=public,max-age=3600&size=32768"

# The origin for nginx and Varnish: the same app, on its own TCP port.
origin_port="$(free_port)"
(cd "$ORIGIN" && PORT="$origin_port" exec taskset -c "$SERVER_CPU" node server.js >"$WORK/origin.log" 2>&1) &
PIDS+=($!)
wait_until 20 curl -sf "http://127.0.0.1:$origin_port/pid"

# bext runs the origin as its app (one worker).
start_bext bext_addr "$ORIGIN" "$WORK/bext.log" --workers 1

# nginx proxy_cache, honouring the origin's Cache-Control (no proxy_cache_valid).
nginx_port="$(free_port)"
mkdir -p "$WORK/nginx/cache"
cat >"$WORK/nginx/nginx.conf" <<NGINX
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx/access.log combined buffer=64k flush=1s;
  keepalive_requests 100000;
  proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=bench:64m max_size=1g inactive=1h;
  upstream origin { server 127.0.0.1:$origin_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_lock on;
      add_header X-Cache \$upstream_cache_status;
    }
  }
}
NGINX
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
PIDS+=($!)
wait_until 10 curl -sf "http://127.0.0.1:$nginx_port/pid"

# Varnish, default VCL, one thread pool, memory storage.
varnish_port="$(free_port)"
taskset -c "$SERVER_CPU" varnishd -F -j none -n "$WORK/varnish" -a "127.0.0.1:$varnish_port" \
  -b "127.0.0.1:$origin_port" -s malloc,256m -p thread_pools=1 \
  >"$WORK/varnish.log" 2>&1 &
PIDS+=($!)
wait_until 20 curl -sf "http://127.0.0.1:$varnish_port/pid"

# Fetch until the cache answers from memory.
warm() {
  local url="$1" header="$2" value="$3" i
  for i in $(seq 1 50); do
    if curl -s -o /dev/null -D - "$url" | grep -qi "^$header: .*$value"; then return 0; fi
    sleep 0.1
  done
  echo "bench: $url never became a cache hit ($header: $value)" >&2
  return 1
}
for page in "$PAGE_1K" "$PAGE_32K"; do
  warm "http://$bext_addr$page" x-bext-cache HIT
  warm "http://127.0.0.1:$nginx_port$page" x-cache HIT
  curl -s -o /dev/null "http://127.0.0.1:$varnish_port$page"
  warm "http://127.0.0.1:$varnish_port$page" age '[0-9]'
done

results=()
for page in "$PAGE_1K" "$PAGE_32K"; do
  size="1 KiB"; [[ "$page" == "$PAGE_32K" ]] && size="32 KiB"
  results+=("$(run_wrk "bext, $size" "http://$bext_addr$page")")
  results+=("$(run_wrk "nginx proxy_cache, $size" "http://127.0.0.1:$nginx_port$page")")
  results+=("$(run_wrk "Varnish, $size" "http://127.0.0.1:$varnish_port$page")")
done

# next start alone (Next's own ISR cache) vs bext in front of the same app.
next_port="$(free_port)"
(cd "$NEXT" && NEXT_TELEMETRY_DISABLED=1 exec taskset -c "$SERVER_CPU" node node_modules/next/dist/bin/next start -p "$next_port" >"$WORK/next.log" 2>&1) &
PIDS+=($!)
wait_until 30 curl -sf "http://127.0.0.1:$next_port/isr"
start_bext bext_next "$NEXT" "$WORK/bext-next.log" --workers 1
warm "http://127.0.0.1:$next_port/isr" x-nextjs-cache HIT
warm "http://$bext_next/isr" x-bext-cache HIT
results+=("$(run_wrk "next start alone, /isr" "http://127.0.0.1:$next_port/isr")")
results+=("$(run_wrk "bext in front of Next, /isr" "http://$bext_next/isr")")
# Where bext's time per hit goes: the kernel's share bounds what any
# user-space work could reach on one core.
read -r hit_rps hit_user hit_sys < <(cpu_per_request "${PIDS[-1]}" "http://$bext_next/isr")


echo "## Cache hits: bext vs nginx proxy_cache vs Varnish ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- $(varnishd -V 2>&1 | head -1), Next.js $(node -p "require('$NEXT/node_modules/next/package.json').version")"
echo "- pages: origin fixture \`$PAGE_1K\` and \`$PAGE_32K\` (\`Cache-Control: public, max-age=3600\`); Next fixture \`/isr\` (\`s-maxage=5, stale-while-revalidate\`)"
echo "- access logs: bext (JSON) to a file; nginx to a file, buffered (\`buffer=64k\`), \`keepalive_requests 100000\`; Varnish to its shared-memory log"
echo "- command: \`BENCH_DURATION=$DURATION bench/cache.sh\`"
echo
results_table
echo
for size in "1 KiB" "32 KiB"; do
  b="$(rps_of "bext, $size")"
  echo "- $size: bext / nginx = **$(ratio "$b" "$(rps_of "nginx proxy_cache, $size")")** (target ≥ 1.2), bext / Varnish = **$(ratio "$b" "$(rps_of "Varnish, $size")")** (target ≥ 1.0)"
done
echo "- Next ISR page: bext / next start = **$(ratio "$(rps_of "bext in front of Next, /isr")" "$(rps_of "next start alone, /isr")")** (target ≥ 50)"
echo "- CPU per ISR hit (bext, all threads, a second run at $hit_rps req/s): user $hit_user µs, system $hit_sys µs. With no user-space work at all, one core would serve at most $(python3 -c "print(round(1e6 / $hit_sys))") req/s = **$(python3 -c "print(round(1e6 / $hit_sys / $(rps_of "next start alone, /isr"), 1))" )× next start**."
