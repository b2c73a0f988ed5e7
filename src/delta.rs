//! What the positions table and the dead-letter table share: opening or creating a
//! Delta table with a given Arrow schema, checking an existing table against it, and
//! reading the Kafka offsets the table records.
//!
//! Invariant kept here: a table's recorded offset for a partition is the `txn` version
//! under [`TopicPartition::app_id`]; it is written only in the same commit as the data
//! it covers, so "recorded" means "durable in this table".

use std::collections::{BTreeMap, BTreeSet, HashMap};

use deltalake::arrow::array::RecordBatch;
use deltalake::arrow::datatypes::{DataType as ArrowType, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{DataType, PrimitiveType, StructField, Transaction};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableError};

use crate::config::Settings;
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};

/// Failures of a Delta table, with its location.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The table could not be opened or created.
    #[error("cannot open or create the Delta table at {uri}: {source}")]
    Open {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// The table exists with columns or partitioning this program cannot write.
    #[error(
        "the Delta table at {uri} is not a {kind} table: {differences}. \
         Point {config_key} at a new location, or migrate the table"
    )]
    Incompatible {
        /// Table location.
        uri: String,
        /// What the table should hold (`positions`, `dead letters`).
        kind: &'static str,
        /// The configuration key naming the table.
        config_key: &'static str,
        /// What differs from the expected schema.
        differences: String,
    },
    /// Another writer restored the table to an earlier version while this worker ran:
    /// its records of `partitions` no longer match the content.
    #[error(
        "the Delta table at {uri} was restored to an earlier version (RESTORE at version {version}) while this \
         worker ran; it stops without writing over the restored version. Start it again: it resumes each \
         partition from what the restored table holds"
    )]
    Restored {
        /// Table location.
        uri: String,
        /// The RESTORE commit.
        version: i64,
    },
    /// Reading the table's state or recorded offsets failed.
    #[error("cannot read the state of the Delta table at {uri}: {source}")]
    Read {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// A write or its commit failed (conflict, storage error).
    #[error("writing {rows} rows to the Delta table at {uri} failed: {source}")]
    Write {
        /// Table location.
        uri: String,
        /// Rows in the failed write.
        rows: usize,
        /// Cause.
        source: Box<DeltaTableError>,
    },
}

impl TableError {
    /// A failed read of the table at `uri`, for `map_err`.
    pub fn on_read(uri: &str) -> impl Fn(DeltaTableError) -> TableError + use<> {
        let uri = uri.to_string();
        move |source| TableError::Read { uri: uri.clone(), source: Box::new(source) }
    }

    /// A failed write of `rows` rows to the table at `uri`, for `map_err`.
    pub fn on_write(uri: &str, rows: usize) -> impl Fn(DeltaTableError) -> TableError + use<> {
        let uri = uri.to_string();
        move |source| TableError::Write { uri: uri.clone(), rows, source: Box::new(source) }
    }

    /// Whether trying again can help: storage and commit-conflict failures can, a
    /// schema mismatch cannot.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TableError::Incompatible { .. } | TableError::Restored { .. })
    }

    /// Whether another writer committed first (the retry re-reads the table).
    pub fn is_conflict(&self) -> bool {
        use deltalake::kernel::transaction::TransactionError;
        let (TableError::Open { source, .. } | TableError::Read { source, .. } | TableError::Write { source, .. }) =
            self
        else {
            return false;
        };
        matches!(
            **source,
            DeltaTableError::VersionAlreadyExists(_)
                | DeltaTableError::Transaction { source: TransactionError::CommitConflict(_) }
                | DeltaTableError::Transaction { source: TransactionError::MaxCommitAttempts(_) }
        )
    }
}

/// What a table is, for creating it and checking an existing one.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// A short name of the contents, used in errors (`positions`, `dead letters`).
    pub kind: &'static str,
    /// The configuration key that names the table's location.
    pub config_key: &'static str,
    /// The Delta table name stored in its metadata.
    pub name: &'static str,
    /// The table comment.
    pub comment: &'static str,
    /// The columns.
    pub schema: SchemaRef,
    /// Partition columns.
    pub partition_columns: &'static [&'static str],
    /// The configuration key that chooses the partitioning, if one does.
    pub layout_key: Option<&'static str>,
}

/// Opens the table at `uri`, creating it from `spec` with the table `properties` if
/// missing, and checks that an existing table can hold `spec`'s rows. An existing
/// table keeps its own properties.
///
/// # Errors
/// [`TableError::Open`] when storage fails, [`TableError::Incompatible`] when the table
/// exists with other columns or partitioning.
pub async fn open_or_create(
    uri: &str,
    storage_options: &Settings,
    spec: &TableSpec,
    properties: &Settings,
) -> Result<DeltaTable, TableError> {
    let open_err = |source| TableError::Open { uri: uri.to_string(), source: Box::new(source) };
    let url = deltalake::ensure_table_uri(uri).map_err(open_err)?;
    let options: HashMap<String, String> = storage_options.0.clone().into_iter().collect();
    let mut table =
        DeltaTable::try_from_url_with_storage_options(url.clone(), options.clone()).await.map_err(open_err)?;
    if table.version().is_none() {
        let created = table
            .create()
            .with_columns(delta_columns(&spec.schema))
            .with_partition_columns(spec.partition_columns.iter().copied())
            .with_table_name(spec.name)
            .with_comment(spec.comment)
            .with_configuration(properties.0.iter().map(|(k, v)| (k.clone(), Some(v.clone()))))
            .await;
        table = match created {
            Ok(t) => t,
            // Another worker created it first: use theirs.
            Err(_) => DeltaTable::try_from_url_with_storage_options(url, options).await.map_err(open_err)?,
        };
    }
    check_schema(&table, uri, spec)?;
    Ok(table)
}

fn check_schema(table: &DeltaTable, uri: &str, spec: &TableSpec) -> Result<(), TableError> {
    let incompatible = |differences| TableError::Incompatible {
        uri: uri.to_string(),
        kind: spec.kind,
        config_key: spec.config_key,
        differences,
    };
    let snapshot = table.snapshot().map_err(|e| incompatible(format!("no snapshot ({e})")))?;
    let actual = snapshot.schema();
    let mut differences = Vec::new();
    for expected in delta_columns(&spec.schema) {
        match actual.field(expected.name()) {
            None => differences.push(format!("column `{}` is missing", expected.name())),
            Some(found) if found.data_type() != expected.data_type() => differences.push(format!(
                "column `{}` is {:?}, expected {:?}",
                expected.name(),
                found.data_type(),
                expected.data_type()
            )),
            Some(found) if found.is_nullable() && !expected.is_nullable() => {
                differences.push(format!("column `{}` is nullable, expected NOT NULL", expected.name()))
            }
            Some(_) => {}
        }
    }
    for extra in actual.fields() {
        if !extra.is_nullable() && spec.schema.field_with_name(extra.name()).is_err() {
            differences.push(format!("extra column `{}` is NOT NULL, so rows cannot be inserted", extra.name()));
        }
    }
    let partitioning = snapshot.metadata().partition_columns();
    if partitioning.iter().map(String::as_str).ne(spec.partition_columns.iter().copied()) {
        let fix = spec.layout_key.map(|key| format!(" (set {key} to the table's layout)")).unwrap_or_default();
        differences.push(format!("it is partitioned by {partitioning:?}, expected {:?}{fix}", spec.partition_columns));
    }
    if differences.is_empty() { Ok(()) } else { Err(incompatible(differences.join("; "))) }
}

/// A handle at the latest version of `table`.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn refreshed(table: &DeltaTable, uri: &str) -> Result<DeltaTable, TableError> {
    let mut fresh = table.clone();
    fresh.update_state().await.map_err(TableError::on_read(uri))?;
    Ok(fresh)
}

/// The last offset `table` records for each of `partitions` written by `group_id`
/// (absent: none yet), as of the version the handle last saw.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn recorded_offsets(
    table: &DeltaTable,
    uri: &str,
    group_id: &str,
    partitions: impl IntoIterator<Item = &TopicPartition>,
) -> Result<HashMap<TopicPartition, Offset>, TableError> {
    let read_err = TableError::on_read(uri);
    let snapshot = table.snapshot().map_err(&read_err)?;
    let log_store = table.log_store();
    let mut recorded = HashMap::new();
    for tp in partitions {
        if let Some(version) =
            snapshot.transaction_version(log_store.as_ref(), tp.app_id(group_id)).await.map_err(&read_err)?
        {
            recorded.insert(tp.clone(), Offset(version));
        }
    }
    Ok(recorded)
}

/// An append to a table that holds each Kafka message at most once (the dead-letter
/// and history tables): who appends, and how long the append may take.
#[derive(Debug, Clone, Copy)]
pub struct OnceAppend<'a> {
    /// The table location.
    pub uri: &'a str,
    /// The consumer group whose offsets the table records.
    pub group_id: &'a str,
    /// The longest the append may take from its first data file to its commit.
    pub deadline: std::time::Duration,
}

impl OnceAppend<'_> {
    /// Appends the records of `items` (at Kafka coordinates `at`) that `table` does not
    /// hold yet, in one commit that also records, per partition appended to, the
    /// highest of `covered` and the records' offsets: a retry after an error or a crash
    /// (whether or not its commit landed) drops what is already in. Returns the handle
    /// at the version written and the records appended (none: no commit was made).
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`], both retryable.
    pub async fn append<'i, T>(
        &self,
        table: &DeltaTable,
        items: &'i [T],
        at: impl Fn(&T) -> &Coordinates,
        covered: &OffsetMap,
        to_batch: impl FnOnce(&[&'i T]) -> Result<RecordBatch, ArrowError>,
    ) -> Result<(DeltaTable, Vec<&'i T>), TableError> {
        let fresh = refreshed(table, self.uri).await?;
        let partitions: BTreeSet<&TopicPartition> = items.iter().map(|i| &at(i).tp).collect();
        let recorded = recorded_offsets(&fresh, self.uri, self.group_id, partitions).await?;
        let new: Vec<&T> =
            items.iter().filter(|i| recorded.get(&at(i).tp).is_none_or(|done| at(i).offset > *done)).collect();
        if new.is_empty() {
            return Ok((fresh, new));
        }
        let mut through: BTreeMap<&TopicPartition, Offset> = BTreeMap::new();
        for item in &new {
            let Coordinates { tp, offset } = at(item);
            let highest = through.entry(tp).or_insert_with(|| covered.get(tp).unwrap_or(*offset));
            *highest = (*highest).max(*offset);
        }
        let transactions: Vec<Transaction> =
            through.iter().map(|(tp, offset)| Transaction::new(tp.app_id(self.group_id), offset.0)).collect();
        let write_err = TableError::on_write(self.uri, new.len());
        let batch = to_batch(&new)
            .map_err(|e| write_err(DeltaTableError::Generic(format!("building the Arrow batch: {e}"))))?;
        let append = fresh.clone().write([batch]).with_save_mode(SaveMode::Append).with_commit_properties(
            CommitProperties::default()
                .with_application_transactions(transactions)
                // It adds files and reads none: binning (maintenance) never conflicts with it.
                .with_metadata([("isBlindAppend".to_string(), serde_json::json!(true))])
                // Log cleanup is maintenance's (one worker, on a schedule), not every commit's.
                .with_cleanup_expired_logs(Some(false)),
        );
        // Vacuum takes files no commit names once maintenance.unreferenced_file_age old:
        // an append that takes longer than its deadline is given up (its outcome is then
        // decided by the recorded offsets) and made again.
        let table = tokio::time::timeout(self.deadline, append)
            .await
            .map_err(|_| {
                write_err(DeltaTableError::Generic(format!(
                    "the append took longer than the {} a write may take (a third of \
                     maintenance.unreferenced_file_age); it is made again",
                    humantime::format_duration(self.deadline)
                )))
            })?
            .map_err(&write_err)?;
        Ok((table, new))
    }
}

/// The Delta columns of an Arrow schema.
fn delta_columns(schema: &SchemaRef) -> Vec<StructField> {
    schema
        .fields()
        .iter()
        .map(|f| {
            let primitive = match f.data_type() {
                ArrowType::Int64 => PrimitiveType::Long,
                ArrowType::Int32 => PrimitiveType::Integer,
                ArrowType::Float64 => PrimitiveType::Double,
                ArrowType::Utf8 => PrimitiveType::String,
                ArrowType::Binary => PrimitiveType::Binary,
                ArrowType::Timestamp(TimeUnit::Microsecond, Some(_)) => PrimitiveType::Timestamp,
                ArrowType::Date32 => PrimitiveType::Date,
                other => unreachable!("no table of this program has a column of type {other}"),
            };
            StructField::new(f.name().clone(), DataType::Primitive(primitive), f.is_nullable())
        })
        .collect()
}

/// Where a RESTORE commit took the table back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RestoredTo {
    /// The content of this version.
    Version(i64),
    /// The content of the last version committed at or before this time (ms since the epoch).
    Time(i64),
}

impl RestoredTo {
    /// Whether the commit at `version`, made at `timestamp`, was undone by this restore.
    fn undoes(self, version: i64, timestamp: Option<i64>) -> bool {
        match self {
            RestoredTo::Version(target) => version > target,
            RestoredTo::Time(time) => timestamp.is_none_or(|t| t > time),
        }
    }
}

/// What one commit file says about offsets: its `txn` versions and, for a RESTORE,
/// where it went back to.
#[derive(Debug, Default)]
struct CommitRecord {
    transactions: Vec<(String, i64)>,
    timestamp: Option<i64>,
    restored_to: Option<RestoredTo>,
    /// The flush's `ingested_at` stamp ([`INGESTED_AT_KEY`]), µs.
    ingested_at: Option<i64>,
}

impl CommitRecord {
    fn parse(commit: &[u8]) -> Self {
        let mut record = CommitRecord::default();
        for line in commit.split(|b| *b == b'\n') {
            // Only these two actions matter; the (many) add and remove lines are not parsed.
            let (is_txn, is_info) = (line.starts_with(b"{\"txn\""), line.starts_with(b"{\"commitInfo\""));
            if !is_txn && !is_info {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            if let Some(txn) = value.get("txn") {
                if let (Some(app_id), Some(version)) = (txn["appId"].as_str(), txn["version"].as_i64()) {
                    record.transactions.push((app_id.to_string(), version));
                }
            } else if let Some(info) = value.get("commitInfo") {
                record.timestamp = info["timestamp"].as_i64();
                record.ingested_at = info[INGESTED_AT_KEY].as_i64();
                if info["operation"].as_str() == Some("RESTORE") {
                    let parameter = |name: &str| {
                        let value = &info["operationParameters"][name];
                        value.as_i64().or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                    };
                    record.restored_to = parameter("version")
                        .map(RestoredTo::Version)
                        .or_else(|| parameter("datetime").map(RestoredTo::Time));
                }
            }
        }
        record
    }
}

/// The `commitInfo` key of a positions-table flush's `ingested_at` stamp (µs since the
/// epoch): the history table stamps the updates a commit first recorded with it, also
/// when it appends them after a crash ([`record_stamps`]).
pub const INGESTED_AT_KEY: &str = "positionSinkIngestedAt";

/// One commit's record of a partition: the offset it recorded and its `ingested_at`
/// stamp (µs; the commit's time when it has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordStamp {
    /// The offset recorded.
    pub through: Offset,
    /// When the commit's rows were stamped, µs since the epoch.
    pub stamp_micros: Option<i64>,
}

/// For each partition of `lowest`, the commits that recorded it, oldest first, from the
/// last one that recorded less than its `lowest` offset (excluded) to the newest: the
/// stamp of an update is that of the first of them whose record reaches its offset.
/// The walk reads the log back from the handle's version and stops where the log was
/// cleaned up.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn record_stamps(
    table: &DeltaTable,
    uri: &str,
    group_id: &str,
    lowest: &HashMap<TopicPartition, Offset>,
) -> Result<HashMap<TopicPartition, Vec<RecordStamp>>, TableError> {
    let read_err = TableError::on_read(uri);
    let mut pending: HashMap<String, (&TopicPartition, Offset)> =
        lowest.iter().map(|(tp, offset)| (tp.app_id(group_id), (tp, *offset))).collect();
    let mut found: HashMap<TopicPartition, Vec<RecordStamp>> = HashMap::new();
    let mut version = table.version();
    while let Some(at) = version.filter(|_| !pending.is_empty()) {
        let Some(bytes) = table.log_store().read_commit_entry(at).await.map_err(&read_err)? else { break };
        let commit = CommitRecord::parse(&bytes);
        let stamp_micros = commit.ingested_at.or(commit.timestamp.and_then(|ms| ms.checked_mul(1000)));
        for (app_id, offset) in &commit.transactions {
            let Some((tp, lowest)) = pending.get(app_id).copied() else { continue };
            if Offset(*offset) < lowest {
                pending.remove(app_id);
            } else {
                found.entry(tp.clone()).or_default().push(RecordStamp { through: Offset(*offset), stamp_micros });
            }
        }
        version = at.checked_sub(1);
    }
    for stamps in found.values_mut() {
        stamps.reverse();
    }
    Ok(found)
}

/// The stamp of the update at `offset`: that of the oldest of `stamps` (oldest first,
/// from [`record_stamps`]) whose record reaches it.
pub fn stamp_of(stamps: &[RecordStamp], offset: Offset) -> Option<i64> {
    stamps.iter().find(|s| s.through >= offset).and_then(|s| s.stamp_micros)
}

/// The newest RESTORE among the commits after `since` up to `table`'s version.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn restore_since(table: &DeltaTable, uri: &str, since: u64) -> Result<Option<i64>, TableError> {
    let read_err = TableError::on_read(uri);
    let latest = table.version().unwrap_or(0);
    for version in (since + 1..=latest).rev() {
        let Some(bytes) = table.log_store().read_commit_entry(version).await.map_err(&read_err)? else { break };
        if CommitRecord::parse(&bytes).restored_to.is_some() {
            return Ok(Some(i64::try_from(version).unwrap_or(i64::MAX)));
        }
    }
    Ok(None)
}

/// The records of `partitions` that a RESTORE undid, each with the record the restored
/// content goes with (`None`: no record then).
///
/// A RESTORE brings back an earlier version's files but keeps the latest `txn`
/// versions, so afterwards the table claims offsets whose rows it no longer holds. This
/// walks the log back from the latest version until it has found the commit that wrote
/// each partition's record; on the way, a RESTORE sends the walk to the version it
/// restored, and a record found below it is the one the content goes with. Partitions
/// whose record is the same either way are left out.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn records_undone_by_restore(
    table: &DeltaTable,
    uri: &str,
    group_id: &str,
    partitions: impl IntoIterator<Item = &TopicPartition>,
) -> Result<HashMap<TopicPartition, Option<Offset>>, TableError> {
    let read_err = TableError::on_read(uri);
    let mut pending: HashMap<String, TopicPartition> =
        partitions.into_iter().map(|tp| (tp.app_id(group_id), tp.clone())).collect();
    let current = recorded_offsets(table, uri, group_id, pending.values()).await?;
    let log_store = table.log_store();
    let mut below_restore: HashMap<TopicPartition, Option<Offset>> = HashMap::new();
    let mut undoing: Option<RestoredTo> = None;
    let mut restored = false;
    let mut version = table.version().map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
    while !pending.is_empty() && version >= 0 {
        // Logs cleaned up past this point: older restores are no longer known.
        let Some(bytes) = log_store.read_commit_entry(version.unsigned_abs()).await.map_err(&read_err)? else { break };
        let commit = CommitRecord::parse(&bytes);
        if undoing.is_some_and(|restore| restore.undoes(version, commit.timestamp)) {
            version -= 1;
            continue;
        }
        undoing = None;
        for (app_id, offset) in &commit.transactions {
            if let Some(tp) = pending.remove(app_id)
                && restored
            {
                below_restore.insert(tp, Some(Offset(*offset)));
            }
        }
        if let Some(target) = commit.restored_to {
            undoing = Some(target);
            restored = true;
            if let RestoredTo::Version(target) = target
                && target < version
            {
                version = target;
                continue;
            }
        }
        version -= 1;
    }
    if restored && version < 0 {
        below_restore.extend(pending.into_values().map(|tp| (tp, None)));
    }
    below_restore.retain(|tp, record| current.get(tp).copied() != *record);
    Ok(below_restore)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_tells_its_records_and_where_a_restore_went() {
        let merge = br#"{"add":{"path":"a.parquet"}}
{"txn":{"appId":"position-sink/g/t/0","version":41}}
{"commitInfo":{"timestamp":1000,"operation":"MERGE"}}"#;
        let parsed = CommitRecord::parse(merge);
        assert_eq!(parsed.transactions, [("position-sink/g/t/0".to_string(), 41)]);
        assert_eq!((parsed.timestamp, parsed.restored_to), (Some(1000), None));
        // delta-rs writes the parameters as strings, Spark as numbers.
        let by_version =
            br#"{"commitInfo":{"timestamp":2000,"operation":"RESTORE","operationParameters":{"version":"3"}}}"#;
        assert_eq!(CommitRecord::parse(by_version).restored_to, Some(RestoredTo::Version(3)));
        let spark = br#"{"commitInfo":{"operation":"RESTORE","operationParameters":{"version":3,"timestamp":null}}}"#;
        assert_eq!(CommitRecord::parse(spark).restored_to, Some(RestoredTo::Version(3)));
        let by_time = br#"{"commitInfo":{"operation":"RESTORE","operationParameters":{"datetime":"1500"}}}"#;
        let to = CommitRecord::parse(by_time).restored_to.unwrap();
        assert!(to.undoes(9, Some(1501)) && !to.undoes(9, Some(1500)));
    }
}
