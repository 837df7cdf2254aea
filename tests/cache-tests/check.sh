#!/usr/bin/env bash
# CI gate: runs the http-cache-tests suite against bext and fails if fewer
# tests pass than the count recorded in EXPECTED_PASS (see bench/RESULTS.md
# for the full comparison with nginx and Varnish, and why each remaining
# failure is deliberate or impossible).
#
#   tests/cache-tests/check.sh [BEXT_BINARY]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mktemp /tmp/bext-cache-tests.XXXXXX.json)"
trap 'rm -f "$out"' EXIT
bash "$here/bext.sh" "${1:-}" "$out" 2>/dev/null
summary="$(node "$here/summary.js" "bext=$out")"
# The per-area table's total row: | **Total** | **tests** | **passed** | …
passed="$(grep -m1 '^| \*\*Total\*\*' <<<"$summary" | awk -F'|' '{gsub(/[ *]/, "", $4); print $4}')"
expected="$(tr -dc '0-9' <"$here/EXPECTED_PASS")"
echo "http-cache-tests: $passed passed (recorded: $expected)"
if [[ -z "$passed" || "$passed" -lt "$expected" ]]; then
  echo "http-cache-tests: the pass count dropped below the recorded $expected" >&2
  grep '^| \*\*Total' <<<"$summary" >&2 || true
  exit 1
fi
