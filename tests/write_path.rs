//! The table and its write path without Kafka (docs/write-path.md): creation and
//! refusal of an incompatible table, one commit per flush with its offsets, a conid
//! that changes symbol moves, files are rewritten only when they hold a changed key,
//! failed commits leave no gap, workers of one group commit side by side, and both
//! layouts read back with the independent readers.

mod common;

use deltalake::kernel::{DataType, PrimitiveType, StructField};
use position_sink::config::{DeltaConfig, PartitionBy};
use position_sink::offsets::{Coordinates, Offset, TopicPartition};
use position_sink::table::{PositionTable, TableError};
use position_sink::update::PositionUpdate;
use position_sink::worker::batch::Batch;

fn update(conid: i64, symbol: &str, ts: i64, partition: i32, offset: i64) -> PositionUpdate {
    let at = Coordinates { tp: TopicPartition::new("t", partition), offset: Offset(offset) };
    let json = format!(r#"{{"conid":{conid},"symbol":"{symbol}","position":{ts},"timestamp":{ts}}}"#);
    position_sink::decode::decode(None, Some(json.as_bytes()), at, &Default::default()).expect("valid update")
}

fn batch(rows: Vec<PositionUpdate>) -> Batch {
    Batch::of_rows(rows)
}

async fn open(path: &std::path::Path, layout: PartitionBy, max_rows_per_file: usize) -> PositionTable {
    let config = DeltaConfig {
        table_uri: path.display().to_string(),
        partition_by: layout,
        max_rows_per_file,
        ..DeltaConfig::default()
    };
    PositionTable::open_or_create(&config, "g").await.expect("open")
}

/// (conid, symbol, position) of every row, read by the Python `deltalake` and `polars`
/// packages; fails the test if either sees two rows for a conid.
fn python_rows(path: &std::path::Path) -> Vec<(i64, String, f64)> {
    let script = r#"
import json, sys
import polars as pl
from deltalake import DeltaTable
path = sys.argv[1]
arrow = DeltaTable(path).to_pyarrow_table(columns=["conid", "symbol", "position"]).to_pylist()
frame = pl.read_delta(path).select("conid", "symbol", "position").sort("conid")
assert frame["conid"].n_unique() == frame.height, "polars sees two rows for a conid"
assert len(arrow) == frame.height, f"deltalake sees {len(arrow)} rows, polars {frame.height}"
print(json.dumps(frame.rows()))
"#;
    let printed = common::run_python(&["-c".as_ref(), script.as_ref(), path.as_os_str()]);
    serde_json::from_str(&printed).expect("rows as JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conid_whose_symbol_changes_moves_in_the_same_commit_and_a_late_update_does_not_move_it_back() {
    for layout in [PartitionBy::Symbol, PartitionBy::None] {
        let (_dir, path) = common::table_dir();
        let table = open(&path, layout, 100).await;
        let (table, _) =
            table.write(&batch(vec![update(1, "OLD", 10, 0, 0), update(2, "OLD", 10, 0, 1)])).await.unwrap();
        let (table, report) = table.write(&batch(vec![update(1, "NEW", 20, 0, 2)])).await.unwrap();
        assert_eq!((report.updated, report.inserted), (1, 0));
        assert_eq!(common::commits(&path), 3, "create + one commit per flush");
        assert_eq!(python_rows(&path), vec![(1, "NEW".into(), 20.0), (2, "OLD".into(), 10.0)], "{layout:?}");
        // A late update still under the old symbol is older: nothing moves back.
        let (_, report) = table.write(&batch(vec![update(1, "OLD", 15, 0, 3)])).await.unwrap();
        assert_eq!((report.updated, report.inserted, report.files_added), (0, 0, 0));
        assert_eq!(python_rows(&path), vec![(1, "NEW".into(), 20.0), (2, "OLD".into(), 10.0)], "{layout:?}");
        if layout == PartitionBy::Symbol {
            let old: Vec<_> = std::fs::read_dir(path.join("symbol=OLD")).unwrap().collect();
            assert!(!old.is_empty(), "the OLD partition still holds conid 2");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_rewrites_only_the_files_that_hold_its_keys() {
    let (_dir, path) = common::table_dir();
    let table = open(&path, PartitionBy::None, 10).await;
    // 40 keys of one partition: 4 files of 10 rows, clustered by conid.
    let rows = (1..=40).map(|i| update(i, &format!("S{}", i % 3), 1, 0, i)).collect();
    let (table, report) = table.write(&batch(rows)).await.unwrap();
    assert_eq!(report.files_added, 4);
    let (table, report) = table.write(&batch(vec![update(5, "S2", 2, 0, 41)])).await.unwrap();
    assert_eq!((report.files_removed, report.files_added, report.updated), (1, 1, 1));
    // A replayed or older update rewrites nothing but still records its offset.
    let (table, report) = table.write(&batch(vec![update(6, "S0", 0, 0, 42)])).await.unwrap();
    assert!(report.committed);
    assert_eq!((report.files_removed, report.files_added, report.updated), (0, 0, 0));
    let tp = TopicPartition::new("t", 0);
    assert_eq!(table.recorded_offsets(std::slice::from_ref(&tp)).await.unwrap()[&tp], Offset(42));
    assert_eq!(common::read_table(&path).await.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_different_partitions_commit_side_by_side_without_conflicts() {
    let (_dir, path) = common::table_dir();
    let first = open(&path, PartitionBy::Symbol, 1000).await;
    let second = open(&path, PartitionBy::Symbol, 1000).await;
    let rounds = 12;
    let writer = |table: PositionTable, partition: i32| async move {
        let mut table = table;
        let mut conflicts = 0;
        for round in 0..rounds {
            // The same symbols for both writers, different conids (a conid has one partition).
            let rows = (0..50)
                .map(|i| update(i * 2 + 1 + partition as i64, &format!("S{}", i % 5), round, partition, round * 50 + i))
                .collect();
            match table.write(&batch(rows)).await {
                Ok((written, _)) => table = written,
                Err(error) => {
                    assert!(error.is_conflict(), "{error}");
                    conflicts += 1;
                }
            }
        }
        conflicts
    };
    let (a, b) = tokio::join!(tokio::spawn(writer(first, 0)), tokio::spawn(writer(second, 1)));
    assert_eq!((a.unwrap(), b.unwrap()), (0, 0), "commits of disjoint partitions conflicted");
    assert_eq!(common::commits(&path), 1 + 2 * rounds as usize, "one commit per flush of each writer");
    assert!(
        common::committed_over_a_concurrent_commit(&path) > 0,
        "the writers never overlapped, so the test proved nothing about conflicts"
    );
    let rows = common::read_table(&path).await;
    assert_eq!(rows.len(), 100);
    assert!(rows.values().all(|r| r.timestamp_micros == (rounds - 1) * 1000), "every key has its last update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_of_an_existing_table_is_kept_and_a_different_one_refused_with_the_fix() {
    let (_dir, path) = common::table_dir();
    let table = open(&path, PartitionBy::None, 100).await;
    table.write(&batch(vec![update(1, "A", 1, 0, 0), update(2, "B", 1, 1, 0)])).await.unwrap();
    let files: Vec<_> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(files.iter().all(|f| !f.to_string_lossy().starts_with("symbol=")), "{files:?}");
    assert_eq!(python_rows(&path).len(), 2);
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let error = PositionTable::open_or_create(&config, "g").await.expect_err("layout differs");
    assert!(matches!(error, TableError::Incompatible { .. }));
    let message = error.to_string();
    assert!(message.contains("partitioned by []"), "{message}");
    assert!(message.contains("delta.partition_by"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_under_symbols_that_need_escaping_are_found_again_after_a_restart() {
    let symbols = ["BRK/B", "ÄÖ ü=%", "a.b..c", "../../escape", "x%2Fy"];
    let (_dir, path) = common::table_dir();
    let table = open(&path, PartitionBy::Symbol, 100).await;
    let rows = symbols.iter().enumerate().map(|(i, s)| update(i as i64 + 1, s, 10, 0, i as i64)).collect();
    table.write(&batch(rows)).await.expect("first write");
    // A new worker: its key index is built from the files, then each file is rewritten.
    let restarted = open(&path, PartitionBy::Symbol, 100).await;
    let rows = symbols.iter().enumerate().map(|(i, s)| update(i as i64 + 1, s, 20, 0, 10 + i as i64)).collect();
    let (_, report) = restarted.write(&batch(rows)).await.expect("rewrite after a restart");
    assert_eq!((report.updated, report.inserted), (symbols.len(), 0));
    let read = python_rows(&path);
    assert_eq!(read.len(), symbols.len());
    assert!(read.iter().all(|(_, _, position)| *position == 20.0), "{read:?}");
}

/// A batch of `rows` covering `offsets` (topic, partition, last offset).
fn batch_with_offsets(rows: Vec<PositionUpdate>, offsets: &[(&str, i32, i64)]) -> Batch {
    let mut b = Batch::default();
    for (topic, partition, offset) in offsets {
        b.offsets.observe(&TopicPartition::new(*topic, *partition), Offset(*offset));
    }
    b.messages = rows.len();
    b.rows = rows;
    b
}

#[tokio::test]
async fn an_incompatible_existing_table_is_refused_with_what_differs() {
    let (_dir, path) = common::table_dir();
    let url = deltalake::ensure_table_uri(path.display().to_string()).unwrap();
    deltalake::DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns([
            StructField::new("conid", DataType::Primitive(PrimitiveType::String), false),
            StructField::new("symbol", DataType::Primitive(PrimitiveType::String), false),
        ])
        .await
        .unwrap();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let err = PositionTable::open_or_create(&config, "g").await.expect_err("must refuse");
    assert!(matches!(err, TableError::Incompatible { .. }));
    let message = err.to_string();
    assert!(message.contains("column `conid`"), "{message}");
    assert!(message.contains("column `position` is missing"), "{message}");
    assert!(message.contains("partitioned by"), "{message}");
    assert!(message.contains("delta.table_uri"), "{message}");
}

#[tokio::test]
async fn a_new_table_is_created_partitioned_by_symbol_and_reopens() {
    let (_dir, path) = common::table_dir();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let created = PositionTable::open_or_create(&config, "g").await.unwrap();
    assert_eq!(created.version().map(|v| v.0), Some(0));
    PositionTable::open_or_create(&config, "g").await.expect("reopens its own table");
    assert!(path.join("_delta_log/00000000000000000000.json").exists());
}

#[tokio::test]
async fn offsets_of_a_partition_without_rows_are_recorded_and_written_batches_are_not_repeated() {
    let (_dir, path) = common::table_dir();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let table = PositionTable::open_or_create(&config, "g").await.unwrap();
    let first = batch_with_offsets(vec![update(1, "S", 1000, 0, 5)], &[("t", 0, 5), ("t", 1, 9)]);
    let (table, report) = table.write(&first).await.unwrap();
    assert!(report.committed);
    assert_eq!(report.inserted, 1);
    let tps = [TopicPartition::new("t", 0), TopicPartition::new("t", 1)];
    let recorded = table.recorded_offsets(&tps).await.unwrap();
    assert_eq!(recorded[&tps[0]].0, 5);
    assert_eq!(recorded[&tps[1]].0, 9);

    // The same batch again: nothing new, no commit.
    let (table, again) = table.write(&first).await.unwrap();
    assert!(!again.committed);
    assert_eq!(table.version(), report_version(&report));

    // Only offsets advance (every row already recorded): a commit with no rows.
    let offsets_only = batch_with_offsets(vec![update(1, "S", 1000, 0, 5)], &[("t", 0, 5), ("t", 1, 12)]);
    let (table, moved) = table.write(&offsets_only).await.unwrap();
    assert!(moved.committed);
    assert_eq!((moved.inserted, moved.updated), (0, 0));
    assert_eq!(table.recorded_offsets(&tps).await.unwrap()[&tps[1]].0, 12);

    // An older update in a later batch is not applied; a newer one is.
    let (table, stale) =
        table.write(&batch_with_offsets(vec![update(1, "S", 500, 0, 6)], &[("t", 0, 6)])).await.unwrap();
    assert_eq!((stale.inserted, stale.updated), (0, 0));
    assert_eq!(table.recorded_offsets(&tps).await.unwrap()[&tps[0]].0, 6, "a batch of stale rows recorded no offset");
    let (_, fresh) = table.write(&batch_with_offsets(vec![update(1, "S", 2000, 0, 7)], &[("t", 0, 7)])).await.unwrap();
    assert_eq!((fresh.inserted, fresh.updated), (0, 1));
}

fn report_version(report: &position_sink::table::WriteReport) -> Option<position_sink::table::TableVersion> {
    Some(report.version)
}

#[tokio::test]
async fn failed_commits_leave_no_gap_and_no_visible_change() {
    use std::sync::atomic::Ordering;
    let (_dir, path) = common::table_dir();
    let (uri, faults) = common::faulty_store::faulty_table(&path);
    let config = DeltaConfig { table_uri: uri, ..DeltaConfig::default() };
    let mut table = PositionTable::open_or_create(&config, "g").await.unwrap();
    let mut offset = 0;
    let mut failed_rounds = Vec::new();
    for round in 0..6 {
        offset += 1;
        let b = batch_with_offsets(vec![update(round + 1, "S", 1000, 0, offset)], &[("t", 0, offset)]);
        faults.fail_commits.store(round % 2 == 1, Ordering::SeqCst);
        faults.fail_writes.store(round == 3, Ordering::SeqCst);
        match table.write(&b).await {
            Ok((written, _)) => table = written,
            Err(error) => {
                let files: Vec<_> =
                    std::fs::read_dir(path.join("_delta_log")).unwrap().map(|e| e.unwrap().file_name()).collect();
                assert!(round % 2 == 1, "round {round}: {error}\n{files:?}");
                failed_rounds.push(round);
                faults.heal();
                table = table.write(&b).await.expect("the retry after healing").0;
            }
        }
    }
    assert_eq!(failed_rounds, [1, 3, 5], "every round with failing storage failed its first write");
    assert!(faults.refused.load(Ordering::SeqCst) >= 3, "the store refused no write");
    let mut versions: Vec<String> = std::fs::read_dir(path.join("_delta_log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    versions.sort();
    let expected: Vec<String> = (0..=6).map(|v| format!("{v:020}.json")).collect();
    assert_eq!(versions, expected);
    assert_eq!(common::read_table(&path).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_thousands_of_symbols_is_one_commit_with_its_offsets() {
    let (_dir, path) = common::table_dir();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let table = PositionTable::open_or_create(&config, "g").await.unwrap();
    let rows: Vec<_> = (0..1000)
        .map(|i| {
            let mut u = update(i + 1, "S", 1000, 0, i);
            u.symbol = format!("SYM{i:05}");
            u
        })
        .collect();
    let b = batch_with_offsets(rows, &[("t", 0, 999)]);
    // On a runtime worker thread, as in the worker (a smaller stack than the test's own).
    let (table, report) = tokio::spawn(async move { table.write(&b).await }).await.unwrap().unwrap();
    assert_eq!(report.inserted, 1000);
    assert_eq!(table.version().map(|v| v.0), Some(1), "one commit for the whole flush");
    assert_eq!(report.files_added, 1000, "one file per symbol");
    let tp = TopicPartition::new("t", 0);
    assert_eq!(table.recorded_offsets(std::slice::from_ref(&tp)).await.unwrap()[&tp].0, 999);
    assert_eq!(common::read_table(&path).await.len(), 1000);
}

/// Updates of one partition each, and the rows they leave: the newest per conid.
#[derive(Default)]
struct Model {
    offset: i64,
    rows: std::collections::BTreeMap<i64, (String, f64)>,
}

impl Model {
    /// An update of `conid` at `ts` from `partition`, at the next offset.
    fn next(&mut self, conid: i64, ts: i64, partition: i32) -> PositionUpdate {
        self.offset += 1;
        let symbol = format!("S{}", conid % 4);
        self.rows.insert(conid, (symbol.clone(), ts as f64));
        update(conid, &symbol, ts, partition, self.offset)
    }

    fn rows(&self) -> Vec<(i64, String, f64)> {
        self.rows.iter().map(|(c, (s, p))| (*c, s.clone(), *p)).collect()
    }
}

/// The rows of `path` as (conid, symbol, position), read through delta-rs (deletion
/// vectors applied).
async fn rows_of(path: &std::path::Path) -> Vec<(i64, String, f64)> {
    let mut rows: Vec<_> =
        common::read_table(path).await.into_values().map(|r| (r.conid, r.symbol, r.position)).collect();
    rows.sort_by_key(|r| r.0);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_saved_key_index_and_only_the_files_added_since() {
    use position_sink::config::WriteMode;
    use position_sink::table::saved_index::OBJECT;
    for mode in [WriteMode::CopyOnWrite, WriteMode::DeletionVectors] {
        let (_dir, path) = common::table_dir();
        let config = DeltaConfig {
            table_uri: path.display().to_string(),
            partition_by: PartitionBy::None,
            write_mode: mode,
            max_rows_per_file: 10,
            vector_min_rows: 1,
            ..DeltaConfig::default()
        };
        let open = || async { PositionTable::open_or_create(&config, "g").await.expect("open") };
        // 60 keys over two partitions, then updates that give files vectors or rewrite them.
        let mut model = Model::default();
        let first: Vec<_> = (1..=60).map(|c| model.next(c, 10, (c % 2) as i32)).collect();
        let (writer, _) = open().await.write(&batch(first)).await.unwrap();
        let (writer, _) = writer.write(&batch(vec![model.next(3, 20, 1), model.next(40, 20, 0)])).await.unwrap();
        assert!(
            open().await.save_key_index().await.unwrap().is_none(),
            "a handle that never wrote has no index to save"
        );
        let saved = writer.save_key_index().await.unwrap().expect("saved");
        assert_eq!(saved.keys, 60);
        assert!(path.join(OBJECT).exists());

        // Another writer changes the table after the save: files removed, given
        // vectors and added, new keys among them.
        let (other, _) = open().await.write(&batch(vec![model.next(5, 30, 1), model.next(30, 30, 0)])).await.unwrap();
        let added: Vec<_> = (61..=70).map(|c| model.next(c, 30, 0)).collect();
        let (other, report) = other.write(&batch(added)).await.unwrap();
        assert!(report.files_added >= 1);
        let live = other.delta().snapshot().unwrap().log_data().num_files();

        // A restart reads the saved index and the files added since, and finds the keys
        // of both: an update of a key of each is an update, not an insert.
        let restarted = open().await;
        let (_, report) = restarted
            .write(&batch(vec![model.next(7, 40, 1), model.next(65, 40, 0), model.next(30, 40, 0)]))
            .await
            .unwrap();
        assert_eq!((report.updated, report.inserted), (3, 0), "{mode:?}");
        assert!(
            report.index_files_read < live && report.index_files_read >= 1,
            "{mode:?}: read {} of {live} live files",
            report.index_files_read
        );
        assert_eq!(rows_of(&path).await, model.rows(), "{mode:?}");

        // A damaged index is not used: every live file is read, and the table is right.
        let mut object = std::fs::read(path.join(OBJECT)).unwrap();
        let middle = object.len() / 2;
        object[middle] ^= 0x10;
        std::fs::write(path.join(OBJECT), &object).unwrap();
        let restarted = open().await;
        let live = restarted.delta().snapshot().unwrap().log_data().num_files();
        let (_, report) = restarted.write(&batch(vec![model.next(8, 50, 0), model.next(71, 50, 1)])).await.unwrap();
        assert_eq!((report.updated, report.inserted), (1, 1), "{mode:?}");
        assert_eq!(report.index_files_read, live, "{mode:?}: every live file read");
        assert_eq!(rows_of(&path).await, model.rows(), "{mode:?}");

        // An index of another table at the same place (deleted and created again) is
        // not used either.
        let saved = std::fs::read(path.join(OBJECT)).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
        let (fresh, _) = open().await.write(&batch(vec![update(1, "A", 1, 0, 1)])).await.unwrap();
        std::fs::create_dir_all(path.join(OBJECT).parent().unwrap()).unwrap();
        std::fs::write(path.join(OBJECT), saved).unwrap();
        drop(fresh);
        let (_, report) = open().await.write(&batch(vec![update(1, "A", 2, 0, 2)])).await.unwrap();
        assert_eq!((report.updated, report.inserted, report.index_files_read), (1, 0, 1), "{mode:?}");
    }
}
