//! When a worker compacts its files, and which: the policy, on the shape of each file
//! (rows, rows hidden by a deletion vector). The key index applies it to its groups
//! (`KeyIndex::groups_to_compact`, `KeyIndex::crowded`); the table carries a
//! compaction out (`table/compact.rs`: read the chosen files, write them packed,
//! commit); the worker schedules it (`worker/maintain.rs`) and `position-sink
//! maintain` runs it on demand (`ops/maintain.rs`).
//!
//! A group is a Kafka partition's files of one symbol (or of the whole partition in the
//! `none` layout): one writer, so a compaction never meets another worker's files.

use crate::config::MaintenanceConfig;

/// When a Kafka partition's files are compacted (`maintenance.*`).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// At least this many files of a group that fit in fewer.
    pub min_files: usize,
    /// Or a file with at least this fraction of its rows hidden by a deletion vector.
    pub hidden_fraction: f64,
    /// A flush that leaves a group with more files to pack than this makes compaction
    /// due at once, not only at the next `maintenance.interval`.
    pub max_files: usize,
    /// A flush that leaves the table with more files with a deletion vector than this
    /// makes compaction due at once, and compaction then rewrites every file of the
    /// worker's with a vector without the rows it hides.
    pub max_vectors: usize,
}

impl From<&MaintenanceConfig> for Thresholds {
    fn from(config: &MaintenanceConfig) -> Self {
        Self {
            min_files: config.compaction_min_files,
            hidden_fraction: config.compaction_hidden_fraction,
            max_files: config.compaction_max_files,
            max_vectors: config.compaction_max_vectors,
        }
    }
}

/// A live file as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileShape {
    /// Rows it holds.
    pub rows: usize,
    /// Of them, rows its deletion vector hides.
    pub hidden: usize,
}

impl FileShape {
    /// Rows a reader sees.
    pub fn live_rows(&self) -> usize {
        self.rows.saturating_sub(self.hidden)
    }

    /// Whether a reader loads a deletion vector for it.
    pub fn has_vector(&self) -> bool {
        self.hidden > 0
    }

    /// Whether at least `fraction` of its rows are hidden.
    fn mostly_hidden(&self, fraction: f64) -> bool {
        self.rows > 0 && self.hidden as f64 >= fraction * self.rows as f64
    }
}

/// Whether a compaction also rewrites every file with a deletion vector without the
/// rows it hides (the table holds more files with vectors than readers should load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// Only files that fit in fewer, or mostly hidden.
    No,
    /// Also every file with a vector.
    Vectors,
}

impl Thresholds {
    /// What a compaction purges when the table holds `files_with_vectors`.
    pub fn purge(&self, files_with_vectors: usize) -> Purge {
        if files_with_vectors > self.max_vectors { Purge::Vectors } else { Purge::No }
    }

    /// Whether compaction would rewrite `file`: at most half of `max_rows` live rows,
    /// mostly hidden, or with a vector when purging. Fuller files are left as they are.
    pub fn takes(&self, file: FileShape, max_rows: usize, purge: Purge) -> bool {
        file.live_rows() <= max_rows / 2
            || file.mostly_hidden(self.hidden_fraction)
            || (purge == Purge::Vectors && file.has_vector())
    }

    /// Whether a group's `taken` files (those [`Thresholds::takes`]) are worth a
    /// compaction: at least `min_files` of them whose live rows fit in fewer files of
    /// `max_rows` rows, or one mostly hidden, or one with a vector when purging.
    pub fn worth_compacting(&self, taken: &[FileShape], max_rows: usize, purge: Purge) -> bool {
        let rows: usize = taken.iter().map(FileShape::live_rows).sum();
        let packs = taken.len() >= self.min_files.max(2) && rows.div_ceil(max_rows.max(1)) < taken.len();
        let hidden = taken.iter().any(|f| f.mostly_hidden(self.hidden_fraction));
        let purged = purge == Purge::Vectors && taken.iter().any(FileShape::has_vector);
        packs || hidden || purged
    }

    /// Whether a group of `files` live files, `taken` of them ones compaction would
    /// rewrite, is crowded: a reader of it opens that many small files, or files with
    /// vectors, and compaction is due now.
    pub fn crowded(&self, files: usize, taken: usize) -> bool {
        files > self.max_files && taken > self.max_files
    }

    /// Whether a flush that leaves the table with `files_with_vectors`, some of them in
    /// the groups it touched (`touched_hold_vectors`), makes compaction due now:
    /// compacting those groups purges them.
    pub fn over_vectors(&self, files_with_vectors: usize, touched_hold_vectors: bool) -> bool {
        files_with_vectors > self.max_vectors && touched_hold_vectors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds(min_files: usize, hidden_fraction: f64) -> Thresholds {
        Thresholds { min_files, hidden_fraction, max_files: 2, max_vectors: 1 }
    }

    fn shape(rows: usize, hidden: usize) -> FileShape {
        FileShape { rows, hidden }
    }

    #[test]
    fn enough_small_files_that_fit_in_fewer_are_worth_compacting() {
        let t = thresholds(2, 0.3);
        assert!(t.worth_compacting(&[shape(2, 0), shape(2, 0)], 100, Purge::No));
        assert!(!thresholds(3, 0.3).worth_compacting(&[shape(2, 0), shape(2, 0)], 100, Purge::No));
        assert!(!t.worth_compacting(&[shape(2, 0), shape(2, 0)], 2, Purge::No), "two full files cannot be fewer");
        assert!(thresholds(3, 0.5).worth_compacting(&[shape(2, 1)], 2, Purge::No), "half its rows hidden");
    }

    #[test]
    fn purging_takes_every_file_with_a_vector() {
        let t = thresholds(4, 0.5);
        let large_with_vector = shape(100, 1);
        assert!(!t.takes(large_with_vector, 100, Purge::No), "a full file with a few hidden rows stays");
        assert!(t.takes(large_with_vector, 100, Purge::Vectors));
        assert!(t.worth_compacting(&[large_with_vector], 100, Purge::Vectors));
        assert_eq!(t.purge(1), Purge::No);
        assert_eq!(t.purge(2), Purge::Vectors);
        assert!(t.over_vectors(2, true) && !t.over_vectors(2, false) && !t.over_vectors(1, true));
    }

    #[test]
    fn a_group_is_crowded_past_the_most_files_compaction_would_take() {
        let t = thresholds(2, 0.3);
        assert!(t.crowded(4, 3), "three small files, two allowed");
        assert!(!t.crowded(4, 2), "a full file is not taken, so it does not count");
        assert!(!t.crowded(0, 0));
    }
}
