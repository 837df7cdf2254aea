#!/usr/bin/env bash
# rustls on ring vs on aws-lc-rs: cold release build time of a program that
# links each, and server CPU per TLS 1.3 handshake (in memory; see
# bench/tls-provider/src/main.rs). Prints a markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/tls-provider"
N="${BENCH_HANDSHAKES:-3000}"
TARGET="$(mktemp -d /tmp/bext-tls-provider.XXXXXX)"
trap 'rm -rf "$TARGET"' EXIT
echo "| provider | cold release build (s) | default key exchange | µs/handshake | X25519 only: µs/handshake |"
echo "|---|---:|---|---:|---:|"
for provider in ring aws; do
  rm -rf "$TARGET/$provider"
  started=$(date +%s.%N)
  cargo build -q --release --features "$provider" --target-dir "$TARGET/$provider"
  built=$(python3 -c "print(f'{$(date +%s.%N) - $started:.0f}')")
  bin="$TARGET/$provider/release/tls-provider"
  default="$("$bin" "$N")"
  x25519="$("$bin" "$N" x25519)"
  group="$(sed -E 's/.*key exchange ([^:]*):.*/\1/' <<<"$default")"
  us() { sed -E 's/.*: ([0-9.]+) µs.*/\1/' <<<"$1"; }
  echo "| $provider | $built | $group | $(us "$default") | $(us "$x25519") |"
done
