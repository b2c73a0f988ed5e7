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

/// Messages taken from the consumer at once, decoded, in the order the consumer
/// returned them, each with the assignment generation it was taken at.
pub struct Chunk {
    /// How many chunks were taken before this one: a move of a partition (a seek)
    /// made after it was taken drops its messages of that partition.
    pub taken: u64,
    /// What each message became.
    pub received: Vec<(Generation, Received)>,
    /// Messages and their bytes (key and value), until the chunk is handled.
    pub size: (usize, usize),
}

/// `first`, and the messages already waiting behind it that fit in `room`
/// ([`kafka::take_ready`]), decoded and validated in order on the decoding threads
/// (rayon's pool, one per core) while `beside` runs on the loop's thread: the loop
/// handles the chunk before this one meanwhile, so neither waits for the other.
/// Small chunks are decoded on the loop's thread. Also says whether the consumer's
/// queue was drained (nothing more was waiting).
pub fn receive_beside<R>(
    consumer: &SinkConsumer,
    first: Result<BorrowedMessage<'_>, KafkaError>,
    room: (usize, usize),
    options: &DecodeOptions,
    taken: u64,
    beside: impl FnOnce() -> R,
) -> (Chunk, bool, R) {
    let (messages, drained) = kafka::take_ready(consumer, first, room);
    let size = (messages.len(), messages.iter().map(|(_, m)| kafka::message_size(m)).sum());
    let (generations, messages): (Vec<_>, Vec<_>) = messages.into_iter().unzip();
    let (received, beside) = if messages.len() < DECODED_IN_PARALLEL_FROM {
        let received: Vec<Received> = messages.into_iter().map(|m| receive(m, options)).collect();
        (received, beside())
    } else {
        let mut received = Vec::new();
        let beside = rayon::in_place_scope(|scope| {
            scope.spawn(|_| received = decode_in_order(messages, options));
            beside()
        });
        (received, beside)
    };
    (Chunk { taken, received: generations.into_iter().zip(received).collect(), size }, drained, beside)
}

/// [`receive`] for each of `messages`, split between the decoding threads; the
/// results are in the messages' order.
fn decode_in_order(
    mut messages: Vec<Result<BorrowedMessage<'_>, KafkaError>>,
    options: &DecodeOptions,
) -> Vec<Received> {
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
