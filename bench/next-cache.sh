#!/usr/bin/env bash
# Next.js on bext (issue 15): what bext's shared Next cache handler costs,
# and how long an in-app revalidation takes to reach bext's cache.
#
# 1. The Next fixture's ISR page /rv with bext's HTTP cache off (every
#    request reaches Next), two workers: bext's cache handler
#    (runtime.next_cache = true) against Next's own per-process cache
#    (false), side by side in one run.
# 2. Revalidation to purge: with bext's cache on, /rv is stored, then
#    GET /api/revalidate?path=/rv (a route handler calling revalidatePath)
#    is timed. bext passes its answer on only once the other worker has
#    applied the revalidation and bext's copies of /rv are purged, so the
#    round trip bounds the time from revalidatePath to the purge. The same
#    request with the handler off (no purge, no broadcast) is the baseline.
#
# Usage: bench/next-cache.sh   (BENCH_REVALIDATIONS=200 by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk python3 curl

NEXT="$ROOT/tests/fixtures/next"
[[ -f "$NEXT/.next/BUILD_ID" ]] || { echo "build the Next fixture first (bash tests/fixtures/setup.sh)" >&2; exit 1; }
REVALIDATIONS="${BENCH_REVALIDATIONS:-200}"
[[ -n "${BENCH_SMOKE:-}" ]] && REVALIDATIONS=20

config() { # FILE NEXT_CACHE ISR_ENABLED
  printf '[runtime]\nnext_cache = %s\n\n[cache.isr]\nenabled = %s\n' "$2" "$3" >"$1"
}

echo "## Issue #15: Next.js shared cache handler ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- next: $(node -p "require('$NEXT/node_modules/next/package.json').version"), 2 workers"
echo "- command: \`BENCH_REVALIDATIONS=$REVALIDATIONS bench/next-cache.sh\`"
echo

results=()
for handler in true false; do
  config "$WORK/uncached-$handler.toml" "$handler" false
  start_bext addr "$NEXT" "$WORK/uncached-$handler.log" --workers 2 --config "$WORK/uncached-$handler.toml"
  curl -s -o /dev/null "http://$addr/rv"
  results+=("$(run_wrk "next_cache = $handler, bext's cache off, GET /rv" "http://$addr/rv")")
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
done
echo "### ISR page through Next's cache (bext's own cache off)"
echo
results_table
echo
echo "handler / Next's own: $(ratio "$(rps_of "next_cache = true, bext's cache off, GET /rv")" "$(rps_of "next_cache = false, bext's cache off, GET /rv")")"
echo

echo "### revalidatePath in a route handler → bext's purge ($REVALIDATIONS revalidations)"
echo
echo "| run | p50 ms | p90 ms | p99 ms | max ms | the GET /rv after it (x-bext-cache) |"
echo "|---|---:|---:|---:|---:|---:|"
for handler in true false; do
  config "$WORK/cached-$handler.toml" "$handler" true
  start_bext addr "$NEXT" "$WORK/cached-$handler.log" --workers 2 --config "$WORK/cached-$handler.toml"
  python3 - "$addr" "$REVALIDATIONS" "next_cache = $handler" <<'PY'
import collections, http.client, sys, time
addr, n, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host, port = addr.rsplit(':', 1)
conn = http.client.HTTPConnection(host, int(port))
def get(path):
    conn.request('GET', path)
    r = conn.getresponse(); r.read()
    return r
times, after = [], collections.Counter()
for _ in range(n):
    get('/rv'); get('/rv')  # stored, then a HIT
    t0 = time.perf_counter()
    get('/api/revalidate?path=/rv')
    times.append((time.perf_counter() - t0) * 1000)
    after[get('/rv').getheader('x-bext-cache')] += 1
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
states = ', '.join(f'{s} {c}' for s, c in after.most_common())
print(f"| {name} | {q(0.5):.2f} | {q(0.9):.2f} | {q(0.99):.2f} | {times[-1]:.2f} | {states} |")
PY
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
done
