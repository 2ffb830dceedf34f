#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a short while (FUZZ_SECONDS each, default 15):
# the smoke run `make test` does. `cargo fuzz run -s none TARGET` runs one for longer; a crash
# leaves its input under fuzz/artifacts/TARGET/ (replay: `cargo fuzz run -s none TARGET FILE`).
# Stable Rust: no sanitizer (`-s none`); debug builds (`-D`) compile faster and keep overflow
# checks and assertions on.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-15}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo fuzz build -s none -D
log="$(mktemp)"
for target in $(cargo fuzz list); do
  echo "fuzz: $target for ${seconds}s"
  rc=0
  cargo fuzz run -s none -D "$target" -- -max_total_time="$seconds" -max_len=4096 \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  grep -E '^stat::number_of_executed_units' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log"
    echo "fuzz: $target failed; the input is under fuzz/artifacts/$target/"
    exit "$rc"
  fi
done
rm -f "$log"
