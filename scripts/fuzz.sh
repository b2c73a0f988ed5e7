#!/usr/bin/env bash
# Fuzzes the decoder (fuzz/fuzz_targets/decode.rs) with libFuzzer for a bounded time
# and prints how many inputs ran. Not part of the test command: run it by hand.
#
#   scripts/fuzz.sh [SECONDS]     default 300
#
# Installs cargo-fuzz into ~/.cache/position-sink/tools if missing. Uses the nightly
# toolchain when rustup has one, else the stable compiler with RUSTC_BOOTSTRAP=1
# (cargo-fuzz needs the unstable sanitizer flags). A crash leaves its input in
# fuzz/artifacts/decode/; reproduce with `cargo fuzz run decode <file>`.
set -euo pipefail

seconds="${1:-300}"
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}/tools"
export PATH="$tools/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz into $tools" >&2
  cargo install cargo-fuzz --locked --root "$tools" >&2
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

cd "$root"
mkdir -p fuzz/corpus/work
# A scratch corpus grown from the committed seeds, so the seeds stay small and stable.
cp -n fuzz/corpus/decode/* fuzz/corpus/work/ 2>/dev/null || true
log="$(mktemp)"
set +e
cargo "${toolchain[@]}" fuzz run decode fuzz/corpus/work -- \
  -dict=fuzz/decode.dict -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 2>&1 | tee "$log" | grep -E "^(#[0-9]+\s+(INITED|DONE|pulse)|Done|stat::|==[0-9]+==|SUMMARY|panicked)" 
status="${PIPESTATUS[0]}"
set -e
runs="$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)"
echo "fuzz.sh: decode: ${runs} inputs in ${seconds} s, exit status ${status}"
exit "$status"
