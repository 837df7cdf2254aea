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
# Usage: bench/bare.sh   (BENCH_DURATION=10s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx taskset curl cargo

ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/bare-1k?cc=public,max-age=3600&size=1024"

cargo build --release --quiet --manifest-path "$BENCH_DIR/bare-server/Cargo.toml" \
  --target-dir "$ROOT/target/bench-tools/bare-server"
BARE="$ROOT/target/bench-tools/bare-server/release/bare-server"

taskset -c "$SERVER_CPU" "$BARE" 127.0.0.1:0 1024 >"$WORK/bare.log" &
PIDS+=($!)
wait_until 10 grep -q 'listening on' "$WORK/bare.log"
bare_addr="$(sed -n 's/listening on //p' "$WORK/bare.log")"

start_bext bext_addr "$ORIGIN" "$WORK/bext.log" --workers 1
quiet="$WORK/quiet"
mkdir -p "$quiet"
cp "$ORIGIN/package.json" "$ORIGIN/server.js" "$quiet/"
printf '[server]\naccess_log = false\n' >"$quiet/bext.config.toml"
start_bext quiet_addr "$quiet" "$WORK/bext-quiet.log" --workers 1
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  BEXT_BIN="$BEXT_BASELINE" start_bext baseline_addr "$ORIGIN" "$WORK/bext-baseline.log" --workers 1
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
wait_until 10 curl -sf "http://127.0.0.1:$nginx_port/"

for addr in "$bext_addr" "$quiet_addr" ${baseline_addr:-}; do
  for _ in 1 2 3; do curl -s -o /dev/null "http://$addr$PAGE"; done
  curl -s -D - -o /dev/null "http://$addr$PAGE" | grep -qi '^x-bext-cache: HIT' \
    || { echo "bench: $addr never served a hit" >&2; exit 1; }
done

results=()
results+=("$(run_wrk "bare hyper server" "http://$bare_addr/")")
results+=("$(run_wrk "bext hit, default (access log on)" "http://$bext_addr$PAGE")")
results+=("$(run_wrk "bext hit, access log off" "http://$quiet_addr$PAGE")")
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  results+=("$(run_wrk "baseline build, hit, default" "http://$baseline_addr$PAGE")")
fi
results+=("$(run_wrk "nginx return 200, access log off" "http://127.0.0.1:$nginx_port/")")

echo "## A 1 KiB hit against the bare stack ($(date -u +%Y-%m-%d))"
echo
machine_info
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  echo "- baseline: $("$BEXT_BASELINE" --version) ($BEXT_BASELINE)"
  echo "- command: \`BEXT_BASELINE=$BEXT_BASELINE BENCH_DURATION=$DURATION bench/bare.sh\`"
else
  echo "- command: \`BENCH_DURATION=$DURATION bench/bare.sh\`"
fi
echo
results_table
echo
bare="$(rps_of "bare hyper server")"
echo "- bext default / bare = **$(ratio "$(rps_of "bext hit, default (access log on)")" "$bare")** (target ≥ 0.9), access log off / bare = **$(ratio "$(rps_of "bext hit, access log off")" "$bare")**, nginx / bare = $(ratio "$(rps_of "nginx return 200, access log off")" "$bare")$([[ -n "${BEXT_BASELINE:-}" ]] && echo ", baseline build / bare = $(ratio "$(rps_of "baseline build, hit, default")" "$bare")")"
