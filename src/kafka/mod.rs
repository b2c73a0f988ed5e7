//! Kafka plumbing, bytes only: the group consumer, its rebalance notifications, the
//! messages it has ready ([`take_ready`]), offset commits and their results. What the
//! bytes mean is the decoder's (`crate::decode`, called by the worker); publishing is
//! `produce.rs`, the operator's look-ups `lookup.rs`, client settings per kind
//! `settings.rs`, connection faults `connection.rs`, batches librdkafka cannot read
//! `unreadable.rs`.
//!
//! Invariant kept here: offsets are committed only through [`commit`], which the worker
//! calls for durable offsets; librdkafka's auto-commit and offset store are off. Every
//! commit's result goes back to the worker ([`CommitOutcome`]), so a failed one is
//! retried rather than forgotten. (librdkafka reports the result of an asynchronous
//! manual commit to no one when its event API is used, as rdkafka does: commits are
//! synchronous, on a blocking thread.)

mod connection;
mod lookup;
mod produce;
mod settings;
mod unreadable;

pub use connection::{CONNECT_TIMEOUT, ClientError, ConnectionFault, ConnectionWatch, Watched, until_connected};
pub use lookup::{
    Bystander, PartitionView, bystander, bystander_config, group_members, offsets_for_time, partition_views,
};
pub use produce::{Outgoing, Producer, producer, publish, send_all};
pub use settings::ClientKind;
pub use unreadable::{BatchFault, UnreadableBatch, find as find_unreadable};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tracing::{info, warn};

use crate::config::{KafkaConfig, mask_secrets};
use crate::offsets::{Offset, OffsetMap, TopicPartition};
use crate::status::Progress;

/// Messages taken from the consumer's queue at once, at most: what is already there
/// after the one the loop waited for.
const READY_AT_ONCE: usize = 1024;

/// A message (or the consumer's error) with the assignment generation it was read in.
pub type Taken<'c> = (Generation, Result<BorrowedMessage<'c>, KafkaError>);

/// `first`, and the messages already waiting in the consumer's queue behind it (up to
/// [`READY_AT_ONCE`], and while they fit in `room`: messages and bytes), in the order
/// the consumer returned them, each with its generation; and whether the queue was
/// drained (nothing more was waiting).
pub fn take_ready<'c>(
    consumer: &'c SinkConsumer,
    first: Result<BorrowedMessage<'c>, KafkaError>,
    room: (usize, usize),
) -> (Vec<Taken<'c>>, bool) {
    use futures::FutureExt;
    let (records, bytes) = room;
    let mut taken = message_size(&first);
    let mut messages = Vec::with_capacity(16);
    messages.push((consumer.context().generation(), first));
    while messages.len() < READY_AT_ONCE.min(records) && taken < bytes {
        match consumer.recv().now_or_never() {
            Some(message) => {
                taken += message_size(&message);
                messages.push((consumer.context().generation(), message));
            }
            None => return (messages, true),
        }
    }
    (messages, false)
}

/// A message's key and value bytes (0 for an error).
pub fn message_size(message: &Result<BorrowedMessage<'_>, KafkaError>) -> usize {
    message.as_ref().map_or(0, |m| m.payload_len() + m.key().map_or(0, <[u8]>::len))
}

/// The consumer type the worker uses.
pub type SinkConsumer = StreamConsumer<SinkContext>;

/// The number of assignment changes a consumer had made when a message was taken from
/// it: a message taken at `g` was fetched after the first `g` changes (librdkafka makes
/// them, through [`SinkContext`], while the message is taken; those fetched before a
/// revocation are never returned after it).
pub type Generation = u64;

/// A change of this worker's assignment, in the order librdkafka made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalanced {
    /// These partitions were assigned.
    Assigned(Vec<TopicPartition>),
    /// These partitions were taken away.
    Revoked(Vec<TopicPartition>),
}

/// Receives librdkafka's callbacks: hands assignment changes to the worker, and keeps
/// the broker reachability in [`Health`](crate::status::Health) current.
pub struct SinkContext {
    rebalances: Mutex<Vec<(Generation, Rebalanced)>>,
    generation: AtomicU64,
    progress: Arc<Progress>,
    /// What the consumer's connections did.
    pub watch: Arc<ConnectionWatch>,
}

impl SinkContext {
    /// Assignment changes since the last call, oldest first, each with its number.
    pub fn take_rebalances(&self) -> Vec<(Generation, Rebalanced)> {
        std::mem::take(&mut *self.rebalances.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many assignment changes the consumer has made so far.
    pub fn generation(&self) -> Generation {
        self.generation.load(Ordering::Acquire)
    }

    fn push(&self, event: Rebalanced) {
        let mut pending = self.rebalances.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        pending.push((generation, event));
    }
}

impl ClientContext for SinkContext {
    /// librdkafka's own log lines ([`ConnectionWatch::log`]).
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.watch.log(level, facility, message);
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // Bootstrap entries have negative node ids; a real broker connection is "UP".
        let reachable = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        if reachable {
            self.watch.connected();
        }
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
        self.watch.note(error.rdkafka_error_code(), reason);
        // librdkafka reconnects and retries by itself; what depends on it is retried too.
        let (error, reason) = (mask_secrets(&error.to_string()), mask_secrets(reason));
        warn!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = topic_partitions(list);
                info!(partitions = %describe(&partitions), "partitions revoked");
                self.push(Rebalanced::Revoked(partitions));
            }
            Rebalance::Assign(list) => {
                let partitions = topic_partitions(list);
                info!(partitions = %describe(&partitions), "partitions assigned");
                self.push(Rebalanced::Assigned(partitions));
            }
            Rebalance::Error(error) => warn!(%error, "rebalance error"),
        }
    }
}

/// A configuration for a `kind` client of `config`'s brokers: `defaults`, then the
/// `kafka.librdkafka` pass-through settings that apply to `kind` (the connection
/// settings reach every client). Callers set the keys they manage themselves
/// afterwards. Consumers check the CRC of every batch they read, so a corrupt batch
/// is reported instead of read.
pub fn client_config(config: &KafkaConfig, kind: ClientKind, defaults: &[(&str, &str)]) -> ClientConfig {
    config.librdkafka.remember_secrets();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    if kind == ClientKind::Consumer {
        client.set("check.crcs", "true");
    }
    for (key, value) in defaults {
        client.set(*key, *value);
    }
    for (key, value) in config.librdkafka.0.iter().filter(|(key, _)| kind.takes(key)) {
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
    // Bounds librdkafka's prefetch queue: measured on a 1M-message backlog, a 2 MiB
    // queue reads as fast as a 16 MiB one with 140 MB less resident memory (raise it
    // for brokers far away). Once the queue is full, librdkafka postpones the next fetch
    // by `fetch.queue.backoff.ms` (1 s by default), which would leave the worker idle
    // most of the time while it drains a backlog; a short backoff keeps it busy.
    let defaults = [
        ("queued.max.messages.kbytes", "2048"),
        ("fetch.queue.backoff.ms", "10"),
        ("statistics.interval.ms", STATISTICS_INTERVAL_MS),
    ];
    let mut client = client_config(config, ClientKind::Consumer, &defaults);
    client
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", config.auto_offset_reset.as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set_log_level(RDKafkaLogLevel::Warning);
    let context =
        SinkContext { rebalances: Mutex::default(), generation: AtomicU64::new(0), progress, watch: Arc::default() };
    let consumer: SinkConsumer = client.create_with_context(context)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// The outcome of one offset commit request, per partition: the next offset asked for.
pub type CommitOutcome = Vec<(TopicPartition, Offset, Result<(), String>)>;

/// Commits `next offset = written + 1` for each partition in `written` that this
/// consumer still owns, and waits for the group's answer (blocking: call it off the
/// async threads). A partition no longer owned is reported as not committed.
pub fn commit(consumer: &SinkConsumer, written: &OffsetMap) -> CommitOutcome {
    let outcome = |result: &Result<(), String>| -> CommitOutcome {
        written.iter().map(|(tp, offset)| (tp.clone(), offset.next(), result.clone())).collect()
    };
    let assigned = match consumer.assignment() {
        Ok(assigned) => assigned,
        Err(error) => return outcome(&Err(error.to_string())),
    };
    let mut list = TopicPartitionList::new();
    let mut results = CommitOutcome::new();
    for (tp, offset) in written.iter() {
        if assigned.find_partition(&tp.topic, tp.partition.0).is_none() {
            results.push((tp.clone(), offset.next(), Err("the partition is no longer assigned here".into())));
        } else if let Err(error) =
            list.add_partition_offset(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(offset.next().0))
        {
            results.push((tp.clone(), offset.next(), Err(error.to_string())));
        }
    }
    if list.count() > 0 {
        let result = consumer.commit(&list, CommitMode::Sync).map_err(|e| e.to_string());
        for e in list.elements() {
            if let rdkafka::Offset::Offset(next) = e.offset() {
                results.push((TopicPartition::new(e.topic(), e.partition()), Offset(next), result.clone()));
            }
        }
    }
    results
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

/// The log start (low) and end (high watermark) of `tp` from the last fetch
/// response, if known yet; never waits for the network (librdkafka's cached values).
/// An unknown log start is reported as 0.
pub fn cached_watermarks(consumer: &SinkConsumer, tp: &TopicPartition) -> Option<(Offset, Offset)> {
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
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((Offset(low.max(0)), Offset(high)))
}

/// The consumer's group metadata for a transaction's offsets, but only while it is a
/// member of its group. A consumer that left (for instance after exceeding
/// `max.poll.interval.ms`) has no generation: the broker would accept a transactional
/// offset commit without one, so a stalled worker could commit stale offsets; it gets
/// `None` instead and reads its batch again.
pub fn group_metadata_if_member(consumer: &SinkConsumer) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
    let metadata = consumer.group_metadata()?;
    // Asked after the metadata was taken: a consumer that was a member then but has
    // left since is refused too; one that left before cannot rejoin without a poll.
    is_group_member(consumer).then_some(metadata)
}

/// Whether the consumer is a member of its group now (has a member id and generation).
fn is_group_member(consumer: &SinkConsumer) -> bool {
    // SAFETY: the client pointer is valid while `consumer` lives; the metadata returned
    // is owned here, read only through librdkafka's accessors and destroyed once.
    unsafe {
        let metadata = rdkafka::bindings::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if metadata.is_null() {
            return false;
        }
        let generation = rdkafka::bindings::rd_kafka_consumer_group_metadata_generation_id(metadata);
        let member_id = rdkafka::bindings::rd_kafka_consumer_group_metadata_member_id(metadata);
        let has_member_id = !member_id.is_null() && *member_id != 0;
        rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(metadata);
        generation >= 0 && has_member_id
    }
}

fn topic_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect()
}

fn describe(partitions: &[TopicPartition]) -> String {
    partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_is_built_with_what_production_clusters_need() {
        let native = ClientConfig::new().create_native_config().expect("config");
        let features = native.get("builtin.features").expect("builtin.features");
        let features: Vec<&str> = features.split(',').collect();
        for needed in ["ssl", "sasl_plain", "sasl_scram", "sasl_oauthbearer", "oidc", "gzip", "snappy", "lz4", "zstd"] {
            assert!(features.contains(&needed), "librdkafka lacks {needed}: {features:?}");
        }
    }
}
