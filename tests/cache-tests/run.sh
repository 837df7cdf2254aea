#!/usr/bin/env bash
# Runs the http-cache-tests client (the whole suite, as its CLI does) against
# an HTTP cache that is already running at BASE_URL and that forwards to the
# suite's origin server (see origin.sh), and writes the raw results JSON.
#
#   tests/cache-tests/run.sh BASE_URL OUT_JSON
#   tests/cache-tests/run.sh --id TEST_ID BASE_URL     # one test, with a dump
#                                                      # of the client's requests
#                                                      # and responses, to stdout
#
# BASE_URL is scheme://host:port of the cache, without a path (a trailing
# slash is removed: the client appends "/test/<uuid>", and a "//" would make
# the origin read the path as a host name). The client sends every request
# to BASE_URL: PUT /config/<uuid> (test setup; the cache must pass PUTs
# through), GET/HEAD/POST... /test/<uuid>[...] (the test itself), and
# GET /state/<uuid> (what the origin saw; must not be served from cache).
#
# Env: CACHE_TESTS_TIMEOUT (seconds, default 900) bounds the client's run.
# Exits non-zero if the client produced no results. Summarise with
#   node tests/cache-tests/summary.js OUT_JSON
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
suite="$here/node_modules/http-cache-tests"

usage() { echo "usage: $0 BASE_URL OUT_JSON | $0 --id TEST_ID BASE_URL" >&2; exit 2; }

test_id=""
if [[ "${1:-}" == "--id" ]]; then
  [[ $# -eq 3 ]] || usage
  test_id="$2"; base="$3"; out=""
else
  [[ $# -eq 2 ]] || usage
  base="$1"; out="$2"
fi
base="${base%/}"
[[ "$base" =~ ^https?://[^/]+$ ]] || { echo "run.sh: BASE_URL must be scheme://host:port, got '$base'" >&2; exit 2; }

if [[ ! -f "$suite/cli.mjs" ]]; then
  echo "run.sh: http-cache-tests is not installed; run $here/setup.sh" >&2
  exit 1
fi

# Preflight: something must answer HTTP at BASE_URL (any status will do).
node -e '
  fetch(process.argv[1] + "/state/preflight", { signal: AbortSignal.timeout(5000) })
    .then(() => process.exit(0))
    .catch(e => { console.error(`run.sh: nothing answers at ${process.argv[1]}: ${e.cause?.code || e.message}`); process.exit(1) })
' "$base"

# cli.mjs reads its options from npm's environment (npm_config_base,
# npm_config_id); it is started with node directly rather than through
# `npm run cli --base=...` (npm 11 warns about unknown CLI configs and npm run
# adds nothing else). It reads `npm_config_id || npm_package_config_id` and
# compares that to '': both must be set to '' for a full run, or it takes
# `undefined` for a test id and crashes.
timeout_s="${CACHE_TESTS_TIMEOUT:-900}"
if [[ -n "$test_id" ]]; then
  npm_config_base="$base" npm_config_id="$test_id" \
    timeout "$timeout_s" node --no-warnings "$suite/cli.mjs"
  exit $?
fi

mkdir -p "$(dirname "$out")"
tmp="$out.partial"
start=$(date +%s)
set +e
npm_config_base="$base" npm_config_id="" npm_package_config_id="" \
  timeout "$timeout_s" node --no-warnings "$suite/cli.mjs" >"$tmp"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  rm -f "$tmp"
  echo "run.sh: client exited with status $rc (124 = timed out after ${timeout_s}s)" >&2
  exit 1
fi
# The client exits 0 even when it crashed (it prints the error to stderr);
# accept the output only if it is a non-empty JSON object.
if ! node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))
  const n = Object.keys(r).length
  if (typeof r !== "object" || Array.isArray(r) || n === 0) process.exit(1)
  console.error(`run.sh: ${n} test results in ${process.argv[2]}s`)
' "$tmp" "$(( $(date +%s) - start ))"; then
  rm -f "$tmp"
  echo "run.sh: the client produced no results (see above)" >&2
  exit 1
fi
mv "$tmp" "$out"
