#!/usr/bin/env bash
# Runs the whole http-cache-tests suite against a reference cache on this
# machine, end to end: starts the suite's origin (origin.sh) on a free port,
# starts the cache in front of it on another free port, runs run.sh against
# the cache, and stops everything it started (by PID).
#
#   tests/cache-tests/reference.sh CACHE OUT_JSON
#
# CACHE is one of:
#   nginx          nginx proxy_cache, honouring the origin's headers (no
#                  proxy_cache_valid), proxy_cache_revalidate on: the suite's
#                  own docker/nginx/nginx.conf
#   varnish        varnishd with the built-in VCL and default parameters
#                  (default_ttl=120s: responses without freshness are cached)
#   varnish-suite  varnishd as the suite's docker/serve.sh runs it:
#                  -p default_ttl=0 -p default_grace=0 -p default_keep=3600
#   none           no cache: the client talks to the origin directly (a check
#                  of the harness; every "cached" expectation fails)
#
# Needs /usr/sbin/nginx or /usr/sbin/varnishd for those caches.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ $# -eq 2 ]] || { echo "usage: $0 nginx|varnish|varnish-suite|none OUT_JSON" >&2; exit 2; }
cache="$1"; out="$2"

work="$(mktemp -d /tmp/bext-cache-tests.XXXXXX)"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })'
}

wait_http() { # URL NAME PID
  for _ in $(seq 100); do
    if node -e 'fetch(process.argv[1], { signal: AbortSignal.timeout(1000) }).then(() => process.exit(0), () => process.exit(1))' "$1"; then
      return 0
    fi
    kill -0 "$3" 2>/dev/null || { echo "reference.sh: $2 exited during startup" >&2; tail -n 20 "$work"/*.log >&2 || true; exit 1; }
    sleep 0.1
  done
  echo "reference.sh: $2 did not answer at $1" >&2
  exit 1
}

origin_port="$(free_port)"
"$here/origin.sh" "$origin_port" >"$work/origin.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$origin_port/state/startup" origin "$!"
echo "[cache-tests] origin pid ${pids[0]} on 127.0.0.1:$origin_port" >&2

case "$cache" in
  none)
    base="http://127.0.0.1:$origin_port"
    ;;
  nginx)
    port="$(free_port)"
    mkdir -p "$work/nginx/cache" "$work/nginx/logs"
    cat >"$work/nginx/nginx.conf" <<CONF
user root;
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx.log warn;
events { worker_connections 2048; }
http {
    access_log off;
    client_body_temp_path $work/nginx/client_body;
    proxy_temp_path $work/nginx/proxy_temp;
    fastcgi_temp_path $work/nginx/fastcgi_temp;
    uwsgi_temp_path $work/nginx/uwsgi_temp;
    scgi_temp_path $work/nginx/scgi_temp;
    proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=cachetests:8m max_size=1000m inactive=600m;
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://127.0.0.1:$origin_port;
            proxy_cache cachetests;
            proxy_cache_revalidate on;
        }
    }
}
CONF
    /usr/sbin/nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -e "$work/nginx.log" &
    pids+=($!)
    base="http://127.0.0.1:$port"
    wait_http "$base/state/startup" nginx "$!"
    echo "[cache-tests] $(/usr/sbin/nginx -v 2>&1) pid $! on $base" >&2
    ;;
  varnish | varnish-suite)
    port="$(free_port)"
    params=()
    if [[ "$cache" == varnish-suite ]]; then
      params=(-p default_ttl=0 -p default_grace=0 -p default_keep=3600)
    fi
    /usr/sbin/varnishd -F -a "127.0.0.1:$port" -b "127.0.0.1:$origin_port" \
      -n "$work/varnish" -s malloc,64m "${params[@]}" >"$work/varnish.log" 2>&1 &
    pids+=($!)
    base="http://127.0.0.1:$port"
    wait_http "$base/state/startup" varnishd "$!"
    echo "[cache-tests] $(/usr/sbin/varnishd -V 2>&1 | head -n1) pid $! on $base ${params[*]}" >&2
    ;;
  *)
    echo "reference.sh: unknown cache '$cache'" >&2
    exit 2
    ;;
esac

"$here/run.sh" "$base" "$out"
