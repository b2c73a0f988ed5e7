//! The operator's commands against a real broker and tables checked independently:
//! `replay` (dry run as a consistency check, into a new table, refusal beside a live
//! group), `inspect` and `reconcile`, and the binary's exit codes.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::faulty_store::faulty_table;
use common::*;
use position_sink::config::{Config, WriteMode};
use position_sink::ops::reconcile::{self, Tolerances};
use position_sink::ops::replay::{self, ReplayFrom, ReplayOptions, ReplayReport};
use position_sink::ops::{OpsError, inspect};

fn options(from: ReplayFrom, into: Option<String>, dry_run: bool) -> ReplayOptions {
    ReplayOptions { from, into, dry_run, force: false, differences_shown: 100, progress_bar: false }
}

async fn dry_run(config: &Config) -> ReplayReport {
    replay::replay(config, &options(ReplayFrom::Earliest, None, true)).await.expect("dry run")
}

/// Runs the binary with `args` and the config file, returning its exit code and stdout.
fn cli(config_file: &std::path::Path, args: &[&str]) -> (i32, String) {
    let file = config_file.display().to_string();
    let mut all = args.to_vec();
    all.extend(["--config", &file]);
    let (code, stdout, _) = run_cli(&all);
    (code, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_finds_no_change_in_an_intact_table_and_exactly_the_damage_in_a_damaged_one() {
    dry_run_finds_exactly_the_damage("ops-dry", WriteMode::CopyOnWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_deletion_vector_mode_a_dry_run_finds_exactly_the_damage_and_a_replay_repairs_it() {
    dry_run_finds_exactly_the_damage("ops-dry-dv", WriteMode::DeletionVectors).await;
}

async fn dry_run_finds_exactly_the_damage(name: &str, mode: WriteMode) {
    let topic = create_topic(name, 3).await;
    let produced = produce(&topic, &sample_with_bad(3000, 150, 61, 3), None).await;
    let (dir, table) = table_dir();
    let mut config = config(&topic, &unique("g"), &table);
    config.delta.write_mode = mode;
    config.delta.vector_min_rows = 0;
    run_to_end(config.clone()).await.expect("worker");
    let expected = model(&produced);

    let intact = dry_run(&config).await;
    assert_eq!(intact.changes(), 0, "{intact:?}");
    assert_eq!(intact.unchanged, expected.len());
    assert_eq!(intact.rejected, produced.iter().filter(|m| m.rejection.is_some()).count());
    let read: usize = intact.partitions.iter().map(|p| p.messages).sum();
    assert_eq!(read, produced.len(), "every offset of every partition is read");
    let file = write_config_file(dir.path(), &config);
    assert_eq!(cli(&file, &["replay", "--from", "earliest", "--dry-run"]).0, 0, "exit code of a clean dry run");

    // Damage: three rows deleted and one position edited, outside the stream.
    let conids: Vec<i64> = expected.keys().map(|(_, conid)| *conid).collect();
    let (deleted, edited) = (&conids[..3], conids[3]);
    python_on(
        &table,
        &format!(
            "import sys; from deltalake import DeltaTable\n\
             t = DeltaTable(sys.argv[1]); t.delete('conid in ({})')\n\
             DeltaTable(sys.argv[1]).update(predicate='conid = {edited}', updates={{'position': '123456.0'}})",
            deleted.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        ),
    );
    let damaged = dry_run(&config).await;
    assert_eq!((damaged.inserted, damaged.updated, damaged.altered), (3, 0, 1), "{damaged:?}");
    let listed: BTreeSet<i64> = damaged.differences.iter().map(|d| d.conid).collect();
    let expected_listed: BTreeSet<i64> = deleted.iter().copied().chain([edited]).collect();
    assert_eq!(listed, expected_listed);
    for d in damaged.differences.iter().filter(|d| deleted.contains(&d.conid)) {
        assert!(d.table.is_none(), "a deleted row is listed as missing");
        let row = expected.values().find(|r| r.conid == d.conid).expect("in the model");
        assert_eq!(d.replayed["kafka_offset"], row.kafka_offset, "the replayed winner is the model's row");
    }
    let (code, stdout) = cli(&file, &["replay", "--from", "earliest", "--dry-run"]);
    assert_eq!(code, 1, "exit code of a dry run that finds changes");
    assert!(stdout.contains("4 changes"), "{stdout}");

    // The replay puts the deleted rows back; the edited one stays (ties keep the stored row).
    let fixed = replay::replay(&config, &options(ReplayFrom::Earliest, None, false)).await.expect("replay");
    assert_eq!((fixed.inserted, fixed.commits), (3, 1), "{fixed:?}");
    let after = dry_run(&config).await;
    assert_eq!((after.inserted, after.updated, after.altered), (0, 0, 1));

    // The worker merges into files Python rewrote (its own string and timestamp encodings).
    let newer: Vec<Msg> =
        expected.values().map(|r| update_json(r.conid, &r.symbol, r.position + 1.0, "2030-01-02T03:04:05Z")).collect();
    let more = produce(&topic, &newer, None).await;
    run_to_end(config.clone()).await.expect("worker after the edits");
    let all: Vec<Produced> = produced.iter().chain(&more).cloned().collect();
    assert_table_matches(&read_table(&table).await, &model(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_a_new_table_equals_the_model_and_a_replay_from_a_time_reads_only_what_came_after() {
    let topic = create_topic("ops-into", 3).await;
    let before = produce(&topic, &sample(1500, 100, 62), None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = chrono::Utc::now().timestamp_millis();
    let after = produce(&topic, &sample(1500, 100, 63), None).await;
    let (_dir, table) = table_dir();
    let config = config(&topic, &unique("g"), &table);
    let all: Vec<Produced> = before.iter().chain(&after).cloned().collect();

    let rebuilt = table.with_file_name("rebuilt");
    let report = replay::replay(&config, &options(ReplayFrom::Earliest, Some(rebuilt.display().to_string()), false))
        .await
        .expect("replay into a new table");
    assert_eq!(report.inserted, model(&all).len());
    assert_table_matches(&read_table(&rebuilt).await, &model(&all));
    python_on(
        &rebuilt,
        "import sys, polars as pl\n\
         df = pl.read_delta(sys.argv[1])\n\
         assert df['conid'].n_unique() == len(df), 'one row per conid'",
    );
    // The replay recorded the group's offsets: a worker of the group on that table has nothing to read.
    let mut on_rebuilt = config.clone();
    on_rebuilt.delta.table_uri = rebuilt.display().to_string();
    let summary = run_to_end(on_rebuilt).await.expect("worker on the rebuilt table");
    assert_eq!((summary.delta_commits, summary.messages - summary.skipped_already_written), (0, 0), "{summary:?}");

    let recent = table.with_file_name("recent");
    replay::replay(&config, &options(ReplayFrom::Time(since), Some(recent.display().to_string()), false))
        .await
        .expect("replay from a time");
    assert_table_matches(&read_table(&recent).await, &model(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_into_the_table_of_a_running_group_is_refused_unless_forced_and_retries_its_conflicting_commit() {
    let topic = create_topic("ops-live", 2).await;
    let produced = produce(&topic, &sample(600, 60, 64), None).await;
    let (_dir, table) = table_dir();
    let mut config = config(&topic, &unique("g"), &table);
    // The worker holds what it read until it stops: the replay finds the rows missing.
    config.flush.interval = Duration::from_secs(3600);
    let worker = spawn_worker(config.clone());
    wait_until(Duration::from_secs(60), "the worker read everything", async || {
        worker.messages() >= produced.len() as u64
    })
    .await;
    let refused = replay::replay(&config, &options(ReplayFrom::Earliest, None, false)).await.expect_err("refused");
    let message = refused.to_string();
    assert!(
        matches!(refused, OpsError::Input(_)) && message.contains("--force") && message.contains("active members"),
        "{message}"
    );
    // The forced replay commits through a store whose commits wait until released;
    // while its commit waits, the stopping worker commits the same rows, so the
    // replay's commit conflicts with it and must be made again on a fresh read.
    let (replay_uri, faults) = faulty_table(&table);
    let mut replaying = config.clone();
    replaying.delta.table_uri = replay_uri;
    faults.commit_delay_ms.store(600_000, Ordering::SeqCst);
    let mut forced = options(ReplayFrom::Earliest, None, false);
    forced.force = true;
    let replay_task = tokio::spawn(async move { replay::replay(&replaying, &forced).await });
    wait_until(Duration::from_secs(60), "the replay's commit to wait", async || {
        faults.delayed.load(Ordering::SeqCst) > 0
    })
    .await;
    worker.stop().await.expect("worker");
    assert!(is_committed_to(&config.kafka.group_id, &topic, &produced, 2), "the worker's last flush committed");
    faults.commit_delay_ms.store(0, Ordering::SeqCst);
    let report = replay_task.await.expect("join").expect("forced replay");
    assert_eq!(report.conflicts_retried, 1, "the replay's commit conflicted once and was made again: {report:?}");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_what_the_broker_and_the_table_hold_and_says_when_they_disagree() {
    let topic = create_topic("ops-inspect", 3).await;
    let (_dir, table) = table_dir();
    let config = config(&topic, &unique("g"), &table);
    let mut produced = Vec::new();
    for seed in 0..3 {
        produced.extend(produce(&topic, &sample(500, 80, 70 + seed), None).await);
        run_to_end(config.clone()).await.expect("worker");
    }
    let report = inspect::inspect(&config).await.expect("inspect");
    let ends = end_offsets(&produced, 3);
    assert_eq!(report.partitions.len(), 3);
    for p in &report.partitions {
        let end = ends[&p.partition].expect("messages in every partition");
        assert_eq!((p.log_start, p.log_end, p.group_committed, p.table_offset), (0, end, Some(end), Some(end - 1)));
        assert_eq!((p.lag, p.next_read, p.note.as_deref()), (0, end, None));
    }
    assert_eq!(report.table.rows, model(&produced).len() as u64);
    assert_eq!(report.table.version, table_version(&table).await as i64);
    assert_eq!(report.commits[0].operation, "MERGE");
    assert_eq!(report.group.members.len(), 0, "no worker runs");

    python_on(&table, RESTORE_VERSION_1);
    let restored = inspect::inspect(&config).await.expect("inspect");
    assert_eq!(restored.commits[0].operation, "RESTORE");
    for p in &restored.partitions {
        let note = p.note.as_deref().unwrap_or_default();
        assert!(note.contains("RESTORE") && p.next_read < p.log_end, "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_clean_on_a_matching_snapshot_and_finds_each_kind_of_difference() {
    let topic = create_topic("ops-reconcile", 2).await;
    let produced = produce(&topic, &sample(1000, 60, 65), None).await;
    let (dir, table) = table_dir();
    let config = config(&topic, &unique("g"), &table);
    run_to_end(config.clone()).await.expect("worker");
    let expected = model(&produced);
    let newest = expected.values().map(|r| r.timestamp_micros).max().expect("rows");
    let as_of = chrono::DateTime::from_timestamp_micros(newest + 1_000_000).expect("time").to_rfc3339();
    let tolerances = Tolerances { position: 1e-6, stale_after: Duration::from_secs(86_400) };

    let line = |conid: i64, position: f64| serde_json::json!({"conid": conid, "position": position}).to_string();
    let matching: Vec<String> = expected.values().map(|r| line(r.conid, r.position)).collect();
    let snapshot = dir.path().join("broker.jsonl");
    std::fs::write(&snapshot, matching.join("\n")).expect("write snapshot");
    let clean = reconcile::reconcile(&config, &snapshot, Some(&as_of), tolerances).await.expect("reconcile");
    assert!(clean.is_consistent(), "{clean:?}");
    assert_eq!(clean.matching, expected.len());

    // One key the broker has and the table lacks, one the table has and the broker lacks,
    // one position that differs; as CSV.
    let rows: Vec<_> = expected.values().collect();
    let mut csv = String::from("conid,position\n");
    csv.push_str("999999,5\n");
    csv.push_str(&format!("{},{}\n", rows[0].conid, rows[0].position + 1.0));
    for r in &rows[2..] {
        csv.push_str(&format!("{},{}\n", r.conid, r.position));
    }
    let snapshot = dir.path().join("broker.csv");
    std::fs::write(&snapshot, csv).expect("write snapshot");
    let found = reconcile::reconcile(&config, &snapshot, Some(&as_of), tolerances).await.expect("reconcile");
    let kinds: Vec<(&str, i64)> = found.findings.iter().map(|f| (f.kind, f.conid)).collect();
    let mut expected_kinds = vec![("mismatch", rows[0].conid), ("extra", rows[1].conid), ("missing", 999_999)];
    expected_kinds.sort_by_key(|(_, conid)| *conid);
    assert_eq!(kinds, expected_kinds);
    let file = write_config_file(dir.path(), &config);
    let snapshot_arg = snapshot.display().to_string();
    assert_eq!(cli(&file, &["reconcile", "--snapshot", &snapshot_arg, "--as-of", &as_of]).0, 1);

    // Two days later every row is stale; a snapshot that cannot be read exits 2.
    let later = chrono::DateTime::from_timestamp_micros(newest + 2 * 86_400_000_000).expect("time").to_rfc3339();
    let snapshot = dir.path().join("broker.jsonl");
    let stale = reconcile::reconcile(&config, &snapshot, Some(&later), tolerances).await.expect("reconcile");
    assert_eq!(stale.stale, expected.len());
    assert_eq!(cli(&file, &["reconcile", "--snapshot", "/nonexistent/broker.csv"]).0, 2);
}
