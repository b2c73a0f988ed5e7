//! The outputs a flush writes, in the order that keeps committed offsets honest.
//!
//! The positions table is always written. Every other output implements [`Output`]
//! and declares its [`Place`]:
//!
//! - [`Place::BeforePositions`]: written before the positions table, recording in the
//!   same commit as its data the offsets that data covers (so writing it again is a
//!   no-op). The positions table's recorded offsets then vouch for it: a message at or
//!   below them is durable in this output too.
//! - [`Place::CommitsOffsets`]: written after the positions table, committing the
//!   consumer's offsets with its data (a Kafka transaction). At most one output has
//!   this place, and then the group's committed offset is the only record of what it
//!   holds: the worker re-reads from it, and the positions table drops the rows it
//!   already holds.
//!
//! The rule, stated once: **an output's recorded offsets vouch for every output
//! written before it.** So the worker may skip a message at or below the positions
//! table's record only when no output commits offsets
//! ([`Outputs::positions_vouch_for_all`]). A new output is one file implementing
//! [`Output`] and one line in [`Outputs::open`] choosing it from the configuration.
//!
//! Each write is retried on its own (bounded, with backoff) and each is idempotent, so
//! a retry, a crash or a replay at any point neither loses nor doubles anything.

mod dead_letter_table;
mod dead_letter_topic;

use std::sync::Arc;

use futures::future::BoxFuture;
use rdkafka::consumer::ConsumerGroupMetadata;

use super::batch::Batch;
use super::flush::FlushError;
use crate::config::{Config, DeadLetterDestination, RetryConfig};
use crate::delta::TableError;
use crate::faults::CrashPoints;
use crate::retry::retry;
use crate::status::{Progress, ReasonCounts};
use crate::table::{PositionTable, Thresholds};

pub use dead_letter_table::DeadLetterTableOutput;
pub use dead_letter_topic::DeadLetterTopicOutput;

/// Where an output is written relative to the positions table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Before it: the positions table's recorded offsets vouch for this output.
    BeforePositions,
    /// After it, committing the consumer offsets with its data.
    CommitsOffsets,
}

/// What a flush hands every output besides the batch.
pub struct FlushContext<'a> {
    /// Retries of one write.
    pub retry: &'a RetryConfig,
    /// The consumer's group membership, for an output that commits offsets.
    pub group: Option<Arc<ConsumerGroupMetadata>>,
    /// Counters kept current.
    pub progress: &'a Progress,
    /// Crash points of fault-injection tests.
    pub crash: &'a CrashPoints,
}

/// What one output wrote in one flush.
#[derive(Debug, Clone, Default)]
pub struct OutputReport {
    /// Dead letters newly written, by reason (replayed ones are not counted again).
    pub dead_letters: ReasonCounts,
    /// Whether the consumer offsets were committed with the data.
    pub offsets_committed: bool,
}

/// A destination a flush writes besides the positions table.
pub trait Output: std::fmt::Debug + Send + Sync {
    /// Where it is, for logs: `table s3://...`, `topic positions-dlq`.
    fn describe(&self) -> String;

    /// Where it is written relative to the positions table.
    fn place(&self) -> Place;

    /// Writes its part of `batch`, idempotently (see the module docs).
    fn write<'a>(
        &'a mut self,
        batch: &'a Batch,
        context: &'a FlushContext<'a>,
    ) -> BoxFuture<'a, Result<OutputReport, FlushError>>;

    /// The Delta table it appends to, if any: the table-wide maintenance run bins its
    /// small files and cleans its log and removed files.
    fn appended_table(&self) -> Option<AppendedTable> {
        None
    }
}

/// A Delta table an output appends to, as maintenance needs it.
#[derive(Debug, Clone)]
pub struct AppendedTable {
    /// The table, at the version the output last wrote (maintenance reads it afresh).
    pub delta: deltalake::DeltaTable,
    /// Its location, for logs.
    pub uri: String,
}

/// The positions table and the other outputs, in the order a flush writes them.
#[derive(Debug)]
pub struct Outputs {
    /// The positions table.
    pub positions: PositionTable,
    /// The other outputs: those before the positions table first, then the one that
    /// commits offsets, if any (checked by [`Outputs::new`]).
    others: Vec<Box<dyn Output>>,
}

impl Outputs {
    /// The outputs of a flush: `positions` and `others` in `others`' order, which must
    /// put the outputs written before the positions table first and at most one output
    /// that commits offsets last.
    ///
    /// # Panics
    /// When `others` breaks that order: a programming error, not a configuration one.
    pub fn new(positions: PositionTable, others: Vec<Box<dyn Output>>) -> Self {
        let committing = others.iter().filter(|o| o.place() == Place::CommitsOffsets).count();
        assert!(committing <= 1, "at most one output commits the consumer offsets");
        assert!(
            others
                .iter()
                .skip_while(|o| o.place() == Place::BeforePositions)
                .all(|o| o.place() == Place::CommitsOffsets),
            "the outputs written before the positions table come first"
        );
        Self { positions, others }
    }

    /// Opens the positions table and the outputs `config` asks for.
    ///
    /// # Errors
    /// When one cannot be opened (after retries, for the tables).
    pub async fn open(config: &Config) -> Result<Self, FlushError> {
        let group = &config.kafka.group_id;
        let positions = retry(
            &config.retry,
            "open the positions table",
            || async {
                let table = PositionTable::open_or_create(&config.delta, group).await?;
                Ok(table
                    .with_write_deadline(config.maintenance.write_deadline())
                    .with_compaction(Thresholds::from(&config.maintenance)))
            },
            TableError::is_retryable,
        )
        .await?;
        let dead_letters: Box<dyn Output> = match config.dead_letter.destination {
            DeadLetterDestination::Table => Box::new(DeadLetterTableOutput::open(config).await?),
            DeadLetterDestination::Topic => Box::new(DeadLetterTopicOutput::open(config).await?),
        };
        Ok(Self::new(positions, vec![dead_letters]))
    }

    /// Whether the positions table's recorded offsets vouch for every output (none
    /// commits offsets), so messages below them may be skipped unread.
    pub fn positions_vouch_for_all(&self) -> bool {
        self.others.iter().all(|o| o.place() == Place::BeforePositions)
    }

    /// The outputs besides the positions table, for logs.
    pub fn describe(&self) -> String {
        self.others.iter().map(|o| o.describe()).collect::<Vec<_>>().join(", ")
    }

    /// The Delta tables the outputs append to.
    pub fn appended_tables(&self) -> Vec<AppendedTable> {
        self.others.iter().filter_map(|o| o.appended_table()).collect()
    }

    /// The outputs of `place`, in order.
    pub(super) fn at(&mut self, place: Place) -> impl Iterator<Item = &mut Box<dyn Output>> {
        self.others.iter_mut().filter(move |o| o.place() == place)
    }
}
