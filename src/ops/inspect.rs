//! `position-sink inspect`: where the table, the group and the log stand, side by side,
//! with a sentence wherever they disagree.

use serde::Serialize;

use super::show::plain_table;
use super::{Format, OpsError, open_table, rfc3339};
use crate::config::{Config, OffsetReset};
use crate::delta;
use crate::kafka::{self, PartitionView};
use crate::offsets::{Offset, TopicPartition};

/// How long to wait for each answer from Kafka.
const KAFKA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Commits listed, newest first.
const COMMITS_LISTED: u64 = 10;

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The table.
    pub table: TableFacts,
    /// The last commits, newest first.
    pub commits: Vec<CommitFacts>,
    /// The consumer group.
    pub group: GroupFacts,
    /// Each partition of the configured topics.
    pub partitions: Vec<PartitionFacts>,
    /// The history table, when `history.enabled`.
    pub history: Option<HistoryFacts>,
}

/// The history table.
#[derive(Debug, Serialize)]
pub struct HistoryFacts {
    /// Location.
    pub uri: String,
    /// Latest version (none: not created yet).
    pub version: Option<i64>,
    /// Updates held.
    pub rows: u64,
    /// Live data files.
    pub live_files: usize,
    /// Their bytes.
    pub live_bytes: u64,
    /// Event days held.
    pub days: usize,
    /// The oldest and the newest event day, `YYYY-MM-DD`.
    pub first_day: Option<String>,
    /// The newest event day.
    pub last_day: Option<String>,
}

/// The table's size and layout.
#[derive(Debug, Serialize)]
pub struct TableFacts {
    /// Location.
    pub uri: String,
    /// Latest version.
    pub version: i64,
    /// Rows in the live files (rows hidden by deletion vectors not counted).
    pub rows: u64,
    /// Rows of live files hidden by deletion vectors.
    pub hidden_rows: u64,
    /// Live data files with a deletion vector.
    pub files_with_deletion_vectors: usize,
    /// How flushes replace rows: `copy_on_write` or `deletion_vectors`.
    pub write_mode: crate::config::WriteMode,
    /// Live data files.
    pub live_files: usize,
    /// Bytes of the live data files.
    pub live_bytes: u64,
    /// Bytes of every object under the table's location (removed files and the log too).
    pub bytes_on_disk: u64,
    /// Data files on storage, referenced or not, and their bytes; the log; the newest
    /// checkpoint and the commits a fresh reader reads after it.
    pub storage: crate::maintenance::Footprint,
    /// The table's retention settings.
    pub retention: crate::maintenance::RetentionSettings,
    /// The last log cleanup and vacuum (by a worker or `maintain`), as it recorded itself.
    pub last_clean: Option<crate::maintenance::LastRun>,
    /// The last compaction among the last commits, RFC 3339.
    pub last_compaction: Option<String>,
    /// Partition columns.
    pub partition_columns: Vec<String>,
    /// Distinct partition values (symbols in the `symbol` layout).
    pub partitions: usize,
}

/// One commit.
#[derive(Debug, Serialize)]
pub struct CommitFacts {
    /// Table version.
    pub version: i64,
    /// Commit time, RFC 3339.
    pub time: String,
    /// The operation (`MERGE`, `RESTORE`, `WRITE`, …).
    pub operation: String,
    /// Data files added.
    pub files_added: usize,
    /// Data files removed.
    pub files_removed: usize,
    /// Rows in the files added.
    pub rows_written: u64,
}

/// The consumer group.
#[derive(Debug, Serialize)]
pub struct GroupFacts {
    /// Group id.
    pub id: String,
    /// The coordinator's state (`Stable`, `Empty`, `Dead`, …).
    pub state: String,
    /// Client ids of its members.
    pub members: Vec<String>,
}

/// One topic-partition.
#[derive(Debug, Serialize)]
pub struct PartitionFacts {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The last offset the table records for the group (none: no record).
    pub table_offset: Option<i64>,
    /// The last offset the history records (none: no record, or no history).
    pub history_offset: Option<i64>,
    /// The group's committed offset (the next to read).
    pub group_committed: Option<i64>,
    /// The oldest offset in the log.
    pub log_start: i64,
    /// The next offset to be written.
    pub log_end: i64,
    /// Messages the group has not committed (log end minus committed).
    pub lag: i64,
    /// Where the next worker starts reading.
    pub next_read: i64,
    /// What disagrees, in a sentence.
    pub note: Option<String>,
}

/// Gathers the report.
///
/// # Errors
/// See [`OpsError`].
pub async fn inspect(config: &Config) -> Result<Inspection, OpsError> {
    let table = open_table(&config.delta).await?;
    let kafka_config = config.kafka.clone();
    let views = tokio::task::spawn_blocking(move || {
        let views = kafka::partition_views(&kafka_config, KAFKA_TIMEOUT)?;
        let group = kafka::group_members(&kafka_config, KAFKA_TIMEOUT)?;
        Ok::<_, kafka::ClientError>((views, group))
    });
    let (views, (state, members)) = views
        .await
        .map_err(|e| OpsError::Kafka(e.to_string()))?
        .map_err(|e| OpsError::Kafka(format!("cannot read the topics' offsets from {}: {e}", config.kafka.brokers)))?;

    let uri = &config.delta.table_uri;
    let tps: Vec<TopicPartition> = views.iter().map(|v| v.tp.clone()).collect();
    let recorded = delta::recorded_offsets(&table, uri, &config.kafka.group_id, &tps).await?;
    let undone = delta::records_undone_by_restore(&table, uri, &config.kafka.group_id, &tps).await?;
    let from_start = config.kafka.auto_offset_reset == OffsetReset::Earliest;
    let history_uri = config.history.resolved_table_uri(&config.delta);
    let history_table = match config.history.enabled {
        true => super::open_table_at(&history_uri, &config.delta).await.ok(),
        false => None,
    };
    let held = match &history_table {
        Some(h) => delta::recorded_offsets(h, &history_uri, &config.kafka.group_id, &tps).await?,
        None => Default::default(),
    };
    let partitions = views
        .iter()
        .map(|view| {
            let mut facts = partition_facts(view, recorded.get(&view.tp).copied(), undone.get(&view.tp), from_start);
            facts.history_offset = held.get(&view.tp).map(|o| o.0);
            if let (Some(history), Some(table)) = (facts.history_offset, facts.table_offset)
                && history < table
            {
                facts.note = Some(format!(
                    "the history is {} messages behind the table (a crash between their commits): the next worker \
                     appends them, stamped as the table's commit",
                    table - history
                ));
            }
            facts
        })
        .collect();
    let history = match config.history.enabled {
        true => Some(history_facts(history_table.as_ref(), &history_uri)?),
        false => None,
    };

    Ok(Inspection {
        table: table_facts(&table, uri).await?,
        commits: last_commits(&table, uri).await?,
        group: GroupFacts { id: config.kafka.group_id.clone(), state, members },
        partitions,
        history,
    })
}

/// Where the next worker starts, and a sentence when the table, the group and the log
/// disagree.
fn partition_facts(
    view: &PartitionView,
    recorded: Option<Offset>,
    undone: Option<&Option<Offset>>,
    from_start: bool,
) -> PartitionFacts {
    let (start, low, high) = (view.log_start.0, view.log_start.0, view.log_end.0);
    // What the table's content goes with: a RESTORE may have undone the record.
    let effective = match undone {
        Some(record) => record.map(|o| o.0),
        None => recorded.map(|o| o.0),
    };
    let group = view.committed.map(|o| o.0);
    let next_read = match effective {
        Some(last) => (last + 1).max(low),
        None if from_start => start,
        None => group.unwrap_or(high),
    };
    let note = match (effective, undone) {
        (_, Some(_)) => Some(format!(
            "a RESTORE undid the table's record {}: the next worker resets it and re-reads from {next_read}",
            recorded.map_or("none".into(), |o| o.0.to_string())
        )),
        (Some(last), _) if last + 1 < low => Some(format!(
            "retention deleted {}..{low}, which the table needs: the worker stops unless recovery.on_offset_gap = \
             \"continue\"",
            last + 1
        )),
        (Some(last), _) if group.is_some_and(|g| last + 1 < g) => {
            Some(format!("the table is behind the group: the next worker will re-read from {}", last + 1))
        }
        (Some(last), _) if group.is_none_or(|g| g < last + 1) => Some(format!(
            "the group's commit is behind the table (a commit to come); the next worker starts at {}",
            last + 1
        )),
        (None, _) if high > low && from_start => {
            Some(format!("the table has no record: the next worker reads from the log start, {low}"))
        }
        _ => None,
    };
    PartitionFacts {
        topic: view.tp.topic.clone(),
        partition: view.tp.partition.0,
        table_offset: recorded.map(|o| o.0),
        history_offset: None,
        group_committed: group,
        log_start: low,
        log_end: high,
        lag: high - group.unwrap_or(low),
        next_read,
        note,
    }
}

fn history_facts(table: Option<&deltalake::DeltaTable>, uri: &str) -> Result<HistoryFacts, OpsError> {
    let mut facts = HistoryFacts {
        uri: uri.to_string(),
        version: None,
        rows: 0,
        live_files: 0,
        live_bytes: 0,
        days: 0,
        first_day: None,
        last_day: None,
    };
    let Some(table) = table else { return Ok(facts) };
    let snapshot = table.snapshot().map_err(crate::delta::TableError::on_read(uri))?;
    facts.version = table.version().map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let mut days = std::collections::BTreeSet::new();
    for file in snapshot.log_data().iter() {
        facts.live_files += 1;
        facts.live_bytes += file.size().max(0) as u64;
        facts.rows += file.num_records().unwrap_or(0) as u64;
        if let Some(day) = file.partition_values_map().remove(crate::history::schema::EVENT_DATE).flatten() {
            days.insert(day);
        }
    }
    facts.days = days.len();
    facts.first_day = days.first().cloned();
    facts.last_day = days.last().cloned();
    Ok(facts)
}

async fn table_facts(table: &deltalake::DeltaTable, uri: &str) -> Result<TableFacts, OpsError> {
    let read_err = crate::delta::TableError::on_read(uri);
    let snapshot = table.snapshot().map_err(&read_err)?;
    let (mut rows, mut live_files, mut live_bytes) = (0u64, 0usize, 0u64);
    let (mut hidden_rows, mut files_with_deletion_vectors) = (0u64, 0usize);
    let mut partition_values = std::collections::HashSet::new();
    for file in snapshot.log_data().iter() {
        live_files += 1;
        live_bytes += file.size().max(0) as u64;
        rows += file.num_records().unwrap_or(0) as u64;
        if let Some(dv) = file.deletion_vector_descriptor() {
            hidden_rows += dv.cardinality.max(0) as u64;
            files_with_deletion_vectors += 1;
        }
        let values = file.partition_values_map();
        if !values.is_empty() {
            partition_values.insert(format!("{values:?}"));
        }
    }
    let objects = crate::maintenance::footprint::list_objects(table).await.map_err(&read_err)?;
    let bytes_on_disk = objects.values().map(|(size, _)| size).sum();
    let storage = crate::maintenance::footprint::of(table, &objects).map_err(&read_err)?;
    let retention = crate::maintenance::RetentionSettings::of(table).map_err(&read_err)?;
    let last_compaction = last_compaction(table, uri).await?;
    let last_clean = crate::maintenance::last_run(table).await;
    Ok(TableFacts {
        uri: uri.to_string(),
        version: table.version().map_or(-1, |v| v as i64),
        rows: rows.saturating_sub(hidden_rows),
        hidden_rows,
        files_with_deletion_vectors,
        write_mode: crate::table::table_write_mode(table),
        live_files,
        live_bytes,
        bytes_on_disk,
        storage,
        retention,
        last_clean,
        last_compaction,
        partition_columns: snapshot.metadata().partition_columns().to_vec(),
        partitions: partition_values.len(),
    })
}

/// Commits read back for the last compaction.
const MAINTENANCE_LOOKBACK: u64 = 2000;

/// When the last compaction was committed, among the last [`MAINTENANCE_LOOKBACK`]
/// commits (read a few at a time; only their `commitInfo`).
async fn last_compaction(table: &deltalake::DeltaTable, uri: &str) -> Result<Option<String>, OpsError> {
    let read_err = crate::delta::TableError::on_read(uri);
    let latest = table.version().unwrap_or(0);
    let log_store = table.log_store();
    let versions: Vec<u64> = (latest.saturating_sub(MAINTENANCE_LOOKBACK - 1)..=latest).rev().collect();
    let mut compaction = None;
    for chunk in versions.chunks(32) {
        let reads = chunk.iter().map(|v| log_store.read_commit_entry(*v));
        let commits = futures::future::try_join_all(reads).await.map_err(&read_err)?;
        for bytes in commits.into_iter().flatten() {
            let Some(line) = bytes.split(|b| *b == b'\n').find(|l| l.starts_with(b"{\"commitInfo\"")) else { continue };
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            let info = &action["commitInfo"];
            let time = info["timestamp"].as_i64().map(|ms| rfc3339(ms * 1000));
            let (key, mark) = crate::table::commit::COMPACTION_MARK;
            if info["operation"].as_str() == Some("OPTIMIZE") || info[key].as_str() == Some(mark) {
                compaction = time;
                break;
            }
        }
        if compaction.is_some() {
            break;
        }
    }
    Ok(compaction)
}

async fn last_commits(table: &deltalake::DeltaTable, uri: &str) -> Result<Vec<CommitFacts>, OpsError> {
    let read_err = crate::delta::TableError::on_read(uri);
    let latest = table.version().unwrap_or(0);
    let mut commits = Vec::new();
    for version in (latest.saturating_sub(COMMITS_LISTED - 1)..=latest).rev() {
        let Some(bytes) = table.log_store().read_commit_entry(version).await.map_err(&read_err)? else { break };
        let mut commit = CommitFacts {
            version: version as i64,
            time: String::new(),
            operation: String::new(),
            files_added: 0,
            files_removed: 0,
            rows_written: 0,
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            if let Some(info) = action.get("commitInfo") {
                commit.operation = info["operation"].as_str().unwrap_or_default().to_string();
                commit.time = info["timestamp"].as_i64().map(|ms| rfc3339(ms * 1000)).unwrap_or_default();
            } else if let Some(add) = action.get("add") {
                commit.files_added += 1;
                let stats: Option<serde_json::Value> = add["stats"].as_str().and_then(|s| serde_json::from_str(s).ok());
                commit.rows_written += stats.and_then(|s| s["numRecords"].as_u64()).unwrap_or(0);
            } else if action.get("remove").is_some() {
                commit.files_removed += 1;
            }
        }
        commits.push(commit);
    }
    Ok(commits)
}

/// Prints `report` in `format`.
pub fn print(report: &Inspection, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
        return;
    }
    let t = &report.table;
    println!("table          {}", t.uri);
    println!("version        {}", t.version);
    println!("rows           {}", t.rows);
    println!("live files     {} ({} bytes)", t.live_files, t.live_bytes);
    let f = &t.storage;
    println!("bytes on disk  {} (data files: {} on disk, {} bytes)", t.bytes_on_disk, f.files_on_disk, f.bytes_on_disk);
    println!(
        "log            {} files ({} bytes); checkpoint {}, {} commits after it",
        f.log_files,
        f.log_bytes,
        f.checkpoint_version.map_or("none".to_string(), |v| format!("at version {v}")),
        f.commits_since_checkpoint
    );
    let r = &t.retention;
    println!(
        "retention      checkpoint every {} commits, log kept {}, removed files kept {}",
        r.checkpoint_interval,
        humantime::format_duration(r.log_retention),
        humantime::format_duration(r.deleted_file_retention)
    );
    match &t.last_clean {
        Some(run) => println!(
            "last cleanup   {} at version {}: {} log and {} data files removed ({} bytes)",
            run.finished_at, run.version, run.log_files_removed, run.data_files_removed, run.bytes_removed
        ),
        None => println!("last cleanup   never (no maintenance ran on this table)"),
    }
    let never = format!("none in the last {MAINTENANCE_LOOKBACK} commits");
    println!("last compaction {}", t.last_compaction.as_deref().unwrap_or(&never));
    let layout = if t.partition_columns.is_empty() { "none".to_string() } else { t.partition_columns.join(", ") };
    println!("partitioned by {layout} ({} partitions)", t.partitions);
    match t.write_mode {
        crate::config::WriteMode::CopyOnWrite => println!("write mode     copy_on_write"),
        crate::config::WriteMode::DeletionVectors => println!(
            "write mode     deletion_vectors: {} rows hidden in {} files",
            t.hidden_rows, t.files_with_deletion_vectors
        ),
    }
    println!();
    let mut commits = plain_table(["version", "time", "operation", "files added", "files removed", "rows written"]);
    for c in &report.commits {
        commits.add_row([
            c.version.to_string(),
            c.time.clone(),
            c.operation.clone(),
            c.files_added.to_string(),
            c.files_removed.to_string(),
            c.rows_written.to_string(),
        ]);
    }
    println!("last commits\n{commits}\n");
    if let Some(h) = &report.history {
        match h.version {
            None => println!("history        {} (not created yet)", h.uri),
            Some(version) => println!(
                "history        {} at version {version}: {} updates in {} files ({} bytes), {} days ({} to {})",
                h.uri,
                h.rows,
                h.live_files,
                h.live_bytes,
                h.days,
                h.first_day.as_deref().unwrap_or("-"),
                h.last_day.as_deref().unwrap_or("-")
            ),
        }
        println!();
    }
    let g = &report.group;
    println!("group {} ({}, {} members)", g.id, g.state, g.members.len());
    let mut partitions = plain_table([
        "topic",
        "partition",
        "table offset",
        "history offset",
        "group committed",
        "log start",
        "log end",
        "lag",
        "next read",
    ]);
    let mut notes = Vec::new();
    for p in &report.partitions {
        let shown = |o: Option<i64>| o.map_or("-".to_string(), |o| o.to_string());
        partitions.add_row([
            p.topic.clone(),
            p.partition.to_string(),
            shown(p.table_offset),
            shown(p.history_offset),
            shown(p.group_committed),
            p.log_start.to_string(),
            p.log_end.to_string(),
            p.lag.to_string(),
            p.next_read.to_string(),
        ]);
        if let Some(note) = &p.note {
            notes.push(format!("{}[{}]: {note}", p.topic, p.partition));
        }
    }
    println!("{partitions}");
    for note in notes {
        println!("{note}");
    }
}
