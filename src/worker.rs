//! The worker loop: consume → decode → buffer → flush (dead letters and positions) →
//! commit offsets. The loop only waits and carries out what [`Partitions`] decides.
//!
//! Invariants kept here:
//! - At most one flush is in flight; while it runs, reading continues into the next
//!   buffer until that buffer is full, then reading stops (memory stays bounded).
//! - Kafka offsets are committed only after the flush that covers them is durable
//!   ([`crate::sink`] gives the order), only for partitions this worker still owns, and
//!   again after a failure until they stick ([`crate::partitions`] keeps the books).
//! - A rejected message never stops the partition: it becomes a dead letter in the
//!   batch, and its offset advances with the batch.
//! - Every wait observes shutdown; on shutdown the running flush and the buffer are
//!   written and committed within `worker.shutdown_timeout`.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{Batch, Buffer, Limits};
use crate::config::{Config, OnOffsetGap};
use crate::dead_letter::DeadLetter;
use crate::decode::{DecodeOptions, decode};
use crate::faults::CrashPoints;
use crate::kafka::{self, Rebalanced, SinkConsumer};
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::partitions::{CommitNews, CommitOutcome, Partitions, Seen, Start};
use crate::retry::retry;
use crate::sink::{DeadLetterSink, FlushError, FlushReport, Sinks};
use crate::status::{Progress, RunSummary};
use crate::table::{PositionTable, TableError};
use crate::update::PositionUpdate;

/// Rejected messages logged one by one per flush window; the rest are only counted.
const REJECTIONS_LOGGED_PER_FLUSH: usize = 20;

/// How long to wait for a partition's log start when the table's start is checked.
const WATERMARK_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait for the group's committed offsets when they are looked up.
const COMMITTED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The HTTP listener could not start (`http.bind`).
    #[error("{0}")]
    Http(String),
    /// The flush task panicked (a bug).
    #[error("the flush task failed: {0}")]
    FlushTask(#[from] tokio::task::JoinError),
    /// The table needs messages that retention already deleted.
    #[error(
        "the table resumes partition {partition} at offset {needed}, but the oldest offset still in Kafka is \
         {oldest}: retention deleted {needed}..{oldest}. Restore the table from a backup that covers them, or \
         accept the gap with recovery.on_offset_gap = \"continue\""
    )]
    OffsetGap {
        /// The partition.
        partition: TopicPartition,
        /// The first offset the table needs.
        needed: i64,
        /// The oldest offset the partition still has.
        oldest: i64,
    },
    /// No connection to the cluster can be made: wrong credentials or certificates.
    #[error(transparent)]
    Connection(#[from] kafka::ConnectionFault),
    /// A batch could not be read, again and again, past the retry policy.
    #[error(
        "{} cannot be read after {attempts} attempts: {}. Nothing at or after that offset of the partition was \
         committed, and a restart reads it again. {}",
        describe_unreadable(.at), .at.fault.cause(), .at.fault.fix()
    )]
    UnreadableBatch {
        /// Where, and why.
        at: kafka::UnreadableBatch,
        /// Attempts made.
        attempts: usize,
    },
    /// The last flush did not finish within worker.shutdown_timeout.
    #[error(
        "shutdown timed out after {0:?} waiting for the last flush; nothing unwritten was committed and it will be re-read"
    )]
    ShutdownTimedOut(Duration),
}

/// "partition P: the batch at offset O".
fn describe_unreadable(at: &kafka::UnreadableBatch) -> String {
    format!("partition {}: the batch at offset {}", at.tp, at.offset.0)
}

/// Runs a worker until `shutdown` is cancelled (or, with `worker.exit_when_caught_up`,
/// until every assigned partition is written to its end), then flushes and commits.
///
/// # Errors
/// See [`WorkerError`].
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<RunSummary, WorkerError> {
    run_with_progress(config, shutdown, Arc::default()).await
}

/// [`run`], keeping `progress` current while it runs (counters and health for probes,
/// metrics and tests). The summary returned is taken from it.
///
/// # Errors
/// See [`WorkerError`].
pub async fn run_with_progress(
    config: Config,
    shutdown: CancellationToken,
    progress: Arc<Progress>,
) -> Result<RunSummary, WorkerError> {
    run_inner(config, shutdown, progress, CrashPoints::default()).await
}

/// [`run_with_progress`], with crash points set by a test (feature `fault-injection`).
///
/// # Errors
/// See [`WorkerError`].
#[cfg(feature = "fault-injection")]
pub async fn run_with_crash_points(
    config: Config,
    shutdown: CancellationToken,
    progress: Arc<Progress>,
    crash: CrashPoints,
) -> Result<RunSummary, WorkerError> {
    run_inner(config, shutdown, progress, crash).await
}

async fn run_inner(
    config: Config,
    shutdown: CancellationToken,
    progress: Arc<Progress>,
    crash: CrashPoints,
) -> Result<RunSummary, WorkerError> {
    // The listener stops with the worker, whatever ends it.
    let http_stop = shutdown.child_token();
    let _stop_http = http_stop.clone().drop_guard();
    let result = match config.http.bind.trim() {
        "" => start_and_run(config, &shutdown, &progress, crash).await,
        bind => match crate::http::start(bind, progress.clone(), http_stop).await {
            Ok(_) => start_and_run(config, &shutdown, &progress, crash).await,
            Err(message) => Err(WorkerError::Http(message)),
        },
    };
    progress.health.set_stopped();
    let summary = progress.summary();
    info!(
        messages = summary.messages,
        skipped_already_written = summary.skipped_already_written,
        delta_commits = summary.delta_commits,
        commit_conflicts = summary.commit_conflicts,
        rows_written = summary.rows_written,
        dead_letters = summary.dead_letters.total(),
        by_reason = %summary.dead_letters,
        ok = result.is_ok(),
        "worker stopped"
    );
    result.map(|()| summary)
}

async fn start_and_run(
    config: Config,
    shutdown: &CancellationToken,
    progress: &Arc<Progress>,
    crash: CrashPoints,
) -> Result<(), WorkerError> {
    let sinks = Sinks::open(&config).await?;
    let dead_letters = match &sinks.dead_letters {
        DeadLetterSink::Table(t) => format!("table {}", t.uri()),
        DeadLetterSink::Topic(t) => format!("topic {}", t.topic()),
    };
    info!(table = sinks.positions.uri(), version = ?sinks.positions.version().map(|v| v.0), dead_letters, "opened destinations");
    let consumer = kafka::subscribe(&config.kafka, progress.clone())?;
    info!(brokers = %config.kafka.brokers, group = %config.kafka.group_id, topics = ?config.kafka.topics, "subscribed");
    let mut worker = Worker::new(config, consumer, sinks, progress.clone(), crash);
    worker.run(shutdown).await
}

/// A batch that could not be read, while it is read again.
struct Unreadable {
    /// Where and why; `None` when each partition read alone read well.
    at: Option<kafka::UnreadableBatch>,
    /// Attempts at it so far.
    attempts: usize,
    /// When reading resumes after the pause that follows it.
    resumes_at: Option<Instant>,
}

/// A flush running in the background: it hands the sinks back when done.
type InFlight = JoinHandle<Flushed>;
type Flushed = (Sinks, Batch, Result<FlushReport, FlushError>);

/// An offset commit waiting for the group's answer, on a blocking thread.
type Committing = JoinHandle<CommitOutcome>;

/// What the broker handed us, decoded and detached from the consumer.
enum Received {
    /// A valid update, its size in bytes and its Kafka timestamp (ms).
    Update(PositionUpdate, usize, Option<i64>),
    Invalid(DeadLetter),
    EndOfPartition,
    Error(KafkaError),
}

struct Worker {
    config: Config,
    consumer: Arc<SinkConsumer>,
    /// The commit request in flight, if any (one at a time).
    committing: Option<Committing>,
    decode_options: DecodeOptions,
    buffer: Buffer,
    partitions: Partitions,
    /// The destinations when no flush is running.
    idle_sinks: Option<Sinks>,
    /// A separate handle for reading recorded offsets while a flush runs.
    reader: PositionTable,
    in_flight: Option<InFlight>,
    /// Rejections logged individually in the current flush window.
    rejections_logged: usize,
    /// Flushes in a row whose dead-letter transaction was aborted.
    aborted_in_a_row: usize,
    /// Whether every assigned partition was last seen read to its end.
    read_to_end: bool,
    /// When the group's committed offsets were last looked up.
    looked_up_at: Option<Instant>,
    /// When moving a partition to the table's start last failed (retried after a second).
    starts_tried_at: Option<Instant>,
    /// A batch that could not be read, while it is read again.
    unreadable: Option<Unreadable>,
    progress: Arc<Progress>,
    crash: CrashPoints,
}

impl Worker {
    fn new(config: Config, consumer: SinkConsumer, sinks: Sinks, progress: Arc<Progress>, crash: CrashPoints) -> Self {
        let limits = Limits { max_records: config.flush.max_records, max_bytes: config.flush.max_bytes };
        Self {
            decode_options: DecodeOptions {
                key_columns: config.delta.key_columns.clone(),
                max_message_bytes: config.decode.max_message_bytes,
            },
            buffer: Buffer::new(config.delta.key_columns.clone(), limits),
            partitions: Partitions::new(sinks.table_offsets_cover_dead_letters(), &config.retry)
                .with_unrecorded_from_start(config.kafka.auto_offset_reset == crate::config::OffsetReset::Earliest),
            reader: sinks.positions.clone(),
            idle_sinks: Some(sinks),
            in_flight: None,
            rejections_logged: 0,
            aborted_in_a_row: 0,
            read_to_end: false,
            looked_up_at: None,
            starts_tried_at: None,
            unreadable: None,
            consumer: Arc::new(consumer),
            committing: None,
            config,
            progress,
            crash,
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.config.flush.interval, self.config.flush.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.progress.turned();
            let flushing = self.in_flight.is_some();
            let committing = self.committing.is_some();
            let read_resumes = self.unreadable.as_ref().and_then(|u| u.resumes_at);
            let can_read = !self.buffer.is_full() && read_resumes.is_none();
            let commit_retry = self.partitions.commit_retry_at();
            tokio::select! {
                // Shutdown first, so a stop request never waits behind a backlog; then a
                // finished flush, so offsets are committed and the next flush can start
                // before more is read; then commit results, which free offsets to retry.
                biased;
                () = shutdown.cancelled() => break,
                done = join(&mut self.in_flight), if flushing => {
                    self.in_flight = None;
                    self.finish_flush(done?, shutdown).await?;
                }
                outcome = join(&mut self.committing), if committing => self.commit_finished(outcome),
                _ = tick.tick() => {
                    self.check_connection()?;
                    self.sync_assignment(shutdown).await?;
                    self.flush_now(shutdown).await;
                    self.sample_gauges();
                }
                () = sleep_until(commit_retry), if commit_retry.is_some() => {}
                () = sleep_until(read_resumes), if read_resumes.is_some() => self.resume_reading(),
                message = self.consumer.recv(), if can_read => {
                    let received = receive(message, &self.decode_options);
                    self.handle(received, shutdown).await?;
                }
            }
            // Exiting when caught up, the last batch has nothing more to wait for.
            let last_batch = self.config.worker.exit_when_caught_up && self.read_to_end;
            if self.buffer.is_full() || (last_batch && self.in_flight.is_none()) {
                self.flush_now(shutdown).await;
            }
            self.send_due_commits();
            if self.config.worker.exit_when_caught_up && self.is_caught_up(shutdown).await? {
                info!("every assigned partition is written to its end; exiting");
                break;
            }
        }
        self.drain(shutdown).await
    }

    async fn handle(&mut self, received: Received, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        // No move to the table's starts with a message in hand: it was read before the
        // move would take effect. `Partitions::seen` asks for the move from it instead.
        self.apply_rebalances();
        self.load_recorded(shutdown).await?;
        match received {
            Received::Update(update, size, kafka_time) => {
                self.note_readable(&update.source);
                if self.is_to_write(&update.source, shutdown).await? {
                    self.buffer.push(update, size);
                    self.buffer.note_kafka_time(kafka_time);
                }
            }
            Received::Invalid(dead_letter) => {
                self.note_readable(&dead_letter.source);
                if self.is_to_write(&dead_letter.source, shutdown).await? {
                    self.log_rejection(&dead_letter);
                    self.buffer.reject(dead_letter);
                }
            }
            Received::EndOfPartition => self.note_end_of_partition(),
            Received::Error(error) => match kafka::BatchFault::of(&error) {
                Some(fault) => self.read_again_after_unreadable(fault, shutdown).await?,
                None => {
                    self.check_connection()?;
                    warn!(%error, "Kafka consumer error; librdkafka retries by itself");
                }
            },
        }
        self.progress.observe_buffered_bytes(self.buffer.bytes());
        Ok(())
    }

    /// Applies the assignment changes librdkafka reported, then reads the table's
    /// recorded offsets of newly assigned partitions.
    async fn sync_assignment(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        self.apply_rebalances();
        self.load_recorded(shutdown).await?;
        self.move_to_starts(shutdown).await
    }

    /// Stops the worker when no connection to the cluster can be made (credentials,
    /// certificates) and none ever succeeded: a configuration error, not an outage.
    fn check_connection(&self) -> Result<(), WorkerError> {
        match self.consumer.context().watch.fatal() {
            Some(fault) => Err(fault.into()),
            None => Ok(()),
        }
    }

    /// Handles a batch librdkafka could not read ([`kafka::BatchFault`]): every
    /// assigned partition is read again from where it is durable (librdkafka goes on
    /// past a corrupt batch, and the error does not say which partition it was in), the
    /// batch is named by reading each partition alone, readiness fails with it, and
    /// reading pauses for the retry policy's next delay. Past `retry.max_retries`
    /// attempts at the same batch, the worker stops.
    async fn read_again_after_unreadable(
        &mut self,
        fault: kafka::BatchFault,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        Progress::bump(&self.progress.unreadable_batches);
        // The running flush holds only messages read before the error: it may finish.
        self.await_in_flight(shutdown).await?;
        let assigned = self.partitions.assigned_partitions();
        self.buffer.drop_partitions(&assigned);
        let mut starts = self.partitions.rewind(&assigned);
        // A partition with nothing read, durable or committed known starts where the
        // group's committed offset says, else where kafka.auto_offset_reset says.
        let unknown: Vec<TopicPartition> =
            assigned.iter().filter(|tp| !starts.iter().any(|(t, _)| t == *tp)).cloned().collect();
        if !unknown.is_empty() {
            let consumer = self.consumer.clone();
            let lookup =
                tokio::task::spawn_blocking(move || kafka::committed(&consumer, &unknown, COMMITTED_LOOKUP_TIMEOUT));
            match lookup.await? {
                Ok(found) => starts.extend(found),
                Err(error) => warn!(%error, "committed offsets not available; reading from kafka.auto_offset_reset"),
            }
        }
        for tp in &assigned {
            let target = match starts.iter().find(|(t, _)| t == tp) {
                Some((_, offset)) => rdkafka::Offset::Offset(offset.0),
                None if self.config.kafka.auto_offset_reset == crate::config::OffsetReset::Earliest => {
                    rdkafka::Offset::Beginning
                }
                None => rdkafka::Offset::End,
            };
            if let Err(error) = self.consumer.seek(&tp.topic, tp.partition.0, target, Duration::ZERO) {
                warn!(%error, partition = %tp, "cannot seek back; the next assignment reads it again");
            }
        }
        let kafka_config = self.config.kafka.clone();
        let found = tokio::task::spawn_blocking(move || kafka::find_unreadable(&kafka_config, &starts));
        let found = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            found = found => found?,
        };
        let at = found.unwrap_or_else(|error| {
            warn!(%error, "cannot read the partitions one by one to find the batch");
            None
        });
        let attempts = match &self.unreadable {
            Some(previous) if previous.at == at => previous.attempts + 1,
            _ => 1,
        };
        let pause = crate::retry::delays(&self.config.retry).nth(attempts - 1).unwrap_or(self.config.retry.max_delay);
        let Some(at) = at else {
            // Read alone, every partition read well: a fault on the way, read again.
            warn!(
                cause = fault.cause(),
                attempt = attempts,
                "Kafka delivered a batch the client could not read, which read well when read again; reading on"
            );
            self.progress.health.set_unreadable(Some(format!("a batch of an assigned partition: {}", fault.cause())));
            self.unreadable = Some(Unreadable { at: None, attempts, resumes_at: Some(Instant::now() + pause) });
            return Ok(());
        };
        self.progress.health.set_unreadable(Some(format!("{}: {}", describe_unreadable(&at), at.fault.cause())));
        tracing::error!(topic = %at.tp.topic, partition = at.tp.partition.0, offset = at.offset.0,
            cause = at.fault.cause(), attempt = attempts, max_retries = self.config.retry.max_retries,
            "Kafka delivered a batch the client cannot read; nothing from it on is committed, it is read again");
        if attempts > self.config.retry.max_retries {
            return Err(WorkerError::UnreadableBatch { at, attempts });
        }
        self.unreadable = Some(Unreadable { at: Some(at), attempts, resumes_at: Some(Instant::now() + pause) });
        Ok(())
    }

    /// Reading goes on after the pause that follows a batch that could not be read.
    fn resume_reading(&mut self) {
        if let Some(unreadable) = &mut self.unreadable {
            unreadable.resumes_at = None;
        }
    }

    /// A message read at `at` ends the fault of the batch that could not be read, once
    /// it is past that batch (or, when the batch was not found again, at once).
    fn note_readable(&mut self, at: &Coordinates) {
        let Some(unreadable) = &self.unreadable else { return };
        let passed = unreadable.at.as_ref().is_none_or(|batch| at.tp == batch.tp && at.offset >= batch.offset);
        if passed {
            if unreadable.at.is_some() {
                info!(partition = %at.tp, offset = at.offset.0, "the batch that could not be read is read now");
            }
            self.forget_unreadable();
        }
    }

    /// Ends the fault of the batch that could not be read.
    fn forget_unreadable(&mut self) {
        self.unreadable = None;
        self.progress.health.set_unreadable(None);
    }

    /// Applies assignment changes: revoked partitions' buffers are dropped (their new
    /// owner re-reads them) and their bookkeeping forgotten.
    fn apply_rebalances(&mut self) {
        for event in self.consumer.context().take_rebalances() {
            match event {
                Rebalanced::Assigned(partitions) => {
                    self.partitions.assigned(&partitions);
                    self.progress.joined.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Rebalanced::Revoked(partitions) => {
                    // Its new owner meets the batch that cannot be read, if it still cannot.
                    if self.unreadable.as_ref().and_then(|u| u.at.as_ref()).is_some_and(|b| partitions.contains(&b.tp))
                    {
                        self.forget_unreadable();
                    }
                    self.buffer.drop_partitions(&partitions);
                    self.partitions.revoked(&partitions);
                    for tp in &partitions {
                        self.progress.metrics.forget_lag(tp);
                    }
                }
            }
            self.progress.assigned_partitions.store(self.partitions.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reads the table's recorded offsets of the partitions that need them. A record a
    /// RESTORE undid is first set back to what the restored content goes with.
    async fn load_recorded(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        let partitions = self.partitions.to_load();
        if partitions.is_empty() {
            return Ok(());
        }
        let reader = &self.reader;
        let retry_policy = &self.config.retry;
        let read = async {
            let read_records = || async {
                let fresh = reader.refreshed().await?;
                let undone = fresh.records_undone_by_restore(&partitions).await?;
                Ok::<_, TableError>((fresh, undone))
            };
            let (mut fresh, undone) =
                retry(retry_policy, "read the table's recorded offsets", read_records, TableError::is_retryable)
                    .await?;
            if !undone.is_empty() {
                for (tp, record) in &undone {
                    warn!(partition = %tp, restored_record = record.map(|o| o.0),
                        "the table was restored to an earlier version; its record of this partition is set back \
                         to what the restored content holds, and the partition is read again from there");
                }
                fresh = retry(
                    retry_policy,
                    "reset the table's recorded offsets after a restore",
                    || fresh.reset_records(&undone),
                    TableError::is_retryable,
                )
                .await?;
            }
            let recorded = fresh.recorded_offsets(&partitions).await?;
            Ok::<_, TableError>((fresh, recorded))
        };
        let recorded;
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            read = read => (self.reader, recorded) = read?,
        }
        for tp in &partitions {
            self.partitions.loaded(tp, recorded.get(tp).copied());
        }
        Ok(())
    }

    /// Counts a consumed message and tells whether it still has to be written.
    async fn is_to_write(&mut self, at: &Coordinates, shutdown: &CancellationToken) -> Result<bool, WorkerError> {
        self.read_to_end = false;
        let mut seen = self.partitions.seen(at);
        if seen == Seen::Unknown {
            // A message of a partition whose assignment was not reported yet.
            if !self.partitions.is_assigned(&at.tp) {
                self.partitions.assigned(std::slice::from_ref(&at.tp));
            }
            self.load_recorded(shutdown).await?;
            seen = self.partitions.seen(at);
        }
        if !matches!(seen, Seen::Rewind { .. }) {
            // A message dropped for a move back is read again, and counted then.
            Progress::bump(&self.progress.messages);
        }
        match seen {
            Seen::Write => Ok(true),
            Seen::Skip { seek_to } => {
                Progress::bump(&self.progress.skipped_already_written);
                if let Some(next) = seek_to {
                    info!(partition = %at.tp, from = at.offset.0, to = next.0, "skipping messages the table already holds");
                    if let Err(error) = kafka::seek(&self.consumer, &at.tp, next) {
                        debug!(%error, "seek not possible yet; skipping message by message");
                    }
                }
                Ok(false)
            }
            // Stopping while the table was read: the message is read again next time.
            Seen::Unknown => Ok(false),
            Seen::Rewind { from } => {
                self.read_again_from(at, from, shutdown).await?;
                Ok(false)
            }
        }
    }

    /// Moves reading of the partitions just loaded to where the table says they start.
    async fn move_to_starts(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        if self.partitions.starts_wait_for_committed() {
            self.look_up_unknown_positions(shutdown).await;
        }
        let due = self.partitions.starts_due();
        if due.is_empty() || self.starts_tried_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Ok(());
        }
        self.starts_tried_at = None;
        for (tp, start) in due {
            if self.move_to(&tp, start, None, shutdown).await? {
                self.partitions.moved_to_start(&tp, start);
            } else {
                self.starts_tried_at = Some(Instant::now());
            }
        }
        Ok(())
    }

    /// Moves reading of `at`'s partition back to where the table says it starts.
    async fn read_again_from(
        &mut self,
        at: &Coordinates,
        from: Start,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        if !self.move_to(&at.tp, from, Some(at.offset), shutdown).await? {
            self.partitions.rewind_failed(&at.tp, from);
        }
        Ok(())
    }

    /// Seeks `tp` to `start`, after checking that Kafka still has the messages there
    /// (`recovery.on_offset_gap`). Whether the seek was accepted.
    async fn move_to(
        &mut self,
        tp: &TopicPartition,
        start: Start,
        reading_at: Option<Offset>,
        shutdown: &CancellationToken,
    ) -> Result<bool, WorkerError> {
        let target = match start {
            Start::Beginning => {
                info!(partition = %tp, reading_at = reading_at.map(|o| o.0),
                    "the table has no record of this partition; reading it from its start (kafka.auto_offset_reset)");
                rdkafka::Offset::Beginning
            }
            Start::At(needed) => {
                let consumer = self.consumer.clone();
                let topic_partition = tp.clone();
                let lookup = tokio::task::spawn_blocking(move || {
                    consumer.fetch_watermarks(
                        &topic_partition.topic,
                        topic_partition.partition.0,
                        WATERMARK_LOOKUP_TIMEOUT,
                    )
                });
                let oldest = tokio::select! {
                    () = shutdown.cancelled() => return Ok(false),
                    found = lookup => match found {
                        Ok(Ok((low, _))) => low,
                        Ok(Err(error)) => {
                            debug!(%error, partition = %tp, "log start not known yet");
                            return Ok(false);
                        }
                        Err(error) => return Err(error.into()),
                    },
                };
                if needed.0 >= oldest {
                    if reading_at.is_some() {
                        info!(partition = %tp, from = reading_at.map(|o| o.0), to = needed.0,
                            "the table is behind the group's committed offset; reading again from the table's record");
                    }
                    rdkafka::Offset::Offset(needed.0)
                } else if self.config.recovery.on_offset_gap == OnOffsetGap::Continue {
                    Progress::bump(&self.progress.offset_gaps);
                    warn!(partition = %tp, needed = needed.0, oldest,
                        "retention deleted offsets the table needs; continuing from the oldest one \
                         (recovery.on_offset_gap = \"continue\")");
                    rdkafka::Offset::Offset(oldest)
                } else {
                    return Err(WorkerError::OffsetGap { partition: tp.clone(), needed: needed.0, oldest });
                }
            }
        };
        match self.consumer.seek(&tp.topic, tp.partition.0, target, Duration::ZERO) {
            Ok(()) => Ok(true),
            Err(error) => {
                debug!(%error, partition = %tp, "seek not possible yet");
                Ok(false)
            }
        }
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

    /// Notes, once, when every assigned partition has been read to its end.
    fn note_end_of_partition(&mut self) {
        let consumer = &self.consumer;
        let at_end = self.partitions.is_read_to_end(|tp| kafka::cached_watermarks(consumer, tp));
        if at_end && !self.read_to_end {
            debug!(partitions = self.partitions.len(), "read every assigned partition to its end");
        }
        self.read_to_end = at_end;
    }

    /// Starts a flush from the loop (tick or full buffer); a test may hold the first one.
    async fn flush_now(&mut self, shutdown: &CancellationToken) {
        if !self.buffer.is_empty()
            && let Some(gate) = self.crash.take_flush_hold()
        {
            info!("holding the first flush until the test releases it");
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = gate.notified() => {}
            }
        }
        self.start_flush();
    }

    /// Starts writing the buffer, unless it is empty or a flush is already running.
    fn start_flush(&mut self) {
        self.apply_rebalances();
        self.rejections_logged = 0;
        if self.buffer.is_empty() {
            return;
        }
        let Some(sinks) = self.idle_sinks.take() else { return };
        let batch = self.buffer.take();
        self.progress.set_buffered(0, 0, false);
        let policy = self.config.retry.clone();
        let group = kafka::group_metadata_if_member(&self.consumer).map(Arc::new);
        let progress = self.progress.clone();
        let crash = self.crash.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let (sinks, result) = sinks.write(&batch, &policy, group, &progress, &crash).await;
            (sinks, batch, result)
        }));
    }

    async fn finish_flush(
        &mut self,
        (sinks, batch, result): Flushed,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        self.idle_sinks = Some(sinks);
        self.apply_rebalances();
        let report = match result {
            Ok(report) => report,
            Err(error) if error.can_reread() && self.aborted_in_a_row < self.config.retry.max_retries => {
                self.aborted_in_a_row += 1;
                Progress::bump(&self.progress.rewinds);
                warn!(%error, attempt = self.aborted_in_a_row, "flush not committed to Kafka; reading its messages again");
                self.rewind(&batch);
                let pause = self.config.retry.min_delay * self.aborted_in_a_row as u32;
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(pause) => {}
                }
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        self.aborted_in_a_row = 0;
        Progress::bump(&self.progress.flushes);
        if report.offsets_committed {
            self.partitions.flushed_and_committed(&batch.offsets);
        } else {
            self.partitions.flushed(&batch.offsets);
        }
        let positions = &report.positions;
        if positions.committed {
            Progress::add(&self.progress.rows_written, (positions.inserted + positions.updated) as u64);
            self.observe_flush(&batch, positions);
        }
        if report.dead_letters.total() > 0 {
            self.progress.add_dead_letters(&report.dead_letters);
            warn!(
                written = report.dead_letters.total(),
                by_reason = %report.dead_letters,
                total_by_reason = %self.progress.dead_letters(),
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
            files_removed = positions.files_removed,
            files_added = positions.files_added,
            rows_rewritten = positions.rows_rewritten,
            bytes_written = positions.bytes_written,
            duration_ms = positions.elapsed.as_millis() as u64,
            "flushed batch"
        );
        Ok(())
    }

    /// Feeds a committed flush into the histograms: its duration and size, and how long
    /// its rows took from their event time and their Kafka timestamp to the commit.
    fn observe_flush(&self, batch: &Batch, positions: &crate::table::WriteReport) {
        let metrics = &self.progress.metrics;
        metrics.flush_seconds.observe(positions.elapsed.as_secs_f64());
        metrics.batch_messages.observe(batch.messages as f64);
        self.progress.table_version.store(positions.version.0, std::sync::atomic::Ordering::Relaxed);
        let now_micros = chrono::Utc::now().timestamp_micros();
        for row in &batch.rows {
            metrics.latency_from_event.observe((now_micros - row.timestamp_micros).max(0) as f64 / 1e6);
        }
        for millis in &batch.kafka_times_ms {
            metrics.latency_from_kafka.observe((now_micros / 1000 - millis).max(0) as f64 / 1e3);
        }
    }

    /// Samples the gauges once per flush tick, not per message: what the buffer holds,
    /// and each assigned partition's consumer lag (the log end, as librdkafka last saw
    /// it, minus the group's committed offset).
    fn sample_gauges(&self) {
        self.progress.set_buffered(self.buffer.messages(), self.buffer.bytes(), self.buffer.is_full());
        for (tp, committed) in self.partitions.committed_offsets() {
            if let Some((low, high)) = kafka::cached_watermarks(&self.consumer, &tp) {
                self.progress.metrics.set_lag(&tp, (high.0 - committed.unwrap_or(low).0).max(0));
            }
        }
    }

    /// Reads the partitions of a batch whose dead-letter transaction was aborted again
    /// from their last committed offset, dropping what was buffered after it.
    fn rewind(&mut self, batch: &Batch) {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        self.buffer.drop_partitions(&partitions);
        for (tp, target) in self.partitions.rewind(&partitions) {
            info!(partition = %tp, offset = target.0, "reading again from the last committed offset");
            if let Err(error) = kafka::seek(&self.consumer, &tp, target) {
                warn!(%error, partition = %tp, "cannot seek back; the next assignment re-reads it");
            }
        }
    }

    /// Starts committing the durable offsets that are due, unless a commit is waiting
    /// for its answer already.
    fn send_due_commits(&mut self) {
        if self.committing.is_some() {
            return;
        }
        self.apply_rebalances();
        let due = self.partitions.commits_due(Instant::now());
        if due.is_empty() {
            return;
        }
        let consumer = self.consumer.clone();
        self.committing = Some(tokio::task::spawn_blocking(move || kafka::commit(&consumer, &due)));
    }

    /// Books the result of a commit request.
    fn commit_finished(&mut self, outcome: Result<CommitOutcome, WorkerError>) {
        self.committing = None;
        let news = match outcome {
            Ok(outcome) => {
                if outcome.iter().any(|(_, _, result)| result.is_err()) {
                    Progress::bump(&self.progress.kafka_commit_failures);
                }
                self.partitions.commit_finished(&outcome, Instant::now())
            }
            Err(error) => {
                warn!(%error, "the offset commit task failed; the offsets are committed again");
                Progress::bump(&self.progress.kafka_commit_failures);
                self.partitions.commit_lost(Instant::now())
            }
        };
        self.log_commit_news(news);
    }

    /// One line when commits start failing, one when they succeed again.
    fn log_commit_news(&self, news: CommitNews) {
        match news {
            CommitNews::Quiet => {}
            CommitNews::FailingSince(error) => warn!(
                %error,
                "Kafka offset commit failed; retrying with backoff until it succeeds \
                 (the table's recorded offsets cover the data meanwhile)"
            ),
            CommitNews::Recovered(failures) => info!(failed_attempts = failures, "Kafka offset commits succeed again"),
        }
    }

    /// Whether every assigned partition is read to its end and written.
    async fn is_caught_up(&mut self, shutdown: &CancellationToken) -> Result<bool, WorkerError> {
        if !self.buffer.is_empty() || self.in_flight.is_some() {
            return Ok(false);
        }
        self.sync_assignment(shutdown).await?;
        self.look_up_unknown_positions(shutdown).await;
        let consumer = &self.consumer;
        Ok(self.partitions.is_read_to_end(|tp| kafka::cached_watermarks(consumer, tp)))
    }

    /// For `exit_when_caught_up` and for moves back to the table's start: the group's
    /// committed offsets of assigned partitions whose position is otherwise unknown (a partition already read to its end yields
    /// no message to learn it from). At most once a second, off the runtime's threads.
    async fn look_up_unknown_positions(&mut self, shutdown: &CancellationToken) {
        let unknown = self.partitions.unknown_positions();
        if unknown.is_empty() || self.looked_up_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.looked_up_at = Some(Instant::now());
        let consumer = self.consumer.clone();
        let lookup =
            tokio::task::spawn_blocking(move || kafka::committed(&consumer, &unknown, COMMITTED_LOOKUP_TIMEOUT));
        tokio::select! {
            () = shutdown.cancelled() => {}
            found = lookup => match found {
                Ok(Ok(found)) => self.partitions.committed_looked_up(&found),
                Ok(Err(error)) => debug!(%error, "committed offsets not available yet"),
                Err(error) => debug!(%error, "committed offsets lookup failed"),
            },
        }
    }

    /// Finishes the running flush, writes what is buffered, and commits every durable
    /// offset, all within `worker.shutdown_timeout`.
    async fn drain(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        let timeout = self.config.worker.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        let flushed = tokio::time::timeout_at(deadline, async {
            self.await_in_flight(shutdown).await?;
            self.start_flush();
            self.await_in_flight(shutdown).await
        })
        .await;
        match flushed {
            Ok(result) => result?,
            Err(_) => {
                if let Some(handle) = self.in_flight.take() {
                    handle.abort();
                }
                return Err(WorkerError::ShutdownTimedOut(timeout));
            }
        }
        self.commit_durable_until(deadline).await;
        Ok(())
    }

    /// Waits for the running flush, if any, and books it.
    async fn await_in_flight(&mut self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        if self.in_flight.is_some() {
            let done = join(&mut self.in_flight).await?;
            self.in_flight = None;
            self.finish_flush(done, shutdown).await?;
        }
        Ok(())
    }

    /// Commits the durable offsets, retrying failures, until the group has them all or
    /// `deadline` passes.
    async fn commit_durable_until(&mut self, deadline: Instant) {
        loop {
            self.send_due_commits();
            if self.partitions.is_fully_committed() {
                return;
            }
            let committing = self.committing.is_some();
            let commit_retry = self.partitions.commit_retry_at();
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        failed_attempts = self.partitions.commit_failures(),
                        "the final Kafka offset commit did not succeed within worker.shutdown_timeout; \
                         the table's recorded offsets cover it and the next worker resumes from them"
                    );
                    return;
                }
                outcome = join(&mut self.committing), if committing => self.commit_finished(outcome),
                () = sleep_until(commit_retry), if commit_retry.is_some() => {}
            }
        }
    }
}

/// Sleeps until `at`; never returns for `None` (the select! arm is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for a background task; never returns for `None` (the select! arm is disabled then).
async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, WorkerError> {
    match task {
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
        Ok(update) => Received::Update(update, size, message.timestamp().to_millis()),
        Err(reason) => Received::Invalid(DeadLetter::new(
            at,
            message.key(),
            message.payload(),
            message.timestamp().to_millis(),
            &reason,
        )),
    }
}
