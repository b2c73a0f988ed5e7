//! The table-wide run: what one worker (the one that owns partition 0 of the first
//! topic) does every `maintenance.interval`, and `position-sink maintain` once, for
//! every table of the pipeline: the days an appended table keeps no longer removed and
//! its small files binned, then each table cleaned ([`super::clean`]: checkpoint, log
//! cleanup, vacuum). Each step is retried on its own and is idempotent, so two runs at
//! once remove nothing twice.

use std::time::Duration;

use deltalake::DeltaTable;

use super::{CleanReport, MaintenanceError, bin_small_files, clean, expire_days};
use crate::config::RetryConfig;
use crate::retry::retry;

/// A table the table-wide run maintains.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table (read afresh by each step).
    pub delta: DeltaTable,
    /// Its location, for logs and reports.
    pub uri: String,
    /// How it is kept when rows are only appended to it (the dead-letter and history
    /// tables): its small files are binned into larger ones first.
    pub appended: Option<Appending>,
}

/// How an append-only table is kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct Appending {
    /// The columns a binned file's rows are sorted by.
    pub sort_by: &'static [&'static str],
    /// The days it keeps, if it drops older ones.
    pub keep: Option<KeepDays>,
}

/// Whole days an append-only table keeps, counted back from today (UTC).
#[derive(Debug, Clone, Copy)]
pub struct KeepDays {
    /// The partition column holding the day, as `YYYY-MM-DD`.
    pub column: &'static str,
    /// Days kept: today and the `days - 1` before it.
    pub days: u32,
}

impl Target {
    /// A table whose rows are merged (the positions table).
    pub fn merged(delta: &DeltaTable, uri: &str) -> Self {
        Self { delta: delta.clone(), uri: uri.to_string(), appended: None }
    }

    /// An append-only table kept as `appending` says.
    pub fn appended(delta: &DeltaTable, uri: &str, appending: Appending) -> Self {
        Self { delta: delta.clone(), uri: uri.to_string(), appended: Some(appending) }
    }
}

/// Runs the table-wide steps on `targets` in order: one result per table, its
/// [`CleanReport`] or the first step that failed (after `policy`'s retries). A table
/// whose binning failed is not cleaned this time. `dry_run` bins nothing and lists
/// what cleaning would remove. Files no version references are kept while younger
/// than `unreferenced_file_age`; binning commits only within a third of it.
pub async fn table_wide(
    targets: &[Target],
    dry_run: bool,
    unreferenced_file_age: Duration,
    policy: &RetryConfig,
) -> Vec<Result<CleanReport, MaintenanceError>> {
    let mut reports = Vec::with_capacity(targets.len());
    for target in targets {
        if let Some(appending) = target.appended.filter(|_| !dry_run) {
            let deadline = unreferenced_file_age / 3;
            if let Some(keep) = appending.keep {
                let expire = || expire_days(&target.delta, &target.uri, keep, deadline);
                if let Err(error) = retry(policy, "remove old days", expire, MaintenanceError::is_retryable).await {
                    reports.push(Err(error));
                    continue;
                }
            }
            let bin = || bin_small_files(&target.delta, &target.uri, deadline, appending.sort_by);
            if let Err(error) = retry(policy, "bin a table's small files", bin, MaintenanceError::is_retryable).await {
                reports.push(Err(error));
                continue;
            }
        }
        let cleaned = || clean(&target.delta, &target.uri, dry_run, unreferenced_file_age);
        reports.push(retry(policy, "clean a table", cleaned, MaintenanceError::is_retryable).await);
    }
    reports
}
