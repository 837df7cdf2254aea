#!/usr/bin/env bash
# Installs the test tools (currently: the Deno runtime, from the npm package
# `deno`) into tests/tools/node_modules and links the real executable to
# tests/tools/bin/deno. Idempotent; safe to run repeatedly.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

log() { printf '[tools] %s\n' "$*"; }

# The `deno` package's postinstall only copies the binary next to its node
# shim; the real executable ships in the platform package, so scripts are
# not needed.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  log "npm ci (deno)"
  npm ci --no-audit --no-fund --ignore-scripts
else
  log "node_modules up to date"
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) platform_pkg="linux-x64-glibc" ;;
  Linux-aarch64 | Linux-arm64) platform_pkg="linux-arm64-glibc" ;;
  Darwin-x86_64) platform_pkg="darwin-x64" ;;
  Darwin-arm64) platform_pkg="darwin-arm64" ;;
  *) echo "[tools] unsupported platform: $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

real="$here/node_modules/@deno/$platform_pkg/deno"
if [[ ! -x "$real" ]]; then
  echo "[tools] deno executable not found at $real" >&2
  exit 1
fi

mkdir -p bin
ln -sfn "../node_modules/@deno/$platform_pkg/deno" bin/deno
log "bin/deno -> $(readlink bin/deno) ($("$here/bin/deno" --version | head -n1))"
