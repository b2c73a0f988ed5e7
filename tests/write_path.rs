//! The write path without Kafka (docs/write-path.md): one commit per flush, a conid
//! that changes symbol moves, files are rewritten only when they hold a changed key,
//! workers of one group commit side by side, and both layouts read back with the
//! independent readers.

mod common;

use std::process::Command;

use position_sink::batch::Batch;
use position_sink::config::{DeltaConfig, PartitionBy};
use position_sink::offsets::{Coordinates, Offset, TopicPartition};
use position_sink::table::{PositionTable, TableError};
use position_sink::update::PositionUpdate;

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
    let output = Command::new(common::python()).arg("-c").arg(script).arg(path).output().expect("run Python");
    assert!(output.status.success(), "Python reader failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("rows as JSON")
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
