//! The commit of one flush: the files it rewrote removed, the files whose rows it hid
//! re-added with their new deletion vectors, the new ones added, one `txn` per Kafka
//! partition it covers, and the read set it declares, so that delta-rs lets it through
//! when another worker committed only other partitions' files meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

use deltalake::DeltaTableError;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, DeletionVectorDescriptor, Transaction};
use deltalake::protocol::{DeltaOperation, MergePredicate};

use super::PositionTable;
use super::key_index::{FileId, KeyIndex};
use crate::offsets::TopicPartition;

/// The `commitInfo` entry that marks a compaction (its operation is a `MERGE` that
/// changes no data).
pub const COMPACTION_MARK: (&str, &str) = ("positionSink", "compaction");

/// What a commit of the positions table does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitKind {
    /// A flush: rows changed, offsets recorded, its rows stamped `ingested_at` (µs).
    Flush { ingested_at_micros: i64 },
    /// A compaction: the rows in fewer files, no offsets.
    Compaction,
}

/// The data files one commit changes.
#[derive(Debug)]
pub(super) struct Changes<'a> {
    /// Files removed.
    pub removed: &'a [FileId],
    /// Files whose rows the commit hides: removed with their old deletion vector and
    /// added back with the new one.
    pub revised: &'a [(FileId, DeletionVectorDescriptor)],
    /// New files.
    pub added: &'a [Add],
    /// When the writer began writing the new files (and deletion-vector file).
    pub writing: Instant,
}

impl Default for Changes<'_> {
    fn default() -> Self {
        Self { removed: &[], revised: &[], added: &[], writing: Instant::now() }
    }
}

impl PositionTable {
    /// Commits `changes` and the `transactions` on top of this handle's version,
    /// reading the files of `partitions`.
    ///
    /// # Errors
    /// When the commit conflicts with another writer's, or storage fails.
    pub(super) async fn commit(
        &self,
        kind: CommitKind,
        partitions: &[TopicPartition],
        changes: Changes<'_>,
        transactions: Vec<Transaction>,
        index: &KeyIndex,
    ) -> Result<(), DeltaTableError> {
        let path_of = |id: &FileId| index.file(*id).map(|f| f.path.as_str());
        let removed_paths: HashSet<&str> = changes.removed.iter().filter_map(path_of).collect();
        let revised: HashMap<&str, (&DeletionVectorDescriptor, usize)> =
            changes.revised.iter().filter_map(|(id, dv)| Some((path_of(id)?, (dv, index.file(*id)?.rows)))).collect();
        let snapshot = self.table.snapshot()?;
        // Every commit says `dataChange: true`, compactions too: a compaction drops the
        // older copy of a key held twice (a reader sees that), and delta-rs's conflict
        // checker ignores removes that say false, so a flush that revised or removed a
        // file a compaction removed meanwhile would commit and bring it back.
        let data_change = true;
        let mut actions: Vec<Action> = Vec::new();
        for view in snapshot.log_data().iter() {
            let path = view.path();
            if removed_paths.contains(path.as_ref()) {
                actions.push(Action::Remove(deltalake::kernel::Remove { data_change, ..view.remove_action(true) }));
            } else if let Some((dv, rows)) = revised.get(path.as_ref()) {
                actions.push(Action::Remove(deltalake::kernel::Remove { data_change, ..view.remove_action(true) }));
                #[expect(deprecated, reason = "the file's add action, re-added with its new deletion vector")]
                let add = view.add_action();
                let stats = Some(loose_statistics(add.stats.as_deref(), *rows));
                actions.push(Action::Add(Add {
                    data_change,
                    deletion_vector: Some((*dv).clone()),
                    stats,
                    modification_time: chrono::Utc::now().timestamp_millis(),
                    ..add
                }));
            }
        }
        actions.extend(changes.added.iter().cloned().map(|add| Action::Add(Add { data_change, ..add })));
        let rewritten: Vec<FileId> =
            changes.removed.iter().copied().chain(changes.revised.iter().map(|(id, _)| *id)).collect();
        let rewritten = rewritten.as_slice();
        let operation = match kind {
            CommitKind::Flush { .. } => self.operation(partitions, rewritten, index),
            // delta-rs takes the read set from a MERGE's predicate (an OPTIMIZE would
            // declare the whole table read, and conflict with every other worker's flush).
            CommitKind::Compaction => DeltaOperation::Merge {
                predicate: partitions_predicate(partitions),
                merge_predicate: None,
                matched_predicates: Vec::new(),
                not_matched_predicates: Vec::new(),
                not_matched_by_source_predicates: Vec::new(),
            },
        };
        let read_version = serde_json::json!(snapshot.version());
        let mut metadata = vec![("readVersion".to_string(), read_version)];
        match kind {
            CommitKind::Compaction => {
                metadata.push((COMPACTION_MARK.0.to_string(), serde_json::json!(COMPACTION_MARK.1)));
            }
            CommitKind::Flush { ingested_at_micros } => {
                metadata.push((crate::delta::INGESTED_AT_KEY.to_string(), serde_json::json!(ingested_at_micros)));
            }
        }
        let properties = CommitProperties::default()
            .with_metadata(metadata)
            .with_application_transactions(transactions)
            // Log cleanup is maintenance's (one worker, on a schedule), not every commit's;
            // checkpoints stay with the commit that reaches delta.checkpointInterval.
            .with_cleanup_expired_logs(Some(false));
        // Vacuum takes a file no commit names once it is `unreferenced_file_age` old: a
        // commit starts only within the deadline of its files' first write and is given
        // up (its outcome then decided by the table's records) when it takes longer.
        let deadline = self.write_deadline;
        let remaining = deadline.checked_sub(changes.writing.elapsed()).filter(|r| !r.is_zero());
        let Some(remaining) = remaining else { return Err(past_deadline(changes.writing, deadline)) };
        let commit = CommitBuilder::from(properties).with_actions(actions).build(
            Some(snapshot),
            self.table.log_store(),
            operation,
        );
        match tokio::time::timeout(remaining, commit).await {
            Ok(committed) => committed.map(|_| ()),
            Err(_) => Err(past_deadline(changes.writing, deadline)),
        }
    }

    /// The commit's operation: a merge whose read set is the files of the partitions it
    /// writes (and of any file it rewrites), so delta-rs lets it through when another
    /// worker committed only other partitions' files in the meantime.
    fn operation(&self, partitions: &[TopicPartition], rewritten: &[FileId], index: &KeyIndex) -> DeltaOperation {
        let mut owners: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
        let rewritten_owners = rewritten.iter().filter_map(|id| index.file(*id)?.group.owner.as_ref());
        let mut whole_table = rewritten.iter().any(|id| index.file(*id).is_some_and(|f| f.group.owner.is_none()));
        for tp in partitions.iter().chain(rewritten_owners) {
            whole_table |= !is_plain_name(&tp.topic);
            owners.entry(tp.topic.as_str()).or_default().insert(tp.partition.0);
        }
        let predicate = (!whole_table && !owners.is_empty()).then(|| owners_predicate(&owners));
        let keys: Vec<&str> = self.key_columns.iter().map(|k| k.name()).collect();
        DeltaOperation::Merge {
            predicate,
            merge_predicate: Some(
                keys.iter().map(|k| format!("target.{k} = source.{k}")).collect::<Vec<_>>().join(" AND "),
            ),
            matched_predicates: vec![MergePredicate {
                action_type: "update".into(),
                predicate: Some("source is newer (timestamp, kafka_offset, kafka_topic, kafka_partition)".into()),
            }],
            not_matched_predicates: vec![MergePredicate { action_type: "insert".into(), predicate: None }],
            not_matched_by_source_predicates: Vec::new(),
        }
    }
}

/// A data file's statistics once a deletion vector hides some of its rows: the
/// minimums and maximums may name hidden rows, so they are marked as not tight, and
/// `numRecords`, which the protocol requires of a file with a deletion vector, is the
/// file's physical count (`rows`, read from the file when another engine committed it
/// without statistics).
fn loose_statistics(stats: Option<&str>, rows: usize) -> String {
    let mut fields = match stats.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(serde_json::Value::Object(fields))) => fields,
        _ => serde_json::Map::new(),
    };
    fields.entry("numRecords").or_insert_with(|| serde_json::json!(rows));
    fields.insert("tightBounds".to_string(), serde_json::Value::Bool(false));
    serde_json::Value::Object(fields).to_string()
}

/// A write that could not commit within its deadline.
fn past_deadline(writing: Instant, deadline: std::time::Duration) -> DeltaTableError {
    DeltaTableError::Generic(format!(
        "the write's files were written {:.1?} ago, longer than the {} a write may take to commit them (a third of \
         maintenance.unreferenced_file_age, after which vacuum may delete files no commit names); the write is not \
         committed and is made again. If storage is this slow, raise maintenance.unreferenced_file_age on every \
         worker and for position-sink maintain",
        writing.elapsed(),
        humantime::format_duration(deadline)
    ))
}

/// `(kafka_topic = 't' AND kafka_partition IN (0, 1)) OR ...`.
fn owners_predicate(owners: &BTreeMap<&str, BTreeSet<i32>>) -> String {
    owners
        .iter()
        .map(|(topic, ps)| {
            let list: Vec<String> = ps.iter().map(i32::to_string).collect();
            format!("(kafka_topic = '{topic}' AND kafka_partition IN ({}))", list.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The predicate naming `partitions`' rows, when their topics can be quoted.
fn partitions_predicate(partitions: &[TopicPartition]) -> Option<String> {
    let mut owners: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
    for tp in partitions {
        if !is_plain_name(&tp.topic) {
            return None;
        }
        owners.entry(tp.topic.as_str()).or_default().insert(tp.partition.0);
    }
    (!owners.is_empty()).then(|| owners_predicate(&owners))
}

/// Whether a topic name can be quoted in the conflict predicate as it is (Kafka allows
/// only ASCII letters, digits, `.`, `_` and `-`).
fn is_plain_name(topic: &str) -> bool {
    topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_given_a_vector_always_counts_its_records() {
        let loose = |stats, rows| serde_json::from_str::<serde_json::Value>(&loose_statistics(stats, rows)).unwrap();
        let without = loose(None, 7);
        assert_eq!(without["numRecords"], 7, "{without}");
        assert_eq!(without["tightBounds"], false, "{without}");
        let with = loose(Some(r#"{"numRecords":5,"minValues":{"conid":1}}"#), 7);
        assert_eq!(with["numRecords"], 5, "the file's own count stands: {with}");
        assert_eq!(with["minValues"]["conid"], 1, "{with}");
        assert_eq!(loose(Some(r#"{"minValues":{}}"#), 3)["numRecords"], 3);
    }
}
