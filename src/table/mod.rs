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
//!   symbol ([`crate::table::merge`]).
//! - A flush reads and rewrites only the files that hold its keys (found in the
//!   [`KeyIndex`]), or in deletion-vector mode (`delta.write_mode`) writes only its
//!   batch and hides the rows it replaces ([`deletion`]); its commit declares as read
//!   only the files of its own Kafka partitions, so workers of one group commit side by
//!   side.

pub mod commit;
mod compact;
pub mod deletion;
mod files;
pub mod key_index;
mod key_store;
pub mod merge;
pub mod saved_index;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{DeletionVectorDescriptor, Transaction};
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{DeltaConfig, PartitionBy, WriteMode};
pub use crate::delta::TableError;
use crate::delta::{self, TableSpec};
pub use crate::maintenance::compaction::Thresholds;
use crate::offsets::{Offset, OffsetMap, TopicPartition};
use crate::table::commit::{Changes, CommitKind};
pub use crate::table::compact::CompactionReport;
use crate::table::key_index::{FileGroup, FileId, KeyIndex, LiveFile};
use crate::table::merge::TouchedFile;
use crate::table::schema::{PARTITION_COLUMN, partition_columns, schema, to_record_batch};
use crate::update::{KeyColumn, PositionUpdate};

/// A Delta table version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableVersion(pub u64);

/// What one write brings: one update per row key, and the highest offset read in each
/// Kafka partition (valid messages or not), which the commit records for them.
#[derive(Debug, Clone, Copy)]
pub struct WriteSet<'a> {
    /// One update per row key.
    pub rows: &'a [PositionUpdate],
    /// The highest offset each partition's messages reached.
    pub offsets: &'a OffsetMap,
    /// The `ingested_at` written into the rows (µs since the epoch): one stamp for
    /// every output of a flush, so the history and the positions table agree on it.
    pub ingested_at_micros: i64,
}

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
    /// Data files given a new deletion vector (deletion-vector mode).
    pub files_hidden_in: usize,
    /// Rows in the data files added (the batch's winners and the rows rewritten with them).
    pub rows_rewritten: usize,
    /// Of those, rows carried over from files a deletion-vector flush rewrote instead of
    /// giving them a vector (files in escaped partition directories).
    pub rows_carried: usize,
    /// Bytes of data files added.
    pub bytes_written: u64,
    /// Whether a commit was made.
    pub committed: bool,
    /// The offsets the table recorded for the batch's partitions before this write (a
    /// partition absent: none): a message above them was first recorded by this write.
    pub recorded_before: HashMap<TopicPartition, Offset>,
    /// Whether a group the write added files to now has more files to compact than
    /// [`Thresholds::max_files`]: compaction is due now.
    pub compaction_due: bool,
    /// Time spent in the merge and commit.
    pub elapsed: std::time::Duration,
    /// Live files whose keys the write read to bring its key index up to date: every
    /// file on a start without a usable saved index, the files added since it was saved
    /// with one, those other writers added afterwards.
    pub index_files_read: usize,
}

impl WriteReport {
    /// A write of `rows_offered` rows that changed nothing (yet) at `version`.
    pub(crate) fn nothing(version: Option<TableVersion>, rows_offered: usize, started: Instant) -> Self {
        Self {
            version: version.unwrap_or(TableVersion(0)),
            rows_offered,
            inserted: 0,
            updated: 0,
            unchanged: 0,
            files_removed: 0,
            files_added: 0,
            files_hidden_in: 0,
            rows_rewritten: 0,
            rows_carried: 0,
            bytes_written: 0,
            committed: false,
            recorded_before: HashMap::new(),
            compaction_due: false,
            elapsed: started.elapsed(),
            index_files_read: 0,
        }
    }
}

/// Files a start catches its saved key index up by, at most, before maintenance saves
/// it again: one round of reads ([`files::on_threads_io`] reads as many at once).
pub const CATCH_UP_FILES: usize = files::IO_READS_AT_ONCE;

/// Rows of those files, at most (their keys are read in about half a second).
pub const CATCH_UP_ROWS: usize = 1_000_000;

/// A key index saved beside the table ([`PositionTable::save_key_index`]).
#[derive(Debug, Clone, Copy)]
pub struct SavedIndex {
    /// The version whose live files it knows.
    pub version: u64,
    /// Keys it holds.
    pub keys: usize,
    /// The object's size.
    pub bytes: usize,
    /// How long saving took.
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
    write_mode: WriteMode,
    max_rows_per_file: usize,
    vector_min_rows: usize,
    write_deadline: std::time::Duration,
    compaction: Thresholds,
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
        let properties = creation_properties(config);
        let table =
            delta::open_or_create(&config.table_uri, &config.storage_options, &spec(config.partition_by), &properties)
                .await?;
        check_write_mode(&table, &config.table_uri, config.write_mode)?;
        if config.write_mode == WriteMode::DeletionVectors && config.partition_by == PartitionBy::Symbol {
            warn_vectors_per_symbol();
        }
        Ok(Self {
            table,
            uri: config.table_uri.clone(),
            group_id: group_id.to_string(),
            key_columns: config.key_columns.clone(),
            layout: config.partition_by,
            write_mode: config.write_mode,
            max_rows_per_file: config.max_rows_per_file,
            vector_min_rows: config.vector_min_rows,
            write_deadline: crate::config::MaintenanceConfig::default().write_deadline(),
            compaction: Thresholds::from(&crate::config::MaintenanceConfig::default()),
            index: Arc::default(),
        })
    }

    /// This handle with `deadline` as the longest a write may take from its first data
    /// file to the end of its commit ([`crate::config::MaintenanceConfig::write_deadline`]):
    /// past it, vacuum may have taken its files as never committed, so it does not
    /// commit them (the write fails, retryable, and writes them again).
    pub fn with_write_deadline(self, deadline: std::time::Duration) -> Self {
        Self { write_deadline: deadline, ..self }
    }

    /// This handle with `thresholds` deciding when a write reports compaction due
    /// ([`WriteReport::compaction_due`]).
    pub fn with_compaction(self, thresholds: Thresholds) -> Self {
        Self { compaction: thresholds, ..self }
    }

    /// The memory the key index's keys take, in bytes, and the keys it holds (the
    /// index is built by the first write).
    pub async fn key_index_footprint(&self) -> (usize, usize) {
        let index = self.index.lock().await;
        (index.key_bytes(), index.key_entries())
    }

    /// The table location as configured.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The Delta table handle, at the version this handle last saw.
    pub fn delta(&self) -> &DeltaTable {
        &self.table
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

    /// The commits that recorded each partition of `lowest`, from the first that reached
    /// its offset, with their `ingested_at` stamps ([`delta::record_stamps`]).
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn record_stamps(
        &self,
        lowest: &HashMap<TopicPartition, Offset>,
    ) -> Result<HashMap<TopicPartition, Vec<delta::RecordStamp>>, TableError> {
        delta::record_stamps(&self.table, &self.uri, &self.group_id, lowest).await
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
        let write_err = TableError::on_write(&self.uri, 0);
        let transactions = records
            .iter()
            .map(|(tp, record)| Transaction::new(tp.app_id(&self.group_id), record.map_or(-1, |o| o.0)))
            .collect();
        let properties = CommitProperties::default()
            .with_metadata([("positionSink".to_string(), serde_json::json!("records reset after a RESTORE"))])
            .with_application_transactions(transactions)
            .with_cleanup_expired_logs(Some(false));
        let operation =
            DeltaOperation::Write { mode: deltalake::protocol::SaveMode::Append, partition_by: None, predicate: None };
        CommitBuilder::from(properties)
            .with_actions(Vec::new())
            .build(Some(fresh.table.snapshot().map_err(&write_err)?), fresh.table.log_store(), operation)
            .await
            .map_err(&write_err)?;
        fresh.table.update_state().await.map_err(&write_err)?;
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
    pub async fn write<'a>(&self, batch: impl Into<WriteSet<'a>>) -> Result<(PositionTable, WriteReport), TableError> {
        let batch = batch.into();
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
    pub async fn write_replayed<'a>(
        &self,
        batch: impl Into<WriteSet<'a>>,
    ) -> Result<(PositionTable, WriteReport), TableError> {
        let batch = batch.into();
        let started = Instant::now();
        let mut fresh = self.refreshed().await?;
        let report = fresh.merge(batch, Rows::All, started).await?;
        Ok((fresh, report))
    }

    /// Refuses to write over a RESTORE committed since `since` that undid the records
    /// of `batch`'s partitions: this batch was read past the restored content, and a
    /// commit on top would make the table's records claim the undone offsets for good.
    async fn refuse_undone_records(&self, since: Option<u64>, batch: WriteSet<'_>) -> Result<(), TableError> {
        let Some(since) = since else { return Ok(()) };
        let Some(version) = delta::restore_since(&self.table, &self.uri, since).await? else { return Ok(()) };
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        if self.records_undone_by_restore(&partitions).await?.is_empty() {
            return Ok(());
        }
        Err(TableError::Restored { uri: self.uri.clone(), version })
    }

    /// Merges `batch` into the files that hold its keys, in one commit: what is new,
    /// the files it touches, their rows read, the plan, the files written, the commit,
    /// the index updated.
    async fn merge(&mut self, batch: WriteSet<'_>, merged: Rows, started: Instant) -> Result<WriteReport, TableError> {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        let (transactions, rows, recorded_before) = self.new_in(batch, merged, &partitions).await?;
        let mut report = WriteReport { recorded_before, ..WriteReport::nothing(self.version(), rows.len(), started) };
        if transactions.is_empty() && rows.is_empty() {
            return Ok(report);
        }
        let write_err = TableError::on_write(&self.uri, rows.len());
        let arrow_err = |e: deltalake::arrow::error::ArrowError| write_err(DeltaTableError::from(e));

        let index = self.index.clone();
        let mut index = index.lock().await;
        report.index_files_read = self.sync_index(&mut index).await?;
        if self.write_mode == WriteMode::DeletionVectors {
            return self
                .merge_hiding(&rows, batch.ingested_at_micros, transactions, &partitions, &mut index, report)
                .await;
        }
        let (touched, hosts) = index.files_for(&rows, self.layout, &self.key_columns, self.max_rows_per_file);
        let files = self.read_touched(&index, &touched, &hosts).await?;
        let batch_rows = to_record_batch(rows.iter().copied(), batch.ingested_at_micros).map_err(arrow_err)?;
        let plan = merge::plan(&files, &batch_rows, self.layout, &self.key_columns, self.max_rows_per_file)
            .map_err(arrow_err)?;
        drop(files);
        report.unchanged = plan.unchanged;
        if transactions.is_empty() && plan.files.is_empty() && plan.rewritten.is_empty() {
            // A replay of rows the table holds: nothing to commit.
            return Ok(report);
        }

        let writing = Instant::now();
        let adds = self.write_files(&plan.files).await?;
        let changes = Changes { removed: &plan.rewritten, added: &adds, writing, ..Changes::default() };
        self.commit(
            CommitKind::Flush { ingested_at_micros: batch.ingested_at_micros },
            &partitions,
            changes,
            transactions,
            &index,
        )
        .await
        .map_err(&write_err)?;
        let rows_rewritten = plan.files.iter().map(|f| f.rows.num_rows()).sum();
        for id in &plan.rewritten {
            index.remove_file(*id);
        }
        let grown = index_new_files(&mut index, &adds, plan.files).map_err(arrow_err)?;
        let compaction_due = self.crowded(&index, &grown);
        self.table.update_state().await.map_err(&write_err)?;
        if self.layout == PartitionBy::Symbol && adds.len() > MANY_FILES_PER_FLUSH {
            warn_many_symbols(adds.len());
        }
        if rows_rewritten > REWRITTEN_PER_ROW_IN * rows.len().max(1) && rows_rewritten >= MANY_ROWS_REWRITTEN {
            warn_rewrites(rows_rewritten, rows.len());
        }
        Ok(WriteReport {
            version: self.version().unwrap_or(TableVersion(0)),
            inserted: plan.inserted,
            updated: plan.updated,
            files_removed: plan.rewritten.len(),
            files_added: adds.len(),
            rows_rewritten,
            bytes_written: adds.iter().map(|a| a.size.max(0) as u64).sum(),
            committed: true,
            compaction_due,
            elapsed: started.elapsed(),
            ..report
        })
    }

    /// A flush in deletion-vector mode: the batch's winners written as new files of
    /// their groups, the stored rows they replace hidden by deletion vectors (in
    /// vector files of at most [`deletion::MAX_VECTOR_FILE_BYTES`] each), all in one commit. A file whose every row is hidden
    /// is removed instead.
    async fn merge_hiding(
        &mut self,
        rows: &[&PositionUpdate],
        ingested_at_micros: i64,
        transactions: Vec<Transaction>,
        partitions: &[TopicPartition],
        index: &mut KeyIndex,
        mut report: WriteReport,
    ) -> Result<WriteReport, TableError> {
        let started = Instant::now() - report.elapsed;
        let write_err = TableError::on_write(&self.uri, rows.len());
        let arrow_err = |e: deltalake::arrow::error::ArrowError| write_err(DeltaTableError::from(e));
        let mut plan = deletion::plan(rows, index, &self.key_columns);
        report.unchanged = plan.unchanged;
        if transactions.is_empty() && plan.winners.is_empty() && plan.hidden.is_empty() {
            return Ok(report);
        }
        let mut batch_rows = to_record_batch(plan.winners.iter().copied(), ingested_at_micros).map_err(arrow_err)?;
        // A file gets no vector, and is rewritten without the rows it replaces as
        // copy-on-write does, when it holds fewer than `delta.vector_min_rows` live rows
        // (rewriting it costs less than the vector every reader would load), or when it
        // lies in an escaped partition directory (a symbol with a space, a slash, ...):
        // polars ignores the vectors of such files and would read the rows they hide.
        let min_rows = self.vector_min_rows;
        let (rewrite, hidden): (BTreeMap<FileId, roaring::RoaringTreemap>, BTreeMap<_, _>) =
            std::mem::take(&mut plan.hidden)
                .into_iter()
                .partition(|(id, _)| index.file(*id).is_some_and(|f| f.live_rows() < min_rows || is_escaped(&f.path)));
        plan.hidden = hidden;
        let mut removed: Vec<FileId> = rewrite.keys().copied().collect();
        let mut rows_carried = 0;
        if !rewrite.is_empty() {
            let ids = rewrite.keys().copied().collect();
            let kept = self.read_touched_without(index, &ids, &BTreeSet::new(), &rewrite).await?;
            rows_carried = kept.iter().map(|file| file.rows.num_rows()).sum();
            let mut parts = vec![batch_rows];
            parts.extend(kept.into_iter().map(|file| file.rows));
            batch_rows = deltalake::arrow::compute::concat_batches(&schema(), &parts).map_err(arrow_err)?;
        }
        let laid_out =
            merge::plan(&[], &batch_rows, self.layout, &self.key_columns, self.max_rows_per_file).map_err(arrow_err)?;
        let writing = Instant::now();
        let adds = self.write_files(&laid_out.files).await?;

        let mut vectors = Vec::new();
        for (id, hidden) in plan.hidden {
            let Some(file) = index.file(id) else { continue };
            let all = &file.deleted | &hidden;
            if all.len() >= file.rows as u64 { removed.push(id) } else { vectors.push((id, all)) }
        }
        let mut vector_files = deletion::write_vectors(vectors).map_err(&write_err)?;
        let vector_bytes: u64 = vector_files.iter().map(|f| f.bytes.len() as u64).sum();
        let store = self.table.object_store();
        let puts = vector_files.iter_mut().map(|file| {
            let (store, bytes) = (Arc::clone(&store), std::mem::take(&mut file.bytes));
            let location = deltalake::Path::from(file.path.as_str());
            async move { object_store::ObjectStoreExt::put(&store, &location, bytes.into()).await }
        });
        futures::future::try_join_all(puts).await.map_err(|e| write_err(e.into()))?;
        let vectors: Vec<_> = vector_files.into_iter().flat_map(|f| f.vectors).collect();
        let revised: Vec<_> = vectors.iter().map(|(id, dv, _)| (*id, dv.clone())).collect();
        let changes = Changes { removed: &removed, revised: &revised, added: &adds, writing };
        self.commit(CommitKind::Flush { ingested_at_micros }, partitions, changes, transactions, index)
            .await
            .map_err(&write_err)?;

        for id in &removed {
            index.remove_file(*id);
        }
        let mut touched: BTreeSet<FileGroup> = BTreeSet::new();
        for (id, dv, all) in vectors {
            touched.extend(index.file(id).map(|f| f.group.clone()));
            index.hide_rows(id, deletion::unique_id(&dv), &all);
        }
        let rows_written = laid_out.files.iter().map(|f| f.rows.num_rows()).sum();
        touched.extend(index_new_files(index, &adds, laid_out.files).map_err(arrow_err)?);
        let compaction_due = self.crowded(index, &touched);
        self.table.update_state().await.map_err(&write_err)?;
        Ok(WriteReport {
            version: self.version().unwrap_or(TableVersion(0)),
            inserted: plan.inserted,
            updated: plan.updated,
            files_removed: removed.len(),
            files_added: adds.len(),
            files_hidden_in: revised.len(),
            rows_rewritten: rows_written,
            rows_carried,
            bytes_written: adds.iter().map(|a| a.size.max(0) as u64).sum::<u64>() + vector_bytes,
            committed: true,
            compaction_due,
            elapsed: started.elapsed(),
            ..report
        })
    }

    /// What of `batch` is new to the table: a `txn` for each partition whose offset is
    /// past its recorded one, and the rows to merge (those past it, or all of them).
    async fn new_in<'b>(
        &self,
        batch: WriteSet<'b>,
        merged: Rows,
        partitions: &[TopicPartition],
    ) -> Result<(Vec<Transaction>, Vec<&'b PositionUpdate>, HashMap<TopicPartition, Offset>), TableError> {
        let recorded = self.recorded_offsets(partitions).await?;
        let is_new = |tp: &TopicPartition, offset: Offset| recorded.get(tp).is_none_or(|done| offset > *done);
        let transactions = batch
            .offsets
            .iter()
            .filter(|(tp, offset)| is_new(tp, *offset))
            .map(|(tp, offset)| Transaction::new(tp.app_id(&self.group_id), offset.0))
            .collect();
        let rows = batch.rows.iter().filter(|u| merged == Rows::All || is_new(&u.source.tp, u.source.offset)).collect();
        Ok((transactions, rows, recorded))
    }

    /// Whether a flush that touched `groups` makes compaction due now.
    fn crowded(&self, index: &KeyIndex, groups: &BTreeSet<FileGroup>) -> bool {
        index.crowded(groups, &self.compaction, self.max_rows_per_file)
    }

    /// Brings the key index to this handle's version: forgets removed files and reads
    /// the keys of files it has not seen (all of them the first time; afterwards only
    /// those other writers added).
    async fn sync_index(&self, index: &mut KeyIndex) -> Result<usize, TableError> {
        let read_err = TableError::on_read(&self.uri);
        let snapshot = self.table.snapshot().map_err(&read_err)?;
        let version = snapshot.version();
        let mut listed: Vec<(LiveFile, Option<String>, Option<DeletionVectorDescriptor>)> = Vec::new();
        let starting = index.version().is_none();
        // The log's row counts check a saved index: only needed when it is read.
        let mut records: HashMap<String, usize> = HashMap::new();
        for view in snapshot.log_data().iter() {
            let symbol = view.partition_values_map().remove(PARTITION_COLUMN).flatten();
            let dv = view.deletion_vector_descriptor();
            let file =
                LiveFile { path: view.path().into_owned(), deletion_vector: dv.as_ref().map(deletion::unique_id) };
            if let Some(n) = view.num_records().filter(|_| starting) {
                records.insert(file.path.clone(), n);
            }
            listed.push((file, symbol, dv));
        }
        if starting {
            *index = self.load_saved_index(version, &records).await;
        }
        let live: Vec<LiveFile> = listed.iter().map(|(file, _, _)| file.clone()).collect();
        let unknown: HashSet<String> = index.sync(&live).into_iter().map(|f| f.path).collect();
        if starting && index.version().is_some() {
            info!(files_to_read = unknown.len(), live_files = live.len(), "catching the saved key index up");
        }
        if unknown.is_empty() {
            index.brought_to(version);
            return Ok(0);
        }
        let store = self.table.object_store();
        let mut key_names = vec!["conid", "timestamp", "kafka_topic", "kafka_partition", "kafka_offset"];
        key_names.extend(self.key_columns.iter().map(|k| k.name()).filter(|n| *n != "conid"));
        let reads: Vec<_> = listed
            .into_iter()
            .filter(|(file, _, _)| unknown.contains(&file.path))
            .map(|(file, symbol, dv)| {
                let store = store.clone();
                let table = self.table.clone();
                let key_names = key_names.clone();
                async move {
                    let rows = files::read_file(store, &file.path, Some(&key_names)).await?;
                    let deleted = match dv {
                        Some(dv) => deletion::read_vector(&table, dv).await?,
                        None => roaring::RoaringTreemap::new(),
                    };
                    Ok::<_, DeltaTableError>((file, symbol, rows, deleted))
                }
            })
            .collect();
        let mut added = Vec::with_capacity(unknown.len());
        for (file, symbol, rows, deleted) in files::on_threads_io(reads).await.map_err(&read_err)? {
            let (owner, live) =
                files::file_rows(&rows, &self.key_columns, &deleted, index).map_err(|e| read_err(e.into()))?;
            let group = FileGroup { symbol: symbol.filter(|_| self.layout == PartitionBy::Symbol), owner };
            added.push((file, group, rows.num_rows(), deleted, live));
        }
        index.add_files(added);
        index.brought_to(version);
        Ok(unknown.len())
    }

    /// The table's saved key index ([`saved_index`]) if it is usable, its files' row
    /// counts matching the log's (`records`, by path); an empty index otherwise, for
    /// the caller to fill by reading every live file's keys.
    async fn load_saved_index(&self, version: u64, records: &HashMap<String, usize>) -> KeyIndex {
        let started = Instant::now();
        let loaded = match self.identity() {
            Some(identity) => saved_index::load(self.table.object_store(), identity, version).await,
            None => Err(saved_index::Unusable::Missing),
        };
        let loaded = loaded.and_then(|index| {
            let differing = index
                .files()
                .find(|(_, f)| records.get(&f.path).is_some_and(|n| *n != f.rows))
                .map(|(_, f)| f.path.clone());
            match differing {
                Some(path) => Err(saved_index::Unusable::Corrupt(format!(
                    "it counts other rows in {path} than the table's log does"
                ))),
                None => Ok(index),
            }
        });
        match loaded {
            Ok(index) => {
                info!(
                    table = %self.uri,
                    saved_at_version = index.version(),
                    keys = index.key_entries(),
                    duration_ms = started.elapsed().as_millis() as u64,
                    "read the saved key index"
                );
                index
            }
            Err(saved_index::Unusable::Missing) => KeyIndex::default(),
            Err(error) => {
                warn!(
                    table = %self.uri,
                    %error,
                    "not using the saved key index; reading the keys of every live file instead (the next \
                     maintenance run or shutdown saves it again)"
                );
                KeyIndex::default()
            }
        }
    }

    /// What a saved index must name to be this table's: its id, key columns and layout.
    fn identity(&self) -> Option<saved_index::Identity> {
        let snapshot = self.table.snapshot().ok()?;
        Some(saved_index::Identity {
            table_id: snapshot.metadata().id().to_string(),
            key_columns: self.key_columns.clone(),
            layout: self.layout,
        })
    }

    /// Saves the key index beside the table ([`saved_index`]), as far as this worker
    /// last brought it; nothing when it was never built (no flush yet).
    ///
    /// # Errors
    /// [`TableError::Write`] when the object cannot be written.
    pub async fn save_key_index(&self) -> Result<Option<SavedIndex>, TableError> {
        let started = Instant::now();
        let Some(identity) = self.identity() else { return Ok(None) };
        let parts = self.index.lock().await.export();
        let Some(parts) = parts else { return Ok(None) };
        let (version, keys) = (parts.version, parts.keys.len());
        let files: Vec<_> = parts.files.clone();
        let bytes = saved_index::save(self.table.object_store(), identity, parts)
            .await
            .map_err(|e| TableError::on_write(&self.uri, 0)(DeltaTableError::Generic(e)))?;
        self.index.lock().await.saved_with(&files);
        Ok(Some(SavedIndex { version, keys, bytes, elapsed: started.elapsed() }))
    }

    /// [`PositionTable::save_key_index`] when a start from the index saved last would
    /// read more than a round of files to catch up ([`CATCH_UP_FILES`] files or
    /// [`CATCH_UP_ROWS`] rows); nothing otherwise: reading them costs a start about
    /// what reading the index would, and saving costs time on every run.
    ///
    /// # Errors
    /// [`TableError::Write`] when the object cannot be written.
    pub async fn save_key_index_if_stale(&self) -> Result<Option<SavedIndex>, TableError> {
        let (files, rows) = self.index.lock().await.unsaved();
        if files <= CATCH_UP_FILES && rows <= CATCH_UP_ROWS {
            tracing::debug!(table = %self.uri, files, rows, "the saved key index is recent enough; not saved");
            return Ok(None);
        }
        self.save_key_index().await
    }

    /// Reads every row of the touched files.
    async fn read_touched(
        &self,
        index: &KeyIndex,
        touched: &BTreeSet<FileId>,
        hosts: &BTreeSet<FileId>,
    ) -> Result<Vec<TouchedFile>, TableError> {
        self.read_touched_without(index, touched, hosts, &BTreeMap::new()).await
    }

    /// [`PositionTable::read_touched`], leaving out also the rows `hiding` names (by
    /// their position in the file) besides those the files' vectors hide.
    async fn read_touched_without(
        &self,
        index: &KeyIndex,
        touched: &BTreeSet<FileId>,
        hosts: &BTreeSet<FileId>,
        hiding: &BTreeMap<FileId, roaring::RoaringTreemap>,
    ) -> Result<Vec<TouchedFile>, TableError> {
        let read_err = TableError::on_read(&self.uri);
        let snapshot = self.table.snapshot().map_err(&read_err)?;
        let by_path: HashMap<&str, (FileId, &key_index::IndexedFile)> =
            touched.iter().filter_map(|id| index.file(*id).map(|f| (f.path.as_str(), (*id, f)))).collect();
        let mut largest = 0u64;
        let wanted: Vec<(FileId, FileGroup, String, Option<String>, roaring::RoaringTreemap)> = snapshot
            .log_data()
            .iter()
            .filter_map(|view| {
                let (id, file) = *by_path.get(view.path().as_ref())?;
                largest = largest.max(view.size().max(0) as u64);
                let symbol = view.partition_values_map().remove(PARTITION_COLUMN).flatten();
                let deleted = hiding.get(&id).map_or_else(|| file.deleted.clone(), |more| &file.deleted | more);
                Some((id, file.group.clone(), view.path().into_owned(), symbol, deleted))
            })
            .collect();
        let store = self.table.object_store();
        let reads: Vec<_> = wanted
            .into_iter()
            .map(|(id, group, path, symbol, deleted)| {
                let store = store.clone();
                let hosts_new_keys = hosts.contains(&id);
                async move {
                    let rows = files::read_file(store, &path, None).await?;
                    let rows = files::without_hidden(rows, &deleted)?;
                    let rows = merge::with_table_schema(&rows, symbol.as_deref())?;
                    Ok::<_, DeltaTableError>(TouchedFile { id, group, rows, hosts_new_keys })
                }
            })
            .collect();
        files::on_threads_sized(reads, largest).await.map_err(&read_err)
    }
}

/// Whether a data file lies in a partition directory whose name is escaped (its
/// percent-decoded path still holds a `%`: the partition value had a character a
/// directory name cannot hold as it is).
fn is_escaped(path: &str) -> bool {
    path.contains('%')
}

/// Records the files a commit added in `index` (their rows, keys and precedence);
/// returns their groups.
fn index_new_files(
    index: &mut KeyIndex,
    adds: &[deltalake::kernel::Add],
    written: Vec<merge::NewFile>,
) -> Result<BTreeSet<FileGroup>, deltalake::arrow::error::ArrowError> {
    let groups = written.iter().map(|file| file.group.clone()).collect();
    let nothing_hidden = roaring::RoaringTreemap::new();
    let mut added = Vec::with_capacity(adds.len());
    for (add, file) in adds.iter().zip(written) {
        let rows = file.rows.num_rows();
        let live = files::rows_with_keys(&file.rows, file.keys, &nothing_hidden, index)?;
        let path = LiveFile { path: files::decoded_path(&add.path), deletion_vector: None };
        added.push((path, file.group, rows, roaring::RoaringTreemap::new(), live));
    }
    index.add_files(added);
    Ok(groups)
}

/// Refuses a table whose write mode is not `configured`: a table is in deletion-vector
/// mode when its `delta.enableDeletionVectors` property is true.
fn check_write_mode(table: &DeltaTable, uri: &str, configured: WriteMode) -> Result<(), TableError> {
    let found = table_write_mode(table);
    if found == configured {
        return Ok(());
    }
    let spelled = |mode: WriteMode| crate::config::spelled(&mode);
    Err(TableError::Incompatible {
        uri: uri.to_string(),
        kind: "positions",
        config_key: "delta.table_uri",
        differences: format!(
            "it was created with delta.write_mode = \"{}\" (delta.enableDeletionVectors = {}), the worker is \
             configured with \"{}\" (set delta.write_mode to the table's mode, or use a new delta.table_uri)",
            spelled(found),
            found == WriteMode::DeletionVectors,
            spelled(configured)
        ),
    })
}

/// The write mode of `table`, from its `delta.enableDeletionVectors` property.
pub fn table_write_mode(table: &DeltaTable) -> WriteMode {
    let enabled = table
        .snapshot()
        .ok()
        .and_then(|s| s.metadata().configuration().get("delta.enableDeletionVectors").cloned())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    if enabled { WriteMode::DeletionVectors } else { WriteMode::CopyOnWrite }
}

/// Files one flush may add in the `symbol` layout before the worker suggests `none`.
const MANY_FILES_PER_FLUSH: usize = 1000;

/// Whether `flag` is seen for the first time in this process (each warning is said once).
fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, std::sync::atomic::Ordering::Relaxed)
}

/// Rows a copy-on-write flush may rewrite per row it brings, and in all, before the
/// worker suggests deletion vectors.
const REWRITTEN_PER_ROW_IN: usize = 20;
const MANY_ROWS_REWRITTEN: usize = 100_000;

/// Says once per process that copy-on-write makes flushes cost the table, not the batch.
fn warn_rewrites(rewritten: usize, rows_in: usize) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if first_time(&WARNED) {
        tracing::warn!(
            rows_rewritten = rewritten,
            rows_in,
            "a flush rewrote {} rows per row it brought (copy-on-write rewrites every file holding a changed key); \
             a table created with delta.write_mode = \"deletion_vectors\" writes only the batch, if its readers \
             read deletion vectors (docs/write-path.md)",
            rewritten / rows_in.max(1)
        );
    }
}

/// Says once per process that deletion vectors in the `symbol` layout give a vector to a
/// file per symbol a flush touches, which readers pay for.
fn warn_vectors_per_symbol() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if first_time(&WARNED) {
        tracing::warn!(
            "delta.write_mode = \"deletion_vectors\" with delta.partition_by = \"symbol\": each flush gives a \
             deletion vector to a file per symbol it touches; with hundreds of symbols or more, readers that load \
             vectors one file at a time (Python deltalake, polars) slow down. Use delta.partition_by = \"none\" \
             with deletion vectors (docs/write-path.md)"
        );
    }
}

/// Says once per process that the table's layout makes flushes slow.
fn warn_many_symbols(files: usize) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if first_time(&WARNED) {
        tracing::warn!(
            files,
            "a flush wrote a data file per symbol and Kafka partition; with thousands of symbols, a table \
             created with delta.partition_by = \"none\" is several times faster (docs/write-path.md)"
        );
    }
}

/// The columns a reader filters positions by: the only ones whose statistics a new
/// table keeps, which makes each file's entry in the log about half as long.
/// (Delta refuses statistics columns that are partition columns.)
const STATISTICS_COLUMNS: [&str; 6] = ["conid", "symbol", "account", "timestamp", "kafka_partition", "kafka_offset"];

/// The table properties a new positions table gets: `delta.table_properties`, and
/// statistics of the columns readers filter by unless those set which.
fn creation_properties(config: &DeltaConfig) -> crate::config::Settings {
    let mut properties = config.table_properties.clone();
    if config.write_mode == WriteMode::DeletionVectors {
        properties.0.insert("delta.enableDeletionVectors".to_string(), "true".to_string());
    }
    let chooses_statistics = ["delta.dataSkippingStatsColumns", "delta.dataSkippingNumIndexedCols"]
        .iter()
        .any(|key| properties.0.contains_key(*key));
    if !chooses_statistics {
        let partitioning = partition_columns(config.partition_by);
        let columns: Vec<&str> = STATISTICS_COLUMNS.into_iter().filter(|c| !partitioning.contains(c)).collect();
        properties.0.insert("delta.dataSkippingStatsColumns".to_string(), columns.join(","));
    }
    properties
}

/// The positions table in `layout`: the columns of [`crate::table::schema::schema`].
pub fn spec(layout: PartitionBy) -> TableSpec {
    TableSpec {
        kind: "positions",
        config_key: "delta.table_uri",
        name: "positions",
        comment: "Latest position per instrument, written by position-sink",
        schema: schema(),
        partition_columns: partition_columns(layout),
        layout_key: Some("delta.partition_by"),
    }
}
