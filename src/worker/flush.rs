//! One flush, written in the order that keeps committed offsets honest.
//!
//! - Dead letters to a Delta table: dead letters (append + `txn`) → positions (merge +
//!   `txn`) → the worker commits the Kafka offsets. A message at or below the positions
//!   table's recorded offset therefore has its dead letter durable too, so the worker
//!   may skip it on replay whatever it was.
//! - Dead letters to a Kafka topic: positions (merge + `txn`) → one Kafka transaction
//!   with the dead letters and the consumer offsets. The group's committed offset is the
//!   only record of which dead letters are durable, so the worker re-reads from it and
//!   lets the positions table drop the rows it already holds.
//!
//! Each step is retried on its own (bounded, with backoff) and each is idempotent, so a
//! retry, a crash or a replay at any point neither loses nor doubles anything.

use std::sync::Arc;

use tracing::{info, warn};

use rdkafka::consumer::ConsumerGroupMetadata;

use super::batch::Batch;
use super::{Flushed, WorkerError, join};
use crate::config::{Config, DeadLetterDestination, RetryConfig};
use crate::dead_letter::topic::TopicError;
use crate::dead_letter::{DeadLetterTable, DeadLetterTopic, ReasonCounts};
use crate::delta::TableError;
use crate::faults::CrashPoints;
use crate::kafka;
use crate::retry::retry;
use crate::status::Progress;
use crate::table::{PositionTable, Thresholds, WriteReport};

/// Where dead letters go.
#[derive(Debug, Clone)]
pub enum DeadLetterSink {
    /// A Delta table.
    Table(DeadLetterTable),
    /// A Kafka topic, through a transactional producer.
    Topic(Arc<DeadLetterTopic>),
}

/// Both destinations of a flush.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// The positions table.
    pub positions: PositionTable,
    /// The dead-letter destination.
    pub dead_letters: DeadLetterSink,
}

/// What one flush wrote.
#[derive(Debug, Clone)]
pub struct FlushReport {
    /// The positions table's part.
    pub positions: WriteReport,
    /// Dead letters newly written, by reason (replayed ones are not counted again).
    pub dead_letters: ReasonCounts,
    /// Whether the Kafka offsets were committed as part of the flush (topic destination).
    pub offsets_committed: bool,
}

/// Why a flush failed. Nothing past the last successful flush was committed to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// A Delta table failed and retries were exhausted.
    #[error("{0}")]
    Table(#[from] TableError),
    /// The dead-letter topic failed.
    #[error("{0}")]
    Topic(#[from] TopicError),
    /// The consumer is not in its group, so offsets cannot be committed with dead letters.
    #[error("the consumer has left its group; the batch will be read again")]
    NotInGroup,
    /// A crash injected by a test (feature `fault-injection` only).
    #[cfg(feature = "fault-injection")]
    #[error("injected crash: {0}")]
    InjectedCrash(&'static str),
}

impl FlushReport {
    /// The report of a flush with nothing to write.
    fn nothing() -> Self {
        Self {
            positions: WriteReport::nothing(None, 0, std::time::Instant::now()),
            dead_letters: ReasonCounts::default(),
            offsets_committed: false,
        }
    }
}

impl FlushError {
    /// Whether nothing of the flush's Kafka side became visible and its messages can
    /// simply be read again (the worker rewinds instead of stopping).
    pub fn can_reread(&self) -> bool {
        matches!(self, FlushError::Topic(TopicError::Aborted(_)) | FlushError::NotInGroup)
    }
}

impl Sinks {
    /// Opens the positions table and the dead-letter destination of `config`.
    ///
    /// # Errors
    /// When either cannot be opened (after retries, for the tables).
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
        let dead_letters = match config.dead_letter.destination {
            DeadLetterDestination::Table => {
                let uri = config.dead_letter.resolved_table_uri(&config.delta);
                let (storage, properties) = (&config.delta.storage_options, &config.delta.table_properties);
                DeadLetterSink::Table(
                    retry(
                        &config.retry,
                        "open the dead-letter table",
                        || DeadLetterTable::open_or_create(&uri, storage, properties, group),
                        TableError::is_retryable,
                    )
                    .await?
                    .with_write_deadline(config.maintenance.write_deadline()),
                )
            }
            DeadLetterDestination::Topic => {
                DeadLetterSink::Topic(DeadLetterTopic::connect(&config.kafka, &config.dead_letter).await?)
            }
        };
        Ok(Self { positions, dead_letters })
    }

    /// Whether the positions table's recorded offsets also vouch for dead letters
    /// (the table destination), so messages below them may be skipped unread.
    pub fn table_offsets_cover_dead_letters(&self) -> bool {
        matches!(self.dead_letters, DeadLetterSink::Table(_))
    }

    /// Writes `batch` in the order described in the module docs, keeping `progress`
    /// current. Hands the sinks back (at their new versions when the writes succeeded).
    pub async fn write(
        mut self,
        batch: &Batch,
        policy: &RetryConfig,
        group: Option<Arc<ConsumerGroupMetadata>>,
        progress: &Progress,
        crash: &CrashPoints,
    ) -> (Self, Result<FlushReport, FlushError>) {
        tracing::debug!(
            messages = batch.messages,
            rows = batch.rows.len(),
            dead_letters = batch.dead_letters.len(),
            "writing batch"
        );
        let result = self.write_in_order(batch, policy, group, progress, crash).await;
        (self, result)
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    async fn write_in_order(
        &mut self,
        batch: &Batch,
        policy: &RetryConfig,
        group: Option<Arc<ConsumerGroupMetadata>>,
        progress: &Progress,
        crash: &CrashPoints,
    ) -> Result<FlushReport, FlushError> {
        let mut dead_letters = ReasonCounts::default();
        let mut offsets_committed = false;
        if let DeadLetterSink::Table(table) = &self.dead_letters
            && !batch.dead_letters.is_empty()
        {
            let (written_table, written) = retry_write(policy, "write dead letters to Delta", progress, || {
                table.write(&batch.dead_letters, &batch.offsets)
            })
            .await?;
            self.dead_letters = DeadLetterSink::Table(written_table);
            if written.total() > 0 {
                dead_letters = written;
                Progress::bump(&progress.dead_letter_commits);
                #[cfg(feature = "fault-injection")]
                if let Some(crash) = crash.after_dead_letter_commit(progress) {
                    return Err(FlushError::InjectedCrash(crash));
                }
            }
        }
        let positions = &self.positions;
        let (written_positions, report) =
            retry_write(policy, "write batch to Delta", progress, || positions.write(batch)).await?;
        self.positions = written_positions;
        if report.committed {
            Progress::bump(&progress.delta_commits);
            #[cfg(feature = "fault-injection")]
            if let Some(crash) = crash.after_positions_commit(progress) {
                return Err(FlushError::InjectedCrash(crash));
            }
        }
        if let DeadLetterSink::Topic(topic) = &self.dead_letters {
            let group = group.ok_or(FlushError::NotInGroup)?;
            Progress::bump(&progress.dead_letter_commits);
            #[cfg(feature = "fault-injection")]
            if crash.leaves_transaction_open(progress) {
                topic.publish_without_commit(&batch.dead_letters, &batch.offsets, group).await?;
                return Err(FlushError::InjectedCrash("with the dead-letter transaction sent but not committed"));
            }
            topic.publish(&batch.dead_letters, &batch.offsets, group).await?;
            for d in &batch.dead_letters {
                dead_letters.add(&d.category, 1);
            }
            offsets_committed = true;
        }
        Ok(FlushReport { positions: report, dead_letters, offsets_committed })
    }
}

/// [`retry`] around one Delta write, keeping the storage health and the failure and
/// conflict counters current. A retried write reads the table afresh: a commit that
/// conflicted with another writer's is made again on top of it.
pub(crate) async fn retry_write<T, F: Future<Output = Result<T, TableError>>>(
    policy: &RetryConfig,
    what: &str,
    progress: &Progress,
    mut attempt: impl FnMut() -> F,
) -> Result<T, TableError> {
    let observed = || {
        let write = attempt();
        async move {
            let result = write.await;
            match &result {
                Ok(_) => progress.health.set_storage_ok(true),
                Err(error) => {
                    Progress::bump(&progress.write_failures);
                    if error.is_conflict() {
                        Progress::bump(&progress.commit_conflicts);
                    } else {
                        progress.health.set_storage_ok(false);
                    }
                }
            }
            result
        }
    };
    retry(policy, what, observed, TableError::is_retryable).await
}

/// The worker's side of a flush: starting one from the loop, and booking its result.
impl super::Worker {
    /// Starts a flush from the loop (tick or full buffer); a test may hold the first one.
    pub(super) async fn flush_now(&mut self) {
        if !self.buffer.is_empty()
            && let Some(gate) = self.crash.take_flush_hold()
        {
            info!("holding the first flush until the test releases it");
            tokio::select! {
                () = self.shutdown.cancelled() => {}
                () = gate.notified() => {}
            }
        }
        self.start_flush();
    }

    /// Starts writing the buffer, followed by a compaction of the worker's files when
    /// one is due (or when the flush left a group with more files to compact than
    /// `maintenance.compaction_max_files`); nothing when both are empty or a flush is
    /// already running.
    pub(super) fn start_flush(&mut self) {
        self.apply_rebalances();
        self.rejections_logged = 0;
        if self.in_flight.is_some() || (self.buffer.is_empty() && !self.config.maintenance.enabled) {
            return;
        }
        let compaction = if self.config.maintenance.enabled { self.take_due_compaction() } else { None };
        if self.buffer.is_empty() && compaction.is_none() {
            return;
        }
        let Some(sinks) = self.idle_sinks.take() else { return };
        let batch = self.buffer.take();
        self.progress.set_buffered(0, 0, false);
        let policy = self.config.retry.clone();
        let group = kafka::group_metadata_if_member(&self.consumer).map(Arc::new);
        let progress = self.progress.clone();
        let crash = self.crash.clone();
        let thresholds = crate::table::Thresholds::from(&self.config.maintenance);
        let maintained = self.config.maintenance.enabled;
        self.in_flight = Some(tokio::spawn(async move {
            let (mut sinks, result) = if batch.messages == 0 {
                (sinks, Ok(FlushReport::nothing()))
            } else {
                sinks.write(&batch, &policy, group, &progress, &crash).await
            };
            // A flush that crowded a group compacts the partitions it wrote at once.
            let crowded = |report: &FlushReport| {
                (maintained && report.positions.compaction_due)
                    .then(|| batch.offsets.iter().map(|(tp, _)| tp.clone()).collect())
            };
            if let Some(partitions) = result.as_ref().ok().and_then(|report| compaction.or_else(|| crowded(report))) {
                sinks.compact(&partitions, thresholds, &progress).await;
            }
            (sinks, batch, result)
        }));
    }

    pub(super) async fn finish_flush(&mut self, (sinks, batch, result): Flushed) -> Result<(), WorkerError> {
        self.idle_sinks = Some(sinks);
        self.apply_rebalances();
        if batch.messages == 0 && result.is_ok() {
            // A compaction alone: no batch to book.
            return Ok(());
        }
        let report = match result {
            Ok(report) => report,
            Err(error) if error.can_reread() && self.aborted_in_a_row < self.config.retry.max_retries => {
                self.aborted_in_a_row += 1;
                Progress::bump(&self.progress.rewinds);
                warn!(%error, attempt = self.aborted_in_a_row, "flush not committed to Kafka; reading its messages again");
                self.rewind(&batch);
                let pause = self.config.retry.min_delay * self.aborted_in_a_row as u32;
                tokio::select! {
                    () = self.shutdown.cancelled() => {}
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
            files_given_vectors = positions.files_hidden_in,
            rows_rewritten = positions.rows_rewritten,
            bytes_written = positions.bytes_written,
            duration_ms = positions.elapsed.as_millis() as u64,
            "flushed batch"
        );
        Ok(())
    }

    /// Feeds a committed flush into the histograms: its duration and size, and how long
    /// its rows took from their event time and their Kafka timestamp to the commit.
    pub(super) fn observe_flush(&self, batch: &Batch, positions: &crate::table::WriteReport) {
        let metrics = &self.progress.metrics;
        metrics.flush_seconds.observe(positions.elapsed.as_secs_f64());
        metrics.batch_messages.observe(batch.messages as f64);
        self.progress.table_version.store(positions.version.0, std::sync::atomic::Ordering::Relaxed);
        let now_micros = chrono::Utc::now().timestamp_micros();
        for row in &batch.rows {
            metrics.latency_from_event.observe((now_micros - row.timestamp_micros).max(0) as f64 / 1e6);
        }
        for (millis, count) in batch.kafka_times.counts() {
            let seconds = (now_micros / 1000 - millis).max(0) as f64 / 1e3;
            for _ in 0..count {
                metrics.latency_from_kafka.observe(seconds);
            }
        }
    }

    /// Waits for the running flush, if any, and books it.
    pub(super) async fn await_in_flight(&mut self) -> Result<(), WorkerError> {
        if self.in_flight.is_some() {
            let done = join(&mut self.in_flight).await?;
            self.in_flight = None;
            self.finish_flush(done).await?;
        }
        Ok(())
    }
}
