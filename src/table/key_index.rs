//! Which live data file of the positions table holds each key, so that a flush reads
//! and rewrites only the files its keys are in. Pure: the table module reads the files
//! and feeds their keys in.
//!
//! Invariant kept here: after [`KeyIndex::sync`] with the table's live files and
//! [`KeyIndex::add_file`] for each file it did not know, every key of the table maps to
//! a live file that holds it. A key found in two live files (two workers inserted it at
//! once) is remembered as a duplicate until a flush rewrites one of them.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::config::PartitionBy;
use crate::offsets::TopicPartition;
use crate::update::{KeyColumn, PositionUpdate, RowKey};

/// A data file's number in the index.
pub type FileId = u32;

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
#[derive(Debug, Clone)]
pub struct IndexedFile {
    /// The path relative to the table root, as in the Delta log.
    pub path: String,
    /// The rows it may hold.
    pub group: FileGroup,
    /// Rows in the file.
    pub rows: usize,
}

/// Keys → live files, kept current from the table's log.
#[derive(Debug, Default)]
pub struct KeyIndex {
    keys: HashMap<RowKey, FileId, foldhash::fast::RandomState>,
    files: HashMap<FileId, IndexedFile>,
    by_path: HashMap<String, FileId>,
    by_group: HashMap<FileGroup, HashSet<FileId>>,
    duplicates: HashMap<RowKey, FileId, foldhash::fast::RandomState>,
    next_id: FileId,
}

impl KeyIndex {
    /// Forgets the files that are no longer live and returns the live paths it does not
    /// know yet, for the caller to read and pass to [`KeyIndex::add_file`].
    pub fn sync<'a>(&mut self, live: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let live: HashSet<&str> = live.into_iter().collect();
        let gone: Vec<FileId> =
            self.by_path.iter().filter(|(path, _)| !live.contains(path.as_str())).map(|(_, id)| *id).collect();
        for id in &gone {
            self.forget(*id);
        }
        if !gone.is_empty() {
            let files = &self.files;
            self.keys.retain(|_, id| files.contains_key(id));
            self.duplicates.retain(|_, id| files.contains_key(id));
        }
        live.into_iter().filter(|path| !self.by_path.contains_key(*path)).map(str::to_string).collect()
    }

    /// Records a live file and the keys it holds. A key already held by another live
    /// file is kept as a duplicate to resolve.
    pub fn add_file(&mut self, path: String, group: FileGroup, keys: impl IntoIterator<Item = RowKey>) -> FileId {
        let id = self.next_id;
        self.next_id += 1;
        let mut rows = 0;
        for key in keys {
            rows += 1;
            if let Some(previous) = self.keys.insert(key.clone(), id)
                && previous != id
                && self.files.contains_key(&previous)
            {
                self.duplicates.insert(key, previous);
            }
        }
        self.by_path.insert(path.clone(), id);
        self.by_group.entry(group.clone()).or_default().insert(id);
        self.files.insert(id, IndexedFile { path, group, rows });
        id
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
        self.duplicates.retain(|_, file| *file != id);
    }

    /// The live file that holds `key`.
    pub fn file_of(&self, key: &RowKey) -> Option<FileId> {
        self.keys.get(key).copied().filter(|id| self.files.contains_key(id))
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
            .filter_map(|id| self.files.get(id).map(|f| (*id, f.rows)))
            .filter(|(_, rows)| *rows < max_rows)
            .min_by_key(|(id, rows)| (*rows, *id))
            .map(|(id, _)| id)
    }

    /// Files holding a second copy of a key, with the key: a flush touching these
    /// files keeps only the newest row.
    pub fn duplicates(&self) -> impl Iterator<Item = (&RowKey, FileId)> {
        self.duplicates.iter().map(|(key, id)| (key, *id))
    }

    /// The groups of `owners`' files worth compacting: at least `min_files` files whose
    /// rows fit in fewer files of `max_rows` rows. Each group's files, smallest groups
    pub fn groups_to_compact(
        &self,
        owners: &[TopicPartition],
        min_files: usize,
        max_rows: usize,
    ) -> Vec<(FileGroup, Vec<FileId>)> {
        let mut found: Vec<(FileGroup, Vec<FileId>)> = self
            .by_group
            .iter()
            .filter(|(group, ids)| {
                group.owner.as_ref().is_some_and(|owner| owners.contains(owner)) && ids.len() >= min_files.max(2)
            })
            .filter_map(|(group, ids)| {
                let rows: usize = ids.iter().filter_map(|id| self.files.get(id)).map(|f| f.rows).sum();
                let mut ids: Vec<FileId> = ids.iter().copied().collect();
                ids.sort_unstable();
                (rows.div_ceil(max_rows.max(1)) < ids.len()).then(|| (group.clone(), ids))
            })
            .collect();
        found.sort();
        found
    }

    /// The Kafka partitions that own files.
    pub fn owners(&self) -> Vec<TopicPartition> {
        let owners: BTreeSet<&TopicPartition> = self.by_group.keys().filter_map(|g| g.owner.as_ref()).collect();
        owners.into_iter().cloned().collect()
    }

    /// Keys indexed.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
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
        let duplicated: Vec<(RowKey, FileId)> = self.duplicates().map(|(k, id)| (k.clone(), id)).collect();
        for (key, id) in duplicated {
            touched.insert(id);
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

    #[test]
    fn sync_returns_only_unknown_files_and_forgets_removed_ones() {
        let mut index = KeyIndex::default();
        let mut unknown = index.sync(["a.parquet", "b.parquet"]);
        unknown.sort();
        assert_eq!(unknown, vec!["a.parquet", "b.parquet"]);
        let a = index.add_file("a.parquet".into(), group(0), [key(1), key(2)]);
        index.add_file("b.parquet".into(), group(1), [key(3)]);
        assert_eq!(index.sync(["a.parquet", "b.parquet"]), Vec::<String>::new());
        assert_eq!(index.file_of(&key(1)), Some(a));
        assert_eq!(index.sync(["b.parquet", "c.parquet"]), vec!["c.parquet"]);
        assert_eq!(index.file_of(&key(1)), None, "a key of a removed file is absent");
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn a_key_moved_to_a_new_file_follows_it() {
        let mut index = KeyIndex::default();
        let a = index.add_file("a".into(), group(0), [key(1), key(2)]);
        index.remove_file(a);
        let b = index.add_file("b".into(), group(0), [key(1), key(2)]);
        assert_eq!(index.file_of(&key(2)), Some(b));
        assert_eq!(index.duplicates().count(), 0);
    }

    #[test]
    fn a_key_in_two_live_files_is_a_duplicate_until_one_is_removed() {
        let mut index = KeyIndex::default();
        let a = index.add_file("a".into(), group(0), [key(1)]);
        let b = index.add_file("b".into(), group(1), [key(1)]);
        assert_eq!(index.file_of(&key(1)), Some(b));
        assert_eq!(index.duplicates().collect::<Vec<_>>(), vec![(&key(1), a)]);
        index.remove_file(a);
        assert_eq!(index.duplicates().count(), 0);
    }

    #[test]
    fn new_keys_go_to_the_smallest_file_with_room() {
        let mut index = KeyIndex::default();
        index.add_file("big".into(), group(0), (0..10).map(key));
        let small = index.add_file("small".into(), group(0), (10..13).map(key));
        index.add_file("other".into(), group(1), [key(20)]);
        assert_eq!(index.smallest_in(&group(0), 100), Some(small));
        assert_eq!(index.smallest_in(&group(0), 3), None, "every file is full");
        assert_eq!(index.smallest_in(&group(2), 100), None);
    }

    #[test]
    fn only_an_owned_group_of_enough_files_that_fit_in_fewer_is_compacted() {
        let mut index = KeyIndex::default();
        let a = index.add_file("a".into(), group(0), (0..2).map(key));
        let b = index.add_file("b".into(), group(0), (2..4).map(key));
        index.add_file("c".into(), group(1), [key(10)]);
        index.add_file("d".into(), group(1), [key(11)]);
        let owned = [TopicPartition::new("positions", 0)];
        assert_eq!(index.groups_to_compact(&owned, 2, 100), vec![(group(0), vec![a, b])]);
        assert!(index.groups_to_compact(&owned, 3, 100).is_empty(), "fewer files than the threshold");
        assert!(index.groups_to_compact(&owned, 2, 2).is_empty(), "two full files cannot be fewer");
    }
}
