#!/usr/bin/env bash
# Runs the whole http-cache-tests suite against bext: starts `bext run` on
# the suite's origin (this directory is the app), runs the client through
# bext, stops bext, and writes the raw results.
#
#   tests/cache-tests/bext.sh [BEXT_BINARY] [OUT_JSON]
#
# Defaults: target/debug/bext, tests/cache-tests/results/bext.json.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bext="${1:-}"
bext="${bext:-$root/target/debug/bext}"
out="${2:-$here/results/bext.json}"
mkdir -p "$(dirname "$out")"
work="$(mktemp -d /tmp/bext-cache-tests.XXXXXX)"
pid=""
cleanup() {
  [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

bash "$here/setup.sh" >/dev/null
XDG_RUNTIME_DIR="$work" BEXT_LOG_FORMAT=json BEXT_LOG=warn,bext::run=info \
  "$bext" run "$here" --listen 127.0.0.1:0 2>"$work/bext.log" >/dev/null &
pid=$!
deadline=$((SECONDS + 60))
until grep -q '"listening on' "$work/bext.log"; do
  kill -0 "$pid" 2>/dev/null || { cat "$work/bext.log" >&2; echo "bext.sh: bext exited" >&2; exit 1; }
  (( SECONDS < deadline )) || { echo "bext.sh: bext did not start" >&2; exit 1; }
  sleep 0.1
done
addr="$(grep -m1 '"listening on' "$work/bext.log" | sed -E 's/.*"addr":"([^"]+)".*/\1/')"
bash "$here/run.sh" "http://$addr" "$out"
echo "results: $out" >&2
