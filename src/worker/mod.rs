//! The worker loop: consume → decode → buffer → flush (dead letters and positions) →
//! commit offsets. The loop only waits and carries out what [`Partitions`] decides.
//!
//! Invariants kept here:
//! - At most one flush is in flight; while it runs, reading continues into the next
//!   buffer until that buffer is full, then reading stops (memory stays bounded). A
//!   buffer whose messages reached the size limits is flushed as soon as none runs.
//! - Kafka offsets are committed only after the flush that covers them is durable
//!   ([`crate::worker::flush`] gives the order), only for partitions this worker still owns, and
//!   again after a failure until they stick ([`crate::worker::partitions`] keeps the books).
//! - A rejected message never stops the partition: it becomes a dead letter in the
//!   batch, and its offset advances with the batch.
//! - Every wait observes shutdown; on shutdown the running flush and the buffer are
//!   written and committed within `worker.shutdown_timeout`.

pub mod batch;
mod commit;
pub mod flush;
mod maintain;
pub mod outputs;
pub mod partitions;
pub mod receive;
mod resume;

use receive::Received;
use resume::Unreadable;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::flush::{FlushError, FlushReport};
use self::outputs::Outputs;
use crate::config::Config;
use crate::dead_letter::DeadLetter;
use crate::decode::DecodeOptions;
use crate::faults::CrashPoints;
use crate::kafka::CommitOutcome;
use crate::kafka::{self, Rebalanced, SinkConsumer};
use crate::offsets::{Coordinates, TopicPartition};
use crate::status::{Progress, RunSummary};
use crate::table::{PositionTable, TableError};
use crate::worker::batch::{Batch, Buffer, Limits};
use crate::worker::partitions::{Partitions, Seen};

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
    progress.set_loop_period(config.flush.interval);
    // The listener stops with the worker, whatever ends it.
    let http_stop = shutdown.child_token();
    let _stop_http = http_stop.clone().drop_guard();
    let result = match config.http.bind.trim() {
        "" => start_and_run(config, &shutdown, &progress, crash).await,
        bind => match crate::status::http::start(bind, progress.clone(), http_stop).await {
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
    let outputs = Outputs::open(&config).await?;
    info!(
        table = outputs.positions.uri(),
        version = ?outputs.positions.version().map(|v| v.0),
        outputs = outputs.describe(),
        "opened destinations"
    );
    let consumer = kafka::subscribe(&config.kafka, progress.clone())?;
    info!(brokers = %config.kafka.brokers, group = %config.kafka.group_id, topics = ?config.kafka.topics, "subscribed");
    let mut worker = Worker::new(config, consumer, outputs, shutdown.clone(), progress.clone(), crash);
    worker.run().await
}

/// A flush running in the background: it hands the outputs back when done.
type InFlight = JoinHandle<Flushed>;
pub(crate) type Flushed = (Outputs, Batch, Result<FlushReport, FlushError>);

/// An offset commit waiting for the group's answer, on a blocking thread.
type Committing = JoinHandle<CommitOutcome>;

struct Worker {
    config: Config,
    consumer: Arc<SinkConsumer>,
    /// The commit request in flight, if any (one at a time).
    committing: Option<Committing>,
    decode_options: Arc<DecodeOptions>,
    buffer: Buffer,
    partitions: Partitions,
    /// The destinations when no flush is running.
    idle_outputs: Option<Outputs>,
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
    /// Chunks taken from the consumer so far.
    chunks_taken: u64,
    /// The chunk decoded while the one before it was handled, not handled yet.
    decoded: Option<receive::Chunk>,
    /// Partitions moved (a seek), each with the number of chunks taken from the
    /// consumer before its last move: their messages in chunks taken before it are
    /// dropped.
    moved: HashMap<TopicPartition, u64>,
    /// The assignment generation at which each partition was last revoked: its
    /// messages in hand taken before it are dropped.
    revoked_at: BTreeMap<TopicPartition, kafka::Generation>,
    /// When maintenance is next due.
    schedule: maintain::Schedule,
    /// The table-wide maintenance run in progress, if any.
    cleaning: Option<maintain::Cleaning>,
    /// The Delta tables the outputs append to (the dead-letter table), for maintenance.
    appended_tables: Vec<crate::maintenance::run::Target>,
    /// Cancelled when the worker is to stop: every wait of the worker observes it.
    shutdown: CancellationToken,
    progress: Arc<Progress>,
    crash: CrashPoints,
}

impl Worker {
    fn new(
        config: Config,
        consumer: SinkConsumer,
        outputs: Outputs,
        shutdown: CancellationToken,
        progress: Arc<Progress>,
        crash: CrashPoints,
    ) -> Self {
        let limits = Limits::of(&config.flush);
        Self {
            decode_options: Arc::new(config.decode_options()),
            buffer: Buffer::new(config.delta.key_columns.clone(), limits, outputs.want_every_update()),
            partitions: Partitions::new(outputs.positions_vouch_for_all(), &config.retry)
                .with_unrecorded_from_start(config.kafka.auto_offset_reset == crate::config::OffsetReset::Earliest),
            reader: outputs.positions.clone(),
            schedule: maintain::Schedule::new(config.maintenance.interval),
            cleaning: None,
            appended_tables: outputs.appended_tables(),
            idle_outputs: Some(outputs),
            in_flight: None,
            rejections_logged: 0,
            aborted_in_a_row: 0,
            read_to_end: false,
            looked_up_at: None,
            starts_tried_at: None,
            unreadable: None,
            chunks_taken: 0,
            decoded: None,
            moved: HashMap::new(),
            revoked_at: BTreeMap::new(),
            consumer: Arc::new(consumer),
            committing: None,
            config,
            shutdown,
            progress,
            crash,
        }
    }

    async fn run(&mut self) -> Result<(), WorkerError> {
        let consumer = Arc::clone(&self.consumer);
        let mut tick =
            tokio::time::interval_at(Instant::now() + self.config.flush.interval, self.config.flush.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.progress.turned();
            let flushing = self.in_flight.is_some();
            let committing = self.committing.is_some();
            let cleaning = self.cleaning.is_some();
            let read_resumes = self.unreadable.as_ref().and_then(|u| u.resumes_at);
            let can_read = !self.buffer.is_full() && read_resumes.is_none();
            let commit_retry = self.partitions.commit_retry_at();
            let decoded = self.decoded.is_some();
            tokio::select! {
                // Shutdown first, so a stop request never waits behind a backlog; then a
                // finished flush, so offsets are committed and the next flush can start
                // before more is read; then commit results, which free offsets to retry.
                biased;
                () = self.shutdown.cancelled() => break,
                done = join(&mut self.in_flight), if flushing => {
                    self.in_flight = None;
                    self.finish_flush(done?).await?;
                }
                outcome = join(&mut self.committing), if committing => self.commit_finished(outcome),
                reports = join(&mut self.cleaning), if cleaning => {
                    self.cleaning = None;
                    self.clean_finished(reports?);
                }
                _ = tick.tick() => {
                    self.check_connection()?;
                    self.sync_assignment().await?;
                    self.flush_now().await;
                    self.schedule_maintenance();
                    self.sample_gauges();
                }
                () = sleep_until(commit_retry), if commit_retry.is_some() => {}
                () = sleep_until(read_resumes), if read_resumes.is_some() => self.resume_reading(),
                message = consumer.recv(), if can_read => {
                    // With it, whatever else is already waiting, decoded off this thread
                    // while this thread handles the chunk decoded before.
                    let room = self.room();
                    let taken = self.chunks_taken;
                    self.chunks_taken += 1;
                    let options = Arc::clone(&self.decode_options);
                    let before = self.decoded.take();
                    let (chunk, drained, rest) = receive::receive_beside(&consumer, message, room, &options, taken, || {
                        before.map_or(Ok(None), |before| self.handle_ready_now(before))
                    });
                    if let Some(rest) = rest? {
                        self.handle_rest(rest).await?;
                    }
                    // Nothing more waiting: no reason to hold the chunk back.
                    match drained {
                        true => self.handle_ready(chunk).await?,
                        false => self.decoded = Some(chunk),
                    }
                }
                // Nothing ready to decode beside it (or no room to read): the chunk
                // decoded last is handled now, never held back waiting for more.
                () = std::future::ready(()), if decoded => {
                    if let Some(chunk) = self.decoded.take() {
                        self.handle_ready(chunk).await?;
                    }
                }
            }
            // Exiting when caught up, the last batch has nothing more to wait for.
            let last_batch = self.config.worker.exit_when_caught_up && self.read_to_end;
            if self.in_flight.is_none() && (self.buffer.is_due() || last_batch) {
                self.flush_now().await;
            }
            self.send_due_commits();
            if self.config.worker.exit_when_caught_up && self.is_caught_up().await? {
                info!("every assigned partition is written to its end; exiting");
                break;
            }
        }
        self.drain().await
    }

    /// What the buffer can still take, less the chunk decoded and not handled yet.
    fn room(&self) -> (usize, usize) {
        let (records, bytes) = self.buffer.room();
        let (held, held_bytes) = self.decoded.as_ref().map_or((0, 0), |chunk| chunk.size);
        (records.saturating_sub(held).max(1), bytes.saturating_sub(held_bytes).max(1))
    }

    /// Handles the messages taken from the consumer at once, in order, each with the
    /// assignment generation it was taken at. A message is dropped, not written, when
    /// it was fetched from where reading no longer is: its partition was moved (a seek)
    /// after the messages were taken, or revoked after it was fetched. librdkafka drops
    /// such messages still in its queue, not those already taken out of it; the moves
    /// read them again where they are still due.
    async fn handle_ready(&mut self, chunk: receive::Chunk) -> Result<(), WorkerError> {
        if let Some(rest) = self.handle_ready_now(chunk)? {
            self.handle_rest(rest).await?;
        }
        Ok(())
    }

    /// [`Worker::handle_ready`] as far as no message must wait for anything (a
    /// partition's recorded offsets to read, a move back, a batch that cannot be read):
    /// gives back the rest of the chunk, from the first message that must.
    fn handle_ready_now(&mut self, mut chunk: receive::Chunk) -> Result<Option<receive::Chunk>, WorkerError> {
        // The consumer reports assignment changes only while messages are taken from
        // it, so every change these messages may predate is known now: once per chunk.
        self.apply_rebalances();
        let mut received = std::mem::take(&mut chunk.received).into_iter();
        while let Some((generation, message)) = received.next() {
            if self.is_stale(chunk.taken, generation, &message) {
                continue;
            }
            if let Some(message) = self.handle_now(message)? {
                chunk.received = std::iter::once((generation, message)).chain(received).collect();
                return Ok(Some(chunk));
            }
        }
        self.progress.observe_buffered_bytes(self.buffer.bytes());
        Ok(None)
    }

    /// The rest of a chunk [`Worker::handle_ready_now`] gave back, each message waiting
    /// for what it must.
    async fn handle_rest(&mut self, chunk: receive::Chunk) -> Result<(), WorkerError> {
        for (generation, message) in chunk.received {
            if !self.is_stale(chunk.taken, generation, &message) {
                self.handle(message).await?;
            }
        }
        self.progress.observe_buffered_bytes(self.buffer.bytes());
        Ok(())
    }

    /// Whether a message of the chunk taken after `taken` others, at `generation`, was
    /// fetched from where reading no longer is ([`Worker::handle_ready`]).
    fn is_stale(&self, taken: u64, generation: kafka::Generation, received: &Received) -> bool {
        received.partition().is_some_and(|tp| {
            self.moved.get(tp).is_some_and(|moved| taken < *moved)
                || self.revoked_at.get(tp).is_some_and(|revoked| generation < *revoked)
        })
    }

    /// Handles `received` when nothing about it must wait; gives it back otherwise.
    fn handle_now(&mut self, received: Received) -> Result<Option<Received>, WorkerError> {
        let ready = |at: &Coordinates| self.partitions.is_ready_for(at);
        let now = !self.partitions.has_to_load()
            && match &received {
                Received::Update(update, ..) => ready(&update.source),
                Received::Invalid(dead_letter) => ready(&dead_letter.source),
                Received::EndOfPartition => true,
                Received::Error(error) => kafka::BatchFault::of(error).is_none(),
            };
        if !now {
            return Ok(Some(received));
        }
        match received {
            Received::Update(update, size, kafka_time) => {
                self.note_readable(&update.source);
                let seen = self.partitions.seen(&update.source);
                if self.settle(&update.source, seen) {
                    self.buffer.push(update, size, kafka_time);
                }
            }
            Received::Invalid(dead_letter) => {
                self.note_readable(&dead_letter.source);
                let seen = self.partitions.seen(&dead_letter.source);
                if self.settle(&dead_letter.source, seen) {
                    self.log_rejection(&dead_letter);
                    self.buffer.reject(dead_letter);
                }
            }
            Received::EndOfPartition => self.note_end_of_partition(),
            Received::Error(error) => {
                self.check_connection()?;
                warn!(%error, "Kafka consumer error; librdkafka retries by itself");
            }
        }
        Ok(None)
    }

    async fn handle(&mut self, received: Received) -> Result<(), WorkerError> {
        let Some(received) = self.handle_now(received)? else { return Ok(()) };
        // No move to the table's starts with a message in hand: it was read before the
        // move would take effect. `Partitions::seen` asks for the move from it instead.
        self.load_recorded().await?;
        match received {
            Received::Update(update, size, kafka_time) => {
                self.note_readable(&update.source);
                if self.is_to_write(&update.source).await? {
                    self.buffer.push(update, size, kafka_time);
                }
            }
            Received::Invalid(dead_letter) => {
                self.note_readable(&dead_letter.source);
                if self.is_to_write(&dead_letter.source).await? {
                    self.log_rejection(&dead_letter);
                    self.buffer.reject(dead_letter);
                }
            }
            Received::EndOfPartition => self.note_end_of_partition(),
            Received::Error(error) => match kafka::BatchFault::of(&error) {
                Some(fault) => self.read_again_after_unreadable(fault).await?,
                None => {
                    self.check_connection()?;
                    warn!(%error, "Kafka consumer error; librdkafka retries by itself");
                }
            },
        }
        Ok(())
    }

    /// Applies the assignment changes librdkafka reported, then reads the table's
    /// recorded offsets of newly assigned partitions.
    async fn sync_assignment(&mut self) -> Result<(), WorkerError> {
        self.apply_rebalances();
        self.load_recorded().await?;
        self.move_to_starts().await
    }

    /// Stops the worker when no connection to the cluster can be made (credentials,
    /// certificates) and none ever succeeded: a configuration error, not an outage.
    fn check_connection(&self) -> Result<(), WorkerError> {
        match self.consumer.context().watch.fatal() {
            Some(fault) => Err(fault.into()),
            None => Ok(()),
        }
    }

    /// Applies assignment changes: revoked partitions' buffers are dropped (their new
    /// owner re-reads them) and their bookkeeping forgotten.
    fn apply_rebalances(&mut self) {
        for (generation, event) in self.consumer.context().take_rebalances() {
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
                    self.revoked_at.extend(partitions.iter().map(|tp| (tp.clone(), generation)));
                    for tp in &partitions {
                        self.progress.metrics.forget_lag(tp);
                    }
                }
            }
            self.progress.assigned_partitions.store(self.partitions.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Counts a consumed message and tells whether it still has to be written.
    async fn is_to_write(&mut self, at: &Coordinates) -> Result<bool, WorkerError> {
        let mut seen = self.partitions.seen(at);
        if seen == Seen::Unknown {
            // A message of a partition whose assignment was not reported yet.
            if !self.partitions.is_assigned(&at.tp) {
                self.partitions.assigned(std::slice::from_ref(&at.tp));
            }
            self.load_recorded().await?;
            seen = self.partitions.seen(at);
        }
        if let Seen::Rewind { from } = seen {
            // A message dropped for a move back is read again, and counted then.
            self.read_to_end = false;
            self.read_again_from(at, from).await?;
            return Ok(false);
        }
        Ok(self.settle(at, seen))
    }

    /// Counts a consumed message and tells whether it still has to be written, by what
    /// [`Partitions::seen`] said of it (anything but a move back).
    fn settle(&mut self, at: &Coordinates, seen: Seen) -> bool {
        self.read_to_end = false;
        Progress::bump(&self.progress.messages);
        match seen {
            Seen::Write => true,
            Seen::Skip { seek_to } => {
                Progress::bump(&self.progress.skipped_already_written);
                if let Some(next) = seek_to {
                    info!(partition = %at.tp, from = at.offset.0, to = next.0, "skipping messages the table already holds");
                    if let Err(error) = self.seek(&at.tp, rdkafka::Offset::Offset(next.0)) {
                        debug!(%error, "seek not possible yet; skipping message by message");
                    }
                }
                false
            }
            // Stopping while the table was read: the message is read again next time.
            Seen::Unknown | Seen::Rewind { .. } => false,
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

    /// Whether every assigned partition is read to its end and written.
    async fn is_caught_up(&mut self) -> Result<bool, WorkerError> {
        if !self.buffer.is_empty() || self.in_flight.is_some() || self.decoded.is_some() {
            return Ok(false);
        }
        self.sync_assignment().await?;
        self.look_up_unknown_positions().await;
        let consumer = &self.consumer;
        Ok(self.partitions.is_read_to_end(|tp| kafka::cached_watermarks(consumer, tp)))
    }

    /// Finishes the running flush, writes what is buffered, and commits every durable
    /// offset, all within `worker.shutdown_timeout`.
    async fn drain(&mut self) -> Result<(), WorkerError> {
        // Table-wide maintenance is idempotent: the next run carries on where this stops.
        if let Some(cleaning) = self.cleaning.take() {
            cleaning.abort();
        }
        self.config.maintenance.enabled = false;
        let timeout = self.config.worker.shutdown_timeout;
        let deadline = Instant::now() + timeout;
        let flushed = tokio::time::timeout_at(deadline, async {
            self.await_in_flight().await?;
            self.start_flush();
            self.await_in_flight().await
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
        maintain::save_key_index_until(self.reader.clone(), deadline).await;
        Ok(())
    }
}

/// Sleeps until `at`; never returns for `None` (the select! arm is disabled then).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Waits for a background task; never returns for `None` (the select! arm is disabled then).
pub(crate) async fn join<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, WorkerError> {
    match task {
        Some(handle) => Ok(handle.await?),
        None => std::future::pending().await,
    }
}
