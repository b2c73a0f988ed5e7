//! The table contract without Kafka: creation, partitioning, and refusal of an
//! incompatible existing table.

mod common;

use deltalake::kernel::{DataType, PrimitiveType, StructField};
use position_sink::config::DeltaConfig;
use position_sink::table::{PositionTable, TableError};

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

fn batch(
    rows: Vec<position_sink::update::PositionUpdate>,
    offsets: &[(&str, i32, i64)],
) -> position_sink::batch::Batch {
    let mut b = position_sink::batch::Batch::default();
    for (topic, partition, offset) in offsets {
        b.offsets.observe(
            &position_sink::offsets::TopicPartition::new(*topic, *partition),
            position_sink::offsets::Offset(*offset),
        );
    }
    b.messages = rows.len();
    b.rows = rows;
    b
}

fn update(conid: i64, ts: i64, partition: i32, offset: i64) -> position_sink::update::PositionUpdate {
    let at = position_sink::offsets::Coordinates {
        tp: position_sink::offsets::TopicPartition::new("t", partition),
        offset: position_sink::offsets::Offset(offset),
    };
    let json = format!(r#"{{"conid":{conid},"symbol":"S","position":{ts},"timestamp":{ts}}}"#);
    position_sink::decode::decode(None, Some(json.as_bytes()), at, &Default::default()).unwrap()
}

#[tokio::test]
async fn offsets_of_a_partition_without_rows_are_recorded_and_written_batches_are_not_repeated() {
    let (_dir, path) = common::table_dir();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let table = PositionTable::open_or_create(&config, "g").await.unwrap();
    let first = batch(vec![update(1, 1000, 0, 5)], &[("t", 0, 5), ("t", 1, 9)]);
    let (table, report) = table.write(&first).await.unwrap();
    assert!(report.committed);
    assert_eq!(report.inserted, 1);
    let tps =
        [position_sink::offsets::TopicPartition::new("t", 0), position_sink::offsets::TopicPartition::new("t", 1)];
    let recorded = table.recorded_offsets(&tps).await.unwrap();
    assert_eq!(recorded[&tps[0]].0, 5);
    assert_eq!(recorded[&tps[1]].0, 9);

    // The same batch again: nothing new, no commit.
    let (table, again) = table.write(&first).await.unwrap();
    assert!(!again.committed);
    assert_eq!(table.version(), report_version(&report));

    // Only offsets advance (every row already recorded): a commit with no rows.
    let offsets_only = batch(vec![update(1, 1000, 0, 5)], &[("t", 0, 5), ("t", 1, 12)]);
    let (table, moved) = table.write(&offsets_only).await.unwrap();
    assert!(moved.committed);
    assert_eq!((moved.inserted, moved.updated), (0, 0));
    assert_eq!(table.recorded_offsets(&tps).await.unwrap()[&tps[1]].0, 12);

    // An older update in a later batch is not applied; a newer one is.
    let (table, stale) = table.write(&batch(vec![update(1, 500, 0, 6)], &[("t", 0, 6)])).await.unwrap();
    assert_eq!((stale.inserted, stale.updated), (0, 0));
    assert_eq!(table.recorded_offsets(&tps).await.unwrap()[&tps[0]].0, 6, "a batch of stale rows recorded no offset");
    let (_, fresh) = table.write(&batch(vec![update(1, 2000, 0, 7)], &[("t", 0, 7)])).await.unwrap();
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
        let b = batch(vec![update(round + 1, 1000, 0, offset)], &[("t", 0, offset)]);
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
            let mut u = update(i + 1, 1000, 0, i);
            u.symbol = format!("SYM{i:05}");
            u
        })
        .collect();
    let b = batch(rows, &[("t", 0, 999)]);
    // On a runtime worker thread, as in the worker (a smaller stack than the test's own).
    let (table, report) = tokio::spawn(async move { table.write(&b).await }).await.unwrap().unwrap();
    assert_eq!(report.inserted, 1000);
    assert_eq!(table.version().map(|v| v.0), Some(1), "one commit for the whole flush");
    assert_eq!(report.files_added, 1000, "one file per symbol");
    let tp = position_sink::offsets::TopicPartition::new("t", 0);
    assert_eq!(table.recorded_offsets(std::slice::from_ref(&tp)).await.unwrap()[&tp].0, 999);
    assert_eq!(common::read_table(&path).await.len(), 1000);
}
