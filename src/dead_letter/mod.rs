//! Dead letters: messages that cannot become position updates, kept with their
//! original bytes, their coordinates and a reason a person can act on — in a Delta table
//! ([`table`]) or a Kafka topic ([`topic`]).
//!
//! Invariant kept here: a rejected message is never dropped. It travels in the batch
//! like a valid update, and its offset is committed only once its dead letter is
//! durable, exactly once (see the two destinations for how).

pub mod review;
pub mod table;
pub mod topic;

use crate::decode::Rejection;
use crate::offsets::Coordinates;

pub use crate::status::ReasonCounts;
pub use table::DeadLetterTable;
pub use topic::DeadLetterTopic;

/// One rejected message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Where the message is in Kafka.
    pub source: Coordinates,
    /// The Kafka key, byte for byte.
    pub key: Option<Vec<u8>>,
    /// The Kafka value, byte for byte.
    pub value: Option<Vec<u8>>,
    /// The message's Kafka timestamp, epoch milliseconds.
    pub kafka_timestamp_millis: Option<i64>,
    /// When it was rejected, epoch microseconds.
    pub rejected_at_micros: i64,
    /// The stable reason category ([`Rejection::category`]).
    pub category: String,
    /// What is wrong, for a person.
    pub reason: String,
}

impl DeadLetter {
    /// The dead letter of a message rejected now for `reason`.
    pub fn new(
        source: Coordinates,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        kafka_timestamp_millis: Option<i64>,
        reason: &Rejection,
    ) -> Self {
        Self {
            source,
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            kafka_timestamp_millis,
            rejected_at_micros: chrono::Utc::now().timestamp_micros(),
            category: reason.category().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Bytes held, for the buffer's memory bound.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + self.reason.len()
    }
}

/// A readable preview of message bytes: UTF-8 text (lossy) cut at `max_chars`.
pub fn preview(bytes: Option<&[u8]>, max_chars: usize) -> String {
    match bytes {
        None => "(none)".to_string(),
        Some(b) => {
            let text = String::from_utf8_lossy(b);
            match text.char_indices().nth(max_chars) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None => text.into_owned(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_any_bytes() {
        assert_eq!(preview(Some(b"\xff{\"a\""), 3), "\u{fffd}{\"…");
        assert_eq!(preview(None, 3), "(none)");
    }
}
