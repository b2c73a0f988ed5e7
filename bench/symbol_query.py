"""A reader's query for one symbol, timed in polars and in Spark with Delta, against
tables of both layouts (scripts/bench.sh, scenario B7).

    python symbol_query.py SYMBOL PATH [PATH ...]

Prints one JSON line per table: the rows found, the files and parquet row groups a
reader must open after pruning by the table's partition values and file statistics
(counted from the Delta log and the files' footers), polars' `scan_delta(...).filter`
time (best of three after a first read) and Spark's `WHERE symbol = X` time (the same)
with the files Spark's scan read (its `numFiles` metric).
"""
import json
import os
import sys
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable


def pruned_files(path, symbol):
    """Live files a reader must open for `symbol`, and their row groups that may hold it."""
    table = DeltaTable(path)
    adds = pa.table(table.get_add_actions(flatten=True)).to_pydict()
    count = len(adds["path"])
    by_partition = adds.get("partition.symbol")
    low, high = adds.get("min.symbol"), adds.get("max.symbol")
    files = []
    for i in range(count):
        if by_partition is not None:
            if by_partition[i] == symbol:
                files.append(adds["path"][i])
        elif low is None or low[i] is None or (low[i] <= symbol <= high[i]):
            files.append(adds["path"][i])
    row_groups = 0
    for name in files:
        meta = pq.ParquetFile(os.path.join(path, name)).metadata
        column = meta.schema.names.index("symbol") if "symbol" in meta.schema.names else None
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics if column is not None else None
            if stats is None or not stats.has_min_max or stats.min <= symbol <= stats.max:
                row_groups += 1
    return {"live_files": count, "files_to_read": len(files), "row_groups_to_read": row_groups}


def best_of(read, times=3):
    read()
    best, rows = None, None
    for _ in range(times):
        started = time.monotonic()
        rows = read()
        elapsed = time.monotonic() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, rows


def spark_session():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "readers"))
    from spark_rows import session

    return session("position-sink symbol query", memory="2g", settings={"spark.sql.adaptive.enabled": "false"})


def spark_files_read(frame):
    """The `numFiles` metric of the scans in an executed query's plan."""
    plan = frame._jdf.queryExecution().executedPlan()
    leaves = plan.collectLeaves()
    total = 0
    for i in range(leaves.size()):
        metrics = leaves.apply(i).metrics()
        if metrics.contains("numFiles"):
            total += metrics.apply("numFiles").value()
    return total


def main():
    symbol, paths = sys.argv[1], sys.argv[2:]
    spark = spark_session() if os.environ.get("POSITION_SINK_SPARK_JARS") else None
    for path in paths:
        figures = {"path": path, "symbol": symbol, **pruned_files(path, symbol)}
        seconds, rows = best_of(lambda: pl.scan_delta(path).filter(pl.col("symbol") == symbol).collect().height)
        figures.update({"rows": rows, "polars_seconds": seconds})
        if spark is not None:
            from pyspark.sql.functions import col

            def spark_read():
                frame = spark.read.format("delta").load(path).where(col("symbol") == symbol)
                found = len(frame.collect())
                spark_read.files = spark_files_read(frame)
                return found

            seconds, rows = best_of(spark_read)
            figures.update({"spark_seconds": seconds, "spark_rows": rows, "spark_files_read": spark_read.files})
        print(json.dumps(figures), flush=True)
    if spark is not None:
        spark.stop()
    os._exit(0)


if __name__ == "__main__":
    main()
