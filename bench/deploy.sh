#!/usr/bin/env bash
# Deploys, measured (issue #12): `bextctl deploy` of the Express fixture and
# of the Next.js fixture to a running `bext serve`, with the wall time of
# each step as bextctl reports it; then what a switch costs the clients:
# wrk against the app in steady state, and wrk while `bextctl rollback`
# starts a new generation, health-gates it, switches and drains the old
# one (no build, so the window holds only the switch). Reported: p99 and
# the longest request (the longest gap a client saw) in both windows, and
# failed requests.
#
# Usage: bench/deploy.sh     (BENCH_DURATION=10s by default)
# BENCH_SMOKE=1 (make bench-smoke): the Express fixture only, uploaded
# with its node_modules (no npm ci, no network).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need wrk taskset python3 curl

EXPRESS="$ROOT/tests/fixtures/express"
NEXT="$ROOT/tests/fixtures/next"
BEXTCTL="$ROOT/target/release/bextctl"
SMOKE="${BENCH_SMOKE:-}"
[[ -d "$EXPRESS/node_modules" && -f "$NEXT/.next/BUILD_ID" ]] || { echo "bench: run tests/fixtures/setup.sh first" >&2; exit 1; }

cat >"$WORK/platform.toml" <<TOML
[platform]
data_dir = "$WORK/data"
shutdown_grace = "10s"

[apps.api]
source = "$EXPRESS"
domains = ["api.test"]
[apps.api.deploy]
health_path = "/"

[apps.web]
source = "$NEXT"
domains = ["web.test"]
[apps.web.deploy]
health_path = "/"
TOML

BEXT_THREADS=1 BEXT_LOG_FORMAT=json \
  taskset -c "$SERVER_CPU" "$ROOT/target/release/bext" serve --config "$WORK/platform.toml" --listen 127.0.0.1:0 \
  2>"$WORK/bext.log" >/dev/null &
PIDS+=($!)
wait_until 300 grep -q '"apps started' "$WORK/bext.log"
ADDR="$(grep -m1 '"listening on' "$WORK/bext.log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
ctl() { "$BEXTCTL" --socket "$WORK/data/control.sock" "$@"; }

# deploy_steps APP DIR [ARGS]: deploys DIR; prints "step=seconds ..." and
# the total, from bextctl's plain progress lines ("[step] done (1.2s)").
deploy_steps() {
  local app="$1" dir="$2" started ended
  shift 2
  started="$(date +%s.%N)"
  ctl deploy "$app" "$dir" "$@" 2>"$WORK/deploy-$app.log" >/dev/null || {
    echo "bench: the deploy of $app failed:" >&2; cat "$WORK/deploy-$app.log" >&2; exit 1; }
  ended="$(date +%s.%N)"
  python3 - "$WORK/deploy-$app.log" "$started" "$ended" <<'PY'
import re, sys
steps = {}
for line in open(sys.argv[1]):
    # "1.2s" under a minute, "2m05s" above.
    m = re.match(r"\[(\w+)\] done \((?:(\d+)m)?([\d.]+)s\)", line.strip())
    if m:
        secs = 60 * int(m.group(2) or 0) + float(m.group(3))
        steps[m.group(1)] = steps.get(m.group(1), 0.0) + secs
total = float(sys.argv[3]) - float(sys.argv[2])
print(" ".join(f"{k}={v:.1f}" for k, v in steps.items()) + f"|{total:.1f}")
PY
}

# latency NAME HOST [during CMD...]: one wrk run against HOST's `/` (with
# CMD started 1/4 into it); prints "NAME|req/s|p99|max|errors".
latency() {
  local name="$1" host="$2" out secs
  shift 2
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d1s -H "Host: $host" "http://$ADDR/" >/dev/null 2>&1 || true
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Host: $host" "http://$ADDR/" >"$WORK/wrk.out" &
  local wrk=$!
  if [[ "${1:-}" == during ]]; then
    shift
    secs="$(python3 -c "print(max(0.2, float('${DURATION%s}') / 4))")"
    sleep "$secs"
    "$@" >/dev/null 2>"$WORK/during.log" || { echo "bench: $* failed:" >&2; cat "$WORK/during.log" >&2; kill "$wrk" 2>/dev/null; exit 1; }
  fi
  wait "$wrk"
  out="$(cat "$WORK/wrk.out")"
  local rps p99 max errors
  rps="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
  p99="$(awk '$1=="99%" {print $2}' <<<"$out")"
  max="$(awk '$1=="Latency" {print $4}' <<<"$out")"
  errors="$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")"
  echo "$name|$rps|$p99|$max|${errors:-none}"
}

# switch_cost NAME APP HOST: the paced probe (bench/probe.py, PROBE_RATE
# req/s over 20 connections, well under saturation) for DURATION steady,
# then for DURATION with `bextctl rollback APP --to v1` (back to the
# deployed version, after the wrk run rolled back to `source`) started a
# quarter in. The
# switch instant is bext's "APP ... is live" log line. Prints
# "NAME|steady p99|steady max|start p99|start max|switch max|after p99|after max|errors":
# "start" is the requests scheduled while the new generation started and
# was health-gated (from the rollback's start to the switch), "switch" those
# in flight at the switch or scheduled within 50 ms after it, "after" the
# rest of the second after it (the old generation drains and exits, the
# cache is cold if the deploy purged it).
PROBE_RATE="${BENCH_PROBE_RATE:-1000}"
switch_cost() {
  local name="$1" app="$2" host="$3" secs probe began
  secs="${DURATION%s}"
  taskset -c "$CLIENT_CPU" python3 "$BENCH_DIR/probe.py" "$ADDR" "$host" "$PROBE_RATE" 20 "$secs" "$WORK/steady.txt"
  taskset -c "$CLIENT_CPU" python3 "$BENCH_DIR/probe.py" "$ADDR" "$host" "$PROBE_RATE" 20 "$secs" "$WORK/during.txt" &
  probe=$!
  sleep "$(python3 -c "print(max(0.2, float('$secs') / 4))")"
  began="$(date +%s.%N)"
  ctl rollback "$app" --to v1 >/dev/null 2>"$WORK/during.log" || { echo "bench: rollback failed:" >&2; cat "$WORK/during.log" >&2; kill "$probe" 2>/dev/null; exit 1; }
  wait "$probe"
  python3 - "$WORK/steady.txt" "$WORK/during.txt" "$WORK/bext.log" "$app" "$began" "$name" <<'PY'
import datetime, json, sys
steady_f, during_f, log, app, began, name = sys.argv[1:7]
began = float(began)
def rows(path):
    return [(float(d), float(l), int(s)) for d, l, s in (line.split() for line in open(path))]
switch = None
for line in open(log):
    try:
        event = json.loads(line)
    except ValueError:
        continue
    if event.get("app") == app and str(event.get("message", "")).endswith("is live"):
        t = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        if t >= began:
            switch = t
if switch is None:
    sys.exit(f"bench: no switch of {app} in the log after the rollback")
def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else 0.0
ms = lambda x: f"{x * 1000:.1f}ms"
steady, during = rows(steady_f), rows(during_f)
start = [l for d, l, s in during if began <= d < switch]
around = [l for d, l, s in during if d <= switch + 0.05 and switch <= d + l]
after = [l for d, l, s in during if switch + 0.05 < d <= switch + 1.0]
errors = sum(1 for r in steady + during if not 200 <= r[2] < 400)
sl = [l for _, l, _ in steady]
print(f"{name}|{ms(p99(sl))}|{ms(max(sl))}|{ms(p99(start))}|{ms(max(start, default=0))}|"
      f"{ms(max(around, default=0))} ({len(around)} requests)|{ms(p99(after))}|{ms(max(after, default=0))}|{errors}")
PY
}

steps=()
switches=()
costs=()
apps=(api)
[[ -z "$SMOKE" ]] && apps+=(web)
for app in "${apps[@]}"; do
  case "$app" in
    api) dir="$EXPRESS"; host=api.test ;;
    web) dir="$NEXT"; host=web.test ;;
  esac
  curl -sf -H "Host: $host" "http://$ADDR/" >/dev/null
  if [[ -n "$SMOKE" ]]; then
    steps+=("$app (with node_modules)|$(deploy_steps "$app" "$dir" --include-node-modules)")
  else
    steps+=("$app|$(deploy_steps "$app" "$dir")")
  fi
  switches+=("$(latency "$app steady" "$host")")
  switches+=("$(latency "$app during a rollback" "$host" during ctl rollback "$app")")
  costs+=("$(switch_cost "$app" "$app" "$host")")
done

echo "## Deploys: time by step, and what a switch costs clients ($(date -u +%Y-%m-%d))"
echo
machine_info
echo "- apps: the Express and Next.js fixtures under \`bext serve\` (1 worker each, \`deploy.health_path = \"/\"\`); \`bextctl deploy\` uploads the fixture (without \`node_modules\` and \`.next\`: the deploy runs \`npm ci\` and, for Next, \`next build\`)"
echo "- switch: wrk on \`GET /\` for $DURATION, steady, then again with \`bextctl rollback\` started a quarter in (new generation, health gate, switch, drain; no build)"
echo "- command: \`BENCH_DURATION=$DURATION bench/deploy.sh\`"
echo
echo "| deploy | steps (s) | total (s) |"
echo "|---|---|---:|"
for s in "${steps[@]}"; do
  IFS='|' read -r n st total <<<"$s"
  echo "| $n | $st | $total |"
done
echo
echo "| run | req/s | p99 | longest request | errors |"
echo "|---|---:|---:|---:|---|"
for s in "${switches[@]}"; do
  IFS='|' read -r n rps p99 max errors <<<"$s"
  echo "| $n | $rps | $p99 | $max | $errors |"
done
echo
echo "Paced load (\`bench/probe.py\`: $PROBE_RATE req/s over 20 keep-alive connections, latency from each request's scheduled time), steady for $DURATION, then $DURATION with \`bextctl rollback\` a quarter in. *start*: requests scheduled while the new generation started and was health-gated; *switch*: requests in flight at the switch or scheduled within 50 ms after it; *after*: the rest of the second after the switch (the old generation drains and exits; the cache starts cold: \`deploy.purge_cache\` is on)."
echo
echo "| app | steady p99 | steady max | start p99 | start max | switch max | after p99 | after max | failed |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for s in "${costs[@]}"; do
  IFS='|' read -r n sp sm tp tm wm ap am errors <<<"$s"
  echo "| $n | $sp | $sm | $tp | $tm | $wm | $ap | $am | $errors |"
done
