//! The worker loop: consume → decode → buffer → flush (dead letters and positions) →
//! commit offsets.
//!
//! Invariants kept here:
//! - At most one flush is in flight; while it runs, reading continues into the next
//!   buffer until that buffer is full, then reading stops (memory stays bounded).
//! - Kafka offsets are committed only after the flush that covers them is durable
//!   ([`crate::sink`] gives the order), and only for partitions this worker still owns.
//! - A rejected message never stops the partition: it becomes a dead letter in the
//!   batch, and its offset advances with the batch.
//! - With dead letters in a Delta table, a message at or below the offset the positions
//!   table records for its partition is skipped: it is durable already, whatever the
//!   group's committed offset says.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{Batch, Buffer, Limits};
use crate::config::Config;
use crate::dead_letter::{DeadLetter, ReasonCounts};
use crate::decode::{DecodeOptions, decode};
use crate::kafka::{self, SinkConsumer};
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};
use crate::retry::retry;
use crate::sink::{DeadLetterSink, FlushError, FlushReport, Sinks};
pub use crate::status::Progress;
use crate::table::{PositionTable, TableError};
use crate::update::PositionUpdate;

/// Rejected messages logged one by one per flush window; the rest are only counted.
const REJECTIONS_LOGGED_PER_FLUSH: usize = 20;

/// Why a worker stopped with an error. Offsets past the failure were not committed;
/// a restart resumes from the table's recorded offsets.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The Kafka client could not be created or subscribed.
    #[error("Kafka consumer setup failed: {0}. Check kafka.brokers, kafka.topics and kafka.librdkafka")]
    Kafka(#[from] KafkaError),
    /// A table failed and retries (retry.max_retries) were exhausted.
    #[error("{0}")]
    Table(#[from] TableError),
    /// A flush failed: a table after its retries, or the dead-letter topic.
    #[error("{0}")]
    Flush(#[from] FlushError),
    /// The flush task panicked (a bug).
    #[error("the flush task failed: {0}")]
    FlushTask(#[from] tokio::task::JoinError),
    /// The last flush did not finish within worker.shutdown_timeout.
    #[error(
        "shutdown timed out after {0:?} waiting for the last flush; nothing unwritten was committed and it will be re-read"
    )]
    ShutdownTimedOut(Duration),
}

/// Faults a test can inject to prove recovery, and live counters it can watch.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Stop with an error right after this many positions-table commits, before
    /// committing their Kafka offsets — a crash between the Delta and Kafka commits.
    pub crash_after_delta_commits: Option<usize>,
    /// Stop with an error at the this-many-th dead-letter write: with a dead-letter
    /// table, right after its commit and before the positions table's commit; with a
    /// dead-letter topic, with the transaction sent but left uncommitted.
    pub crash_after_dead_letter_commits: Option<usize>,
    /// Abort the whole process (as SIGKILL would) right after a positions commit and
    /// before its Kafka commit, with this probability per commit (0 = never). For
    /// crash tests of the binary: `POSITION_SINK_FAULT_ABORT_AFTER_DELTA_COMMIT`.
    pub abort_after_delta_commit: f64,
    /// Before its first flush of a non-empty buffer, the worker waits for this to be
    /// notified, without polling Kafka: a stalled worker whose partitions are taken over
    /// meanwhile (a zombie).
    pub hold_first_flush: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// Counters and health updated while the worker runs.
    pub progress: std::sync::Arc<Progress>,
}

impl Faults {
    /// Aborts the process with probability `abort_after_delta_commit`.
    pub fn maybe_abort_after_delta_commit(&self) {
        if self.abort_after_delta_commit <= 0.0 {
            return;
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let draw = f64::from(nanos.wrapping_mul(2_654_435_761) % 1_000_000) / 1_000_000.0;
        if draw < self.abort_after_delta_commit {
            eprintln!("position-sink: injected abort after a Delta commit, before its Kafka commit");
            std::process::abort();
        }
    }
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
    /// Dead letters written, by reason.
    pub dead_letters: ReasonCounts,
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
    let sinks = Sinks::open(&config).await?;
    let dead_letters = match &sinks.dead_letters {
        DeadLetterSink::Table(t) => format!("table {}", t.uri()),
        DeadLetterSink::Topic(t) => format!("topic {}", t.topic()),
    };
    info!(table = sinks.positions.uri(), version = ?sinks.positions.version().map(|v| v.0), dead_letters, "opened destinations");
    let consumer = kafka::subscribe(&config.kafka, faults.progress.clone())?;
    info!(brokers = %config.kafka.brokers, group = %config.kafka.group_id, topics = ?config.kafka.topics, "subscribed");
    let progress = faults.progress.clone();
    let mut worker = Worker::new(config, consumer, sinks, faults);
    let result = worker.run(shutdown).await;
    progress.health.set_stopped();
    result.map(|()| worker.summary)
}

/// A flush running in the background: it hands the sinks back when done.
type InFlight = JoinHandle<Flushed>;
type Flushed = (Sinks, Batch, Result<FlushReport, FlushError>);

/// What the broker handed us, decoded and detached from the consumer.
enum Received {
    Update(PositionUpdate, usize),
    Invalid(DeadLetter),
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
    /// The destinations when no flush is running.
    idle_sinks: Option<Sinks>,
    /// Whether the positions table's recorded offsets vouch for dead letters too, so
    /// messages below them are skipped (dead letters in a table), or the group's
    /// committed offsets are the record (dead letters in a topic).
    skip_recorded: bool,
    /// A separate handle for reading recorded offsets while a flush runs.
    reader: PositionTable,
    in_flight: Option<InFlight>,
    floors: HashMap<TopicPartition, Floor>,
    /// First offset consumed per partition since assignment: where a rewind goes when
    /// nothing of the partition was committed yet.
    started: HashMap<TopicPartition, Offset>,
    /// Highest offset consumed per partition since assignment.
    consumed: OffsetMap,
    /// Highest offset durable per partition, for the final commit.
    durable: OffsetMap,
    /// Committed offsets of partitions nothing was consumed from (`exit_when_caught_up`).
    committed_next: HashMap<TopicPartition, Offset>,
    committed_looked_up: Option<Instant>,
    /// Rejections logged individually in the current flush window.
    rejections_logged: usize,
    /// Flushes in a row whose dead-letter transaction was aborted.
    aborted_in_a_row: usize,
    faults: Faults,
    summary: RunSummary,
}

impl Worker {
    fn new(config: Config, consumer: SinkConsumer, sinks: Sinks, faults: Faults) -> Self {
        let limits = Limits { max_records: config.flush.max_records, max_bytes: config.flush.max_bytes };
        Self {
            decode_options: DecodeOptions {
                key_columns: config.delta.key_columns.clone(),
                max_message_bytes: config.decode.max_message_bytes,
            },
            buffer: Buffer::new(config.delta.key_columns.clone(), limits),
            reader: sinks.positions.clone(),
            skip_recorded: sinks.table_offsets_cover_dead_letters(),
            idle_sinks: Some(sinks),
            in_flight: None,
            floors: HashMap::new(),
            started: HashMap::new(),
            consumed: OffsetMap::default(),
            durable: OffsetMap::default(),
            committed_next: HashMap::new(),
            committed_looked_up: None,
            rejections_logged: 0,
            aborted_in_a_row: 0,
            consumer,
            config,
            faults,
            summary: RunSummary::default(),
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.config.flush.interval, self.config.flush.interval);
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
                    self.finish_flush(done?).await?;
                }
                _ = tick.tick() => self.flush_now().await,
                message = self.consumer.recv(), if can_read => {
                    let received = receive(message, &self.decode_options);
                    self.handle(received).await?;
                }
            }
            if self.buffer.is_full() {
                self.flush_now().await;
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
                if self.is_to_write(&update.source).await? {
                    self.buffer.push(update, size);
                }
            }
            Received::Invalid(dead_letter) => {
                if self.is_to_write(&dead_letter.source).await? {
                    self.log_rejection(&dead_letter);
                    self.buffer.reject(dead_letter);
                }
            }
            Received::EndOfPartition => {}
            Received::Error(error) => warn!(%error, "Kafka consumer error; librdkafka retries by itself"),
        }
        self.faults.progress.observe_buffered_bytes(self.buffer.bytes());
        Ok(())
    }

    /// Counts a consumed message and tells whether it still has to be written.
    async fn is_to_write(&mut self, at: &Coordinates) -> Result<bool, WorkerError> {
        self.summary.messages += 1;
        Progress::bump(&self.faults.progress.messages);
        self.consumed.observe(&at.tp, at.offset);
        if !self.started.contains_key(&at.tp) {
            self.started.insert(at.tp.clone(), at.offset);
        }
        if self.is_already_written(at).await? {
            self.summary.skipped_already_written += 1;
            return Ok(false);
        }
        Ok(true)
    }

    /// Logs a rejection with its coordinates, up to a bound per flush window.
    fn log_rejection(&mut self, dead_letter: &DeadLetter) {
        if self.rejections_logged < REJECTIONS_LOGGED_PER_FLUSH {
            self.rejections_logged += 1;
            let at = &dead_letter.source;
            warn!(topic = %at.tp.topic, partition = at.tp.partition.0, offset = at.offset.0,
                category = %dead_letter.category, reason = %dead_letter.reason,
                "rejected message; it goes to the dead letters");
        }
    }

    /// Whether the table already holds this message (its partition's recorded offset
    /// is at or above it). Loads the recorded offsets of newly assigned partitions.
    async fn is_already_written(&mut self, at: &Coordinates) -> Result<bool, WorkerError> {
        if !self.skip_recorded {
            return Ok(false);
        }
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
        self.reader = retry(
            &self.config.retry,
            "read the table's recorded offsets",
            || reader.refreshed(),
            TableError::is_retryable,
        )
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
            self.started.remove(tp);
            self.committed_next.remove(tp);
            self.consumed.remove(tp);
            self.durable.remove(tp);
        }
    }

    /// Reads the partitions of a batch whose dead-letter transaction was aborted again
    /// from their last committed offset, dropping what was buffered after it.
    fn rewind(&mut self, batch: &Batch) {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        self.buffer.drop_partitions(&partitions);
        let assigned = kafka::assignment(&self.consumer).unwrap_or_default();
        for tp in partitions.iter().filter(|tp| assigned.contains(tp)) {
            self.consumed.remove(tp);
            let target = self.durable.get(tp).map(Offset::next).or_else(|| self.started.get(tp).copied());
            if let Some(target) = target {
                info!(partition = %tp, offset = target.0, "reading again from the last committed offset");
                if let Err(error) = kafka::seek(&self.consumer, tp, target) {
                    warn!(%error, partition = %tp, "cannot seek back; the next assignment re-reads it");
                }
            }
        }
    }

    /// Starts a flush from the loop (tick or full buffer); a test may hold the first one.
    async fn flush_now(&mut self) {
        if !self.buffer.is_empty()
            && let Some(gate) = self.faults.hold_first_flush.take()
        {
            info!("holding the first flush until the test releases it");
            gate.notified().await;
        }
        self.start_flush();
    }

    /// Starts writing the buffer, unless it is empty or a flush is already running.
    fn start_flush(&mut self) {
        self.apply_revocations();
        self.rejections_logged = 0;
        if self.buffer.is_empty() {
            return;
        }
        let Some(sinks) = self.idle_sinks.take() else { return };
        let batch = self.buffer.take();
        let policy = self.config.retry.clone();
        let group = self.consumer.group_metadata().map(std::sync::Arc::new);
        let faults = self.faults.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let (sinks, result) = sinks.write(&batch, &policy, group, &faults).await;
            (sinks, batch, result)
        }));
    }

    async fn finish_flush(&mut self, (sinks, batch, result): Flushed) -> Result<(), WorkerError> {
        self.idle_sinks = Some(sinks);
        let report = match result {
            Ok(report) => report,
            Err(error) if error.can_reread() && self.aborted_in_a_row < self.config.retry.max_retries => {
                self.aborted_in_a_row += 1;
                Progress::bump(&self.faults.progress.rewinds);
                warn!(%error, attempt = self.aborted_in_a_row, "flush not committed to Kafka; reading its messages again");
                self.rewind(&batch);
                tokio::time::sleep(self.config.retry.min_delay * self.aborted_in_a_row as u32).await;
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        self.aborted_in_a_row = 0;
        Progress::bump(&self.faults.progress.flushes);
        let positions = &report.positions;
        if positions.committed {
            self.summary.delta_commits += 1;
            self.summary.rows_written += (positions.inserted + positions.updated) as u64;
        }
        for (tp, offset) in batch.offsets.iter() {
            self.durable.observe(tp, offset);
        }
        if !report.offsets_committed
            && let Err(error) = kafka::commit(&self.consumer, &batch.offsets, CommitMode::Async)
        {
            warn!(%error, "could not commit offsets to Kafka; the table's recorded offsets cover them");
        }
        if report.dead_letters.total() > 0 {
            self.summary.dead_letters.merge(&report.dead_letters);
            warn!(
                written = report.dead_letters.total(),
                by_reason = %report.dead_letters,
                total_by_reason = %self.summary.dead_letters,
                "dead-lettered rejected messages"
            );
        }
        info!(
            messages = batch.messages,
            rows_in = positions.rows_offered,
            inserted = positions.inserted,
            updated = positions.updated,
            dead_letters = batch.dead_letters.len(),
            version = positions.version.0,
            committed = positions.committed,
            duration_ms = positions.elapsed.as_millis() as u64,
            "flushed batch"
        );
        Ok(())
    }

    /// Waits for the running flush, if any, and commits its offsets.
    async fn await_in_flight(&mut self) -> Result<(), WorkerError> {
        if self.in_flight.is_some() {
            let done = join(&mut self.in_flight).await?;
            self.in_flight = None;
            self.finish_flush(done).await?;
        }
        Ok(())
    }

    /// Whether every assigned partition is consumed to its high watermark and written.
    fn is_caught_up(&mut self) -> bool {
        if !self.buffer.is_empty() || self.in_flight.is_some() {
            return false;
        }
        let Ok(assigned) = kafka::assignment(&self.consumer) else { return false };
        self.look_up_committed(&assigned);
        !assigned.is_empty()
            && assigned.iter().all(|tp| {
                // Messages below the floor may have been skipped by a seek, unseen; a
                // partition read from nothing but its committed offset starts there.
                let next = self
                    .consumed
                    .get(tp)
                    .map(Offset::next)
                    .max(self.floors.get(tp).map(|f| f.next))
                    .max(self.committed_next.get(tp).copied());
                match kafka::cached_high_watermark(&self.consumer, tp) {
                    Some(high) => next.unwrap_or(Offset(0)) >= high,
                    None => false,
                }
            })
    }

    /// For `exit_when_caught_up`: the group's committed offsets of assigned partitions
    /// nothing was consumed from yet (a partition already read to its end yields no
    /// message to learn its position from). At most once a second; blocks briefly.
    fn look_up_committed(&mut self, assigned: &[TopicPartition]) {
        let unknown: Vec<TopicPartition> = assigned
            .iter()
            .filter(|tp| self.consumed.get(tp).is_none() && !self.committed_next.contains_key(*tp))
            .cloned()
            .collect();
        if unknown.is_empty() || self.committed_looked_up.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.committed_looked_up = Some(Instant::now());
        match kafka::committed(&self.consumer, &unknown, Duration::from_secs(5)) {
            Ok(committed) => self.committed_next.extend(committed),
            Err(error) => debug!(%error, "committed offsets not available yet"),
        }
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
        // With dead letters in a topic every flush committed its offsets already.
        if self.skip_recorded
            && !self.durable.is_empty()
            && let Err(error) = kafka::commit(&self.consumer, &self.durable, CommitMode::Sync)
        {
            warn!(%error, "final Kafka offset commit failed; the table's recorded offsets cover it");
        }
        info!(
            messages = self.summary.messages,
            delta_commits = self.summary.delta_commits,
            dead_letters = self.summary.dead_letters.total(),
            by_reason = %self.summary.dead_letters,
            "worker stopped"
        );
        Ok(())
    }
}

async fn join(in_flight: &mut Option<InFlight>) -> Result<Flushed, WorkerError> {
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
    let at =
        Coordinates { tp: TopicPartition::new(message.topic(), message.partition()), offset: Offset(message.offset()) };
    let size = message.payload_len() + message.key().map_or(0, <[u8]>::len);
    match decode(message.key(), message.payload(), at.clone(), options) {
        Ok(update) => Received::Update(update, size),
        Err(reason) => Received::Invalid(DeadLetter::new(
            at,
            message.key(),
            message.payload(),
            message.timestamp().to_millis(),
            &reason,
        )),
    }
}
