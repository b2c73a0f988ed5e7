#!/usr/bin/env bash
# The write-path benchmark: builds the release binary, starts a local broker on
# 127.0.0.1:39292, and runs B1..B8 (docs/write-path.md, docs/maintenance.md) in one run:
# the backlogs (B1 at 2,000 symbols, B7 at 200, B5 at 20, both layouts) beside the
# ceiling of reading the topic (kcat, Kafka's ConsumerPerformance, examples/raw_consume)
# and the seed-style Python peer, a reader's query for one symbol in polars and Spark
# (B7), the flush cost as the table grows (B3), steady load (B2), scale-out (B4), the
# trading day (B6) and a restart against the local S3 server (B8). Prints the report and
# writes it as JSON to bench/results/<time>.json.
#
#   scripts/bench.sh                 every scenario (B6, the trading day, takes up to
#                                    an hour; the others about 45 minutes on 2 cores)
#   scripts/bench.sh --quick         a tenth of the data, to check the benchmark itself
#   scripts/bench.sh --only B1,B7    some scenarios (comma-separated; B4 needs B1)
#   scripts/bench.sh --only B6 --b6 none/deletion_vectors,symbol/deletion_vectors
#                                    B6 in some layouts and write modes only
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/position-sink/target}"
CACHE="${POSITION_SINK_CACHE:-$HOME/.cache/position-sink}"
PORT="${POSITION_SINK_BENCH_PORT:-39292}"
SCALE=1
ONLY=B1,B2,B3,B4,B5,B6,B7,B8
B6=none,none/deletion_vectors,symbol,symbol/deletion_vectors
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) SCALE=0.1 ;;
    --only) ONLY="$2"; shift ;;
    --b6) B6="$2"; shift ;;
    *) echo "bench.sh: unknown argument $1 (use --quick, --only B1,B6, --b6 none/deletion_vectors)" >&2; exit 2 ;;
  esac
  shift
done

scripts/setup.sh
scripts/spark.sh fetch
"$CACHE/venv/bin/pip" install -q --disable-pip-version-check "confluent-kafka==2.16.1"
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
# The ceiling beside raw_consume: kcat (Debian's package) and Kafka's ConsumerPerformance.
command -v kcat >/dev/null || { apt-get install -y -qq kcat >/dev/null; }
cargo build --release --locked --bin position-sink --example raw_consume --example flush_cost

WORK="$(mktemp -d "${TMPDIR:-/tmp}/position-sink-bench.XXXXXX")"
scripts/kafka.sh stop "$PORT" >/dev/null 2>&1 || true
scripts/kafka.sh start "$PORT"
trap 'scripts/kafka.sh stop "$PORT"; [ -n "${POSITION_SINK_BENCH_KEEP:-}" ] || rm -rf "$WORK"' EXIT

mkdir -p bench/results
OUT="bench/results/$(date -u +%Y%m%dT%H%M%SZ).json"
"$CACHE/venv/bin/python" bench/run.py \
  --bin "$CARGO_TARGET_DIR/release/position-sink" \
  --raw "$CARGO_TARGET_DIR/release/examples/raw_consume" \
  --flush-cost "$CARGO_TARGET_DIR/release/examples/flush_cost" \
  --kafka scripts/kafka.sh --kafka-libs "$(scripts/kafka.sh libs)" --spark-jars "$(scripts/spark.sh jars)" --port "$PORT" --work "$WORK" --out "$OUT" --scale "$SCALE" --only "$ONLY" --b6 "$B6"
echo "bench.sh: results in $OUT"
