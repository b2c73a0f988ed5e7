//! Kafka plumbing: the group consumer, its rebalance notifications and offset commits.
//!
//! Invariant kept here: offsets are committed only through [`commit`], which the worker
//! calls after the Delta commit; librdkafka's auto-commit and offset store are off.

use std::sync::Mutex;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::{info, warn};

use std::sync::Arc;

use crate::config::KafkaConfig;
use crate::offsets::{Offset, OffsetMap, TopicPartition};
use crate::status::Progress;

/// The consumer type the worker uses.
pub type SinkConsumer = StreamConsumer<SinkContext>;

/// Receives librdkafka's callbacks: hands revocations to the worker, and keeps the
/// broker reachability in [`Health`] current.
#[derive(Default)]
pub struct SinkContext {
    revoked: Mutex<Vec<TopicPartition>>,
    progress: Arc<Progress>,
}

impl SinkContext {
    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> Vec<TopicPartition> {
        match self.revoked.lock() {
            Ok(mut revoked) => std::mem::take(&mut *revoked),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        // Bootstrap entries have negative node ids; a real broker connection is "UP".
        let reachable = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        if reachable != self.progress.health.is_broker_reachable() {
            if reachable {
                info!("a Kafka broker is reachable again");
            } else {
                warn!("no Kafka broker is reachable; waiting (librdkafka reconnects by itself)");
            }
        }
        self.progress.health.set_broker_reachable(reachable);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // End of a partition is how the worker learns it is caught up, not a fault.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.progress.health.set_broker_reachable(false);
        }
        // librdkafka reconnects and retries by itself; what depends on it is retried too.
        warn!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = topic_partitions(list);
                info!(partitions = %describe(&partitions), "partitions revoked");
                match self.revoked.lock() {
                    Ok(mut revoked) => revoked.extend(partitions),
                    Err(poisoned) => poisoned.into_inner().extend(partitions),
                }
            }
            Rebalance::Assign(list) => {
                info!(partitions = %describe(&topic_partitions(list)), "partitions assigned");
            }
            Rebalance::Error(error) => warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Harmless for correctness: the table records the same offsets.
            warn!(%error, partitions = offsets.count(), "Kafka offset commit failed; the table's recorded offsets cover it");
        }
    }
}

/// A client configuration for `config`'s brokers: `defaults`, then the
/// `kafka.librdkafka` pass-through (security settings and overrides). Callers set the
/// keys they manage themselves afterwards.
pub fn client_config(config: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in defaults {
        client.set(*key, *value);
    }
    for (key, value) in &config.librdkafka.0 {
        client.set(key, value);
    }
    client
}

/// How often librdkafka reports statistics, from which broker reachability is read.
const STATISTICS_INTERVAL_MS: &str = "1000";

/// Creates the group consumer and subscribes it to `config.topics`; `progress` gets
/// the broker reachability.
///
/// # Errors
/// When librdkafka rejects a setting (the message names it) or the subscription.
pub fn subscribe(config: &KafkaConfig, progress: Arc<Progress>) -> KafkaResult<SinkConsumer> {
    // Bounds librdkafka's prefetch queue; raise it for higher throughput.
    let defaults = [("queued.max.messages.kbytes", "16384"), ("statistics.interval.ms", STATISTICS_INTERVAL_MS)];
    let mut client = client_config(config, &defaults);
    client
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", config.auto_offset_reset.as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set_log_level(RDKafkaLogLevel::Warning);
    let context = SinkContext { revoked: Mutex::default(), progress };
    let consumer: SinkConsumer = client.create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// Commits `next offset = written + 1` for each partition in `written` that this
/// consumer still owns; returns how many partitions were committed.
///
/// # Errors
/// When the commit request cannot be made (with [`CommitMode::Sync`], also when the
/// broker refuses it).
pub fn commit(consumer: &SinkConsumer, written: &OffsetMap, mode: CommitMode) -> KafkaResult<usize> {
    let assigned = consumer.assignment()?;
    let mut list = TopicPartitionList::new();
    for (tp, offset) in written.iter() {
        if assigned.find_partition(&tp.topic, tp.partition.0).is_some() {
            list.add_partition_offset(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(offset.next().0))?;
        }
    }
    if list.count() == 0 {
        return Ok(0);
    }
    consumer.commit(&list, mode)?;
    Ok(list.count())
}

/// The group's committed next offset of each of `partitions` that has one.
///
/// # Errors
/// When the broker cannot be asked within `timeout`.
pub fn committed(
    consumer: &SinkConsumer,
    partitions: &[TopicPartition],
    timeout: std::time::Duration,
) -> KafkaResult<Vec<(TopicPartition, Offset)>> {
    let mut list = TopicPartitionList::new();
    for tp in partitions {
        list.add_partition(&tp.topic, tp.partition.0);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((TopicPartition::new(e.topic(), e.partition()), Offset(o))),
            _ => None,
        })
        .collect())
}

/// The partitions currently assigned to this consumer.
///
/// # Errors
/// When librdkafka cannot report the assignment.
pub fn assignment(consumer: &SinkConsumer) -> KafkaResult<Vec<TopicPartition>> {
    Ok(topic_partitions(&consumer.assignment()?))
}

/// The high watermark of `tp` from the last fetch response, if known yet; never
/// waits for the network (librdkafka's cached value).
pub fn cached_high_watermark(consumer: &SinkConsumer, tp: &TopicPartition) -> Option<Offset> {
    let topic = std::ffi::CString::new(tp.topic.as_str()).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives, the topic is a valid
    // NUL-terminated string for the duration of the call, and librdkafka only writes
    // the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            tp.partition.0,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(Offset(high))
}

/// Moves the fetch position of `tp` forward to `offset`.
///
/// # Errors
/// When the partition is not being fetched yet; skipping then covers it.
pub fn seek(consumer: &SinkConsumer, tp: &TopicPartition, offset: Offset) -> Result<(), KafkaError> {
    consumer.seek(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(offset.0), std::time::Duration::ZERO)
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect()
}

fn describe(partitions: &[TopicPartition]) -> String {
    partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// One message to publish.
pub struct Outgoing<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Key bytes, if any.
    pub key: Option<&'a [u8]>,
    /// Value bytes, if any.
    pub value: Option<&'a [u8]>,
    /// Headers, if any.
    pub headers: Option<rdkafka::message::OwnedHeaders>,
}

/// Publishes `messages` with an idempotent producer and waits until all are
/// acknowledged, in order per partition.
///
/// # Errors
/// The first delivery failure.
pub async fn publish<'a>(config: &KafkaConfig, messages: impl IntoIterator<Item = Outgoing<'a>>) -> KafkaResult<usize> {
    use futures::StreamExt;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        client_config(config, &[("linger.ms", "5"), ("queue.buffering.max.messages", "1000000")])
            .set("enable.idempotence", "true")
            .create()?;
    let deliveries = futures::stream::iter(messages.into_iter().map(|m| {
        let producer = &producer;
        async move {
            let mut record = FutureRecord::<[u8], [u8]>::to(m.topic);
            if let Some(key) = m.key {
                record = record.key(key);
            }
            if let Some(value) = m.value {
                record = record.payload(value);
            }
            if let Some(headers) = m.headers {
                record = record.headers(headers);
            }
            producer.send(record, std::time::Duration::from_secs(30)).await.map_err(|(error, _)| error)
        }
    }))
    .buffered(10_000);
    let results: Vec<_> = deliveries.collect().await;
    let mut sent = 0;
    for result in results {
        result?;
        sent += 1;
    }
    Ok(sent)
}
