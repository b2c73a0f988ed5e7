"""The write-path benchmark (scripts/bench.sh runs it): B1..B5 of docs/write-path.md,
every figure measured in this run beside the broker's raw consume rate and the
seed-style Python peer (bench/peer.py). Prints a text report and writes JSON.

Usage: run.py --bin POSITION_SINK --raw RAW_CONSUME --flush-cost FLUSH_COST
              --kafka SCRIPTS/kafka.sh --port PORT --work DIR --out FILE [--scale S]
"""

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime

import day
import polars as pl
import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition
from deltalake import DeltaTable

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r'(\w+)=("[^"]*"|\S+)')


# Per-request latency of the object store a restart reads (B8), like S3's.
RESTART_LATENCY_MS = 30


def latency_proxy(api_port, listen_port, upstream, latency_ms):
    """A Toxiproxy proxy on `listen_port` in front of `upstream` that delays every
    response by `latency_ms`; returns its endpoint."""
    import urllib.request

    def call(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{api_port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            if method != "DELETE":
                raise
            return error.read()

    call("DELETE", "/proxies/b8-latency")
    call("POST", "/proxies", {"name": "b8-latency", "listen": f"127.0.0.1:{listen_port}", "upstream": upstream,
                              "enabled": True})
    call("POST", "/proxies/b8-latency/toxics", {"name": "latency", "type": "latency", "stream": "downstream",
                                                "toxicity": 1.0, "attributes": {"latency": latency_ms}})
    return f"http://127.0.0.1:{listen_port}"


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.brokers = f"127.0.0.1:{args.port}"
        self.work = args.work
        self.python = sys.executable
        self.peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")
        self.symbol_query = os.path.join(os.path.dirname(os.path.abspath(__file__)), "symbol_query.py")
        self.run_id = str(int(time.time()))
        self.flush_entry = flush_entry
        os.makedirs(self.work, exist_ok=True)

    def n(self, count):
        return max(1000, int(count * self.args.scale))

    # --- Kafka -----------------------------------------------------------------
    def topic(self, name, partitions=6):
        subprocess.run([self.args.kafka, "topic", name, str(partitions), str(self.args.port)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def produce(self, topic, count, instruments, symbols, rate=0, seed=7, start=None):
        env = self.env(topic, "bench-producer", os.path.join(self.work, "unused"))
        cmd = [self.args.bin, "generate", "--count", str(count), "--instruments", str(instruments),
               "--symbols", str(symbols), "--seed", str(seed)]
        if start:
            cmd += ["--start", start]
        if rate:
            cmd += ["--rate", str(rate)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def env(self, topic, group, table, layout="symbol"):
        """A worker's environment; `layout` is a layout, or `layout/write_mode`."""
        layout, _, mode = layout.partition("/")
        group = f"{group}-{self.run_id}"
        env = dict(os.environ)
        env.update({
            "POSITION_SINK__KAFKA__BROKERS": self.brokers,
            "POSITION_SINK__KAFKA__TOPICS": f'["{topic}"]',
            "POSITION_SINK__KAFKA__GROUP_ID": group,
            "POSITION_SINK__DELTA__TABLE_URI": table,
            "POSITION_SINK__HTTP__BIND": "127.0.0.1:0",
            "POSITION_SINK__DELTA__PARTITION_BY": layout,
            "POSITION_SINK__DELTA__WRITE_MODE": mode or "copy_on_write",
            "RUST_LOG": "info",
            "NO_COLOR": "1",
        })
        return env

    def raw_consume(self, topic, count):
        """`examples/raw_consume.rs`: librdkafka through rdkafka, joining a group, counting
        messages. `rate` is from its first message; `wall_rate` from process start."""
        time_path = os.path.join(self.work, f"raw-{topic}.time")
        out = subprocess.run(["/usr/bin/time", "-v", "-o", time_path, self.args.raw, self.brokers, topic, str(count)],
                             check=True, capture_output=True, text=True)
        figures = json.loads(out.stdout)
        figures.update(process_figures(open(time_path).read(), count))
        return figures

    def ceiling(self, topic, count):
        """What reading the topic costs without position-sink, counted from process start
        like the worker: `kcat` (librdkafka in C, no group, output discarded), Kafka's own
        `ConsumerPerformance` (Java, joins a group) and `raw_consume`."""
        figures = {"raw_consume": self.raw_consume(topic, count)}
        kcat = ["kcat", "-C", "-b", self.brokers, "-t", topic, "-e", "-q", "-o", "beginning"]
        perf = ["java", "-Xmx512m", "-cp", os.path.join(self.args.kafka_libs, "*"),
                "org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", self.brokers, "--topic", topic,
                "--messages", str(count), "--group", f"perf-{topic}-{self.run_id}", "--timeout", "60000"]
        for name, cmd in (("kcat", kcat), ("consumer_performance", perf)):
            time_path = os.path.join(self.work, f"{name}-{topic}.time")
            with open(os.devnull, "w") as sink:
                subprocess.run(["/usr/bin/time", "-v", "-o", time_path, *cmd], check=True, stdout=sink,
                               stderr=subprocess.DEVNULL)
            figures[name] = process_figures(open(time_path).read(), count)
        return figures

    def warm_up(self):
        """The broker's first consumer group creates its offsets topic, which takes
        seconds: do it before anything is timed."""
        topic = f"bench-warm-up-{self.run_id}"
        self.topic(topic, 1)
        self.produce(topic, 1000, 100, 10).wait()
        self.raw_consume(topic, 1000)

    # --- position-sink -----------------------------------------------------------
    def start_worker(self, topic, group, table, layout, exit_when_caught_up=True, name="worker", extra=()):
        log_path = os.path.join(self.work, f"{name}.log")
        time_path = os.path.join(self.work, f"{name}.time")
        cmd = ["/usr/bin/time", "-v", "-o", time_path, self.args.bin, "run", *extra]
        if exit_when_caught_up:
            cmd.append("--exit-when-caught-up")
        handle = open(log_path, "w")
        process = subprocess.Popen(cmd, env=self.env(topic, group, table, layout), stdout=handle, stderr=handle)
        return {"process": process, "log": log_path, "time": time_path, "handle": handle}

    def finish_worker(self, worker):
        worker["process"].wait(timeout=1800)
        worker["handle"].close()
        return self.worker_figures(worker)

    def worker_figures(self, worker):
        lines = [ANSI.sub("", line) for line in open(worker["log"], encoding="utf-8", errors="replace")]
        times = open(worker["time"]).read()
        user = float(re.search(r"User time \(seconds\): ([\d.]+)", times).group(1))
        system = float(re.search(r"System time \(seconds\): ([\d.]+)", times).group(1))
        rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", times).group(1))
        wall = wall_seconds(times)
        start = end = last_assigned = None
        flushes, stopped = [], {}
        for line in lines:
            stamp = line.split(" ", 1)[0]
            if "partitions assigned" in line:
                start = start or stamp
                last_assigned = stamp
            if "flushed batch" in line:
                flushes.append(flush_entry(line))
            if "worker stopped" in line:
                end = stamp
                stopped = {k: v.strip('"') for k, v in FIELD.findall(line)}
        if start is None or end is None or stopped.get("ok") != "true":
            raise RuntimeError(f"worker did not run to the end; see {worker['log']}")
        seconds = (parse_time(end) - parse_time(start)).total_seconds()
        messages = int(stopped["messages"])
        return {
            "messages": messages,
            "seconds": seconds,
            "rate": messages / max(seconds, 1e-9),
            "assigned_at": start,
            "last_assigned_at": last_assigned,
            "stopped_at": end,
            "wall_seconds": wall,
            "wall_rate": messages / max(wall, 1e-9),
            "cpu_seconds": user + system,
            "cpu_us_per_message": (user + system) * 1e6 / max(messages, 1),
            "peak_rss_mib": rss_kib / 1024,
            "flushes": len(flushes),
            "delta_commits": int(stopped.get("delta_commits", "0")),
            "commit_conflicts": int(stopped.get("commit_conflicts", "0")),
            "flush_detail": flushes,
        }

    def run_worker(self, topic, group, table, layout, name):
        return self.finish_worker(self.start_worker(topic, group, table, layout, name=name))

    def peer_run(self, topic, count, name):
        table = os.path.join(self.work, name)
        out = subprocess.run(["/usr/bin/time", "-v", "-o", table + ".time", self.python, self.peer, self.brokers,
                              topic, f"peer-{name}", table, str(count)], check=True, capture_output=True, text=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        times = open(table + ".time").read()
        cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", times))
        figures["cpu_us_per_message"] = cpu * 1e6 / max(count, 1)
        figures["wall_seconds"] = wall_seconds(times)
        figures["wall_rate"] = count / figures["wall_seconds"]
        figures["peak_rss_mib"] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", times).group(1)) / 1024
        figures["table"] = table
        return figures

    # --- the table -----------------------------------------------------------------
    def table_figures(self, path):
        """The table's size and a check of one row per key, read in a fresh Python process
        (polars and deltalake thread pools in a long-lived process have hung a read)."""
        try:
            out = subprocess.run([self.python, "-c", TABLE_FIGURES, path], check=True, capture_output=True,
                                 text=True, timeout=300)
        except subprocess.TimeoutExpired:
            log(f"the table at {path} could not be read within 300 s")
            return {"rows": None, "live_files": None, "read_timeout": True}
        return json.loads(out.stdout.strip().splitlines()[-1])

    # --- scenarios -----------------------------------------------------------------
    def backlog(self, name, count, instruments, symbols, layouts, peer=True):
        topic = f"bench-{name}-{int(time.time())}"
        self.topic(topic)
        log(f"{name}: producing {count} updates over {instruments} conids and {symbols} symbols")
        self.produce(topic, count, instruments, symbols).wait()
        result = {"messages": count, "instruments": instruments, "symbols": symbols, "topic": topic}
        log(f"{name}: the ceiling: raw_consume, kcat, ConsumerPerformance")
        result["ceiling"] = self.ceiling(topic, count)
        result["raw"] = result["ceiling"]["raw_consume"]
        for layout in layouts:
            log(f"{name}: position-sink, layout {layout}")
            slug = layout.replace("/", "_")
            table = os.path.join(self.work, f"{name}-{slug}")
            figures = self.run_worker(topic, f"sink-{name}-{slug}", table, layout, f"{name}-{slug}")
            figures["table"] = self.table_figures(table)
            figures["bytes_per_flush_bound"] = flush_bound(figures)
            result[f"position_sink_{slug}"] = figures
        if peer:
            log(f"{name}: seed-style peer")
            result["peer"] = self.peer_run(topic, count, f"{name}-peer")
        return result

    def symbol_queries(self, backlogs):
        """bench/symbol_query.py over the tables of `backlogs` (name -> backlog result)."""
        out = []
        for name, backlog in backlogs.items():
            symbols = backlog["symbols"]
            symbol = symbol_of(symbols // 2)
            tables = [os.path.join(self.work, f"{name}-{key.removeprefix('position_sink_')}")
                      for key in sorted(backlog) if key.startswith("position_sink_") and "deletion" not in key]
            log(f"B7: a reader's query for {symbol} in the {symbols}-symbol tables")
            env = dict(os.environ, POSITION_SINK_SPARK_JARS=self.args.spark_jars) if self.args.spark_jars else None
            res = subprocess.run([self.python, self.symbol_query, symbol, *tables], check=True, capture_output=True,
                                 text=True, timeout=1800, env=env)
            for line in res.stdout.splitlines():
                if line.startswith("{"):
                    figures = json.loads(line)
                    figures["symbols"] = symbols
                    figures["layout"] = figures["path"].rsplit("-", 1)[1]
                    out.append(figures)
        return out

    def restart_on_object_storage(self, tables):
        """examples/flush_cost.rs against the local S3 server (scripts/s3.sh): each
        table's build, flushes, key index size and restart."""
        port = self.args.port + 300
        scripts = os.path.dirname(self.args.kafka)
        s3 = os.path.join(scripts, "s3.sh")
        subprocess.run([s3, "start", str(port)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The restarts read through Toxiproxy, which delays every response by RESTART_LATENCY_MS
        # (an S3 request's round trip); the tables are built without it.
        toxiproxy, api = os.path.join(scripts, "toxiproxy.sh"), port + 1
        subprocess.run([toxiproxy, "start", str(api)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        slow = latency_proxy(api, port + 2, f"127.0.0.1:{port}", RESTART_LATENCY_MS)
        env = dict(os.environ, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                   AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true",
                   FLUSH_COST_RESTART_ENDPOINT=slow, FLUSH_COST_RESTART_LATENCY_MS=str(RESTART_LATENCY_MS))
        results = []
        try:
            for layout, mode, symbols, keys in tables:
                bucket = f"bench-b8-{layout}-{mode.replace('_', '-')}-{self.run_id}"
                subprocess.run([s3, "bucket", bucket, str(port)], check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                log(f"B8: {keys} keys, layout {layout}, {mode}, on the S3 server: build, flushes, restart")
                out = subprocess.run([self.args.flush_cost, f"s3://{bucket}", layout, mode, str(symbols), str(keys)],
                                     check=True, capture_output=True, text=True, env=env)
                for line in out.stdout.splitlines():
                    if line.strip():
                        results.append(json.loads(line))
        finally:
            subprocess.run([toxiproxy, "stop", str(api)], check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            subprocess.run([s3, "stop", str(port)], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return results

    def scale_out(self, b1, layout):
        topic = b1["topic"]
        log("B4: three workers of one group")
        table = os.path.join(self.work, f"b4-{layout}")
        workers = [self.start_worker(topic, "sink-b4", table, layout, name=f"b4-worker{i}") for i in range(3)]
        started = time.monotonic()
        figures = [self.finish_worker(w) for w in workers]
        wall = time.monotonic() - started
        one = b1[f"position_sink_{layout}"]
        # Reading time: from the assignment every worker ended up with to the last stop.
        settled = max(parse_time(f["last_assigned_at"]) for f in figures)
        finished = max(parse_time(f["stopped_at"]) for f in figures)
        reading = (finished - settled).total_seconds()
        commits = sum(f["delta_commits"] for f in figures)
        conflicts = sum(f["commit_conflicts"] for f in figures)
        return {
            "one_worker_seconds": one["wall_seconds"],
            "three_workers_seconds": wall,
            "speedup": one["wall_seconds"] / wall,
            "one_worker_reading_seconds": one["seconds"],
            "three_workers_reading_seconds": reading,
            "reading_speedup": one["seconds"] / reading,
            "commits": commits,
            "conflicts": conflicts,
            "conflict_ratio": conflicts / max(commits, 1),
            "per_worker": [{k: f[k] for k in ("messages", "seconds", "cpu_seconds", "cpu_us_per_message",
                                              "peak_rss_mib", "delta_commits", "commit_conflicts")} for f in figures],
            "table": self.table_figures(table),
        }

    def steady(self, rate, seconds, instruments, symbols, layout):
        topic = f"bench-b2-{int(time.time())}"
        self.topic(topic)
        slug = layout.replace("/", "_")
        table = os.path.join(self.work, f"b2-{slug}")
        worker = self.start_worker(topic, f"sink-b2-{slug}", table, layout, exit_when_caught_up=False,
                                   name=f"b2-{slug}")
        time.sleep(3)
        count = rate * seconds
        log(f"B2: offering {rate} updates/s for {seconds} s")
        self.produce(topic, count, instruments, symbols, rate=rate).wait()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and recorded_total(table) < count:
            time.sleep(1)
        # /usr/bin/time does not pass signals on: stop the worker it runs.
        subprocess.run(["pkill", "-TERM", "-P", str(worker["process"].pid)], check=False)
        figures = self.finish_worker(worker)
        latencies = visibility_latencies(self.brokers, topic, table)
        latencies.sort()
        pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
        return {
            "layout": layout, "offered_rate": rate, "seconds": seconds, "messages": len(latencies),
            "latency_p50_s": pick(0.50), "latency_p99_s": pick(0.99), "latency_max_s": latencies[-1],
            "flushes": figures["flushes"], "cpu_us_per_message": figures["cpu_us_per_message"],
            "peak_rss_mib": figures["peak_rss_mib"],
            "flush_ms_p50": statistics.median([f["duration_ms"] for f in figures["flush_detail"]] or [0]),
            "flush_ms_max": max([f["duration_ms"] for f in figures["flush_detail"]] or [0]),
        }

    def table_growth(self, layouts, modes, symbols, sizes_of):
        results = []
        for mode in modes:
            for layout in layouts:
                sizes = sizes_of[layout]
                log(f"B3: flushes of 10k and of 100 updates into tables of {sizes} keys, layout {layout}, {mode}")
                out = subprocess.run([self.args.flush_cost, os.path.join(self.work, "b3"), layout, mode, str(symbols)]
                                     + [str(s) for s in sizes], check=True, capture_output=True, text=True)
                runs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
                for run in runs:
                    dense = [f for f in run["flushes"] if not f["sparse"]]
                    run["rows_rewritten_per_row_in"] = max(f["rows_rewritten"] / max(f["rows_in"], 1) for f in dense)
                    run["bytes_over_batch"] = max(f["bytes_over_batch"] for f in dense)
                    run["sparse_bytes_over_batch"] = max(f["bytes_over_batch"] for f in run["flushes"] if f["sparse"])
                results.append({"layout": layout, "mode": mode, "runs": runs,
                                "ratio": runs[-1]["median_flush_seconds"] / runs[0]["median_flush_seconds"]})
        return results


TABLE_FIGURES = r"""
import glob, json, os, sys
import polars as pl
import pyarrow as pa
from deltalake import DeltaTable
path = sys.argv[1]
table = DeltaTable(path)
adds = pa.table(table.get_add_actions(flatten=True)).to_pydict()
live_bytes = sum(adds["size_bytes"])
on_disk = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
conids = pl.scan_delta(path).select("conid").collect()["conid"]
print(json.dumps({"rows": len(conids), "live_files": len(adds["path"]), "live_bytes": live_bytes,
                  "bytes_on_disk": on_disk, "row_bytes": live_bytes / max(len(conids), 1),
                  "one_row_per_key": conids.n_unique() == len(conids), "version": table.version()}), flush=True)
os._exit(0)
"""


def flush_entry(line):
    """The figures of a worker's "flushed batch" log line."""
    fields = dict(FIELD.findall(ANSI.sub("", line)))
    entry = {k: int(fields.get(k, "0")) for k in ("messages", "rows_in", "files_removed", "files_added",
                                                  "bytes_written", "duration_ms", "version")}
    entry["committed"] = fields.get("committed") == "true"
    return entry


TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK B", "JPM", "V", "XOM", "UNH", "JNJ", "WMT",
           "MA", "PG", "HD", "CVX", "KO", "PEP"]


def symbol_of(index):
    """The generator's symbol of its `index`-th instrument (src/sample.rs)."""
    return TICKERS[index] if index < len(TICKERS) else f"SYM{index:05}"


def process_figures(times, messages):
    """Wall time, rate from process start, CPU per message and peak RSS of a
    `/usr/bin/time -v` report for a process that read `messages`."""
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", times))
    wall = wall_seconds(times)
    return {"wall_seconds": wall, "wall_rate": messages / max(wall, 1e-9), "cpu_seconds": cpu,
            "cpu_us_per_message": cpu * 1e6 / max(messages, 1),
            "peak_rss_mib": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", times).group(1)) / 1024}


def wall_seconds(times):
    """The elapsed wall-clock time in a /usr/bin/time -v report."""
    text = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", times).group(1)
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time(stamp):
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def flush_bound(figures):
    """Bytes written per flush against 4 x the flush's rows x the table's row size."""
    row_bytes = figures["table"].get("row_bytes")
    if not row_bytes:
        return {"max_bytes_over_rows_x_row_size": None, "row_bytes": None}
    ratios = [f["bytes_written"] / max(f["rows_in"] * row_bytes, 1) for f in figures["flush_detail"] if f["rows_in"]]
    return {"max_bytes_over_rows_x_row_size": max(ratios or [0]), "row_bytes": row_bytes}


def recorded_total(table):
    """Messages the table's `txn` actions record as written (sum of offset + 1)."""
    offsets = {}
    for path in sorted(glob.glob(os.path.join(table, "_delta_log", "*.json"))):
        for line in open(path):
            action = json.loads(line)
            if "txn" in action:
                offsets[action["txn"]["appId"]] = action["txn"]["version"] + 1
    return sum(offsets.values())


def visibility_latencies(brokers, topic, table):
    """Seconds from each message's Kafka timestamp to the commit that recorded its offset."""
    commits = {}
    for path in sorted(glob.glob(os.path.join(table, "_delta_log", "*.json"))):
        stamp, txns = None, []
        for line in open(path):
            action = json.loads(line)
            if "commitInfo" in action:
                stamp = action["commitInfo"]["timestamp"] / 1000
            if "txn" in action:
                txns.append((int(action["txn"]["appId"].rsplit("/", 1)[1]), action["txn"]["version"]))
        for partition, offset in txns:
            commits.setdefault(partition, []).append((offset, stamp))
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"latency-{os.getpid()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    partitions = sorted(commits)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p))[1] for p in partitions}
    latencies, done = [], {p: 0 for p in partitions}
    cursor = {p: 0 for p in partitions}
    while any(done[p] < ends[p] for p in partitions):
        for m in consumer.consume(num_messages=10_000, timeout=1.0):
            if m.error():
                continue
            p, offset = m.partition(), m.offset()
            done[p] = offset + 1
            series = commits[p]
            while cursor[p] < len(series) and series[cursor[p]][0] < offset:
                cursor[p] += 1
            if cursor[p] < len(series):
                latencies.append(series[cursor[p]][1] - m.timestamp()[1] / 1000)
    consumer.close()
    return latencies


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--bin", "--raw", "--flush-cost", "--kafka", "--kafka-libs", "--work", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--spark-jars", default="", help="Delta's jars for Spark (scripts/spark.sh jars)")
    parser.add_argument("--only", default="B1,B2,B3,B4,B5,B6,B7,B8",
                        help="comma-separated scenarios; B4 needs B1")
    parser.add_argument("--b6", default="none,none/deletion_vectors,symbol,symbol/deletion_vectors",
                        help="B6's layouts (layout or layout/write_mode, comma-separated)")
    args = parser.parse_args()
    only = set(args.only.upper().split(","))
    bench = Bench(args)
    n = bench.n
    results = {"machine": machine(), "scale": args.scale, "started": datetime.now().isoformat(timespec="seconds")}
    bench.warm_up()
    if "B1" in only:
        # Not `symbol/deletion_vectors`: at 2,000 symbols its table (20,000 files, thousands
        # with vectors) is not read by polars within minutes (docs/write-path.md).
        results["B1"] = bench.backlog("b1", n(1_000_000), n(100_000), 2000, ["symbol", "none", "none/deletion_vectors"])
    if "B5" in only:
        results["B5"] = bench.backlog("b5", n(1_000_000), n(100_000), 20, ["symbol", "none"])
    if "B7" in only:
        # The layouts at 200 symbols, then a reader's query for one symbol in every
        # backlog table of this run (20, 200 and 2,000 symbols when B1 and B5 ran too).
        results["B7"] = {"backlog": bench.backlog("b7", n(1_000_000), n(100_000), 200, ["symbol", "none"])}
        results["B7"]["queries"] = bench.symbol_queries(
            {name.lower(): results[name] for name in ("B5", "B7", "B1") if name in results and name != "B7"}
            | {"b7": results["B7"]["backlog"]})
    if "B4" in only and "B1" in results:
        results["B4"] = bench.scale_out(results["B1"], "none")
    if "B3" in only:
        # The symbol layout keeps a file per symbol and Kafka partition (12,000 at 2,000 symbols):
        # building 10M keys that way takes hours, so it stops at 1M.
        sizes = {"none": [n(100_000), n(1_000_000), n(10_000_000)], "symbol": [n(100_000), n(1_000_000)]}
        results["B3"] = bench.table_growth(["none", "symbol"], ["copy_on_write", "deletion_vectors"], 2000, sizes)
    if "B8" in only:
        # A restart's first flush against an object store: the key index is built by
        # reading every live file's keys. At 2,000 symbols in the `symbol` layout (12,000
        # files) and at 10M keys in `none` with deletion vectors.
        # 3,334 symbols over 6 partitions make 10,002 groups: a file each.
        results["B8"] = bench.restart_on_object_storage(
            [("symbol", "copy_on_write", 3334, n(100_000)), ("none", "deletion_vectors", 2000, n(10_000_000))])
    if "B2" in only:
        results["B2"] = [bench.steady(20_000, max(10, int(60 * args.scale)), n(100_000), 2000, variant)
                         for variant in ("none", "none/deletion_vectors")]
    if "B6" in only:
        # 28,800 flushes at 50 ms (60x a 3 s window): a simulated hour is 1,200 flushes.
        # Both write modes: at most 15 minutes a layout and mode, so the day stays an hour.
        results["B6"] = [day.TradingDay(bench, variant, int(28_800 * args.scale), n(100_000), 200, interval_ms=50,
                                        rate=2000, cap_seconds=int(900 * args.scale) + 60).run()
                         for variant in args.b6.split(",")]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out.removesuffix(".json") + ".md", "w") as f:
        f.write(markdown(results))
    print(report(results))


def markdown(r):
    """The README's results tables, for the scenarios this run measured. Rates are
    counted from process start for every system."""
    rows = ["| scenario | kcat | ConsumerPerformance | raw_consume | position-sink | seed-style peer "
            "| position-sink / kcat | position-sink / peer | CPU per message: position-sink (kcat, "
            "ConsumerPerformance, raw_consume, peer) | peak RSS | flushes → commits | live files |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("B1", "B1 backlog, 2,000 symbols"), ("B7", "B7 backlog, 200 symbols"),
                        ("B5", "B5 backlog, 20 symbols")):
        b = r.get(name)
        b = b.get("backlog") if b and name == "B7" else b
        for key in sorted(k for k in b or {} if k.startswith("position_sink_")):
            w, p, c = b[key], b["peer"], b["ceiling"]
            kcat, perf, raw = c["kcat"], c["consumer_performance"], c["raw_consume"]
            rows.append(
                f"| {label}, layout `{key.removeprefix('position_sink_')}` | {kcat['wall_rate'] / 1000:.0f}k msg/s "
                f"| {perf['wall_rate'] / 1000:.0f}k msg/s | {raw['wall_rate'] / 1000:.0f}k msg/s "
                f"| {w['wall_rate'] / 1000:.0f}k msg/s | {p['wall_rate'] / 1000:.1f}k msg/s "
                f"| {w['wall_rate'] / kcat['wall_rate']:.0%} | {w['wall_rate'] / p['wall_rate']:.2f}× "
                f"| {w['cpu_us_per_message']:.1f} µs ({kcat['cpu_us_per_message']:.1f}, "
                f"{perf['cpu_us_per_message']:.1f}, {raw['cpu_us_per_message']:.1f}, {p['cpu_us_per_message']:.1f}) "
                f"| {w['peak_rss_mib']:.0f} MiB (peer {p['peak_rss_mib']:.0f}) | {w['flushes']} → {w['delta_commits']} "
                f"| {w['table']['live_files']} |")
    out = "\n".join(rows) + "\n\n" if len(rows) > 2 else ""
    if r.get("B7"):
        out += ("B7, a reader's query for one symbol (best of 3 after a first read; files and row groups "
                "to read after pruning by partition values and statistics):\n\n| symbols | layout | live files | "
                "files to read | row groups to read | rows | polars `scan_delta().filter()` | Spark `WHERE` | "
                "files Spark read |\n|---|---|---|---|---|---|---|---|---|\n")
        for q in r["B7"]["queries"]:
            out += (f"| {q['symbols']:,} | `{q['layout']}` | {q['live_files']:,} | {q['files_to_read']} | "
                    f"{q['row_groups_to_read']} | {q['rows']} | {q['polars_seconds'] * 1000:.0f} ms | "
                    f"{q.get('spark_seconds', 0) * 1000:.0f} ms | {q.get('spark_files_read', '–')} |\n")
        out += "\n"
    for b2 in r.get("B2", []):
        out += (f"- B2 steady, {b2['offered_rate']:,} updates/s for {b2['seconds']} s (`{b2['layout']}`): latency "
                f"from the Kafka timestamp to the commit that recorded the update p50 {b2['latency_p50_s']:.2f} s, "
                f"p99 {b2['latency_p99_s']:.2f} s, max {b2['latency_max_s']:.2f} s; flush p50 "
                f"{b2['flush_ms_p50']:.0f} ms.\n")
    if r.get("B3"):
        out += ("\nB3, one flush into a table of N keys (median of 3; 10k random keys, and a sparse stream of "
                "100 keys per flush):\n\n| layout | write mode | keys | 10k flush | rows written per row in | "
                "bytes written / batch bytes | 100-key flush | bytes / batch bytes |\n|---|---|---|---|---|---|---|---|\n")
        for g in r["B3"]:
            for x in g["runs"]:
                out += (f"| `{g['layout']}` | `{g['mode']}` | {x['keys']:,} | {x['median_flush_seconds'] * 1000:,.0f} ms | "
                        f"{x['rows_rewritten_per_row_in']:.1f} | {x['bytes_over_batch']:.1f} | "
                        f"{x['median_sparse_flush_seconds'] * 1000:,.0f} ms | {x['sparse_bytes_over_batch']:.1f} |\n")
        out += "\n"
    if r.get("B8") or r.get("B3"):
        out += ("\nThe key index and a restart (examples/flush_cost.rs: a new handle's first flush of 200 updates, "
                "reading every live file's keys, then with the saved key index; on the S3 server through a proxy "
                "that delays each request):\n\n| storage | layout | write mode | keys | live files | "
                "key index bytes per key | restart's first flush | with the saved index (files read) | "
                "saved index |\n|---|---|---|---|---|---|---|---|---|\n")
        runs = [("local disk", x) for g in r.get("B3", []) for x in g["runs"]] + [("S3 server", x) for x in r.get("B8", [])]
        for storage, x in runs:
            if "restart_first_flush_seconds" in x:
                if x.get("restart_latency_ms"):
                    storage += f", {x['restart_latency_ms']} ms per request"
                saved = (f"{x['restart_saved_index_first_flush_seconds']:.2f} s ({x['restart_saved_index_files_read']}) | "
                         f"{x['saved_index_bytes'] / x['keys']:.1f} bytes/key, saved in {x['saved_index_seconds']:.2f} s"
                         if "saved_index_bytes" in x else "| ")
                out += (f"| {storage} | `{x['layout']}` | `{x['mode']}` | {x['keys']:,} | {x['live_files']:,} | "
                        f"{x['index_bytes_per_key']:.1f} | {x['restart_first_flush_seconds']:.2f} s "
                        f"({x.get('restart_files_read', '')}) | {saved} |\n")
        out += "\n"
    if "B4" in r:
        b4 = r["B4"]
        out += (f"- B4 scale-out (B1, layout `none`): from the group's last assignment to the end, 1 worker "
                f"{b4['one_worker_reading_seconds']:.2f} s, 3 workers {b4['three_workers_reading_seconds']:.2f} s; "
                f"from process start, {b4['one_worker_seconds']:.1f} s and {b4['three_workers_seconds']:.1f} s; "
                f"{b4['commits']} commits, {b4['conflicts']} conflicts.\n")
    if "B6" in r:
        out += "\n" + day.markdown(r["B6"])
    return out


def machine():
    cpus = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpus} cores, {memory:.0f} GiB"


def report(r):
    out = [f"position-sink write-path benchmark ({r['machine']}, scale {r['scale']})", ""]
    for name in (n for n in ("B1", "B7", "B5") if n in r):
        b = r[name] if name != "B7" else r[name]["backlog"]
        raw = b["raw"]["rate"]
        out.append(f"{name}: {b['messages']} updates, {b['instruments']} conids, {b['symbols']} symbols")
        raw_wall = b["raw"]["wall_rate"]
        out.append(f"  raw consume          {raw:10.0f} msg/s from the first message; {raw_wall:8.0f} msg/s over the process's life")
        kcat = b["ceiling"]["kcat"]
        for label, c in (("kcat", kcat), ("ConsumerPerformance", b["ceiling"]["consumer_performance"]),
                         ("raw_consume", b["ceiling"]["raw_consume"])):
            out.append(f"  {label:20} {c['wall_rate']:10.0f} msg/s from process start  "
                       f"{c['cpu_us_per_message']:5.2f} us CPU/msg  {c['peak_rss_mib']:6.0f} MiB")
        for key in sorted(k for k in b if k.startswith("position_sink_")):
            w = b[key]
            t = w["table"]
            out.append(
                f"  {key.replace('position_sink_', 'position-sink/'):20} {w['rate']:10.0f} msg/s  "
                f"{w['rate'] / raw:6.1%} of raw  {w['rate'] / b['peer']['rate']:5.2f}x peer  "
                f"(process life: {w['wall_rate']:8.0f} msg/s, {w['wall_rate'] / raw_wall:6.1%} of raw, "
                f"{w['wall_rate'] / b['peer']['wall_rate']:5.2f}x peer, {w['wall_rate'] / kcat['wall_rate']:6.1%} of kcat)  "
                f"{w['cpu_us_per_message']:5.1f} us CPU/msg  {w['peak_rss_mib']:6.0f} MiB  "
                f"{w['flushes']} flushes / {w['delta_commits']} commits  {t['live_files']} files  "
                f"bytes/flush <= {w['bytes_per_flush_bound']['max_bytes_over_rows_x_row_size']:.1f} x rows x row size  "
                f"one row per key: {t['one_row_per_key']}")
        p = b["peer"]
        out.append(f"  seed-style peer      {p['rate']:10.0f} msg/s  {p['rate'] / raw:6.1%} of raw  "
                   f"(process life: {p['wall_rate']:8.0f} msg/s)  "
                   f"{p['cpu_us_per_message']:5.1f} us CPU/msg  {p['peak_rss_mib']:6.0f} MiB")
        out.append("")
    for q in r.get("B7", {}).get("queries", []):
        out.append(f"B7 query {q['symbol']} ({q['symbols']} symbols, {q['layout']}): {q['rows']} rows; "
                   f"{q['files_to_read']} of {q['live_files']} files, {q['row_groups_to_read']} row groups to read; "
                   f"polars {q['polars_seconds'] * 1000:.0f} ms, Spark {q.get('spark_seconds', 0) * 1000:.0f} ms "
                   f"({q.get('spark_files_read')} files read)")
    b = r.get("B4")
    if b:
        out.append(f"B4: from the group's last assignment to the end: 1 worker {b['one_worker_reading_seconds']:.2f} s, "
                   f"3 workers {b['three_workers_reading_seconds']:.2f} s (speed-up {b['reading_speedup']:.2f}x); "
                   f"process start to end: 1 worker {b['one_worker_seconds']:.1f} s, 3 workers "
                   f"{b['three_workers_seconds']:.1f} s ({b['speedup']:.2f}x); {b['commits']} commits, "
                   f"{b['conflicts']} conflicts ({b['conflict_ratio']:.1%})")
        for i, w in enumerate(b["per_worker"]):
            out.append(f"  worker {i}: {w['messages']} msgs, {w['cpu_seconds']:.1f} s CPU "
                       f"({w['cpu_us_per_message']:.1f} us/msg), {w['peak_rss_mib']:.0f} MiB, {w['delta_commits']} commits")
        out.append("")
    for g in r.get("B3", []):
        cells = ", ".join(f"{x['keys']} keys {x['median_flush_seconds'] * 1000:.0f} ms "
                          f"({x['flushes'][0]['files_removed']} files removed, "
                          f"{x['flushes'][0].get('files_hidden_in', 0)} given vectors, "
                          f"{x['rows_rewritten_per_row_in']:.1f} rows and {x['bytes_over_batch']:.1f}x the batch's "
                          f"bytes written; 100-key flush {x['median_sparse_flush_seconds'] * 1000:.0f} ms)"
                          for x in g["runs"])
        out.append(f"B3 ({g['layout']}, {g['mode']}): 10k-update flush into {cells}; "
                   f"largest / smallest {g['ratio']:.2f}")
    for x in r.get("B8", []):
        out.append(f"B8 (S3 server, {x['layout']}, {x['mode']}): {x['keys']} keys in {x['live_files']} files: key index "
                   f"{x['index_bytes_per_key']:.1f} bytes/key; restart's first flush {x['restart_first_flush_seconds']:.2f} s, "
                   f"{x.get('restart_saved_index_first_flush_seconds', 0):.2f} s with the saved index "
                   f"({x.get('restart_latency_ms')} ms per request); 10k flush {x['median_flush_seconds'] * 1000:.0f} ms")
    for g in r.get("B3", []):
        for x in g["runs"]:
            out.append(f"B3 restart ({g['layout']}, {g['mode']}, {x['keys']} keys, {x.get('live_files')} files): key index "
                       f"{x.get('index_bytes_per_key', 0):.1f} bytes/key; restart's first flush "
                       f"{x.get('restart_first_flush_seconds', 0):.2f} s")
    for b in r.get("B2", []):
        out.append("")
        out.append(f"B2 ({b['layout']}): {b['offered_rate']} updates/s for {b['seconds']} s: latency p50 {b['latency_p50_s']:.2f} s, "
                   f"p99 {b['latency_p99_s']:.2f} s, max {b['latency_max_s']:.2f} s; flush p50 {b['flush_ms_p50']:.0f} ms, "
                   f"max {b['flush_ms_max']} ms; {b['cpu_us_per_message']:.1f} us CPU/msg, {b['peak_rss_mib']:.0f} MiB")
    if "B6" in r:
        out.append("")
        out.append(day.report(r["B6"]))
    return "\n".join(out)


if __name__ == "__main__":
    main()
