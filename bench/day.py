"""B6, a trading day (docs/maintenance.md): 28,800 flushes of a steady stream over
100,000 conids with maintenance on, sampled at every simulated hour, then a restart.

Time is compressed by one factor for everything that is a duration: a simulated hour is
1,200 flushes, so the flush window, the maintenance interval and the table's retention
properties are all shortened by the same ratio (3 s / flush.interval). A sample at the
end of each simulated hour reports what an operator watches: files and bytes on disk
against live, the `_delta_log` a fresh reader must read to open the table, flush p50/p99
over the hour, and the open + read time of every reader users read with (bench/readers.py:
deltalake's QueryBuilder, polars, `position-sink show`, Spark with Delta), each checked
for one row per conid. After the day a new worker starts on the table (its key index
is built by reading the table) and its first flush is timed; the readers read once more.
Every read is checked: one row per conid, the same conids in every reader of a version.
"""

import glob
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import pyarrow as pa
from deltalake import DeltaTable

import readers as table_readers

FLUSHES_PER_HOUR = 1200  # 3,600 s / 3 s
REAL_WINDOW_SECONDS = 3.0

def log(message):
    print(f"bench: {message}", flush=True, file=sys.stderr)


class TradingDay:
    """One layout's day: a worker running against a steady producer, sampled hourly."""

    def __init__(self, bench, layout, flushes, conids, symbols, interval_ms, rate, cap_seconds):
        # `layout` is a layout, or `layout/write_mode`.
        self.bench, self.layout, self.slug = bench, layout, layout.replace("/", "_")
        self.flushes, self.conids, self.symbols = flushes, conids, symbols
        self.interval_ms, self.rate, self.cap_seconds = interval_ms, rate, cap_seconds
        # Every duration of the day shrinks by this factor.
        self.speedup = REAL_WINDOW_SECONDS * 1000 / interval_ms
        self.retention_s = max(1, round(3600 / self.speedup))
        self.maintenance_s = max(1, round(300 / self.speedup))
        # maintenance.unreferenced_file_age (30 min by default) is a duration of the day
        # too: unscaled, vacuum keeps every file whose commit log cleanup removed for
        # half an hour of real time, and the compressed day's disk grows without bound.
        self.unreferenced_s = max(3, round(1800 / self.speedup))
        self.table = os.path.join(bench.work, f"b6-{self.slug}")
        self.hours, self.flush_lines, self.reader_failures = [], [], []
        self.readers = table_readers.Readers(
            bench.python, bench.args.bin, bench.env("unused", "unused", self.table, layout),
            bench.args.spark_jars, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                "tests", "readers"))

    def config(self):
        path = os.path.join(self.bench.work, f"b6-{self.slug}.toml")
        with open(path, "w") as f:
            f.write(f'[flush]\ninterval = "{self.interval_ms}ms"\n\n'
                    f'[maintenance]\nenabled = true\ninterval = "{self.maintenance_s}s"\n'
                    f'unreferenced_file_age = "{self.unreferenced_s}s"\n\n'
                    '[delta.table_properties]\n"delta.checkpointInterval" = "100"\n'
                    f'"delta.logRetentionDuration" = "interval {self.retention_s} seconds"\n'
                    f'"delta.deletedFileRetentionDuration" = "interval {self.retention_s} seconds"\n')
        return path

    def run(self):
        bench = self.bench
        topic = f"bench-b6-{self.slug}-{int(time.time())}"
        bench.topic(topic)
        self.readers.start()
        # The book exists before the day starts: every conid once, written as a backlog.
        log(f"B6 ({self.layout}): seeding {self.conids} conids over {self.symbols} symbols")
        bench.produce(topic, self.conids * 3, self.conids, self.symbols).wait()
        worker = bench.start_worker(topic, f"sink-b6-{self.slug}", self.table, self.layout,
                                    exit_when_caught_up=False, name=f"b6-{self.slug}",
                                    extra=["--config", self.config()])
        follower = threading.Thread(target=self.follow, args=(worker["log"],), daemon=True)
        follower.start()
        producer = None
        try:
            seed = self.conids * 3
            while sum(line["messages"] for line in self.flush_lines) < seed:
                time.sleep(0.5)  # the seed's backlog is still being written
                if worker["process"].poll() is not None:
                    raise RuntimeError(f"B6 worker stopped; see {worker['log']}")
            first = len(self.flush_lines)
            log(f"B6 ({self.layout}): the day starts: {self.rate} updates/s, a flush every {self.interval_ms} ms "
                f"({self.speedup:.0f}x a 3 s window), retention {self.retention_s} s, maintenance every "
                f"{self.maintenance_s} s, unreferenced files kept {self.unreferenced_s} s, {self.flushes} flushes")
            producer = bench.produce(topic, self.rate * self.cap_seconds, self.conids, self.symbols,
                                     rate=self.rate, seed=11, start="2025-11-25T09:00:00Z")
            started = time.monotonic()
            hour = 1
            while True:
                done = len(self.flush_lines) - first
                over = done >= self.flushes or time.monotonic() - started > self.cap_seconds
                if done >= hour * FLUSHES_PER_HOUR or (over and done > (hour - 1) * FLUSHES_PER_HOUR):
                    begin = first + (hour - 1) * FLUSHES_PER_HOUR
                    lines = self.flush_lines[begin:min(first + hour * FLUSHES_PER_HOUR, first + done)]
                    h = self.sample(hour, lines, time.monotonic() - started)
                    self.hours.append(h)
                    log(f"B6 ({self.layout}) hour {hour}: disk {h['disk_bytes'] / 2**20:.1f} MiB / live "
                        f"{h['live_bytes'] / 2**20:.1f} MiB (held {h['held_bytes'] / 2**20:.1f} MiB), log files to open "
                        f"{h['log_files_to_open']}, flush p50 {h['flush_ms_p50']:.0f} ms p99 {h['flush_ms_p99']:.0f} ms, "
                        f"readers {readers_line(h['readers'])}")
                    hour += 1
                    continue
                if over:
                    break
                if worker["process"].poll() is not None:
                    raise RuntimeError(f"B6 worker stopped; see {worker['log']}")
                time.sleep(0.2)
            done = len(self.flush_lines) - first
        finally:
            if producer:
                producer.kill()
            # /usr/bin/time does not pass signals on: stop the worker it runs.
            subprocess.run(["pkill", "-TERM", "-P", str(worker["process"].pid)], check=False)
            worker["process"].wait(timeout=120)
            worker["handle"].close()
        figures = bench.worker_figures(worker)
        try:
            restart = self.restart(topic)
        finally:
            self.readers.stop()
        return {
            "layout": self.layout, "flushes": done, "planned_flushes": self.flushes,
            "seconds": time.monotonic() - started, "conids": self.conids, "symbols": self.symbols,
            "rate": self.rate, "interval_ms": self.interval_ms, "speedup": self.speedup,
            "retention_s": self.retention_s, "maintenance_s": self.maintenance_s,
            "delta_commits": figures["delta_commits"], "commit_conflicts": figures["commit_conflicts"],
            "peak_rss_mib": figures["peak_rss_mib"], "cpu_us_per_message": figures["cpu_us_per_message"],
            "compactions": count_lines(worker["log"], "compacted"),
            "hours": self.hours, "restart": restart, "targets": self.targets(),
            "reader_failures": self.reader_failures,
        }

    def restart(self, topic):
        """A new worker of the group on the day's table, after a few more updates: the
        time from its start to its first committed flush (the key index is built from the
        table before it), then every reader once more."""
        bench = self.bench
        tail = 1000
        bench.produce(topic, tail, self.conids, self.symbols, seed=12, start="2025-11-25T17:00:00Z").wait()
        log(f"B6 ({self.layout}): restarting a worker on the table")
        started = time.monotonic()
        worker = bench.start_worker(topic, f"sink-b6-{self.slug}", self.table, self.layout,
                                    exit_when_caught_up=True, name=f"b6-{self.slug}-restart",
                                    extra=["--config", self.config()])
        first_flush = None
        while worker["process"].poll() is None:
            if first_flush is None and committed_flush(worker["log"], self.bench):
                first_flush = time.monotonic() - started
            if time.monotonic() - started > 600:
                subprocess.run(["pkill", "-TERM", "-P", str(worker["process"].pid)], check=False)
                break
            time.sleep(0.1)
        worker["process"].wait(timeout=120)
        worker["handle"].close()
        if first_flush is None and committed_flush(worker["log"], self.bench):
            first_flush = time.monotonic() - started
        if first_flush is None:
            raise RuntimeError(f"B6 ({self.layout}): the restarted worker committed no flush; see {worker['log']}")
        figures = self.readers.read_all(self.table, DeltaTable(self.table).version())
        self.record_failures("after the restart", figures)
        log(f"B6 ({self.layout}) restart: first flush {first_flush:.2f} s after start; readers {readers_line(figures)}")
        return {"first_flush_s": first_flush, "exit_code": worker["process"].returncode, "readers": figures}

    def record_failures(self, when, figures):
        for name, f in figures.items():
            if "error" in f:
                self.reader_failures.append(f"{name} {when}: {f['error']}")
                log(f"B6 ({self.layout}): {name} failed {when}: {f['error']}")

    def follow(self, path):
        """Reads the worker's log as it grows: one entry per committed flush, with the size
        of the commit file it wrote (read now, before log cleanup may remove it)."""
        with open(path, encoding="utf-8", errors="replace") as f:
            pending = ""
            while True:
                pending += f.readline()
                if not pending.endswith("\n"):
                    time.sleep(0.05)
                    continue
                line, pending = pending, ""
                if "flushed batch" not in line:
                    continue
                entry = self.bench.flush_entry(line)
                if not entry["committed"]:
                    continue
                commit = os.path.join(self.table, "_delta_log", f"{entry['version']:020}.json")
                try:
                    entry["commit_bytes"] = os.path.getsize(commit)
                except OSError:
                    entry["commit_bytes"] = None
                self.flush_lines.append(entry)

    def sample(self, hour, lines, elapsed):
        now_ms = time.time() * 1000
        disk_files = disk_bytes = 0
        for root, dirs, files in os.walk(self.table):
            dirs[:] = [d for d in dirs if d != "_delta_log"]
            for name in files:
                try:
                    disk_bytes += os.path.getsize(os.path.join(root, name))
                    disk_files += 1
                except OSError:
                    pass
        table = DeltaTable(self.table)
        adds = pa.table(table.get_add_actions(flatten=True)).to_pydict()
        live_bytes, live_files = sum(adds["size_bytes"]), len(adds["path"])
        log_dir = os.path.join(self.table, "_delta_log")
        entries = os.listdir(log_dir)
        log_bytes = sum(os.path.getsize(os.path.join(log_dir, e)) for e in entries
                        if os.path.isfile(os.path.join(log_dir, e)))
        checkpoint = json.load(open(os.path.join(log_dir, "_last_checkpoint")))["version"] \
            if "_last_checkpoint" in entries else -1
        commits_after = [e for e in entries if e.endswith(".json") and int(e[:20]) > checkpoint]
        checkpoint_parts = [e for e in entries if ".checkpoint" in e and e.startswith(f"{checkpoint:020}")]
        # What the retention window holds: files removed within the retention, plus one
        # maintenance interval (vacuum runs on a schedule) and the 60 s floor.
        window_ms = (max(self.retention_s, 60) + self.maintenance_s) * 1000
        live_paths = set(adds["path"])
        held_files = {}
        for e in entries:
            if not e.endswith(".json") or e.startswith("_"):
                continue
            try:
                for line in open(os.path.join(log_dir, e)):
                    action = json.loads(line)
                    remove = action.get("remove")
                    # A file re-added with a new deletion vector stays live: not held.
                    if remove and remove.get("deletionTimestamp", 0) >= now_ms - window_ms \
                            and remove["path"] not in live_paths:
                        held_files[remove["path"]] = remove.get("size", 0)
            except (OSError, ValueError):
                pass
        # Deletion-vector files are counted as held (they are small; live or in the window).
        vectors = sum(os.path.getsize(os.path.join(self.table, name)) for name in os.listdir(self.table)
                      if name.startswith("deletion_vector_"))
        held = sum(held_files.values()) + vectors
        readers = self.readers.read_all(self.table, table.version())
        self.record_failures(f"at hour {hour}", readers)
        durations = sorted(line["duration_ms"] for line in lines)
        commit_bytes = [line["commit_bytes"] for line in lines if line["commit_bytes"]]
        return {
            "hour": hour, "elapsed_s": elapsed, "flushes": len(lines),
            "disk_files": disk_files, "disk_bytes": disk_bytes, "live_files": live_files, "live_bytes": live_bytes,
            "held_bytes": held, "disk_over_bound": disk_bytes / max((live_bytes + held) * 1.1, 1),
            "log_files": len(entries), "log_bytes": log_bytes, "checkpoint_version": checkpoint,
            "commits_since_checkpoint": len(commits_after),
            "log_files_to_open": len(commits_after) + len(checkpoint_parts),
            "flush_ms_p50": statistics.median(durations) if durations else 0,
            "flush_ms_p99": durations[min(len(durations) - 1, int(0.99 * len(durations)))] if durations else 0,
            "commit_bytes_mean": statistics.mean(commit_bytes) if commit_bytes else 0,
            "rows_in_mean": statistics.mean(line["rows_in"] for line in lines) if lines else 0,
            "files_removed_mean": statistics.mean(line["files_removed"] for line in lines) if lines else 0,
            "readers": readers,
        }

    def targets(self):
        if not self.hours:
            return {}
        first, last = self.hours[0], self.hours[-1]
        slowest = lambda h: max((table_readers.seconds(f) or 0.0) for f in h["readers"].values())
        return {
            "disk_within_live_plus_retention_plus_10pct": all(h["disk_over_bound"] <= 1 for h in self.hours),
            "worst_disk_over_bound": max(h["disk_over_bound"] for h in self.hours),
            "log_files_to_open_max": max(h["log_files_to_open"] for h in self.hours),
            "reader_last_over_first": slowest(last) / max(slowest(first), 1e-9),
            "slowest_read_s": max(slowest(h) for h in self.hours),
            "reader_failures": len(self.reader_failures),
            "flush_p99_last_over_first": last["flush_ms_p99"] / max(first["flush_ms_p99"], 1e-9),
        }


def committed_flush(path, bench):
    with open(path, encoding="utf-8", errors="replace") as f:
        return any("flushed batch" in line and bench.flush_entry(line)["committed"] for line in f)


def readers_line(figures):
    """`query_builder 1.20 s, polars 0.80 s, ...` (FAILED for a failed reader)."""
    return ", ".join(f"{name} " + (f"{table_readers.seconds(f):.2f} s" if "error" not in f else "FAILED")
                     for name, f in figures.items())


def count_lines(path, needle):
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if needle in line)


def report(days):
    out = []
    for day in days:
        out.append(f"B6 ({day['layout']}): {day['flushes']} of {day['planned_flushes']} flushes in "
                   f"{day['seconds'] / 60:.1f} min, {day['rate']} updates/s over {day['conids']} conids and "
                   f"{day['symbols']} symbols, a flush every {day['interval_ms']} ms ({day['speedup']:.0f}x), "
                   f"retention {day['retention_s']} s, maintenance every {day['maintenance_s']} s; "
                   f"{day['delta_commits']} commits, {day['commit_conflicts']} conflicts, {day['compactions']} "
                   f"compactions, {day['peak_rss_mib']:.0f} MiB")
        out.append("  hour | disk files (MiB) | live files (MiB) | held MiB | disk/bound | log files (MiB) "
                   "| to open | flush p50/p99 ms | commit KiB | readers (open + read)")
        for h in day["hours"]:
            out.append(f"  {h['hour']:4} | {h['disk_files']:6} ({h['disk_bytes'] / 2**20:7.1f}) "
                       f"| {h['live_files']:6} ({h['live_bytes'] / 2**20:6.1f}) | {h['held_bytes'] / 2**20:7.1f} "
                       f"| {h['disk_over_bound']:5.2f} | {h['log_files']:5} ({h['log_bytes'] / 2**20:6.1f}) "
                       f"| {h['log_files_to_open']:4} | {h['flush_ms_p50']:5.0f} / {h['flush_ms_p99']:5.0f} "
                       f"| {h['commit_bytes_mean'] / 1024:7.1f} | {readers_line(h['readers'])}")
        restart = day.get("restart")
        if restart:
            out.append(f"  restart: first flush {restart['first_flush_s']:.2f} s after the worker started; "
                       f"readers {readers_line(restart['readers'])}")
        if day["reader_failures"]:
            out.append(f"  a fresh reader FAILED {len(day['reader_failures'])} times: {day['reader_failures'][0][-300:]}")
        t = day["targets"]
        if t:
            out.append(f"  targets: disk <= live + retention + 10% every hour: {t['disk_within_live_plus_retention_plus_10pct']} "
                       f"(worst {t['worst_disk_over_bound']:.2f} of the bound); log files to open <= 1 checkpoint "
                       f"+ 100: {t['log_files_to_open_max']}; slowest reader {t['slowest_read_s']:.2f} s, last/first hour "
                       f"{t['reader_last_over_first']:.2f}x; reader failures {t['reader_failures']}; "
                       f"flush p99 last/first hour {t['flush_p99_last_over_first']:.2f}x")
    return "\n".join(out)


def markdown(days):
    rows = ["| layout | hour | disk files (MiB) | live files (MiB) | disk / (live + retention) | `_delta_log` files "
            "(MiB) | files to open | flush p50 / p99 | commit size | readers: open + read (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for day in days:
        for h in day["hours"]:
            rows.append(f"| `{day['layout']}` | {h['hour']} | {h['disk_files']:,} ({h['disk_bytes'] / 2**20:.1f}) "
                        f"| {h['live_files']:,} ({h['live_bytes'] / 2**20:.1f}) | {h['disk_over_bound'] * 1.1:.2f} "
                        f"| {h['log_files']} ({h['log_bytes'] / 2**20:.1f}) | {h['log_files_to_open']} "
                        f"| {h['flush_ms_p50']:.0f} / {h['flush_ms_p99']:.0f} ms | {h['commit_bytes_mean'] / 1024:.1f} KiB "
                        f"| {readers_line(h['readers'])} |")
        if day.get("restart"):
            r = day["restart"]
            rows.append(f"| `{day['layout']}` | restart | first flush {r['first_flush_s']:.2f} s after start "
                        f"| | | | | | | {readers_line(r['readers'])} |")
    return "\n".join(rows) + "\n"
