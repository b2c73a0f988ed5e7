//! From what the consumer returned to what the loop handles: each message decoded and
//! validated ([`crate::decode`]) into an update, or into its dead letter; the end of a
//! partition and consumer errors passed on. The worker and `replay` receive through
//! here, so both read a message the same way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

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
/// handles the chunk before this one meanwhile, then decodes what is left of this one
/// beside the pool, so no thread waits while another works. Small chunks are decoded
/// on the loop's thread. Also says whether the consumer's queue was drained (nothing
/// more was waiting).
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
        let parts = Parts::of(messages);
        let beside = rayon::in_place_scope(|scope| {
            let threads = rayon::current_num_threads();
            for _ in 0..threads {
                scope.spawn(|_| parts.decode(options));
            }
            let beside = beside();
            parts.decode(options);
            beside
        });
        (parts.received(), beside)
    };
    (Chunk { taken, received: generations.into_iter().zip(received).collect(), size }, drained, beside)
}

/// Messages in parts of [`PART`], each decoded by whichever thread claims it first.
struct Parts<'c> {
    parts: Vec<Mutex<Part<'c>>>,
    next: AtomicUsize,
}

/// Messages decoded at once by one thread.
const PART: usize = 64;

enum Part<'c> {
    Taken(Vec<Result<BorrowedMessage<'c>, KafkaError>>),
    Decoded(Vec<Received>),
}

impl<'c> Parts<'c> {
    fn of(mut messages: Vec<Result<BorrowedMessage<'c>, KafkaError>>) -> Self {
        let mut parts = Vec::with_capacity(messages.len().div_ceil(PART));
        while !messages.is_empty() {
            let rest = messages.split_off(PART.min(messages.len()));
            parts.push(Mutex::new(Part::Taken(std::mem::replace(&mut messages, rest))));
        }
        Self { parts, next: AtomicUsize::new(0) }
    }

    /// Decodes parts no thread has claimed yet, until none is left.
    fn decode(&self, options: &DecodeOptions) {
        while let Some(part) = self.parts.get(self.next.fetch_add(1, Ordering::Relaxed)) {
            let mut part = part.lock().unwrap_or_else(PoisonError::into_inner);
            if let Part::Taken(messages) = &mut *part {
                let decoded = std::mem::take(messages).into_iter().map(|m| receive(m, options)).collect();
                *part = Part::Decoded(decoded);
            }
        }
    }

    /// What the messages became, in their order (every part decoded).
    fn received(self) -> Vec<Received> {
        let mut received = Vec::with_capacity(self.parts.len() * PART);
        for part in self.parts {
            match part.into_inner().unwrap_or_else(PoisonError::into_inner) {
                Part::Decoded(decoded) => received.extend(decoded),
                Part::Taken(_) => unreachable!("every part is claimed and decoded before the scope ends"),
            }
        }
        received
    }
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
