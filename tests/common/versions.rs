//! The version-exact check. A table's version `v` records, per Kafka partition, the
//! offset up to which its messages are applied (`txn`), so the table at `v` must equal
//! last-write-wins over exactly the produced messages at or below those offsets. Every
//! version a reader may open, from the one current when the file retention window
//! began (`delta.deletedFileRetentionDuration` ago) to the latest, is read by time
//! travel with this program's reader (DataFusion over delta-rs) and with polars, and
//! compared with the model at its offsets: missing, wrong, extra and duplicate keys.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{Produced, Row, assert_table_matches, model, run_python};

/// A table to check: a local path or an object-store URL, with its storage options.
#[derive(Debug, Clone)]
pub struct Target {
    pub uri: String,
    pub options: HashMap<String, String>,
}

impl Target {
    /// The table at a local path.
    pub fn local(path: &Path) -> Self {
        Self { uri: path.display().to_string(), options: HashMap::new() }
    }

    fn builder(&self) -> deltalake::DeltaTableBuilder {
        let url = deltalake::ensure_table_uri(&self.uri).expect("url");
        deltalake::DeltaTableBuilder::from_url(url).expect("builder").with_storage_options(self.options.clone())
    }

    /// The table as of `version`.
    pub async fn open_version(&self, version: u64) -> deltalake::DeltaTable {
        self.builder().with_version(version).load().await.unwrap_or_else(|e| panic!("open version {version}: {e}"))
    }
}

/// What one check read.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Versions compared with the model, by each reader.
    pub versions: Vec<u64>,
    /// Of them, versions holding at least one row.
    pub with_rows: usize,
}

/// Commit versions in the log, with their files' modification times (by the store's clock).
async fn commits(table: &Target) -> BTreeMap<u64, SystemTime> {
    use futures::StreamExt;
    let store = table.builder().build_storage().expect("storage").object_store(None);
    let listed: Vec<_> = store.list(Some(&deltalake::Path::from("_delta_log"))).collect().await;
    listed
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|meta| {
            let version = meta.location.filename()?.strip_suffix(".json")?.parse().ok()?;
            Some((version, SystemTime::from(meta.last_modified)))
        })
        .collect()
}

/// The versions a reader may open now: the one current `retention` ago (the newest
/// commit written by then) and every later one. Never empty for a table with a commit.
pub async fn versions_in_window(table: &Target, retention: Duration) -> Vec<u64> {
    let commits = commits(table).await;
    let cutoff = SystemTime::now() - retention;
    let oldest = commits.iter().filter(|(_, at)| **at <= cutoff).map(|(v, _)| *v).max();
    let oldest = oldest.or_else(|| commits.keys().next().copied()).expect("a commit");
    commits.keys().copied().filter(|v| *v >= oldest).collect()
}

/// The offsets version `version` records for `group`'s partitions of `topic` (the last
/// offset applied, per partition).
pub async fn recorded_at(
    table: &Target,
    group: &str,
    topic: &str,
    partitions: i32,
    version: u64,
) -> BTreeMap<i32, i64> {
    let opened = table.open_version(version).await;
    let snapshot = opened.snapshot().expect("snapshot");
    let mut recorded = BTreeMap::new();
    for partition in 0..partitions {
        let app = format!("position-sink/{group}/{topic}/{partition}");
        if let Some(last) = snapshot.transaction_version(opened.log_store().as_ref(), app).await.expect("txn") {
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

/// (conid, symbol, kafka_offset) of each row of `model`, in order: what the readers print.
pub fn triples(model: &BTreeMap<(String, i64), Row>) -> Vec<(i64, String, i64)> {
    let mut rows: Vec<_> = model.values().map(|r| (r.conid, r.symbol.clone(), r.kafka_offset)).collect();
    rows.sort();
    rows
}

/// (conid, symbol, kafka_offset) per row of each of `versions`, as polars reads them
/// by time travel, in one Python process.
pub fn polars_rows(path: &Path, versions: &[u64]) -> BTreeMap<u64, Vec<(i64, String, i64)>> {
    polars_rows_of(&Target::local(path), versions)
}

/// [`polars_rows`] of any table.
pub fn polars_rows_of(table: &Target, versions: &[u64]) -> BTreeMap<u64, Vec<(i64, String, i64)>> {
    let script = r#"
import json, sys
import polars as pl
path, versions, options = sys.argv[1], [int(v) for v in sys.argv[2].split(",")], json.loads(sys.argv[3])
out = {}
for v in versions:
    frame = pl.read_delta(path, version=v, storage_options=options or None).select("conid", "symbol", "kafka_offset").sort("conid")
    out[v] = frame.rows()
print(json.dumps(out))
"#;
    if versions.is_empty() {
        return BTreeMap::new();
    }
    let list = versions.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let options = serde_json::to_string(&table.options).expect("options as JSON");
    let printed = run_python(&["-c".as_ref(), script.as_ref(), table.uri.as_ref(), list.as_ref(), options.as_ref()]);
    let read: BTreeMap<String, Vec<(i64, String, i64)>> = serde_json::from_str(&printed).expect("rows as JSON");
    read.into_iter().map(|(v, rows)| (v.parse().expect("version"), rows)).collect()
}

/// Checks every version inside the window against the model of `produced` at its
/// recorded offsets, with this program's reader and with polars; panics on the first
/// difference, naming the version.
pub async fn check_every_version(
    table: &Target,
    group: &str,
    topic: &str,
    partitions: i32,
    produced: &[Produced],
    retention: Duration,
) -> Checked {
    let versions = versions_in_window(table, retention).await;
    check_versions(table, group, topic, partitions, produced, &versions).await
}

/// Checks `versions` against the model of `produced` at their recorded offsets, with
/// this program's reader and with polars; panics on the first difference, naming the
/// version. A version recording an offset past the last of `produced` in its partition
/// (messages not known yet) is left out.
pub async fn check_versions(
    table: &Target,
    group: &str,
    topic: &str,
    partitions: i32,
    produced: &[Produced],
    versions: &[u64],
) -> Checked {
    let mut known: BTreeMap<i32, i64> = BTreeMap::new();
    for message in produced {
        let last = known.entry(message.partition).or_insert(message.offset);
        *last = (*last).max(message.offset);
    }
    let mut recorded_by_version = BTreeMap::new();
    for &version in versions {
        let recorded = recorded_at(table, group, topic, partitions, version).await;
        if recorded.iter().all(|(p, last)| known.get(p).is_some_and(|k| last <= k)) {
            recorded_by_version.insert(version, recorded);
        }
    }
    let versions: Vec<u64> = recorded_by_version.keys().copied().collect();
    let by_polars = polars_rows_of(table, &versions);
    let mut checked = Checked::default();
    for (version, recorded) in recorded_by_version {
        let expected = model_at(produced, &recorded);
        let actual = super::read_rows(table.open_version(version).await).await;
        let context = format!("version {version} (records {recorded:?})");
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_table_matches(&actual, &expected)))
            .unwrap_or_else(|_| panic!("{context} differs from the model (this program's reader)"));
        assert_eq!(by_polars.get(&version), Some(&triples(&expected)), "{context}: polars reads it differently");
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

/// An independent reader of the latest version.
#[derive(Debug, Clone, Copy)]
pub enum Reader {
    /// polars' `read_delta`, which reads deletion vectors too.
    Polars,
    /// Python `deltalake`'s `to_pyarrow_table` (copy-on-write tables only).
    Deltalake,
}

/// A reader of the latest version, reading without pause in a Python process of its
/// own until stopped: every read must succeed and hold each key once.
pub struct LatestReader {
    child: Option<std::process::Child>,
    stop: std::path::PathBuf,
}

impl Drop for LatestReader {
    /// A reader left running (a test that failed first) is killed.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl LatestReader {
    /// Starts reading `table` with `reader`; `stop_file` is created to stop it.
    pub fn start(table: &Target, stop_file: &Path, reader: Reader) -> Self {
        let code = r#"
import json, os, sys, time, traceback
table, stop, options, reader = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) or None, sys.argv[4]
if reader == "polars":
    import polars as pl
    read = lambda: pl.read_delta(table, storage_options=options).get_column("conid").to_list()
else:
    from deltalake import DeltaTable
    read = lambda: DeltaTable(table, storage_options=options).to_pyarrow_table().column("conid").to_pylist()
reads = failures = 0
while not os.path.exists(stop):
    try:
        conids = read()
        assert len(conids) == len(set(conids)), "a key twice"
        reads += 1
    except Exception:
        failures += 1
        traceback.print_exc()
    time.sleep(0.05)
print(reads, failures)
"#;
        let stop = stop_file.to_path_buf();
        let options = serde_json::to_string(&table.options).expect("options as JSON");
        let child = std::process::Command::new(super::python())
            .args(["-c", code, &table.uri, &stop.display().to_string(), &options])
            .arg(match reader {
                Reader::Polars => "polars",
                Reader::Deltalake => "deltalake",
            })
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the reader");
        Self { child: Some(child), stop }
    }

    /// Stops it; returns its reads and failed reads.
    pub fn stop(mut self) -> (u64, u64) {
        std::fs::write(&self.stop, b"").expect("stop the reader");
        let output = self.child.take().expect("running").wait_with_output().expect("the reader");
        let said = String::from_utf8_lossy(&output.stdout);
        let counts: Vec<u64> = said.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert_eq!(counts.len(), 2, "the reader reports: {said}");
        (counts[0], counts[1])
    }
}

/// Compares `versions` of the table read by Apache Spark with Delta (time travel with
/// `versionAsOf`) with the model at their recorded offsets.
pub async fn check_with_spark(
    table: &Target,
    group: &str,
    topic: &str,
    partitions: i32,
    produced: &[Produced],
    versions: &[u64],
) {
    let targets: Vec<String> = versions.iter().map(|v| format!("{}@{v}", table.uri)).collect();
    let read = super::spark_rows(&targets.iter().map(Path::new).collect::<Vec<_>>());
    assert_eq!(read.len(), versions.len(), "Spark read every version");
    for (&version, rows) in versions.iter().zip(read) {
        let recorded = recorded_at(table, group, topic, partitions, version).await;
        let expected = triples(&model_at(produced, &recorded));
        assert_eq!(rows, expected, "version {version} (records {recorded:?}): Spark reads it differently");
    }
    eprintln!("version-exact check: Spark read versions {versions:?} equal to the model");
}
