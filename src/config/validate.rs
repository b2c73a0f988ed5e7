//! The checks a configuration passes before a worker uses it: each names the key at
//! fault and the fix.

use std::time::Duration;

use super::{Config, ConfigError, DeadLetterDestination, Settings};
use crate::update::KeyColumn;

/// librdkafka settings the worker sets itself; overriding them would break delivery.
const MANAGED_LIBRDKAFKA_KEYS: [(&str, &str); 6] = [
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("metadata.broker.list", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead"),
    ("auto.offset.reset", "set kafka.auto_offset_reset instead"),
    ("enable.auto.commit", "remove it: offsets are committed only after the Delta commit"),
    ("enable.auto.offset.store", "remove it: offsets are committed only after the Delta commit"),
];

impl Config {
    /// Checks every value a worker relies on.
    ///
    /// # Errors
    /// The first invalid key, with its fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str, fix| Err(ConfigError::Invalid { key, problem: problem.to_string(), fix });
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers", "is empty", "set it to the bootstrap brokers, e.g. \"127.0.0.1:9092\"");
        }
        if self.kafka.group_id.trim().is_empty() {
            return invalid("kafka.group_id", "is empty", "set it to the consumer group shared by all workers");
        }
        if self.kafka.topics.is_empty() {
            return invalid("kafka.topics", "is empty", "list at least one topic, e.g. [\"positions\"]");
        }
        if let Some(bad) = self.kafka.topics.iter().find(|t| !is_valid_topic(t)) {
            return invalid(
                "kafka.topics",
                &format!("contains {bad:?}, which is not a Kafka topic name"),
                "use 1-249 characters of ASCII letters, digits, '.', '_' and '-'",
            );
        }
        if let Some((key, fix)) = MANAGED_LIBRDKAFKA_KEYS.iter().find(|(k, _)| self.kafka.librdkafka.0.contains_key(*k))
        {
            return invalid("kafka.librdkafka", &format!("sets `{key}`, which position-sink manages itself"), fix);
        }
        if let Some((problem, fix)) = unsupported_sasl_mechanism(&self.kafka.librdkafka) {
            return invalid("kafka.librdkafka", &problem, fix);
        }
        if self.delta.table_uri.trim().is_empty() {
            return invalid("delta.table_uri", "is empty", "set it to a directory or URL, e.g. \"./data/positions\"");
        }
        if let Some((key, problem, fix)) =
            unsafe_object_store_option(&self.delta.table_uri, &self.delta.storage_options)
        {
            return Err(ConfigError::Invalid { key, problem, fix });
        }
        if !self.delta.key_columns.contains(&KeyColumn::Conid) {
            return invalid("delta.key_columns", "does not include \"conid\"", "add \"conid\" to the list");
        }
        if !self.http.bind.trim().is_empty() && self.http.bind.trim().parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "http.bind",
                &format!("is {:?}, which is not host:port", self.http.bind),
                "set an address such as \"127.0.0.1:9464\" or \"0.0.0.0:9464\", or \"\" to turn the listener off",
            );
        }
        if self.delta.max_rows_per_file == 0 {
            return invalid("delta.max_rows_per_file", "is zero", "set a positive number of rows, e.g. 100000");
        }
        if self.flush.interval.is_zero() {
            return invalid("flush.interval", "is zero", "set a positive duration, e.g. \"3s\"");
        }
        if self.flush.max_records == 0 {
            return invalid("flush.max_records", "is zero", "set a positive number of messages, e.g. 100000");
        }
        if self.flush.max_bytes < 1024 {
            return invalid("flush.max_bytes", "is below 1024", "set a byte count of at least 1024, e.g. 67108864");
        }
        if self.decode.max_message_bytes == 0 {
            return invalid("decode.max_message_bytes", "is zero", "set a positive byte count, e.g. 1048576");
        }
        if self.dead_letter.destination == DeadLetterDestination::Topic {
            if !is_valid_topic(&self.dead_letter.topic) {
                return invalid(
                    "dead_letter.topic",
                    &format!("is {:?}, not a Kafka topic name", self.dead_letter.topic),
                    "name an existing topic for dead letters, e.g. \"positions.dead-letters\", or set dead_letter.destination = \"table\"",
                );
            }
            if self.kafka.topics.contains(&self.dead_letter.topic) {
                return invalid(
                    "dead_letter.topic",
                    "is also in kafka.topics, so dead letters would be read back as input",
                    "use a separate topic for dead letters",
                );
            }
            if self.dead_letter.transaction_timeout < Duration::from_secs(1) {
                return invalid("dead_letter.transaction_timeout", "is below 1s", "set at least \"1s\", e.g. \"30s\"");
            }
        } else if self.dead_letter.resolved_table_uri(&self.delta).trim_end_matches('/')
            == self.delta.table_uri.trim_end_matches('/')
        {
            return invalid(
                "dead_letter.table_uri",
                "is the positions table itself",
                "leave it empty (a table beside the positions table) or name another location",
            );
        }
        if self.history.enabled {
            let history = self.history.resolved_table_uri(&self.delta);
            let history = history.trim_end_matches('/');
            let positions = self.delta.table_uri.trim_end_matches('/');
            let dead_letters = self.dead_letter.resolved_table_uri(&self.delta);
            if history == positions
                || (self.dead_letter.destination == DeadLetterDestination::Table
                    && history == dead_letters.trim_end_matches('/'))
            {
                return invalid(
                    "history.table_uri",
                    "is the positions table or the dead-letter table",
                    "leave it empty (a table beside the positions table) or name another location",
                );
            }
            if history.starts_with(&format!("{positions}/")) {
                return invalid(
                    "history.table_uri",
                    "is inside the positions table's directory, where vacuum would delete its files",
                    "put it beside the positions table (leave it empty for <delta.table_uri>_history)",
                );
            }
        }
        if self.maintenance.interval.is_zero() {
            return invalid("maintenance.interval", "is zero", "set a positive duration, e.g. \"5m\"");
        }
        if self.maintenance.compaction_min_files < 2 {
            return invalid(
                "maintenance.compaction_min_files",
                "is below 2",
                "set 2 or more (a single file is never compacted)",
            );
        }
        if self.maintenance.compaction_max_files < self.maintenance.compaction_min_files {
            return invalid(
                "maintenance.compaction_max_files",
                "is below maintenance.compaction_min_files",
                "set it at or above maintenance.compaction_min_files, e.g. 32",
            );
        }
        let hidden = self.maintenance.compaction_hidden_fraction;
        if !(hidden > 0.0 && hidden <= 1.0) {
            return invalid(
                "maintenance.compaction_hidden_fraction",
                "is not in (0, 1]",
                "set a fraction such as 0.3 (a file with 30% of its rows hidden is rewritten)",
            );
        }
        if self.maintenance.unreferenced_file_age < Duration::from_secs(3) {
            return invalid(
                "maintenance.unreferenced_file_age",
                "is below 3s",
                "set a duration three times longer than a flush can take to write and commit, e.g. \"30m\"",
            );
        }
        if let Some((key, problem, fix)) = invalid_table_property(&self.delta.table_properties) {
            return Err(ConfigError::Invalid {
                key: "delta.table_properties",
                problem: format!("sets `{key}` {problem}"),
                fix,
            });
        }
        if self.dead_letter.destination == DeadLetterDestination::Table
            && self
                .dead_letter
                .resolved_table_uri(&self.delta)
                .starts_with(&format!("{}/", self.delta.table_uri.trim_end_matches('/')))
        {
            return invalid(
                "dead_letter.table_uri",
                "is inside the positions table's directory, where vacuum would delete its files",
                "put it beside the positions table (leave it empty for <delta.table_uri>_dead_letters)",
            );
        }
        if self.retry.min_delay > self.retry.max_delay {
            return invalid("retry.min_delay", "is longer than retry.max_delay", "make min_delay <= max_delay");
        }
        Ok(())
    }
}

/// The SASL mechanisms built into position-sink.
const SASL_MECHANISMS: [&str; 4] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

/// A `sasl.mechanisms` value position-sink cannot use: the problem and the fix.
fn unsupported_sasl_mechanism(settings: &Settings) -> Option<(String, &'static str)> {
    let value = settings.get("sasl.mechanisms").or(settings.get("sasl.mechanism"))?;
    let mechanism = value.trim().to_ascii_uppercase();
    if mechanism == "GSSAPI" {
        return Some((
            "sets \"sasl.mechanisms\" = \"GSSAPI\": Kerberos is not built into position-sink".to_string(),
            "use SCRAM-SHA-512, SCRAM-SHA-256, PLAIN or OAUTHBEARER (all built in), or build position-sink with \
             rdkafka's `gssapi` feature (it links the system's libsasl2)",
        ));
    }
    (!SASL_MECHANISMS.contains(&mechanism.as_str())).then(|| {
        (
            format!("sets \"sasl.mechanisms\" = {value:?}, which is not a SASL mechanism position-sink knows"),
            "set one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER (the one the cluster enables)",
        )
    })
}

/// A table property this program would create a table with that Delta cannot use.
fn invalid_table_property(properties: &Settings) -> Option<(String, String, &'static str)> {
    for (key, value) in &properties.0 {
        let problem = match key.as_str() {
            "delta.checkpointInterval" => {
                value.trim().parse::<u64>().ok().filter(|n| *n > 0).is_none().then(|| format!("to {value:?}"))
            }
            "delta.logRetentionDuration" | "delta.deletedFileRetentionDuration" => {
                parse_delta_interval(value).is_none().then(|| format!("to {value:?}, not an interval"))
            }
            _ => None,
        };
        if let Some(problem) = problem {
            let fix = "use a Delta interval such as \"interval 1 hours\" for durations and a positive count for \
                       delta.checkpointInterval";
            return Some((key.clone(), problem, fix));
        }
    }
    let interval = |key: &str| properties.0.get(key).and_then(|v| parse_delta_interval(v));
    let (log, files) = (interval("delta.logRetentionDuration"), interval("delta.deletedFileRetentionDuration"));
    if let (Some(log), Some(files)) = (log, files)
        && log < files
    {
        return Some((
            "delta.logRetentionDuration".to_string(),
            format!(
                "shorter than delta.deletedFileRetentionDuration ({} < {}): versions inside the file retention \
                 would have no log to be read by, and vacuum finds the removed files to keep in that log",
                humantime::format_duration(log),
                humantime::format_duration(files)
            ),
            "set delta.logRetentionDuration at least as long as delta.deletedFileRetentionDuration",
        ));
    }
    None
}

/// A Delta interval property (`interval 1 hours`, `interval 30 seconds`) as a duration,
/// parsed as strictly as Delta's readers parse it (lower case, whole numbers, no months).
pub fn parse_delta_interval(value: &str) -> Option<Duration> {
    let mut words = value.split_whitespace();
    if words.next() != Some("interval") {
        return None;
    }
    let count: u64 = words.next()?.parse().ok()?;
    let unit = words.next()?;
    if words.next().is_some() {
        return None;
    }
    let seconds = match unit.strip_suffix('s').unwrap_or(unit) {
        "nanosecond" => return Some(Duration::from_nanos(count)),
        "microsecond" => return Some(Duration::from_micros(count)),
        "millisecond" => return Some(Duration::from_millis(count)),
        "second" => 1,
        "minute" => 60,
        "hour" => 3600,
        "day" => 86_400,
        "week" => 604_800,
        _ => return None,
    };
    Some(Duration::from_secs(count.checked_mul(seconds)?))
}

fn is_valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A storage option (from `delta.storage_options`, or the environment as delta-rs reads
/// it) that would let two workers commit the same table version on S3: the key, the
/// problem and the fix. Safe concurrent commits on S3 use conditional writes
/// (`If-None-Match: *`), which delta-rs uses unless told otherwise.
fn unsafe_object_store_option(table_uri: &str, options: &Settings) -> Option<(&'static str, String, &'static str)> {
    let scheme = table_uri.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    if !matches!(scheme.as_deref(), Some("s3" | "s3a")) {
        return None;
    }
    let value = |names: &[&str]| {
        options
            .0
            .iter()
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
            .or_else(|| {
                names
                    .iter()
                    .find_map(|n| std::env::var(n.to_ascii_uppercase()).ok())
                    .map(|v| v.trim().to_ascii_lowercase())
            })
    };
    if value(&["aws_s3_allow_unsafe_rename"]).is_some_and(|v| v == "true") {
        return Some((
            "delta.storage_options",
            "sets AWS_S3_ALLOW_UNSAFE_RENAME = true: two workers could both commit the same table version and \
             one commit would be lost"
                .to_string(),
            "remove it; position-sink commits with S3 conditional writes (If-None-Match), which AWS S3, MinIO \
             and other S3-compatible stores support",
        ));
    }
    if value(&["aws_conditional_put", "conditional_put"]).is_some_and(|v| v == "disabled") {
        return Some((
            "delta.storage_options",
            "sets conditional_put = \"disabled\": commits would overwrite each other".to_string(),
            "remove it (the default uses If-None-Match), or use a store that supports conditional writes",
        ));
    }
    if value(&["aws_s3_locking_provider"]).is_some() {
        return Some((
            "delta.storage_options",
            "sets AWS_S3_LOCKING_PROVIDER: delta-rs no longer supports DynamoDB locking".to_string(),
            "remove it; commits use S3 conditional writes (If-None-Match) instead",
        ));
    }
    None
}
