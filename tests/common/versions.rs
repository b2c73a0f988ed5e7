//! The version-exact check. A table's version `v` records, per Kafka partition, the
//! offset up to which its messages are applied (`txn`), so the table at `v` must equal
//! last-write-wins over exactly the produced messages at or below those offsets. Every
//! version a reader may open, from the one current when the file retention window
//! began (`delta.deletedFileRetentionDuration` ago) to the latest, is read by time
//! travel with this program's reader (DataFusion over delta-rs) and with polars, and
//! compared with the model at its offsets: missing, wrong, extra and duplicate keys.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{Produced, Row, assert_table_matches, model, read_version, run_python};

/// What one check read.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Versions compared with the model, by each reader.
    pub versions: Vec<u64>,
    /// Of them, versions holding at least one row.
    pub with_rows: usize,
}

/// Commit versions in the log, with their files' modification times.
fn commits(path: &Path) -> BTreeMap<u64, SystemTime> {
    std::fs::read_dir(path.join("_delta_log"))
        .expect("the table's log")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name.strip_suffix(".json")?.parse().ok()?;
            Some((version, entry.metadata().ok()?.modified().ok()?))
        })
        .collect()
}

/// The versions a reader may open now: the one current `retention` ago (the newest
/// commit written by then) and every later one. Never empty for a table with a commit.
pub fn versions_in_window(path: &Path, retention: Duration) -> Vec<u64> {
    let commits = commits(path);
    let cutoff = SystemTime::now() - retention;
    let oldest = commits.iter().filter(|(_, at)| **at <= cutoff).map(|(v, _)| *v).max();
    let oldest = oldest.or_else(|| commits.keys().next().copied()).expect("a commit");
    commits.keys().copied().filter(|v| *v >= oldest).collect()
}

/// The offsets version `version` records for `group`'s partitions of `topic` (the last
/// offset applied, per partition).
pub async fn recorded_at(path: &Path, group: &str, topic: &str, partitions: i32, version: u64) -> BTreeMap<i32, i64> {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let table = deltalake::open_table_with_version(url, version)
        .await
        .unwrap_or_else(|e| panic!("open version {version}: {e}"));
    let snapshot = table.snapshot().expect("snapshot");
    let mut recorded = BTreeMap::new();
    for partition in 0..partitions {
        let app = format!("position-sink/{group}/{topic}/{partition}");
        if let Some(last) = snapshot.transaction_version(table.log_store().as_ref(), app).await.expect("txn") {
            recorded.insert(partition, last);
        }
    }
    recorded
}

/// The model of the table at the recorded offsets: the produced messages at or below
/// each partition's.
pub fn model_at(produced: &[Produced], recorded: &BTreeMap<i32, i64>) -> BTreeMap<(String, i64), Row> {
    let applied: Vec<Produced> =
        produced.iter().filter(|m| recorded.get(&m.partition).is_some_and(|last| m.offset <= *last)).cloned().collect();
    model(&applied)
}

/// (conid, symbol, kafka_offset) per row of each of `versions`, as polars reads them
/// by time travel, in one Python process.
pub fn polars_rows(path: &Path, versions: &[u64]) -> BTreeMap<u64, Vec<(i64, String, i64)>> {
    let script = r#"
import json, sys
import polars as pl
path, versions = sys.argv[1], [int(v) for v in sys.argv[2].split(",")]
out = {}
for v in versions:
    frame = pl.read_delta(path, version=v).select("conid", "symbol", "kafka_offset").sort("conid")
    out[v] = frame.rows()
print(json.dumps(out))
"#;
    let list = versions.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let printed = run_python(&["-c".as_ref(), script.as_ref(), path.as_os_str(), list.as_ref()]);
    let read: BTreeMap<String, Vec<(i64, String, i64)>> = serde_json::from_str(&printed).expect("rows as JSON");
    read.into_iter().map(|(v, rows)| (v.parse().expect("version"), rows)).collect()
}

/// Checks every version inside the window against the model of `produced` at its
/// recorded offsets, with this program's reader and with polars; panics on the first
/// difference, naming the version.
pub async fn check_every_version(
    path: &Path,
    group: &str,
    topic: &str,
    partitions: i32,
    produced: &[Produced],
    retention: Duration,
) -> Checked {
    let versions = versions_in_window(path, retention);
    let by_polars = polars_rows(path, &versions);
    let mut checked = Checked::default();
    for &version in &versions {
        let recorded = recorded_at(path, group, topic, partitions, version).await;
        let expected = model_at(produced, &recorded);
        let actual = read_version(path, version).await;
        let context = format!("version {version} (records {recorded:?})");
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_table_matches(&actual, &expected)))
            .unwrap_or_else(|_| panic!("{context} differs from the model (this program's reader)"));
        let triples: Vec<(i64, String, i64)> = {
            let mut t: Vec<_> = expected.values().map(|r| (r.conid, r.symbol.clone(), r.kafka_offset)).collect();
            t.sort();
            t
        };
        assert_eq!(by_polars.get(&version), Some(&triples), "{context}: polars reads it differently");
        checked.with_rows += usize::from(!expected.is_empty());
        checked.versions.push(version);
    }
    eprintln!(
        "version-exact check: {} versions ({}..={}), {} with rows, equal to the model by both readers",
        checked.versions.len(),
        checked.versions.first().copied().unwrap_or(0),
        checked.versions.last().copied().unwrap_or(0),
        checked.with_rows
    );
    checked
}
