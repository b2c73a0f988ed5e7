//! Merge-on-read (`delta.write_mode = "deletion_vectors"`): which stored rows a flush
//! hides, the deletion-vector files a flush writes for the files it touches, and
//! reading a file's vector back. The format is Delta's ("Deletion Vector Format" in
//! the protocol), written and read by the Delta kernel delta-rs is built on.
//!
//! Invariants kept here:
//! - A stored row is hidden only when the batch has a strictly newer update for its key
//!   (the same precedence as copy-on-write), or when it is the older copy of a key held
//!   twice; the batch's winners are written as new rows.
//! - A file's new vector is its old one plus the rows hidden now: a hidden row never
//!   comes back.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use buoyant_kernel::actions::deletion_vector_writer::{KernelDeletionVector, StreamingDeletionVectorWriter};
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use deltalake::{DeltaTable, DeltaTableError};
use roaring::RoaringTreemap;

use super::key_index::{FileId, KeyIndex, Slot};
use crate::update::{KeyColumn, PositionUpdate, RowKey};

/// What one flush in deletion-vector mode changes.
#[derive(Debug, Default)]
pub struct HidePlan<'b> {
    /// Batch rows to write as new rows (inserts and updates).
    pub winners: Vec<&'b PositionUpdate>,
    /// Stored rows to hide, by file.
    pub hidden: BTreeMap<FileId, RoaringTreemap>,
    /// Batch rows for keys the table did not hold.
    pub inserted: usize,
    /// Batch rows that replace a stored row.
    pub updated: usize,
    /// Batch rows older than (or equal to) the stored row, dropped.
    pub unchanged: usize,
}

/// Plans a flush of `rows` (one per key) against the rows `index` holds.
pub fn plan<'b>(rows: &[&'b PositionUpdate], index: &KeyIndex, key_columns: &[KeyColumn]) -> HidePlan<'b> {
    let mut plan = HidePlan::default();
    let mut hidden: BTreeMap<FileId, RoaringTreemap> = BTreeMap::new();
    // A key held twice: the older copy goes, the newer one is the stored row.
    let mut stored_of: HashMap<RowKey, Slot> = HashMap::new();
    for (key, copy) in index.duplicates() {
        let Some(main) = index.slot_of(&key) else { continue };
        let (newer, older) = if index.compare(&copy.stamp, &main.stamp).is_gt() { (copy, main) } else { (main, copy) };
        hidden.entry(older.file).or_default().insert(u64::from(older.row));
        stored_of.insert(key, newer);
    }
    for update in rows {
        let key = update.key(key_columns);
        match stored_of.get(&key).copied().or_else(|| index.slot_of(&key)) {
            None => {
                plan.inserted += 1;
                plan.winners.push(update);
            }
            Some(stored) if index.compare_update(update, &stored.stamp).is_gt() => {
                plan.updated += 1;
                hidden.entry(stored.file).or_default().insert(u64::from(stored.row));
                plan.winners.push(update);
            }
            Some(_) => plan.unchanged += 1,
        }
    }
    plan.hidden = hidden;
    plan
}

/// The most bytes of vectors one vector file holds before the next vector starts a new
/// file. Readers (delta-rs's kernel among them) load a vector's whole file to read it,
/// so a reader of a table with `n` files with vectors loads up to `n` times this: one
/// file per flush for every touched file would make that grow with the square of the
/// files a flush touches.
pub const MAX_VECTOR_FILE_BYTES: usize = 64 * 1024;

/// Some of the deletion vectors of one flush, in one file.
#[derive(Debug)]
pub struct VectorFile {
    /// The file's path relative to the table root.
    pub path: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Each file's new descriptor and the rows it hides (old and new).
    pub vectors: Vec<(FileId, DeletionVectorDescriptor, RoaringTreemap)>,
}

/// Writes `vectors` (each file's whole new set of hidden rows) into deletion-vector
/// files at the table root, named as the protocol derives them from a random UUID: a
/// file takes vectors until it holds [`MAX_VECTOR_FILE_BYTES`] (so a file is at most
/// that plus one vector).
///
/// # Errors
/// When a vector cannot be serialized (larger than the format allows).
pub fn write_vectors(vectors: Vec<(FileId, RoaringTreemap)>) -> Result<Vec<VectorFile>, DeltaTableError> {
    let mut files = Vec::new();
    let mut vectors = vectors.into_iter().peekable();
    while vectors.peek().is_some() {
        let uuid = uuid::Uuid::new_v4();
        let mut bytes = Vec::new();
        let mut written = Vec::new();
        {
            let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
            let mut size = 0;
            while size < MAX_VECTOR_FILE_BYTES {
                let Some((id, rows)) = vectors.next() else { break };
                let mut vector = KernelDeletionVector::new();
                vector.add_deleted_row_indexes(rows.iter());
                let result = writer.write_deletion_vector(vector).map_err(kernel_err)?;
                size = result.offset as usize + result.size_in_bytes as usize;
                let descriptor = DeletionVectorDescriptor {
                    storage_type: StorageType::UuidRelativePath,
                    path_or_inline_dv: z85::encode(uuid.as_bytes()),
                    offset: Some(result.offset),
                    size_in_bytes: result.size_in_bytes,
                    cardinality: result.cardinality,
                };
                written.push((id, descriptor, rows));
            }
            writer.finalize().map_err(kernel_err)?;
        }
        files.push(VectorFile { path: format!("deletion_vector_{uuid}.bin"), bytes, vectors: written });
    }
    Ok(files)
}

/// The identity of a deletion vector as the protocol defines it (storage type, path or
/// inline data, offset): a file's logical identity is its path and this.
pub fn unique_id(descriptor: &DeletionVectorDescriptor) -> String {
    let kind = match descriptor.storage_type {
        StorageType::UuidRelativePath => "u",
        StorageType::Inline => "i",
        StorageType::AbsolutePath => "p",
    };
    match descriptor.offset {
        Some(offset) => format!("{kind}{}@{offset}", descriptor.path_or_inline_dv),
        None => format!("{kind}{}", descriptor.path_or_inline_dv),
    }
}

/// The rows `descriptor` hides (stored in a file, inline, or at an absolute path).
///
/// # Errors
/// When the vector cannot be read or is corrupt.
pub async fn read_vector(
    table: &DeltaTable,
    descriptor: DeletionVectorDescriptor,
) -> Result<RoaringTreemap, DeltaTableError> {
    let engine = table.log_store().engine(None);
    let mut root = table.table_url().clone();
    if !root.path().ends_with('/') {
        root.set_path(&format!("{}/", root.path()));
    }
    let kernel: buoyant_kernel::actions::deletion_vector::DeletionVectorDescriptor =
        descriptor.try_into().map_err(kernel_err)?;
    let storage = Arc::clone(&engine).storage_handler();
    tokio::task::spawn_blocking(move || kernel.read(storage, &root).map_err(kernel_err))
        .await
        .map_err(|e| DeltaTableError::Generic(format!("a deletion-vector read failed: {e}")))?
}

fn kernel_err(e: buoyant_kernel::Error) -> DeltaTableError {
    DeltaTableError::Generic(format!("deletion vector: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::key_index::{FileGroup, LiveFile, Row, Stamp};
    use crate::update::tests::update;

    fn index_with(rows: &[(i64, i64)]) -> (KeyIndex, FileId) {
        let mut index = KeyIndex::default();
        let source = index.source("positions", 0);
        let live = rows
            .iter()
            .enumerate()
            .map(|(row, (conid, timestamp))| Row {
                row: row as u32,
                key: RowKey { conid: *conid, ..RowKey::default() },
                stamp: Stamp { timestamp: *timestamp, offset: 0, source },
            })
            .collect::<Vec<_>>();
        let file = LiveFile { path: "a.parquet".into(), deletion_vector: None };
        let group = FileGroup { symbol: None, owner: None };
        let id = index.add_file(file, group, live.len(), RoaringTreemap::new(), live);
        (index, id)
    }

    #[test]
    fn a_newer_update_hides_the_stored_row_and_an_older_one_changes_nothing() {
        let (index, file) = index_with(&[(1, 10), (2, 10), (3, 10)]);
        let (newer, older, new) = (update(2, "A", 20, 0, 5), update(3, "A", 5, 0, 6), update(4, "A", 1, 0, 7));
        let plan = plan(&[&newer, &older, &new], &index, &[KeyColumn::Conid]);
        assert_eq!((plan.inserted, plan.updated, plan.unchanged), (1, 1, 1));
        assert_eq!(plan.winners.iter().map(|u| u.conid).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(plan.hidden.get(&file).map(|r| r.iter().collect::<Vec<_>>()), Some(vec![1]));
    }

    #[test]
    fn a_replayed_update_changes_nothing() {
        let (mut index, _) = index_with(&[]);
        let stored = update(1, "A", 10, 0, 3);
        let source = index.source("positions", 0);
        let row = Row {
            row: 0,
            key: RowKey { conid: 1, ..RowKey::default() },
            stamp: Stamp { timestamp: 10, offset: 3, source },
        };
        let file = LiveFile { path: "b.parquet".into(), deletion_vector: None };
        index.add_file(file, FileGroup { symbol: None, owner: None }, 1, RoaringTreemap::new(), [row]);
        let plan = plan(&[&stored], &index, &[KeyColumn::Conid]);
        assert!(plan.winners.is_empty() && plan.hidden.is_empty());
        assert_eq!(plan.unchanged, 1);
    }

    #[test]
    fn vectors_of_one_flush_share_a_file_up_to_its_limit() {
        let a: RoaringTreemap = [1u64, 5, 9].into_iter().collect();
        let b: RoaringTreemap = [0u64].into_iter().collect();
        let files = write_vectors(vec![(1, a.clone()), (2, b)]).expect("written");
        assert_eq!(files.len(), 1, "two small vectors share one file");
        let file = &files[0];
        assert!(file.path.starts_with("deletion_vector_") && file.path.ends_with(".bin"));
        assert_eq!(file.vectors.len(), 2);
        let (_, first, _) = &file.vectors[0];
        assert_eq!((first.offset, first.cardinality), (Some(1), 3));
        assert_eq!(first.path_or_inline_dv.len(), 20, "a z85-encoded UUID");
        let (_, second, _) = &file.vectors[1];
        assert!(second.offset > first.offset);
        assert_ne!(unique_id(first), unique_id(second));
    }

    #[test]
    fn a_flush_of_many_vectors_writes_several_bounded_files() {
        // Every other row of 8,000: a vector of about 1 KiB that no run container shrinks.
        let wide: RoaringTreemap = (0u64..16_000).step_by(2).collect();
        let vectors: Vec<(FileId, RoaringTreemap)> = (0..200).map(|id| (id, wide.clone())).collect();
        let files = write_vectors(vectors).expect("written");
        assert!(files.len() > 1, "200 vectors of about 1 KiB do not fit one file of 64 KiB");
        let largest_vector = files[0].vectors[0].1.size_in_bytes as usize;
        for file in &files {
            assert!(file.bytes.len() <= MAX_VECTOR_FILE_BYTES + largest_vector + 8, "{} bytes", file.bytes.len());
            let uuid = &file.vectors[0].1.path_or_inline_dv;
            assert!(file.vectors.iter().all(|(_, dv, _)| &dv.path_or_inline_dv == uuid), "one file, one UUID");
        }
        let ids: Vec<FileId> = files.iter().flat_map(|f| f.vectors.iter().map(|(id, _, _)| *id)).collect();
        assert_eq!(ids, (0..200).collect::<Vec<_>>(), "every vector written once, in order");
    }
}
