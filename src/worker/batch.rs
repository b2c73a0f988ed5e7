//! The flush buffer: accepted updates collected between flushes, deduplicated per row
//! key with last-write-wins, the dead letters of rejected messages, and the offsets
//! they cover.
//!
//! Invariant kept here: a [`Batch`] covers, for each partition it names, every message
//! consumed from that partition since the previous batch up to its offset — so once the
//! batch is durable, that offset + 1 may be committed. Memory is bounded by the caller
//! checking [`Buffer::is_full`] before reading more. The limits are used twice: a flush
//! is due early once the messages *read* reach them ([`Buffer::is_due`]), and reading
//! stops once what the buffer *holds* (one update per key, the dead letters) reaches
//! them, so a backlog of updates to the same keys is read on while a flush runs.

use std::collections::HashMap;

use crate::dead_letter::DeadLetter;
use crate::history::Entry;
use crate::offsets::{Offset, OffsetMap, TopicPartition};
use crate::table::WriteSet;
use crate::update::{KeyColumn, PositionUpdate, RowKey};

/// When a buffer's flush is due, and when it is full.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Messages read (a flush is due), or rows (one per key) and dead letters held (full).
    pub max_records: usize,
    /// Payload bytes of the messages read (due), or held (full): the newest per key and
    /// the dead letters.
    pub max_bytes: usize,
}

impl Limits {
    /// The limits `flush` sets.
    pub fn of(flush: &crate::config::FlushConfig) -> Self {
        Self { max_records: flush.max_records, max_bytes: flush.max_bytes }
    }
}

/// Updates gathered for the next flush.
#[derive(Debug)]
pub struct Buffer {
    keys: Vec<KeyColumn>,
    limits: Limits,
    /// Where each key's newest update is in `rows`: a small entry (the conid, the number
    /// of the key's other columns' values, a row number), so the map stays in cache
    /// and an update is moved once, into `rows`.
    slots: HashMap<(i64, u32), u32, foldhash::fast::RandomState>,
    /// The other key columns' values of the keys (when the key has more than `conid`),
    /// by number (from 1; 0: none).
    rests: HashMap<RowKey, u32, foldhash::fast::RandomState>,
    /// The newest update per key.
    rows: Vec<PositionUpdate>,
    /// The payload size of each of `rows`.
    sizes: Vec<usize>,
    /// Every accepted update, in consumption order, with its payload's size: kept only
    /// when the history is written.
    every: Option<Vec<(Entry, usize)>>,
    dead_letters: Vec<DeadLetter>,
    offsets: OffsetMap,
    messages: usize,
    /// Payload bytes of the messages read.
    read_bytes: usize,
    /// Payload bytes held: of the updates in `rows` and of the dead letters.
    bytes: usize,
    kafka_times: KafkaTimes,
}

/// What one flush writes: the winning update per row key and the offsets covered.
#[derive(Debug, Default)]
pub struct Batch {
    /// One update per row key, in no particular order.
    pub rows: Vec<PositionUpdate>,
    /// Every rejected message, in consumption order.
    pub dead_letters: Vec<DeadLetter>,
    /// The highest consumed offset per partition (valid or not).
    pub offsets: OffsetMap,
    /// Messages consumed into this batch, before dedup.
    pub messages: usize,
    /// Kafka timestamps of the valid messages, for the end-to-end latency metric.
    pub kafka_times: KafkaTimes,
    /// Every accepted update in consumption order, for the history (empty when it is off).
    pub history: Vec<Entry>,
    /// The time written as `ingested_at` into every output of this batch (µs since the
    /// epoch): when the batch was taken for its flush.
    pub ingested_at_micros: i64,
}

impl<'a> From<&'a Batch> for WriteSet<'a> {
    /// What the positions table is given of a batch: its rows and the offsets it covers.
    fn from(batch: &'a Batch) -> Self {
        WriteSet { rows: &batch.rows, offsets: &batch.offsets, ingested_at_micros: batch.ingested_at_micros }
    }
}

/// Kafka timestamps of messages, counted per 100 ms: bounded by the time the messages
/// span, not by how many there are.
#[derive(Debug, Default)]
pub struct KafkaTimes(HashMap<i64, u32, foldhash::fast::RandomState>);

impl KafkaTimes {
    const RESOLUTION_MS: i64 = 100;

    /// Counts a message stamped `millis` (ms since the epoch).
    pub fn note(&mut self, millis: i64) {
        *self.0.entry(millis.div_euclid(Self::RESOLUTION_MS)).or_default() += 1;
    }

    /// Each time noted (to 100 ms) with how many messages carry it.
    pub fn counts(&self) -> impl Iterator<Item = (i64, u32)> + '_ {
        self.0.iter().map(|(bucket, count)| (bucket * Self::RESOLUTION_MS, *count))
    }
}

impl Batch {
    /// A batch of `rows` (one per key) that covers exactly their offsets.
    pub fn of_rows(rows: Vec<PositionUpdate>) -> Self {
        let mut offsets = OffsetMap::default();
        for row in &rows {
            offsets.observe(&row.source.tp, row.source.offset);
        }
        Self {
            messages: rows.len(),
            rows,
            dead_letters: Vec::new(),
            offsets,
            kafka_times: KafkaTimes::default(),
            history: Vec::new(),
            ingested_at_micros: chrono::Utc::now().timestamp_micros(),
        }
    }
}

impl Buffer {
    /// An empty buffer deduplicating on `keys`; with `keep_every`, it also keeps every
    /// accepted update (for the history) and counts them against its limits.
    pub fn new(keys: Vec<KeyColumn>, limits: Limits, keep_every: bool) -> Self {
        Self {
            keys,
            limits,
            slots: HashMap::default(),
            rests: HashMap::default(),
            rows: Vec::new(),
            sizes: Vec::new(),
            every: keep_every.then(Vec::new),
            dead_letters: Vec::new(),
            offsets: OffsetMap::default(),
            messages: 0,
            read_bytes: 0,
            bytes: 0,
            kafka_times: KafkaTimes::default(),
        }
    }

    /// Messages consumed since the last flush.
    pub fn messages(&self) -> usize {
        self.messages
    }

    /// Adds a valid update of `size` payload bytes, stamped `kafka_time` (ms) by Kafka;
    /// an older update of the same key is dropped (the history keeps it).
    pub fn push(&mut self, update: PositionUpdate, size: usize, kafka_time: Option<i64>) {
        self.offsets.observe(&update.source.tp, update.source.offset);
        self.messages += 1;
        self.read_bytes += size;
        if let Some(millis) = kafka_time {
            self.kafka_times.note(millis);
        }
        if let Some(every) = &mut self.every {
            every.push((Entry { update: update.clone(), kafka_timestamp_millis: kafka_time }, size));
            self.bytes += size;
        }
        let key = (update.conid, self.rest_of(&update, true));
        match self.slots.entry(key) {
            std::collections::hash_map::Entry::Occupied(slot) => {
                let at = *slot.get() as usize;
                if update.supersedes(&self.rows[at]) {
                    self.bytes = self.bytes - self.sizes[at] + size;
                    self.rows[at] = update;
                    self.sizes[at] = size;
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                self.bytes += size;
                slot.insert(self.rows.len() as u32);
                self.rows.push(update);
                self.sizes.push(size);
            }
        }
    }

    /// The number of `update`'s other key columns' values (0 for a `conid` key), given
    /// one on first use when `numbering`.
    fn rest_of(&mut self, update: &PositionUpdate, numbering: bool) -> u32 {
        if self.keys.iter().all(|k| *k == KeyColumn::Conid) {
            return 0;
        }
        let mut rest = update.key(&self.keys);
        rest.conid = 0;
        let next = self.rests.len() as u32 + 1;
        match numbering {
            true => *self.rests.entry(rest).or_insert(next),
            false => self.rests.get(&rest).copied().unwrap_or_default(),
        }
    }

    /// Adds the dead letter of a rejected message.
    pub fn reject(&mut self, dead_letter: DeadLetter) {
        self.note_consumed(&dead_letter.source.tp, dead_letter.source.offset, dead_letter.size());
        self.dead_letters.push(dead_letter);
    }

    /// Records a consumed message that yields no row, so its offset is still covered;
    /// `size` is what the buffer keeps of it.
    pub fn note_consumed(&mut self, tp: &TopicPartition, offset: Offset, size: usize) {
        self.offsets.observe(tp, offset);
        self.messages += 1;
        self.read_bytes += size;
        self.bytes += size;
    }

    /// Whether the messages read reached a size limit: the buffer is to be flushed now,
    /// not at the end of the flush window.
    pub fn is_due(&self) -> bool {
        self.messages >= self.limits.max_records || self.read_bytes >= self.limits.max_bytes
    }

    /// Whether what the buffer holds reached a size limit, so reading must stop until
    /// it is flushed: memory is bounded however many messages a batch covers.
    pub fn is_full(&self) -> bool {
        self.records_held() >= self.limits.max_records || self.bytes >= self.limits.max_bytes
    }

    /// Records held: one per key (or every accepted update, for the history) and the
    /// dead letters.
    fn records_held(&self) -> usize {
        self.every.as_ref().map_or(self.rows.len(), Vec::len) + self.dead_letters.len()
    }

    /// What the buffer can still take before it is full: rows and dead letters, and
    /// bytes (at least one message).
    pub fn room(&self) -> (usize, usize) {
        (
            self.limits.max_records.saturating_sub(self.records_held()).max(1),
            self.limits.max_bytes.saturating_sub(self.bytes).max(1),
        )
    }

    /// Payload bytes the buffer holds (the newest update per key, the dead letters).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing was consumed since the last flush.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Drops everything consumed from `revoked` partitions: their new owner re-reads it.
    pub fn drop_partitions(&mut self, revoked: &[TopicPartition]) {
        if revoked.is_empty() {
            return;
        }
        let kept: Vec<bool> = self.rows.iter().map(|u| !revoked.contains(&u.source.tp)).collect();
        let mut keep = kept.iter();
        self.rows.retain(|_| *keep.next().unwrap_or(&true));
        let mut keep = kept.iter();
        self.sizes.retain(|_| *keep.next().unwrap_or(&true));
        self.slots.clear();
        for i in 0..self.rows.len() {
            let rest = self.rest_of(&self.rows[i].clone(), false);
            self.slots.insert((self.rows[i].conid, rest), i as u32);
        }
        self.dead_letters.retain(|d| !revoked.contains(&d.source.tp));
        if let Some(every) = &mut self.every {
            every.retain(|(e, _)| !revoked.contains(&e.update.source.tp));
        }
        for tp in revoked {
            self.offsets.remove(tp);
        }
        self.bytes = self.sizes.iter().sum::<usize>()
            + self.dead_letters.iter().map(DeadLetter::size).sum::<usize>()
            + self.every.iter().flatten().map(|(_, size)| size).sum::<usize>();
        if self.offsets.is_empty() {
            self.messages = 0;
            self.read_bytes = 0;
            self.kafka_times = KafkaTimes::default();
        }
    }

    /// Hands over the buffered batch and starts an empty one.
    pub fn take(&mut self) -> Batch {
        // The next batch is likely as large: room for it now, not by doubling as it grows.
        let held = self.rows.len();
        let batch = Batch {
            rows: std::mem::replace(&mut self.rows, Vec::with_capacity(held)),
            dead_letters: std::mem::take(&mut self.dead_letters),
            offsets: std::mem::take(&mut self.offsets),
            messages: self.messages,
            kafka_times: std::mem::take(&mut self.kafka_times),
            history: self.every.as_mut().map(|every| every.drain(..).map(|(e, _)| e).collect()).unwrap_or_default(),
            ingested_at_micros: chrono::Utc::now().timestamp_micros(),
        };
        self.sizes.clear();
        self.slots.clear();
        self.rests.clear();
        self.messages = 0;
        self.read_bytes = 0;
        self.bytes = 0;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::tests::update;

    fn buffer() -> Buffer {
        Buffer::new(vec![KeyColumn::Conid], Limits { max_records: 3, max_bytes: 1000 }, false)
    }

    #[test]
    fn keeps_the_latest_update_per_key_in_any_arrival_order() {
        let mut b = buffer();
        b.push(update(1, "A", 300, 0, 1), 10, None);
        b.push(update(1, "A", 100, 0, 2), 10, None);
        b.push(update(1, "A", 200, 0, 3), 10, None);
        let batch = b.take();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].timestamp_micros, 300);
        assert_eq!(batch.offsets.get(&TopicPartition::new("positions", 0)), Some(Offset(3)));
        assert_eq!(batch.messages, 3);
        assert!(b.is_empty());
    }

    #[test]
    fn equal_timestamps_keep_the_later_offset() {
        let mut b = buffer();
        b.push(update(1, "A", 100, 0, 9), 10, None);
        b.push(update(1, "A", 100, 0, 4), 10, None);
        assert_eq!(b.take().rows[0].source.offset, Offset(9));
    }

    #[test]
    fn a_conid_whose_symbol_changes_is_one_row_with_the_newest_symbol() {
        let mut b = buffer();
        b.push(update(1, "A", 100, 0, 1), 10, None);
        b.push(update(1, "B", 100, 0, 2), 10, None);
        let rows = b.take().rows;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].symbol, "B");
    }

    #[test]
    fn is_due_by_messages_or_bytes_read_and_full_by_rows_or_bytes_held() {
        let mut b = buffer();
        b.push(update(1, "A", 1, 0, 1), 10, None);
        b.push(update(2, "A", 2, 0, 2), 10, None);
        assert!(!b.is_due() && !b.is_full());
        b.push(update(3, "A", 3, 0, 3), 10, None);
        assert!(b.is_due() && b.is_full());
        let mut b = buffer();
        b.push(update(1, "A", 1, 0, 1), 1000, None);
        assert!(b.is_due() && b.is_full());
    }

    #[test]
    fn updates_to_the_same_keys_make_a_flush_due_without_filling_the_buffer() {
        let mut b = buffer();
        for offset in 0..100 {
            b.push(update(1 + offset % 2, "A", offset, 0, offset), 10 + offset as usize % 3, None);
        }
        assert!(b.is_due(), "100 messages read");
        assert!(!b.is_full(), "two keys held");
        assert_eq!(b.messages(), 100);
        assert_eq!(b.bytes(), 12 + 10, "the bytes of the newest update per key: offsets 98 and 99");
        let batch = b.take();
        assert_eq!(batch.offsets.get(&TopicPartition::new("positions", 0)), Some(Offset(99)));
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn rejected_messages_are_kept_and_their_offsets_covered() {
        use crate::decode::Rejection;
        use crate::offsets::Coordinates;
        let mut b = buffer();
        b.push(update(1, "A", 1, 0, 1), 10, None);
        let at = Coordinates { tp: TopicPartition::new("positions", 0), offset: Offset(2) };
        b.reject(DeadLetter::new(at, Some(b"1"), Some(b"{"), Some(5), &Rejection::EmptyValue));
        let at = Coordinates { tp: TopicPartition::new("positions", 1), offset: Offset(7) };
        b.reject(DeadLetter::new(at, None, None, None, &Rejection::EmptyValue));
        b.drop_partitions(&[TopicPartition::new("positions", 1)]);
        let batch = b.take();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.dead_letters.len(), 1);
        assert_eq!(batch.dead_letters[0].value.as_deref(), Some(&b"{"[..]));
        assert_eq!(batch.offsets.get(&TopicPartition::new("positions", 0)), Some(Offset(2)));
        assert_eq!(batch.offsets.len(), 1);
    }

    #[test]
    fn with_the_history_every_update_is_kept_in_order_and_counted_against_the_limits() {
        let mut b = Buffer::new(vec![KeyColumn::Conid], Limits { max_records: 3, max_bytes: 1000 }, true);
        b.push(update(1, "A", 300, 0, 1), 10, Some(7));
        b.push(update(1, "A", 100, 0, 2), 10, None);
        assert!(!b.is_full(), "two updates held");
        b.push(update(2, "A", 100, 1, 5), 10, None);
        assert!(b.is_full(), "three updates held, though only two keys");
        assert_eq!(b.bytes(), 10 + 10 + 30, "the newest per key and every update");
        b.drop_partitions(&[TopicPartition::new("positions", 1)]);
        assert_eq!(b.bytes(), 10 + 20);
        let batch = b.take();
        assert_eq!(batch.rows.len(), 1);
        let kept: Vec<(i64, Option<i64>)> =
            batch.history.iter().map(|e| (e.update.source.offset.0, e.kafka_timestamp_millis)).collect();
        assert_eq!(kept, [(1, Some(7)), (2, None)]);
        let mut off = buffer();
        off.push(update(1, "A", 1, 0, 1), 10, None);
        assert!(off.take().history.is_empty(), "no history kept when it is off");
    }

    #[test]
    fn with_more_key_columns_each_combination_is_a_row_also_after_a_partition_is_dropped() {
        let keys = vec![KeyColumn::Conid, KeyColumn::Account];
        let mut b = Buffer::new(keys, Limits { max_records: 100, max_bytes: 1000 }, false);
        let with = |account: &str, ts, partition, offset| {
            let mut u = update(1, "A", ts, partition, offset);
            u.account = Some(account.into());
            u
        };
        b.push(with("U1", 1, 0, 1), 10, None);
        b.push(with("U2", 1, 1, 1), 10, None);
        b.push(with("U3", 1, 0, 2), 10, None);
        b.drop_partitions(&[TopicPartition::new("positions", 0)]);
        b.push(with("U2", 5, 1, 2), 10, None);
        b.push(with("U2", 3, 1, 3), 10, None);
        b.push(with("U1", 2, 1, 4), 10, None);
        let mut rows: Vec<(String, i64)> =
            b.take().rows.into_iter().map(|u| (u.account.unwrap_or_default(), u.timestamp_micros)).collect();
        rows.sort();
        assert_eq!(rows, [("U1".to_string(), 2), ("U2".to_string(), 5)]);
    }

    #[test]
    fn dropping_a_revoked_partition_keeps_the_others() {
        let mut b = buffer();
        b.push(update(1, "A", 1, 0, 1), 10, None);
        b.push(update(2, "A", 1, 1, 1), 10, None);
        b.drop_partitions(&[TopicPartition::new("positions", 0)]);
        let batch = b.take();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].conid, 2);
        assert_eq!(batch.offsets.len(), 1);
    }
}
