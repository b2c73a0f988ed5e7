//! The positions table in Delta Lake: creation and schema checks, the offsets it has
//! recorded, and the idempotent last-write-wins merge of one batch, written as one
//! commit (docs/write-path.md).
//!
//! Invariants kept here:
//! - One flush is one Delta commit: the removed and added data files and, in the same
//!   commit, one `txn` action per partition recording the last offset the batch covers,
//!   whatever the number of symbols.
//! - Rows at or below a partition's recorded offset are never written again, and a
//!   partition's recorded offset never moves backwards (delta-rs refuses a commit whose
//!   `txn` app ids were changed by a concurrent winner, and the retry re-reads them).
//! - A stored row is replaced only by a strictly newer update
//!   ([`crate::update::PositionUpdate::supersedes`]); a key has one row, whatever its
//!   symbol ([`crate::rewrite`]).
//! - A flush reads and rewrites only the files that hold its keys (found in the
//!   [`KeyIndex`]), and its commit declares as read only the files of its own Kafka
//!   partitions, so workers of one group commit side by side.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use deltalake::arrow::array::{AsArray, RecordBatch, RecordBatchReader};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::Int32Type;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Transaction};
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::{DeltaOperation, MergePredicate};
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError, ObjectStore};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use tokio::sync::Mutex;

use crate::arrow::{PARTITION_COLUMN, schema, to_record_batch};
use crate::batch::Batch;
use crate::config::{DeltaConfig, PartitionBy};
pub use crate::delta::TableError;
use crate::delta::{self, TableSpec};
use crate::key_index::{FileGroup, FileId, KeyIndex};
use crate::offsets::{Offset, TopicPartition};
use crate::rewrite::{self, NewFile, TouchedFile};
use crate::update::{KeyColumn, PositionUpdate, RowKey};

/// A Delta table version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableVersion(pub u64);

/// Which rows of a batch a write merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Those above their partition's recorded offset (the worker's flushes).
    AboveRecord,
    /// All of them (a replay).
    All,
}

/// What one [`PositionTable::write`] did.
#[derive(Debug, Clone)]
pub struct WriteReport {
    /// The table version after the write (unchanged when nothing was new).
    pub version: TableVersion,
    /// Rows offered to the merge (after dropping already-recorded offsets).
    pub rows_offered: usize,
    /// Rows inserted.
    pub inserted: usize,
    /// Rows updated.
    pub updated: usize,
    /// Rows older than (or the same as) the stored row, left as they were.
    pub unchanged: usize,
    /// Data files removed (rewritten).
    pub files_removed: usize,
    /// Data files added.
    pub files_added: usize,
    /// Rows in the data files added (the batch's winners and the rows rewritten with them).
    pub rows_rewritten: usize,
    /// Bytes of data files added.
    pub bytes_written: u64,
    /// Whether a commit was made.
    pub committed: bool,
    /// Time spent in the merge and commit.
    pub elapsed: std::time::Duration,
}

/// The positions table, opened for one consumer group.
#[derive(Debug, Clone)]
pub struct PositionTable {
    table: DeltaTable,
    uri: String,
    group_id: String,
    key_columns: Vec<KeyColumn>,
    layout: PartitionBy,
    max_rows_per_file: usize,
    index: Arc<Mutex<KeyIndex>>,
}

impl PositionTable {
    /// Opens the table at `config.table_uri`, creating it if missing, and checks its
    /// schema and layout.
    ///
    /// # Errors
    /// [`TableError::Open`] when storage fails, [`TableError::Incompatible`] when the
    /// table exists with other columns or partitioning.
    pub async fn open_or_create(config: &DeltaConfig, group_id: &str) -> Result<Self, TableError> {
        let table =
            delta::open_or_create(&config.table_uri, &config.storage_options, &spec(config.partition_by)).await?;
        Ok(Self {
            table,
            uri: config.table_uri.clone(),
            group_id: group_id.to_string(),
            key_columns: config.key_columns.clone(),
            layout: config.partition_by,
            max_rows_per_file: config.max_rows_per_file,
            index: Arc::default(),
        })
    }

    /// The table location as configured.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The version this handle last saw.
    pub fn version(&self) -> Option<TableVersion> {
        self.table.version().map(TableVersion)
    }

    /// A handle at the latest table version.
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn refreshed(&self) -> Result<PositionTable, TableError> {
        Ok(Self { table: delta::refreshed(&self.table, &self.uri).await?, ..self.clone() })
    }

    /// The last offset recorded in the table for each of `partitions` (absent: none yet),
    /// as of the version this handle last saw.
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn recorded_offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, Offset>, TableError> {
        delta::recorded_offsets(&self.table, &self.uri, &self.group_id, partitions).await
    }

    /// The records of `partitions` that a RESTORE undid, with the record the restored
    /// content goes with (see [`delta::records_undone_by_restore`]).
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn records_undone_by_restore(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, Option<Offset>>, TableError> {
        delta::records_undone_by_restore(&self.table, &self.uri, &self.group_id, partitions).await
    }

    /// Sets the recorded offsets of `records` back to what the table's content goes
    /// with, in one commit with no data (a record of `None` becomes -1: nothing read).
    /// Afterwards the table's record is true again for every reader of it. Returns the
    /// handle at the version written.
    ///
    /// # Errors
    /// [`TableError::Write`]: retryable (a concurrent commit to the same partitions
    /// conflicts).
    pub async fn reset_records(
        &self,
        records: &HashMap<TopicPartition, Option<Offset>>,
    ) -> Result<PositionTable, TableError> {
        let mut fresh = self.refreshed().await?;
        let write_err = |source| TableError::Write { uri: self.uri.clone(), rows: 0, source: Box::new(source) };
        let transactions = records
            .iter()
            .map(|(tp, record)| Transaction::new(tp.app_id(&self.group_id), record.map_or(-1, |o| o.0)))
            .collect();
        let properties = CommitProperties::default()
            .with_metadata([("positionSink".to_string(), serde_json::json!("records reset after a RESTORE"))])
            .with_application_transactions(transactions);
        let operation =
            DeltaOperation::Write { mode: deltalake::protocol::SaveMode::Append, partition_by: None, predicate: None };
        CommitBuilder::from(properties)
            .with_actions(Vec::new())
            .build(Some(fresh.table.snapshot().map_err(write_err)?), fresh.table.log_store(), operation)
            .await
            .map_err(write_err)?;
        fresh.table.update_state().await.map_err(write_err)?;
        Ok(fresh)
    }

    /// Writes `batch` in one commit on top of the latest version: rows above each
    /// partition's recorded offset are merged with the last-write-wins rule, and the
    /// batch's offsets are recorded. A batch the table already holds entirely is not
    /// committed again. Returns the handle at the version written.
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`]; both are retryable, and a retry
    /// re-reads the recorded offsets, so a write that did commit is not repeated.
    pub async fn write(&self, batch: &Batch) -> Result<(PositionTable, WriteReport), TableError> {
        let started = Instant::now();
        let mut fresh = self.refreshed().await?;
        fresh.refuse_undone_records(self.table.version(), batch).await?;
        let report = fresh.merge(batch, Rows::AboveRecord, started).await?;
        Ok((fresh, report))
    }

    /// Writes `batch` like [`PositionTable::write`], but merges every row, also those at
    /// or below the recorded offsets (a replay: last-write-wins leaves rows the table
    /// holds unchanged). Recorded offsets only move forward. No commit is made when
    /// nothing would change.
    ///
    /// # Errors
    /// As [`PositionTable::write`].
    pub async fn write_replayed(&self, batch: &Batch) -> Result<(PositionTable, WriteReport), TableError> {
        let started = Instant::now();
        let mut fresh = self.refreshed().await?;
        let report = fresh.merge(batch, Rows::All, started).await?;
        Ok((fresh, report))
    }

    /// Refuses to write over a RESTORE committed since `since` that undid the records
    /// of `batch`'s partitions: this batch was read past the restored content, and a
    /// commit on top would make the table's records claim the undone offsets for good.
    async fn refuse_undone_records(&self, since: Option<u64>, batch: &Batch) -> Result<(), TableError> {
        let Some(since) = since else { return Ok(()) };
        let Some(version) = delta::restore_since(&self.table, &self.uri, since).await? else { return Ok(()) };
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        if self.records_undone_by_restore(&partitions).await?.is_empty() {
            return Ok(());
        }
        Err(TableError::Restored { uri: self.uri.clone(), version })
    }

    async fn merge(&mut self, batch: &Batch, merged: Rows, started: Instant) -> Result<WriteReport, TableError> {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        let recorded = self.recorded_offsets(&partitions).await?;
        let is_new = |tp: &TopicPartition, offset: Offset| recorded.get(tp).is_none_or(|done| offset > *done);
        let transactions: Vec<Transaction> = batch
            .offsets
            .iter()
            .filter(|(tp, offset)| is_new(tp, *offset))
            .map(|(tp, offset)| Transaction::new(tp.app_id(&self.group_id), offset.0))
            .collect();
        let rows: Vec<&PositionUpdate> =
            batch.rows.iter().filter(|u| merged == Rows::All || is_new(&u.source.tp, u.source.offset)).collect();
        let mut report = WriteReport {
            version: self.version().unwrap_or(TableVersion(0)),
            rows_offered: rows.len(),
            inserted: 0,
            updated: 0,
            unchanged: 0,
            files_removed: 0,
            files_added: 0,
            rows_rewritten: 0,
            bytes_written: 0,
            committed: false,
            elapsed: started.elapsed(),
        };
        if transactions.is_empty() && rows.is_empty() {
            return Ok(report);
        }
        let write_err =
            |source| TableError::Write { uri: self.uri.clone(), rows: rows.len(), source: Box::new(source) };
        let arrow_err = |e: deltalake::arrow::error::ArrowError| write_err(DeltaTableError::from(e));

        let index = self.index.clone();
        let mut index = index.lock().await;
        self.sync_index(&mut index).await?;

        // The files that hold the batch's keys, and for each group that gains keys the
        // file that takes them in.
        let mut touched: BTreeSet<FileId> = BTreeSet::new();
        let mut gaining: BTreeSet<FileGroup> = BTreeSet::new();
        for row in &rows {
            let target = FileGroup::of(self.layout, &row.symbol, row.source.tp.clone());
            match index.file_of(&row.key(&self.key_columns)) {
                Some(id) if index.file(id).is_some_and(|f| f.group == target) => {
                    touched.insert(id);
                }
                Some(id) => {
                    touched.insert(id);
                    gaining.insert(target);
                }
                None => {
                    gaining.insert(target);
                }
            }
        }
        let duplicated: Vec<(RowKey, FileId)> = index.duplicates().map(|(k, id)| (k.clone(), id)).collect();
        for (key, id) in duplicated {
            touched.insert(id);
            touched.extend(index.file_of(&key));
        }
        let hosts: BTreeSet<FileId> =
            gaining.iter().filter_map(|g| index.smallest_in(g, self.max_rows_per_file)).collect();
        touched.extend(hosts.iter().copied());

        let files = self.read_touched(&index, &touched, &hosts).await?;
        let batch_rows =
            to_record_batch(rows.iter().copied(), chrono::Utc::now().timestamp_micros()).map_err(arrow_err)?;
        let plan = rewrite::plan(&files, &batch_rows, self.layout, &self.key_columns, self.max_rows_per_file)
            .map_err(arrow_err)?;
        drop(files);
        if transactions.is_empty() && plan.files.is_empty() && plan.rewritten.is_empty() {
            // A replay of rows the table holds: nothing to commit.
            report.unchanged = plan.unchanged;
            return Ok(report);
        }

        let adds = self.write_files(&plan.files).await?;
        let rows_rewritten = plan.files.iter().map(|f| f.rows.num_rows()).sum();
        let removed_paths: HashSet<&str> =
            plan.rewritten.iter().filter_map(|id| index.file(*id)).map(|f| f.path.as_str()).collect();
        let snapshot = self.table.snapshot().map_err(write_err)?;
        let removes: Vec<Action> = snapshot
            .log_data()
            .iter()
            .filter(|view| removed_paths.contains(view.path().as_ref()))
            .map(|view| Action::Remove(view.remove_action(true)))
            .collect();
        let mut actions = removes;
        actions.extend(adds.iter().cloned().map(Action::Add));
        let operation = self.operation(&partitions, &plan.rewritten, &index);
        let read_version = serde_json::json!(snapshot.version());
        let properties = CommitProperties::default()
            .with_metadata([("readVersion".to_string(), read_version)])
            .with_application_transactions(transactions);
        CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(write_err)?;

        for id in &plan.rewritten {
            index.remove_file(*id);
        }
        for (add, file) in adds.iter().zip(plan.files) {
            index.add_file(decoded_path(&add.path), file.group, file.keys);
        }
        self.table.update_state().await.map_err(write_err)?;
        report.version = self.version().unwrap_or(TableVersion(0));
        report.inserted = plan.inserted;
        report.updated = plan.updated;
        report.unchanged = plan.unchanged;
        report.files_removed = plan.rewritten.len();
        report.files_added = adds.len();
        if self.layout == PartitionBy::Symbol && adds.len() > MANY_FILES_PER_FLUSH {
            warn_many_symbols(adds.len());
        }
        report.rows_rewritten = rows_rewritten;
        report.bytes_written = adds.iter().map(|a| a.size.max(0) as u64).sum();
        report.committed = true;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Brings the key index to this handle's version: forgets removed files and reads
    /// the keys of files it has not seen (all of them the first time; afterwards only
    /// those other writers added).
    async fn sync_index(&self, index: &mut KeyIndex) -> Result<(), TableError> {
        let read_err = |source| TableError::Read { uri: self.uri.clone(), source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(read_err)?;
        let live: Vec<(String, Option<String>, u64)> = snapshot
            .log_data()
            .iter()
            .map(|view| {
                let symbol = view.partition_values_map().remove(PARTITION_COLUMN).flatten();
                (view.path().into_owned(), symbol, view.size().max(0) as u64)
            })
            .collect();
        let unknown: HashSet<String> = index.sync(live.iter().map(|(path, _, _)| path.as_str())).into_iter().collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let store = self.table.object_store();
        let mut key_names = vec!["conid", "kafka_topic", "kafka_partition"];
        key_names.extend(self.key_columns.iter().map(|k| k.name()).filter(|n| *n != "conid"));
        let reads: Vec<_> = live
            .into_iter()
            .filter(|(path, _, _)| unknown.contains(path))
            .map(|(path, symbol, _)| {
                let store = store.clone();
                let key_names = key_names.clone();
                async move {
                    let rows = read_file(store, &path, Some(&key_names)).await?;
                    Ok::<_, DeltaTableError>((path, symbol, rows))
                }
            })
            .collect();
        for (path, symbol, rows) in on_threads(reads).await.map_err(read_err)? {
            let (owner, keys) = file_keys(&rows, &self.key_columns).map_err(|e| read_err(e.into()))?;
            index.add_file(
                path,
                FileGroup { symbol: symbol.filter(|_| self.layout == PartitionBy::Symbol), owner },
                keys,
            );
        }
        Ok(())
    }

    /// Reads every row of the touched files.
    async fn read_touched(
        &self,
        index: &KeyIndex,
        touched: &BTreeSet<FileId>,
        hosts: &BTreeSet<FileId>,
    ) -> Result<Vec<TouchedFile>, TableError> {
        let read_err = |source| TableError::Read { uri: self.uri.clone(), source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(read_err)?;
        let by_path: HashMap<&str, (FileId, &FileGroup)> =
            touched.iter().filter_map(|id| index.file(*id).map(|f| (f.path.as_str(), (*id, &f.group)))).collect();
        let wanted: Vec<(FileId, FileGroup, String, Option<String>)> = snapshot
            .log_data()
            .iter()
            .filter_map(|view| {
                let (id, group) = *by_path.get(view.path().as_ref())?;
                let symbol = view.partition_values_map().remove(PARTITION_COLUMN).flatten();
                Some((id, group.clone(), view.path().into_owned(), symbol))
            })
            .collect();
        let store = self.table.object_store();
        let reads: Vec<_> = wanted
            .into_iter()
            .map(|(id, group, path, symbol)| {
                let store = store.clone();
                let hosts_new_keys = hosts.contains(&id);
                async move {
                    let rows = read_file(store, &path, None).await?;
                    let rows = rewrite::with_table_schema(&rows, symbol.as_deref())?;
                    Ok::<_, DeltaTableError>(TouchedFile { id, group, rows, hosts_new_keys })
                }
            })
            .collect();
        on_threads(reads).await.map_err(read_err)
    }

    /// Writes the planned files, one data file each.
    async fn write_files(&self, files: &[NewFile]) -> Result<Vec<Add>, TableError> {
        use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
        let rows = files.iter().map(|f| f.rows.num_rows()).sum();
        let write_err = |source| TableError::Write { uri: self.uri.clone(), rows, source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(write_err)?;
        let config = WriterConfig::new(
            schema(),
            self.layout.columns().iter().map(|c| c.to_string()).collect(),
            None,
            None,
            None,
            snapshot.table_config().num_indexed_cols(),
            None,
        );
        let store = self.table.object_store();
        let writes: Vec<_> = files
            .iter()
            .map(|file| {
                let mut writer = DeltaWriter::new(store.clone(), config.clone());
                let rows = file.rows.clone();
                async move {
                    writer.write(&rows).await?;
                    let adds = writer.close().await?;
                    match <[Add; 1]>::try_from(adds) {
                        Ok([add]) => Ok(add),
                        Err(adds) => Err(DeltaTableError::Generic(format!(
                            "expected one data file for one group, the writer made {}",
                            adds.len()
                        ))),
                    }
                }
            })
            .collect();
        on_threads(writes).await.map_err(write_err)
    }

    /// The commit's operation: a merge whose read set is the files of the partitions it
    /// writes (and of any file it rewrites), so delta-rs lets it through when another
    /// worker committed only other partitions' files in the meantime.
    fn operation(&self, partitions: &[TopicPartition], rewritten: &[FileId], index: &KeyIndex) -> DeltaOperation {
        let mut owners: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
        let rewritten_owners = rewritten.iter().filter_map(|id| index.file(*id)?.group.owner.as_ref());
        let mut whole_table = rewritten.iter().any(|id| index.file(*id).is_some_and(|f| f.group.owner.is_none()));
        for tp in partitions.iter().chain(rewritten_owners) {
            whole_table |= !is_plain_name(&tp.topic);
            owners.entry(tp.topic.as_str()).or_default().insert(tp.partition.0);
        }
        let predicate = (!whole_table && !owners.is_empty()).then(|| {
            owners
                .iter()
                .map(|(topic, ps)| {
                    let list: Vec<String> = ps.iter().map(i32::to_string).collect();
                    format!("(kafka_topic = '{topic}' AND kafka_partition IN ({}))", list.join(", "))
                })
                .collect::<Vec<_>>()
                .join(" OR ")
        });
        let keys: Vec<&str> = self.key_columns.iter().map(|k| k.name()).collect();
        DeltaOperation::Merge {
            predicate,
            merge_predicate: Some(
                keys.iter().map(|k| format!("target.{k} = source.{k}")).collect::<Vec<_>>().join(" AND "),
            ),
            matched_predicates: vec![MergePredicate {
                action_type: "update".into(),
                predicate: Some("source is newer (timestamp, kafka_offset, kafka_topic, kafka_partition)".into()),
            }],
            not_matched_predicates: vec![MergePredicate { action_type: "insert".into(), predicate: None }],
            not_matched_by_source_predicates: Vec::new(),
        }
    }
}

/// Files one flush may add in the `symbol` layout before the worker suggests `none`.
const MANY_FILES_PER_FLUSH: usize = 1000;

/// Says once per process that the table's layout makes flushes slow.
fn warn_many_symbols(files: usize) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            files,
            "a flush wrote a data file per symbol and Kafka partition; with thousands of symbols, a table \
             created with delta.partition_by = \"none\" is several times faster (docs/write-path.md)"
        );
    }
}

/// Runs `tasks` on the runtime's threads, a few at a time (parquet encoding and
/// decoding are CPU work), and returns their results in order.
async fn on_threads<T, F>(tasks: Vec<F>) -> Result<Vec<T>, DeltaTableError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DeltaTableError>> + Send + 'static,
{
    let width = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    futures::stream::iter(tasks)
        .map(tokio::spawn)
        .buffered(width)
        .map(|joined| joined.map_err(|e| DeltaTableError::Generic(format!("a data file task failed: {e}")))?)
        .try_collect()
        .await
}

/// Whether a topic name can be quoted in the conflict predicate as it is (Kafka allows
/// only ASCII letters, digits, `.`, `_` and `-`).
fn is_plain_name(topic: &str) -> bool {
    topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A data file's rows, or only the `columns` named.
async fn read_file(
    store: Arc<dyn ObjectStore>,
    path: &str,
    columns: Option<&[&str]>,
) -> Result<RecordBatch, DeltaTableError> {
    let location = deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path));
    let bytes = store.get(&location).await?.bytes().await?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    if let Some(columns) = columns {
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        builder = builder.with_projection(mask);
    }
    let reader = builder.build()?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(as_table_types(concat_batches(&schema, &batches)?)?)
}

/// `rows` with each column of the table's schema in the Arrow type this program
/// writes: files written by other engines (Spark, Python `deltalake`, polars) may hold
/// strings as views or large strings, and timestamps in other units.
fn as_table_types(rows: RecordBatch) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    use deltalake::arrow::datatypes::{Field, Schema};
    let table = schema();
    if rows
        .schema()
        .fields()
        .iter()
        .all(|f| table.field_with_name(f.name()).is_ok_and(|t| t.data_type() == f.data_type()))
    {
        return Ok(rows);
    }
    let mut fields = Vec::with_capacity(rows.num_columns());
    let mut columns = Vec::with_capacity(rows.num_columns());
    for (field, column) in rows.schema().fields().iter().zip(rows.columns()) {
        match table.field_with_name(field.name()) {
            Ok(wanted) if wanted.data_type() != field.data_type() => {
                columns.push(deltalake::arrow::compute::cast(column, wanted.data_type())?);
                fields.push(Field::new(field.name(), wanted.data_type().clone(), field.is_nullable()));
            }
            _ => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The keys of a file's rows, and the Kafka partition they all come from (if one).
fn file_keys(
    rows: &RecordBatch,
    key_columns: &[KeyColumn],
) -> Result<(Option<TopicPartition>, Vec<RowKey>), deltalake::arrow::error::ArrowError> {
    let topics = rewrite::column(rows, "kafka_topic")?.as_string::<i32>();
    let partitions = rewrite::column(rows, "kafka_partition")?.as_primitive::<Int32Type>();
    let mut owner = None;
    let mut mixed = false;
    for row in 0..rows.num_rows() {
        let this = (topics.value(row), partitions.value(row));
        match owner {
            None => owner = Some(this),
            Some(first) if first != this => mixed = true,
            Some(_) => {}
        }
    }
    let owner = owner.filter(|_| !mixed).map(|(topic, partition)| TopicPartition::new(topic, partition));
    Ok((owner, rewrite::keys_of(rows, key_columns)?))
}

/// A path as the Delta log's file list shows it (percent-decoded).
fn decoded_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()
}

/// The positions table in `layout`: the columns of [`crate::arrow::schema`].
pub fn spec(layout: PartitionBy) -> TableSpec {
    TableSpec {
        kind: "positions",
        config_key: "delta.table_uri",
        name: "positions",
        comment: "Latest position per instrument, written by position-sink",
        schema: schema(),
        partition_columns: layout.columns(),
        layout_key: Some("delta.partition_by"),
    }
}
