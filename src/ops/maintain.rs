//! `position-sink maintain`: the maintenance the workers run (docs/maintenance.md), on
//! demand, for cron and Kubernetes CronJobs: compaction of every Kafka partition's
//! files, then a missing checkpoint, log cleanup and vacuum of both tables. With
//! `--dry-run` it only lists what would be removed, and how many bytes.
//!
//! Running it beside the workers is safe: a compaction that meets a worker's flush is
//! dropped (the flush wins), and the table-wide steps change no live file. A step that
//! fails (storage that drops a request) is retried as `retry.*` says.

use serde::Serialize;

use super::{Format, OpsError, Outcome};
use crate::config::{Config, DeadLetterDestination};
use crate::dead_letter::DeadLetterTable;
use crate::history::HistoryTable;
use crate::maintenance::run::Target;
use crate::maintenance::{self, CleanReport};
use crate::retry::retry;
use crate::table::{CompactionReport, PositionTable, Thresholds};

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct MaintainOptions {
    /// Only report.
    pub dry_run: bool,
    /// Show a progress spinner on stderr.
    pub progress_bar: bool,
}

/// What `maintain` did (or would do).
#[derive(Debug, Serialize)]
pub struct MaintainReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// The positions table's compaction: groups and files it packs.
    pub compaction: Compaction,
    /// The table-wide steps, per table (positions first).
    pub tables: Vec<CleanReport>,
}

/// The compaction part of the report.
#[derive(Debug, Default, Serialize)]
pub struct Compaction {
    /// Kafka partitions whose files are packed (or would be).
    pub partitions: usize,
    /// Files packed.
    pub files: usize,
    /// Files in their place (after a run).
    pub files_added: usize,
    /// Whether a commit was made.
    pub committed: bool,
    /// Why it was skipped, when it was.
    pub skipped: Option<String>,
}

/// Runs the maintenance steps on the configured tables.
///
/// # Errors
/// When a table cannot be opened or a step fails.
pub async fn maintain(config: &Config, options: &MaintainOptions) -> Result<MaintainReport, OpsError> {
    let spinner = options.progress_bar.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let step = |text: &str| {
        if let Some(bar) = &spinner {
            bar.set_message(text.to_string());
        }
    };
    let failed = |e: maintenance::MaintenanceError| OpsError::Input(e.to_string());
    super::open_table(&config.delta).await?;
    let positions = PositionTable::open_or_create(&config.delta, &config.kafka.group_id)
        .await?
        .with_write_deadline(config.maintenance.write_deadline());
    let thresholds = Thresholds::from(&config.maintenance);

    step("compacting the positions table");
    let mut compaction = Compaction::default();
    let candidates = positions.compaction_candidates(None, thresholds).await?;
    compaction.partitions = candidates.len();
    compaction.files = candidates.iter().map(|(_, files)| files).sum();
    if !options.dry_run && !candidates.is_empty() {
        let owners: Vec<_> = candidates.iter().map(|(owner, _)| owner.clone()).collect();
        let compacted = retry(
            &config.retry,
            "compact the positions table",
            || positions.compact(&owners, thresholds),
            |e| e.is_retryable() && !e.is_conflict(),
        );
        match compacted.await {
            Ok((_, CompactionReport { files_added, committed, .. })) => {
                compaction.files_added = files_added;
                compaction.committed = committed;
            }
            Err(error) if error.is_conflict() => {
                compaction.skipped = Some(format!("a worker committed the same files first ({error}); run it again"));
            }
            Err(error) => return Err(error.into()),
        }
    }

    let mut targets = vec![Target::merged(positions.delta(), positions.uri())];
    let (storage, properties) = (&config.delta.storage_options, &config.delta.table_properties);
    let group = &config.kafka.group_id;
    if config.dead_letter.destination == DeadLetterDestination::Table {
        let uri = config.dead_letter.resolved_table_uri(&config.delta);
        if super::open_table_at(&uri, &config.delta).await.is_ok() {
            let table = DeadLetterTable::open_or_create(&uri, storage, properties, group).await?;
            targets.push(table.maintenance_target());
        }
    }
    if config.history.enabled {
        let uri = config.history.resolved_table_uri(&config.delta);
        if super::open_table_at(&uri, &config.delta).await.is_ok() {
            let table = HistoryTable::open_or_create(&uri, storage, properties, group).await?;
            targets.push(table.maintenance_target(config.history.keep_days));
        }
    }
    step("cleaning the logs and vacuuming the tables");
    let unreferenced = config.maintenance.unreferenced_file_age;
    let reports = maintenance::run::table_wide(&targets, options.dry_run, unreferenced, &config.retry).await;
    let tables = reports.into_iter().collect::<Result<Vec<_>, _>>().map_err(failed)?;
    if let Some(bar) = spinner {
        bar.finish_and_clear();
    }
    Ok(MaintainReport { dry_run: options.dry_run, compaction, tables })
}

/// Prints the report; always [`Outcome::Clean`] (a failure is an error instead).
pub fn print(report: &MaintainReport, format: Format) -> Outcome {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return Outcome::Clean;
    }
    let (would, did) = if report.dry_run { ("would ", "would be ") } else { ("", "") };
    let c = &report.compaction;
    match &c.skipped {
        Some(why) => println!("compaction: skipped: {why}"),
        None if c.partitions == 0 => println!("compaction: nothing to compact"),
        None => {
            let into = if report.dry_run { String::new() } else { format!(" into {}", c.files_added) };
            println!("compaction: {would}pack {} files of {} Kafka partitions{into}", c.files, c.partitions);
        }
    }
    for t in &report.tables {
        let s = &t.settings;
        println!();
        println!("table {}", t.uri);
        println!(
            "  settings: checkpoint every {} commits, log kept {}, removed files kept {}, files no commit names kept {}",
            s.checkpoint_interval,
            humantime::format_duration(s.log_retention),
            humantime::format_duration(s.deleted_file_retention),
            humantime::format_duration(t.unreferenced_file_age.max(s.deleted_file_retention))
        );
        let b = &t.before;
        println!(
            "  before:   {} data files on disk ({} bytes), {} live ({} bytes); log {} files ({} bytes), {} commits since the last checkpoint",
            b.files_on_disk,
            b.bytes_on_disk,
            b.live_files,
            b.live_bytes,
            b.log_files,
            b.log_bytes,
            b.commits_since_checkpoint
        );
        if let Some(version) = t.checkpoint_written {
            println!("  checkpoint written at version {version}");
        }
        let bytes = |files: &[maintenance::Removed]| files.iter().map(|f| f.bytes).sum::<u64>();
        println!("  log cleanup: {did}removed {} files ({} bytes)", t.log_files.len(), bytes(&t.log_files));
        println!("  vacuum:      {did}removed {} data files ({} bytes)", t.data_files.len(), bytes(&t.data_files));
        if report.dry_run {
            for file in t.log_files.iter().chain(&t.data_files).take(20) {
                println!("    {} ({} bytes)", file.path, file.bytes);
            }
            let more = (t.log_files.len() + t.data_files.len()).saturating_sub(20);
            if more > 0 {
                println!("    … and {more} more (--format json lists them all)");
            }
        }
        if let Some(a) = &t.after {
            println!(
                "  after:    {} data files on disk ({} bytes), {} live ({} bytes); log {} files ({} bytes)",
                a.files_on_disk, a.bytes_on_disk, a.live_files, a.live_bytes, a.log_files, a.log_bytes
            );
        }
    }
    Outcome::Clean
}
