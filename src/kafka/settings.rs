//! Which of the `kafka.librdkafka` pass-through settings reach which kind of client.
//!
//! Every Kafka client the program creates gets the same connection settings (brokers,
//! TLS, SASL, timeouts); a setting that applies to one kind of client only reaches
//! only that kind, so a producer never warns about a consumer's `session.timeout.ms`.
//! The scopes are librdkafka's own (its CONFIGURATION.md, column C/P).

/// The kinds of client the program creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Consumers: the group's worker, and the look-up and reading clients of the
    /// operator's commands.
    Consumer,
    /// Producers: the dead-letter topic's transactional producer, `dead-letters
    /// republish` and the sample publisher.
    Producer,
}

/// librdkafka's consumer-only properties (global and topic-level).
const CONSUMER_ONLY: &[&str] = &[
    "auto.commit.enable",
    "auto.commit.interval.ms",
    "auto.offset.reset",
    "check.crcs",
    "consume.callback.max.messages",
    "coordinator.query.interval.ms",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "isolation.level",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "partition.assignment.strategy",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "session.timeout.ms",
];

/// librdkafka's producer-only properties (global and topic-level).
const PRODUCER_ONLY: &[&str] = &[
    "acks",
    "batch.num.messages",
    "batch.size",
    "compression.codec",
    "compression.level",
    "compression.type",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "enable.idempotence",
    "linger.ms",
    "message.send.max.retries",
    "message.timeout.ms",
    "partitioner",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queuing.strategy",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "sticky.partitioning.linger.ms",
    "transaction.timeout.ms",
    "transactional.id",
];

impl ClientKind {
    /// Whether the librdkafka property `key` applies to this kind of client.
    pub fn takes(self, key: &str) -> bool {
        let key = key.trim();
        match self {
            ClientKind::Consumer => !PRODUCER_ONLY.contains(&key),
            ClientKind::Producer => !CONSUMER_ONLY.contains(&key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_of_one_kind_of_client_reaches_only_that_kind() {
        assert!(ClientKind::Consumer.takes("session.timeout.ms"));
        assert!(!ClientKind::Producer.takes("session.timeout.ms"));
        assert!(ClientKind::Producer.takes("linger.ms"));
        assert!(!ClientKind::Consumer.takes("linger.ms"));
    }

    #[test]
    fn connection_settings_reach_every_kind() {
        for key in ["security.protocol", "sasl.mechanisms", "sasl.password", "ssl.ca.location", "socket.timeout.ms"] {
            assert!(ClientKind::Consumer.takes(key) && ClientKind::Producer.takes(key), "{key}");
        }
    }
}
