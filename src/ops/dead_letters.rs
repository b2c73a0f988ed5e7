//! `dead-letters list` and `dead-letters republish`: the most recent rejected messages
//! with their reasons, and re-publishing selected ones to their source topics once
//! their cause is fixed ([`crate::dead_letter::review`] finds and sends them).

use crate::config::Config;
use crate::dead_letter::review::{self, ReviewError, Selection};
use crate::dead_letter::{ReasonCounts, preview};

/// Prints the most recent dead letters, newest first, optionally of one `category`,
/// with `width` characters of their key and value.
///
/// # Errors
/// When the dead-letter destination cannot be read.
pub async fn list(config: &Config, category: Option<&str>, limit: usize, width: usize) -> Result<(), ReviewError> {
    let found = review::list(config, category, limit).await?;
    let mut counts = ReasonCounts::default();
    for d in &found {
        counts.add(&d.category, 1);
        let rejected = chrono::DateTime::from_timestamp_micros(d.rejected_at_micros)
            .map_or_else(|| d.rejected_at_micros.to_string(), |t| t.to_rfc3339());
        println!(
            "{}:{}:{}  {}  {}",
            d.source.tp.topic, d.source.tp.partition.0, d.source.offset.0, d.category, rejected
        );
        println!("  reason: {}", d.reason);
        println!("  key:    {}", preview(d.key.as_deref(), width));
        println!("  value:  {}", preview(d.value.as_deref(), width));
    }
    println!(
        "{} dead letters shown ({})",
        found.len(),
        if counts.total() == 0 { "none".into() } else { counts.to_string() }
    );
    Ok(())
}

/// Re-publishes the selected dead letters (with `force`, also those the current rules
/// still reject; with `dry_run`, none) and prints what was done.
///
/// # Errors
/// When the destination cannot be read or a message cannot be published.
pub async fn republish(config: &Config, selection: &Selection, force: bool, dry_run: bool) -> Result<(), ReviewError> {
    let report = review::republish(config, selection, force, dry_run).await?;
    let verb = if dry_run { "would re-publish" } else { "re-published" };
    for c in &report.republished {
        println!("{verb} {c}");
    }
    for (c, reason) in &report.still_invalid {
        println!("skipped {c}: still rejected by the current rules ({reason}); fix it upstream or use --force");
    }
    for c in &report.not_found {
        println!("not found: no dead letter at {c}");
    }
    println!(
        "{} {verb}, {} still invalid, {} not found",
        report.republished.len(),
        report.still_invalid.len(),
        report.not_found.len()
    );
    Ok(())
}
