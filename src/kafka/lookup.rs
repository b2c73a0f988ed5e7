//! Look-ups for the operator's commands (`inspect`, `replay`): partitions with their log
//! start, end and the group's committed offset, the group's members, offsets by time;
//! all through a consumer of the group that never joins it (a bystander).

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult};

use super::{CONNECT_TIMEOUT, ClientError, ClientKind, Watched, client_config, until_connected};
use crate::config::KafkaConfig;
use crate::offsets::{Offset, TopicPartition};

/// What Kafka holds of one partition, for the operator's commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// The partition.
    pub tp: TopicPartition,
    /// The oldest offset still in the log.
    pub log_start: Offset,
    /// The next offset to be written (high watermark).
    pub log_end: Offset,
    /// The group's committed offset (the next to read), if it has one.
    pub committed: Option<Offset>,
}

/// A consumer that never joins a group, connected to `config`'s brokers.
pub type Bystander = BaseConsumer<Watched>;

/// A consumer of `config`'s group that never joins it: for looking up offsets and for
/// reading assigned partitions without committing. Blocking: it waits for its first
/// connection, so that wrong credentials or certificates are reported at once.
///
/// # Errors
/// When librdkafka rejects a setting, or no connection can be made.
pub fn bystander(config: &KafkaConfig, defaults: &[(&str, &str)]) -> Result<Bystander, ClientError> {
    let consumer: Bystander = bystander_config(config, defaults).create_with_context(Watched::default())?;
    let watch = consumer.context().watch.clone();
    until_connected(&watch, CONNECT_TIMEOUT, |timeout| {
        let fetched = consumer.fetch_metadata(None, timeout).map(|_| ());
        // librdkafka hands its log lines and errors over on poll: they say why not.
        let _ = consumer.poll(std::time::Duration::ZERO);
        fetched
    })?;
    Ok(consumer)
}

/// The configuration of a consumer of `config`'s group that never joins it (nor commits):
/// `defaults` and the pass-through settings; the one place such consumers are configured.
pub fn bystander_config(config: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut settings = vec![("enable.auto.commit", "false"), ("enable.partition.eof", "false")];
    settings.extend_from_slice(defaults);
    let mut client = client_config(config, ClientKind::Consumer, &settings);
    client.set("group.id", &config.group_id);
    client
}

/// `result`, its error explained by `consumer`'s connection fault when there is one.
fn explained<T>(consumer: &Bystander, result: KafkaResult<T>) -> Result<T, ClientError> {
    result.map_err(|e| consumer.context().watch.explain(e))
}

/// Every partition of `config.topics`, with its log start and end and the group's
/// committed offset. Blocking: call off the async runtime's threads.
///
/// # Errors
/// When a topic does not exist or the broker does not answer within `timeout`.
pub fn partition_views(config: &KafkaConfig, timeout: std::time::Duration) -> Result<Vec<PartitionView>, ClientError> {
    let consumer = bystander(config, &[])?;
    let mut list = TopicPartitionList::new();
    for topic in &config.topics {
        let metadata = explained(&consumer, consumer.fetch_metadata(Some(topic), timeout))?;
        for t in metadata.topics() {
            if let Some(error) = t.error() {
                return Err(KafkaError::MetadataFetch(error.into()).into());
            }
            for p in t.partitions() {
                list.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = explained(&consumer, consumer.committed_offsets(list.clone(), timeout))?;
    let mut views = Vec::new();
    for element in list.elements() {
        let (low, high) =
            explained(&consumer, consumer.fetch_watermarks(element.topic(), element.partition(), timeout))?;
        let group = committed.find_partition(element.topic(), element.partition()).and_then(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some(Offset(o)),
            _ => None,
        });
        views.push(PartitionView {
            tp: TopicPartition::new(element.topic(), element.partition()),
            log_start: Offset(low),
            log_end: Offset(high),
            committed: group,
        });
    }
    Ok(views)
}

/// The group's state and its members' client ids, as the group coordinator reports
/// them (no members: no worker runs). Blocking.
///
/// # Errors
/// When the broker does not answer within `timeout`.
pub fn group_members(config: &KafkaConfig, timeout: std::time::Duration) -> Result<(String, Vec<String>), ClientError> {
    let consumer = bystander(config, &[])?;
    let groups = explained(&consumer, consumer.fetch_group_list(Some(&config.group_id), timeout))?;
    Ok(groups
        .groups()
        .iter()
        .find(|g| g.name() == config.group_id)
        .map(|g| (g.state().to_string(), g.members().iter().map(|m| m.client_id().to_string()).collect()))
        .unwrap_or_else(|| ("Dead".to_string(), Vec::new())))
}

/// For each of `partitions`, the first offset whose message was published at or after
/// `time_ms` (the log end when there is none). Blocking.
///
/// # Errors
/// When the broker does not answer within `timeout`.
pub fn offsets_for_time(
    config: &KafkaConfig,
    partitions: &[PartitionView],
    time_ms: i64,
    timeout: std::time::Duration,
) -> Result<Vec<(TopicPartition, Offset)>, ClientError> {
    let consumer = bystander(config, &[])?;
    let mut list = TopicPartitionList::new();
    for view in partitions {
        list.add_partition_offset(&view.tp.topic, view.tp.partition.0, rdkafka::Offset::Offset(time_ms))?;
    }
    let found = explained(&consumer, consumer.offsets_for_times(list, timeout))?;
    Ok(partitions
        .iter()
        .map(|view| {
            let offset = found.find_partition(&view.tp.topic, view.tp.partition.0).and_then(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(Offset(o)),
                _ => None,
            });
            (view.tp.clone(), offset.unwrap_or(view.log_end))
        })
        .collect())
}
