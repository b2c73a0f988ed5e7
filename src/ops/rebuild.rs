//! `position-sink rebuild --from-history`: recreates the positions table from the
//! history table when Kafka no longer holds the messages (docs/history.md).
//!
//! The book (per key, the update last-write-wins picks among every update the history
//! holds, or among those up to `--as-of`) is written to a new table, in the layout and
//! write mode the configuration gives, in chunks of `flush.max_records` rows. The last
//! commit records the history's offsets, so a worker then resumes each partition where
//! the history ends: nothing is applied twice and nothing is skipped. A book as of a
//! past time records no offsets (the updates after it are in neither the table nor a
//! record), so it is refused for the group's own table.

use serde::Serialize;

use super::show::book;
use super::{Format, OpsError, Outcome, RowFilter, open_table_at, rfc3339};
use crate::config::Config;
use crate::delta;
use crate::history::{self, AsOf};
use crate::offsets::{OffsetMap, TopicPartition};
use crate::table::{PositionTable, WriteSet};
use crate::update::PositionUpdate;

/// What to rebuild.
#[derive(Debug, Clone, Default)]
pub struct RebuildOptions {
    /// The book of this event time (µs since the epoch) instead of every update.
    pub as_of: Option<i64>,
    /// The table to write (default: `delta.table_uri`).
    pub into: Option<String>,
    /// Draw a progress bar over the history's bytes.
    pub progress_bar: bool,
}

/// What a rebuild wrote.
#[derive(Debug, Default, Serialize)]
pub struct RebuildReport {
    /// The table written.
    pub table: String,
    /// The history read.
    pub history: String,
    /// The book's event time, when one was asked for.
    pub as_of: Option<String>,
    /// Rows written (one per key).
    pub rows: usize,
    /// Commits made.
    pub commits: usize,
    /// The offsets recorded in the last commit, per partition (none for a past book).
    pub recorded: Vec<RecordedOffset>,
}

/// An offset the rebuilt table records.
#[derive(Debug, Serialize)]
pub struct RecordedOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The last offset the history holds.
    pub offset: i64,
}

/// Rebuilds the table.
///
/// # Errors
/// [`OpsError::Input`] when the target already holds rows, when a past book would go
/// into the group's own table, or when there is no history; the other variants when
/// the tables cannot be read or written.
pub async fn rebuild(config: &Config, options: &RebuildOptions) -> Result<RebuildReport, OpsError> {
    let target = options.into.clone().unwrap_or_else(|| config.delta.table_uri.clone());
    if options.as_of.is_some() && target == config.delta.table_uri {
        return Err(OpsError::Input(format!(
            "a book as of a past time records no offsets, so the group's workers could not resume on it: \
             write it beside the table with --into (delta.table_uri is {target})"
        )));
    }
    if let Ok(existing) = open_table_at(&target, &config.delta).await
        && existing.snapshot().is_ok_and(|s| s.log_data().iter().next().is_some())
    {
        return Err(OpsError::Input(format!(
            "the table at {target} holds rows; rebuild writes a new table: remove it first, or choose another \
             location with --into"
        )));
    }
    let history_uri = config.history.resolved_table_uri(&config.delta);
    let when = options.as_of.map_or(AsOf::Known(i64::MAX), AsOf::Event);
    let rows: Vec<PositionUpdate> =
        book(config, &RowFilter::default(), when, options.progress_bar).await?.into_iter().map(|r| r.update).collect();
    let recorded = match options.as_of {
        Some(_) => OffsetMap::default(),
        None => history_offsets(config, &history_uri).await?,
    };

    let mut delta_config = config.delta.clone();
    delta_config.table_uri = target.clone();
    let mut table = PositionTable::open_or_create(&delta_config, &config.kafka.group_id)
        .await?
        .with_write_deadline(config.maintenance.write_deadline());
    let mut report = RebuildReport {
        table: target,
        history: history_uri,
        as_of: options.as_of.map(rfc3339),
        rows: rows.len(),
        ..RebuildReport::default()
    };
    let chunk = config.flush.max_records.max(1);
    let chunks: Vec<&[PositionUpdate]> = if rows.is_empty() { vec![&[]] } else { rows.chunks(chunk).collect() };
    let (none, last) = (OffsetMap::default(), chunks.len() - 1);
    for (i, rows) in chunks.into_iter().enumerate() {
        // Only the last commit records offsets: a rebuild cut short records none, and
        // is refused on the next try until its partial table is removed.
        let offsets = if i == last { &recorded } else { &none };
        let set = WriteSet { rows, offsets, ingested_at_micros: chrono::Utc::now().timestamp_micros() };
        let (written, write) = table.write_replayed(set).await?;
        table = written;
        report.commits += usize::from(write.committed);
    }
    report.recorded = recorded
        .iter()
        .map(|(tp, offset)| RecordedOffset { topic: tp.topic.clone(), partition: tp.partition.0, offset: offset.0 })
        .collect();
    Ok(report)
}

/// The offsets the history records for every partition it holds updates of.
async fn history_offsets(config: &Config, uri: &str) -> Result<OffsetMap, OpsError> {
    let table = open_table_at(uri, &config.delta).await?;
    let partitions: Vec<TopicPartition> = history::query::partitions(&table).await?;
    let recorded = delta::recorded_offsets(&table, uri, &config.kafka.group_id, &partitions).await?;
    let mut offsets = OffsetMap::default();
    for (tp, offset) in recorded {
        offsets.observe(&tp, offset);
    }
    Ok(offsets)
}

/// Prints `report` in `format`.
pub fn print(report: &RebuildReport, format: Format) -> Outcome {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return Outcome::Clean;
    }
    let what = report.as_of.as_ref().map_or("every update".to_string(), |t| format!("the updates up to {t}"));
    println!("rebuilt {} from {} ({what})", report.table, report.history);
    println!("{} rows in {} commits", report.rows, report.commits);
    if report.recorded.is_empty() {
        println!("no offsets recorded: this table is a book of the past, not one a worker resumes on");
    }
    for r in &report.recorded {
        println!("recorded {}[{}] through offset {}: a worker resumes after it", r.topic, r.partition, r.offset);
    }
    Outcome::Clean
}
