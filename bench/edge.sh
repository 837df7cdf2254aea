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
PAGES="${BENCH_PAGES:-2000}"
PURGES="${BENCH_PURGES:-100}"

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
