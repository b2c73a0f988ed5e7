//! The dead-letter Kafka topic: each rejected message re-published with its original
//! key, value and timestamp; the reason and coordinates travel in headers named as
//! Kafka Connect names them (`__connect.errors.topic`, `…partition`, `…offset`,
//! `…exception.message`), plus `position-sink.errors.category`.
//!
//! Invariant kept here: exactly once for `read_committed` readers. A flush's dead
//! letters and the consumer offsets it covers are committed in one Kafka transaction,
//! after the positions table's commit: a crash before that commit aborts the dead
//! letters together with the offsets, and the restarted worker re-reads from the
//! offsets that were committed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::kafka::{ClientError, ClientKind, Watched};

use super::DeadLetter;
use crate::config::{DeadLetterConfig, KafkaConfig};
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};

/// Header carrying the source topic.
pub const HEADER_TOPIC: &str = "__connect.errors.topic";
/// Header carrying the source partition (decimal text).
pub const HEADER_PARTITION: &str = "__connect.errors.partition";
/// Header carrying the source offset (decimal text).
pub const HEADER_OFFSET: &str = "__connect.errors.offset";
/// Header carrying the reason.
pub const HEADER_REASON: &str = "__connect.errors.exception.message";
/// Header carrying the reason category.
pub const HEADER_CATEGORY: &str = "position-sink.errors.category";
/// Header carrying the rejection time (epoch microseconds, decimal text).
pub const HEADER_REJECTED_AT: &str = "position-sink.errors.rejected_at";

/// Failures of the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The transactional producer could not be created or initialised.
    #[error(
        "cannot set up the dead-letter producer for topic {topic}: {source}. \
         Check kafka.brokers, kafka.librdkafka and that the brokers allow transactions"
    )]
    Setup {
        /// The dead-letter topic.
        topic: String,
        /// Cause.
        source: ClientError,
    },
    /// The dead-letter topic does not exist.
    #[error("the dead-letter topic {0} does not exist: create it, or set dead_letter.topic to an existing topic")]
    Missing(String),
    /// The transaction failed and was aborted: neither the dead letters nor the offsets
    /// are visible; the messages must be read again.
    #[error("the dead-letter transaction was aborted: {0}")]
    Aborted(KafkaError),
    /// The producer cannot continue (fenced by a newer instance, or a fatal error).
    #[error("the dead-letter producer failed fatally: {0}; restart the worker")]
    Fatal(KafkaError),
}

/// A transactional producer for the dead-letter topic.
pub struct DeadLetterTopic {
    producer: FutureProducer<Watched>,
    topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for DeadLetterTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterTopic").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl DeadLetterTopic {
    /// Creates the transactional producer, checks the topic exists and initialises
    /// transactions (aborting any this instance left open).
    ///
    /// # Errors
    /// [`TopicError::Setup`] or [`TopicError::Missing`].
    pub async fn connect(kafka: &KafkaConfig, config: &DeadLetterConfig) -> Result<Arc<Self>, TopicError> {
        let topic = config.topic.clone();
        let setup = |source: KafkaError| TopicError::Setup { topic: topic.clone(), source: source.into() };
        let timeout_ms = config.transaction_timeout.as_millis().to_string();
        // A fresh id per process: a crashed worker's open transaction is aborted by the
        // broker after transaction_timeout; consumer-group fencing (KIP-447) guards the
        // offsets it carried.
        let transactional_id = format!("position-sink/{}/dead-letters/{}", kafka.group_id, instance_id());
        let watched = Watched::default();
        let watch = watched.watch.clone();
        let producer: FutureProducer<Watched> =
            crate::kafka::client_config(kafka, ClientKind::Producer, &[("linger.ms", "5")])
                .set("transactional.id", &transactional_id)
                .set("enable.idempotence", "true")
                .set("transaction.timeout.ms", &timeout_ms)
                .set("message.timeout.ms", &timeout_ms)
                .set("socket.timeout.ms", &timeout_ms)
                .create_with_context(watched)
                .map_err(setup)?;
        let timeout = config.transaction_timeout;
        let explain = |source: KafkaError| TopicError::Setup { topic: topic.clone(), source: watch.explain(source) };
        let metadata = blocking({
            let producer = producer.clone();
            let topic = topic.clone();
            let watch = watch.clone();
            move || {
                crate::kafka::until_connected(&watch, timeout, |left| {
                    producer.client().fetch_metadata(Some(&topic), left)
                })
                .map_err(|e| match e {
                    ClientError::Kafka(e) => e,
                    ClientError::Connection(_) => KafkaError::Canceled,
                })
            }
        })
        .await
        .map_err(explain)?;
        let exists =
            metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            return Err(TopicError::Missing(topic));
        }
        blocking({
            let producer = producer.clone();
            move || producer.init_transactions(timeout)
        })
        .await
        .map_err(explain)?;
        Ok(Arc::new(Self { producer, topic, timeout }))
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes `dead_letters` and commits `offsets` (next = offset + 1) for the
    /// consumer group of `group`, in one transaction. Returns how many were published.
    ///
    /// # Errors
    /// [`TopicError::Aborted`] when the transaction failed and was aborted (nothing is
    /// visible); [`TopicError::Fatal`] when the producer cannot continue.
    pub async fn publish(
        self: &Arc<Self>,
        dead_letters: &[DeadLetter],
        offsets: &OffsetMap,
        group: Arc<ConsumerGroupMetadata>,
    ) -> Result<usize, TopicError> {
        self.begin().await?;
        match self.send(dead_letters, offsets, group, true).await {
            Ok(()) => Ok(dead_letters.len()),
            Err(error) if is_fatal(&error) => Err(TopicError::Fatal(error)),
            Err(error) => {
                let this = Arc::clone(self);
                let timeout = self.timeout;
                match blocking(move || this.producer.abort_transaction(timeout)).await {
                    Ok(()) => Err(TopicError::Aborted(error)),
                    Err(abort_error) => Err(TopicError::Fatal(abort_error)),
                }
            }
        }
    }

    /// Fault injection (feature `fault-injection`): sends the dead letters and offsets like [`Self::publish`], then
    /// leaves the transaction open, as a crash before the commit would.
    ///
    /// # Errors
    /// When sending fails.
    #[cfg(feature = "fault-injection")]
    pub async fn publish_without_commit(
        self: &Arc<Self>,
        dead_letters: &[DeadLetter],
        offsets: &OffsetMap,
        group: Arc<ConsumerGroupMetadata>,
    ) -> Result<(), TopicError> {
        self.begin().await?;
        self.send(dead_letters, offsets, group, false).await.map_err(classify)
    }

    async fn begin(self: &Arc<Self>) -> Result<(), TopicError> {
        let this = Arc::clone(self);
        blocking(move || this.producer.begin_transaction()).await.map_err(classify)
    }

    /// Sends the dead letters and the offsets in the open transaction, and commits it
    /// if `commit`.
    async fn send(
        self: &Arc<Self>,
        dead_letters: &[DeadLetter],
        offsets: &OffsetMap,
        group: Arc<ConsumerGroupMetadata>,
        commit: bool,
    ) -> Result<(), KafkaError> {
        let sends = dead_letters.iter().map(|d| {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers(d));
            if let Some(key) = &d.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &d.value {
                record = record.payload(value.as_slice());
            }
            if let Some(ts) = d.kafka_timestamp_millis {
                record = record.timestamp(ts);
            }
            self.producer.send(record, self.timeout)
        });
        for delivery in futures::future::join_all(sends).await {
            delivery.map_err(|(error, _)| error)?;
        }
        let mut list = TopicPartitionList::new();
        for (tp, offset) in offsets.iter() {
            list.add_partition_offset(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(offset.next().0))?;
        }
        let this = Arc::clone(self);
        let timeout = self.timeout;
        blocking(move || {
            this.producer.send_offsets_to_transaction(&list, &group, timeout)?;
            if commit { this.producer.commit_transaction(timeout) } else { Ok(()) }
        })
        .await
    }
}

fn headers(d: &DeadLetter) -> OwnedHeaders {
    let partition = d.source.tp.partition.0.to_string();
    let offset = d.source.offset.0.to_string();
    let rejected_at = d.rejected_at_micros.to_string();
    OwnedHeaders::new()
        .insert(Header { key: HEADER_TOPIC, value: Some(d.source.tp.topic.as_str()) })
        .insert(Header { key: HEADER_PARTITION, value: Some(partition.as_str()) })
        .insert(Header { key: HEADER_OFFSET, value: Some(offset.as_str()) })
        .insert(Header { key: HEADER_REASON, value: Some(d.reason.as_str()) })
        .insert(Header { key: HEADER_CATEGORY, value: Some(d.category.as_str()) })
        .insert(Header { key: HEADER_REJECTED_AT, value: Some(rejected_at.as_str()) })
}

fn is_fatal(error: &KafkaError) -> bool {
    matches!(error, KafkaError::Transaction(e) if e.is_fatal())
}

fn classify(error: KafkaError) -> TopicError {
    if is_fatal(&error) { TopicError::Fatal(error) } else { TopicError::Aborted(error) }
}

/// Runs one of librdkafka's blocking transactional calls off the async threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(call).await.unwrap_or_else(|e| {
        Err(KafkaError::Canceled).inspect_err(|_| tracing::error!(error = %e, "blocking Kafka call failed"))
    })
}

fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_string());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{host}-{}-{nanos}", std::process::id())
}

/// Reads the committed dead letters of `topic`: the newest `limit` per partition,
/// optionally only those of `category`.
///
/// # Errors
/// When the topic cannot be read.
pub fn read(
    kafka: &KafkaConfig,
    topic: &str,
    category: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, ClientError> {
    let consumer: BaseConsumer<Watched> = crate::kafka::client_config(kafka, ClientKind::Consumer, &[])
        .set("group.id", format!("position-sink-dead-letter-reader-{}", instance_id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create_with_context(Watched::default())?;
    let timeout = Duration::from_secs(30);
    let watch = consumer.context().watch.clone();
    let metadata = crate::kafka::until_connected(&watch, timeout, |left| {
        let fetched = consumer.fetch_metadata(Some(topic), left);
        // librdkafka hands its log lines and errors over on poll: they say why not.
        let _ = consumer.poll(Duration::ZERO);
        fetched
    })?;
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in metadata.topics().iter().filter(|t| t.name() == topic).flat_map(|t| t.partitions()) {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
        if high > low {
            list.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low.max(high - limit as i64)))?;
            ends.push((p.id(), high));
        }
    }
    consumer.assign(&list)?;
    let mut found = Vec::new();
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let position = consumer.position()?;
        let done = ends.iter().all(|(p, high)| match position.find_partition(topic, *p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(o)) => o >= *high,
            _ => false,
        });
        if done {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                if let Some(d) = from_message(&message)
                    && category.is_none_or(|c| c == d.category)
                {
                    found.push(d);
                }
            }
            Some(Err(error)) => return Err(watch.explain(error)),
            None => {}
        }
    }
    found.sort_by_key(|d| std::cmp::Reverse(d.rejected_at_micros));
    Ok(found)
}

fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<DeadLetter> {
    let headers = message.headers()?;
    let get = |name: &str| {
        headers.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
    };
    Some(DeadLetter {
        source: Coordinates {
            tp: TopicPartition::new(get(HEADER_TOPIC)?, get(HEADER_PARTITION)?.parse().ok()?),
            offset: Offset(get(HEADER_OFFSET)?.parse().ok()?),
        },
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        kafka_timestamp_millis: message.timestamp().to_millis(),
        rejected_at_micros: get(HEADER_REJECTED_AT).and_then(|t| t.parse().ok()).unwrap_or(0),
        category: get(HEADER_CATEGORY).unwrap_or_default(),
        reason: get(HEADER_REASON).unwrap_or_default(),
    })
}
