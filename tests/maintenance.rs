//! Maintenance over a (scaled) trading day, against the real broker: storage, the log
//! and readers stay bounded, readers never fail through vacuum and compaction, a crash
//! during compaction loses nothing and its files are vacuumed later, and two workers
//! maintain one table without a conflicting commit.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::versions::{LatestReader, Reader, Target};
use common::*;
use position_sink::Progress;
use position_sink::config::Config;

/// Symbols that need escaping in a partition directory's name.
const SYMBOLS: [&str; 6] = ["A/B", "BRK B", "ü%20", "_UNDER", "=EQ", "PLAIN"];

/// An update of `conid` in round `round`: its symbol changes every round, so rows move
/// between files and files empty out (what compaction packs).
fn moving_update(conid: i64, round: i64) -> Msg {
    let symbol = SYMBOLS[((conid + round) % SYMBOLS.len() as i64) as usize];
    let at = chrono::DateTime::from_timestamp(1_750_000_000 + round, 0).expect("time");
    update_json(conid, symbol, (conid * 10 + round) as f64, &at.to_rfc3339())
}

/// A worker configured for a day compressed into a minute or two: flushes every 50 ms,
/// maintenance every second, a checkpoint every 20 commits, 10 s of history.
fn day_config(topic: &str, group: &str, table: &Path) -> Config {
    let mut c = config(topic, group, table);
    c.flush.interval = Duration::from_millis(50);
    c.delta.max_rows_per_file = 10;
    c.maintenance.interval = Duration::from_secs(1);
    c.maintenance.compaction_min_files = 2;
    c.maintenance.unreferenced_file_age = Duration::from_secs(30);
    let properties = &mut c.delta.table_properties.0;
    properties.insert("delta.checkpointInterval".into(), "20".into());
    properties.insert("delta.logRetentionDuration".into(), "interval 10 seconds".into());
    properties.insert("delta.deletedFileRetentionDuration".into(), "interval 10 seconds".into());
    c
}

/// Data files on disk (path → modified), the log's files (name → modified).
fn files_on_disk(table: &Path) -> (HashMap<String, SystemTime>, HashMap<String, SystemTime>) {
    let (mut data, mut log) = (HashMap::new(), HashMap::new());
    let mut stack = vec![table.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("list").flatten() {
            let path = entry.path();
            let modified = entry.metadata().and_then(|m| m.modified()).expect("mtime");
            let relative = path.strip_prefix(table).expect("inside").to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = relative.strip_prefix("_delta_log/") {
                log.insert(name.to_string(), modified);
            } else if relative.ends_with(".parquet") {
                data.insert(relative, modified);
            }
        }
    }
    (data, log)
}

/// The live data files of the latest version, as paths on disk.
fn live_files(table: &Path) -> BTreeSet<String> {
    // The URIs name the files as they are on disk (a partition directory's name is
    // escaped once, e.g. `symbol=A%2FB`).
    let code = "import sys; from deltalake import DeltaTable\n\
                for f in DeltaTable(sys.argv[1]).file_uris(): print(f[len(sys.argv[1]) + 1:])";
    let out = run_python(&["-c".as_ref(), code.as_ref(), table.as_os_str()]);
    out.lines().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scaled_trading_day_keeps_storage_and_log_bounded_and_readers_never_fail() {
    let topic = create_topic("day", 2).await;
    let group = unique("day");
    let (_dir, table) = table_dir();
    let config = day_config(&topic, &group, &table);
    let conids = 400;
    // The table exists (and holds every key) before the reader starts.
    let mut produced = produce(&topic, &(1..=conids).map(|c| moving_update(c, 0)).collect::<Vec<_>>(), None).await;
    let worker = spawn_worker(config.clone());
    wait_until(Duration::from_secs(60), "the first rows", async || {
        table.join("_delta_log/00000000000000000001.json").exists()
    })
    .await;
    let stop = table.parent().expect("dir").join("stop-reader");
    let reader = LatestReader::start(&Target::local(&table), &stop, Reader::Deltalake);

    // About 80 s of steady updates, as fast as they are acknowledged: each round moves
    // a fiftieth of the keys to another symbol.
    let started = std::time::Instant::now();
    let mut round = 1;
    while started.elapsed() < Duration::from_secs(80) {
        let batch: Vec<Msg> = (1..=conids).filter(|c| (c + round) % 50 == 0).map(|c| moving_update(c, round)).collect();
        produced.extend(produce(&topic, &batch, None).await);
        round += 1;
    }
    wait_until(Duration::from_secs(120), "every update committed", async || {
        is_committed_to(&group, &topic, &produced, 2)
    })
    .await;
    // Two more table-wide maintenance runs over the final state.
    let mut since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs_f64();
    for _ in 0..2 {
        let progress = worker.progress.clone();
        wait_until(Duration::from_secs(60), "a maintenance run over the final state", async || {
            progress.maintenance().last_clean.is_some_and(|(finished, took)| finished - took > since)
        })
        .await;
        since = worker.progress.maintenance().last_clean.map_or(since, |(finished, _)| finished);
    }
    let maintenance = worker.progress.maintenance();
    let (status, metrics) = http_get(&worker.progress, "/metrics");
    assert_eq!(status, 200);
    for metric in [
        "position_sink_table_files{state=\"on_disk\"}",
        "position_sink_table_bytes{state=\"live\"}",
        "position_sink_table_commits_since_checkpoint",
        "position_sink_maintenance_last_run_timestamp_seconds{task=\"clean\"}",
        "position_sink_compactions_total",
    ] {
        assert!(metrics.contains(metric), "{metric} in\n{metrics}");
    }
    let compactions = Progress::get(&worker.progress.compactions);
    let removed = Progress::get(&worker.progress.files_removed_by_maintenance);
    let summary = worker.stop().await.expect("worker");
    let (reads, failed_reads) = reader.stop();

    // Everything the stream says, exactly, through every compaction and vacuum.
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert!(summary.delta_commits >= 100, "a day's flushes, scaled: {summary:?}");
    assert!(compactions > 0, "files emptied by moving keys were compacted");
    assert!(removed > 0, "maintenance removed files");
    assert!(reads >= 50 && failed_reads == 0, "the reader read {reads} times and failed {failed_reads} times");

    // Storage: no data file outlives the retention window (or the floor for files no
    // commit names, plus the schedule and a margin for a loaded machine) unless it is live.
    let now = SystemTime::now();
    let (data, log) = files_on_disk(&table);
    let live = live_files(&table);
    let window = day_config(&topic, &group, &table).maintenance.unreferenced_file_age + Duration::from_secs(20);
    let stale: Vec<&String> = data
        .iter()
        .filter(|(path, modified)| !live.contains(*path) && now.duration_since(**modified).unwrap_or_default() > window)
        .map(|(path, _)| path)
        .collect();
    assert!(stale.is_empty(), "{} unreferenced files older than {window:?}: {stale:?}", stale.len());
    let missing: Vec<&String> = live.iter().filter(|path| !data.contains_key(*path)).collect();
    assert!(
        missing.is_empty(),
        "live files not on disk: {missing:?}; on disk: {:?}",
        data.keys().take(5).collect::<Vec<_>>()
    );
    // The log: a fresh reader reads one checkpoint and at most about an interval of commits.
    let footprint = position_sink::maintenance::footprint::measure(
        &deltalake::open_table(deltalake::ensure_table_uri(table.display().to_string()).expect("uri"))
            .await
            .expect("open"),
    )
    .await
    .expect("measure");
    assert!(footprint.checkpoint_version.is_some(), "checkpoints are written: {footprint:?}");
    assert!(footprint.commits_since_checkpoint <= 25, "{footprint:?}");
    let oldest_commit = log
        .iter()
        .filter(|(name, _)| name.ends_with(".json"))
        .map(|(_, modified)| now.duration_since(*modified).unwrap_or_default())
        .max()
        .expect("commits");
    assert!(oldest_commit < Duration::from_secs(10 + 30), "the log keeps about its retention: {oldest_commit:?}");
    assert!(
        maintenance.files_on_disk.is_some()
            && maintenance.last_clean.is_some()
            && maintenance.last_compaction.is_some(),
        "the worker reports what maintenance found: {maintenance:?}"
    );
}

/// Data files on disk that no commit of the log ever added: what a crashed writer left.
fn orphan_files(table: &Path) -> Vec<String> {
    let mut added = BTreeSet::new();
    for entry in std::fs::read_dir(table.join("_delta_log")).expect("log").flatten() {
        if !entry.file_name().to_string_lossy().ends_with(".json") {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).expect("commit").lines() {
            let action: serde_json::Value = serde_json::from_str(line).expect("action");
            if let Some(path) = action["add"]["path"].as_str() {
                added.insert(percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned());
            }
        }
    }
    let (data, _) = files_on_disk(table);
    data.into_keys().filter(|path| !added.contains(path)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_during_compaction_loses_nothing_and_its_files_are_vacuumed_later() {
    let topic = create_topic("compact-crash", 1).await;
    let group = unique("compact-crash");
    let (dir, table) = table_dir();
    let mut config = config(&topic, &group, &table);
    config.delta.max_rows_per_file = 10;
    config.maintenance.interval = Duration::from_secs(1);
    config.maintenance.compaction_min_files = 2;
    config.http.bind = String::new();
    let at = |second: i64| chrono::DateTime::from_timestamp(1_750_000_000 + second, 0).expect("time").to_rfc3339();
    // Sixty keys of one symbol: six full files.
    let first: Vec<Msg> = (1..=60).map(|c| update_json(c, "FIRST", 1.0, &at(1))).collect();
    let mut produced = produce(&topic, &first, Some(1)).await;
    let mut without_maintenance = config.clone();
    without_maintenance.maintenance.enabled = false;
    run_to_end(without_maintenance.clone()).await.expect("first run");
    // Two flushes each move eight keys of one file to another symbol: two files of two
    // rows are left beside four full ones, 44 rows in six files that fit in five.
    for (round, conids) in [(2, 1..=8), (3, 11..=18)] {
        let moved: Vec<Msg> = conids.map(|c| update_json(c, "SECOND", 2.0, &at(round))).collect();
        produced.extend(produce(&topic, &moved, Some(1)).await);
        run_to_end(without_maintenance.clone()).await.expect("a run that moves keys");
    }

    let file = write_config_file(dir.path(), &config);
    let abort = (position_sink::faults::ABORT_BEFORE_COMPACTION_COMMIT_ENV, "1".to_string());
    let (mut child, _) = spawn_binary(&["run", "--config", file.to_str().expect("path")], &[abort], "info", "-");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the worker did not reach its compaction");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!status.success(), "the worker was aborted: {status:?}");
    let orphans = orphan_files(&table);
    assert!(!orphans.is_empty(), "the crash left the compaction's files uncommitted");

    let worker = spawn_worker(config.clone());
    wait_until(Duration::from_secs(120), "a compaction after the restart", async || {
        Progress::get(&worker.progress.compactions) > 0 && is_committed_to(&group, &topic, &produced, 1)
    })
    .await;
    worker.stop().await.expect("worker");
    assert_table_matches(&read_table(&table).await, &model(&produced));

    // Once older than the table's retention, `maintain` vacuums what the crash left.
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    for orphan in &orphans {
        let file = std::fs::File::options().write(true).open(table.join(orphan)).expect("orphan");
        file.set_modified(two_hours_ago).expect("age the file");
    }
    let (code, out, _) = run_cli(&["maintain", "--config", file.to_str().expect("path"), "--dry-run"]);
    assert_eq!(code, 0);
    assert!(orphans.iter().all(|o| out.contains(o.rsplit('/').next().expect("name"))), "the dry run lists them: {out}");
    assert!(orphans.iter().all(|o| table.join(o).exists()), "a dry run removes nothing");
    let (code, _, _) = run_cli(&["maintain", "--config", file.to_str().expect("path")]);
    assert_eq!(code, 0);
    assert!(orphans.iter().all(|o| !table.join(o).exists()), "vacuum removed what the crash left");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    let (code, out, _) = run_cli(&["inspect", "--config", file.to_str().expect("path"), "--format", "json"]);
    assert_eq!(code, 0, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(report["table"]["last_clean"]["data_files_removed"].as_u64() >= Some(orphans.len() as u64), "{out}");
    assert!(report["table"]["last_compaction"].is_string(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_maintain_one_table_without_a_conflicting_commit() {
    let topic = create_topic("maintain-two", 4).await;
    let group = unique("maintain-two");
    let (_dir, table) = table_dir();
    let configure = || {
        let mut c = config(&topic, &group, &table);
        c.delta.max_rows_per_file = 10;
        c.maintenance.interval = Duration::from_secs(1);
        c.maintenance.compaction_min_files = 2;
        c
    };
    let (produced, a, b) = run_two_workers(&topic, &group, configure, (11, 12)).await;
    assert_eq!((a.commit_conflicts, b.commit_conflicts), (0, 0), "no commit met another: {a:?} {b:?}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
    assert!(table.join(position_sink::maintenance::LAST_RUN_FILE).exists(), "one of them maintained the table");
}
