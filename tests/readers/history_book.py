"""Runs the README's as-of queries of the history table, as a user would copy them:
the Spark SQL block and the polars block of its "History" section.

    python history_book.py README.md HISTORY_PATH HH:MM:SS

Both ask for the book as of 2025-11-25 at HH:MM:SS UTC (the README's examples say
12:00:00). Prints one line per reader, `spark` then `polars`, each with the book as
JSON [[conid, kafka_partition, kafka_offset], ...] ordered by conid.
"""
import json
import re
import sys

from spark_rows import session


def section(readme, title):
    text = open(readme, encoding="utf-8").read()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def block(text, language):
    return re.search(rf"```{language}\n(.*?)```", text, re.S).group(1)


def main():
    readme, path, at = sys.argv[1:4]
    hours, minutes, seconds = (int(part) for part in at.split(":"))
    history = section(readme, "History")
    sql = block(history, "sql").replace("/data/positions_history", path).replace("12:00:00", at)
    statement = sql.split(";")[0]
    spark = session(app="position-sink README history query")
    rows = spark.sql(statement).collect()
    book = sorted([r.conid, r.kafka_partition, r.kafka_offset] for r in rows)
    print("spark " + json.dumps(book), flush=True)
    spark.stop()

    code = block(history, "python").replace("/data/positions_history", path)
    code = code.replace("datetime(2025, 11, 25, 12,", f"datetime(2025, 11, 25, {hours}, {minutes}, {seconds},")
    scope = {}
    exec(code, scope)
    frame = scope["book"]
    book = sorted(
        [c, p, o] for c, p, o in zip(frame["conid"], frame["kafka_partition"], frame["kafka_offset"])
    )
    print("polars " + json.dumps(book), flush=True)


if __name__ == "__main__":
    main()
