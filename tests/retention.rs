//! Every version a reader may open stays readable while maintenance deletes files
//! (docs/maintenance.md, "What time travel and RESTORE can rely on"): no two writers of
//! one checkpoint; vacuum keeps a file a version inside the window reads, though an
//! older tombstone of it expired; a write never commits files vacuum may have taken;
//! the log keeps what the file retention needs; a file given a vector counts its
//! records; a flush never brings back a file a compaction removed meanwhile.
//! Library-level, against tables on the local disk (some behind a store that holds a
//! commit), each checked by time travel against the model of what was written.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add};
use deltalake::protocol::{DeltaOperation, SaveMode};

use common::stream::{Model, update};
use position_sink::config::{DeltaConfig, PartitionBy, WriteMode};
use position_sink::maintenance::clean;
use position_sink::offsets::TopicPartition;
use position_sink::table::{PositionTable, Thresholds};
use position_sink::worker::batch::Batch;

/// The floor for files no commit names, in these tests.
const UNREFERENCED: Duration = Duration::from_secs(60);

fn table_config(uri: &str, mode: WriteMode) -> DeltaConfig {
    DeltaConfig {
        table_uri: uri.to_string(),
        partition_by: PartitionBy::None,
        write_mode: mode,
        max_rows_per_file: 40,
        // Files this small would be rewritten, not given vectors, by default.
        vector_min_rows: 0,
        ..DeltaConfig::default()
    }
}

async fn open(path: &Path) -> deltalake::DeltaTable {
    deltalake::open_table(deltalake::ensure_table_uri(path.display().to_string()).expect("url")).await.expect("open")
}

/// Commits that change nothing, by writers that never ran the checkpoint hook (as if
/// each crashed right after its commit).
async fn commits_without_their_hook(path: &Path, count: usize) {
    let mut table = open(path).await;
    for _ in 0..count {
        let properties =
            CommitProperties::default().with_create_checkpoint(false).with_cleanup_expired_logs(Some(false));
        let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
        CommitBuilder::from(properties)
            .with_actions(Vec::new())
            .build(Some(table.snapshot().expect("snapshot")), table.log_store(), operation)
            .await
            .expect("commit");
        table.update_state().await.expect("update");
    }
}

/// The actions of commit `version`.
fn actions_of(path: &Path, version: u64) -> Vec<serde_json::Value> {
    let log = std::fs::read_to_string(path.join(format!("_delta_log/{version:020}.json"))).expect("commit file");
    log.lines().map(|l| serde_json::from_str(l).expect("an action")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_two_writers_ever_write_one_checkpoint() {
    let (_dir, path) = common::table_dir();
    let mut config = table_config(&path.display().to_string(), WriteMode::CopyOnWrite);
    config.table_properties.0.insert("delta.checkpointInterval".into(), "10".into());
    PositionTable::open_or_create(&config, "g").await.expect("create");
    let uri = path.display().to_string();

    // Version 19 is the one whose commit's own hook checkpoints it (19 + 1 is a multiple
    // of 10): the table-wide run leaves it to that hook, whether it has run yet or not.
    commits_without_their_hook(&path, 19).await;
    let report = clean(&open(&path).await, &uri, false, UNREFERENCED).await.expect("clean");
    assert_eq!(report.before.version, 19);
    assert_eq!(report.checkpoint_written, None, "the run checkpointed the hook's version 19");

    // Two runs at once (a worker's and `position-sink maintain`): one of them writes it.
    commits_without_their_hook(&path, 3).await;
    let (one, other) = (open(&path).await, open(&path).await);
    let (a, b) = tokio::join!(clean(&one, &uri, false, UNREFERENCED), clean(&other, &uri, false, UNREFERENCED));
    let written: Vec<u64> = [a, b].into_iter().filter_map(|r| r.expect("clean").checkpoint_written).collect();
    assert_eq!(written, [22], "exactly one of two runs at once writes checkpoint 22");
    let hint: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("_delta_log/_last_checkpoint")).expect("hint")).expect("json");
    let size = std::fs::metadata(path.join(format!("_delta_log/{:020}.checkpoint.parquet", 22))).expect("file").len();
    assert_eq!(hint["version"], 22, "{hint}");
    assert_eq!(hint["sizeInBytes"], size, "_last_checkpoint names the checkpoint file's own size: {hint}");
    assert_eq!(open(&path).await.version(), Some(22), "a fresh reader reads the table through the checkpoint");
}

/// Two flushes into partition 0: keys 1..=10 at first, then a newer key 1, so the first
/// file (`P`) is revised (`remove(P)` + `add(P, vector)`).
fn two_flushes(model: &mut Model) -> [Batch; 2] {
    let first: Vec<_> = (1..=10).map(|conid| update(conid, "A", 1_000 + conid, 0, conid)).collect();
    let second = vec![update(1, "A", 5_000, 0, 11)];
    for u in first.iter().chain(&second) {
        model.apply(u);
    }
    [Batch::of_rows(first), Batch::of_rows(second)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vacuum_keeps_a_file_a_version_in_the_window_reads_though_an_older_tombstone_of_it_expired() {
    let (_dir, path) = common::table_dir();
    let config = table_config(&path.display().to_string(), WriteMode::DeletionVectors);
    let mut table = PositionTable::open_or_create(&config, "g").await.expect("create");
    let mut model = Model::default();
    let [first, second] = two_flushes(&mut model);
    table = table.write(&first).await.expect("flush").0;
    let first_file = actions_of(&path, 1).iter().find_map(|a| a["add"]["path"].as_str().map(String::from));
    let first_file = first_file.expect("the first flush adds a file");
    table = table.write(&second).await.expect("flush").0;
    let revised = table.version().expect("version").0;
    assert!(
        actions_of(&path, revised).iter().any(|a| a["add"]["path"] == first_file.as_str()),
        "the second flush gives the first file a vector"
    );
    // The first tombstone of the file is two hours old (out of the hour's window)...
    let two_hours_ago = chrono::Utc::now().timestamp_millis() - 2 * 3600 * 1000;
    let commit = path.join(format!("_delta_log/{revised:020}.json"));
    let aged: Vec<String> = actions_of(&path, revised)
        .into_iter()
        .map(|mut action| {
            if action["remove"].is_object() {
                action["remove"]["deletionTimestamp"] = two_hours_ago.into();
            }
            action.to_string()
        })
        .collect();
    std::fs::write(&commit, aged.join("\n") + "\n").expect("age the tombstone");
    // ...and a compaction removes the file now: every version from the revision to the
    // compaction reads it.
    let table = PositionTable::open_or_create(&config, "g").await.expect("reopen");
    let partitions = [TopicPartition::new("t", 0)];
    let (_, report) = table
        .compact(&partitions, Thresholds { min_files: 2, hidden_fraction: 0.01, max_files: 32, max_vectors: 128 })
        .await
        .expect("compaction");
    assert!(report.committed, "{report:?}");
    common::stream::age_everything(&path);

    clean(&open(&path).await, &path.display().to_string(), false, UNREFERENCED).await.expect("vacuum");
    assert!(path.join(&first_file).exists(), "vacuum deleted {first_file}, which version {revised} reads");
    common::assert_table_matches(&common::read_version(&path, revised).await, &model.expected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_held_past_its_deadline_never_commits_files_vacuum_may_have_taken() {
    let (_dir, path) = common::table_dir();
    let (uri, faults) = common::faulty_store::faulty_table(&path);
    let config = table_config(&uri, WriteMode::CopyOnWrite);
    // The smallest floor the configuration allows: a write has a second to commit.
    let floor = Duration::from_secs(3);
    let table = PositionTable::open_or_create(&config, "g").await.expect("create").with_write_deadline(floor / 3);
    let mut model = Model::default();
    let [first, second] = two_flushes(&mut model);
    let second = std::sync::Arc::new(second);
    let table = table.write(&first).await.expect("flush").0;

    // The next commit is held by slow storage, longer than the write may take...
    let gate = faults.hold_next_commit();
    let held = tokio::spawn({
        let (table, second) = (table.clone(), second.clone());
        async move { table.write(&*second).await.map(|(_, report)| report) }
    });
    common::wait_until(Duration::from_secs(30), "the commit is held", async || faults.held.load(Ordering::SeqCst) == 1)
        .await;
    // ...while vacuum takes the write's files: no commit names them, and by the store's
    // clock they are older than the floor.
    tokio::time::sleep(floor).await;
    common::stream::age_everything(&path);
    let maintainer = PositionTable::open_or_create(&config, "g").await.expect("open");
    let report = clean(maintainer.delta(), &uri, false, floor).await.expect("vacuum");
    assert!(!report.data_files.is_empty(), "vacuum took the held write's files: {report:?}");
    gate.notify_one();
    let outcome = held.await.expect("the write's task");
    let error = outcome.expect_err("a write held past its deadline committed");
    assert!(error.to_string().contains("maintenance.unreferenced_file_age"), "{error}");
    assert!(error.is_retryable(), "{error}");

    // Every live file is on disk, and the write made again lands.
    table.write(&*second).await.expect("the write made again");
    common::assert_table_matches(&common::read_table(&path).await, &model.expected());
    assert_eq!(common::versions::polars_rows(&path, &[2])[&2], model.triples(), "polars reads the table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_keeping_its_log_for_less_time_than_its_removed_files_is_refused() {
    let mut config = position_sink::config::Config::default();
    config.kafka.topics = vec!["positions".into()];
    let properties = &mut config.delta.table_properties.0;
    properties.insert("delta.logRetentionDuration".into(), "interval 10 minutes".into());
    let error = config.validate().expect_err("a log kept for less time than the removed files");
    let message = error.to_string();
    assert!(message.contains("delta.logRetentionDuration") && message.contains("at least as long"), "{message}");
    config.delta.table_properties.0.insert("delta.logRetentionDuration".into(), "interval 1 hours".into());
    config.maintenance.unreferenced_file_age = Duration::from_secs(1);
    let message = config.validate().expect_err("a floor below 3 s").to_string();
    assert!(message.contains("maintenance.unreferenced_file_age"), "{message}");

    // A table another tool created with such settings is not vacuumed.
    let (_dir, path) = common::table_dir();
    let mut table_config = table_config(&path.display().to_string(), WriteMode::DeletionVectors);
    table_config.table_properties.0.insert("delta.logRetentionDuration".into(), "interval 1 seconds".into());
    let table = PositionTable::open_or_create(&table_config, "g").await.expect("create");
    let [first, _] = two_flushes(&mut Model::default());
    let table = table.write(&first).await.expect("flush").0;
    let error = clean(table.delta(), table.uri(), false, UNREFERENCED).await.expect_err("vacuum refused");
    let message = error.to_string();
    assert!(message.contains("delta.logRetentionDuration") && message.contains("vacuum is skipped"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vector_given_to_a_file_committed_without_statistics_counts_its_records() {
    let (_dir, path) = common::table_dir();
    let config = table_config(&path.display().to_string(), WriteMode::DeletionVectors);
    let table = PositionTable::open_or_create(&config, "g").await.expect("create");
    let mut model = Model::default();
    let [first, second] = two_flushes(&mut model);
    table.write(&first).await.expect("flush");

    // Another engine commits the file again, without statistics.
    let mut delta = open(&path).await;
    let snapshot = delta.snapshot().expect("snapshot");
    let mut actions = Vec::new();
    for view in snapshot.log_data().iter() {
        #[expect(deprecated, reason = "the file's add action, committed again without statistics")]
        let add = view.add_action();
        actions.push(Action::Add(Add { stats: None, data_change: false, ..add }));
    }
    let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
    CommitBuilder::from(CommitProperties::default())
        .with_actions(actions)
        .build(Some(snapshot), delta.log_store(), operation)
        .await
        .expect("commit without statistics");
    delta.update_state().await.expect("update");
    let live = delta.snapshot().expect("snapshot").log_data().num_files();
    assert_eq!(live, 1, "the file is live, committed again");
    assert!(
        actions_of(&path, 2).iter().filter(|a| a["add"].is_object()).all(|a| a["add"]["stats"].is_null()),
        "the file is committed without statistics"
    );

    // A restarted worker hides a row of it.
    let table = PositionTable::open_or_create(&config, "g").await.expect("reopen");
    let (table, report) = table.write(&second).await.expect("flush");
    assert_eq!(report.files_hidden_in, 1, "{report:?}");
    let version = table.version().expect("version").0;
    let revised: Vec<serde_json::Value> = actions_of(&path, version)
        .into_iter()
        .filter(|a| a["add"]["deletionVector"].is_object())
        .map(|a| serde_json::from_str(a["add"]["stats"].as_str().expect("statistics")).expect("json"))
        .collect();
    assert_eq!(revised.len(), 1);
    assert_eq!(revised[0]["numRecords"], 10, "the file's physical row count: {}", revised[0]);
    common::assert_table_matches(&common::read_table(&path).await, &model.expected());
    assert_eq!(common::versions::polars_rows(&path, &[version])[&version], model.triples(), "polars");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_never_brings_back_a_file_a_compaction_removed_meanwhile() {
    let (_dir, path) = common::table_dir();
    let (uri, faults) = common::faulty_store::faulty_table(&path);
    let config = table_config(&uri, WriteMode::DeletionVectors);
    let worker = PositionTable::open_or_create(&config, "g").await.expect("create");
    let mut model = Model::default();
    let [first, second] = two_flushes(&mut model);
    let worker = worker.write(&first).await.expect("flush").0;
    let worker = worker.write(&second).await.expect("flush").0;
    let third = std::sync::Arc::new(Batch::of_rows(vec![update(2, "A", 6_000, 0, 12)]));
    model.apply(&third.rows[0]);

    // The worker's next flush hides a row of the first file; its commit is held while
    // `position-sink maintain` compacts the partition's files, that one among them.
    let gate = faults.hold_next_commit();
    let flush = tokio::spawn({
        let (worker, third) = (worker.clone(), third.clone());
        async move { worker.write(&*third).await.map(|(_, report)| report) }
    });
    common::wait_until(Duration::from_secs(30), "the flush's commit is held", async || {
        faults.held.load(Ordering::SeqCst) == 1
    })
    .await;
    let maintainer = PositionTable::open_or_create(&config, "g").await.expect("open");
    let thresholds = Thresholds { min_files: 2, hidden_fraction: 0.01, max_files: 32, max_vectors: 128 };
    let (_, compaction) = maintainer.compact(&[TopicPartition::new("t", 0)], thresholds).await.expect("compaction");
    assert!(compaction.committed && compaction.files_removed == 2, "{compaction:?}");
    let compacted = table_version_of(&path);
    let actions = actions_of(&path, compacted);
    let removed: Vec<String> = actions.iter().filter_map(|a| a["remove"]["path"].as_str().map(String::from)).collect();
    assert!(
        actions.iter().filter(|a| a.get("remove").is_some()).all(|a| a["remove"]["dataChange"] == true),
        "a compaction may drop older copies of a key: its removes say dataChange: {actions:?}"
    );
    gate.notify_one();

    // The flush conflicts, and made again it hides the row in the compacted file.
    let error = flush.await.expect("the flush's task").expect_err("a flush over a removed file committed");
    assert!(error.is_conflict(), "{error}");
    worker.write(&*third).await.expect("the flush made again");
    common::assert_table_matches(&common::read_table(&path).await, &model.expected());
    let live: Vec<String> =
        open(&path).await.snapshot().expect("snapshot").log_data().iter().map(|f| f.path().into_owned()).collect();
    assert!(removed.iter().all(|p| !live.contains(p)), "a removed file is live again: {removed:?} in {live:?}");
    let latest = table_version_of(&path);
    assert_eq!(common::versions::polars_rows(&path, &[latest])[&latest], model.triples(), "polars");
}

/// The table's latest commit version, from its log directory.
fn table_version_of(path: &Path) -> u64 {
    std::fs::read_dir(path.join("_delta_log"))
        .expect("log")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".json")?.parse().ok())
        .max()
        .expect("a commit")
}
