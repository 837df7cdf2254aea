#!/usr/bin/env bash
# Starts only the origin server of the http-cache-tests suite, in the
# foreground, on the given port (default 8000; 0 picks a free one and the
# server prints it: "Listening on http://:::PORT/").
#
#   tests/cache-tests/origin.sh PORT
#
# It execs `node origin.mjs` (so the PID you get from `origin.sh & echo $!`
# is the node process itself), which loads the suite's own
# node_modules/http-cache-tests/server/server.mjs. Run setup.sh first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/node_modules/http-cache-tests/server/server.mjs" ]]; then
  echo "origin.sh: http-cache-tests is not installed; run $here/setup.sh" >&2
  exit 1
fi
PORT="${1:-${PORT:-8000}}" exec node "$here/origin.mjs"
