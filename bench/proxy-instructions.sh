#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind (exact
# and repeatable, unlike CPU time on this shared machine): bext as `bext run`
# serves it (ISR cache and access log on), bext without the cache, bext
# without the cache and the access log, and nginx in front of the same Hono
# worker socket. Each runs under valgrind with instrumentation switched on
# only for one wrk run (after a warm-up); the count covers every thread of
# the process.
#
# Usage: bench/proxy-instructions.sh     (BENCH_DURATION=8s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx valgrind callgrind_control callgrind_annotate
DURATION="${BENCH_DURATION:-8s}"
HONO="$ROOT/tests/fixtures/hono"

printf '[cache.isr]\nenabled = false\n' >"$WORK/nocache.toml"
printf '[server]\naccess_log = false\n[cache.isr]\nenabled = false\n' >"$WORK/bare.toml"

# measure NAME PID URL: instructions per request of PID during one wrk run.
measure() {
  local name="$1" pid="$2" url="$3" out requests total
  wait_until 120 curl -sf "$url"
  wrk -t1 -c10 -d2s "$url" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  out="$(wrk -t1 -c10 -d"$DURATION" "$url")"
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  requests="$(awk '/requests in/ {print $1}' <<<"$out")"
  wait_until 30 test -s "$WORK/$name.cg.1"
  total="$(callgrind_annotate "$WORK/$name.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
  echo "| $name | $requests | $((total / requests)) |"
}

# bext_under_callgrind NAME [ARGS...]: starts bext under callgrind; sets
# CG_PID and CG_ADDR.
bext_under_callgrind() {
  local name="$1"; shift
  BEXT_THREADS=1 XDG_RUNTIME_DIR="$WORK" BEXT_LOG_FORMAT=json \
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.cg" --instr-atstart=no \
    "${BEXT_BIN:-$ROOT/target/release/bext}" run "$HONO" --listen 127.0.0.1:0 --workers 1 "$@" \
    2>"$WORK/$name.log" >/dev/null &
  CG_PID=$!
  PIDS+=("$CG_PID")
  wait_until 120 grep -q '"listening on' "$WORK/$name.log"
  CG_ADDR="$(grep -m1 '"listening on' "$WORK/$name.log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
}

rows=()
bext_under_callgrind bext
rows+=("$(measure bext "$CG_PID" "http://$CG_ADDR/")")
sock="$(ls "$WORK"/bext-*-hono-*/w0.*.sock)"

# nginx in front of the worker socket of the bext still running.
port="$(free_port)"
write_nginx_proxy_conf "$sock" "$port" "master_process off;"
valgrind --tool=callgrind --callgrind-out-file="$WORK/nginx.cg" --instr-atstart=no \
  nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx.valgrind.log" &
PIDS+=($!)
rows+=("$(measure nginx "${PIDS[-1]}" "http://127.0.0.1:$port/")")

bext_under_callgrind bext-nocache --config "$WORK/nocache.toml"
rows+=("$(measure bext-nocache "$CG_PID" "http://$CG_ADDR/")")
bext_under_callgrind bext-bare --config "$WORK/bare.toml"
rows+=("$(measure bext-bare "$CG_PID" "http://$CG_ADDR/")")

echo "## Instructions per proxied request ($(date -u +%Y-%m-%d))"
echo
machine_info | grep -v "^- wrk:"
echo "- $(valgrind --version); wrk: 1 thread, 10 connections, $DURATION, not pinned (callgrind serialises the server anyway)"
echo "- command: \`BENCH_DURATION=$DURATION bench/proxy-instructions.sh\`"
echo
echo "| server | requests counted | user-space instructions / request |"
echo "|---|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "bext-nocache: \`[cache.isr] enabled = false\`; bext-bare: also \`[server] access_log = false\`."
