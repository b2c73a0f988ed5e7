//! The table-wide run: what one worker (the one that owns partition 0 of the first
//! topic) does every `maintenance.interval`, and `position-sink maintain` once, for
//! every table of the pipeline: the small files of appended tables binned, then each
//! table cleaned ([`super::clean`]: checkpoint, log cleanup, vacuum). Each step is
//! retried on its own and is idempotent, so two runs at once remove nothing twice.

use std::time::Duration;

use deltalake::DeltaTable;

use super::{CleanReport, MaintenanceError, bin_small_files, clean};
use crate::config::RetryConfig;
use crate::retry::retry;

/// A table the table-wide run maintains.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table (read afresh by each step).
    pub delta: DeltaTable,
    /// Its location, for logs and reports.
    pub uri: String,
    /// Whether rows are only appended to it (the dead-letter table): its small files
    /// are binned into larger ones first.
    pub appended: bool,
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
        if target.appended && !dry_run {
            let bin = || bin_small_files(&target.delta, &target.uri, unreferenced_file_age / 3);
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
