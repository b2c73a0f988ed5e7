//! Configuration: one typed tree, layered as built-in defaults → TOML file →
//! `POSITION_SINK__<SECTION>__<KEY>` environment variables → command-line flags,
//! and validated once at start-up.
//!
//! Invariant kept here: a [`Config`] that exists has passed [`Config::validate`];
//! every error names the key and what to put there. Secrets never reach `Debug`.

mod settings;
mod validate;

pub use settings::{Settings, mask_secrets};
pub use validate::parse_delta_interval;

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize};

use crate::decode::{DecodeOptions, Format as ValueFormat};
use crate::update::KeyColumn;

/// Environment variable prefix; sections and keys are separated by `__`.
pub const ENV_PREFIX: &str = "POSITION_SINK__";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where updates come from.
    pub kafka: KafkaConfig,
    /// Where they go.
    pub delta: DeltaConfig,
    /// When buffered updates are written.
    pub flush: FlushConfig,
    /// What counts as a valid message.
    pub decode: DecodeConfig,
    /// Where invalid messages go.
    pub dead_letter: DeadLetterConfig,
    /// The history table of every accepted update.
    pub history: HistoryConfig,
    /// How failed writes are retried.
    pub retry: RetryConfig,
    /// Process lifecycle.
    pub worker: WorkerConfig,
    /// What recovery may accept.
    pub recovery: RecoveryConfig,
    /// Checkpoints, log cleanup, vacuum and compaction of the tables.
    pub maintenance: MaintenanceConfig,
    /// The metrics and health listener.
    pub http: HttpConfig,
    /// Log output.
    pub log: LogConfig,
}

/// `[http]`: one listener for `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `host:port` to listen on; empty turns the listener off. Port 0 takes a free port
    /// (the worker logs which).
    pub bind: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { bind: "127.0.0.1:9464".to_string() }
    }
}

/// `[log]`: how log lines are written (the level is `RUST_LOG`'s).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors (one JSON object per line).
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// JSON lines.
    Json,
}

/// `[recovery]`: what the worker does when the table asks for messages Kafka no longer has.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoveryConfig {
    /// When the offset the table says to resume from was deleted by retention: `fail`
    /// (stop with an error naming the partition and the offsets) or `continue` (read
    /// from the oldest offset still there, and log and count the gap).
    pub on_offset_gap: OnOffsetGap,
}

/// `recovery.on_offset_gap`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOffsetGap {
    /// Stop with an error.
    #[default]
    Fail,
    /// Accept the gap knowingly.
    Continue,
}

/// `[kafka]`: the consumer group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// Consumer group id; all workers writing one table share it.
    pub group_id: String,
    /// Topics to consume (a list, or one comma-separated string in an environment variable).
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    /// Where a partition starts when neither the group nor the table has an offset for it.
    pub auto_offset_reset: OffsetReset,
    /// Raw librdkafka consumer settings, passed through (e.g. `security.protocol`,
    /// `sasl.password`). Keys this program manages itself are refused.
    pub librdkafka: Settings,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "position-sink".into(),
            topics: vec!["positions".into()],
            auto_offset_reset: OffsetReset::Earliest,
            librdkafka: Settings::default(),
        }
    }
}

/// Start position of a partition that has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// The oldest message still in the topic: nothing already published is skipped.
    Earliest,
    /// Only messages published after the worker joins.
    Latest,
}

impl OffsetReset {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// `[delta]`: the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeltaConfig {
    /// Table location: a local path or a URL (`file:///…`, `s3://…`). Created if missing.
    pub table_uri: String,
    /// Columns that identify a row. Must include `conid`; may add `account`, `sec_type`,
    /// `currency`. `symbol` is not part of the key: a conid whose symbol changes moves.
    pub key_columns: Vec<KeyColumn>,
    /// The table's layout, fixed when the table is created: `"symbol"` (a partition per
    /// symbol, for tens to hundreds of symbols) or `"none"` (no partition column, files
    /// sorted by symbol; for thousands of symbols). See docs/write-path.md.
    pub partition_by: PartitionBy,
    /// How a flush replaces rows, fixed when the table is created: `"copy_on_write"`
    /// (files holding a changed row are rewritten; every Delta reader reads the table)
    /// or `"deletion_vectors"` (changed rows are hidden by deletion vectors and written
    /// anew: a flush costs its batch, not the table; readers must support deletion
    /// vectors). See docs/write-path.md.
    pub write_mode: WriteMode,
    /// Most rows in one data file; a flush rewrites only the files that hold its keys.
    pub max_rows_per_file: usize,
    /// In `deletion_vectors` mode, a file with fewer live rows than this gets no
    /// deletion vector: a flush rewrites it without the rows it replaces, as
    /// copy-on-write does. Rewriting a small file costs less than the vector every
    /// reader must load for it (one read per file with a vector, and readers built on
    /// delta-rs hang once a version holds several hundred of them: delta-rs #4657).
    /// `0` gives every file a vector.
    pub vector_min_rows: usize,
    /// Options for the object store (credentials, endpoint), passed to delta-rs.
    pub storage_options: Settings,
    /// Delta table properties given to a table this program creates (both tables):
    /// what maintenance keeps is decided by the table's own `delta.checkpointInterval`,
    /// `delta.logRetentionDuration` and `delta.deletedFileRetentionDuration`, whoever set
    /// them. An existing table keeps its properties (change them with Spark's
    /// `ALTER TABLE ... SET TBLPROPERTIES` or deltalake's `alter.set_table_properties`).
    /// Keys given here are added to the defaults or replace them.
    pub table_properties: Settings,
}

impl Default for DeltaConfig {
    fn default() -> Self {
        Self {
            table_uri: "./data/positions".into(),
            key_columns: vec![KeyColumn::Conid],
            partition_by: PartitionBy::Symbol,
            write_mode: WriteMode::CopyOnWrite,
            max_rows_per_file: 100_000,
            vector_min_rows: 1_000,
            storage_options: Settings::default(),
            table_properties: Settings(
                DEFAULT_TABLE_PROPERTIES.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ),
        }
    }
}

/// The table properties of a table this program creates (docs/maintenance.md says why):
/// a checkpoint every 100 commits (5 minutes of 3 s flushes), and an hour of history:
/// commit files and removed data files are kept for an hour, so a reader in the middle
/// of a read, time travel and `RESTORE` reach an hour back.
pub const DEFAULT_TABLE_PROPERTIES: [(&str, &str); 3] = [
    ("delta.checkpointInterval", "100"),
    ("delta.logRetentionDuration", "interval 1 hours"),
    ("delta.deletedFileRetentionDuration", "interval 1 hours"),
];

/// `[maintenance]`: what Delta has no table property for: whether and how often the
/// workers clean the tables up, and when a Kafka partition's files are compacted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Whether workers maintain the tables while they run (`position-sink maintain`
    /// does the same on demand either way).
    pub enabled: bool,
    /// How often the table-wide work runs (log cleanup and vacuum of both tables, on
    /// the one worker that owns partition 0 of the first topic) and how often each
    /// worker looks for files of its partitions to compact.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A Kafka partition's files of one symbol (or of the whole partition, in the
    /// `none` layout) are compacted once there are at least this many and their rows
    /// fit in fewer files of `delta.max_rows_per_file` rows.
    pub compaction_min_files: usize,
    /// A file with at least this fraction of its rows hidden by deletion vectors
    /// (`delta.write_mode = "deletion_vectors"`) is rewritten without them.
    pub compaction_hidden_fraction: f64,
    /// A flush that leaves a group (a Kafka partition's files of one symbol, or of the
    /// whole partition) with more files to compact than this runs the worker's
    /// compaction right after it, without waiting for `maintenance.interval`: it bounds
    /// the files, and the files with deletion vectors, every reader opens.
    pub compaction_max_files: usize,
    /// In `deletion_vectors` mode, the most live files with a deletion vector the
    /// table may hold: a flush that leaves more runs the worker's compaction right
    /// after it, which rewrites its partitions' files with vectors without the rows
    /// they hide. Every reader loads one vector per such file, and readers built on
    /// delta-rs hang on a version with several hundred of them (delta-rs #4657).
    pub compaction_max_vectors: usize,
    /// Vacuum never deletes a file no version references (one a flush or compaction
    /// wrote and has not committed yet, or never will) younger than this, by the object
    /// store's clock, whatever the table's retention. A flush or compaction commits its
    /// files only within a third of it from its first file (or writes them again): the
    /// second third bounds its commit, the last one absorbs clock skew between the
    /// store and the hosts. The same value must be given to every worker and to
    /// `position-sink maintain`.
    #[serde(with = "humantime_serde")]
    pub unreferenced_file_age: Duration,
}

impl MaintenanceConfig {
    /// How long a flush or compaction may take from its first data file to the end of
    /// its commit: a third of [`MaintenanceConfig::unreferenced_file_age`].
    pub fn write_deadline(&self) -> Duration {
        self.unreferenced_file_age / 3
    }
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(300),
            compaction_min_files: 4,
            compaction_hidden_fraction: 0.3,
            compaction_max_files: 32,
            compaction_max_vectors: 128,
            unreferenced_file_age: Duration::from_secs(30 * 60),
        }
    }
}

/// The positions table's partitioning (`delta.partition_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionBy {
    /// A `symbol=` directory per symbol.
    Symbol,
    /// No partition column.
    None,
}

/// How a flush replaces rows in the positions table (`delta.write_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Files holding a replaced row are rewritten without it.
    CopyOnWrite,
    /// Replaced rows are hidden by deletion vectors; their new rows go into new files.
    DeletionVectors,
}

/// `[flush]`: when the buffer is written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Longest time an update waits in the buffer (e.g. `"3s"`, `"500ms"`).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Flush early once this many messages are read. While a flush runs, reading
    /// goes on until the next buffer holds this many rows (one per key) and dead letters.
    pub max_records: usize,
    /// Flush early once this many bytes of messages are read. While a flush runs,
    /// reading goes on until the messages the next buffer holds (the newest per key, the
    /// dead letters) reach this many bytes: memory held by buffers stays within about
    /// twice this (one batch being written, one filling).
    pub max_bytes: usize,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(3), max_records: 100_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// `[decode]`: the messages' format and their validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// The format of message values: `json`.
    pub format: ValueFormat,
    /// Largest accepted message (key + value) in bytes; larger ones are invalid.
    pub max_message_bytes: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self { format: ValueFormat::Json, max_message_bytes: 1024 * 1024 }
    }
}

/// Where dead letters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterDestination {
    /// A Delta table (`dead_letter.table_uri`), written in the same flush as the
    /// positions; exactly-once through the table's recorded offsets.
    Table,
    /// A Kafka topic (`dead_letter.topic`): the original bytes as the value, the
    /// reason and coordinates in headers; exactly-once for `read_committed` readers
    /// through a Kafka transaction that also commits the consumer offsets.
    Topic,
}

/// `[dead_letter]`: where messages that are not valid updates go, with their reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// `"table"` (default) or `"topic"`.
    pub destination: DeadLetterDestination,
    /// Location of the dead-letter Delta table; empty means beside the positions
    /// table: `<delta.table_uri>_dead_letters`.
    pub table_uri: String,
    /// The dead-letter topic, for `destination = "topic"`; it must exist.
    pub topic: String,
    /// Longest time a dead-letter transaction may stay open (librdkafka's
    /// `transaction.timeout.ms`); after a crash, the next worker waits up to this long
    /// for the broker to abort the crashed worker's transaction.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            destination: DeadLetterDestination::Table,
            table_uri: String::new(),
            topic: String::new(),
            transaction_timeout: Duration::from_secs(30),
        }
    }
}

impl DeadLetterConfig {
    /// The dead-letter table's location: `table_uri`, or `<positions table>_dead_letters`.
    pub fn resolved_table_uri(&self, delta: &DeltaConfig) -> String {
        if self.table_uri.trim().is_empty() {
            format!("{}_dead_letters", delta.table_uri.trim_end_matches('/'))
        } else {
            self.table_uri.clone()
        }
    }
}

/// `[history]`: an append-only Delta table of every accepted update (docs/history.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Keep the history (off by default).
    pub enabled: bool,
    /// Location of the history table; empty means beside the positions table:
    /// `<delta.table_uri>_history`.
    pub table_uri: String,
    /// Days of history kept, counted back from today (UTC) by event date; older days
    /// are removed by maintenance. 0 keeps every day.
    pub keep_days: u32,
}

impl HistoryConfig {
    /// The history table's location: `table_uri`, or `<positions table>_history`.
    pub fn resolved_table_uri(&self, delta: &DeltaConfig) -> String {
        if self.table_uri.trim().is_empty() {
            format!("{}_history", delta.table_uri.trim_end_matches('/'))
        } else {
            self.table_uri.clone()
        }
    }
}

/// `[retry]`: bounded exponential backoff with jitter around storage and broker I/O.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First delay.
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    /// Longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Attempts after the first before the worker gives up and exits non-zero.
    pub max_retries: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { min_delay: Duration::from_millis(100), max_delay: Duration::from_secs(10), max_retries: 10 }
    }
}

/// `[worker]`: lifecycle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// On SIGINT/SIGTERM, how long to wait for the last flush before exiting anyway
    /// (nothing unwritten is committed; it is re-read on restart).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Exit once every assigned partition is read to its end and written (batch mode).
    pub exit_when_caught_up: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self { shutdown_timeout: Duration::from_secs(30), exit_when_caught_up: false }
    }
}

fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect(),
        OneOrMany::Many(list) => list,
    })
}

/// A configuration that cannot be used, with the key at fault and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The layers do not parse or contain unknown keys.
    #[error("configuration error: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value is out of its allowed range.
    #[error("configuration key `{key}` {problem}; {fix}")]
    Invalid {
        /// Dotted key, e.g. `flush.max_records`.
        key: &'static str,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: &'static str,
    },
}

impl Config {
    /// Loads the layers: defaults, then `file` (if given), then the environment, then `overrides`.
    ///
    /// # Errors
    /// When a layer does not parse, names an unknown key, or a value is invalid.
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Config =
            figment.merge(Env::prefixed(ENV_PREFIX).split("__")).merge(overrides).extract().map_err(Box::new)?;
        config.kafka.librdkafka.remember_secrets();
        config.delta.storage_options.remember_secrets();
        config.validate()?;
        Ok(config)
    }

    /// What the decoder needs from this configuration: the one place it is built
    /// (worker, `replay`, the dead-letter review).
    pub fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            format: self.decode.format,
            key_columns: self.delta.key_columns.clone(),
            max_message_bytes: self.decode.max_message_bytes,
        }
    }

    /// Logs the effective configuration, one field per key, secrets masked (keys of
    /// `kafka.librdkafka` and `delta.storage_options` that look secret).
    pub fn log_effective(&self) {
        let dead_letters = match self.dead_letter.destination {
            DeadLetterDestination::Table => format!("table {}", self.dead_letter.resolved_table_uri(&self.delta)),
            DeadLetterDestination::Topic => format!("topic {}", self.dead_letter.topic),
        };
        let history = if self.history.enabled {
            format!("table {} (keep_days {})", self.history.resolved_table_uri(&self.delta), self.history.keep_days)
        } else {
            "off".to_string()
        };
        tracing::info!(
            kafka.brokers = %self.kafka.brokers,
            kafka.group_id = %self.kafka.group_id,
            kafka.topics = ?self.kafka.topics,
            kafka.auto_offset_reset = %spelled(&self.kafka.auto_offset_reset),
            kafka.librdkafka = ?self.kafka.librdkafka,
            delta.table_uri = %self.delta.table_uri,
            delta.partition_by = %spelled(&self.delta.partition_by),
            delta.write_mode = %spelled(&self.delta.write_mode),
            delta.key_columns = %spelled(&self.delta.key_columns),
            delta.max_rows_per_file = self.delta.max_rows_per_file,
            delta.vector_min_rows = self.delta.vector_min_rows,
            delta.storage_options = ?self.delta.storage_options,
            flush.interval = ?self.flush.interval,
            flush.max_records = self.flush.max_records,
            flush.max_bytes = self.flush.max_bytes,
            decode.format = %spelled(&self.decode.format),
            decode.max_message_bytes = self.decode.max_message_bytes,
            dead_letter = %dead_letters,
            history = %history,
            retry.max_retries = self.retry.max_retries,
            worker.shutdown_timeout = ?self.worker.shutdown_timeout,
            worker.exit_when_caught_up = self.worker.exit_when_caught_up,
            delta.table_properties = ?self.delta.table_properties,
            recovery.on_offset_gap = %spelled(&self.recovery.on_offset_gap),
            maintenance.enabled = self.maintenance.enabled,
            maintenance.interval = ?self.maintenance.interval,
            maintenance.compaction_min_files = self.maintenance.compaction_min_files,
            maintenance.compaction_hidden_fraction = self.maintenance.compaction_hidden_fraction,
            maintenance.compaction_max_files = self.maintenance.compaction_max_files,
            maintenance.compaction_max_vectors = self.maintenance.compaction_max_vectors,
            maintenance.unreferenced_file_age = ?self.maintenance.unreferenced_file_age,
            http.bind = %self.http.bind,
            log.format = %spelled(&self.log.format),
            "effective configuration"
        );
    }
}

/// A value as the configuration file spells it (`earliest`, `["conid"]`).
pub(crate) fn spelled<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let figment = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::default().flush.interval, Duration::from_secs(3));
    }

    #[test]
    fn durations_and_lists_parse() {
        let c = load_toml("[flush]\ninterval = \"500ms\"\n[kafka]\ntopics = \"a, b\"\n").unwrap();
        assert_eq!(c.flush.interval, Duration::from_millis(500));
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = load_toml("[flush]\nintervall = \"1s\"\n").unwrap_err().to_string();
        assert!(err.contains("intervall"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = load_toml("[flush]\nmax_records = 0\n").unwrap_err().to_string();
        assert!(err.contains("flush.max_records"), "{err}");
        let err = load_toml("[delta]\nkey_columns = [\"account\"]\n").unwrap_err().to_string();
        assert!(err.contains("delta.key_columns"), "{err}");
        let err = load_toml("[kafka.librdkafka]\n\"enable.auto.commit\" = \"true\"\n").unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn dead_letters_default_to_a_table_beside_the_positions_table() {
        let c = load_toml("[delta]\ntable_uri = \"s3://bucket/positions/\"\n").unwrap();
        assert_eq!(c.dead_letter.resolved_table_uri(&c.delta), "s3://bucket/positions_dead_letters");
        let err = load_toml("[dead_letter]\ndestination = \"topic\"\n").unwrap_err().to_string();
        assert!(err.contains("dead_letter.topic"), "{err}");
        let err = load_toml("[dead_letter]\ndestination = \"topic\"\ntopic = \"positions\"\n").unwrap_err().to_string();
        assert!(err.contains("kafka.topics"), "{err}");
        assert!(load_toml("[dead_letter]\ndestination = \"topic\"\ntopic = \"dlq\"\n").is_ok());
    }

    #[test]
    fn history_is_off_by_default_and_its_table_lies_beside_the_positions_table() {
        let c = load_toml("[delta]\ntable_uri = \"s3://bucket/positions/\"\n").unwrap();
        assert!(!c.history.enabled);
        assert_eq!(c.history.resolved_table_uri(&c.delta), "s3://bucket/positions_history");
        let inside = "[delta]\ntable_uri = \"/t/p\"\n[history]\nenabled = true\ntable_uri = \"/t/p/h\"\n";
        assert!(load_toml(inside).unwrap_err().to_string().contains("history.table_uri"));
        let same = "[delta]\ntable_uri = \"/t/p\"\n[history]\nenabled = true\ntable_uri = \"/t/p_dead_letters\"\n";
        assert!(load_toml(same).unwrap_err().to_string().contains("history.table_uri"));
        assert!(load_toml("[history]\nenabled = true\nkeep_days = 30\n").is_ok());
    }

    #[test]
    fn table_properties_add_to_the_defaults_and_are_checked() {
        let c = load_toml("[delta.table_properties]\n\"delta.logRetentionDuration\" = \"interval 2 days\"\n").unwrap();
        let properties = &c.delta.table_properties;
        assert_eq!(properties.get("delta.logRetentionDuration"), Some("interval 2 days"));
        assert_eq!(properties.get("delta.checkpointInterval"), Some("100"), "defaults stay");
        let err = load_toml("[delta.table_properties]\n\"delta.deletedFileRetentionDuration\" = \"1 fortnight\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("delta.table_properties") && err.contains("deletedFileRetentionDuration"), "{err}");
        assert_eq!(parse_delta_interval("interval 1 hours"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_delta_interval("interval 90 seconds"), Some(Duration::from_secs(90)));
        assert_eq!(parse_delta_interval("interval 1 week"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_delta_interval("soon"), None);
        assert_eq!(parse_delta_interval("1 hours"), None, "Delta's readers need the word interval");
    }

    #[test]
    fn secrets_are_masked_in_debug() {
        let c =
            load_toml("[kafka.librdkafka]\n\"sasl.password\" = \"hunter2\"\n\"security.protocol\" = \"SASL_SSL\"\n")
                .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("SASL_SSL"));
    }

    #[test]
    #[allow(clippy::result_large_err, reason = "figment::Jail's closure type returns figment::Error")]
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[kafka]\nbrokers = \"file:1\"\ngroup_id = \"g\"\n")?;
            jail.set_env("POSITION_SINK__KAFKA__BROKERS", "env:2");
            jail.set_env("POSITION_SINK__FLUSH__MAX_RECORDS", "77");
            let c = Config::load(Some(Path::new("c.toml")), Figment::new()).map_err(|e| e.to_string())?;
            assert_eq!(c.kafka.brokers, "env:2");
            assert_eq!(c.kafka.group_id, "g");
            assert_eq!(c.flush.max_records, 77);
            Ok(())
        });
    }

    #[test]
    fn options_that_allow_unsafe_concurrent_commits_on_s3_are_refused() {
        let mut c = Config::default();
        c.delta.table_uri = "s3://bucket/positions".into();
        c.delta.storage_options.0.insert("AWS_S3_ALLOW_UNSAFE_RENAME".into(), "true".into());
        let error = c.validate().unwrap_err().to_string();
        assert!(error.contains("delta.storage_options") && error.contains("If-None-Match"), "{error}");
        c.delta.storage_options.0.clear();
        c.delta.storage_options.0.insert("conditional_put".into(), "disabled".into());
        assert!(c.validate().is_err());
        c.delta.storage_options.0.clear();
        c.delta.storage_options.0.insert("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9000".into());
        c.validate().expect("conditional writes are the default");
        c.delta.table_uri = "./data/positions".into();
        c.delta.storage_options.0.insert("AWS_S3_ALLOW_UNSAFE_RENAME".into(), "true".into());
        c.validate().expect("a local table does not use S3 options");
    }
}
