//! The key index's storage: key → [`Slot`] (where its row is, and its precedence) in about 36 bytes per key (a `conid` key;
//! 40 with other key columns), so that a worker holds ten million keys in a few
//! hundred megabytes. Pure.
//!
//! Keys live in columns sorted by key (binary search), with the few keys new since the
//! last merge in a small hash map; the map is merged into the columns once it holds a
//! thirty-second of them, and a large batch of keys (a file listing at start-up, a
//! copy-on-write flush) is sorted and merged in one pass. A key's other columns
//! (`account`, `sec_type`, `currency`) are stored as the number of their combination,
//! of which a table has few.
//!
//! Invariant kept here: a key is in the columns or in the map, never both. Entries whose
//! file is gone are left in place (the caller checks the file) and dropped at the next
//! merge.

use std::collections::HashMap;

use crate::update::RowKey;

/// A data file's number in the index.
pub type FileId = u32;

/// A Kafka partition's number in the index (rows name theirs by it).
pub type SourceId = u32;

/// What decides which of two rows of a key wins: the order of
/// [`crate::update::PositionUpdate::precedence`] (timestamp, offset, topic, partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Event time, µs.
    pub timestamp: i64,
    /// Kafka offset of the update.
    pub offset: i64,
    /// Kafka partition of the update.
    pub source: SourceId,
}

/// Where a key's row is: its file, its position in the file, and its precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The file.
    pub file: FileId,
    /// The row's position in the file (what a deletion vector names).
    pub row: u32,
    /// The row's precedence.
    pub stamp: Stamp,
}

/// The smallest number of new keys that triggers a merge into the columns.
const MERGE_AT_LEAST: usize = 65_536;

/// A key as stored: the conid and the number of its other columns' values (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Compact {
    /// The conid.
    pub conid: i64,
    /// The number of the key's other columns' values in [`KeyStore::rests`] (0: none).
    pub rest: u32,
}

/// The other key columns' values of a key (account, sec_type, currency), by number.
pub type Rest = (Option<String>, Option<String>, Option<String>);

/// Key → slot.
#[derive(Debug, Default)]
pub struct KeyStore {
    sorted: Columns,
    fresh: HashMap<Compact, Slot, foldhash::fast::RandomState>,
    rests: Vec<Rest>,
    rest_ids: HashMap<Rest, u32>,
}

/// Keys and their slots, column by column, sorted by key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Each key's conid.
    pub conids: Vec<i64>,
    /// Each key's other columns' values by number; empty while every key's is 0 (a
    /// `conid` key).
    pub rests: Vec<u32>,
    /// The file of each key's row.
    pub files: Vec<FileId>,
    /// The row's position in its file.
    pub rows: Vec<u32>,
    /// The row's event time.
    pub timestamps: Vec<i64>,
    /// The row's Kafka offset.
    pub offsets: Vec<i64>,
    /// The row's Kafka partition, by number.
    pub sources: Vec<SourceId>,
}

impl Columns {
    fn with_capacity(n: usize, with_rests: bool) -> Self {
        Self {
            conids: Vec::with_capacity(n),
            rests: Vec::with_capacity(if with_rests { n } else { 0 }),
            files: Vec::with_capacity(n),
            rows: Vec::with_capacity(n),
            timestamps: Vec::with_capacity(n),
            offsets: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.conids.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.conids.is_empty()
    }

    /// The `i`-th key.
    pub fn key(&self, i: usize) -> Compact {
        Compact { conid: self.conids[i], rest: self.rests.get(i).copied().unwrap_or(0) }
    }

    /// The `i`-th key's slot.
    pub fn slot(&self, i: usize) -> Slot {
        Slot {
            file: self.files[i],
            row: self.rows[i],
            stamp: Stamp { timestamp: self.timestamps[i], offset: self.offsets[i], source: self.sources[i] },
        }
    }

    fn set(&mut self, i: usize, slot: Slot) {
        self.files[i] = slot.file;
        self.rows[i] = slot.row;
        self.timestamps[i] = slot.stamp.timestamp;
        self.offsets[i] = slot.stamp.offset;
        self.sources[i] = slot.stamp.source;
    }

    fn push(&mut self, key: Compact, slot: Slot) {
        self.conids.push(key.conid);
        if self.rests.capacity() > 0 {
            self.rests.push(key.rest);
        }
        self.files.push(slot.file);
        self.rows.push(slot.row);
        self.timestamps.push(slot.stamp.timestamp);
        self.offsets.push(slot.stamp.offset);
        self.sources.push(slot.stamp.source);
    }

    fn find(&self, key: Compact) -> Option<usize> {
        let mut i = self.conids.partition_point(|c| *c < key.conid);
        while i < self.conids.len() && self.conids[i] == key.conid {
            let rest = self.rests.get(i).copied().unwrap_or(0);
            if rest == key.rest {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn shrink(&mut self) {
        self.conids.shrink_to_fit();
        self.rests.shrink_to_fit();
        self.files.shrink_to_fit();
        self.rows.shrink_to_fit();
        self.timestamps.shrink_to_fit();
        self.offsets.shrink_to_fit();
        self.sources.shrink_to_fit();
    }

    fn heap_bytes(&self) -> usize {
        self.conids.capacity() * 8
            + self.rests.capacity() * 4
            + self.files.capacity() * 4
            + self.rows.capacity() * 4
            + self.timestamps.capacity() * 8
            + self.offsets.capacity() * 8
            + self.sources.capacity() * 4
    }
}

impl KeyStore {
    /// The stored form of `key`, numbering its other columns' values on first use.
    pub fn compact(&mut self, key: &RowKey) -> Compact {
        if key.account.is_none() && key.sec_type.is_none() && key.currency.is_none() {
            return Compact { conid: key.conid, rest: 0 };
        }
        let rest = (key.account.clone(), key.sec_type.clone(), key.currency.clone());
        let id = match self.rest_ids.get(&rest) {
            Some(id) => *id,
            None => {
                if self.rests.is_empty() {
                    self.rests.push((None, None, None));
                }
                let id = self.rests.len() as u32;
                self.rests.push(rest.clone());
                self.rest_ids.insert(rest, id);
                id
            }
        };
        Compact { conid: key.conid, rest: id }
    }

    /// The stored form of `key` if any stored key has its other columns' values.
    pub fn find_compact(&self, key: &RowKey) -> Option<Compact> {
        if key.account.is_none() && key.sec_type.is_none() && key.currency.is_none() {
            return Some(Compact { conid: key.conid, rest: 0 });
        }
        let rest = (key.account.clone(), key.sec_type.clone(), key.currency.clone());
        self.rest_ids.get(&rest).map(|id| Compact { conid: key.conid, rest: *id })
    }

    /// The key `compact` stands for.
    pub fn key_of(&self, compact: Compact) -> RowKey {
        let (account, sec_type, currency) = self.rests.get(compact.rest as usize).cloned().unwrap_or_default();
        RowKey { conid: compact.conid, account, sec_type, currency }
    }

    /// The slot of `key`.
    pub fn get(&self, key: Compact) -> Option<Slot> {
        match self.sorted.find(key) {
            Some(i) => Some(self.sorted.slot(i)),
            None => self.fresh.get(&key).copied(),
        }
    }

    /// Sets the slot of `key`, returning the one it replaces.
    pub fn insert(&mut self, key: Compact, slot: Slot) -> Option<Slot> {
        match self.sorted.find(key) {
            Some(i) => {
                let previous = self.sorted.slot(i);
                self.sorted.set(i, slot);
                Some(previous)
            }
            None => self.fresh.insert(key, slot),
        }
    }

    /// Sets the slot of a stored `key`; no-op for a key not stored.
    pub fn replace(&mut self, key: Compact, slot: Slot) {
        match self.sorted.find(key) {
            Some(i) => self.sorted.set(i, slot),
            None => {
                if let Some(stored) = self.fresh.get_mut(&key) {
                    *stored = slot;
                }
            }
        }
    }

    /// Whether a batch of `n` keys is better sorted and merged in one pass than
    /// inserted one by one.
    pub fn is_bulk(&self, n: usize) -> bool {
        n >= MERGE_AT_LEAST.max(self.sorted.len() / 32)
    }

    /// Merges the new keys into the sorted columns once there are enough of them,
    /// dropping the entries `is_live` says are gone.
    pub fn settle(&mut self, is_live: impl Fn(FileId) -> bool) {
        if self.fresh.len() >= MERGE_AT_LEAST.max(self.sorted.len() / 32) {
            self.merge(Vec::new(), |_, _| {}, is_live);
        }
    }

    /// Sets the slots of `batch`, in order (a later entry of a key replaces an earlier
    /// one), in one sorted pass over every stored key; `replaced(key, previous)` is told
    /// of each slot replaced. Entries `is_live` says are gone are dropped.
    pub fn merge(
        &mut self,
        mut batch: Vec<(Compact, Slot)>,
        mut replaced: impl FnMut(Compact, Slot),
        is_live: impl Fn(FileId) -> bool,
    ) {
        batch.sort_by_key(|(key, _)| *key); // stable: a key's entries stay in order
        let mut fresh: Vec<(Compact, Slot)> = self.fresh.drain().collect();
        fresh.sort_unstable_by_key(|(key, _)| *key);
        let old = std::mem::take(&mut self.sorted);
        let with_rests = !old.rests.is_empty() || self.rests.len() > 1;
        let mut out = Columns::with_capacity(old.len() + fresh.len() + batch.len(), with_rests);
        let (mut a, mut b, mut c) = (0, 0, 0);
        loop {
            let next = [
                (a < old.len()).then(|| old.key(a)),
                fresh.get(b).map(|(key, _)| *key),
                batch.get(c).map(|(key, _)| *key),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(key) = next else { break };
            let mut current = None;
            if a < old.len() && old.key(a) == key {
                current = Some(old.slot(a));
                a += 1;
            }
            if fresh.get(b).is_some_and(|(k, _)| *k == key) {
                current = Some(fresh[b].1);
                b += 1;
            }
            while let Some((_, slot)) = batch.get(c).filter(|(k, _)| *k == key) {
                if let Some(previous) = current {
                    replaced(key, previous);
                }
                current = Some(*slot);
                c += 1;
            }
            if let Some(slot) = current.filter(|slot| is_live(slot.file)) {
                out.push(key, slot);
            }
        }
        out.shrink();
        self.sorted = out;
    }

    /// Drops the new keys whose entries `is_live` says are gone (the sorted ones wait
    /// for the next merge).
    pub fn retain_fresh(&mut self, is_live: impl Fn(FileId) -> bool) {
        self.fresh.retain(|_, slot| is_live(slot.file));
    }

    /// Every key whose file `is_live`, as sorted columns, and the other key columns'
    /// values by number: what the saved index holds. The new keys are merged in first.
    pub fn export(&mut self, is_live: impl Fn(FileId) -> bool) -> (Columns, Vec<Rest>) {
        self.merge(Vec::new(), |_, _| {}, is_live);
        (self.sorted.clone(), self.rests.clone())
    }

    /// A store holding `columns`, whose other key columns' values are `rests` by number.
    ///
    /// # Errors
    /// What is inconsistent: columns of different lengths, keys out of order or
    /// repeated, a number with no values.
    pub fn import(columns: Columns, rests: Vec<Rest>) -> Result<Self, String> {
        let n = columns.len();
        let lengths = [columns.files.len(), columns.rows.len(), columns.timestamps.len(), columns.offsets.len()];
        if lengths.iter().any(|len| *len != n)
            || columns.sources.len() != n
            || !(columns.rests.is_empty() || columns.rests.len() == n)
        {
            return Err("its key columns have different lengths".into());
        }
        if let Some(i) = (1..n).find(|i| columns.key(i - 1) >= columns.key(*i)) {
            return Err(format!("its keys are not in order at entry {i}"));
        }
        if columns.rests.iter().any(|rest| *rest as usize >= rests.len().max(1)) {
            return Err("a key names other key columns' values it does not hold".into());
        }
        let rest_ids = rests.iter().enumerate().skip(1).map(|(id, rest)| (rest.clone(), id as u32)).collect();
        Ok(Self { sorted: columns, fresh: HashMap::default(), rests, rest_ids })
    }

    /// Entries stored, gone ones included.
    pub fn entries(&self) -> usize {
        self.sorted.len() + self.fresh.len()
    }

    /// Every stored entry.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (Compact, Slot)> + '_ {
        (0..self.sorted.len())
            .map(|i| (self.sorted.key(i), self.sorted.slot(i)))
            .chain(self.fresh.iter().map(|(k, s)| (*k, *s)))
    }

    /// Bytes of memory the stored keys take.
    pub fn heap_bytes(&self) -> usize {
        let entry = size_of::<(Compact, Slot)>() + 1;
        self.sorted.heap_bytes()
            + self.fresh.capacity() * entry
            + self
                .rests
                .iter()
                .map(|(a, b, c)| [a, b, c].iter().map(|s| s.as_ref().map_or(0, String::len)).sum::<usize>() * 2 + 80)
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(file: FileId, timestamp: i64) -> Slot {
        Slot { file, row: 0, stamp: Stamp { timestamp, offset: 0, source: 0 } }
    }

    fn key(store: &mut KeyStore, conid: i64, account: Option<&str>) -> Compact {
        store.compact(&RowKey { conid, account: account.map(str::to_string), ..RowKey::default() })
    }

    #[test]
    fn keys_inserted_one_by_one_and_merged_are_found_alike() {
        let mut store = KeyStore::default();
        for conid in (0..200_000).rev() {
            let k = key(&mut store, conid * 3, None);
            store.insert(k, slot(1, conid));
            store.settle(|_| true);
        }
        assert!(store.fresh.len() < MERGE_AT_LEAST, "merged into the columns");
        for conid in [0, 1, 99_999, 199_999] {
            let k = key(&mut store, conid * 3, None);
            assert_eq!(store.get(k), Some(slot(1, conid)));
            let missing = key(&mut store, conid * 3 + 1, None);
            assert_eq!(store.get(missing), None);
        }
        assert_eq!(store.entries(), 200_000);
    }

    #[test]
    fn a_merge_keeps_a_keys_last_entry_and_tells_what_it_replaced() {
        let mut store = KeyStore::default();
        let (a, b) = (key(&mut store, 5, None), key(&mut store, 5, Some("U1")));
        store.insert(a, slot(1, 1));
        let mut replaced = Vec::new();
        store.merge(
            vec![(b, slot(2, 2)), (a, slot(2, 3)), (a, slot(3, 4))],
            |k, s| replaced.push((k, s.file)),
            |_| true,
        );
        assert_eq!(replaced, vec![(a, 1), (a, 2)]);
        assert_eq!(store.get(a), Some(slot(3, 4)));
        assert_eq!(store.get(b), Some(slot(2, 2)), "same conid, other account: another key");
        assert_eq!(store.key_of(b).account.as_deref(), Some("U1"));
        assert_eq!(store.entries(), 2);
    }

    #[test]
    fn a_merge_drops_entries_of_gone_files() {
        let mut store = KeyStore::default();
        let (a, b) = (key(&mut store, 1, None), key(&mut store, 2, None));
        store.merge(vec![(a, slot(1, 1)), (b, slot(2, 1))], |_, _| {}, |_| true);
        store.merge(Vec::new(), |_, _| {}, |file| file != 1);
        assert_eq!(store.get(a), None);
        assert_eq!(store.get(b), Some(slot(2, 1)));
    }

    #[test]
    fn an_exported_store_imports_with_every_key_and_new_keys_merged() {
        let mut store = KeyStore::default();
        let (a, b) = (key(&mut store, 5, None), key(&mut store, 5, Some("U1")));
        store.merge(vec![(a, slot(1, 1)), (b, slot(2, 2))], |_, _| {}, |_| true);
        let c = key(&mut store, 3, Some("U2"));
        store.insert(c, slot(1, 3));
        let gone = key(&mut store, 9, None);
        store.insert(gone, slot(7, 4));
        let (columns, rests) = store.export(|file| file != 7);
        let imported = KeyStore::import(columns.clone(), rests.clone()).expect("consistent");
        assert_eq!(imported.entries(), 3, "the gone file's key is left out");
        for (k, s) in [(a, slot(1, 1)), (b, slot(2, 2)), (c, slot(1, 3))] {
            assert_eq!(imported.get(k), Some(s));
            assert_eq!(imported.find_compact(&imported.key_of(k)), Some(k));
        }
        let mut shuffled = columns.clone();
        shuffled.conids.swap(0, 1);
        assert!(KeyStore::import(shuffled, rests.clone()).is_err(), "keys out of order");
        let mut short = columns.clone();
        short.rows.pop();
        assert!(KeyStore::import(short, rests.clone()).is_err(), "a short column");
        assert!(KeyStore::import(columns, Vec::new()).is_err(), "values it does not hold");
    }

    #[test]
    fn a_conid_key_takes_at_most_36_bytes() {
        let mut store = KeyStore::default();
        let batch: Vec<(Compact, Slot)> =
            (0..1_000_000).map(|c| (Compact { conid: c * 7, rest: 0 }, slot(1, c))).collect();
        store.merge(batch, |_, _| {}, |_| true);
        let per_key = store.heap_bytes() as f64 / store.entries() as f64;
        assert!(per_key <= 36.0, "{per_key} bytes per key");
    }
}
