"""The readers users open the table with, each timed on a whole read (B6's samples):
deltalake's QueryBuilder (DataFusion), polars, this program's own reader
(`position-sink show`) and Apache Spark with Delta, the reference implementation.

Every read but Spark's is a new process, so it pays a fresh open. Spark runs in one
JVM for the whole day (its start alone takes longer than a read) and forgets what it
knows of the table's log before each read, so each read opens the table afresh too.
The table keeps changing while they read, so each sample pins one version (the newest
when it starts) and deltalake, polars and Spark read that version; `position-sink show`
reads the newest, which holds at least the pinned version's conids (a conid is never
removed). A reader that fails, does not answer within `TIMEOUT_S`, returns other than
one row per conid, or other conids than the pinned version holds is recorded as a
failure.
"""

import json
import os
import queue
import subprocess
import threading
import time

TIMEOUT_S = 300

QUERY_BUILDER = r"""
import json, os, sys, time
t0 = time.monotonic()
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
table = DeltaTable(sys.argv[1], version=int(sys.argv[2]))
t1 = time.monotonic()
result = QueryBuilder().register("t", table).execute("SELECT count(*) AS n, count(DISTINCT conid) AS k FROM t")
row = pa.table(result).to_pylist()[0]
t2 = time.monotonic()
print(json.dumps({"open_s": t1 - t0, "read_s": t2 - t1, "rows": row["n"], "conids": row["k"]}), flush=True)
os._exit(0)  # pyarrow's and deltalake's thread pools can abort the interpreter's exit
"""

POLARS = r"""
import json, os, sys, time
t0 = time.monotonic()
import polars as pl
frame = pl.read_delta(sys.argv[1], version=int(sys.argv[2]))
t1 = time.monotonic()
print(json.dumps({"open_s": 0.0, "read_s": t1 - t0, "rows": frame.height, "conids": frame["conid"].n_unique()}), flush=True)
os._exit(0)
"""

SPARK = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from spark_rows import session
spark = session("position-sink bench reader", memory="2g")
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path, version = line.split()
    try:
        spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
    except Exception:
        pass
    t0 = time.monotonic()
    frame = spark.read.format("delta").option("versionAsOf", int(version)).load(path)
    t1 = time.monotonic()
    row = frame.selectExpr("count(*) AS n", "count(DISTINCT conid) AS k").collect()[0]
    t2 = time.monotonic()
    print(json.dumps({"open_s": t1 - t0, "read_s": t2 - t1, "rows": row.n, "conids": row.k}), flush=True)
"""


class Readers:
    """The four readers of one table. `show_env` is a worker's environment for the
    table (`position-sink show` reads the table its config names)."""

    def __init__(self, python, binary, show_env, spark_jars, readers_dir):
        self.python, self.binary, self.show_env = python, binary, show_env
        self.spark_jars, self.readers_dir = spark_jars, readers_dir
        self.spark = None

    def start(self):
        """Starts Spark's JVM (in the background: the first read waits for it)."""
        if not self.spark_jars:
            return
        env = dict(os.environ, POSITION_SINK_SPARK_JARS=self.spark_jars)
        process = subprocess.Popen([self.python, "-c", SPARK, self.readers_dir], env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        answers = queue.Queue()
        threading.Thread(target=lambda: [answers.put(line) for line in process.stdout], daemon=True).start()
        self.spark = {"process": process, "answers": answers, "ready": False}

    def stop(self):
        if self.spark:
            self.spark["process"].kill()
            self.spark = None

    def read_all(self, path, version):
        """Every reader's figures at `version` (`show`: the newest):
        {name: {"open_s", "read_s", "rows", "conids"} or {"error"}}."""
        out = {
            "query_builder": self.run([self.python, "-c", QUERY_BUILDER, path, str(version)]),
            "polars": self.run([self.python, "-c", POLARS, path, str(version)]),
        }
        if self.spark:
            out["spark"] = self.spark_read(path, version)
        out["show"] = self.show()
        pinned = {f["conids"] for name, f in out.items() if name != "show" and "error" not in f}
        for name, figures in out.items():
            if "error" in figures:
                continue
            if figures["rows"] != figures["conids"]:
                figures["error"] = f"{figures['rows']} rows over {figures['conids']} conids: not one row per conid"
            elif name != "show" and len(pinned) > 1:
                figures["error"] = f"{figures['conids']} conids at version {version}, where the readers read {sorted(pinned)}"
            elif name == "show" and pinned and figures["conids"] < max(pinned):
                figures["error"] = (f"{figures['conids']} conids in the newest version, fewer than the "
                                    f"{max(pinned)} of version {version}")
        return out

    def run(self, cmd):
        """A reader script's figures (its last line of output)."""
        out = self.output(cmd, None)
        return out if isinstance(out, dict) else json.loads(out.strip().splitlines()[-1])

    def show(self):
        started = time.monotonic()
        out = self.output([self.binary, "show", "--format", "json", "--limit", "100000000"], self.show_env)
        if isinstance(out, dict):
            return out
        rows = json.loads(out)
        return {"open_s": 0.0, "read_s": time.monotonic() - started, "rows": len(rows),
                "conids": len({row["conid"] for row in rows})}

    @staticmethod
    def output(cmd, env):
        """What `cmd` printed, or {"error"} when it failed or did not answer in time."""
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"no answer within {TIMEOUT_S} s"}
        if out.returncode != 0:
            return {"error": out.stderr.strip()[-1000:] or f"exit status {out.returncode}"}
        return out.stdout

    def spark_read(self, path, version):
        spark = self.spark
        if not spark["ready"]:
            try:
                json.loads(spark["answers"].get(timeout=180))
                spark["ready"] = True
            except queue.Empty:
                self.stop()
                return {"error": "Spark did not start within 180 s"}
        spark["process"].stdin.write(f"{path} {version}\n")
        spark["process"].stdin.flush()
        try:
            return json.loads(spark["answers"].get(timeout=TIMEOUT_S))
        except queue.Empty:
            self.stop()
            return {"error": f"no answer within {TIMEOUT_S} s"}
        except ValueError as error:
            return {"error": f"unreadable answer: {error}"}


def seconds(figures):
    """A reader's open + read, or None when it failed."""
    return None if "error" in figures else figures["open_s"] + figures["read_s"]
