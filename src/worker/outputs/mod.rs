//! The outputs a flush writes, in the order that keeps committed offsets honest.
//!
//! The positions table is always written. Every other output implements [`Output`]
//! and declares its [`Place`]:
//!
//! - [`Place::BeforePositions`]: written before the positions table, recording in the
//!   same commit as its data the offsets that data covers (so writing it again is a
//!   no-op). The positions table's recorded offsets then vouch for it: a message at or
//!   below them is durable in this output too.
//! - [`Place::AfterPositions`]: written after the positions table, recording in the
//!   same commit as its data the offsets that data covers. Its record vouches for the
//!   positions table, not the other way round: the worker re-reads from the group's
//!   committed offsets. It is told what the positions table's write recorded
//!   ([`FlushContext::positions`]), so it can date each update by the positions commit
//!   that first showed it.
//! - [`Place::CommitsOffsets`]: written after the positions table, committing the
//!   consumer's offsets with its data (a Kafka transaction). At most one output has
//!   this place, and then the group's committed offset is the only record of what it
//!   holds: the worker re-reads from it, and the positions table drops the rows it
//!   already holds.
//!
//! The rule, stated once: **an output's recorded offsets vouch for every output
//! written before it.** So the worker may skip a message at or below the positions
//! table's record only when every other output is written before it
//! ([`Outputs::positions_vouch_for_all`]); otherwise it reads each partition from the
//! group's committed offset, which the worker commits after every output. A new output is one file implementing
//! [`Output`] and one line in [`Outputs::open`] choosing it from the configuration.
//!
//! Each write is retried on its own (bounded, with backoff) and each is idempotent, so
//! a retry, a crash or a replay at any point neither loses nor doubles anything.

mod dead_letter_table;
mod dead_letter_topic;
mod history_table;

use std::sync::Arc;

use futures::future::BoxFuture;
use rdkafka::consumer::ConsumerGroupMetadata;

use super::batch::Batch;
use super::flush::FlushError;
use crate::config::{Config, DeadLetterDestination, RetryConfig};
use crate::delta::TableError;
use crate::faults::CrashPoints;
use crate::maintenance::run::Target;
use crate::retry::retry;
use crate::status::{Progress, ReasonCounts};
use crate::table::{PositionTable, Thresholds, WriteReport};

pub use dead_letter_table::DeadLetterTableOutput;
pub use dead_letter_topic::DeadLetterTopicOutput;
pub use history_table::HistoryTableOutput;

/// Where an output is written relative to the positions table, in the order of a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// Before it: the positions table's recorded offsets vouch for this output.
    BeforePositions,
    /// After it, with offsets of its own: they vouch for the positions table.
    AfterPositions,
    /// After it, committing the consumer offsets with its data.
    CommitsOffsets,
}

/// What a flush hands every output besides the batch.
#[derive(Clone)]
pub struct FlushContext<'a> {
    /// Retries of one write.
    pub retry: &'a RetryConfig,
    /// The consumer's group membership, for an output that commits offsets.
    pub group: Option<Arc<ConsumerGroupMetadata>>,
    /// Counters kept current.
    pub progress: &'a Progress,
    /// Crash points of fault-injection tests.
    pub crash: &'a CrashPoints,
    /// The positions table and its write of this batch, for the outputs written after it.
    pub positions: Option<(&'a PositionTable, &'a WriteReport)>,
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

    /// Whether it is given every accepted update of a batch ([`Batch::history`]), not
    /// only the newest per key: the buffer then keeps them all.
    fn wants_every_update(&self) -> bool {
        false
    }

    /// The Delta table it appends to, if any, as the table-wide maintenance run keeps
    /// it: old days removed, small files binned, log and removed files cleaned.
    fn appended_table(&self) -> Option<Target> {
        None
    }
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
    /// put the outputs written before the positions table first, then those written
    /// after it, and at most one output that commits offsets last.
    ///
    /// # Panics
    /// When `others` breaks that order: a programming error, not a configuration one.
    pub fn new(positions: PositionTable, others: Vec<Box<dyn Output>>) -> Self {
        let committing = others.iter().filter(|o| o.place() == Place::CommitsOffsets).count();
        assert!(committing <= 1, "at most one output commits the consumer offsets");
        assert!(
            others.windows(2).all(|pair| pair[0].place() <= pair[1].place()),
            "the outputs come in their places' order: before the positions table, after it, committing offsets"
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
        let mut others = vec![dead_letters];
        if config.history.enabled {
            others.push(Box::new(HistoryTableOutput::open(config).await?));
        }
        others.sort_by_key(|o| o.place());
        Ok(Self::new(positions, others))
    }

    /// Whether an output is given every accepted update ([`Output::wants_every_update`]).
    pub fn want_every_update(&self) -> bool {
        self.others.iter().any(|o| o.wants_every_update())
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
    pub fn appended_tables(&self) -> Vec<Target> {
        self.others.iter().filter_map(|o| o.appended_table()).collect()
    }

    /// The outputs of `place`, in order.
    pub(super) fn at(&mut self, place: Place) -> impl Iterator<Item = &mut Box<dyn Output>> {
        self.others.iter_mut().filter(move |o| o.place() == place)
    }
}
