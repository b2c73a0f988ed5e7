//! The positions table in Delta Lake: creation and schema checks, the offsets it has
//! recorded, and the idempotent last-write-wins MERGE of one batch.
//!
//! Invariants kept here:
//! - One flush is one Delta commit: the MERGE of the batch's rows and, in the same
//!   commit, one `txn` action per partition recording the last offset the batch covers.
//! - Rows at or below a partition's recorded offset are never written again, and a
//!   partition's recorded offset never moves backwards (delta-rs refuses a commit whose
//!   `txn` app ids were changed by a concurrent winner, and the retry re-reads them).
//! - The MERGE replaces a stored row only with a strictly newer update
//!   ([`crate::update::PositionUpdate::supersedes`]), and touches only the batch's
//!   `symbol` partitions.

use std::collections::HashMap;
use std::time::Instant;

use deltalake::arrow::datatypes::{DataType as ArrowType, TimeUnit};
use deltalake::datafusion::prelude::{Expr, SessionContext, col};
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::kernel::{DataType, PrimitiveType, StructField, Transaction};
use deltalake::{DeltaTable, DeltaTableError};

use crate::arrow::{LINEAGE_COLUMNS, PARTITION_COLUMN, PAYLOAD_COLUMNS, schema, to_record_batch};
use crate::batch::Batch;
use crate::config::DeltaConfig;
use crate::offsets::{Offset, TopicPartition};
use crate::update::{KeyColumn, PositionUpdate};

/// A Delta table version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableVersion(pub u64);

/// Failures of the table, with the table's location.
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
        "the Delta table at {uri} is not a positions table: {differences}. \
         Point delta.table_uri at a new location, or migrate the table"
    )]
    Incompatible {
        /// Table location.
        uri: String,
        /// What differs from the expected schema.
        differences: String,
    },
    /// Reading the table's state or recorded offsets failed.
    #[error("cannot read the state of the Delta table at {uri}: {source}")]
    Read {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// The MERGE or its commit failed (conflict, storage error).
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
    /// Whether trying again can help: storage and commit-conflict failures can, a
    /// schema mismatch cannot.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TableError::Incompatible { .. })
    }
}

/// What one [`PositionTable::write`] did.
#[derive(Debug, Clone)]
pub struct WriteReport {
    /// The table version after the write (unchanged when nothing was new).
    pub version: TableVersion,
    /// Rows offered to the MERGE (after dropping already-recorded offsets).
    pub rows_offered: usize,
    /// Rows inserted.
    pub inserted: usize,
    /// Rows updated (the rest were older than the stored row).
    pub updated: usize,
    /// Whether a commit was made.
    pub committed: bool,
    /// Time spent in the MERGE and commit.
    pub elapsed: std::time::Duration,
}

/// The positions table, opened for one consumer group.
#[derive(Debug, Clone)]
pub struct PositionTable {
    table: DeltaTable,
    uri: String,
    group_id: String,
    key_columns: Vec<KeyColumn>,
}

impl PositionTable {
    /// Opens the table at `config.table_uri`, creating it if missing, and checks its schema.
    ///
    /// # Errors
    /// [`TableError::Open`] when storage fails, [`TableError::Incompatible`] when the
    /// table exists with other columns or partitioning.
    pub async fn open_or_create(config: &DeltaConfig, group_id: &str) -> Result<Self, TableError> {
        let uri = config.table_uri.clone();
        let open_err = |source| TableError::Open { uri: uri.clone(), source: Box::new(source) };
        let url = deltalake::ensure_table_uri(&uri).map_err(open_err)?;
        let options: HashMap<String, String> = config.storage_options.0.clone().into_iter().collect();
        let mut table = DeltaTable::try_from_url_with_storage_options(url.clone(), options.clone())
            .await
            .map_err(open_err)?;
        if table.version().is_none() {
            let created = table
                .create()
                .with_columns(delta_columns())
                .with_partition_columns([PARTITION_COLUMN])
                .with_table_name("positions")
                .with_comment("Latest position per instrument, written by position-sink")
                .await;
            table = match created {
                Ok(t) => t,
                // Another worker created it first: use theirs.
                Err(_) => DeltaTable::try_from_url_with_storage_options(url, options).await.map_err(open_err)?,
            };
        }
        let opened = Self { table, uri, group_id: group_id.to_string(), key_columns: config.key_columns.clone() };
        opened.check_schema()?;
        Ok(opened)
    }

    /// The table location as configured.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The version this handle last saw.
    pub fn version(&self) -> Option<TableVersion> {
        self.table.version().map(TableVersion)
    }

    fn check_schema(&self) -> Result<(), TableError> {
        let incompatible = |differences| TableError::Incompatible { uri: self.uri.clone(), differences };
        let snapshot = self.table.snapshot().map_err(|e| incompatible(format!("no snapshot ({e})")))?;
        let actual = snapshot.schema();
        let mut differences = Vec::new();
        for expected in delta_columns() {
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
            if !extra.is_nullable() && schema().field_with_name(extra.name()).is_err() {
                differences.push(format!("extra column `{}` is NOT NULL, so rows cannot be inserted", extra.name()));
            }
        }
        let partitioning = snapshot.metadata().partition_columns();
        if partitioning != [PARTITION_COLUMN.to_string()] {
            differences.push(format!("it is partitioned by {partitioning:?}, expected [\"{PARTITION_COLUMN}\"]"));
        }
        if differences.is_empty() { Ok(()) } else { Err(incompatible(differences.join("; "))) }
    }

    /// A handle at the latest table version.
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn refreshed(&self) -> Result<PositionTable, TableError> {
        let mut fresh = self.clone();
        fresh.table.update_state().await.map_err(|source| TableError::Read { uri: self.uri.clone(), source: Box::new(source) })?;
        Ok(fresh)
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
        let read_err = |source| TableError::Read { uri: self.uri.clone(), source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(read_err)?;
        let log_store = self.table.log_store();
        let mut recorded = HashMap::new();
        for tp in partitions {
            if let Some(version) =
                snapshot.transaction_version(log_store.as_ref(), tp.app_id(&self.group_id)).await.map_err(read_err)?
            {
                recorded.insert(tp.clone(), Offset(version));
            }
        }
        Ok(recorded)
    }

    /// Writes `batch` in one commit on top of the latest version: rows above each
    /// partition's recorded offset are merged with the last-write-wins guard, and the
    /// batch's offsets are recorded. A batch the table already holds entirely is not
    /// committed again. Returns the handle at the version written.
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`]; both are retryable, and a retry
    /// re-reads the recorded offsets, so a write that did commit is not repeated.
    pub async fn write(&self, batch: &Batch) -> Result<(PositionTable, WriteReport), TableError> {
        let started = Instant::now();
        let mut fresh = self.refreshed().await?;
        let report = fresh.merge(batch, started).await?;
        Ok((fresh, report))
    }

    async fn merge(&mut self, batch: &Batch, started: Instant) -> Result<WriteReport, TableError> {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        let recorded = self.recorded_offsets(&partitions).await?;
        let is_new = |tp: &TopicPartition, offset: Offset| recorded.get(tp).is_none_or(|done| offset > *done);
        let transactions: Vec<Transaction> = batch
            .offsets
            .iter()
            .filter(|(tp, offset)| is_new(tp, *offset))
            .map(|(tp, offset)| Transaction::new(tp.app_id(&self.group_id), offset.0))
            .collect();
        let rows: Vec<_> = batch.rows.iter().filter(|u| is_new(&u.source.tp, u.source.offset)).cloned().collect();
        let unchanged = WriteReport {
            version: self.version().unwrap_or(TableVersion(0)),
            rows_offered: rows.len(),
            inserted: 0,
            updated: 0,
            committed: false,
            elapsed: started.elapsed(),
        };
        if transactions.is_empty() {
            return Ok(unchanged);
        }
        let version_before = self.table.version();
        let (inserted, updated) = if rows.is_empty() {
            (0, 0)
        } else {
            self.merge_rows(&rows, transactions.clone()).await?
        };
        // delta-rs makes no commit for a MERGE that changes nothing (or has no rows);
        // the offsets must be recorded all the same.
        if self.table.version() == version_before {
            self.commit_offsets_only(transactions, rows.len()).await?;
        }
        Ok(WriteReport {
            version: self.version().unwrap_or(TableVersion(0)),
            rows_offered: rows.len(),
            inserted,
            updated,
            committed: true,
            elapsed: started.elapsed(),
        })
    }

    async fn merge_rows(
        &mut self,
        rows: &[PositionUpdate],
        transactions: Vec<Transaction>,
    ) -> Result<(usize, usize), TableError> {
        let write_err = |source| TableError::Write { uri: self.uri.clone(), rows: rows.len(), source: Box::new(source) };
        let ingested_at = chrono::Utc::now().timestamp_micros();
        let record_batch = to_record_batch(rows, ingested_at)
            .map_err(|e| write_err(DeltaTableError::Generic(format!("building the Arrow batch: {e}"))))?;
        let source = SessionContext::new().read_batch(record_batch).map_err(|e| write_err(e.into()))?;
        let (table, metrics) = self
            .table
            .clone()
            .merge(source, self.join_predicate())
            .with_source_alias("source")
            .with_target_alias("target")
            .when_matched_update(|update| {
                PAYLOAD_COLUMNS
                    .iter()
                    .chain(LINEAGE_COLUMNS.iter())
                    .fold(update.predicate(newer_than_target()), |u, c| u.update(*c, source_col(c)))
            })
            .and_then(|merge| {
                merge.when_not_matched_insert(|insert| {
                    PAYLOAD_COLUMNS.iter().chain(LINEAGE_COLUMNS.iter()).fold(insert, |i, c| i.set(*c, source_col(c)))
                })
            })
            .map_err(write_err)?
            .with_commit_properties(CommitProperties::default().with_application_transactions(transactions))
            .await
            .map_err(write_err)?;
        self.table = table;
        Ok((metrics.num_target_rows_inserted, metrics.num_target_rows_updated))
    }

    /// A commit that only records offsets: for a batch whose rows are all older than
    /// the table's, or already written.
    async fn commit_offsets_only(&mut self, transactions: Vec<Transaction>, rows: usize) -> Result<(), TableError> {
        let write_err = |source| TableError::Write { uri: self.uri.clone(), rows, source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(write_err)?;
        let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
        CommitBuilder::from(CommitProperties::default().with_application_transactions(transactions))
            .build(Some(snapshot), self.table.log_store(), operation)
            .await
            .map_err(write_err)?;
        self.table.update_state().await.map_err(write_err)
    }

    /// `target.symbol = source.symbol AND target.k = source.k ...`: the partition column
    /// first, so delta-rs prunes the scan to the batch's symbols.
    fn join_predicate(&self) -> Expr {
        std::iter::once(PARTITION_COLUMN)
            .chain(self.key_columns.iter().map(|k| k.name()))
            .map(|c| target_col(c).eq(source_col(c)))
            .reduce(Expr::and)
            .unwrap_or_else(|| target_col("conid").eq(source_col("conid")))
    }
}

/// The last-write-wins guard, the same order as
/// [`crate::update::PositionUpdate::precedence`]: timestamp, then offset, then topic,
/// then partition, each compared only when all before it are equal.
fn newer_than_target() -> Expr {
    let [least, more_significant @ ..] = ["kafka_partition", "kafka_topic", "kafka_offset", "timestamp"];
    more_significant.iter().fold(source_col(least).gt(target_col(least)), |tie_break, c| {
        source_col(c).gt(target_col(c)).or(source_col(c).eq(target_col(c)).and(tie_break))
    })
}

fn source_col(name: &str) -> Expr {
    col(format!("source.{name}"))
}

fn target_col(name: &str) -> Expr {
    col(format!("target.{name}"))
}

/// The Delta columns, derived from the Arrow schema in [`crate::arrow::schema`].
fn delta_columns() -> Vec<StructField> {
    schema()
        .fields()
        .iter()
        .map(|f| {
            let primitive = match f.data_type() {
                ArrowType::Int64 => PrimitiveType::Long,
                ArrowType::Int32 => PrimitiveType::Integer,
                ArrowType::Float64 => PrimitiveType::Double,
                ArrowType::Utf8 => PrimitiveType::String,
                ArrowType::Timestamp(TimeUnit::Microsecond, Some(_)) => PrimitiveType::Timestamp,
                other => unreachable!("the table schema has no column of type {other}"),
            };
            StructField::new(f.name().clone(), DataType::Primitive(primitive), f.is_nullable())
        })
        .collect()
}
