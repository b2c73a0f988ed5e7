//! Batches Kafka delivered that the client cannot read: a corrupt batch (its CRC does
//! not match), compressed data that does not decompress, a codec or message format the
//! client does not have, a message larger than it may fetch.
//!
//! librdkafka reports such a batch as a consumer error without its partition (rdkafka
//! keeps only the error code) and, for a CRC failure, goes on with the next batch. The
//! worker therefore reads every assigned partition again from where it is durable
//! (nothing read after the error is trusted), and [`find`] names the batch by reading
//! each partition alone: an error then belongs to the one partition read.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{ClientError, Watched};
use crate::config::KafkaConfig;
use crate::offsets::{Offset, TopicPartition};

/// Why a batch cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFault {
    /// Its CRC does not match its bytes.
    Corrupt,
    /// Its compressed data does not decompress.
    Decompression,
    /// A codec or message format the client does not have.
    Unsupported,
    /// A message larger than the client may fetch.
    TooLarge,
}

impl BatchFault {
    /// The fault `error` reports, if it is one of a batch that cannot be read.
    pub fn of(error: &KafkaError) -> Option<BatchFault> {
        match error {
            KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code) => match code {
                RDKafkaErrorCode::BadMessage => Some(BatchFault::Corrupt),
                RDKafkaErrorCode::BadCompression => Some(BatchFault::Decompression),
                RDKafkaErrorCode::NotImplemented => Some(BatchFault::Unsupported),
                RDKafkaErrorCode::MessageSizeTooLarge => Some(BatchFault::TooLarge),
                _ => None,
            },
            _ => None,
        }
    }

    /// What is wrong with the batch, in a phrase.
    pub fn cause(self) -> &'static str {
        match self {
            BatchFault::Corrupt => {
                "it fails its CRC check: the batch is corrupt in the broker's log or was damaged on the way"
            }
            BatchFault::Decompression => "its compressed data cannot be decompressed: the batch is corrupt",
            BatchFault::Unsupported => "it uses a compression codec or message format this client cannot read",
            BatchFault::TooLarge => "it holds a message larger than the client may fetch",
        }
    }

    /// What an operator can do about it.
    pub fn fix(self) -> &'static str {
        match self {
            BatchFault::Corrupt | BatchFault::Decompression => {
                "Repair the partition on the broker (from a healthy replica, or by restoring the topic); to give the \
                 batch up knowingly, stop the workers, move the group's offset past it (kafka-consumer-groups \
                 --reset-offsets --to-offset) and start them again"
            }
            BatchFault::Unsupported => {
                "Run a position-sink build that reads the producer's codec (release builds read gzip, snappy, lz4 and \
                 zstd), or have the producer use one of those"
            }
            BatchFault::TooLarge => {
                "Raise kafka.librdkafka \"receive.message.max.bytes\" (and \"fetch.max.bytes\") above the largest \
                 message of the topic"
            }
        }
    }
}

/// A batch found that cannot be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableBatch {
    /// Its partition.
    pub tp: TopicPartition,
    /// The first offset of the partition not read: the batch starts here, or just after
    /// (past offsets a compacted or transactional log does not hold).
    pub offset: Offset,
    /// Why it cannot be read.
    pub fault: BatchFault,
}

/// How long [`find`] reads one partition before calling it readable.
const READ_ONE_FOR: Duration = Duration::from_secs(5);

/// Reads each of `partitions` alone from its offset, as far as the batch that cannot be
/// read, and names the first such batch; `None` when each reads to its end (the fault
/// was transient). Blocking.
///
/// # Errors
/// When no client can be made or connected.
pub fn find(
    config: &KafkaConfig,
    partitions: &[(TopicPartition, Offset)],
) -> Result<Option<UnreadableBatch>, ClientError> {
    for (tp, from) in partitions {
        let consumer: super::Bystander = super::bystander_config(config, &[("enable.partition.eof", "true")])
            .create_with_context(Watched::default())?;
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&tp.topic, tp.partition.0, rdkafka::Offset::Offset(from.0))?;
        consumer.assign(&list)?;
        let mut next = *from;
        let deadline = Instant::now() + READ_ONE_FOR;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => next = Offset(message.offset() + 1),
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(error)) => {
                    if let Some(fault) = BatchFault::of(&error) {
                        return Ok(Some(UnreadableBatch { tp: tp.clone(), offset: next, fault }));
                    }
                    if let Some(fault) = consumer.context().watch.fatal() {
                        return Err(ClientError::Connection(fault));
                    }
                }
                None => {}
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errors_of_a_batch_that_cannot_be_read_are_recognised() {
        let of = |code| BatchFault::of(&KafkaError::MessageConsumption(code));
        assert_eq!(of(RDKafkaErrorCode::BadMessage), Some(BatchFault::Corrupt));
        assert_eq!(of(RDKafkaErrorCode::BadCompression), Some(BatchFault::Decompression));
        assert_eq!(of(RDKafkaErrorCode::NotImplemented), Some(BatchFault::Unsupported));
        assert_eq!(of(RDKafkaErrorCode::BrokerTransportFailure), None, "a connection failure is retried");
        assert_eq!(BatchFault::of(&KafkaError::PartitionEOF(0)), None);
    }
}
