//! From what the consumer returned to what the loop handles: each message decoded and
//! validated ([`crate::decode`]) into an update, or into its dead letter; the end of a
//! partition and consumer errors passed on. The worker and `replay` receive through
//! here, so both read a message the same way.

use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;

use crate::dead_letter::DeadLetter;
use crate::decode::{DecodeOptions, decode};
use crate::kafka::{self, Generation, SinkConsumer};
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::update::PositionUpdate;

/// What the broker handed over, decoded and detached from the consumer.
pub enum Received {
    /// A valid update, its size in bytes and its Kafka timestamp (ms).
    Update(PositionUpdate, usize, Option<i64>),
    /// A message that is not a valid update, as its dead letter.
    Invalid(DeadLetter),
    /// The end of a partition was reached.
    EndOfPartition,
    /// A consumer error.
    Error(KafkaError),
}

impl Received {
    /// The partition a message came from (`None` for the end of a partition and errors).
    pub fn partition(&self) -> Option<&TopicPartition> {
        match self {
            Received::Update(update, ..) => Some(&update.source.tp),
            Received::Invalid(dead_letter) => Some(&dead_letter.source.tp),
            Received::EndOfPartition | Received::Error(_) => None,
        }
    }
}

/// Below this many messages a chunk is decoded on the loop's thread: handing it to the
/// decoding threads costs more than it saves.
const DECODED_IN_PARALLEL_FROM: usize = 64;

/// `first`, and the messages already waiting behind it that fit in the buffer's
/// `room` ([`kafka::take_ready`]), decoded and validated in order: large chunks on the
/// decoding threads (rayon's pool, one per core), so that the loop's thread is not what
/// bounds how fast a backlog is read. Nothing is reordered: the loop handles the results
/// one by one, in the order the consumer returned the messages.
pub fn receive_ready(
    consumer: &SinkConsumer,
    first: Result<BorrowedMessage<'_>, KafkaError>,
    room: (usize, usize),
    options: &DecodeOptions,
) -> Vec<(Generation, Received)> {
    let (generations, messages): (Vec<_>, Vec<_>) = kafka::take_ready(consumer, first, room).into_iter().unzip();
    generations.into_iter().zip(decode_in_order(messages, options)).collect()
}

/// [`receive`] for each of `messages`, split between the decoding threads when there
/// are enough of them; the results are in the messages' order.
fn decode_in_order(
    mut messages: Vec<Result<BorrowedMessage<'_>, KafkaError>>,
    options: &DecodeOptions,
) -> Vec<Received> {
    if messages.len() < DECODED_IN_PARALLEL_FROM {
        return messages.into_iter().map(|m| receive(m, options)).collect();
    }
    let second = messages.split_off(messages.len() / 2);
    let decode = |part: Vec<Result<BorrowedMessage<'_>, KafkaError>>| -> Vec<Received> {
        part.into_iter().map(|m| receive(m, options)).collect()
    };
    let (mut first, second) = rayon::join(|| decode(messages), || decode(second));
    first.extend(second);
    first
}

/// Decodes and validates what the consumer returned: the one decode step of the worker
/// and of `replay`.
pub fn receive(message: Result<BorrowedMessage<'_>, KafkaError>, options: &DecodeOptions) -> Received {
    let message = match message {
        Ok(m) => m,
        Err(KafkaError::PartitionEOF(_)) => return Received::EndOfPartition,
        Err(error) => return Received::Error(error),
    };
    let at =
        Coordinates { tp: TopicPartition::new(message.topic(), message.partition()), offset: Offset(message.offset()) };
    let size = message.payload_len() + message.key().map_or(0, <[u8]>::len);
    match decode(message.key(), message.payload(), at.clone(), options) {
        Ok(update) => Received::Update(update, size, message.timestamp().to_millis()),
        Err(reason) => Received::Invalid(DeadLetter::new(
            at,
            message.key(),
            message.payload(),
            message.timestamp().to_millis(),
            &reason,
        )),
    }
}
