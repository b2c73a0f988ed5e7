//! Which live data file and row of the positions table holds each key, and the
//! precedence of that row, so that a flush reads and rewrites only the files its keys
//! are in (copy-on-write) or marks only their rows deleted (deletion vectors). Pure:
//! the table module reads the files and feeds their rows in.
//!
//! Invariant kept here: after [`KeyIndex::sync`] with the table's live files and
//! [`KeyIndex::add_file`] for each file it did not know, every key of the table maps to
//! a live row that holds it (a row a file's deletion vector hides is not live). A key
//! found in two live rows (two workers inserted it at once) is remembered as a
//! duplicate until a flush removes one of them.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};

use roaring::RoaringTreemap;

use super::key_store::KeyStore;
pub use super::key_store::{Columns, Compact, Rest};
pub use super::key_store::{FileId, Slot, SourceId, Stamp};
use crate::config::PartitionBy;
use crate::maintenance::compaction::{FileShape, Purge, Thresholds};
use crate::offsets::TopicPartition;
use crate::update::{KeyColumn, PositionUpdate, RowKey};

/// One live row of a file, as fed to [`KeyIndex::add_file`].
#[derive(Debug, Clone)]
pub struct Row {
    /// Its position in the file.
    pub row: u32,
    /// Its key.
    pub key: RowKey,
    /// Its precedence.
    pub stamp: Stamp,
}

/// The rows a file may hold: one symbol (in the `symbol` layout) and one Kafka partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileGroup {
    /// The file's `symbol` partition value; `None` when the table has no partition column.
    pub symbol: Option<String>,
    /// The Kafka partition of the rows' newest updates; `None` for a file that mixes
    /// partitions (written before files had a single owner).
    pub owner: Option<TopicPartition>,
}

impl FileGroup {
    /// The group of a row of `symbol` whose newest update came from `owner`, in `layout`.
    pub fn of(layout: PartitionBy, symbol: &str, owner: TopicPartition) -> Self {
        let symbol = (layout == PartitionBy::Symbol).then(|| symbol.to_string());
        Self { symbol, owner: Some(owner) }
    }
}

/// One live data file.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedFile {
    /// The path relative to the table root, as in the Delta log.
    pub path: String,
    /// The rows it may hold.
    pub group: FileGroup,
    /// Rows in the file, hidden ones included.
    pub rows: usize,
    /// The unique id of its deletion vector (none: every row is live).
    pub deletion_vector: Option<String>,
    /// The positions its deletion vector hides.
    pub deleted: RoaringTreemap,
}

impl IndexedFile {
    /// Rows not hidden by the file's deletion vector.
    pub fn live_rows(&self) -> usize {
        self.rows.saturating_sub(self.deleted.len() as usize)
    }
}

/// A live data file as the table's log lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFile {
    /// The path relative to the table root.
    pub path: String,
    /// The unique id of its deletion vector, if it has one.
    pub deletion_vector: Option<String>,
}

/// A file to record with [`KeyIndex::add_files`]: the file, its group, its row count
/// (hidden rows included), the positions its deletion vector hides, and its live rows.
pub type FileToAdd = (LiveFile, FileGroup, usize, RoaringTreemap, Vec<Row>);

/// Keys → live rows, kept current from the table's log.
#[derive(Debug, Default)]
pub struct KeyIndex {
    keys: KeyStore,
    files: HashMap<FileId, IndexedFile>,
    by_path: HashMap<String, FileId>,
    by_group: HashMap<FileGroup, HashSet<FileId>>,
    duplicates: HashMap<Compact, Slot, foldhash::fast::RandomState>,
    sources: Vec<TopicPartition>,
    next_id: FileId,
    /// The table version whose live files it was last brought to (`None`: never).
    version: Option<u64>,
    /// The files, with their deletion vectors, of the index last saved or read
    /// beside the table: what a start from it would not read again.
    saved: HashMap<String, Option<String>>,
}

/// An index in parts, as saved beside the table (`crate::table::saved_index`).
#[derive(Debug, Clone, PartialEq)]
pub struct Parts {
    /// The table version whose live files the index was last brought to; it may also
    /// know files committed after it.
    pub version: u64,
    /// The Kafka partitions rows name, by number.
    pub sources: Vec<TopicPartition>,
    /// The other key columns' values, by number.
    pub rests: Vec<Rest>,
    /// The live files, by number.
    pub files: Vec<(FileId, IndexedFile)>,
    /// Every key of a live file, sorted by key.
    pub keys: Columns,
    /// The second copies of keys held twice.
    pub duplicates: Vec<(Compact, Slot)>,
}

impl KeyIndex {
    /// The table version whose live files it was last brought to (`None`: never).
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    /// Notes that the index now knows every live file of table version `version`.
    pub fn brought_to(&mut self, version: u64) {
        self.version = Some(version);
    }

    /// What a start from the index last saved (or read) would read to catch up: the
    /// live files it does not know as they are now, and their rows.
    pub fn unsaved(&self) -> (usize, usize) {
        self.files
            .values()
            .filter(|f| self.saved.get(&f.path) != Some(&f.deletion_vector))
            .fold((0, 0), |(files, rows), f| (files + 1, rows + f.rows))
    }

    /// Notes that the index holding `files` (as [`Parts::files`] lists them) was saved.
    pub fn saved_with(&mut self, files: &[(FileId, IndexedFile)]) {
        self.saved = files.iter().map(|(_, f)| (f.path.clone(), f.deletion_vector.clone())).collect();
    }

    /// The index in parts, to save; `None` if it was never brought to a version.
    pub fn export(&mut self) -> Option<Parts> {
        let version = self.version?;
        let files = &self.files;
        let (keys, rests) = self.keys.export(|file| files.contains_key(&file));
        let mut listed: Vec<(FileId, IndexedFile)> = self.files.iter().map(|(id, f)| (*id, f.clone())).collect();
        listed.sort_unstable_by_key(|(id, _)| *id);
        let mut duplicates: Vec<(Compact, Slot)> = self.duplicates.iter().map(|(k, s)| (*k, *s)).collect();
        duplicates.sort_unstable_by_key(|(k, _)| *k);
        Some(Parts { version, sources: self.sources.clone(), rests, files: listed, keys, duplicates })
    }

    /// The index `parts` describe, checked for consistency: every key's row lies in a
    /// listed file, within its rows, and names a known partition.
    ///
    /// # Errors
    /// What is inconsistent.
    pub fn import(parts: Parts) -> Result<Self, String> {
        let Parts { version, sources, rests, files, keys, duplicates } = parts;
        let next_id = files.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
        // Rows per file number (absent: 0 rows, so no key may name it).
        let mut rows = vec![0u64; next_id as usize];
        for (id, file) in &files {
            if rows[*id as usize] != 0 || file.rows == 0 {
                return Err(format!("file {id} is listed twice or has no rows"));
            }
            rows[*id as usize] = file.rows as u64;
        }
        let holds = |slot: &Slot| {
            rows.get(slot.file as usize).is_some_and(|n| u64::from(slot.row) < *n)
                && (slot.stamp.source as usize) < sources.len()
        };
        if let Some(i) = (0..keys.len()).find(|i| !holds(&keys.slot(*i))) {
            return Err(format!("key {} names a row no listed file holds", keys.key(i).conid));
        }
        if duplicates.iter().any(|(_, slot)| !holds(slot)) {
            return Err("a second copy of a key names a row no listed file holds".into());
        }
        let keys = KeyStore::import(keys, rests)?;
        let mut index = KeyIndex { keys, sources, next_id, version: Some(version), ..KeyIndex::default() };
        index.saved_with(&files);
        for (id, file) in files {
            index.by_path.insert(file.path.clone(), id);
            index.by_group.entry(file.group.clone()).or_default().insert(id);
            index.files.insert(id, file);
        }
        index.duplicates = duplicates.into_iter().collect();
        Ok(index)
    }

    /// Forgets the files that are no longer live (or whose deletion vector changed) and
    /// returns the live files it does not know yet, for the caller to read and pass to
    /// [`KeyIndex::add_file`].
    pub fn sync(&mut self, live: &[LiveFile]) -> Vec<LiveFile> {
        let current: HashMap<&str, &Option<String>> =
            live.iter().map(|f| (f.path.as_str(), &f.deletion_vector)).collect();
        let gone: Vec<FileId> = self
            .by_path
            .iter()
            .filter(|(path, id)| {
                current
                    .get(path.as_str())
                    .is_none_or(|dv| self.files.get(id).is_some_and(|f| f.deletion_vector != **dv))
            })
            .map(|(_, id)| *id)
            .collect();
        for id in &gone {
            self.forget(*id);
        }
        if !gone.is_empty() {
            let files = &self.files;
            self.keys.retain_fresh(|file| files.contains_key(&file));
            self.duplicates.retain(|_, slot| files.contains_key(&slot.file));
        }
        live.iter().filter(|f| !self.by_path.contains_key(&f.path)).cloned().collect()
    }

    /// Records a live file, its live rows and the positions its deletion vector hides.
    /// A key already held by another live row is kept as a duplicate to resolve.
    pub fn add_file(
        &mut self,
        file: LiveFile,
        group: FileGroup,
        rows: usize,
        deleted: RoaringTreemap,
        live: impl IntoIterator<Item = Row>,
    ) -> FileId {
        self.add_files(vec![(file, group, rows, deleted, live.into_iter().collect())])[0]
    }

    /// [`KeyIndex::add_file`] for many files at once, in order (a key in two of them
    /// keeps the later file's row and the earlier one as a duplicate): a large set of
    /// keys, such as a whole table's at start-up, is sorted and merged in one pass.
    pub fn add_files(&mut self, added: Vec<FileToAdd>) -> Vec<FileId> {
        let total: usize = added.iter().map(|(.., live)| live.len()).sum();
        let mut ids = Vec::with_capacity(added.len());
        let mut entries: Vec<(Compact, Slot)> = Vec::with_capacity(total);
        for (file, group, rows, deleted, live) in added {
            let id = self.next_id;
            self.next_id += 1;
            ids.push(id);
            for Row { row, key, stamp } in live {
                entries.push((self.keys.compact(&key), Slot { file: id, row, stamp }));
            }
            self.by_path.insert(file.path.clone(), id);
            self.by_group.entry(group.clone()).or_default().insert(id);
            let LiveFile { path, deletion_vector } = file;
            self.files.insert(id, IndexedFile { path, group, rows, deletion_vector, deleted });
        }
        // A replaced row whose file is still live (and not the replacing row's own) is
        // the key's second copy.
        let Self { keys, files, duplicates, .. } = self;
        let mut note = |key: Compact, previous: Slot, file: FileId| {
            if previous.file != file && files.contains_key(&previous.file) {
                duplicates.insert(key, previous);
            }
        };
        if keys.is_bulk(entries.len()) {
            // The merge tells each key's replaced slots in order; each one's successor is
            // the next, and the last one's is the key's slot now.
            let mut replaced = Vec::new();
            keys.merge(entries, |key, previous| replaced.push((key, previous)), |file| files.contains_key(&file));
            let mut by_key: HashMap<Compact, Vec<Slot>, foldhash::fast::RandomState> = HashMap::default();
            for (key, previous) in replaced {
                by_key.entry(key).or_default().push(previous);
            }
            for (key, previous) in by_key {
                let mut chain = previous;
                if let Some(last) = keys.get(key) {
                    chain.push(last);
                }
                for pair in chain.windows(2) {
                    note(key, pair[0], pair[1].file);
                }
            }
        } else {
            for (key, slot) in entries {
                if let Some(previous) = keys.insert(key, slot) {
                    note(key, previous, slot.file);
                }
            }
            keys.settle(|file| files.contains_key(&file));
        }
        ids
    }

    /// Records that this worker hid `rows` of file `id` with the deletion vector whose
    /// unique id is `deletion_vector` (`rows`: every row it hides, old and new). The
    /// keys of those rows are re-added with the files that hold their new rows; a key
    /// held twice keeps its other copy.
    pub fn hide_rows(&mut self, id: FileId, deletion_vector: String, rows: &RoaringTreemap) {
        if let Some(file) = self.files.get_mut(&id) {
            file.deletion_vector = Some(deletion_vector);
            file.deleted |= rows;
        }
        self.drop_copies(|slot| slot.file == id && rows.contains(u64::from(slot.row)));
    }

    /// Forgets the copies of duplicated keys that are `gone`; where the indexed copy is
    /// gone, the other one takes its place.
    fn drop_copies(&mut self, gone: impl Fn(&Slot) -> bool) {
        let Self { keys, duplicates, .. } = self;
        duplicates.retain(|key, copy| {
            if gone(copy) {
                return false;
            }
            match keys.get(*key) {
                Some(indexed) if gone(&indexed) => {
                    keys.replace(*key, *copy);
                    false
                }
                _ => true,
            }
        });
    }

    /// The number of the Kafka partition `topic`/`partition` (given one on first use).
    pub fn source(&mut self, topic: &str, partition: i32) -> SourceId {
        if let Some(found) = self.sources.iter().position(|tp| tp.topic == topic && tp.partition.0 == partition) {
            return found as SourceId;
        }
        self.sources.push(TopicPartition::new(topic, partition));
        (self.sources.len() - 1) as SourceId
    }

    /// The order of `update` against the stored row stamped `stored`, under
    /// [`crate::update::PositionUpdate::precedence`].
    pub fn compare_update(&self, update: &PositionUpdate, stored: &Stamp) -> Ordering {
        let tp = self.sources.get(stored.source as usize).map(|tp| (tp.topic.as_str(), tp.partition.0));
        (update.timestamp_micros, update.source.offset.0)
            .cmp(&(stored.timestamp, stored.offset))
            .then_with(|| Some((update.source.tp.topic.as_str(), update.source.tp.partition.0)).cmp(&tp))
    }

    /// The order of `a` against `b` under [`crate::update::PositionUpdate::precedence`].
    pub fn compare(&self, a: &Stamp, b: &Stamp) -> Ordering {
        let tp = |s: &Stamp| self.sources.get(s.source as usize).map(|tp| (tp.topic.as_str(), tp.partition.0));
        (a.timestamp, a.offset).cmp(&(b.timestamp, b.offset)).then_with(|| tp(a).cmp(&tp(b)))
    }

    fn forget(&mut self, id: FileId) {
        if let Some(file) = self.files.remove(&id) {
            self.by_path.remove(&file.path);
            if let Some(ids) = self.by_group.get_mut(&file.group) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_group.remove(&file.group);
                }
            }
        }
    }

    /// Forgets a file this worker removed; its keys are re-added with the files that replace it.
    pub fn remove_file(&mut self, id: FileId) {
        self.forget(id);
        self.drop_copies(|slot| slot.file == id);
    }

    /// The live row that holds `key`.
    pub fn slot_of(&self, key: &RowKey) -> Option<Slot> {
        let compact = self.keys.find_compact(key)?;
        self.keys.get(compact).filter(|slot| self.files.contains_key(&slot.file))
    }

    /// The live file that holds `key`.
    pub fn file_of(&self, key: &RowKey) -> Option<FileId> {
        self.slot_of(key).map(|slot| slot.file)
    }

    /// A live file by number.
    pub fn file(&self, id: FileId) -> Option<&IndexedFile> {
        self.files.get(&id)
    }

    /// The file of `group` with the fewest rows, if it has fewer than `max_rows`: where
    /// new keys of the group go.
    pub fn smallest_in(&self, group: &FileGroup, max_rows: usize) -> Option<FileId> {
        self.by_group
            .get(group)?
            .iter()
            .filter_map(|id| self.files.get(id).map(|f| (*id, f.live_rows())))
            .filter(|(_, rows)| *rows < max_rows)
            .min_by_key(|(id, rows)| (*rows, *id))
            .map(|(id, _)| id)
    }

    /// Rows holding a second copy of a key, with the key: a flush keeps only the
    /// newest row.
    pub fn duplicates(&self) -> impl Iterator<Item = (RowKey, Slot)> + '_ {
        self.duplicates.iter().map(|(key, slot)| (self.keys.key_of(*key), *slot))
    }

    /// Bytes of memory the keys take (their slots and second copies; the files' own
    /// entries are per file, not per key).
    pub fn key_bytes(&self) -> usize {
        self.keys.heap_bytes() + self.duplicates.capacity() * (size_of::<(Compact, Slot)>() + 1)
    }

    /// Keys stored (entries of removed files included until they are dropped).
    pub fn key_entries(&self) -> usize {
        self.keys.entries()
    }

    /// Live files by number.
    pub fn files(&self) -> impl Iterator<Item = (FileId, &IndexedFile)> {
        self.files.iter().map(|(id, f)| (*id, f))
    }

    /// The groups of `owners`' files worth compacting, with the files to pack, by
    /// `thresholds` (the policy: [`crate::maintenance::compaction`]). Smallest groups
    /// first.
    pub fn groups_to_compact(
        &self,
        owners: &[TopicPartition],
        thresholds: &Thresholds,
        max_rows: usize,
        purge: Purge,
    ) -> Vec<(FileGroup, Vec<FileId>)> {
        let mut found: Vec<(FileGroup, Vec<FileId>)> = self
            .by_group
            .iter()
            .filter(|(group, _)| group.owner.as_ref().is_some_and(|owner| owners.contains(owner)))
            .filter_map(|(group, ids)| {
                let taken = self.taken(ids, thresholds, max_rows, purge);
                let shapes: Vec<FileShape> = taken.iter().filter_map(|id| self.shape(*id)).collect();
                thresholds.worth_compacting(&shapes, max_rows, purge).then(|| (group.clone(), taken))
            })
            .collect();
        found.sort();
        found
    }

    /// Whether a flush that touched `groups` makes compaction due now by `thresholds`:
    /// one of them is crowded, or the table holds more files with a vector than
    /// allowed and one of them holds some.
    pub fn crowded(&self, groups: &BTreeSet<FileGroup>, thresholds: &Thresholds, max_rows: usize) -> bool {
        let touched = || groups.iter().filter_map(|group| self.by_group.get(group));
        let has_vector = |id: &FileId| self.shape(*id).is_some_and(|f| f.has_vector());
        touched().any(|ids| thresholds.crowded(ids.len(), self.taken(ids, thresholds, max_rows, Purge::No).len()))
            || thresholds.over_vectors(self.files_with_vectors(), touched().any(|ids| ids.iter().any(has_vector)))
    }

    /// Live files with a deletion vector, table-wide: each is one more vector every
    /// reader of the table loads.
    pub fn files_with_vectors(&self) -> usize {
        self.files.values().filter(|f| !f.deleted.is_empty()).count()
    }

    /// Of `ids`, the files compaction would rewrite, in id order.
    fn taken(&self, ids: &HashSet<FileId>, thresholds: &Thresholds, max_rows: usize, purge: Purge) -> Vec<FileId> {
        let mut taken: Vec<FileId> = ids
            .iter()
            .copied()
            .filter(|id| self.shape(*id).is_some_and(|f| thresholds.takes(f, max_rows, purge)))
            .collect();
        taken.sort_unstable();
        taken
    }

    /// A live file's shape, as the compaction policy sees it.
    fn shape(&self, id: FileId) -> Option<FileShape> {
        self.files.get(&id).map(|f| FileShape { rows: f.rows, hidden: f.deleted.len() as usize })
    }

    /// The Kafka partitions that own files.
    pub fn owners(&self) -> Vec<TopicPartition> {
        let owners: BTreeSet<&TopicPartition> = self.by_group.keys().filter_map(|g| g.owner.as_ref()).collect();
        owners.into_iter().cloned().collect()
    }

    /// Keys indexed.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.iter().filter(|(_, slot)| self.files.contains_key(&slot.file)).count()
    }
}

impl KeyIndex {
    /// The files a merge of `rows` touches: those holding their keys (and any key held
    /// twice), and for each group that gains keys the smallest file below `max_rows`
    /// that takes them in (the hosts, also returned on their own).
    pub fn files_for(
        &self,
        rows: &[&PositionUpdate],
        layout: PartitionBy,
        key_columns: &[KeyColumn],
        max_rows: usize,
    ) -> (BTreeSet<FileId>, BTreeSet<FileId>) {
        let mut touched: BTreeSet<FileId> = BTreeSet::new();
        let mut gaining: BTreeSet<FileGroup> = BTreeSet::new();
        for row in rows {
            let target = FileGroup::of(layout, &row.symbol, row.source.tp.clone());
            match self.file_of(&row.key(key_columns)) {
                Some(id) if self.file(id).is_some_and(|f| f.group == target) => {
                    touched.insert(id);
                }
                Some(id) => {
                    touched.insert(id);
                    gaining.insert(target);
                }
                None => {
                    gaining.insert(target);
                }
            }
        }
        let duplicated: Vec<(RowKey, Slot)> = self.duplicates().collect();
        for (key, slot) in duplicated {
            touched.insert(slot.file);
            touched.extend(self.file_of(&key));
        }
        let hosts: BTreeSet<FileId> = gaining.iter().filter_map(|g| self.smallest_in(g, max_rows)).collect();
        touched.extend(hosts.iter().copied());
        (touched, hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(conid: i64) -> RowKey {
        RowKey { conid, ..RowKey::default() }
    }

    fn group(partition: i32) -> FileGroup {
        FileGroup { symbol: None, owner: Some(TopicPartition::new("positions", partition)) }
    }

    fn live(path: &str) -> LiveFile {
        LiveFile { path: path.to_string(), deletion_vector: None }
    }

    fn stamp(timestamp: i64) -> Stamp {
        Stamp { timestamp, offset: 0, source: 0 }
    }

    /// Adds a file holding `keys` at rows 0, 1, …
    fn add(index: &mut KeyIndex, path: &str, group: FileGroup, keys: impl IntoIterator<Item = RowKey>) -> FileId {
        let rows: Vec<Row> =
            keys.into_iter().enumerate().map(|(row, key)| Row { row: row as u32, key, stamp: stamp(1) }).collect();
        index.add_file(live(path), group, rows.len(), RoaringTreemap::new(), rows)
    }

    #[test]
    fn an_exported_index_imports_alike_and_an_inconsistent_one_is_refused() {
        let mut index = KeyIndex::default();
        assert!(index.export().is_none(), "never brought to a version");
        let p1 = index.source("positions", 1);
        let a = add(&mut index, "a", group(0), [key(1), key(2)]);
        let b = add(&mut index, "b", group(1), [key(2), key(3)]);
        index.hide_rows(b, "u1".into(), &[1u64].into_iter().collect());
        index.brought_to(4);
        let parts = index.export().expect("brought to version 4");
        assert_eq!(parts.version, 4);
        let mut imported = KeyIndex::import(parts.clone()).expect("consistent");
        for conid in 1..=4 {
            assert_eq!(imported.slot_of(&key(conid)), index.slot_of(&key(conid)), "key {conid}");
        }
        assert_eq!(imported.duplicates().map(|(k, s)| (k.conid, s.file)).collect::<Vec<_>>(), vec![(2, a)]);
        assert_eq!(imported.file(b), index.file(b));
        assert_eq!(imported.source("positions", 1), p1);
        let c = add(&mut imported, "c", group(0), [key(9)]);
        assert!(c > b, "new files get new numbers");
        let mut unknown_file = parts.clone();
        unknown_file.files.retain(|(id, _)| *id != b);
        assert!(KeyIndex::import(unknown_file).is_err());
        let mut past_the_end = parts.clone();
        past_the_end.keys.rows[0] = 2;
        assert!(KeyIndex::import(past_the_end).is_err());
        let mut unknown_source = parts;
        unknown_source.keys.sources[0] = 5;
        assert!(KeyIndex::import(unknown_source).is_err());
    }

    #[test]
    fn unsaved_counts_what_a_start_from_the_last_saved_index_would_read() {
        let mut index = KeyIndex::default();
        index.source("positions", 0);
        let a = add(&mut index, "a", group(0), [key(1), key(2)]);
        add(&mut index, "b", group(1), [key(3)]);
        assert_eq!(index.unsaved(), (2, 3), "nothing saved yet: every file");
        index.brought_to(1);
        let parts = index.export().expect("brought to a version");
        index.saved_with(&parts.files);
        assert_eq!(index.unsaved(), (0, 0));
        add(&mut index, "c", group(0), [key(4), key(5), key(6)]);
        assert_eq!(index.unsaved(), (1, 3), "a file added since");
        index.hide_rows(a, "v1".into(), &[0u64].into_iter().collect());
        assert_eq!(index.unsaved(), (2, 5), "a file whose deletion vector changed since");
        let read = KeyIndex::import(parts).expect("consistent");
        assert_eq!(read.unsaved(), (0, 0), "an index read from beside the table is saved");
    }

    #[test]
    fn sync_returns_only_unknown_files_and_forgets_removed_ones() {
        let mut index = KeyIndex::default();
        let mut unknown = index.sync(&[live("a.parquet"), live("b.parquet")]);
        unknown.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(unknown, vec![live("a.parquet"), live("b.parquet")]);
        let a = add(&mut index, "a.parquet", group(0), [key(1), key(2)]);
        add(&mut index, "b.parquet", group(1), [key(3)]);
        assert_eq!(index.sync(&[live("a.parquet"), live("b.parquet")]), Vec::<LiveFile>::new());
        assert_eq!(index.file_of(&key(1)), Some(a));
        assert_eq!(index.sync(&[live("b.parquet"), live("c.parquet")]), vec![live("c.parquet")]);
        assert_eq!(index.file_of(&key(1)), None, "a key of a removed file is absent");
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn files_added_at_once_index_like_files_added_one_by_one() {
        // Enough keys for one sorted merge; keys 0..1000 are in every file, so the
        // later file's row wins and the one before it is the duplicate.
        let files: Vec<(String, Vec<RowKey>)> = (0..4)
            .map(|f| (format!("f{f}"), (0..1000).chain(1000 + f * 20_000..1000 + (f + 1) * 20_000).map(key).collect()))
            .collect();
        let mut one_by_one = KeyIndex::default();
        for (path, keys) in &files {
            add(&mut one_by_one, path, group(0), keys.iter().cloned());
        }
        let mut at_once = KeyIndex::default();
        let added = files
            .iter()
            .map(|(path, keys)| {
                let rows: Vec<Row> = keys
                    .iter()
                    .enumerate()
                    .map(|(row, k)| Row { row: row as u32, key: k.clone(), stamp: stamp(1) })
                    .collect();
                (live(path), group(0), rows.len(), RoaringTreemap::new(), rows)
            })
            .collect();
        at_once.add_files(added);
        for conid in (0..81_000).step_by(7) {
            assert_eq!(at_once.slot_of(&key(conid)), one_by_one.slot_of(&key(conid)), "key {conid}");
        }
        let duplicates = |index: &KeyIndex| {
            let mut found: Vec<(i64, FileId)> = index.duplicates().map(|(k, slot)| (k.conid, slot.file)).collect();
            found.sort_unstable();
            found
        };
        assert_eq!(duplicates(&at_once), duplicates(&one_by_one));
        assert_eq!(duplicates(&at_once).len(), 1000);
        assert_eq!(at_once.len(), 81_000);
    }

    #[test]
    fn a_file_whose_deletion_vector_another_writer_changed_is_read_again() {
        let mut index = KeyIndex::default();
        add(&mut index, "a.parquet", group(0), [key(1), key(2)]);
        let changed = LiveFile { path: "a.parquet".into(), deletion_vector: Some("uXYZ@1".into()) };
        assert_eq!(index.sync(std::slice::from_ref(&changed)), vec![changed.clone()]);
        assert_eq!(index.file_of(&key(1)), None, "its rows are read again with the vector applied");
        let rows = vec![Row { row: 1, key: key(2), stamp: stamp(1) }];
        let a = index.add_file(changed.clone(), group(0), 2, [0u64].into_iter().collect(), rows);
        assert_eq!(index.sync(std::slice::from_ref(&changed)), Vec::<LiveFile>::new());
        assert_eq!(index.slot_of(&key(2)).map(|s| (s.file, s.row)), Some((a, 1)));
        assert_eq!(index.file(a).map(IndexedFile::live_rows), Some(1));
    }

    #[test]
    fn a_key_moved_to_a_new_file_follows_it() {
        let mut index = KeyIndex::default();
        let a = add(&mut index, "a", group(0), [key(1), key(2)]);
        index.remove_file(a);
        let b = add(&mut index, "b", group(0), [key(1), key(2)]);
        assert_eq!(index.file_of(&key(2)), Some(b));
        assert_eq!(index.duplicates().count(), 0);
    }

    #[test]
    fn a_key_in_two_live_files_is_a_duplicate_until_one_is_removed() {
        let mut index = KeyIndex::default();
        let a = add(&mut index, "a", group(0), [key(1)]);
        let b = add(&mut index, "b", group(1), [key(1)]);
        assert_eq!(index.file_of(&key(1)), Some(b));
        assert_eq!(index.duplicates().map(|(k, slot)| (k, slot.file)).collect::<Vec<_>>(), vec![(key(1), a)]);
        index.remove_file(b);
        assert_eq!(index.duplicates().count(), 0);
        assert_eq!(index.file_of(&key(1)), Some(a), "the other copy is the key's row again");
    }

    #[test]
    fn hiding_a_duplicate_row_resolves_it() {
        let mut index = KeyIndex::default();
        let a = add(&mut index, "a", group(0), [key(1), key(2)]);
        let b = add(&mut index, "b", group(1), [key(1)]);
        index.hide_rows(b, "u1".into(), &[0u64].into_iter().collect());
        assert_eq!(index.duplicates().count(), 0);
        assert_eq!(index.slot_of(&key(1)).map(|s| (s.file, s.row)), Some((a, 0)));
        index.hide_rows(a, "u1".into(), &[0u64].into_iter().collect());
        assert_eq!(index.file(a).map(|f| (f.live_rows(), f.deletion_vector.clone())), Some((1, Some("u1".into()))));
    }

    #[test]
    fn stamps_compare_by_time_then_offset_then_topic_and_partition() {
        let mut index = KeyIndex::default();
        let (p0, p1) = (index.source("positions", 0), index.source("positions", 1));
        assert_eq!(index.source("positions", 1), p1, "a partition keeps its number");
        let at = |timestamp, offset, source| Stamp { timestamp, offset, source };
        assert_eq!(index.compare(&at(2, 0, p0), &at(1, 9, p1)), Ordering::Greater);
        assert_eq!(index.compare(&at(1, 3, p0), &at(1, 4, p0)), Ordering::Less);
        assert_eq!(index.compare(&at(1, 3, p1), &at(1, 3, p0)), Ordering::Greater);
        assert_eq!(index.compare(&at(1, 3, p0), &at(1, 3, p0)), Ordering::Equal);
    }

    #[test]
    fn new_keys_go_to_the_smallest_file_with_room() {
        let mut index = KeyIndex::default();
        add(&mut index, "big", group(0), (0..10).map(key));
        let small = add(&mut index, "small", group(0), (10..13).map(key));
        add(&mut index, "other", group(1), [key(20)]);
        assert_eq!(index.smallest_in(&group(0), 100), Some(small));
        assert_eq!(index.smallest_in(&group(0), 3), None, "every file is full");
        assert_eq!(index.smallest_in(&group(2), 100), None);
    }

    fn policy(min_files: usize, hidden_fraction: f64) -> Thresholds {
        Thresholds { min_files, hidden_fraction, max_files: 32, max_vectors: 128 }
    }

    #[test]
    fn only_an_owned_group_of_enough_files_that_fit_in_fewer_is_compacted() {
        let mut index = KeyIndex::default();
        let a = add(&mut index, "a", group(0), (0..2).map(key));
        let b = add(&mut index, "b", group(0), (2..4).map(key));
        add(&mut index, "c", group(1), [key(10)]);
        add(&mut index, "d", group(1), [key(11)]);
        let owned = [TopicPartition::new("positions", 0)];
        assert_eq!(index.groups_to_compact(&owned, &policy(2, 0.3), 100, Purge::No), vec![(group(0), vec![a, b])]);
        assert!(
            index.groups_to_compact(&owned, &policy(3, 0.3), 100, Purge::No).is_empty(),
            "fewer files than the threshold"
        );
        assert!(
            index.groups_to_compact(&owned, &policy(2, 0.3), 2, Purge::No).is_empty(),
            "two full files cannot be fewer"
        );
        index.hide_rows(a, "u1".into(), &[0u64].into_iter().collect());
        assert_eq!(
            index.groups_to_compact(&owned, &policy(3, 0.5), 2, Purge::No),
            vec![(group(0), vec![a])],
            "a file with half its rows hidden is rewritten alone"
        );
    }

    #[test]
    fn a_group_is_crowded_past_the_most_files_compaction_would_pack() {
        let mut index = KeyIndex::default();
        let small: Vec<FileId> = (0..3).map(|i| add(&mut index, &format!("s{i}"), group(0), [key(i)])).collect();
        add(&mut index, "full", group(0), (10..20).map(key));
        let groups: BTreeSet<FileGroup> = [group(0)].into();
        assert!(
            index.crowded(&groups, &Thresholds { max_files: 2, ..policy(4, 0.3) }, 10),
            "three small files, two allowed"
        );
        assert!(
            !index.crowded(&groups, &Thresholds { max_files: 3, ..policy(4, 0.3) }, 10),
            "the full file is not packed, so it does not count"
        );
        assert!(
            !index.crowded(&[group(1)].into(), &Thresholds { max_files: 0, ..policy(4, 0.3) }, 10),
            "a group without files"
        );
        assert_eq!(small.len(), 3);
    }
}
