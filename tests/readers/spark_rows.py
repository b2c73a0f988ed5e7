"""Reads Delta tables with Apache Spark and Delta Lake, the reference implementation.

    python spark_rows.py PATH[@VERSION] [PATH[@VERSION] ...]

Prints, per table (at VERSION by time travel, when given), its rows as JSON (conid, symbol, kafka_offset), ordered by conid,
one line per table. Spark runs in local mode bound to 127.0.0.1, with Delta's jars
from the directory in POSITION_SINK_SPARK_JARS (scripts/spark.sh fetch).
"""
import glob
import json
import os
import sys

from pyspark.sql import SparkSession


def session(app="position-sink reference reader", memory="1g", settings=None):
    """A local Spark session with Delta Lake, bound to 127.0.0.1, with more Spark
    `settings` (a dict) if given."""
    jars = sorted(glob.glob(os.path.join(os.environ["POSITION_SINK_SPARK_JARS"], "*.jar")))
    if not jars:
        sys.exit("no Delta jars in POSITION_SINK_SPARK_JARS: run scripts/spark.sh fetch")
    builder = (
        SparkSession.builder.master("local[2]")
        .appName(app)
        .config("spark.jars", ",".join(jars))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", memory)
    )
    for key, value in (settings or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def main():
    spark = session()
    for target in sys.argv[1:]:
        path, _, version = target.partition("@")
        reader = spark.read.format("delta")
        if version:
            reader = reader.option("versionAsOf", int(version))
        rows = (
            reader.load(path)
            .select("conid", "symbol", "kafka_offset")
            .orderBy("conid")
            .collect()
        )
        print(json.dumps([[r.conid, r.symbol, r.kafka_offset] for r in rows]), flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
