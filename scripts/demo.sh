#!/usr/bin/env bash
# The main job end to end on local defaults: starts a local Kafka broker, creates the
# `positions` topic, publishes sample updates (2% of them invalid), runs the worker
# until they are all in the Delta table at ./data/demo/positions (the invalid ones in
# ./data/demo/positions_dead_letters), prints a summary of both, and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/position-sink/target}"
PORT="${POSITION_SINK_DEMO_PORT:-19092}"
COUNT="${COUNT:-5000}"
TABLE=./data/demo/positions

scripts/setup.sh
cargo build --locked
BIN="$CARGO_TARGET_DIR/debug/position-sink"

scripts/kafka.sh stop "$PORT" >/dev/null 2>&1 || true
scripts/kafka.sh start "$PORT"
trap 'scripts/kafka.sh stop "$PORT"' EXIT
scripts/kafka.sh topic positions 4 "$PORT" 2>/dev/null

# A fresh broker restarts offsets at 0: a table that recorded offsets of an earlier
# demo broker would (rightly) skip them, so the demo starts with a fresh table.
rm -rf "$TABLE" "${TABLE}_dead_letters"
export POSITION_SINK__KAFKA__BROKERS="127.0.0.1:$PORT"
export POSITION_SINK__DELTA__TABLE_URI="$TABLE"
"$BIN" generate --config config/local.toml --count "$COUNT" --bad-percent 2
"$BIN" run --config config/local.toml --exit-when-caught-up
"$BIN" show --config config/local.toml
"$BIN" dead-letters list --config config/local.toml --limit 3 --width 100
