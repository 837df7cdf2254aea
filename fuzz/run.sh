#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10), on a scratch copy
# of the committed corpus (new inputs are not written into the repo).
#
#   bash fuzz/run.sh            # 10 s per target (what `make test` runs)
#   bash fuzz/run.sh 600        # ten minutes per target
#   bash fuzz/run.sh 60 config  # one target
#
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain build them. A crash leaves its input in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds=${1:-10}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(h1_response chunked cache_headers host_router forwarded config fast_h1)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  out=$(cargo fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 2>&1) || {
    printf '%s\n' "$out" | tail -40
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/)"
    exit 1
  }
  runs=$(printf '%s\n' "$out" | grep -oE 'Done [0-9]+ runs' | tail -1 | grep -oE '[0-9]+' || echo '?')
  echo "fuzz: $t ok: $runs runs in ${seconds}s without a crash"
done
