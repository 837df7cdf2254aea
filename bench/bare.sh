#!/usr/bin/env bash
# A 1 KiB cache hit: bext (default configuration: access log on; then
# without its access log) vs a bare hyper server (bench/bare-server: one
# current-thread runtime, the same bytes and headers, no work at all — the
# practical limit of this stack) vs nginx answering the same bytes from
# memory (`return 200`, tuned: keepalive_requests high, access log off).
# Issue 13 asks bext's default configuration for ≥ 0.9× the bare server.
#
# BEXT_BASELINE=PATH adds another bext binary's default configuration.
#
# Usage: bench/bare.sh   (BENCH_DURATION=10s, BENCH_ROUNDS=3 by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx taskset curl cargo

ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/bare-1k?cc=public,max-age=3600&size=1024"

cargo build --release --quiet --manifest-path "$BENCH_DIR/bare-server/Cargo.toml" \
  --target-dir "$ROOT/target/bench-tools/bare-server"
BARE="$ROOT/target/bench-tools/bare-server/release/bare-server"

taskset -c "$SERVER_CPU" "$BARE" 127.0.0.1:0 1024 >"$WORK/bare.log" &
PIDS+=($!)
bare_pid=$!
wait_until 10 grep -q 'listening on' "$WORK/bare.log"
bare_addr="$(sed -n 's/listening on //p' "$WORK/bare.log")"

start_bext bext_addr "$ORIGIN" "$WORK/bext.log" --workers 1
bext_pid="${PIDS[-1]}"
quiet="$WORK/quiet"
mkdir -p "$quiet"
cp "$ORIGIN/package.json" "$ORIGIN/server.js" "$quiet/"
printf '[server]\naccess_log = false\n' >"$quiet/bext.config.toml"
start_bext quiet_addr "$quiet" "$WORK/bext-quiet.log" --workers 1
quiet_pid="${PIDS[-1]}"
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  BEXT_BIN="$BEXT_BASELINE" start_bext baseline_addr "$ORIGIN" "$WORK/bext-baseline.log" --workers 1
  baseline_pid="${PIDS[-1]}"
fi

nginx_port="$(free_port)"
mkdir -p "$WORK/nginx"
body="$(head -c 1024 /dev/zero | tr '\0' x)"
cat >"$WORK/nginx/nginx.conf" <<NGINX
user root; worker_processes 1; daemon off;
pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000;
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      default_type "text/plain; charset=utf-8";
      add_header Cache-Control "public, max-age=3600";
      return 200 "$body";
    }
  }
}
NGINX
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
PIDS+=($!)
nginx_pid=$!
wait_until 10 curl -sf "http://127.0.0.1:$nginx_port/"

for addr in "$bext_addr" "$quiet_addr" ${baseline_addr:-}; do
  for _ in 1 2 3; do curl -s -o /dev/null "http://$addr$PAGE"; done
  curl -s -D - -o /dev/null "http://$addr$PAGE" | grep -qi '^x-bext-cache: HIT' \
    || { echo "bench: $addr never served a hit" >&2; exit 1; }
done

# Rounds, each running every server once (the order turned by one each
# round): this shared machine drifts by ±30 % within minutes, so only
# ratios within a round mean something, and the median of them is given.
# Two measures: requests per second (wrk and the server take turns on the
# two CPUs, so this is also the client's time), and the server's own CPU
# time per request (user + system, from /proc: what it costs the host).
names=("bare hyper server" "bext hit, default (access log on)" "bext hit, access log off")
urls=("http://$bare_addr/" "http://$bext_addr$PAGE" "http://$quiet_addr$PAGE")
pids=("$bare_pid" "$bext_pid" "$quiet_pid")
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  names+=("baseline build, hit, default")
  urls+=("http://$baseline_addr$PAGE")
  pids+=("$baseline_pid")
fi
names+=("nginx return 200, access log off")
urls+=("http://127.0.0.1:$nginx_port/")
pids+=("$nginx_pid")
ROUNDS="${BENCH_ROUNDS:-3}"
rows=()
declare -A rps=() cpu=() rps_ratio=() cpu_ratio=()
for round in $(seq 1 "$ROUNDS"); do
  n="${#names[@]}"
  for k in $(seq 0 $((n - 1))); do
    i=$(((k + round - 1) % n))
    read -r r u s < <(cpu_per_request "${pids[$i]}" "${urls[$i]}")
    rps["$i"]="$r"
    cpu["$i"]="$(python3 -c "print(f'{$u + $s:.2f}')")"
    rows+=("| ${names[$i]} | $round | $r | $u | $s |")
  done
  for i in $(seq 1 $((n - 1))); do
    rps_ratio["$i"]+="$(ratio "${rps[$i]}" "${rps[0]}") "
    cpu_ratio["$i"]+="$(ratio "${cpu[$i]}" "${cpu[0]}") "
  done
done

median() { python3 -c 'import sys, statistics; print(f"{statistics.median(map(float, sys.argv[1:])):.2f}")' "$@"; }

echo "## A 1 KiB hit against the bare stack ($(date -u +%Y-%m-%d))"
echo
machine_info
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  echo "- baseline: $("$BEXT_BASELINE" --version) ($BEXT_BASELINE)"
  echo "- command: \`BEXT_BASELINE=$BEXT_BASELINE BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS bench/bare.sh\`"
else
  echo "- command: \`BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS bench/bare.sh\`"
fi
echo
echo "| server | round | req/s | user µs / req | system µs / req |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "Against the bare server in the same round (median; the rounds):"
echo
echo "| server | req/s ratio (target ≥ 0.9 for the default) | CPU per request ratio |"
echo "|---|---|---|"
for i in $(seq 1 $((${#names[@]} - 1))); do
  # shellcheck disable=SC2086
  echo "| ${names[$i]} | **$(median ${rps_ratio[$i]})** (${rps_ratio[$i]% }) | **$(median ${cpu_ratio[$i]})** (${cpu_ratio[$i]% }) |"
done
