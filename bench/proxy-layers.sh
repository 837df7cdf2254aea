#!/usr/bin/env bash
# What each of bext's layers costs on a proxied request that is never
# stored (the Hono fixture: no Cache-Control), against nginx in front of
# the same worker socket, alternating, BENCH_ROUNDS times (2 by default):
#
#   1. bext as configured by default (cache, compression, access log on)
#   2. bext with `[cache.isr] enabled = false`
#   3. bext with the cache, compression and the access log off
#   4. nginx (tuned as in bench/proxy.sh; buffered access log on)
#
# With BEXT_BASELINE=PATH (another bext binary), that build's default
# configuration runs too, in each round (to measure a change side by side).
#
# Usage: bench/proxy-layers.sh   (BENCH_DURATION=5s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk nginx taskset python3 node curl
DURATION="${BENCH_DURATION:-5s}"
HONO="$ROOT/tests/fixtures/hono"
[[ -f "$HONO/dist/index.js" ]] || { echo "bench: run tests/fixtures/setup.sh first" >&2; exit 1; }

start_bext default_addr "$HONO" "$WORK/bext-default.log" --workers 1
sock="$(ls "$WORK"/bext-*-hono-*/w0.*.sock)"
printf '[cache.isr]\nenabled = false\n' >"$WORK/no-cache.toml"
start_bext no_cache_addr "$HONO" "$WORK/bext-no-cache.log" --workers 1 --config "$WORK/no-cache.toml"
printf '[server]\naccess_log = false\n[cache.isr]\nenabled = false\n[compression]\nenabled = false\n' >"$WORK/stripped.toml"
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  BEXT_BIN="$BEXT_BASELINE" start_bext baseline_addr "$HONO" "$WORK/bext-baseline.log" --workers 1
fi
start_bext stripped_addr "$HONO" "$WORK/bext-stripped.log" --workers 1 --config "$WORK/stripped.toml"

nginx_port="$(free_port)"
write_nginx_proxy_conf "$sock" "$nginx_port"
taskset -c "$SERVER_CPU" nginx -c "$WORK/nginx/nginx.conf" 2>"$WORK/nginx/stderr.log" &
PIDS+=($!)
wait_until 10 curl -sf "http://127.0.0.1:$nginx_port/"
for url in "http://$default_addr/" "http://$no_cache_addr/" "http://$stripped_addr/" "http://127.0.0.1:$nginx_port/" \
  ${baseline_addr:+"http://$baseline_addr/"}; do
  [[ "$(curl -sf "$url")" == "Hello Hono!" ]] || { echo "bench: $url does not answer Hello Hono!" >&2; exit 1; }
done

ROUNDS="${BENCH_ROUNDS:-2}"
results=()
summary=()
for round in $(seq 1 "$ROUNDS"); do
  if [[ -n "${BEXT_BASELINE:-}" ]]; then
    results+=("$(run_wrk "baseline build, default, round $round" "http://$baseline_addr/")")
  fi
  results+=("$(run_wrk "bext default, round $round" "http://$default_addr/")")
  results+=("$(run_wrk "bext, cache off, round $round" "http://$no_cache_addr/")")
  results+=("$(run_wrk "bext, cache, compression and log off, round $round" "http://$stripped_addr/")")
  results+=("$(run_wrk "nginx, round $round" "http://127.0.0.1:$nginx_port/")")
  nginx="$(rps_of "nginx, round $round")"
  line="- round $round, / nginx: default **$(ratio "$(rps_of "bext default, round $round")" "$nginx")**, cache off $(ratio "$(rps_of "bext, cache off, round $round")" "$nginx"), cache, compression and log off $(ratio "$(rps_of "bext, cache, compression and log off, round $round")" "$nginx")"
  if [[ -n "${BEXT_BASELINE:-}" ]]; then
    line+="; baseline build, default $(ratio "$(rps_of "baseline build, default, round $round")" "$nginx")"
  fi
  summary+=("$line")
done

echo "## What bext's layers cost on a proxied request ($(date -u +%Y-%m-%d))"
echo
machine_info
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  echo "- baseline: $("$BEXT_BASELINE" --version) ($BEXT_BASELINE)"
  echo "- command: \`BEXT_BASELINE=$BEXT_BASELINE BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS bench/proxy-layers.sh\`"
else
  echo "- command: \`BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS bench/proxy-layers.sh\`"
fi
echo
results_table
echo
printf '%s\n' "${summary[@]}"
