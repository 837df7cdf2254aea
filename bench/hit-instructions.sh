#!/usr/bin/env bash
# User-space instructions per cache hit, counted by callgrind (exact and
# repeatable where timings drift): `bext run` on the origin fixture, its
# 1 KiB page a hit, requested without Accept-Encoding (identity) and as a
# browser asks (a stored compressed variant). BEXT_BASELINE=/path/to/bext
# adds the same two rows for another build, to compare.
#
# Usage: bench/hit-instructions.sh   (BENCH_DURATION=6s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk valgrind callgrind_control callgrind_annotate
DURATION="${BENCH_DURATION:-6s}"
ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/hit-1k?cc=public,max-age=3600&size=1024"
BROWSER="gzip, deflate, br, zstd"

# measure NAME BIN [ACCEPT-ENCODING]: one row.
measure() {
  local name="$1" bin="$2" accept="${3:-}" log="$WORK/$1.log" pid addr out requests total
  local -a header=()
  [[ -n "$accept" ]] && header=(-H "Accept-Encoding: $accept")
  BEXT_THREADS=1 XDG_RUNTIME_DIR="$WORK" BEXT_LOG_FORMAT=json \
    valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.cg" --instr-atstart=no \
    "$bin" run "$ORIGIN" --listen 127.0.0.1:0 --workers 1 2>"$log" >/dev/null &
  pid=$!
  PIDS+=("$pid")
  wait_until 120 grep -q '"listening on' "$log"
  addr="$(grep -m1 '"listening on' "$log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
  wait_until 60 curl -sf "http://$addr$PAGE"
  wrk -t1 -c10 -d2s "${header[@]}" "http://$addr$PAGE" >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  out="$(wrk -t1 -c10 -d"$DURATION" "${header[@]}" "http://$addr$PAGE")"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  requests="$(awk '/requests in/ {print $1}' <<<"$out")"
  wait_until 30 test -s "$WORK/$name.cg.1"
  total="$(callgrind_annotate "$WORK/$name.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo "| $name | ${accept:-none} | $requests | $((total / requests)) |"
}

echo "## Instructions per cache hit ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- command: \`BENCH_DURATION=$DURATION bench/hit-instructions.sh\`"
echo
echo "| build | Accept-Encoding | hits | instructions / hit |"
echo "|---|---|---:|---:|"
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  measure baseline "$BEXT_BASELINE"
  measure baseline-browser "$BEXT_BASELINE" "$BROWSER"
fi
measure this "$ROOT/target/release/bext"
measure this-browser "$ROOT/target/release/bext" "$BROWSER"
