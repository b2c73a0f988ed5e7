//! Every accepted update to the history table: appended after the positions table,
//! with the batch's offsets as `txn`, each update stamped with the `ingested_at` of the
//! positions commit that first showed it. So the book "as known at" a time is what the
//! positions table showed then, also when a crash fell between the two commits: the
//! updates appended after the restart carry the stamp their positions commit recorded
//! (read back from its `commitInfo`), not the restart's.

use std::collections::HashMap;

use futures::future::BoxFuture;

use super::{FlushContext, Output, OutputReport, Place};
use crate::config::Config;
use crate::delta::TableError;
use crate::delta::{RecordStamp, stamp_of};
use crate::history::{Entry, HistoryTable};
use crate::maintenance::run::Target;
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::retry::retry;
use crate::status::Progress;
use crate::worker::batch::Batch;
use crate::worker::flush::{FlushError, retry_write};

/// The history table as a flush output.
#[derive(Debug)]
pub struct HistoryTableOutput {
    table: HistoryTable,
    /// `history.keep_days`.
    keep_days: u32,
}

impl HistoryTableOutput {
    /// Opens (or creates) the table `history.table_uri` names.
    ///
    /// # Errors
    /// When it cannot be opened after retries.
    pub async fn open(config: &Config) -> Result<Self, FlushError> {
        let uri = config.history.resolved_table_uri(&config.delta);
        let (storage, properties) = (&config.delta.storage_options, &config.delta.table_properties);
        let group = &config.kafka.group_id;
        let table = retry(
            &config.retry,
            "open the history table",
            || HistoryTable::open_or_create(&uri, storage, properties, group),
            TableError::is_retryable,
        )
        .await?
        .with_write_deadline(config.maintenance.write_deadline());
        Ok(Self { table, keep_days: config.history.keep_days })
    }
}

/// The stamps of the updates of a batch that an earlier positions commit showed first.
#[derive(Debug, Default)]
struct EarlierStamps {
    /// The positions table's record of each partition before this flush's write.
    recorded_before: HashMap<TopicPartition, Offset>,
    /// The commits that recorded the updates at or below it, per partition.
    commits: HashMap<TopicPartition, Vec<RecordStamp>>,
}

impl EarlierStamps {
    /// The stamp of `entry` when an earlier commit showed it first (`None`: this
    /// flush's write did, or the log no longer says).
    fn of(&self, entry: &Entry) -> Option<i64> {
        let Coordinates { tp, offset } = &entry.update.source;
        let recorded = self.recorded_before.get(tp).is_some_and(|before| offset <= before);
        recorded.then(|| self.commits.get(tp).and_then(|commits| stamp_of(commits, *offset))).flatten()
    }
}

impl HistoryTableOutput {
    /// What dates the updates of `batch` that the positions table recorded before this
    /// flush's write: nothing to look up in a flush that follows the last one, the log's
    /// commits back to the one that first recorded the oldest of them after a crash
    /// (or a replay) between the positions table's commit and the history's.
    async fn stamps(&self, batch: &Batch, context: &FlushContext<'_>) -> Result<EarlierStamps, FlushError> {
        let Some((positions, written)) = context.positions else { return Ok(EarlierStamps::default()) };
        let recorded_before = written.recorded_before.clone();
        let earlier = |e: &&Entry| {
            let Coordinates { tp, offset } = &e.update.source;
            recorded_before.get(tp).is_some_and(|before| offset <= before)
        };
        if !batch.history.iter().any(|e| earlier(&e)) {
            return Ok(EarlierStamps { recorded_before, commits: HashMap::new() });
        }
        let partitions: Vec<TopicPartition> = written.recorded_before.keys().cloned().collect();
        let held = retry(
            context.retry,
            "read the history's recorded offsets",
            || self.table.recorded_offsets(&partitions),
            TableError::is_retryable,
        )
        .await?;
        let mut lowest: HashMap<TopicPartition, Offset> = HashMap::new();
        for entry in batch.history.iter().filter(earlier) {
            let Coordinates { tp, offset } = &entry.update.source;
            if held.get(tp).is_none_or(|done| offset > done) {
                let low = lowest.entry(tp.clone()).or_insert(*offset);
                *low = (*low).min(*offset);
            }
        }
        let commits = if lowest.is_empty() {
            HashMap::new()
        } else {
            retry(
                context.retry,
                "read the positions table's log",
                || positions.record_stamps(&lowest),
                TableError::is_retryable,
            )
            .await?
        };
        Ok(EarlierStamps { recorded_before, commits })
    }
}

impl Output for HistoryTableOutput {
    fn describe(&self) -> String {
        format!("history to table {}", self.table.uri())
    }

    fn place(&self) -> Place {
        Place::AfterPositions
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    fn write<'a>(
        &'a mut self,
        batch: &'a Batch,
        context: &'a FlushContext<'a>,
    ) -> BoxFuture<'a, Result<OutputReport, FlushError>> {
        Box::pin(async move {
            if batch.history.is_empty() {
                return Ok(OutputReport::default());
            }
            let stamps = self.stamps(batch, context).await?;
            let stamp = |entry: &Entry| stamps.of(entry).unwrap_or(batch.ingested_at_micros);
            let table = &self.table;
            let (written_table, appended) =
                retry_write(context.retry, "write history to Delta", context.progress, || {
                    table.append(&batch.history, &batch.offsets, stamp)
                })
                .await?;
            self.table = written_table;
            if appended.rows > 0 {
                Progress::bump(&context.progress.history_commits);
                Progress::add(&context.progress.history_rows, appended.rows as u64);
                Progress::add(&context.progress.history_bytes, appended.bytes);
                #[cfg(feature = "fault-injection")]
                if let Some(crash) = context.crash.after_history_commit(context.progress) {
                    return Err(FlushError::InjectedCrash(crash));
                }
            }
            Ok(OutputReport::default())
        })
    }

    fn wants_every_update(&self) -> bool {
        true
    }

    fn appended_table(&self) -> Option<Target> {
        Some(self.table.maintenance_target(self.keep_days))
    }
}
