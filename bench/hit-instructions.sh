#!/usr/bin/env bash
# User-space instructions per cache hit, counted by callgrind (exact and
# repeatable where timings drift), and the misses of its simulated first-
# level caches (instruction and data: what the instruction count does not
# show): `bext run` on the origin fixture, its 1 KiB page a hit, requested
# without Accept-Encoding (identity) and as a browser asks (a stored
# compressed variant); and the bare hyper server of bench/bare.sh, the
# same way. BEXT_BASELINE=/path/to/bext adds the two rows for another
# build, to compare. Every thread of the server counts (the log writer's
# too).
#
# Usage: bench/hit-instructions.sh   (BENCH_DURATION=6s by default)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk valgrind callgrind_control callgrind_annotate
DURATION="${BENCH_DURATION:-6s}"
ORIGIN="$ROOT/tests/fixtures/origin"
PAGE="/page/hit-1k?cc=public,max-age=3600&size=1024"
BROWSER="gzip, deflate, br, zstd"

cargo build --release --quiet --manifest-path "$BENCH_DIR/bare-server/Cargo.toml" \
  --target-dir "$ROOT/target/bench-tools/bare-server"
BARE="$ROOT/target/bench-tools/bare-server/release/bare-server"

# measure NAME BIN [ACCEPT-ENCODING]: one row (BIN "bare": the bare server).
measure() {
  local name="$1" bin="$2" accept="${3:-}" log="$WORK/$1.log" pid addr out requests path="$PAGE"
  local -a header=() command=("$bin" run "$ORIGIN" --listen 127.0.0.1:0 --workers 1)
  [[ -n "$accept" ]] && header=(-H "Accept-Encoding: $accept")
  [[ "$bin" == bare ]] && command=("$BARE" 127.0.0.1:0 1024) && path=/
  BEXT_THREADS=1 XDG_RUNTIME_DIR="$WORK" BEXT_LOG_FORMAT=json \
    valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file="$WORK/$name.cg" \
    --instr-atstart=no "${command[@]}" 2>"$log" >"$log.out" &
  pid=$!
  PIDS+=("$pid")
  wait_until 120 grep -qh 'listening on' "$log" "$log.out"
  if [[ "$bin" == bare ]]; then
    addr="$(sed -n 's/listening on //p' "$log.out")"
  else
    addr="$(grep -m1 '"listening on' "$log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
  fi
  wait_until 60 curl -sf "http://$addr$path"
  wrk -t1 -c10 -d2s "${header[@]}" "http://$addr$path" >/dev/null
  callgrind_control -i on "$pid" >/dev/null 2>&1
  out="$(wrk -t1 -c10 -d"$DURATION" "${header[@]}" "http://$addr$path")"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  requests="$(awk '/requests in/ {print $1}' <<<"$out")"
  wait_until 30 test -s "$WORK/$name.cg.1"
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # The totals line: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  callgrind_annotate "$WORK/$name.cg.1" 2>/dev/null | awk -v name="$name" -v accept="${accept:-none}" \
    -v n="$requests" '/PROGRAM TOTALS/ {
      for (i = 1; i <= NF; i++) gsub(",", "", $i)
      printf "| %s | %s | %d | %d | %d | %d |\n", name, accept, n, $1 / n, $7 / n, ($9 + $11) / n
    }'
}

echo "## Instructions per cache hit ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- command: \`BENCH_DURATION=$DURATION bench/hit-instructions.sh\`"
echo
echo "| build | Accept-Encoding | hits | instructions / hit | L1i misses / hit | L1d misses / hit |"
echo "|---|---|---:|---:|---:|---:|"
if [[ -n "${BEXT_BASELINE:-}" ]]; then
  measure baseline "$BEXT_BASELINE"
  measure baseline-browser "$BEXT_BASELINE" "$BROWSER"
fi
measure this "$ROOT/target/release/bext"
measure this-browser "$ROOT/target/release/bext" "$BROWSER"
measure bare-server bare
