#!/usr/bin/env bash
# Multi-app overhead, in one run: the Hono app served alone by `bext serve`
# vs the same app served among the three apps of the deployment-modes
# example (Next.js on example.com, Hono on blog.example.com, Express on
# api.example.com), with the same request (Host: blog.example.com).
# One Tokio worker thread and each app's worker pinned to CPU 0, wrk to
# CPU 1.
#
# Usage: bench/platform.sh     (BENCH_DURATION=10s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk taskset python3 curl

NEXT="$ROOT/tests/fixtures/next"
HONO="$ROOT/tests/fixtures/hono"
EXPRESS="$ROOT/tests/fixtures/express"
[[ -f "$NEXT/.next/BUILD_ID" && -f "$HONO/dist/index.js" ]] || { echo "bench: run tests/fixtures/setup.sh first" >&2; exit 1; }

# start_serve VAR CONFIG LOG: bext serve pinned to the server CPU; sets VAR
# to its address.
start_serve() {
  local var="$1" config="$2" log="$3"
  BEXT_THREADS=1 BEXT_LOG_FORMAT=json \
    taskset -c "$SERVER_CPU" "$ROOT/target/release/bext" serve --config "$config" --listen 127.0.0.1:0 \
    2>"$log" >/dev/null &
  PIDS+=($!)
  # bext listens at once and routes each app as it starts: wait for all.
  wait_until 180 grep -q '"apps started' "$log"
  printf -v "$var" '%s' "$(grep -m1 '"listening on' "$log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
}

sed -e "s|/srv/marketing|$NEXT|" -e "s|/srv/blog|$HONO|" -e "s|/srv/api|$EXPRESS|" \
  -e "s|/var/lib/bext|$WORK/data-three|" "$ROOT/config-examples/platform.toml" >"$WORK/three.toml"
cat >"$WORK/alone.toml" <<TOML
[platform]
data_dir = "$WORK/data-alone"
[apps.blog]
source = "$HONO"
domains = ["blog.example.com"]
runtime = "hono"
[apps.blog.cache]
default_ttl = "300s"
TOML

results=()
start_serve alone "$WORK/alone.toml" "$WORK/alone.log"
curl -sf -H "Host: blog.example.com" "http://$alone/" >/dev/null
results+=("$(run_wrk "hono alone" "http://$alone/" -H "Host: blog.example.com")")
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'

start_serve three "$WORK/three.toml" "$WORK/three.log"
curl -sf -H "Host: blog.example.com" "http://$three/" >/dev/null
results+=("$(run_wrk "hono among three apps" "http://$three/" -H "Host: blog.example.com")")

echo "## Multi-app: one app alone vs among three ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- apps: config-examples/platform.toml with the fixture apps (Next.js, Hono, Express); requests: \`GET /\` with \`Host: blog.example.com\` (Hono, not cacheable)"
echo "- command: \`BENCH_DURATION=$DURATION bench/platform.sh\`"
echo
results_table
echo
echo "- among three / alone = **$(ratio "$(rps_of "hono among three apps")" "$(rps_of "hono alone")")** (target ≥ 0.9)"
