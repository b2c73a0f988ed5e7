//! Table maintenance over a trading day: what keeps storage, the log and readers
//! bounded while a worker commits every few seconds (docs/maintenance.md).
//!
//! - **Checkpoints**: written by the commit that reaches the table's
//!   `delta.checkpointInterval` (delta-rs's post-commit hook); [`clean`] writes one when
//!   the newest is further back than that (a writer crashed before its hook ran), never
//!   at a version the hook writes, and only after claiming that version, so no two
//!   writers ever write one checkpoint.
//! - **Log cleanup**: commit and checkpoint files older than the table's
//!   `delta.logRetentionDuration` and below the checkpoint that keeps the version
//!   current at that cutoff readable (the protocol's rule), by [`clean`] on a schedule
//!   instead of by every commit.
//! - **Vacuum**: data files no version within `delta.deletedFileRetentionDuration`
//!   references (removed files, and files a crashed flush or compaction wrote and never
//!   committed) are deleted; a file no commit names, never before
//!   `maintenance.unreferenced_file_age` ([`vacuum`]).
//! - **Compaction** of one worker's files: when and which by [`compaction`] (the policy),
//!   carried out by [`crate::table::PositionTable::compact`].
//!
//! Invariant kept here: nothing a version inside the table's retention window
//! references is deleted, so a reader that reads through a vacuum never fails; every
//! step is idempotent, so two runs at once (a worker and `position-sink maintain`)
//! remove nothing twice and nothing more.

pub mod binning;
pub mod compaction;
pub mod expiry;
pub mod footprint;
pub mod run;
pub mod vacuum;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deltalake::operations::vacuum::VacuumMode;
use deltalake::table::config::TablePropertiesExt;
use deltalake::{DeltaTable, DeltaTableError};

pub use footprint::Footprint;

/// A maintenance step that failed, with the table it failed on.
#[derive(Debug, thiserror::Error)]
#[error("maintenance of the Delta table at {uri} failed while {step}: {source}")]
pub struct MaintenanceError {
    /// Table location.
    pub uri: String,
    /// What it was doing.
    pub step: &'static str,
    /// Cause.
    pub source: Box<DeltaTableError>,
}

impl MaintenanceError {
    /// Whether running the step again may succeed: not when the table's settings are
    /// refused (a person must change them).
    pub fn is_retryable(&self) -> bool {
        self.step != RETENTION_CHECK
    }
}

/// The step that refuses a table whose retention settings would break time travel.
const RETENTION_CHECK: &str = "checking the retention settings";

/// A file removed (or, in a dry run, to be removed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// Path relative to the table root.
    pub path: String,
    /// Bytes.
    pub bytes: u64,
}

/// What one [`clean`] of a table did (or would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CleanReport {
    /// Table location.
    pub uri: String,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The table's settings that decided it.
    pub settings: RetentionSettings,
    /// How old a file no commit names must be before vacuum deletes it
    /// (`maintenance.unreferenced_file_age`).
    #[serde(with = "humantime_serde")]
    pub unreferenced_file_age: Duration,
    /// The footprint before.
    pub before: Footprint,
    /// The checkpoint written, if one was missing.
    pub checkpoint_written: Option<u64>,
    /// Log files removed.
    pub log_files: Vec<Removed>,
    /// Data files removed by vacuum.
    pub data_files: Vec<Removed>,
    /// The footprint after (not measured in a dry run).
    pub after: Option<Footprint>,
    /// Time taken.
    #[serde(with = "humantime_serde")]
    pub elapsed: Duration,
}

impl CleanReport {
    /// Bytes removed (or to be removed) in all.
    pub fn bytes_removed(&self) -> u64 {
        self.log_files.iter().chain(&self.data_files).map(|r| r.bytes).sum()
    }
}

/// The table properties maintenance follows, as the table holds them (Delta's
/// defaults where it holds none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RetentionSettings {
    /// `delta.checkpointInterval`.
    pub checkpoint_interval: u64,
    /// `delta.logRetentionDuration`.
    #[serde(with = "humantime_serde")]
    pub log_retention: Duration,
    /// `delta.deletedFileRetentionDuration`.
    #[serde(with = "humantime_serde")]
    pub deleted_file_retention: Duration,
    /// `delta.enableExpiredLogCleanup`.
    pub log_cleanup: bool,
}

impl RetentionSettings {
    /// The settings of `table` at the version it is loaded at.
    ///
    /// # Errors
    /// When the table has no snapshot.
    pub fn of(table: &DeltaTable) -> Result<Self, DeltaTableError> {
        let config = table.snapshot()?.table_config();
        Ok(Self {
            checkpoint_interval: config.checkpoint_interval().get(),
            log_retention: config.log_retention_duration(),
            deleted_file_retention: config.deleted_file_retention_duration(),
            log_cleanup: config.enable_expired_log_cleanup(),
        })
    }
}

/// Runs the table-wide steps on `table` (read afresh): a missing checkpoint, log
/// cleanup, vacuum, never deleting a file no commit names before it is
/// `unreferenced_file_age` old; with `dry_run`, only finds what they would remove.
///
/// # Errors
/// The step that failed; the steps before it stay done (each is idempotent, so the
/// next run carries on).
pub async fn clean(
    table: &DeltaTable,
    uri: &str,
    dry_run: bool,
    unreferenced_file_age: Duration,
) -> Result<CleanReport, MaintenanceError> {
    let started = Instant::now();
    let failed =
        |step: &'static str| move |source| MaintenanceError { uri: uri.to_string(), step, source: Box::new(source) };
    let mut table = table.clone();
    table.update_state().await.map_err(failed("reading the table"))?;
    let settings = RetentionSettings::of(&table).map_err(failed("reading the table"))?;
    let objects = footprint::list_objects(&table).await.map_err(failed("listing the table's files"))?;
    let before = footprint::of(&table, &objects).map_err(failed("reading the table"))?;

    let mut checkpoint_written = None;
    if !dry_run
        && needs_checkpoint(&before, &settings)
        && claim_checkpoint(&table, before.version).await.map_err(failed("claiming a checkpoint"))?
    {
        #[cfg(feature = "fault-injection")]
        crate::faults::maybe_abort_in_maintenance("with a checkpoint claimed, before it is written");
        deltalake::checkpoints::create_checkpoint(&table, None).await.map_err(failed("writing a checkpoint"))?;
        #[cfg(feature = "fault-injection")]
        crate::faults::maybe_abort_in_maintenance("with a checkpoint written");
        checkpoint_written = Some(before.version);
    }
    let log_files = if settings.log_cleanup {
        let checkpoint = checkpoint_written.or(before.checkpoint_version);
        expired_log_files(&objects, checkpoint, &settings, now_millis())
    } else {
        Vec::new()
    };
    if !dry_run && !log_files.is_empty() {
        delete(&table, &log_files, "log cleanup").await.map_err(failed("removing expired log files"))?;
    }

    vacuum::check(&settings).map_err(failed(RETENTION_CHECK))?;
    let now = now_millis();
    let window_start = now - millis(settings.deleted_file_retention);
    let retention = chrono::Duration::from_std(settings.deleted_file_retention).unwrap_or(chrono::Duration::MAX);
    // delta-rs plans the vacuum (which files no version in the window references); the
    // files are deleted here, because delta-rs's own run commits a VACUUM START first,
    // which conflicts with any flush committed meanwhile (it declares the whole table read).
    let (_, planned) = table
        .clone()
        .vacuum()
        .with_mode(VacuumMode::Full)
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_dry_run(true)
        .await
        .map_err(failed("planning the vacuum"))?;
    let mut planned_files = planned.files_deleted;
    planned_files.sort();
    planned_files.dedup();
    if !planned_files.is_empty() {
        let recent =
            vacuum::recent_removes(&table, &objects, window_start).await.map_err(failed("reading recent removes"))?;
        let in_window =
            vacuum::recently_tombstoned(&table, window_start).await.map_err(failed("reading the tombstones"))?;
        let tombstoned = vacuum::tombstoned(&table).await.map_err(failed("reading the tombstones"))?;
        let unreferenced_before = now - millis(unreferenced_file_age.max(settings.deleted_file_retention));
        planned_files.retain(|path| {
            let read_in_window =
                in_window.contains(path) || recent.data.contains(path) || recent.vectors.contains(path);
            // A file no commit names may be one a writer is about to commit: only old
            // enough by the store's own clock does it go.
            let committed_once = tombstoned.contains(path);
            let old_enough = objects.get(path).is_some_and(|(_, modified)| *modified <= unreferenced_before);
            !read_in_window && (committed_once || old_enough)
        });
    }
    let data_files: Vec<Removed> = planned_files
        .into_iter()
        .map(|path| {
            let bytes = objects.get(&path).map_or(0, |(size, _)| *size);
            Removed { path, bytes }
        })
        .collect();
    if !dry_run && !data_files.is_empty() {
        delete(&table, &data_files, "vacuum").await.map_err(failed("vacuuming"))?;
    }
    let vacuumed = table;
    let after = if dry_run { None } else { Some(footprint::measure(&vacuumed).await.map_err(failed("measuring"))?) };
    let report = CleanReport {
        uri: uri.to_string(),
        dry_run,
        settings,
        unreferenced_file_age,
        before,
        checkpoint_written,
        log_files,
        data_files,
        after,
        elapsed: started.elapsed(),
    };
    if !dry_run {
        record_run(&vacuumed, &report).await.map_err(failed("recording the run"))?;
    }
    Ok(report)
}

/// Deletes `files` for `step` (a file already gone is fine: another run took it).
async fn delete(table: &DeltaTable, files: &[Removed], step: &str) -> Result<(), DeltaTableError> {
    #[cfg(feature = "fault-injection")]
    if files.len() > 1 {
        let (first, rest) = files.split_at(files.len() / 2);
        delete_all(table, first).await?;
        crate::faults::maybe_abort_in_maintenance(&format!("halfway through {step}'s deletes"));
        return delete_all(table, rest).await;
    }
    let _ = step;
    delete_all(table, files).await
}

/// Deletes `files`, retrying a failed request: S3's bulk delete is a `POST` the store
/// does not retry itself, and deleting a file again is harmless.
async fn delete_all(table: &DeltaTable, files: &[Removed]) -> Result<(), DeltaTableError> {
    use futures::{StreamExt, TryStreamExt};
    let store = table.object_store();
    let paths: Vec<deltalake::Path> = files
        .iter()
        .map(|f| deltalake::Path::parse(&f.path).unwrap_or_else(|_| deltalake::Path::from(f.path.as_str())))
        .collect();
    let attempt = || async {
        let locations = futures::stream::iter(paths.clone().into_iter().map(Ok)).boxed();
        store
            .delete_stream(locations)
            .or_else(|error| async move {
                match error {
                    deltalake::ObjectStoreError::NotFound { path, .. } => Ok(deltalake::Path::from(path)),
                    other => Err(other),
                }
            })
            .try_collect::<Vec<_>>()
            .await
    };
    let policy = crate::config::RetryConfig::default();
    crate::retry::retry(&policy, "delete files", attempt, |_| true).await?;
    Ok(())
}

/// Where the last run of [`clean`] is recorded, relative to the table root: a file
/// Delta readers and vacuum ignore (its directory starts with `_`). A record in the
/// log itself would be a commit that conflicts with every flush made meanwhile.
pub const LAST_RUN_FILE: &str = "_position_sink/maintenance.json";

/// What [`LAST_RUN_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastRun {
    /// When it finished, RFC 3339.
    pub finished_at: String,
    /// The table version it ran at.
    pub version: u64,
    /// Log files removed.
    pub log_files_removed: usize,
    /// Data files removed.
    pub data_files_removed: usize,
    /// Bytes removed.
    pub bytes_removed: u64,
}

async fn record_run(table: &DeltaTable, report: &CleanReport) -> Result<(), DeltaTableError> {
    use object_store::ObjectStoreExt;
    let run = LastRun {
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        version: report.before.version,
        log_files_removed: report.log_files.len(),
        data_files_removed: report.data_files.len(),
        bytes_removed: report.bytes_removed(),
    };
    let body = serde_json::to_vec(&run).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
    table.object_store().put(&deltalake::Path::from(LAST_RUN_FILE), body.into()).await?;
    Ok(())
}

/// The last run of [`clean`] on `table`, if one was recorded.
pub async fn last_run(table: &DeltaTable) -> Option<LastRun> {
    use object_store::ObjectStoreExt;
    let bytes = table.object_store().get(&deltalake::Path::from(LAST_RUN_FILE)).await.ok()?.bytes().await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Bins the small files of an append-only table (the dead-letter and history tables)
/// into files of up to 32 MiB per partition, rows sorted by `sort_by`: a file per flush
/// would otherwise pile up over a day. Concurrent appends do not conflict with it; of
/// two runs at once, one is dropped ([`binning`]).
///
/// # Errors
/// When the table cannot be read or written, or the commit fails.
pub async fn bin_small_files(
    table: &DeltaTable,
    uri: &str,
    deadline: Duration,
    sort_by: &[&str],
) -> Result<(), MaintenanceError> {
    let failed =
        |source| MaintenanceError { uri: uri.to_string(), step: "binning small files", source: Box::new(source) };
    let binned = binning::bin(table, deadline, sort_by).await.map_err(failed)?;
    if binned.conflicted {
        tracing::info!(uri, files = binned.files, "binning small files met another run's; dropped");
    }
    Ok(())
}

/// Removes the days an append-only table no longer keeps: one commit removing every
/// file of a day before the first kept (vacuum deletes them once they are past the
/// table's retention).
///
/// # Errors
/// When the table cannot be read or the commit fails.
pub async fn expire_days(
    table: &DeltaTable,
    uri: &str,
    keep: run::KeepDays,
    deadline: Duration,
) -> Result<(), MaintenanceError> {
    let failed =
        |source| MaintenanceError { uri: uri.to_string(), step: "removing old days", source: Box::new(source) };
    let first_kept = chrono::Utc::now().date_naive() - chrono::Days::new(u64::from(keep.days.saturating_sub(1)));
    let removed = expiry::expire(table, keep.column, &first_kept.format("%Y-%m-%d").to_string(), deadline)
        .await
        .map_err(failed)?;
    if removed > 0 {
        tracing::info!(uri, files = removed, keep_days = keep.days, before = %first_kept, "removed days no longer kept");
    }
    Ok(())
}

/// Whether the table-wide run writes a checkpoint at the table's version: when the newest
/// is `checkpointInterval` commits or more back, and never at a version the commit's own
/// post-commit hook checkpoints: delta-rs's hook checkpoints version `v` when `v + 1` is a
/// multiple of the interval (99, 199, … at 100). Two writers of one checkpoint version
/// race: `_last_checkpoint` can name the size of one file while the other's bytes stand,
/// and readers then fail to read the table. Two table-wide runs are kept apart by
/// [`claim_checkpoint`].
fn needs_checkpoint(footprint: &Footprint, settings: &RetentionSettings) -> bool {
    let interval = settings.checkpoint_interval.max(1);
    footprint.version > 0
        && footprint.commits_since_checkpoint >= interval
        && !(footprint.version + 1).is_multiple_of(interval)
}

/// Where the claims of checkpoint versions are kept, relative to the table root.
pub const CHECKPOINT_CLAIMS: &str = "_position_sink/checkpoints";

/// Claims the writing of the checkpoint of `version` for this run: the claim is an object
/// created only if absent, so of two table-wide runs (a worker's and `position-sink
/// maintain`, or two workers during a hand-over) exactly one writes that checkpoint.
/// Returns whether this run holds the claim.
async fn claim_checkpoint(table: &DeltaTable, version: u64) -> Result<bool, DeltaTableError> {
    use object_store::{PutMode, PutOptions};
    let claim = deltalake::Path::from(format!("{CHECKPOINT_CLAIMS}/{version:020}.claim"));
    let body = chrono::Utc::now().to_rfc3339().into_bytes();
    let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
    match table.object_store().put_opts(&claim, body.into(), options).await {
        Ok(_) => Ok(true),
        Err(deltalake::ObjectStoreError::AlreadyExists { .. }) => Ok(false),
        Err(other) => Err(other.into()),
    }
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// The log files the protocol's metadata cleanup removes: the commit current at the
/// cutoff instant (`now - delta.logRetentionDuration`: the newest commit written at or
/// before it) must stay readable, so the newest checkpoint at or below that commit is
/// kept with every commit after it, and only the files below that checkpoint go.
/// (delta-rs's `cleanup_metadata` keeps the checkpoint at or below the first commit
/// *after* the cutoff, one version later, which leaves the commit current at the cutoff
/// unreadable.) Claims of checkpoint versions below the kept checkpoint go with them.
fn expired_log_files(
    objects: &HashMap<String, (u64, i64)>,
    newest_checkpoint: Option<u64>,
    settings: &RetentionSettings,
    now_millis: i64,
) -> Vec<Removed> {
    let cutoff = now_millis - i64::try_from(settings.log_retention.as_millis()).unwrap_or(i64::MAX);
    let entries: Vec<(&String, u64, bool, u64, i64)> = objects
        .iter()
        .filter_map(|(path, (size, modified))| {
            let name = path.strip_prefix("_delta_log/")?;
            let (v, is_commit) = footprint::log_entry(name)?;
            Some((path, v, is_commit, *size, *modified))
        })
        .collect();
    let Some(cutoff_commit) = entries.iter().filter(|e| e.2 && e.4 <= cutoff).map(|e| e.1).max() else {
        return Vec::new();
    };
    let kept_checkpoint = entries
        .iter()
        .filter(|e| !e.2 && e.1 <= cutoff_commit)
        .map(|e| e.1)
        .chain(newest_checkpoint.filter(|c| *c <= cutoff_commit))
        .max();
    let Some(kept_checkpoint) = kept_checkpoint else { return Vec::new() };
    let claims = objects.iter().filter_map(|(path, (size, _))| {
        let name = path.strip_prefix(CHECKPOINT_CLAIMS)?.strip_prefix('/')?;
        let version: u64 = name.strip_suffix(".claim")?.parse().ok()?;
        (version < kept_checkpoint).then(|| Removed { path: path.clone(), bytes: *size })
    });
    let mut removed: Vec<Removed> = entries
        .into_iter()
        .filter(|e| e.1 < kept_checkpoint && e.4 <= cutoff)
        .map(|e| Removed { path: e.0.clone(), bytes: e.3 })
        .chain(claims)
        .collect();
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(log_retention_secs: u64) -> RetentionSettings {
        RetentionSettings {
            checkpoint_interval: 10,
            log_retention: Duration::from_secs(log_retention_secs),
            deleted_file_retention: Duration::from_secs(5),
            log_cleanup: true,
        }
    }

    #[test]
    fn the_run_never_checkpoints_a_version_the_commit_hook_checkpoints() {
        let at =
            |version, commits_since_checkpoint| Footprint { version, commits_since_checkpoint, ..Footprint::default() };
        assert!(needs_checkpoint(&at(23, 13), &settings(1)), "13 commits since the last checkpoint");
        assert!(needs_checkpoint(&at(30, 12), &settings(1)), "version 30 is no hook's (interval 10)");
        assert!(!needs_checkpoint(&at(29, 11), &settings(1)), "version 29 is the hook's: 29 + 1 is a multiple of 10");
        assert!(!needs_checkpoint(&at(25, 5), &settings(1)), "fewer commits than the interval");
    }

    fn log(entries: &[(&str, i64)]) -> HashMap<String, (u64, i64)> {
        entries.iter().map(|(name, at)| (format!("_delta_log/{name}"), (100, *at * 1000))).collect()
    }

    #[test]
    fn only_log_files_older_than_retention_and_below_a_checkpoint_go() {
        let objects = log(&[
            ("00000000000000000000.json", 0),
            ("00000000000000000001.json", 10),
            ("00000000000000000002.json", 20),
            ("00000000000000000002.checkpoint.parquet", 20),
            ("00000000000000000003.json", 30),
            ("00000000000000000004.json", 95),
        ]);
        let removed: Vec<String> =
            expired_log_files(&objects, Some(2), &settings(50), 100_000).into_iter().map(|r| r.path).collect();
        assert_eq!(removed, ["_delta_log/00000000000000000000.json", "_delta_log/00000000000000000001.json"]);
        assert!(expired_log_files(&objects, None, &settings(200), 100_000).is_empty(), "all inside retention");
    }

    #[test]
    fn the_version_current_at_the_log_cutoff_stays_readable() {
        // Cutoff at 50 s: version 2 (written at 20 s) is the version a reader saw then;
        // the checkpoint at 3 was written after the cutoff, so the one at 2 is kept.
        let objects = log(&[
            ("00000000000000000000.json", 0),
            ("00000000000000000001.json", 10),
            ("00000000000000000002.json", 20),
            ("00000000000000000002.checkpoint.parquet", 20),
            ("00000000000000000003.json", 60),
            ("00000000000000000003.checkpoint.parquet", 60),
            ("00000000000000000004.json", 95),
        ]);
        let removed: Vec<String> =
            expired_log_files(&objects, Some(3), &settings(50), 100_000).into_iter().map(|r| r.path).collect();
        assert_eq!(removed, ["_delta_log/00000000000000000000.json", "_delta_log/00000000000000000001.json"]);
        let mut with_claims = objects.clone();
        with_claims.insert(format!("{CHECKPOINT_CLAIMS}/{:020}.claim", 1), (10, 0));
        with_claims.insert(format!("{CHECKPOINT_CLAIMS}/{:020}.claim", 2), (10, 0));
        let removed = expired_log_files(&with_claims, Some(3), &settings(50), 100_000);
        assert!(removed.iter().any(|r| r.path.ends_with("00000000000000000001.claim")), "{removed:?}");
        assert!(!removed.iter().any(|r| r.path.ends_with("00000000000000000002.claim")), "{removed:?}");
    }
}
