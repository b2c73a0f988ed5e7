"""The seed-style peer for the benchmark: the seed's approach as a Python user would
write it today. confluent-kafka -> 3 s buffer -> polars sort + unique per conid ->
deltalake MERGE with a `source.timestamp > target.timestamp` guard -> commit offsets.

Usage: peer.py BROKERS TOPIC GROUP TABLE_PATH MESSAGES
Prints one JSON line: messages, seconds, flushes.
"""

import io
import json
import sys
import time

import polars as pl
from confluent_kafka import Consumer
from deltalake import DeltaTable, write_deltalake

FLUSH_SECONDS = 3.0
MAX_BUFFER = 100_000


def to_frame(messages):
    frame = pl.read_ndjson(io.BytesIO(b"\n".join(m.value() for m in messages)))
    return frame.with_columns(
        pl.col("timestamp").str.to_datetime(time_unit="us", time_zone="UTC"),
        pl.Series("kafka_partition", [m.partition() for m in messages], dtype=pl.Int32),
        pl.Series("kafka_offset", [m.offset() for m in messages], dtype=pl.Int64),
    )


def flush(path, messages):
    latest = to_frame(messages).sort("timestamp", "kafka_offset").unique("conid", keep="last")
    try:
        table = DeltaTable(path)
    except Exception:
        write_deltalake(path, latest.to_arrow(), partition_by=["symbol"])
        return
    (
        table.merge(latest.to_arrow(), "t.conid = s.conid", source_alias="s", target_alias="t")
        .when_matched_update_all(predicate="s.timestamp > t.timestamp")
        .when_not_matched_insert_all()
        .execute()
    )


def main():
    brokers, topic, group, path, expected = sys.argv[1:6]
    expected = int(expected)
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    buffer, consumed, flushes = [], 0, 0
    started = None
    last_flush = time.monotonic()
    while consumed < expected or buffer:
        batch = consumer.consume(num_messages=10_000, timeout=0.1) if consumed < expected else []
        batch = [m for m in batch if m.error() is None]
        if batch and started is None:
            started = time.monotonic()
        buffer.extend(batch)
        consumed += len(batch)
        due = time.monotonic() - last_flush >= FLUSH_SECONDS
        if buffer and (due or len(buffer) >= MAX_BUFFER or consumed >= expected):
            flush(path, buffer)
            consumer.commit(asynchronous=False)
            buffer, flushes = [], flushes + 1
            last_flush = time.monotonic()
    consumer.close()
    seconds = time.monotonic() - (started or time.monotonic())
    print(json.dumps({"messages": consumed, "seconds": seconds, "rate": consumed / max(seconds, 1e-9), "flushes": flushes}))


if __name__ == "__main__":
    main()
