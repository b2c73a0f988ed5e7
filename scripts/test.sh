#!/usr/bin/env bash
# The test command: installs what is missing (Apache Spark with Delta Lake too, the
# reference reader, and Toxiproxy), starts a local Kafka broker on 127.0.0.1:39092, a
# local S3-compatible server (moto) on 127.0.0.1:39600 and Toxiproxy's API on
# 127.0.0.1:39601 (its proxies to the S3 server on the ports above), runs every
# test against them, and stops them again (and the broker the outage scenario of
# tests/faults.rs starts on 39192).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/position-sink/target}"
CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
PORT="${POSITION_SINK_TEST_PORT:-39092}"

scripts/setup.sh
scripts/spark.sh fetch   # the reference reader of the deletion-vector tests
scripts/toxiproxy.sh fetch   # slow and failing object storage
OUTAGE_PORT=39192
# Keep the brokers' and the S3 server's ports out of the kernel's ephemeral range, so no
# outgoing connection holds one when a server starts (root only; best effort).
reserved=/proc/sys/net/ipv4/ip_local_reserved_ports
if [ -w "$reserved" ]; then
  ours="$PORT-$((PORT + 5)),$OUTAGE_PORT-$((OUTAGE_PORT + 5)),${POSITION_SINK_TEST_S3_PORT:-39600}-$((${POSITION_SINK_TEST_S3_PORT:-39600} + 9))"
  current="$(cat "$reserved")"
  echo "${current:+$current,}$ours" > "$reserved" 2>/dev/null || true
fi
S3_PORT="${POSITION_SINK_TEST_S3_PORT:-39600}"
TOXIPROXY_PORT=$((S3_PORT + 1))   # its proxies listen on the ports above it
scripts/kafka.sh stop "$PORT" >/dev/null 2>&1 || true
scripts/kafka.sh stop "$OUTAGE_PORT" >/dev/null 2>&1 || true
scripts/s3.sh stop "$S3_PORT" >/dev/null 2>&1 || true
scripts/toxiproxy.sh stop "$TOXIPROXY_PORT" >/dev/null 2>&1 || true
scripts/kafka.sh start "$PORT"
trap 'scripts/kafka.sh stop "$PORT"; scripts/kafka.sh stop "$OUTAGE_PORT" >/dev/null 2>&1 || true; scripts/s3.sh stop "$S3_PORT" >/dev/null 2>&1 || true; scripts/toxiproxy.sh stop "$TOXIPROXY_PORT" >/dev/null 2>&1 || true' EXIT
scripts/s3.sh start "$S3_PORT"
scripts/toxiproxy.sh start "$TOXIPROXY_PORT"
export POSITION_SINK_TEST_TOXIPROXY="127.0.0.1:$TOXIPROXY_PORT"

export POSITION_SINK_TEST_BROKERS="127.0.0.1:$PORT"
export POSITION_SINK_TEST_S3="http://127.0.0.1:$S3_PORT"
export POSITION_SINK_PYTHON="$CACHE/venv/bin/python"
export POSITION_SINK_SPARK_JARS="$(scripts/spark.sh jars)"
cargo test --locked --features fault-injection "$@"
