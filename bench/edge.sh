#!/usr/bin/env bash
# Edge mode (issue 14, acceptance 7 and the purge figure of acceptance 2):
# two `bext run` instances of the origin fixture sharing one redis-server
# (A by [redis], B by REDIS_URL alone), measured by bench/edge.py over one
# keep-alive connection each: L1 hit, L2 hit (promotion) and miss latency
# and rate, a plain Redis GET of the same bytes, renders with and without
# sharing, and purge propagation (100 purges on A, each timed until B no
# longer serves the purged copy).
#
# Usage: bench/edge.sh   (BENCH_PAGES=2000 BENCH_PURGES=100 by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need redis-server python3 curl

ORIGIN="$ROOT/tests/fixtures/origin"
# BENCH_SMOKE=1 (make bench-smoke): 50 pages, 10 purges.
if [[ -n "${BENCH_SMOKE:-}" ]]; then
  PAGES="${BENCH_PAGES:-50}"
  PURGES="${BENCH_PURGES:-10}"
else
  PAGES="${BENCH_PAGES:-2000}"
  PURGES="${BENCH_PURGES:-100}"
fi

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_until 10 python3 -c "import socket; s=socket.create_connection(('127.0.0.1',$redis_port)); s.sendall(b'PING\r\n'); assert s.recv(7)==b'+PONG\r\n'"

mkdir -p "$WORK/a" "$WORK/b"
for d in a b; do cp "$ORIGIN/package.json" "$ORIGIN/server.js" "$WORK/$d/"; done
printf '[redis]\nurl = "redis://127.0.0.1:%s/"\n' "$redis_port" >"$WORK/a/bext.config.toml"
BEXT_PURGE_TOKEN=bench-token start_bext a_addr "$WORK/a" "$WORK/a.log" --workers 1
REDIS_URL="redis://127.0.0.1:$redis_port/" BEXT_PURGE_TOKEN=bench-token \
  start_bext b_addr "$WORK/b" "$WORK/b.log" --workers 1

echo "## Edge mode: two instances, one Redis ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- redis: $(redis-server --version | awk '{print $3}')"
echo "- command: \`BENCH_PAGES=$PAGES BENCH_PURGES=$PURGES bench/edge.sh\`"
echo
python3 "$BENCH_DIR/edge.py" "$a_addr" "$b_addr" "$redis_port" "$PAGES" "$PURGES"

# Throughput under load (wrk, one thread, $CONNECTIONS connections, the
# servers on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU, Redis unpinned): one
# instance alone (C, no Redis) against the edge pair. Misses and L2 hits
# ask for a new page with every request (bench/edge-pages.lua); the L2
# run on B replays, for a quarter of the time, the pages A's miss run
# stored (B cannot promote faster than 4× A renders: checked by the states).
mkdir -p "$WORK/c"
cp "$ORIGIN/package.json" "$ORIGIN/server.js" "$WORK/c/"
start_bext c_addr "$WORK/c" "$WORK/c.log" --workers 1
need wrk
wrk_pages() { # NAME ADDR PREFIX DURATION: "NAME|req/s|p50|p99|states"
  local out
  out="$(EDGE_PREFIX="$3" taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$4" --latency \
    -s "$BENCH_DIR/edge-pages.lua" "http://$2")"
  echo "$1|$(awk '/^Requests\/sec/ {print $2}' <<<"$out")|$(awk '$1=="50%" {print $2}' <<<"$out")|$(awk '$1=="99%" {print $2}' <<<"$out")|$(awk '/^states:/ {print $2, $3, $4}' <<<"$out")"
}
wrk_page() { # NAME ADDR: a page every request hits in memory
  local out url="http://$2/page/l1?cc=public,max-age=3600&size=1024"
  curl -sf -H 'Host: site.test' "$url" >/dev/null
  curl -sf -H 'Host: site.test' "$url" >/dev/null
  out="$(taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H 'Host: site.test' "$url")"
  echo "$1|$(awk '/^Requests\/sec/ {print $2}' <<<"$out")|$(awk '$1=="50%" {print $2}' <<<"$out")|$(awk '$1=="99%" {print $2}' <<<"$out")|all hits"
}
secs="${DURATION%s}"
quarter="$(python3 -c "print(max(1, int($secs) // 4))")s"
rows=()
rows+=("$(wrk_pages "miss, one instance alone (C, no Redis)" "$c_addr" c "$DURATION")")
rows+=("$(wrk_pages "miss, edge (A: render, memory, Redis write + lease)" "$a_addr" a "$DURATION")")
rows+=("$(wrk_pages "L2 hit, edge (B: one MGET, promoted)" "$b_addr" a "$quarter")")
rows+=("$(wrk_page "L1 hit, one instance alone (C)" "$c_addr")")
rows+=("$(wrk_page "L1 hit, edge (B)" "$b_addr")")
echo
echo "| under load (wrk -t1 -c$CONNECTIONS) | req/s | p50 | p99 | answers |"
echo "|---|---:|---:|---:|---|"
for r in "${rows[@]}"; do echo "| ${r//|/ | } |"; done
miss_c="$(cut -d'|' -f2 <<<"${rows[0]}")"; miss_a="$(cut -d'|' -f2 <<<"${rows[1]}")"
hit_c="$(cut -d'|' -f2 <<<"${rows[3]}")"; hit_b="$(cut -d'|' -f2 <<<"${rows[4]}")"
echo
echo "- edge / alone: misses $(ratio "$miss_a" "$miss_c"), L1 hits $(ratio "$hit_b" "$hit_c")"
