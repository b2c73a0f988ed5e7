//! The book as of a past time, from the history table: per key, the update
//! last-write-wins picks among those with `timestamp ≤ T` (event time) or
//! `ingested_at ≤ T` (what the positions table showed at `T`).
//!
//! The scan goes one event day (partition) at a time, oldest first, and keeps the best
//! update per key in memory with the rule the worker and the merge use
//! ([`PositionUpdate::supersedes`]): memory follows the book, not the history, and the
//! days after `T` are never read for an event-time book. Within a day, the query engine
//! prunes files by their statistics (`conid`, `timestamp`, `ingested_at`).

use std::collections::HashMap;

use deltalake::DeltaTable;
use deltalake::datafusion::common::ScalarValue;
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::prelude::{Expr, SessionContext, col, lit};
use futures::TryStreamExt;

use super::schema::{EVENT_DATE, event_date};
use crate::offsets::TopicPartition;
use crate::table::schema::{LINEAGE_COLUMNS, PAYLOAD_COLUMNS, TableRow, columns, from_record_batch};
use crate::update::{KeyColumn, RowKey};

/// The time a book is asked for, in microseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Event time: per key, the latest update with `timestamp ≤ T`.
    Event(i64),
    /// Wall-clock time: per key, among the updates with `ingested_at ≤ T`, the one
    /// last-write-wins picks (what the positions table showed at `T`).
    Known(i64),
}

/// Which rows of a book to return.
#[derive(Debug, Clone, Default)]
pub struct BookFilter {
    /// Only rows whose symbol at that time is this one.
    pub symbol: Option<String>,
    /// Only this contract id.
    pub conid: Option<i64>,
    /// Only this account.
    pub account: Option<String>,
    /// At most this many rows, in `symbol, conid` order.
    pub limit: Option<usize>,
}

/// How far a scan has come, for a progress bar: bytes of the days read, of all days.
pub trait ScanProgress {
    /// Called before the scan with the bytes it will read.
    fn start(&self, total_bytes: u64);
    /// Called after each day with that day's bytes.
    fn advance(&self, bytes: u64);
}

/// No progress shown.
impl ScanProgress for () {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// The book of `table` (a history table) at `as_of`, keyed by `conid` and
/// `key_columns`, filtered by `filter`, in `symbol, conid` order.
///
/// # Errors
/// When the table cannot be read or its rows are not history rows.
pub async fn book(
    table: &DeltaTable,
    as_of: AsOf,
    key_columns: &[KeyColumn],
    filter: &BookFilter,
    progress: &dyn ScanProgress,
) -> Result<Vec<TableRow>, DataFusionError> {
    let days = days_to_read(table, as_of)?;
    progress.start(days.iter().map(|(_, bytes)| bytes).sum());
    let ctx = SessionContext::new();
    let provider = table.table_provider().await?;
    let mut best: HashMap<RowKey, TableRow> = HashMap::new();
    let projection: Vec<&str> = PAYLOAD_COLUMNS.iter().chain(LINEAGE_COLUMNS.iter()).copied().collect();
    for (day, bytes) in days {
        let mut frame =
            ctx.read_table(provider.clone())?.filter(col(EVENT_DATE).eq(lit(ScalarValue::Date32(Some(day)))))?;
        frame = frame.filter(match as_of {
            AsOf::Event(t) => col(columns::TIMESTAMP).lt_eq(utc_micros(t)),
            AsOf::Known(t) => col(columns::INGESTED_AT).lt_eq(utc_micros(t)),
        })?;
        if let Some(conid) = filter.conid {
            frame = frame.filter(col(columns::CONID).eq(lit(conid)))?;
        }
        let mut stream = frame.select_columns(&projection)?.execute_stream().await?;
        while let Some(batch) = stream.try_next().await? {
            for row in from_record_batch(&batch)? {
                let key = row.update.key(key_columns);
                match best.get_mut(&key) {
                    Some(current) if !row.update.supersedes(&current.update) => {}
                    Some(current) => *current = row,
                    None => {
                        best.insert(key, row);
                    }
                }
            }
        }
        progress.advance(bytes);
    }
    let mut rows: Vec<TableRow> = best
        .into_values()
        .filter(|row| filter.symbol.as_ref().is_none_or(|s| row.update.symbol == *s))
        .filter(|row| filter.account.as_ref().is_none_or(|a| row.update.account.as_ref() == Some(a)))
        .collect();
    rows.sort_by(|a, b| (&a.update.symbol, a.update.conid).cmp(&(&b.update.symbol, b.update.conid)));
    if let Some(limit) = filter.limit {
        rows.truncate(limit);
    }
    Ok(rows)
}

/// The Kafka partitions the history holds updates of.
///
/// # Errors
/// When the table cannot be read.
pub async fn partitions(table: &DeltaTable) -> Result<Vec<TopicPartition>, DataFusionError> {
    use deltalake::arrow::array::AsArray;
    use deltalake::arrow::datatypes::{DataType, Int32Type};
    let ctx = SessionContext::new();
    let frame = ctx
        .read_table(table.table_provider().await?)?
        .select_columns(&[columns::KAFKA_TOPIC, columns::KAFKA_PARTITION])?
        .distinct()?;
    let mut found = Vec::new();
    for batch in frame.collect().await? {
        let topics = deltalake::arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let (topics, partitions) = (topics.as_string::<i32>(), batch.column(1).as_primitive::<Int32Type>());
        found.extend((0..batch.num_rows()).map(|r| TopicPartition::new(topics.value(r), partitions.value(r))));
    }
    found.sort();
    Ok(found)
}

/// The event days a book at `as_of` reads, oldest first, with the bytes of their
/// files: every day for a book as known at a time (an update may arrive long after
/// its event), the days up to `T`'s for an event-time book.
fn days_to_read(table: &DeltaTable, as_of: AsOf) -> Result<Vec<(i32, u64)>, DataFusionError> {
    let last = match as_of {
        AsOf::Event(t) => event_date(t),
        AsOf::Known(_) => i32::MAX,
    };
    let snapshot = table.snapshot()?;
    let mut days: std::collections::BTreeMap<i32, u64> = std::collections::BTreeMap::new();
    for file in snapshot.log_data().iter() {
        let value = file.partition_values_map().remove(EVENT_DATE).flatten();
        let day = value.as_deref().and_then(day_number).ok_or_else(|| {
            DataFusionError::Execution(format!(
                "the history table's file {} has no `{EVENT_DATE}` partition value ({value:?})",
                file.path()
            ))
        })?;
        if day <= last {
            *days.entry(day).or_default() += file.size().max(0) as u64;
        }
    }
    Ok(days.into_iter().collect())
}

/// Days since the epoch of a partition value `YYYY-MM-DD`.
fn day_number(value: &str) -> Option<i32> {
    let date = chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((date - epoch).num_days()).ok()
}

fn utc_micros(micros: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(Some(micros), Some("UTC".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_values_are_read_as_days_since_the_epoch() {
        assert_eq!(day_number("1970-01-01"), Some(0));
        assert_eq!(day_number("2025-11-25"), Some(event_date(1_764_028_800_000_000)));
        assert_eq!(day_number("1969-12-31"), Some(-1));
        assert_eq!(day_number("not a day"), None);
    }
}
