//! Where each assigned partition reads from: the table's recorded offsets loaded after
//! an assignment, moves to the table's start (checked against what retention left,
//! `recovery.on_offset_gap`), positions looked up from the group, and reading again
//! after an aborted dead-letter transaction or a batch that could not be read.
//!
//! Invariant kept here: every move is one [`Partitions`](super::partitions::Partitions)
//! decided; a message read before a move took effect is dropped, never written.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::batch::Batch;
use super::partitions::Start;
use super::{Worker, WorkerError, describe_unreadable};
use crate::config::OnOffsetGap;
use crate::kafka;
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::retry::retry;
use crate::status::Progress;
use crate::table::TableError;

/// How long to wait for a partition's log start when the table's start is checked.
const WATERMARK_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait for the group's committed offsets when they are looked up.
pub(super) const COMMITTED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A batch that could not be read, while it is read again.
pub(super) struct Unreadable {
    /// Where and why; `None` when each partition read alone read well.
    pub(super) at: Option<kafka::UnreadableBatch>,
    /// Attempts at it so far.
    pub(super) attempts: usize,
    /// When reading resumes after the pause that follows it.
    pub(super) resumes_at: Option<Instant>,
}

impl Worker {
    /// Reads the table's recorded offsets of the partitions that need them. A record a
    /// RESTORE undid is first set back to what the restored content goes with.
    pub(super) async fn load_recorded(&mut self) -> Result<(), WorkerError> {
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
            () = self.shutdown.cancelled() => return Ok(()),
            read = read => (self.reader, recorded) = read?,
        }
        for tp in &partitions {
            self.partitions.loaded(tp, recorded.get(tp).copied());
        }
        Ok(())
    }

    /// Moves reading of the partitions just loaded to where the table says they start.
    pub(super) async fn move_to_starts(&mut self) -> Result<(), WorkerError> {
        if self.partitions.starts_wait_for_committed() {
            self.look_up_unknown_positions().await;
        }
        let due = self.partitions.starts_due();
        if due.is_empty() || self.starts_tried_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Ok(());
        }
        self.starts_tried_at = None;
        for (tp, start) in due {
            if self.move_to(&tp, start, None).await? {
                self.partitions.moved_to_start(&tp, start);
            } else {
                self.starts_tried_at = Some(Instant::now());
            }
        }
        Ok(())
    }

    /// Moves reading of `at`'s partition back to where the table says it starts.
    pub(super) async fn read_again_from(&mut self, at: &Coordinates, from: Start) -> Result<(), WorkerError> {
        if !self.move_to(&at.tp, from, Some(at.offset)).await? {
            self.partitions.rewind_failed(&at.tp, from);
        }
        Ok(())
    }

    /// Seeks `tp` to `start`, after checking that Kafka still has the messages there
    /// (`recovery.on_offset_gap`). Whether the seek was accepted.
    pub(super) async fn move_to(
        &mut self,
        tp: &TopicPartition,
        start: Start,
        reading_at: Option<Offset>,
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
                    () = self.shutdown.cancelled() => return Ok(false),
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
        match self.seek(tp, target) {
            Ok(()) => Ok(true),
            Err(error) => {
                debug!(%error, partition = %tp, "seek not possible yet");
                Ok(false)
            }
        }
    }

    /// Moves reading of `tp` to `target`. The messages of `tp` already taken from the
    /// consumer were read before the move: the rest of them are dropped
    /// ([`Worker::handle_ready`]), as librdkafka drops those still in its queue.
    ///
    /// # Errors
    /// When the partition is not being fetched yet.
    pub(super) fn seek(
        &mut self,
        tp: &TopicPartition,
        target: rdkafka::Offset,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.consumer.seek(&tp.topic, tp.partition.0, target, Duration::ZERO)?;
        self.moved.insert(tp.clone(), self.chunks_taken);
        Ok(())
    }

    /// For `exit_when_caught_up` and for moves back to the table's start: the group's
    /// committed offsets of assigned partitions whose position is otherwise unknown (a partition already read to its end yields
    /// no message to learn it from). At most once a second, off the runtime's threads.
    pub(super) async fn look_up_unknown_positions(&mut self) {
        let unknown = self.partitions.unknown_positions();
        if unknown.is_empty() || self.looked_up_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.looked_up_at = Some(Instant::now());
        let consumer = self.consumer.clone();
        let lookup =
            tokio::task::spawn_blocking(move || kafka::committed(&consumer, &unknown, COMMITTED_LOOKUP_TIMEOUT));
        tokio::select! {
            () = self.shutdown.cancelled() => {}
            found = lookup => match found {
                Ok(Ok(found)) => self.partitions.committed_looked_up(&found),
                Ok(Err(error)) => debug!(%error, "committed offsets not available yet"),
                Err(error) => debug!(%error, "committed offsets lookup failed"),
            },
        }
    }

    /// Handles a batch librdkafka could not read ([`kafka::BatchFault`]): every
    /// assigned partition is read again from where it is durable (librdkafka goes on
    /// past a corrupt batch, and the error does not say which partition it was in), the
    /// batch is named by reading each partition alone, readiness fails with it, and
    /// reading pauses for the retry policy's next delay. Past `retry.max_retries`
    /// attempts at the same batch, the worker stops.
    pub(super) async fn read_again_after_unreadable(&mut self, fault: kafka::BatchFault) -> Result<(), WorkerError> {
        Progress::bump(&self.progress.unreadable_batches);
        // The running flush holds only messages read before the error: it may finish.
        self.await_in_flight().await?;
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
            if let Err(error) = self.seek(tp, target) {
                warn!(%error, partition = %tp, "cannot seek back; the next assignment reads it again");
            }
        }
        let kafka_config = self.config.kafka.clone();
        let found = tokio::task::spawn_blocking(move || kafka::find_unreadable(&kafka_config, &starts));
        let found = tokio::select! {
            () = self.shutdown.cancelled() => return Ok(()),
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
    pub(super) fn resume_reading(&mut self) {
        if let Some(unreadable) = &mut self.unreadable {
            unreadable.resumes_at = None;
        }
    }

    /// A message read at `at` ends the fault of the batch that could not be read, once
    /// it is past that batch (or, when the batch was not found again, at once).
    pub(super) fn note_readable(&mut self, at: &Coordinates) {
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
    pub(super) fn forget_unreadable(&mut self) {
        self.unreadable = None;
        self.progress.health.set_unreadable(None);
    }

    /// Reads the partitions of a batch whose dead-letter transaction was aborted again
    /// from their last committed offset, dropping what was buffered after it.
    pub(super) fn rewind(&mut self, batch: &Batch) {
        let partitions: Vec<TopicPartition> = batch.offsets.iter().map(|(tp, _)| tp.clone()).collect();
        self.buffer.drop_partitions(&partitions);
        for (tp, target) in self.partitions.rewind(&partitions) {
            info!(partition = %tp, offset = target.0, "reading again from the last committed offset");
            if let Err(error) = self.seek(&tp, rdkafka::Offset::Offset(target.0)) {
                warn!(%error, partition = %tp, "cannot seek back; the next assignment re-reads it");
            }
        }
    }
}
