//! Merge-on-read (`delta.write_mode = "deletion_vectors"`, docs/write-path.md): a flush
//! hides the rows it replaces with deletion vectors instead of rewriting their files.
//! Checked against a model of the written updates after many flushes, through a
//! restart (the key index read back with the vectors), a compaction and a vacuum, by
//! this program's reader and by independent ones (polars, deltalake's `QueryBuilder`,
//! and the reference implementation, Apache Spark with Delta Lake);
//! a table in one mode refuses a worker configured for the other.

mod common;

use std::path::Path;
use std::time::Duration;

use common::stream::{Model, PARTITIONS, Stream};
use position_sink::config::{DeltaConfig, PartitionBy, WriteMode};
use position_sink::offsets::TopicPartition;
use position_sink::table::{PositionTable, TableError, Thresholds};

/// The tables' file retention (`delta.deletedFileRetentionDuration`), and the age of a
/// file no commit names before vacuum takes it.
const WINDOW: Duration = Duration::from_secs(60);

fn config(path: &Path, layout: PartitionBy, mode: WriteMode) -> DeltaConfig {
    let mut config = DeltaConfig {
        table_uri: path.display().to_string(),
        partition_by: layout,
        write_mode: mode,
        max_rows_per_file: 40,
        // Files this small would be rewritten, not given vectors, by default.
        vector_min_rows: 0,
        ..DeltaConfig::default()
    };
    // Removed files and vectors may be vacuumed a minute after their removal.
    config.table_properties.0.insert("delta.deletedFileRetentionDuration".into(), "interval 60 seconds".into());
    config
}

/// Live files that carry a deletion vector, and the vector files on disk.
async fn vectors_in(path: &Path) -> (usize, usize) {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let table = deltalake::open_table(url).await.expect("open");
    let snapshot = table.snapshot().expect("snapshot");
    let with_vector = snapshot.log_data().iter().filter(|f| f.deletion_vector_descriptor().is_some()).count();
    let files = std::fs::read_dir(path)
        .expect("table dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("deletion_vector_"))
        .count();
    (with_vector, files)
}

/// Live files whose path holds `mark` and that carry a deletion vector.
async fn vectors_under(path: &Path, mark: char) -> usize {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let table = deltalake::open_table(url).await.expect("open");
    let snapshot = table.snapshot().expect("snapshot");
    snapshot.log_data().iter().filter(|f| f.deletion_vector_descriptor().is_some() && f.path().contains(mark)).count()
}

/// (conid, symbol, kafka_offset) of every row as polars (`read_delta` and `scan_delta`)
/// and deltalake's `QueryBuilder` read it; fails if they disagree.
fn independent_rows(path: &Path) -> Vec<(i64, String, i64)> {
    let script = r#"
import json, sys
import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
path = sys.argv[1]
columns = ["conid", "symbol", "kafka_offset"]
frame = pl.read_delta(path).select(columns).sort("conid")
scanned = pl.scan_delta(path).select(columns).sort("conid").collect()
assert frame.equals(scanned), "read_delta and scan_delta differ"
reader = QueryBuilder().register("t", DeltaTable(path)).execute(
    "SELECT conid, symbol, kafka_offset FROM t ORDER BY conid")
queried = pl.from_arrow(pa.table(reader.read_all())).select(columns)
assert queried.height == frame.height, f"QueryBuilder reads {queried.height} rows, polars {frame.height}"
assert queried.equals(frame.cast(queried.schema)), "QueryBuilder and polars differ"
print(json.dumps(frame.rows()))
"#;
    let printed = common::run_python(&["-c".as_ref(), script.as_ref(), path.as_os_str()]);
    serde_json::from_str(&printed).expect("rows as JSON")
}

/// The deletion-vector files on disk.
fn vector_files(path: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(path)
        .expect("table dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("deletion_vector_"))
        .collect()
}

/// (conid, symbol, kafka_offset) of every row at `version`, as polars reads it.
fn rows_at(path: &Path, version: u64) -> Vec<(i64, String, i64)> {
    let script = r#"
import json, sys
import polars as pl
frame = pl.read_delta(sys.argv[1], version=int(sys.argv[2])).select("conid", "symbol", "kafka_offset").sort("conid")
print(json.dumps(frame.rows()))
"#;
    let version = version.to_string();
    let printed = common::run_python(&["-c".as_ref(), script.as_ref(), path.as_os_str(), version.as_ref()]);
    serde_json::from_str(&printed).expect("rows as JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushes_hide_replaced_rows_and_every_reader_agrees_with_the_model_through_restart_compaction_and_vacuum() {
    // Both layouts at once: each waits out the vacuum's minute once.
    let runs =
        [(7, PartitionBy::None), (8, PartitionBy::Symbol)].map(|(seed, layout)| tokio::spawn(flushes_in(seed, layout)));
    for run in runs {
        run.await.expect("a layout's run");
    }
}

async fn flushes_in(seed: u64, layout: PartitionBy) {
    {
        let (_dir, path) = common::table_dir();
        let config = config(&path, layout, WriteMode::DeletionVectors);
        let mut table = PositionTable::open_or_create(&config, "g").await.expect("open");
        let (mut model, mut stream) = (Model::default(), Stream::new(seed));
        let (mut hidden_in, mut carried) = (0, 0);
        for flush in 0..30 {
            let batch = stream.flush(&mut model, 60);
            let (next, report) = table.write(&batch).await.expect("flush");
            table = next;
            hidden_in += report.files_hidden_in;
            assert!(
                report.rows_rewritten <= batch.rows.len() + report.rows_carried,
                "a flush writes only its own rows and those of the escaped files it rewrites ({} for {} + {})",
                report.rows_rewritten,
                batch.rows.len(),
                report.rows_carried
            );
            carried += report.rows_carried;
            if flush % 10 == 9 {
                common::assert_table_matches(&common::read_table(&path).await, &model.expected());
            }
        }
        assert!(hidden_in > 0, "flushes hid rows with deletion vectors ({layout:?})");
        // Files in escaped partition directories get no vector: polars would ignore it.
        let escaped_with_vector = vectors_under(&path, '%').await;
        assert_eq!(escaped_with_vector, 0, "a file in an escaped partition directory has a vector ({layout:?})");
        if layout == PartitionBy::Symbol {
            assert!(carried > 0, "flushes rewrote files in escaped partition directories");
        }
        let (with_vector, on_disk) = vectors_in(&path).await;
        assert!(with_vector > 0 && on_disk > 0, "the table has deletion vectors ({with_vector}, {on_disk})");
        assert_eq!(independent_rows(&path), model.triples(), "{layout:?}");

        // A restarted worker reads the vectors back into its key index.
        let mut table = PositionTable::open_or_create(&config, "g").await.expect("reopen");
        for _ in 0..10 {
            let (next, _) = table.write(&stream.flush(&mut model, 60)).await.expect("flush after restart");
            table = next;
        }
        common::assert_table_matches(&common::read_table(&path).await, &model.expected());
        assert_eq!(independent_rows(&path), model.triples(), "{layout:?} after a restart");

        // Compaction rewrites the files without their hidden rows.
        let before_compaction = table.version().expect("a version").0;
        let rows_before_compaction = model.triples();
        let vector_files_before = vector_files(&path);
        let partitions: Vec<TopicPartition> = (0..PARTITIONS).map(|p| TopicPartition::new("t", p)).collect();
        let thresholds = Thresholds { min_files: 2, hidden_fraction: 0.01, max_files: 32, max_vectors: 128 };
        let (table, report) = table.compact(&partitions, thresholds).await.expect("compaction");
        let compacted_at = std::time::Instant::now();
        assert!(report.committed && report.files_removed > 0, "{report:?}");
        assert_eq!(vectors_in(&path).await.0, 0, "no live file keeps a deletion vector");
        common::assert_table_matches(&common::read_table(&path).await, &model.expected());

        // Vacuum keeps the vectors of files removed within the retention window: the
        // version before the compaction still reads right.
        common::stream::age_everything(&path);
        position_sink::maintenance::clean(table.delta(), table.uri(), false, WINDOW).await.expect("vacuum");
        assert_eq!(vector_files(&path), vector_files_before, "vectors of recently removed files are kept");
        assert_eq!(rows_at(&path, before_compaction), rows_before_compaction, "time travel before the compaction");

        // More flushes (new vectors) and the independent readers while the window passes.
        let mut table = table;
        for _ in 0..5 {
            let (next, _) = table.write(&stream.flush(&mut model, 60)).await.expect("a flush after maintenance");
            table = next;
        }
        assert_eq!(independent_rows(&path), model.triples(), "{layout:?} after compaction");
        // Once the removes are older than the window (a minute), their vector files go.
        let window = WINDOW + Duration::from_secs(2);
        tokio::time::sleep(window.saturating_sub(compacted_at.elapsed())).await;
        common::stream::age_everything(&path);
        position_sink::maintenance::clean(table.delta(), table.uri(), false, WINDOW).await.expect("vacuum");
        let left: Vec<_> = vector_files_before.intersection(&vector_files(&path)).cloned().collect();
        assert!(left.is_empty(), "unreferenced vector files are vacuumed once out of the window: {left:?}");
        common::assert_table_matches(&common::read_table(&path).await, &model.expected());
        assert!(vectors_in(&path).await.0 > 0, "new flushes hide rows again");
        assert_eq!(independent_rows(&path), model.triples(), "{layout:?} after more flushes");
        // The reference implementation reads the same rows.
        assert_eq!(common::spark_rows(&[&path]), vec![model.triples()], "Spark reads {layout:?} differently");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_in_one_write_mode_refuses_a_worker_configured_for_the_other() {
    for (created, configured) in
        [(WriteMode::CopyOnWrite, WriteMode::DeletionVectors), (WriteMode::DeletionVectors, WriteMode::CopyOnWrite)]
    {
        let (_dir, path) = common::table_dir();
        PositionTable::open_or_create(&config(&path, PartitionBy::Symbol, created), "g").await.expect("create");
        let refused = PositionTable::open_or_create(&config(&path, PartitionBy::Symbol, configured), "g").await;
        let Err(error @ TableError::Incompatible { .. }) = refused else {
            panic!("a {configured:?} worker opened a {created:?} table")
        };
        let message = error.to_string();
        assert!(message.contains("delta.write_mode"), "{message}");
        assert!(!error.is_retryable(), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_deletion_vector_table_declares_the_feature_readers_need() {
    let (_dir, path) = common::table_dir();
    PositionTable::open_or_create(&config(&path, PartitionBy::None, WriteMode::DeletionVectors), "g")
        .await
        .expect("create");
    let log = std::fs::read_to_string(path.join("_delta_log/00000000000000000000.json")).expect("first commit");
    let protocol = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|a| a.get("protocol").cloned())
        .expect("a protocol action");
    assert_eq!(protocol["minReaderVersion"], 3, "{protocol}");
    assert_eq!(protocol["minWriterVersion"], 7, "{protocol}");
    let features = |kind: &str| protocol[kind].as_array().cloned().unwrap_or_default();
    assert!(features("readerFeatures").contains(&"deletionVectors".into()), "{protocol}");
    assert!(features("writerFeatures").contains(&"deletionVectors".into()), "{protocol}");
}

/// A worker flushing small batches every 50 ms, with its scheduled maintenance an hour
/// away: each flush adds a file per Kafka partition and hides rows of older ones. Past
/// `maintenance.compaction_max_files` files in a group, the flush compacts at once, so
/// the files (and vectors) a reader loads stay bounded however many flushes ran; every
/// reader, and a restarted worker's key index, reads the table exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_that_crowds_a_group_compacts_it_so_readers_load_a_bounded_number_of_files() {
    const MAX_FILES: usize = 8;
    let topic = common::create_topic("crowded", 2).await;
    let (_dir, path) = common::table_dir();
    let mut config = common::config(&topic, &common::unique("crowded"), &path);
    config.delta.write_mode = WriteMode::DeletionVectors;
    config.delta.vector_min_rows = 0;
    config.delta.partition_by = PartitionBy::None;
    config.flush.interval = Duration::from_millis(50);
    config.maintenance.interval = Duration::from_secs(3600);
    config.maintenance.compaction_max_files = MAX_FILES;
    let mut produced = common::produce(&topic, &common::sample(3000, 3000, 7), None).await;
    let worker = common::spawn_worker(config.clone());
    common::wait_until(Duration::from_secs(120), "the first rows", async || {
        common::is_committed_to(&config.kafka.group_id, &topic, &produced, 2)
    })
    .await;
    // About 150 flushes, each hiding rows of the files before it.
    for chunk in 0..150 {
        produced.extend(common::produce(&topic, &common::sample(40, 3000, 100 + chunk), None).await);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    common::wait_until(Duration::from_secs(120), "every update committed", async || {
        common::is_committed_to(&config.kafka.group_id, &topic, &produced, 2)
    })
    .await;
    let compactions = position_sink::Progress::get(&worker.progress.compactions);
    let summary = worker.stop().await.expect("worker");

    let (with_vector, _) = vectors_in(&path).await;
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let live = deltalake::open_table(url).await.expect("open").snapshot().expect("snapshot").log_data().num_files();
    eprintln!(
        "{} flushes, {compactions} compactions: {live} live files, {with_vector} with a vector",
        summary.delta_commits
    );
    assert!(summary.delta_commits >= 60, "many flushes: {summary:?}");
    assert!(compactions > 0, "crowded groups were compacted before maintenance.interval");
    assert!(live <= 2 * (MAX_FILES + 1), "{live} live files in 2 groups of at most {MAX_FILES} files to pack");
    for name in vector_files(&path) {
        let size = std::fs::metadata(path.join(&name)).expect("vector file").len();
        assert!(size <= 72 * 1024, "{name}: {size} bytes, more than 64 KiB of vectors and one more");
    }

    let expected: Vec<(i64, String, i64)> = {
        let mut rows: Vec<_> =
            common::model(&produced).values().map(|r| (r.conid, r.symbol.clone(), r.kafka_offset)).collect();
        rows.sort();
        rows
    };
    let timed = std::time::Instant::now();
    assert_eq!(independent_rows(&path), expected, "polars and QueryBuilder");
    let independent = timed.elapsed();
    let timed = std::time::Instant::now();
    assert_eq!(common::spark_rows(&[&path]), vec![expected], "Spark");
    eprintln!("polars + QueryBuilder read it in {independent:?}, Spark in {:?}", timed.elapsed());
    common::assert_table_matches(&common::read_table(&path).await, &common::model(&produced));

    // A restarted worker builds its key index from the files and their vectors.
    produced.extend(common::produce(&topic, &common::sample(500, 3000, 999), None).await);
    common::run_to_end(config).await.expect("the restarted worker");
    common::assert_table_matches(&common::read_table(&path).await, &common::model(&produced));
}

/// Live files with a deletion vector holding fewer than `rows` rows.
async fn vectors_on_files_below(path: &Path, rows: usize) -> usize {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let table = deltalake::open_table(url).await.expect("open");
    let snapshot = table.snapshot().expect("snapshot");
    snapshot
        .log_data()
        .iter()
        .filter(|f| f.deletion_vector_descriptor().is_some())
        .filter(|f| f.num_records().is_some_and(|n| n < rows))
        .count()
}

/// A file of fewer than `delta.vector_min_rows` live rows gets no vector: the flush
/// rewrites it without the rows it replaces (a reader loads no vector for it); larger
/// files get vectors; every reader agrees with the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_rewritten_and_only_files_of_vector_min_rows_get_vectors() {
    const MIN_ROWS: usize = 25;
    let (_dir, path) = common::table_dir();
    let config =
        DeltaConfig { vector_min_rows: MIN_ROWS, ..config(&path, PartitionBy::None, WriteMode::DeletionVectors) };
    let mut table = PositionTable::open_or_create(&config, "g").await.expect("open");
    let (mut model, mut stream) = (Model::default(), Stream::new(21));
    let (mut hidden_in, mut carried) = (0, 0);
    for flush in 0..30 {
        let (next, report) = table.write(&stream.flush(&mut model, 60)).await.expect("flush");
        table = next;
        hidden_in += report.files_hidden_in;
        carried += report.rows_carried;
        let small = vectors_on_files_below(&path, MIN_ROWS).await;
        assert_eq!(small, 0, "flush {flush}: {small} files of fewer than {MIN_ROWS} rows got a vector");
    }
    assert!(hidden_in > 0, "files of {MIN_ROWS} rows or more got vectors");
    assert!(carried > 0, "smaller files were rewritten without the rows replaced");
    common::assert_table_matches(&common::read_table(&path).await, &model.expected());
    assert_eq!(independent_rows(&path), model.triples());
}

/// A flush that leaves the table with more files with a vector than
/// `maintenance.compaction_max_vectors` makes compaction due, and that compaction
/// rewrites the files with vectors without their hidden rows: a reader never loads
/// more than the bound after the compaction a flush asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_compaction_max_vectors_a_flush_makes_compaction_purge_the_vectors() {
    const MAX_VECTORS: usize = 3;
    let (_dir, path) = common::table_dir();
    let config = config(&path, PartitionBy::Symbol, WriteMode::DeletionVectors);
    let thresholds = Thresholds { min_files: 4, hidden_fraction: 0.3, max_files: 32, max_vectors: MAX_VECTORS };
    let mut table = PositionTable::open_or_create(&config, "g").await.expect("open").with_compaction(thresholds);
    let partitions: Vec<TopicPartition> = (0..PARTITIONS).map(|p| TopicPartition::new("t", p)).collect();
    let (mut model, mut stream) = (Model::default(), Stream::new(22));
    let (mut purges, mut most_after_flush) = (0, 0);
    for flush in 0..20 {
        let (next, report) = table.write(&stream.flush(&mut model, 60)).await.expect("flush");
        table = next;
        let after_flush = vectors_in(&path).await.0;
        most_after_flush = most_after_flush.max(after_flush);
        assert_eq!(report.compaction_due, after_flush > MAX_VECTORS, "flush {flush}: {after_flush} files with vectors");
        if report.compaction_due {
            let (next, compaction) = table.compact(&partitions, thresholds).await.expect("compaction");
            table = next;
            purges += usize::from(compaction.committed);
        }
        let with_vector = vectors_in(&path).await.0;
        assert!(with_vector <= MAX_VECTORS, "flush {flush}: {with_vector} files with vectors after compaction");
    }
    assert!(most_after_flush > MAX_VECTORS && purges > 0, "the bound was crossed ({most_after_flush}) and purged");
    common::assert_table_matches(&common::read_table(&path).await, &model.expected());
    assert_eq!(independent_rows(&path), model.triples());
}
