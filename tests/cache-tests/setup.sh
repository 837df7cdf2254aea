#!/usr/bin/env bash
# Installs the http-cache-tests suite (pinned in package-lock.json) into
# tests/cache-tests/node_modules. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "[cache-tests] npm ci (http-cache-tests)"
  npm ci --no-audit --no-fund --ignore-scripts
else
  echo "[cache-tests] node_modules up to date"
fi
