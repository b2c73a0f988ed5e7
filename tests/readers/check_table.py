"""Independent reader check: open the positions table with the Python `deltalake`
and `polars` packages (not delta-rs through Rust) and compare it with the expected rows.

Usage: check_table.py TABLE_PATH EXPECTED_JSON [LAYOUT]
LAYOUT is "symbol" (the default: partitioned by symbol) or "none" (no partition column).
EXPECTED_JSON holds {"rows": [{symbol, conid, position, timestamp_micros,
kafka_partition, kafka_offset}], "dead_letters": [{topic, partition, offset, category,
key_hex, value_hex}]}; the dead letters are read from TABLE_PATH + "_dead_letters".
Exits non-zero with a reason on any difference.
"""

import json
import sys

import polars as pl
from deltalake import DeltaTable


def fail(reason: str) -> None:
    print(f"check_table: {reason}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    path, expected_path = sys.argv[1], sys.argv[2]
    layout = sys.argv[3] if len(sys.argv) > 3 else "symbol"
    with open(expected_path, encoding="utf-8") as f:
        document = json.load(f)
    expected = {(r["symbol"], r["conid"]): r for r in document["rows"]}

    table = DeltaTable(path)
    partitioning = table.metadata().partition_columns
    expected_partitioning = ["symbol"] if layout == "symbol" else []
    if partitioning != expected_partitioning:
        fail(f"partition columns are {partitioning}, expected {expected_partitioning}")
    for uri in table.file_uris():
        if ("/symbol=" in uri) != (layout == "symbol"):
            fail(f"data file {uri} does not follow the {layout!r} layout")

    df = pl.read_delta(path)
    if df.schema["timestamp"] != pl.Datetime("us", "UTC"):
        fail(f"timestamp column is {df.schema['timestamp']}, expected Datetime(us, UTC)")
    actual = {}
    for row in df.iter_rows(named=True):
        key = (row["symbol"], row["conid"])
        if key in actual:
            fail(f"two rows for {key}")
        actual[key] = row
    conids = [conid for _, conid in actual]
    if len(set(conids)) != len(conids):
        fail("two rows for one conid under different symbols")
    if set(actual) != set(expected):
        missing = sorted(set(expected) - set(actual))[:5]
        extra = sorted(set(actual) - set(expected))[:5]
        fail(f"{len(actual)} rows, expected {len(expected)}; missing {missing}, unexpected {extra}")
    epoch = pl.Series([0]).cast(pl.Datetime("us", "UTC"))[0]
    for key, want in expected.items():
        got = actual[key]
        micros = (got["timestamp"] - epoch) // __import__("datetime").timedelta(microseconds=1)
        fields = [
            ("position", got["position"], want["position"]),
            ("timestamp", micros, want["timestamp_micros"]),
            ("kafka_partition", got["kafka_partition"], want["kafka_partition"]),
            ("kafka_offset", got["kafka_offset"], want["kafka_offset"]),
        ]
        for name, g, w in fields:
            if g != w:
                fail(f"row {key}: {name} is {g}, expected {w}")

    # Partition pruning works for a reader: one symbol reads back on its own.
    some_symbol = next(iter(expected))[0]
    only = pl.read_delta(path).filter(pl.col("symbol") == some_symbol)
    if only.height != sum(1 for k in expected if k[0] == some_symbol):
        fail(f"filtering on symbol {some_symbol!r} returned {only.height} rows")
    print(f"check_table: {len(actual)} rows match, layout {layout}")
    check_dead_letters(path + "_dead_letters", document["dead_letters"])


def check_dead_letters(path: str, expected_list: list) -> None:
    """The dead-letter table holds each expected dead letter once, bytes intact."""
    df = pl.read_delta(path)
    if df.schema["key"] != pl.Binary or df.schema["value"] != pl.Binary:
        fail(f"key/value columns are {df.schema['key']}/{df.schema['value']}, expected Binary")
    expected = {(d["topic"], d["partition"], d["offset"]): d for d in expected_list}
    actual = {}
    for row in df.iter_rows(named=True):
        key = (row["source_topic"], row["source_partition"], row["source_offset"])
        if key in actual:
            fail(f"dead letter {key} appears twice")
        actual[key] = row
    if set(actual) != set(expected):
        fail(f"{len(actual)} dead letters, expected {len(expected)}")
    for key, want in expected.items():
        got = actual[key]
        got_key = got["key"].hex() if got["key"] is not None else None
        got_value = got["value"].hex() if got["value"] is not None else None
        if (got["category"], got_key, got_value) != (want["category"], want["key_hex"], want["value_hex"]):
            fail(f"dead letter {key}: got {(got['category'], got_key, got_value)}, expected {want}")
        if not got["reason"]:
            fail(f"dead letter {key} has no reason")
    print(f"check_table: {len(actual)} dead letters match, bytes intact")


if __name__ == "__main__":
    main()
