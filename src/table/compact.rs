//! Compaction of one worker's files, carried out: the files the policy chooses
//! ([`crate::maintenance::compaction`]: a group's small files that fit in fewer, files
//! mostly hidden by deletion vectors, every file with a vector when the table holds too
//! many) are read, written packed without their hidden rows, and committed on their own.
//!
//! Invariants kept here:
//! - Only the files of the Kafka partitions passed in (the worker's own) are touched,
//!   so the single-writer rule holds: no other worker writes them.
//! - The commit records no offset; it declares the files it removes, so a concurrent
//!   commit that removed any of them makes it conflict, and the compaction is dropped
//!   (its files are orphans vacuum takes). Its removes say `dataChange: true` (it drops
//!   the older copy of a key held twice), so a flush that revised one of its files
//!   meanwhile conflicts in turn and is made again on the compacted files: a removed
//!   file never comes back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::commit::{Changes, CommitKind};
use super::key_index::FileId;
use super::merge;
use super::{PositionTable, TableError};
use crate::maintenance::compaction::Thresholds;
use crate::offsets::TopicPartition;

/// What one compaction did.
#[derive(Debug, Clone, Default)]
pub struct CompactionReport {
    /// Groups compacted.
    pub groups: usize,
    /// Files removed.
    pub files_removed: usize,
    /// Files added in their place.
    pub files_added: usize,
    /// Rows rewritten.
    pub rows: usize,
    /// Bytes of the files added.
    pub bytes_written: u64,
    /// Whether a commit was made.
    pub committed: bool,
    /// Time spent.
    pub elapsed: Duration,
}

impl PositionTable {
    /// The Kafka partitions (of `partitions`, or all) with groups worth compacting, and
    /// how many files each would pack.
    ///
    /// # Errors
    /// [`TableError::Read`] when the table cannot be read.
    pub async fn compaction_candidates(
        &self,
        partitions: Option<&[TopicPartition]>,
        thresholds: Thresholds,
    ) -> Result<Vec<(TopicPartition, usize)>, TableError> {
        let fresh = self.refreshed().await?;
        let index = fresh.index.clone();
        let mut index = index.lock().await;
        fresh.sync_index(&mut index).await?;
        let owners: Vec<TopicPartition> = match partitions {
            Some(partitions) => partitions.to_vec(),
            None => index.owners(),
        };
        let mut files: std::collections::BTreeMap<TopicPartition, usize> = std::collections::BTreeMap::new();
        let purge = thresholds.purge(index.files_with_vectors());
        for (group, ids) in index.groups_to_compact(&owners, &thresholds, fresh.max_rows_per_file, purge) {
            if let Some(owner) = group.owner {
                *files.entry(owner).or_default() += ids.len();
            }
        }
        Ok(files.into_iter().collect())
    }

    /// Compacts the groups of `partitions`' files that have at least `min_files` files
    /// whose rows fit in fewer, in one commit on top of the latest version. Returns the
    /// handle at the version written.
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`]; a conflict with another commit is
    /// a [`TableError::Write`] whose [`TableError::is_conflict`] is true, and nothing
    /// of the compaction is visible then.
    pub async fn compact(
        &self,
        partitions: &[TopicPartition],
        thresholds: Thresholds,
    ) -> Result<(PositionTable, CompactionReport), TableError> {
        let started = Instant::now();
        let mut fresh = self.refreshed().await?;
        let index = fresh.index.clone();
        let mut index = index.lock().await;
        fresh.sync_index(&mut index).await?;
        let purge = thresholds.purge(index.files_with_vectors());
        let groups = index.groups_to_compact(partitions, &thresholds, fresh.max_rows_per_file, purge);
        if groups.is_empty() {
            return Ok((fresh, CompactionReport { elapsed: started.elapsed(), ..CompactionReport::default() }));
        }
        let files: BTreeSet<FileId> = groups.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
        let touched = fresh.read_touched(&index, &files, &BTreeSet::new()).await?;
        let rows: usize = touched.iter().map(|f| f.rows.num_rows()).sum();
        let write_err = TableError::on_write(&fresh.uri, rows);
        let plan = merge::pack(&touched, fresh.layout, &fresh.key_columns, fresh.max_rows_per_file)
            .map_err(|e| write_err(e.into()))?;
        drop(touched);
        let writing = Instant::now();
        let adds = fresh.write_files(&plan.files).await?;
        #[cfg(feature = "fault-injection")]
        crate::faults::maybe_abort_before_compaction_commit();
        let owners: Vec<TopicPartition> =
            groups.iter().filter_map(|(group, _)| group.owner.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let changes = Changes { removed: &plan.rewritten, added: &adds, writing, ..Changes::default() };
        fresh.commit(CommitKind::Compaction, &owners, changes, Vec::new(), &index).await.map_err(&write_err)?;
        for id in &plan.rewritten {
            index.remove_file(*id);
        }
        let report = CompactionReport {
            groups: groups.len(),
            files_removed: plan.rewritten.len(),
            files_added: adds.len(),
            rows: plan.files.iter().map(|f| f.rows.num_rows()).sum(),
            bytes_written: adds.iter().map(|a| a.size.max(0) as u64).sum(),
            committed: true,
            elapsed: Duration::ZERO,
        };
        let _grown = super::index_new_files(&mut index, &adds, plan.files).map_err(|e| write_err(e.into()))?;
        fresh.table.update_state().await.map_err(&write_err)?;
        Ok((fresh.clone(), CompactionReport { elapsed: started.elapsed(), ..report }))
    }
}
