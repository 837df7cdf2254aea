# Shared helpers for bench/*.sh (sourced). Every process a script starts is
# recorded and ended by PID on exit; ports are picked free at run time.

set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
WORK="$(mktemp -d /tmp/bext-bench.XXXXXX)"
PIDS=()

# Load generator settings: one wrk thread pinned to CPU 1, servers to CPU 0.
DURATION="${BENCH_DURATION:-10s}"
CONNECTIONS="${BENCH_CONNECTIONS:-50}"
SERVER_CPU="${BENCH_SERVER_CPU:-0}"
CLIENT_CPU="${BENCH_CLIENT_CPU:-1}"

# BENCH_KEEP=1 keeps a copy of the scratch directory (configs, logs) in
# /tmp/bench-kept, to look at after a run.
cleanup() {
  [[ -n "${BENCH_KEEP:-}" ]] && cp -r "$WORK" /tmp/bench-kept || true
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [[ -n "$pid" ]] && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

need() {
  for bin in "$@"; do
    command -v "$bin" >/dev/null || { echo "bench: $bin is missing (make bench-deps installs it)" >&2; exit 1; }
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_until SECONDS CMD...: polls CMD every 50 ms until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || { echo "bench: timed out waiting for: $*" >&2; return 1; }
    sleep 0.05
  done
}

# start_bext VAR APP_DIR LOG [ARGS...]: starts the release bext (or
# $BEXT_BIN) pinned to the server CPU with one runtime thread; sets VAR to
# its address. (Not called in a subshell, so the PID is recorded for
# cleanup.)
start_bext() {
  local var="$1" app="$2" log="$3"; shift 3
  BEXT_THREADS=1 XDG_RUNTIME_DIR="$WORK" BEXT_LOG_FORMAT=json \
    taskset -c "$SERVER_CPU" "${BEXT_BIN:-$ROOT/target/release/bext}" run "$app" --listen 127.0.0.1:0 "$@" \
    2>"$log" >/dev/null &
  PIDS+=($!)
  wait_until 120 grep -q '"listening on' "$log"
  printf -v "$var" '%s' "$(grep -m1 '"listening on' "$log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
}

# run_wrk NAME URL [WRK ARGS...]: one bounded wrk run; prints
# "NAME|req/s|p50|p99|errors".
run_wrk() {
  local name="$1" url="$2" out
  shift 2
  # Warm-up, not recorded.
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d1s "$@" "$url" >/dev/null 2>&1 || true
  out="$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url")"
  local rps p50 p99 errors
  rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
  p50="$(awk '$1=="50%" {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  errors="$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")"
  echo "$name|$rps|$p50|$p99|${errors:-none}"
}

# ticks PID: user and system clock ticks of every thread of PID.
ticks() { awk '{u+=$14; s+=$15} END {print u, s}' /proc/"$1"/task/*/stat; }

# ticks_tree PID: the same for PID and its child processes (nginx's
# worker under its master; bext's app workers, idle on cache hits).
ticks_tree() {
  local p files=()
  for p in "$1" $(pgrep -P "$1" || true); do files+=(/proc/"$p"/task/*/stat); done
  awk '{u+=$14; s+=$15} END {print u, s}' "${files[@]}"
}

# cpu_per_request PID URL [WRK ARGS...]: one wrk run against URL (after a
# warm-up);
# prints "REQ/S USER_US SYS_US": the user and system CPU microseconds PID
# (all its threads) spent per request, from /proc.
cpu_per_request() {
  local pid="$1" url="$2" out u0 s0 u1 s1
  shift 2
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d1s "$@" "$url" >/dev/null 2>&1 || true
  read -r u0 s0 < <(ticks_tree "$pid")
  out="$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "$@" "$url")"
  read -r u1 s1 < <(ticks_tree "$pid")
  python3 - "$(awk '/^Requests\/sec/ {print $2}' <<<"$out")" "${DURATION%s}" "$(getconf CLK_TCK)" \
    "$((u1 - u0))" "$((s1 - s0))" <<'PY'
import sys
rps, secs, hz, user, system = map(float, sys.argv[1:])
reqs = rps * secs
print(f"{rps:.0f} {user * 1e6 / hz / reqs:.2f} {system * 1e6 / hz / reqs:.2f}")
PY
}

# nginx_proxy_location: the directives of nginx's proxied location, setting
# the same headers bext sets (for the same work on both sides).
nginx_proxy_location() {
  cat <<'NGINX'
      proxy_pass http://hono;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id;
NGINX
}

# write_nginx_proxy_conf SOCK PORT [MAIN DIRECTIVES]: $WORK/nginx/nginx.conf
# for one nginx worker on 127.0.0.1:PORT proxying to the worker socket SOCK
# (upstream keep-alive, access log to a file).
write_nginx_proxy_conf() {
  local sock="$1" port="$2" main="${3:-}"
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx/nginx.conf" <<NGINX
user root; worker_processes 1; daemon off; $main
pid $WORK/nginx/pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx/access.log combined buffer=64k flush=1s;
  keepalive_requests 100000;
  upstream hono { server unix:$sock; keepalive 64; }
  server {
    listen 127.0.0.1:$port;
    location / {
$(nginx_proxy_location)
    }
  }
}
NGINX
}

# results_table: the results array as a Markdown table.
results_table() {
  echo "| run | req/s | p50 | p99 | errors |"
  echo "|---|---:|---:|---:|---|"
  local r n rps p50 p99 errors
  for r in "${results[@]}"; do
    IFS='|' read -r n rps p50 p99 errors <<<"$r"
    echo "| $n | $rps | $p50 | $p99 | $errors |"
  done
}

# rps_of NAME: the req/s of the run called NAME in the results array.
rps_of() {
  local r n rps
  for r in "${results[@]}"; do
    IFS='|' read -r n rps _ <<<"$r"
    if [[ "$n" == "$1" ]]; then echo "$rps"; fi
  done
  return 0
}

# ratio A B: A / B with two decimals.
ratio() { python3 -c "print(f'{float($1)/float($2):.2f}')"; }

machine_info() {
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r)"
  echo "- bext: $("${BEXT_BIN:-$ROOT/target/release/bext}" --version) (release build${BEXT_BIN:+: $BEXT_BIN}), serving threads: 1 (BEXT_THREADS=1)"
  echo "- $(nginx -v 2>&1), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), node $(node --version)"
  echo "- wrk: 1 thread pinned to CPU $CLIENT_CPU, $CONNECTIONS connections, $DURATION per run (after a 1 s warm-up); servers pinned to CPU $SERVER_CPU"
}
