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

use deltalake::datafusion::prelude::{Expr, SessionContext, col};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};

use crate::arrow::{LINEAGE_COLUMNS, PARTITION_COLUMN, PAYLOAD_COLUMNS, schema, to_record_batch};
use crate::batch::Batch;
use crate::config::DeltaConfig;
pub use crate::delta::TableError;
use crate::delta::{self, TableSpec};
use crate::offsets::{Offset, TopicPartition};
use crate::update::{KeyColumn, PositionUpdate};

/// A Delta table version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableVersion(pub u64);

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
        let table = delta::open_or_create(&config.table_uri, &config.storage_options, &spec()).await?;
        Ok(Self {
            table,
            uri: config.table_uri.clone(),
            group_id: group_id.to_string(),
            key_columns: config.key_columns.clone(),
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
        let groups = symbol_groups(rows.clone(), MAX_SYMBOLS_PER_MERGE);
        let (mut inserted, mut updated, mut offsets_recorded) = (0, 0, false);
        let last = groups.len().saturating_sub(1);
        for (i, group) in groups.iter().enumerate() {
            // Only the last MERGE records the offsets: a crash between two of them
            // leaves rows whose replay the last-write-wins guard turns into no-ops.
            let recording = if i == last { transactions.clone() } else { Vec::new() };
            let version_before = self.table.version();
            let (ins, upd) = self.merge_rows(group, recording).await?;
            (inserted, updated) = (inserted + ins, updated + upd);
            offsets_recorded = i == last && self.table.version() != version_before;
        }
        // delta-rs makes no commit for a MERGE that changes nothing (or has no rows);
        // the offsets must be recorded all the same.
        if !offsets_recorded {
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
        let write_err =
            |source| TableError::Write { uri: self.uri.clone(), rows: rows.len(), source: Box::new(source) };
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

/// Most distinct symbols one MERGE covers. delta-rs prunes the MERGE to the source's
/// partitions with a filter of one `OR` term per symbol, which it walks recursively: a
/// batch of thousands of symbols overflows a thread's stack. Larger batches are merged
/// in groups, one commit each.
pub const MAX_SYMBOLS_PER_MERGE: usize = 250;

/// `rows` split into groups of at most `max_symbols` distinct symbols each (none for
/// no rows), every symbol in exactly one group.
fn symbol_groups(mut rows: Vec<PositionUpdate>, max_symbols: usize) -> Vec<Vec<PositionUpdate>> {
    rows.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    let mut groups: Vec<Vec<PositionUpdate>> = Vec::new();
    let mut symbols_in_last = 0;
    for row in rows {
        let new_symbol = groups.last().and_then(|g| g.last()).is_none_or(|prev| prev.symbol != row.symbol);
        if new_symbol && (groups.is_empty() || symbols_in_last == max_symbols) {
            groups.push(Vec::new());
            symbols_in_last = 0;
        }
        if new_symbol {
            symbols_in_last += 1;
        }
        groups.last_mut().expect("a group was pushed").push(row);
    }
    groups
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

/// The positions table: the columns of [`crate::arrow::schema`], partitioned by `symbol`.
pub fn spec() -> TableSpec {
    TableSpec {
        kind: "positions",
        config_key: "delta.table_uri",
        name: "positions",
        comment: "Latest position per instrument, written by position-sink",
        schema: schema(),
        partition_columns: &[PARTITION_COLUMN],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::tests::update;

    #[test]
    fn symbol_groups_hold_each_symbol_once_and_at_most_the_limit() {
        let rows: Vec<PositionUpdate> = (0..23).map(|i| update(i, &format!("S{}", i % 7), 1, 0, i)).collect();
        let groups = symbol_groups(rows, 3);
        assert_eq!(groups.len(), 3);
        let mut seen = std::collections::BTreeSet::new();
        for g in &groups {
            let symbols: std::collections::BTreeSet<_> = g.iter().map(|u| u.symbol.clone()).collect();
            assert!(symbols.len() <= 3);
            assert!(symbols.iter().all(|s| seen.insert(s.clone())), "a symbol in two groups");
        }
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 23);
        assert!(symbol_groups(Vec::new(), 3).is_empty());
    }
}
