#!/usr/bin/env bash
# The test command: installs what is missing, starts a local Kafka broker on
# 127.0.0.1:39092, runs every test against it, and stops it again.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/position-sink/target}"
CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
PORT="${POSITION_SINK_TEST_PORT:-39092}"

scripts/setup.sh
scripts/kafka.sh stop "$PORT" >/dev/null 2>&1 || true
scripts/kafka.sh start "$PORT"
trap 'scripts/kafka.sh stop "$PORT"' EXIT

export POSITION_SINK_TEST_BROKERS="127.0.0.1:$PORT"
export POSITION_SINK_PYTHON="$CACHE/venv/bin/python"
cargo test --locked "$@"
