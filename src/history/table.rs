//! Appending to the history table: the entries of a flush not yet in it, in one commit
//! that records the offsets they cover (see the module docs of [`crate::history`]).

use std::collections::HashMap;

use deltalake::DeltaTable;

use super::Entry;
use super::schema::{EVENT_DATE, PARTITION_COLUMNS, SORTED_BY, schema, to_record_batch};
use crate::config::Settings;
use crate::delta::{self, OnceAppend, TableError, TableSpec};
use crate::maintenance::run::{Appending, KeepDays, Target};
use crate::offsets::{Offset, OffsetMap, TopicPartition};

fn spec() -> TableSpec {
    TableSpec {
        kind: "history",
        config_key: "history.table_uri",
        name: "position_history",
        comment: "Every position update position-sink accepted, once, partitioned by event date",
        schema: schema(),
        partition_columns: PARTITION_COLUMNS,
        layout_key: None,
    }
}

/// The history table, opened for one consumer group.
#[derive(Debug, Clone)]
pub struct HistoryTable {
    table: DeltaTable,
    uri: String,
    group_id: String,
    write_deadline: std::time::Duration,
}

/// What one append wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    /// Updates appended (those the table already held are not counted).
    pub rows: usize,
    /// Bytes of the files added.
    pub bytes: u64,
}

impl HistoryTable {
    /// Opens the table at `uri`, creating it if missing.
    ///
    /// # Errors
    /// [`TableError::Open`] or [`TableError::Incompatible`].
    pub async fn open_or_create(
        uri: &str,
        storage_options: &Settings,
        properties: &Settings,
        group_id: &str,
    ) -> Result<Self, TableError> {
        let table = delta::open_or_create(uri, storage_options, &spec(), properties).await?;
        let write_deadline = crate::config::MaintenanceConfig::default().write_deadline();
        Ok(Self { table, uri: uri.to_string(), group_id: group_id.to_string(), write_deadline })
    }

    /// This handle with `deadline` as the longest an append may take from its first data
    /// file to the end of its commit.
    pub fn with_write_deadline(self, deadline: std::time::Duration) -> Self {
        Self { write_deadline: deadline, ..self }
    }

    /// The Delta table handle, at the version this handle last saw.
    pub fn delta(&self) -> &DeltaTable {
        &self.table
    }

    /// The table location.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The table as the table-wide maintenance run keeps it: the days before the last
    /// `keep_days` removed (0: none), a day's small files binned into files sorted by
    /// `conid, timestamp`.
    pub fn maintenance_target(&self, keep_days: u32) -> Target {
        let keep = (keep_days > 0).then_some(KeepDays { column: EVENT_DATE, days: keep_days });
        Target::appended(&self.table, &self.uri, Appending { sort_by: SORTED_BY, keep })
    }

    /// Appends the entries not yet in the table, each stamped `ingested_at(entry)`, in
    /// one commit that also records the `covered` offsets of their partitions. Returns
    /// the handle at the version written and what was appended.
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`], both retryable: a retry re-reads
    /// the recorded offsets.
    pub async fn append(
        &self,
        entries: &[Entry],
        covered: &OffsetMap,
        ingested_at: impl Fn(&Entry) -> i64,
    ) -> Result<(Self, Appended), TableError> {
        let append = OnceAppend { uri: &self.uri, group_id: &self.group_id, deadline: self.write_deadline };
        let before = self.table.version();
        let (table, new) = append
            .append(&self.table, entries, |e| &e.update.source, covered, |new| to_record_batch(new, ingested_at))
            .await?;
        let bytes = if new.is_empty() || table.version() == before { 0 } else { added_bytes(&table).await };
        Ok((Self { table, ..self.clone() }, Appended { rows: new.len(), bytes }))
    }
}

impl HistoryTable {
    /// The offsets the table records for `partitions` (absent: none yet), at its latest
    /// version.
    ///
    /// # Errors
    /// [`TableError::Read`] when the log cannot be read.
    pub async fn recorded_offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, Offset>, TableError> {
        let fresh = delta::refreshed(&self.table, &self.uri).await?;
        delta::recorded_offsets(&fresh, &self.uri, &self.group_id, partitions).await
    }
}

/// Bytes of the files the table's latest commit added (0 when its log cannot be read:
/// the figure only feeds a metric).
async fn added_bytes(table: &DeltaTable) -> u64 {
    let Some(version) = table.version() else { return 0 };
    let Ok(Some(commit)) = table.log_store().read_commit_entry(version).await else { return 0 };
    commit
        .split(|b| *b == b'\n')
        .filter(|line| line.starts_with(b"{\"add\""))
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .filter_map(|action| action["add"]["size"].as_u64())
        .sum()
}
