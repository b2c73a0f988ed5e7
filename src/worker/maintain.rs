//! The worker's side of maintenance (docs/maintenance.md): when it runs, and who runs it.
//!
//! - **Compaction of its own files**: every `maintenance.interval`, in the flush slot
//!   (after the next flush, or alone when nothing is buffered), so it never runs beside
//!   this worker's flush and it touches only the files of the partitions it owns.
//! - **Table-wide work** (checkpoint if missing, log cleanup, vacuum, for both tables,
//!   and the dead-letter table's small files binned): on the one worker that owns
//!   partition 0 of the first topic, every `maintenance.interval`, in a task beside
//!   the loop (it changes no live file, so it conflicts with no flush). Whoever owns
//!   that partition after a rebalance takes it over. The run ends by saving the key
//!   index beside the table when a start from the one saved last would read more
//!   than a round of files; every worker saves it at shutdown.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::outputs::Outputs;
use crate::maintenance::run::Target;
use crate::maintenance::{self, CleanReport, MaintenanceError};
use crate::offsets::TopicPartition;
use crate::status::Progress;
use crate::table::{PositionTable, SavedIndex, TableError, Thresholds};

/// The table-wide run in progress, if any.
pub(super) type Cleaning = JoinHandle<Vec<Result<CleanReport, MaintenanceError>>>;

/// When each kind of maintenance is next due.
#[derive(Debug)]
pub(super) struct Schedule {
    interval: Duration,
    compaction_at: Instant,
    clean_at: Instant,
    /// Whether a compaction waits for the flush slot.
    compaction_due: bool,
}

impl Schedule {
    /// A schedule whose first runs come one `interval` after start, then every `interval`.
    pub(super) fn new(interval: Duration) -> Self {
        let first = Instant::now() + interval;
        Self { interval, compaction_at: first, clean_at: first, compaction_due: false }
    }

    /// Marks compaction due when its time has come.
    fn check_compaction(&mut self, now: Instant) {
        if now >= self.compaction_at {
            self.compaction_due = true;
            self.compaction_at = now + self.interval;
        }
    }

    /// Whether the table-wide run is due now (and books the next one).
    fn take_clean(&mut self, now: Instant) -> bool {
        let due = now >= self.clean_at;
        if due {
            self.clean_at = now + self.interval;
        }
        due
    }
}

impl super::Worker {
    /// Whether this worker runs the table-wide work: it owns partition 0 of the first topic.
    fn runs_table_wide_work(&self) -> bool {
        self.config
            .kafka
            .topics
            .first()
            .is_some_and(|topic| self.partitions.is_assigned(&TopicPartition::new(topic, 0)))
    }

    /// At each tick: starts what maintenance is due.
    pub(super) fn schedule_maintenance(&mut self) {
        if !self.config.maintenance.enabled {
            return;
        }
        let now = Instant::now();
        self.schedule.check_compaction(now);
        if self.schedule.compaction_due && self.in_flight.is_none() && self.buffer.is_empty() {
            // Nothing to flush: the compaction takes the flush slot alone.
            self.start_flush();
        }
        if self.cleaning.is_none() && self.runs_table_wide_work() && self.schedule.take_clean(now) {
            self.start_clean();
        }
    }

    /// The partitions whose files the next flush task compacts, if compaction is due.
    pub(super) fn take_due_compaction(&mut self) -> Option<Vec<TopicPartition>> {
        if !std::mem::take(&mut self.schedule.compaction_due) {
            return None;
        }
        let owned = self.partitions.assigned_partitions();
        (!owned.is_empty()).then_some(owned)
    }

    /// Starts the table-wide run beside the loop.
    fn start_clean(&mut self) {
        let mut targets = vec![Target::merged(self.reader.delta(), self.reader.uri())];
        targets.extend(self.appended_tables.iter().cloned());
        let progress = self.progress.clone();
        let unreferenced = self.config.maintenance.unreferenced_file_age;
        let policy = self.config.retry.clone();
        let positions = self.reader.clone();
        self.cleaning = Some(tokio::spawn(async move {
            let reports = clean_tables(&targets, &progress, unreferenced, &policy).await;
            log_saved(positions.save_key_index_if_stale().await);
            reports
        }));
    }

    /// Books a finished table-wide run.
    pub(super) fn clean_finished(&mut self, reports: Vec<Result<CleanReport, MaintenanceError>>) {
        for result in reports {
            match result {
                Ok(report) => {
                    let after = report.after.clone().unwrap_or_else(|| report.before.clone());
                    if report.log_files.is_empty()
                        && report.data_files.is_empty()
                        && report.checkpoint_written.is_none()
                    {
                        tracing::debug!(table = %report.uri, files_on_disk = after.files_on_disk, "table maintained; nothing to remove");
                        continue;
                    }
                    info!(
                        table = %report.uri,
                        log_files_removed = report.log_files.len(),
                        data_files_removed = report.data_files.len(),
                        bytes_removed = report.bytes_removed(),
                        checkpoint_written = ?report.checkpoint_written,
                        files_on_disk = after.files_on_disk,
                        live_files = after.live_files,
                        commits_since_checkpoint = after.commits_since_checkpoint,
                        duration_ms = report.elapsed.as_millis() as u64,
                        "maintained table"
                    );
                }
                Err(error) => warn!(%error, "table maintenance failed; it runs again at the next maintenance.interval"),
            }
        }
    }
}

/// The table-wide run on `targets` (the positions table first), keeping `progress`
/// current with the positions table's footprint.
async fn clean_tables(
    targets: &[Target],
    progress: &Progress,
    unreferenced_file_age: Duration,
    policy: &crate::config::RetryConfig,
) -> Vec<Result<CleanReport, MaintenanceError>> {
    let started = std::time::Instant::now();
    let reports = maintenance::run::table_wide(targets, false, unreferenced_file_age, policy).await;
    if let Some(Ok(report)) = reports.first() {
        let after = report.after.clone().unwrap_or_else(|| report.before.clone());
        progress.update_maintenance(|m| {
            m.files_on_disk = Some(after.files_on_disk);
            m.bytes_on_disk = Some(after.bytes_on_disk);
            m.live_files = Some(after.live_files);
            m.live_bytes = Some(after.live_bytes);
            m.log_files = Some(after.log_files);
            m.log_bytes = Some(after.log_bytes);
            m.commits_since_checkpoint = Some(after.commits_since_checkpoint);
        });
    }
    let removed: usize = reports.iter().flatten().map(|r| r.log_files.len() + r.data_files.len()).sum();
    Progress::add(&progress.files_removed_by_maintenance, removed as u64);
    progress.update_maintenance(|m| m.last_clean = Some((unix_now(), started.elapsed().as_secs_f64())));
    reports
}

impl Outputs {
    /// Compacts the files of `partitions` (the worker's own) in the positions table;
    /// a compaction that fails or conflicts is dropped and tried again next interval.
    pub(super) async fn compact(&mut self, partitions: &[TopicPartition], thresholds: Thresholds, progress: &Progress) {
        let started = std::time::Instant::now();
        match self.positions.compact(partitions, thresholds).await {
            Ok((table, report)) => {
                self.positions = table;
                if report.committed {
                    Progress::bump(&progress.compactions);
                    info!(
                        groups = report.groups,
                        files_removed = report.files_removed,
                        files_added = report.files_added,
                        rows = report.rows,
                        duration_ms = report.elapsed.as_millis() as u64,
                        "compacted files"
                    );
                }
            }
            Err(error) if error.is_conflict() => {
                info!(%error, "compaction met another commit and was dropped; its files are left for vacuum");
            }
            Err(error) => warn!(%error, "compaction failed; it is tried again at the next maintenance.interval"),
        }
        progress.update_maintenance(|m| m.last_compaction = Some((unix_now(), started.elapsed().as_secs_f64())));
    }
}

/// At shutdown, once every durable offset is committed: saves the key index of
/// `positions` (the worker's), so the next start reads one object instead of every live
/// file's keys; given up at `deadline` (`worker.shutdown_timeout`).
pub(super) async fn save_key_index_until(positions: PositionTable, deadline: Instant) {
    if tokio::time::timeout_at(deadline, async { log_saved(positions.save_key_index().await) }).await.is_err() {
        warn!("the key index was not saved within worker.shutdown_timeout; the next start reads the table's files");
    }
}

/// Logs how saving the positions table's key index went; after a failure the next
/// start reads the table's files instead.
fn log_saved(saved: Result<Option<SavedIndex>, TableError>) {
    match saved {
        Ok(Some(saved)) => info!(
            version = saved.version,
            keys = saved.keys,
            bytes = saved.bytes,
            duration_ms = saved.elapsed.as_millis() as u64,
            "saved the key index"
        ),
        Ok(None) => {}
        Err(error) => warn!(%error, "the key index could not be saved; the next start reads the table's files"),
    }
}

/// Now, in seconds since the Unix epoch (the maintenance gauges' unit).
fn unix_now() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}
