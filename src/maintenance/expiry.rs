//! Removing whole days from an append-only table partitioned by day (the history's
//! `history.keep_days`): one commit removes every file of the days before the first
//! kept; vacuum deletes the files once they are past the table's retention, so time
//! travel inside it still reads them.
//!
//! The commit's removes say `dataChange: true` (rows leave the table), so of two runs
//! at once the second conflicts ("a file deleted twice") and is dropped; appends are
//! blind and never conflict with it.

use std::time::Duration;

use deltalake::kernel::Action;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};

/// Removes the files whose `column` partition value (a day, `YYYY-MM-DD`) is before
/// `first_kept`, in one commit. Returns the files removed (0 when none, or when another
/// run removed them first).
///
/// # Errors
/// When the table cannot be read, or the commit fails or outlasts `deadline`.
pub async fn expire(
    table: &DeltaTable,
    column: &str,
    first_kept: &str,
    deadline: Duration,
) -> Result<usize, DeltaTableError> {
    let mut table = table.clone();
    table.update_state().await?;
    let snapshot = table.snapshot()?.clone();
    let actions: Vec<Action> = snapshot
        .log_data()
        .iter()
        .filter(|f| f.partition_values_map().remove(column).flatten().is_some_and(|day| is_before(&day, first_kept)))
        .map(|f| Action::Remove(f.remove_action(true)))
        .collect();
    if actions.is_empty() {
        return Ok(0);
    }
    let removed = actions.len();
    let operation = DeltaOperation::Delete { predicate: Some(format!("{column} < '{first_kept}'")) };
    // Log cleanup is maintenance's own step, not every commit's.
    let properties = CommitProperties::default().with_cleanup_expired_logs(Some(false));
    let commit =
        CommitBuilder::from(properties).with_actions(actions).build(Some(&snapshot), table.log_store(), operation);
    match tokio::time::timeout(deadline, commit).await {
        Ok(Ok(_)) => Ok(removed),
        Ok(Err(
            DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_),
            },
        )) => Ok(0),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(DeltaTableError::Generic(format!(
            "removing old days did not commit within the {} a write may take; it runs again next time",
            humantime::format_duration(deadline)
        ))),
    }
}

/// Whether the day `day` comes before `first_kept` (both `YYYY-MM-DD`, so their text
/// order is their date order).
fn is_before(day: &str, first_kept: &str) -> bool {
    day < first_kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_compare_as_dates() {
        assert!(is_before("2025-11-24", "2025-11-25"));
        assert!(is_before("2024-12-31", "2025-01-01"));
        assert!(!is_before("2025-11-25", "2025-11-25"));
        assert!(!is_before("2025-11-26", "2025-11-25"));
    }
}
