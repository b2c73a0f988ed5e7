//! Kafka coordinates and the offset bookkeeping that ties Kafka to the Delta log.
//!
//! Invariant kept here: the *application transaction id* (`txn` app id) that records
//! "everything up to offset N of this partition is in the table" is derived from the
//! consumer group, topic and partition only, so every worker of a group agrees on it.

use std::collections::BTreeMap;
use std::fmt;

/// A Kafka partition number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub i32);

/// A Kafka offset of one message within its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub i64);

impl Offset {
    /// The offset that follows this one: what Kafka stores as "committed".
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

/// A topic and partition: the unit of ordering, assignment and offset tracking.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition within the topic.
    pub partition: Partition,
}

impl TopicPartition {
    /// Builds a topic-partition pair.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Self { topic: topic.into(), partition: Partition(partition) }
    }

    /// The Delta application-transaction id under which the last offset of this
    /// partition written by `group_id` is recorded.
    pub fn app_id(&self, group_id: &str) -> String {
        format!("position-sink/{group_id}/{}/{}", self.topic, self.partition.0)
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition.0)
    }
}

/// Where one message came from: enough for a person to find it with any Kafka tool.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Coordinates {
    /// Topic and partition.
    pub tp: TopicPartition,
    /// Offset within the partition.
    pub offset: Offset,
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "topic {} partition {} offset {}", self.tp.topic, self.tp.partition.0, self.offset.0)
    }
}

impl std::str::FromStr for Coordinates {
    type Err = String;

    /// Parses `topic:partition:offset` (topic names cannot contain `:`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = || format!("{text:?} is not topic:partition:offset, e.g. positions:3:1042");
        let mut parts = text.rsplitn(3, ':');
        let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(usage());
        };
        let partition = partition.parse().map_err(|_| usage())?;
        let offset = offset.parse().map_err(|_| usage())?;
        if topic.is_empty() {
            return Err(usage());
        }
        Ok(Coordinates { tp: TopicPartition::new(topic, partition), offset: Offset(offset) })
    }
}

/// The highest offset seen per partition; merging keeps the maximum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetMap(BTreeMap<TopicPartition, Offset>);

impl OffsetMap {
    /// Records that `offset` of `tp` was consumed.
    pub fn observe(&mut self, tp: &TopicPartition, offset: Offset) {
        match self.0.get_mut(tp) {
            Some(seen) => *seen = (*seen).max(offset),
            None => {
                self.0.insert(tp.clone(), offset);
            }
        }
    }

    /// Forgets the given partitions (they were revoked).
    pub fn remove(&mut self, tp: &TopicPartition) {
        self.0.remove(tp);
    }

    /// The highest offset seen of `tp`.
    pub fn get(&self, tp: &TopicPartition) -> Option<Offset> {
        self.0.get(tp).copied()
    }

    /// Iterates partitions in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, Offset)> {
        self.0.iter().map(|(tp, o)| (tp, *o))
    }

    /// Whether no offset was observed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of partitions.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_keeps_the_highest_offset() {
        let tp = TopicPartition::new("t", 0);
        let mut map = OffsetMap::default();
        map.observe(&tp, Offset(5));
        map.observe(&tp, Offset(3));
        assert_eq!(map.get(&tp), Some(Offset(5)));
    }

    #[test]
    fn coordinates_parse_from_topic_partition_offset() {
        let c: Coordinates = "pos.v1:3:1042".parse().unwrap();
        assert_eq!(c, Coordinates { tp: TopicPartition::new("pos.v1", 3), offset: Offset(1042) });
        assert!("pos:3".parse::<Coordinates>().is_err());
        assert!(":1:2".parse::<Coordinates>().is_err());
        assert!("pos:x:2".parse::<Coordinates>().is_err());
    }

    #[test]
    fn app_id_names_group_topic_and_partition() {
        assert_eq!(TopicPartition::new("pos", 3).app_id("g"), "position-sink/g/pos/3");
    }
}
