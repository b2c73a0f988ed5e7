//! The history table: every accepted update, exactly once, append-only and partitioned
//! by event date, and the book it answers for a past time (docs/history.md).
//!
//! Invariant kept here: an update is appended once. Each append records, per Kafka
//! partition, the highest offset its batch covers (`txn`, as the positions table does)
//! and drops updates at or below what the table already records, so a flush retried
//! after an error or a crash never adds a second copy.

pub mod query;
pub mod schema;
pub mod table;

pub use query::{AsOf, BookFilter, book};
pub use table::HistoryTable;

use crate::update::PositionUpdate;

/// An accepted update as the history keeps it: the update and its Kafka timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The update, with the Kafka coordinates it came from.
    pub update: PositionUpdate,
    /// The message's Kafka timestamp (ms since the epoch), when it has one.
    pub kafka_timestamp_millis: Option<i64>,
}
