//! The `position-sink` binary: parses the command line, starts logging, loads the
//! configuration and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use position_sink::config::{Config, LogFormat};
use position_sink::history::AsOf;
use position_sink::ops::{self, Format, Outcome, RowFormat};
use position_sink::sample::SampleSpec;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// jemalloc returns freed memory to the system sooner than glibc's per-thread arenas,
/// which keeps the worker's resident memory near what it holds (docs/write-path.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Kafka position updates → a last-write-wins Delta Lake table, exactly-once in effect.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as `text` for people or `json` for log collectors (log.format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The log format: the flag, else the configuration's `log.format` (when it loads).
    fn log_format(&self) -> LogFormat {
        let common = match &self.command {
            Command::Run { common, .. }
            | Command::Generate { common, .. }
            | Command::Show { common, .. }
            | Command::Inspect { common, .. }
            | Command::Replay { common, .. }
            | Command::Reconcile { common, .. }
            | Command::Rebuild { common, .. }
            | Command::Maintain { common, .. } => common,
            Command::DeadLetters { action: DeadLetterAction::List { common, .. } }
            | Command::DeadLetters { action: DeadLetterAction::Republish { common, .. } } => common,
        };
        self.log_format.unwrap_or_else(|| common.load(Figment::new()).map(|c| c.log.format).unwrap_or_default())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Consume updates and keep the table current, until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        common: Common,
        /// Exit once every assigned partition is written to its end.
        #[arg(long)]
        exit_when_caught_up: bool,
        /// Flush interval, e.g. "3s" (flush.interval).
        #[arg(long)]
        flush_interval: Option<String>,
    },
    /// Publish a deterministic stream of sample updates (for demos and load tests).
    Generate {
        #[command(flatten)]
        common: Common,
        /// Messages to publish.
        #[arg(long, default_value_t = 5000)]
        count: usize,
        /// Distinct instruments (conids).
        #[arg(long, default_value_t = 200)]
        instruments: usize,
        /// Distinct symbols the instruments share (0: one per instrument).
        #[arg(long, default_value_t = 0)]
        symbols: usize,
        /// Messages per second to offer (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0)]
        rate: usize,
        /// Seed of the stream.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Event time of the first message, RFC 3339 (later runs with a later start
        /// update the rows of earlier ones).
        #[arg(long, default_value = "2025-11-25T08:00:00Z")]
        start: chrono::DateTime<chrono::FixedOffset>,
        /// Percentage of invalid messages, of every kind in turn.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100))]
        bad_percent: u64,
    },
    /// Print the table's rows (filtered), and without filters a summary first.
    Show {
        #[command(flatten)]
        common: Common,
        /// Only this symbol.
        #[arg(long)]
        symbol: Option<String>,
        /// Only this contract id.
        #[arg(long)]
        conid: Option<i64>,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// At most this many rows, in symbol, conid order.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// The book as of this event time (RFC 3339), from the history table: per key,
        /// the latest update with timestamp <= TIME.
        #[arg(long, conflicts_with = "as_known_at")]
        as_of: Option<chrono::DateTime<chrono::FixedOffset>>,
        /// The book as the positions table showed it at this wall-clock time (RFC
        /// 3339), from the history table: updates ingested by then, last write wins.
        #[arg(long)]
        as_known_at: Option<chrono::DateTime<chrono::FixedOffset>>,
        /// `table` for people, `json` for scripts, `csv` for spreadsheets.
        #[arg(long, value_enum, default_value_t)]
        format: RowFormat,
    },
    /// Where the table, the consumer group and the log stand, per partition.
    Inspect {
        #[command(flatten)]
        common: Common,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Read a range of the topics again and apply it to a table (last write wins), or
    /// with --dry-run say what that would change: exit code 1 when it would change rows.
    Replay {
        #[command(flatten)]
        common: Common,
        /// `earliest`, an RFC 3339 time, or topic:partition:offset (repeat for several).
        #[arg(long, required = true, num_args = 1..)]
        from: Vec<String>,
        /// The table to write (default: delta.table_uri).
        #[arg(long)]
        into: Option<String>,
        /// Only report what would change.
        #[arg(long)]
        dry_run: bool,
        /// Replay into the group's table even while its workers run.
        #[arg(long)]
        force: bool,
        /// Differing rows listed by a dry run.
        #[arg(long, default_value_t = 10)]
        differences: usize,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Compare the table with a broker's positions snapshot (JSON Lines or CSV): exit
    /// code 0 when consistent, 1 when it found differences.
    Reconcile {
        #[command(flatten)]
        common: Common,
        /// The snapshot: `.csv`, or JSON Lines; fields conid, position, and optionally
        /// account, avg_cost, market_value, as_of.
        #[arg(long)]
        snapshot: PathBuf,
        /// The snapshot's time, RFC 3339 (default: its `as_of` field, else now). With
        /// history.enabled, the snapshot is compared with the book as of this time from
        /// the history table, not with the positions table now.
        #[arg(long)]
        as_of: Option<String>,
        /// Largest position difference that still matches.
        #[arg(long, default_value_t = 1e-6)]
        tolerance: f64,
        /// A row older than the as-of time by more than this is stale (e.g. "1d", "8h").
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        stale_after: std::time::Duration,
        /// Differences listed in the table format.
        #[arg(long, default_value_t = 50)]
        details: usize,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Recreate the positions table from the history table (history.enabled), when
    /// Kafka no longer holds the messages; a worker then resumes where the history ends.
    Rebuild {
        #[command(flatten)]
        common: Common,
        /// Read the history table (the one source a rebuild has).
        #[arg(long, required = true)]
        from_history: bool,
        /// Only the book as of this event time (RFC 3339); it records no offsets, so it
        /// needs --into.
        #[arg(long)]
        as_of: Option<chrono::DateTime<chrono::FixedOffset>>,
        /// The table to write (default: delta.table_uri, which must hold no rows).
        #[arg(long)]
        into: Option<String>,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Compact, clean up the log and vacuum the tables now (what the workers do every
    /// maintenance.interval), or with --dry-run list what that would remove.
    Maintain {
        #[command(flatten)]
        common: Common,
        /// Only list what would be removed, and how many bytes.
        #[arg(long)]
        dry_run: bool,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Review rejected messages, and re-publish them once their cause is fixed.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List the most recent dead letters with their reasons, newest first.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this reason category (e.g. invalid_json, missing_field).
        #[arg(long)]
        category: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Characters of key and value to print.
        #[arg(long, default_value_t = 200)]
        width: usize,
    },
    /// Re-publish selected dead letters, byte for byte, to their source topics.
    Republish {
        #[command(flatten)]
        common: Common,
        /// A dead letter by source coordinates, `topic:partition:offset`; repeat for several.
        #[arg(long = "at")]
        at: Vec<position_sink::offsets::Coordinates>,
        /// Every dead letter of this reason category.
        #[arg(long)]
        category: Option<String>,
        /// Also re-publish messages the current rules still reject.
        #[arg(long)]
        force: bool,
        /// Show what would be re-published, publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Options every command takes; each overrides its configuration key.
#[derive(Args)]
struct Common {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Bootstrap brokers (kafka.brokers).
    #[arg(long)]
    brokers: Option<String>,
    /// Consumer group (kafka.group_id).
    #[arg(long)]
    group_id: Option<String>,
    /// Topic; repeat for several (kafka.topics).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Table location (delta.table_uri).
    #[arg(long)]
    table_uri: Option<String>,
}

impl Common {
    fn load(&self, extra: Figment) -> anyhow::Result<Config> {
        let mut flags = Figment::new();
        if let Some(v) = &self.brokers {
            flags = flags.merge(Serialized::default("kafka.brokers", v));
        }
        if let Some(v) = &self.group_id {
            flags = flags.merge(Serialized::default("kafka.group_id", v));
        }
        if !self.topics.is_empty() {
            flags = flags.merge(Serialized::default("kafka.topics", &self.topics));
        }
        if let Some(v) = &self.table_uri {
            flags = flags.merge(Serialized::default("delta.table_uri", v));
        }
        Ok(Config::load(self.config.as_deref(), flags.merge(extra))?)
    }
}

/// Logging when `RUST_LOG` is unset: this program at info, libraries at warn. Three
/// library messages that are not faults are hidden: delta-rs warns on every commit that
/// another worker committed first (and then lets it through its conflict check; a real
/// conflict is an error the worker logs and retries), its statistics writer warns on every dead-letter
/// write that it keeps no statistics of the binary `key` column, and delta-kernel logs
/// an error when it opens a table location that has no log yet (a new table, which the
/// worker then creates).
const DEFAULT_LOG_FILTER: &str = "warn,position_sink=info,deltalake_core::kernel::transaction=error,\
     deltalake_core::writer::stats=error,buoyant_kernel::snapshot::builder=off";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
    };
    match cli.log_format() {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let log_format = cli.log_format();
    let result = runtime.block_on(dispatch(cli, log_format));
    // A blocking Kafka call abandoned at a shutdown deadline must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    // The same exit codes for every command (README, "Exit codes").
    match result {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Differences) => ExitCode::from(1),
        Err(e) => {
            error!("{}", position_sink::config::mask_secrets(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli, log_format: LogFormat) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Run { common, exit_when_caught_up, flush_interval } => {
            let mut extra = Figment::new();
            if exit_when_caught_up {
                extra = extra.merge(Serialized::default("worker.exit_when_caught_up", true));
            }
            if let Some(v) = flush_interval {
                extra = extra.merge(Serialized::default("flush.interval", v));
            }
            let mut config = common.load(extra)?;
            config.log.format = log_format;
            config.log_effective();
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            run_worker(config, shutdown).await?;
            Ok(Outcome::Clean)
        }
        Command::Generate { common, count, instruments, symbols, rate, seed, start, bad_percent } => {
            let config = common.load(Figment::new())?;
            let topic = config.kafka.topics.first().context("kafka.topics is empty")?;
            let start_micros = start.timestamp_micros();
            let spec = SampleSpec { count, instruments, symbols, seed, start_micros, bad_percent };
            let sent = position_sink::sample::publish(&config.kafka, topic, spec, rate)
                .await
                .with_context(|| format!("publishing to topic {topic} at {}", config.kafka.brokers))?;
            info!(sent, topic, "published sample updates");
            Ok(Outcome::Clean)
        }
        Command::Show { common, symbol, conid, account, limit, as_of, as_known_at, format } => {
            let config = common.load(Figment::new())?;
            let filter = ops::RowFilter { symbol, conid, account, limit: Some(limit) };
            let when = match (as_of, as_known_at) {
                (Some(t), _) => Some(AsOf::Event(t.timestamp_micros())),
                (None, Some(t)) => Some(AsOf::Known(t.timestamp_micros())),
                (None, None) => None,
            };
            let progress_bar = format == RowFormat::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
            ops::show::show(&config, &filter, format, when, progress_bar).await?;
            Ok(Outcome::Clean)
        }
        Command::Inspect { common, format } => {
            let config = common.load(Figment::new())?;
            ops::inspect::print(&ops::inspect::inspect(&config).await?, format);
            Ok(Outcome::Clean)
        }
        Command::Replay { common, from, into, dry_run, force, differences, format } => {
            let config = common.load(Figment::new())?;
            let from = ops::replay::ReplayFrom::parse(&from).map_err(anyhow::Error::msg)?;
            let progress_bar = format == Format::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let options =
                ops::replay::ReplayOptions { from, into, dry_run, force, differences_shown: differences, progress_bar };
            let report = ops::replay::replay(&config, &options).await?;
            Ok(ops::replay::print(&report, format))
        }
        Command::Reconcile { common, snapshot, as_of, tolerance, stale_after, details, format } => {
            let config = common.load(Figment::new())?;
            let tolerances = ops::reconcile::Tolerances { position: tolerance, stale_after };
            let report = ops::reconcile::reconcile(&config, &snapshot, as_of.as_deref(), tolerances).await?;
            Ok(ops::reconcile::print(&report, format, details))
        }
        Command::Rebuild { common, from_history: _, as_of, into, format } => {
            let config = common.load(Figment::new())?;
            let progress_bar = format == Format::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let options =
                ops::rebuild::RebuildOptions { as_of: as_of.map(|t| t.timestamp_micros()), into, progress_bar };
            Ok(ops::rebuild::print(&ops::rebuild::rebuild(&config, &options).await?, format))
        }
        Command::Maintain { common, dry_run, format } => {
            let config = common.load(Figment::new())?;
            let progress_bar = format == Format::Table && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let options = ops::maintain::MaintainOptions { dry_run, progress_bar };
            let report = ops::maintain::maintain(&config, &options).await?;
            Ok(ops::maintain::print(&report, format))
        }
        Command::DeadLetters { action } => dead_letters(action).await.map(|()| Outcome::Clean),
    }
}

async fn dead_letters(action: DeadLetterAction) -> anyhow::Result<()> {
    match action {
        DeadLetterAction::List { common, category, limit, width } => {
            let config = common.load(Figment::new())?;
            ops::dead_letters::list(&config, category.as_deref(), limit, width).await?;
        }
        DeadLetterAction::Republish { common, at, category, force, dry_run } => {
            anyhow::ensure!(
                !at.is_empty() || category.is_some(),
                "select dead letters with --at topic:partition:offset or --category NAME"
            );
            let config = common.load(Figment::new())?;
            let selection = position_sink::dead_letter::review::Selection { at, category };
            ops::dead_letters::republish(&config, &selection, force, dry_run).await?;
        }
    }
    Ok(())
}

/// Runs the worker; the worker logs its totals when it stops.
#[cfg(not(feature = "fault-injection"))]
async fn run_worker(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    position_sink::run(config, shutdown).await?;
    Ok(())
}

/// Runs the worker with the crash points of the environment (crash tests of the binary).
#[cfg(feature = "fault-injection")]
async fn run_worker(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let crash = position_sink::faults::CrashPoints::from_env().map_err(anyhow::Error::msg)?;
    position_sink::run_with_crash_points(config, shutdown, Default::default(), crash).await?;
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("shutdown requested; flushing");
    shutdown.cancel();
}
