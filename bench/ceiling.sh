#!/usr/bin/env bash
# Where a 1 KiB cache hit's time goes, stage by stage: a build of bext with
# `--features bench-ceiling` (supervisor/src/ceiling.rs) answers fixed bytes
# (those of bench/bare-server) at one stage of its request path, chosen by
# BEXT_BENCH_CEILING, and each stage is run against the bare hyper server:
#
#   1  as the listener hands the request over (connection handling)
#   2  as the app's service takes it
#   3  after the request's bookkeeping (client, request id, access log)
#   -  the whole path: a real cache hit of the same size
#
# Not in `make bench`: its first run builds bext once more (a separate
# target directory, a few minutes). BENCH_ROUNDS=2 by default.
#
# Usage: bench/ceiling.sh   (BENCH_DURATION=5s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk taskset curl cargo
DURATION="${BENCH_DURATION:-5s}"
ROUNDS="${BENCH_ROUNDS:-2}"
ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/ceiling-1k?cc=public,max-age=3600&size=1024"

cargo build --release --quiet --manifest-path "$BENCH_DIR/bare-server/Cargo.toml" \
  --target-dir "$ROOT/target/bench-tools/bare-server"
BARE="$ROOT/target/bench-tools/bare-server/release/bare-server"
cargo build --release --quiet -p bext --features bench-ceiling \
  --manifest-path "$ROOT/Cargo.toml" --target-dir "$ROOT/target/bench-tools/ceiling"
export BEXT_BIN="$ROOT/target/bench-tools/ceiling/release/bext"

taskset -c "$SERVER_CPU" "$BARE" 127.0.0.1:0 1024 >"$WORK/bare.log" &
PIDS+=($!)
wait_until 10 grep -q 'listening on' "$WORK/bare.log"
bare_addr="$(sed -n 's/listening on //p' "$WORK/bare.log")"

declare -A addr
stages=(1 2 3 hit)
for stage in "${stages[@]}"; do
  BEXT_BENCH_CEILING="$stage" start_bext "addr[$stage]" "$ORIGIN" "$WORK/bext-$stage.log" --workers 1
done
for _ in 1 2 3; do curl -s -o /dev/null "http://${addr[hit]}$PAGE"; done
curl -s -D - -o /dev/null "http://${addr[hit]}$PAGE" | grep -qi '^x-bext-cache: HIT' \
  || { echo "bench: the whole path never served a hit" >&2; exit 1; }
for stage in 1 2 3; do
  curl -s -D - -o /dev/null "http://${addr[$stage]}$PAGE" | grep -qi '^cache-status: bext; hit; ttl=3588' \
    || { echo "bench: stage $stage does not answer the fixed bytes (built without bench-ceiling?)" >&2; exit 1; }
done

declare -A label=(
  [1]="stage 1: at the listener"
  [2]="stage 2: at the app's service"
  [3]="stage 3: after request id and access log"
  [hit]="whole path: a cache hit"
)
results=()
for round in $(seq "$ROUNDS"); do
  # The same request line to every server (the bare one ignores it).
  results+=("$(run_wrk "bare hyper server, round $round" "http://$bare_addr$PAGE")")
  for stage in "${stages[@]}"; do
    results+=("$(run_wrk "${label[$stage]}, round $round" "http://${addr[$stage]}$PAGE")")
  done
done

echo "## A 1 KiB hit, stage by stage, against the bare stack ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- command: \`BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS bench/ceiling.sh\`"
echo
results_table
echo
for round in $(seq "$ROUNDS"); do
  bare="$(rps_of "bare hyper server, round $round")"
  line="- round $round, / bare:"
  for stage in "${stages[@]}"; do
    line+=" ${label[$stage]} **$(ratio "$(rps_of "${label[$stage]}, round $round")" "$bare")**;"
  done
  echo "${line%;}"
done
