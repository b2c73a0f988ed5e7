//! `position-sink replay`: reads a range of the topics again and applies it to a table
//! with last-write-wins, or, with `--dry-run`, only says what that would change. For an
//! intact table a dry run from the earliest offsets finds 0 changes: a consistency
//! check of the table against its stream.
//!
//! Memory: a real replay holds one buffer (`flush.max_records` / `flush.max_bytes`) at a
//! time; a dry run holds the table's rows and the newest replayed update per key, so it
//! grows with the number of keys, not with the number of messages.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde::Serialize;

use super::show::{plain_table, row_json};
use super::{Format, OpsError, Outcome, RowFilter, open_table_at, rows};
use crate::config::{Config, RetryConfig};
use crate::dead_letter::DeadLetter;
use crate::kafka::{self, PartitionView};
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::status::Progress;
use crate::table::PositionTable;
use crate::table::schema::TableRow;
use crate::update::{PositionUpdate, RowKey};
use crate::worker::batch::{Buffer, Limits};
use crate::worker::outputs::Outputs;
use crate::worker::receive::{Received, receive};

/// How long to wait for each answer from Kafka.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading may see no message before it asks where each partition stands.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Every partition from its oldest offset.
    Earliest,
    /// Every partition from the first message published at or after this time (ms).
    Time(i64),
    /// Only these partitions, each from its offset.
    Offsets(Vec<Coordinates>),
}

impl ReplayFrom {
    /// Parses the `--from` values: `earliest`, one RFC 3339 time, or one or more
    /// `topic:partition:offset`.
    ///
    /// # Errors
    /// A message that shows the three forms.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let usage = "--from takes `earliest`, an RFC 3339 time (2026-11-29T09:30:00Z) or topic:partition:offset \
                     (repeat for several partitions)";
        match values {
            [] => Err(usage.to_string()),
            [one] if one == "earliest" => Ok(ReplayFrom::Earliest),
            [one] if chrono::DateTime::parse_from_rfc3339(one).is_ok() => {
                Ok(ReplayFrom::Time(chrono::DateTime::parse_from_rfc3339(one).map_or(0, |t| t.timestamp_millis())))
            }
            many => many
                .iter()
                .map(|v| v.parse::<Coordinates>().map_err(|e| format!("{e}; {usage}")))
                .collect::<Result<_, _>>()
                .map(ReplayFrom::Offsets),
        }
    }
}

/// What to replay, and where.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Where reading starts.
    pub from: ReplayFrom,
    /// The table to apply the range to (default: `delta.table_uri`).
    pub into: Option<String>,
    /// Only report what would change.
    pub dry_run: bool,
    /// Replay into the configured table even while the group has members.
    pub force: bool,
    /// Differing rows listed in the report.
    pub differences_shown: usize,
    /// Draw a progress bar on stderr.
    pub progress_bar: bool,
}

/// What a replay read and changed.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    /// The table.
    pub table: String,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Per partition.
    pub partitions: Vec<PartitionReplay>,
    /// Keys inserted (or, in a dry run, that would be).
    pub inserted: usize,
    /// Keys updated (or that would be).
    pub updated: usize,
    /// Keys whose row the table already holds or holds newer.
    pub unchanged: usize,
    /// Keys whose row claims the winning message's offset but holds other values
    /// (edited outside the stream; a replay does not change them, last write wins on
    /// ties keeps the stored row). Dry run only.
    pub altered: usize,
    /// Messages the validation rules reject (not written; the dead-letter destination
    /// has them from the live run).
    pub rejected: usize,
    /// The first differing rows (dry run).
    pub differences: Vec<Difference>,
    /// Delta commits made.
    pub commits: usize,
    /// Commits that conflicted with another writer's (a running worker's) and were
    /// made again on a fresh read of the table.
    pub conflicts_retried: u64,
}

/// One partition's range and outcome.
#[derive(Debug, Default, Serialize)]
pub struct PartitionReplay {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// First offset read.
    pub from: i64,
    /// One past the last offset read (the log end when the replay started).
    pub to: i64,
    /// Messages read.
    pub messages: usize,
    /// Messages rejected.
    pub rejected: usize,
    /// Keys whose winning update comes from this partition, inserted.
    pub inserted: usize,
    /// … updated.
    pub updated: usize,
}

/// A row the replay would change.
#[derive(Debug, Serialize)]
pub struct Difference {
    /// The row key's contract id.
    pub conid: i64,
    /// The table's row (none: the key is missing).
    pub table: Option<serde_json::Value>,
    /// The replayed update that wins.
    pub replayed: serde_json::Value,
}

impl ReplayReport {
    /// Rows the replay changes (or would), and rows that differ from their message.
    pub fn changes(&self) -> usize {
        self.inserted + self.updated + self.altered
    }
}

/// Runs the replay.
///
/// # Errors
/// [`OpsError::Input`] for a range Kafka no longer has or a live group without
/// `--force`; the other variants when Kafka or the table fail.
pub async fn replay(config: &Config, options: &ReplayOptions) -> Result<ReplayReport, OpsError> {
    let target = options.into.clone().unwrap_or_else(|| config.delta.table_uri.clone());
    let ranges = ranges(config, &options.from).await?;
    if !options.dry_run && target == config.delta.table_uri && !options.force {
        refuse_live_group(config).await?;
    }
    let mut report = ReplayReport { table: target.clone(), dry_run: options.dry_run, ..ReplayReport::default() };
    for (tp, (from, to)) in &ranges {
        report.partitions.push(PartitionReplay {
            topic: tp.topic.clone(),
            partition: tp.partition.0,
            from: from.0,
            to: to.0,
            ..PartitionReplay::default()
        });
    }
    let mut sink = if options.dry_run {
        let table = open_table_at(&target, &config.delta).await?;
        let stored = rows(&table, &RowFilter::default()).await?;
        let keys = &config.delta.key_columns;
        Sink::DryRun {
            stored: stored.into_iter().map(|row| (row.update.key(keys), row)).collect(),
            winners: HashMap::new(),
        }
    } else {
        // Into the group's table, every output written before it is written too, in a
        // flush's order (history, dead-letter table): the replay moves the table's
        // recorded offsets, which then vouch for them. Into another table, that table only.
        let outputs = if target == config.delta.table_uri {
            Outputs::open(config).await?
        } else {
            let mut delta = config.delta.clone();
            delta.table_uri = target.clone();
            let table = PositionTable::open_or_create(&delta, &config.kafka.group_id)
                .await?
                .with_write_deadline(config.maintenance.write_deadline());
            Outputs::new(table, Vec::new())
        };
        let limits = Limits::of(&config.flush);
        Sink::Write {
            buffer: Buffer::new(config.delta.key_columns.clone(), limits, outputs.want_every_update()),
            outputs,
            retry: config.retry.clone(),
            progress: Progress::default(),
        }
    };
    read(config, &ranges, options.progress_bar, &mut report, &mut sink).await?;
    sink.finish(options, &mut report).await?;
    Ok(report)
}

/// Where replayed updates go.
#[allow(clippy::large_enum_variant, reason = "one per replay, never moved in a loop")]
enum Sink {
    /// Compared with the table's rows.
    DryRun {
        /// The table's rows by key.
        stored: HashMap<RowKey, TableRow>,
        /// The newest replayed update per key.
        winners: HashMap<RowKey, PositionUpdate>,
    },
    /// Buffered and merged into the table.
    Write {
        /// The target, and the group's other outputs when the target is the group's table.
        outputs: Outputs,
        /// The updates not yet written.
        buffer: Buffer,
        /// How failed and conflicting commits are retried (`retry`), as the worker's are.
        retry: RetryConfig,
        /// The write, failure and conflict counters of those retries.
        progress: Progress,
    },
}

impl Sink {
    async fn take(
        &mut self,
        config: &Config,
        update: PositionUpdate,
        size: usize,
        kafka_time: Option<i64>,
        report: &mut ReplayReport,
    ) -> Result<(), OpsError> {
        match self {
            Sink::DryRun { winners, .. } => {
                let key = update.key(&config.delta.key_columns);
                match winners.get_mut(&key) {
                    Some(held) if !update.supersedes(held) => {}
                    Some(held) => *held = update,
                    None => {
                        winners.insert(key, update);
                    }
                }
            }
            Sink::Write { buffer, .. } => {
                buffer.push(update, size, kafka_time);
                self.write_if_full(report).await?;
            }
        }
        Ok(())
    }

    /// Keeps a rejected message's dead letter for the dead-letter output, if the
    /// target has one (its offset is covered either way).
    async fn reject(&mut self, dead_letter: DeadLetter, report: &mut ReplayReport) -> Result<(), OpsError> {
        if let Sink::Write { buffer, .. } = self {
            buffer.reject(dead_letter);
            self.write_if_full(report).await?;
        }
        Ok(())
    }

    async fn write_if_full(&mut self, report: &mut ReplayReport) -> Result<(), OpsError> {
        if let Sink::Write { buffer, .. } = self
            && buffer.is_full()
        {
            self.write(report).await?;
        }
        Ok(())
    }

    async fn write(&mut self, report: &mut ReplayReport) -> Result<(), OpsError> {
        let Sink::Write { outputs, buffer, retry, progress } = self else { return Ok(()) };
        if buffer.is_empty() {
            return Ok(());
        }
        let batch = buffer.take();
        let written = outputs.write_replayed(&batch, retry, progress).await?;
        report.conflicts_retried = Progress::get(&progress.commit_conflicts);
        report.inserted += written.inserted;
        report.updated += written.updated;
        report.unchanged += written.unchanged;
        report.commits += usize::from(written.committed);
        Ok(())
    }

    async fn finish(&mut self, options: &ReplayOptions, report: &mut ReplayReport) -> Result<(), OpsError> {
        self.write(report).await?;
        let Sink::DryRun { stored, winners } = self else { return Ok(()) };
        let mut per_partition: BTreeMap<TopicPartition, (usize, usize)> = BTreeMap::new();
        let mut differences: Vec<(&PositionUpdate, Option<&TableRow>)> = Vec::new();
        for (key, winner) in winners.iter() {
            let held = stored.get(key);
            let counts = per_partition.entry(winner.source.tp.clone()).or_default();
            match held {
                None => {
                    report.inserted += 1;
                    counts.0 += 1;
                }
                Some(row) if winner.supersedes(&row.update) => {
                    report.updated += 1;
                    counts.1 += 1;
                }
                Some(row) if row.update.precedence(winner).is_eq() && row.update != *winner => {
                    report.altered += 1;
                }
                Some(_) => {
                    report.unchanged += 1;
                    continue;
                }
            }
            differences.push((winner, held));
        }
        differences.sort_by_key(|(u, _)| (u.conid, u.source.clone()));
        report.differences = differences
            .into_iter()
            .take(options.differences_shown)
            .map(|(winner, held)| Difference {
                conid: winner.conid,
                table: held.map(row_json),
                replayed: row_json(&TableRow { update: winner.clone(), ingested_at_micros: 0 }),
            })
            .collect();
        for p in &mut report.partitions {
            if let Some((inserted, updated)) = per_partition.get(&TopicPartition::new(p.topic.clone(), p.partition)) {
                (p.inserted, p.updated) = (*inserted, *updated);
            }
        }
        Ok(())
    }
}

/// The offsets to read per partition: from where `from` says to the log end now.
async fn ranges(config: &Config, from: &ReplayFrom) -> Result<BTreeMap<TopicPartition, (Offset, Offset)>, OpsError> {
    let kafka_config = config.kafka.clone();
    let kafka_err = |e: kafka::ClientError| {
        OpsError::Kafka(format!(
            "cannot read the offsets of {:?} from {}: {e}",
            config.kafka.topics, config.kafka.brokers
        ))
    };
    let views: Vec<PartitionView> =
        tokio::task::spawn_blocking(move || kafka::partition_views(&kafka_config, KAFKA_TIMEOUT))
            .await
            .map_err(|e| OpsError::Kafka(e.to_string()))?
            .map_err(kafka_err)?;
    let by_tp: BTreeMap<TopicPartition, &PartitionView> = views.iter().map(|v| (v.tp.clone(), v)).collect();
    let starts: Vec<(TopicPartition, Offset)> = match from {
        ReplayFrom::Earliest => views.iter().map(|v| (v.tp.clone(), v.log_start)).collect(),
        ReplayFrom::Time(ms) => {
            let (kafka_config, views, ms) = (config.kafka.clone(), views.clone(), *ms);
            tokio::task::spawn_blocking(move || kafka::offsets_for_time(&kafka_config, &views, ms, KAFKA_TIMEOUT))
                .await
                .map_err(|e| OpsError::Kafka(e.to_string()))?
                .map_err(kafka_err)?
        }
        ReplayFrom::Offsets(list) => list.iter().map(|c| (c.tp.clone(), c.offset)).collect(),
    };
    let mut ranges = BTreeMap::new();
    for (tp, start) in starts {
        let Some(view) = by_tp.get(&tp) else {
            return Err(OpsError::Input(format!(
                "{tp} is not a partition of the configured topics {:?} (kafka.topics, --topic)",
                config.kafka.topics
            )));
        };
        if start < view.log_start {
            return Err(OpsError::Input(format!(
                "{tp} starts at offset {}: retention deleted {}..{}. Replay from offset {} or later",
                view.log_start.0, start.0, view.log_start.0, view.log_start.0
            )));
        }
        ranges.insert(tp, (start, view.log_end.max(start)));
    }
    Ok(ranges)
}

/// Refuses a replay into the table of a group that has members.
async fn refuse_live_group(config: &Config) -> Result<(), OpsError> {
    let kafka_config = config.kafka.clone();
    let (state, members) = tokio::task::spawn_blocking(move || kafka::group_members(&kafka_config, KAFKA_TIMEOUT))
        .await
        .map_err(|e| OpsError::Kafka(e.to_string()))?
        .map_err(|e| {
            OpsError::Kafka(format!("cannot ask {} about group {}: {e}", config.kafka.brokers, config.kafka.group_id))
        })?;
    if members.is_empty() {
        return Ok(());
    }
    Err(OpsError::Input(format!(
        "group {} has {} active members ({state}: {}) writing {}. A replay would commit to the same partitions' \
         records beside them: each of its commits conflicts with theirs and is retried, which slows both down \
         (the table ends the same either way, last write wins). Stop the workers first, replay --into another \
         table, or pass --force",
        config.kafka.group_id,
        members.len(),
        members.join(", "),
        config.delta.table_uri
    )))
}

/// Reads every range to its end, handing each message to `sink`.
async fn read(
    config: &Config,
    ranges: &BTreeMap<TopicPartition, (Offset, Offset)>,
    progress_bar: bool,
    report: &mut ReplayReport,
    sink: &mut Sink,
) -> Result<(), OpsError> {
    let kafka_err = |e: rdkafka::error::KafkaError| OpsError::Kafka(format!("reading {}: {e}", config.kafka.brokers));
    let mut pending: BTreeMap<TopicPartition, Offset> =
        ranges.iter().filter(|(_, (from, to))| from < to).map(|(tp, (_, to))| (tp.clone(), *to)).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let consumer: StreamConsumer<kafka::Watched> =
        kafka::bystander_config(&config.kafka, &[("fetch.queue.backoff.ms", "10")])
            .create_with_context(kafka::Watched::default())
            .map_err(kafka_err)?;
    let mut list = rdkafka::TopicPartitionList::new();
    for (tp, (from, _)) in ranges.iter().filter(|(tp, _)| pending.contains_key(*tp)) {
        list.add_partition_offset(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(from.0)).map_err(kafka_err)?;
    }
    consumer.assign(&list).map_err(kafka_err)?;

    let total: i64 = ranges.values().map(|(from, to)| to.0 - from.0).sum();
    let bar = if progress_bar { ProgressBar::new(total.max(0) as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} messages  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let decode_options = config.decode_options();
    let index: HashMap<TopicPartition, usize> = report
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| (TopicPartition::new(p.topic.clone(), p.partition), i))
        .collect();
    while !pending.is_empty() {
        let message = match tokio::time::timeout(IDLE_CHECK, consumer.recv()).await {
            Ok(message) => message,
            Err(_) => {
                // Nothing for a while: a partition whose range ends in control records
                // (transaction markers) is done once its position is at the end.
                let positions = consumer.position().map_err(kafka_err)?;
                pending.retain(|tp, end| {
                    positions.find_partition(&tp.topic, tp.partition.0).is_none_or(|e| match e.offset() {
                        rdkafka::Offset::Offset(at) => at < end.0,
                        _ => true,
                    })
                });
                continue;
            }
        };
        let (at, size) = match receive(message, &decode_options) {
            Received::Update(update, size, kafka_time) => (update.source.clone(), Ok((update, size, kafka_time))),
            Received::Invalid(dead_letter) => (dead_letter.source.clone(), Err(dead_letter)),
            Received::EndOfPartition => continue,
            Received::Error(error) => return Err(kafka_err(error)),
        };
        let Some(end) = pending.get(&at.tp).copied() else { continue };
        if at.offset >= end {
            pending.remove(&at.tp);
            continue;
        }
        if at.offset.next() >= end {
            pending.remove(&at.tp);
        }
        bar.inc(1);
        let counts = index.get(&at.tp).map(|i| &mut report.partitions[*i]);
        match size {
            Ok((update, size, kafka_time)) => {
                if let Some(counts) = counts {
                    counts.messages += 1;
                }
                sink.take(config, update, size, kafka_time, report).await?;
            }
            Err(dead_letter) => {
                if let Some(counts) = counts {
                    counts.messages += 1;
                    counts.rejected += 1;
                }
                report.rejected += 1;
                sink.reject(dead_letter, report).await?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Prints `report` in `format`.
pub fn print(report: &ReplayReport, format: Format) -> Outcome {
    let outcome = if report.dry_run && report.changes() > 0 { Outcome::Differences } else { Outcome::Clean };
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return outcome;
    }
    let verb = if report.dry_run { "would" } else { "did" };
    let mut partitions =
        plain_table(["topic", "partition", "from", "to", "messages", "rejected", "inserts", "updates"]);
    for p in &report.partitions {
        partitions.add_row([
            p.topic.clone(),
            p.partition.to_string(),
            p.from.to_string(),
            p.to.to_string(),
            p.messages.to_string(),
            p.rejected.to_string(),
            p.inserted.to_string(),
            p.updated.to_string(),
        ]);
    }
    println!("{partitions}");
    for d in &report.differences {
        let brief = |row: &serde_json::Value| {
            format!(
                "{} {} at {} (offset {}:{})",
                row["symbol"].as_str().unwrap_or_default(),
                row["position"],
                row["timestamp"].as_str().unwrap_or_default(),
                row["kafka_partition"],
                row["kafka_offset"]
            )
        };
        match &d.table {
            None => println!("conid {}: missing from the table; replayed: {}", d.conid, brief(&d.replayed)),
            Some(held) if held["kafka_offset"] == d.replayed["kafka_offset"] => println!(
                "conid {}: the table's row differs from its own message: table has {}; the message says {}",
                d.conid,
                brief(held),
                brief(&d.replayed)
            ),
            Some(held) => println!("conid {}: table has {}; replayed: {}", d.conid, brief(held), brief(&d.replayed)),
        }
    }
    let changes = report.changes();
    if report.dry_run && changes == 0 {
        println!(
            "0 changes: {} holds every update of the range ({} keys unchanged, {} messages rejected)",
            report.table, report.unchanged, report.rejected
        );
    } else {
        println!(
            "{changes} changes: {verb} insert {} and update {} rows of {}; {} unchanged; {} messages rejected; {} commits \
             ({} made again after a concurrent writer's)",
            report.inserted,
            report.updated,
            report.table,
            report.unchanged,
            report.rejected,
            report.commits,
            report.conflicts_retried
        );
    }
    if report.altered > 0 {
        println!(
            "{} rows differ from the message at their own offset (edited outside the stream): a replay keeps them; \
             delete those rows, then replay to restore them",
            report.altered
        );
    }
    outcome
}
