//! One flush: the outputs written in their declared order (`outputs`, where the rule
//! that keeps committed offsets honest is stated), then the Kafka offsets committed by
//! the worker unless an output committed them with its data.

use std::sync::Arc;

use tracing::{info, warn};

use rdkafka::consumer::ConsumerGroupMetadata;

use super::batch::Batch;
use super::outputs::{FlushContext, Outputs, Place};
use super::{Flushed, WorkerError, join};
use crate::config::RetryConfig;
use crate::dead_letter::ReasonCounts;
use crate::dead_letter::topic::TopicError;
use crate::delta::TableError;
use crate::faults::CrashPoints;
use crate::kafka;
use crate::retry::retry;
use crate::status::Progress;
use crate::table::WriteReport;

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

impl Outputs {
    /// Writes `batch` to every output in their declared order (module `outputs`),
    /// keeping `progress` current. Hands the outputs back (at their new versions when
    /// the writes succeeded).
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
        let context = FlushContext { retry: policy, group, progress, crash, positions: None };
        let result = self.write_in_order(batch, &context).await;
        (self, result)
    }

    async fn write_in_order(&mut self, batch: &Batch, context: &FlushContext<'_>) -> Result<FlushReport, FlushError> {
        let mut dead_letters = ReasonCounts::default();
        let mut offsets_committed = false;
        for output in self.at(Place::BeforePositions) {
            let report = output.write(batch, context).await?;
            dead_letters.merge(&report.dead_letters);
        }
        let (policy, progress) = (context.retry, context.progress);
        let positions = &self.positions;
        let (written_positions, report) =
            retry_write(policy, "write batch to Delta", progress, || positions.write(batch)).await?;
        self.positions = written_positions;
        if report.committed {
            Progress::bump(&progress.delta_commits);
            #[cfg(feature = "fault-injection")]
            if let Some(crash) = context.crash.after_positions_commit(progress) {
                return Err(FlushError::InjectedCrash(crash));
            }
        }
        let positions = self.positions.clone();
        let after = FlushContext { positions: Some((&positions, &report)), ..context.clone() };
        for output in self.at(Place::AfterPositions) {
            output.write(batch, &after).await?;
        }
        for output in self.at(Place::CommitsOffsets) {
            let written = output.write(batch, context).await?;
            dead_letters.merge(&written.dead_letters);
            offsets_committed |= written.offsets_committed;
        }
        Ok(FlushReport { positions: report, dead_letters, offsets_committed })
    }
}

impl Outputs {
    /// Writes a replayed `batch` (`position-sink replay`): the outputs written before the
    /// positions table, the positions table merging every row
    /// ([`crate::table::PositionTable::write_replayed`]), then the outputs written after
    /// it, each recording the batch's offsets. An output that commits the
    /// consumer's offsets is not written: its record is the group's committed offsets,
    /// which a replay does not move, so the workers read those messages again.
    ///
    /// # Errors
    /// As a flush's.
    pub async fn write_replayed(
        &mut self,
        batch: &Batch,
        policy: &RetryConfig,
        progress: &Progress,
    ) -> Result<WriteReport, FlushError> {
        let crash = CrashPoints::default();
        let context = FlushContext { retry: policy, group: None, progress, crash: &crash, positions: None };
        for output in self.at(Place::BeforePositions) {
            output.write(batch, &context).await?;
        }
        let positions = &self.positions;
        let (written, report) =
            retry_write(policy, "write replayed messages to Delta", progress, || positions.write_replayed(batch))
                .await?;
        self.positions = written;
        let positions = self.positions.clone();
        let after = FlushContext { positions: Some((&positions, &report)), ..context };
        for output in self.at(Place::AfterPositions) {
            output.write(batch, &after).await?;
        }
        Ok(report)
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
        let Some(outputs) = self.idle_outputs.take() else { return };
        let batch = self.buffer.take();
        self.progress.set_buffered(0, 0, false);
        let policy = self.config.retry.clone();
        let group = kafka::group_metadata_if_member(&self.consumer).map(Arc::new);
        let progress = self.progress.clone();
        let crash = self.crash.clone();
        let thresholds = crate::table::Thresholds::from(&self.config.maintenance);
        let maintained = self.config.maintenance.enabled;
        self.in_flight = Some(tokio::spawn(async move {
            let (mut outputs, result) = if batch.messages == 0 {
                (outputs, Ok(FlushReport::nothing()))
            } else {
                outputs.write(&batch, &policy, group, &progress, &crash).await
            };
            // A flush that crowded a group compacts the partitions it wrote at once.
            let crowded = |report: &FlushReport| {
                (maintained && report.positions.compaction_due)
                    .then(|| batch.offsets.iter().map(|(tp, _)| tp.clone()).collect())
            };
            if let Some(partitions) = result.as_ref().ok().and_then(|report| compaction.or_else(|| crowded(report))) {
                outputs.compact(&partitions, thresholds, &progress).await;
            }
            (outputs, batch, result)
        }));
    }

    pub(super) async fn finish_flush(&mut self, (outputs, batch, result): Flushed) -> Result<(), WorkerError> {
        self.idle_outputs = Some(outputs);
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
