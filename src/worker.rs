//! The worker loop: consume → decode → buffer → flush to Delta → commit offsets.
//!
//! Invariants kept here:
//! - At most one flush is in flight; while it runs, reading continues into the next
//!   buffer until that buffer is full, then reading stops (memory stays bounded).
//! - Kafka offsets are committed only after the flush that covers them is committed
//!   to Delta, and only for partitions this worker still owns.
//! - A message at or below the offset the table records for its partition is skipped:
//!   it is already in the table, whatever the group's committed offset says.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::batch::{Batch, Buffer, Limits};
use crate::config::Config;
use crate::decode::{DecodeOptions, Rejection, decode};
use crate::kafka::{self, SinkConsumer};
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};
use crate::retry::retry;
use crate::table::{PositionTable, TableError, WriteReport};
use crate::update::PositionUpdate;

/// Why a worker stopped with an error. Offsets past the failure were not committed;
/// a restart resumes from the table's recorded offsets.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The Kafka client could not be created or subscribed.
    #[error("Kafka consumer setup failed: {0}. Check kafka.brokers, kafka.topics and kafka.librdkafka")]
    Kafka(#[from] KafkaError),
    /// The table failed and retries (retry.max_retries) were exhausted.
    #[error("{0}")]
    Table(#[from] TableError),
    /// A message is not a valid position update.
    #[error("invalid message at {at}: {reason}. Fix or remove the message upstream; offsets were not committed past it")]
    InvalidMessage {
        /// Where the message is.
        at: Coordinates,
        /// What is wrong with it.
        reason: Rejection,
    },
    /// The flush task panicked (a bug).
    #[error("the flush task failed: {0}")]
    FlushTask(#[from] tokio::task::JoinError),
    /// The last flush did not finish within worker.shutdown_timeout.
    #[error(
        "shutdown timed out after {0:?} waiting for the last flush; nothing unwritten was committed and it will be re-read"
    )]
    ShutdownTimedOut(Duration),
    /// A fault injected by a test.
    #[error("injected crash: {0}")]
    InjectedCrash(&'static str),
}

/// Faults a test can inject to prove recovery, and live counters it can watch.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Stop with an error right after this many Delta commits, before committing their
    /// Kafka offsets — a crash between the two commits.
    pub crash_after_delta_commits: Option<usize>,
    /// Counters updated while the worker runs.
    pub progress: std::sync::Arc<Progress>,
}

/// Live counters of a running worker.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages consumed so far.
    pub messages: std::sync::atomic::AtomicU64,
    /// Delta commits so far.
    pub delta_commits: std::sync::atomic::AtomicU64,
}

/// Totals of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Messages consumed (including skipped ones).
    pub messages: u64,
    /// Messages skipped because the table already had them.
    pub skipped_already_written: u64,
    /// Delta commits made.
    pub delta_commits: u64,
    /// Rows inserted or updated.
    pub rows_written: u64,
}

/// Runs a worker until `shutdown` is cancelled (or, with `worker.exit_when_caught_up`,
/// until every assigned partition is written to its end), then flushes and commits.
///
/// # Errors
/// See [`WorkerError`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, WorkerError> {
    run_with_faults(config, shutdown, Faults::default()).await
}

/// [`run`], with faults injected.
///
/// # Errors
/// See [`WorkerError`].
pub async fn run_with_faults(
    config: Config,
    shutdown: CancellationToken,
    faults: Faults,
) -> Result<RunSummary, WorkerError> {
    let table = retry(
        &config.retry,
        "open Delta table",
        || PositionTable::open_or_create(&config.delta, &config.kafka.group_id),
        TableError::is_retryable,
    )
    .await?;
    info!(table = table.uri(), version = ?table.version().map(|v| v.0), "opened Delta table");
    let consumer = kafka::subscribe(&config.kafka)?;
    info!(brokers = %config.kafka.brokers, group = %config.kafka.group_id, topics = ?config.kafka.topics, "subscribed");
    let mut worker = Worker::new(config, consumer, table, faults);
    worker.run(shutdown).await?;
    Ok(worker.summary)
}

/// A flush running in the background: it hands the table back when done.
type InFlight = JoinHandle<(PositionTable, Batch, Result<WriteReport, TableError>)>;

/// What the broker handed us, decoded and detached from the consumer.
enum Received {
    Update(PositionUpdate, usize),
    Invalid(Coordinates, Rejection),
    EndOfPartition,
    Error(KafkaError),
}

/// The next offset of a partition that is not yet in the table.
#[derive(Debug, Clone, Copy)]
struct Floor {
    next: Offset,
    sought: bool,
}

struct Worker {
    config: Config,
    consumer: SinkConsumer,
    decode_options: DecodeOptions,
    buffer: Buffer,
    /// The table handle when no flush is running.
    idle_table: Option<PositionTable>,
    /// A separate handle for reading recorded offsets while a flush runs.
    reader: PositionTable,
    in_flight: Option<InFlight>,
    floors: HashMap<TopicPartition, Floor>,
    /// Highest offset consumed per partition since assignment.
    consumed: OffsetMap,
    /// Highest offset durable in the table per partition, for the final commit.
    durable: OffsetMap,
    faults: Faults,
    summary: RunSummary,
}

impl Worker {
    fn new(config: Config, consumer: SinkConsumer, table: PositionTable, faults: Faults) -> Self {
        let limits = Limits { max_records: config.flush.max_records, max_bytes: config.flush.max_bytes };
        Self {
            decode_options: DecodeOptions {
                key_columns: config.delta.key_columns.clone(),
                max_message_bytes: config.decode.max_message_bytes,
            },
            buffer: Buffer::new(config.delta.key_columns.clone(), limits),
            reader: table.clone(),
            idle_table: Some(table),
            in_flight: None,
            floors: HashMap::new(),
            consumed: OffsetMap::default(),
            durable: OffsetMap::default(),
            consumer,
            config,
            faults,
            summary: RunSummary::default(),
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut tick = tokio::time::interval_at(Instant::now() + self.config.flush.interval, self.config.flush.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let flushing = self.in_flight.is_some();
            let can_read = !self.buffer.is_full();
            tokio::select! {
                // Shutdown first, so a stop request never waits behind a backlog; then a
                // finished flush, so offsets are committed and the next flush can start
                // before more is read.
                biased;
                () = shutdown.cancelled() => break,
                done = join(&mut self.in_flight), if flushing => {
                    self.in_flight = None;
                    self.finish_flush(done?)?;
                }
                _ = tick.tick() => self.start_flush(),
                message = self.consumer.recv(), if can_read => {
                    let received = receive(message, &self.decode_options);
                    self.handle(received).await?;
                }
            }
            if self.buffer.is_full() {
                self.start_flush();
            }
            if self.config.worker.exit_when_caught_up && self.is_caught_up() {
                info!("every assigned partition is written to its end; exiting");
                break;
            }
        }
        self.drain().await
    }

    async fn handle(&mut self, received: Received) -> Result<(), WorkerError> {
        self.apply_revocations();
        match received {
            Received::Update(update, size) => {
                self.summary.messages += 1;
                self.faults.progress.messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.consumed.observe(&update.source.tp, update.source.offset);
                if self.is_already_written(&update.source).await? {
                    self.summary.skipped_already_written += 1;
                } else {
                    self.buffer.push(update, size);
                }
            }
            Received::Invalid(at, reason) => {
                self.summary.messages += 1;
                if self.is_already_written(&at).await? {
                    self.summary.skipped_already_written += 1;
                    return Ok(());
                }
                error!(topic = %at.tp.topic, partition = at.tp.partition.0, offset = at.offset.0, reason = %reason,
                    category = reason.category(), "invalid message; stopping after writing what came before it");
                self.drain().await?;
                return Err(WorkerError::InvalidMessage { at, reason });
            }
            Received::EndOfPartition => {}
            Received::Error(error) => warn!(%error, "Kafka consumer error; librdkafka retries by itself"),
        }
        Ok(())
    }

    /// Whether the table already holds this message (its partition's recorded offset
    /// is at or above it). Loads the recorded offsets of newly assigned partitions.
    async fn is_already_written(&mut self, at: &Coordinates) -> Result<bool, WorkerError> {
        if !self.floors.contains_key(&at.tp) {
            self.load_floors(&at.tp).await?;
        }
        let Some(floor) = self.floors.get_mut(&at.tp) else { return Ok(false) };
        if at.offset >= floor.next {
            return Ok(false);
        }
        if !floor.sought {
            floor.sought = true;
            let next = floor.next;
            info!(partition = %at.tp, from = at.offset.0, to = next.0, "skipping messages the table already holds");
            if let Err(error) = kafka::seek(&self.consumer, &at.tp, next) {
                debug!(%error, "seek not possible yet; skipping message by message");
            }
            // The table holds everything below the floor: Kafka may say so too.
            let mut written = OffsetMap::default();
            written.observe(&at.tp, Offset(next.0 - 1));
            self.durable.observe(&at.tp, Offset(next.0 - 1));
            if let Err(error) = kafka::commit(&self.consumer, &written, CommitMode::Async) {
                warn!(%error, "could not commit the table's recorded offset to Kafka");
            }
        }
        Ok(true)
    }

    async fn load_floors(&mut self, first: &TopicPartition) -> Result<(), WorkerError> {
        let mut partitions = kafka::assignment(&self.consumer).unwrap_or_default();
        partitions.retain(|tp| !self.floors.contains_key(tp));
        if !partitions.contains(first) {
            partitions.push(first.clone());
        }
        let reader = &self.reader;
        self.reader = retry(&self.config.retry, "read the table's recorded offsets", || reader.refreshed(), TableError::is_retryable)
            .await?;
        let recorded = self.reader.recorded_offsets(&partitions).await?;
        for tp in partitions {
            let next = match recorded.get(&tp) {
                Some(offset) => {
                    self.durable.observe(&tp, *offset);
                    offset.next()
                }
                None => Offset(0),
            };
            self.floors.insert(tp, Floor { next, sought: false });
        }
        Ok(())
    }

    fn apply_revocations(&mut self) {
        let revoked = self.consumer.context().take_revoked();
        if revoked.is_empty() {
            return;
        }
        self.buffer.drop_partitions(&revoked);
        for tp in &revoked {
            self.floors.remove(tp);
            self.consumed.remove(tp);
            self.durable.remove(tp);
        }
    }

    /// Starts writing the buffer, unless it is empty or a flush is already running.
    fn start_flush(&mut self) {
        self.apply_revocations();
        if self.buffer.is_empty() {
            return;
        }
        let Some(table) = self.idle_table.take() else { return };
        let batch = self.buffer.take();
        let policy = self.config.retry.clone();
        self.in_flight = Some(tokio::spawn(async move {
            match retry(&policy, "write batch to Delta", || table.write(&batch), TableError::is_retryable).await {
                Ok((written, report)) => (written, batch, Ok(report)),
                Err(error) => (table, batch, Err(error)),
            }
        }));
    }

    fn finish_flush(&mut self, (table, batch, result): (PositionTable, Batch, Result<WriteReport, TableError>)) -> Result<(), WorkerError> {
        self.idle_table = Some(table);
        let report = result?;
        if report.committed {
            self.summary.delta_commits += 1;
            self.faults.progress.delta_commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.summary.rows_written += (report.inserted + report.updated) as u64;
            if self.faults.crash_after_delta_commits.is_some_and(|n| self.summary.delta_commits >= n as u64) {
                return Err(WorkerError::InjectedCrash("after the Delta commit, before the Kafka commit"));
            }
        }
        for (tp, offset) in batch.offsets.iter() {
            self.durable.observe(tp, offset);
        }
        if let Err(error) = kafka::commit(&self.consumer, &batch.offsets, CommitMode::Async) {
            warn!(%error, "could not commit offsets to Kafka; the table's recorded offsets cover them");
        }
        info!(
            messages = batch.messages,
            rows_in = report.rows_offered,
            inserted = report.inserted,
            updated = report.updated,
            version = report.version.0,
            committed = report.committed,
            duration_ms = report.elapsed.as_millis() as u64,
            "flushed batch"
        );
        Ok(())
    }

    /// Waits for the running flush, if any, and commits its offsets.
    async fn await_in_flight(&mut self) -> Result<(), WorkerError> {
        if self.in_flight.is_some() {
            let done = join(&mut self.in_flight).await?;
            self.in_flight = None;
            self.finish_flush(done)?;
        }
        Ok(())
    }

    /// Whether every assigned partition is consumed to its high watermark and written.
    fn is_caught_up(&self) -> bool {
        if !self.buffer.is_empty() || self.in_flight.is_some() {
            return false;
        }
        let Ok(assigned) = kafka::assignment(&self.consumer) else { return false };
        !assigned.is_empty()
            && assigned.iter().all(|tp| {
                // Messages below the floor may have been skipped by a seek, unseen.
                let next = self.consumed.get(tp).map(Offset::next).max(self.floors.get(tp).map(|f| f.next));
                match kafka::cached_high_watermark(&self.consumer, tp) {
                    Some(high) => next.unwrap_or(Offset(0)) >= high,
                    None => false,
                }
            })
    }

    /// Finishes the running flush, writes what is buffered, commits, all within
    /// `worker.shutdown_timeout`.
    async fn drain(&mut self) -> Result<(), WorkerError> {
        let timeout = self.config.worker.shutdown_timeout;
        let finished = tokio::time::timeout(timeout, async {
            self.await_in_flight().await?;
            self.start_flush();
            self.await_in_flight().await
        })
        .await;
        match finished {
            Ok(result) => result?,
            Err(_) => {
                if let Some(handle) = self.in_flight.take() {
                    handle.abort();
                }
                return Err(WorkerError::ShutdownTimedOut(timeout));
            }
        }
        if !self.durable.is_empty()
            && let Err(error) = kafka::commit(&self.consumer, &self.durable, CommitMode::Sync)
        {
            warn!(%error, "final Kafka offset commit failed; the table's recorded offsets cover it");
        }
        info!(messages = self.summary.messages, delta_commits = self.summary.delta_commits, "worker stopped");
        Ok(())
    }
}

async fn join(in_flight: &mut Option<InFlight>) -> Result<(PositionTable, Batch, Result<WriteReport, TableError>), WorkerError> {
    match in_flight {
        Some(handle) => Ok(handle.await?),
        None => std::future::pending().await,
    }
}

fn receive(message: Result<BorrowedMessage<'_>, KafkaError>, options: &DecodeOptions) -> Received {
    let message = match message {
        Ok(m) => m,
        Err(KafkaError::PartitionEOF(_)) => return Received::EndOfPartition,
        Err(error) => return Received::Error(error),
    };
    let at = Coordinates {
        tp: TopicPartition::new(message.topic(), message.partition()),
        offset: Offset(message.offset()),
    };
    let size = message.payload_len() + message.key().map_or(0, <[u8]>::len);
    match decode(message.key(), message.payload(), at.clone(), options) {
        Ok(update) => Received::Update(update, size),
        Err(reason) => Received::Invalid(at, reason),
    }
}
