//! The key index saved beside the table, so that a starting worker reads one object
//! instead of the keys of every live file (docs/write-path.md, "The saved key index").
//!
//! The object is [`OBJECT`], under the table's own `_position_sink/` prefix, which Delta
//! readers and vacuum ignore. It names the table (its `metaData` id), the key columns,
//! the layout and the version whose live files it knows, and holds the index's parts
//! ([`Parts`]): the live files with their groups, rows and deletion vectors, and every
//! key with its row, as columns compressed in blocks.
//!
//! Invariant kept here: a saved index is used only when it is intact and describes this
//! table: its header's checksum and each block's (zstd's frame checksum) match, it names
//! this table, these key columns and this layout, its version is not past the table's,
//! and its parts are consistent ([`KeyIndex::import`]). What it says about a file is
//! true of that file forever (a data file never changes; a new deletion vector is a new
//! id), so the caller brings it up to date by the live file list alone
//! ([`KeyIndex::sync`]): files removed since are forgotten, files added since are read.

use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt};
use rayon::prelude::*;
use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};

use super::key_index::{Columns, Compact, FileGroup, FileId, IndexedFile, KeyIndex, Parts, Rest, Slot, Stamp};
use crate::config::PartitionBy;
use crate::offsets::TopicPartition;
use crate::update::KeyColumn;

/// Where the saved index lies, relative to the table root.
pub const OBJECT: &str = "_position_sink/key_index";

/// The object's first bytes: what it is and its format's version.
const MAGIC: &[u8; 8] = b"PSKIDX01";

/// Keys per compressed block: blocks are compressed and read on every core.
const BLOCK_KEYS: usize = 1 << 20;

/// zstd's level for the blocks: fast to write, a few bytes per key.
const LEVEL: i32 = 1;

/// Which table, key and layout an index belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The table's `metaData` id: a table created again at the same location has another.
    pub table_id: String,
    /// The key columns.
    pub key_columns: Vec<KeyColumn>,
    /// The layout.
    pub layout: PartitionBy,
}

/// Why a saved index is not used (the worker then reads every live file's keys).
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// There is none.
    #[error("there is no saved key index")]
    Missing,
    /// It could not be read.
    #[error("the saved key index could not be read: {0}")]
    Unreadable(String),
    /// Its bytes are damaged or not an index.
    #[error("the saved key index is damaged: {0}")]
    Corrupt(String),
    /// It describes another table, key or layout.
    #[error("the saved key index belongs to another table, key or layout ({0})")]
    Foreign(String),
    /// It claims a version the table does not have yet: the table was created again.
    #[error("the saved key index is of version {saved}, past the table's {table}")]
    Ahead {
        /// The version it names.
        saved: u64,
        /// The table's.
        table: u64,
    },
}

/// What the header says of a file.
#[derive(Debug, Serialize, Deserialize)]
struct SavedFile {
    id: FileId,
    path: String,
    deletion_vector: Option<String>,
    symbol: Option<String>,
    owner: Option<(String, i32)>,
    rows: usize,
    /// Bytes of its hidden rows' bitmap in the `deleted` block (0: none hidden).
    deleted_bytes: usize,
}

/// One compressed block: `entries` values of `column` from entry `first`.
#[derive(Debug, Serialize, Deserialize)]
struct Block {
    column: Column,
    first: usize,
    entries: usize,
    bytes: usize,
}

/// The columns saved, each as 8- or 4-byte little-endian values; `Deleted` holds the
/// files' bitmaps one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Column {
    /// Each conid less the one before it.
    Conids,
    Rests,
    Files,
    Rows,
    Timestamps,
    Offsets,
    Sources,
    Deleted,
}

/// The object's header: everything but the key columns and the bitmaps.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    identity: Identity,
    version: u64,
    sources: Vec<(String, i32)>,
    rests: Vec<Rest>,
    files: Vec<SavedFile>,
    duplicates: Vec<(i64, u32, FileId, u32, i64, i64, u32)>,
    keys: usize,
    with_rests: bool,
    blocks: Vec<Block>,
}

/// The index in `parts` as the object's bytes.
///
/// # Errors
/// A compression failure.
pub fn encode(identity: &Identity, parts: &Parts) -> Result<Vec<u8>, String> {
    let keys = &parts.keys;
    let mut deleted = Vec::new();
    let mut files = Vec::with_capacity(parts.files.len());
    for (id, file) in &parts.files {
        let before = deleted.len();
        if !file.deleted.is_empty() {
            file.deleted.serialize_into(&mut deleted).map_err(|e| e.to_string())?;
        }
        files.push(SavedFile {
            id: *id,
            path: file.path.clone(),
            deletion_vector: file.deletion_vector.clone(),
            symbol: file.group.symbol.clone(),
            owner: file.group.owner.as_ref().map(|tp| (tp.topic.clone(), tp.partition.0)),
            rows: file.rows,
            deleted_bytes: deleted.len() - before,
        });
    }
    let mut raw: Vec<(Column, usize, Vec<u8>)> = Vec::new();
    let mut previous = 0i64;
    let deltas: Vec<i64> = keys
        .conids
        .iter()
        .map(|c| {
            let delta = c.wrapping_sub(previous);
            previous = *c;
            delta
        })
        .collect();
    split(&mut raw, Column::Conids, &deltas, |v| v.to_le_bytes());
    split(&mut raw, Column::Rests, &keys.rests, |v| v.to_le_bytes());
    split(&mut raw, Column::Files, &keys.files, |v| v.to_le_bytes());
    split(&mut raw, Column::Rows, &keys.rows, |v| v.to_le_bytes());
    split(&mut raw, Column::Timestamps, &keys.timestamps, |v| v.to_le_bytes());
    split(&mut raw, Column::Offsets, &keys.offsets, |v| v.to_le_bytes());
    split(&mut raw, Column::Sources, &keys.sources, |v| v.to_le_bytes());
    if !deleted.is_empty() {
        raw.push((Column::Deleted, 0, deleted));
    }
    let compressed: Vec<(Column, usize, usize, Vec<u8>)> = raw
        .into_par_iter()
        .map(|(column, first, bytes)| {
            let entries = bytes.len() / width(column);
            let mut compressor = zstd::bulk::Compressor::new(LEVEL).map_err(|e| e.to_string())?;
            compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).map_err(|e| e.to_string())?;
            let out = compressor.compress(&shuffle(&bytes, width(column))).map_err(|e| e.to_string())?;
            Ok((column, first, entries, out))
        })
        .collect::<Result<_, String>>()?;
    let header = Header {
        identity: identity.clone(),
        version: parts.version,
        sources: parts.sources.iter().map(|tp| (tp.topic.clone(), tp.partition.0)).collect(),
        rests: parts.rests.clone(),
        files,
        duplicates: parts
            .duplicates
            .iter()
            .map(|(k, s)| (k.conid, k.rest, s.file, s.row, s.stamp.timestamp, s.stamp.offset, s.stamp.source))
            .collect(),
        keys: keys.len(),
        with_rests: !keys.rests.is_empty(),
        blocks: compressed
            .iter()
            .map(|(column, first, entries, out)| Block {
                column: *column,
                first: *first,
                entries: *entries,
                bytes: out.len(),
            })
            .collect(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    let total = 8 + 8 + header.len() + 4 + compressed.iter().map(|(.., out)| out.len()).sum::<usize>();
    let mut object = Vec::with_capacity(total);
    object.extend_from_slice(MAGIC);
    object.extend_from_slice(&(header.len() as u64).to_le_bytes());
    object.extend_from_slice(&header);
    object.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
    for (.., out) in compressed {
        object.extend_from_slice(&out);
    }
    Ok(object)
}

/// The index `object` holds, if it is intact, belongs to `identity` and is not past
/// table version `table_version`.
///
/// # Errors
/// See [`Unusable`].
pub fn decode(object: &[u8], identity: &Identity, table_version: u64) -> Result<Parts, Unusable> {
    let corrupt = |what: &str| Unusable::Corrupt(what.to_string());
    if object.get(..8) != Some(MAGIC.as_slice()) {
        return Err(corrupt("it does not start as a key index of this format"));
    }
    let header_len = object.get(8..16).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    let header_end = header_len.and_then(|n| 16usize.checked_add(n)).filter(|end| end + 4 <= object.len());
    let Some(header_end) = header_end else { return Err(corrupt("its header is cut short")) };
    let header_bytes = &object[16..header_end];
    let crc = u32::from_le_bytes(object[header_end..header_end + 4].try_into().unwrap_or_default());
    if crc32fast::hash(header_bytes) != crc {
        return Err(corrupt("its header's checksum does not match"));
    }
    let header: Header = serde_json::from_slice(header_bytes).map_err(|e| Unusable::Corrupt(e.to_string()))?;
    if header.identity != *identity {
        return Err(Unusable::Foreign(format!(
            "saved for table {} keyed by {:?}, layout {:?}",
            header.identity.table_id, header.identity.key_columns, header.identity.layout
        )));
    }
    if header.version > table_version {
        return Err(Unusable::Ahead { saved: header.version, table: table_version });
    }
    // Each block's place in the object, then all of them decompressed at once.
    let mut at = header_end + 4;
    let mut placed = Vec::with_capacity(header.blocks.len());
    for block in &header.blocks {
        let end = at.checked_add(block.bytes).filter(|end| *end <= object.len());
        let Some(end) = end else { return Err(corrupt("a block lies past its end")) };
        placed.push((block, &object[at..end]));
        at = end;
    }
    let blocks: Vec<(&Block, Vec<u8>)> = placed
        .into_par_iter()
        .map(|(block, bytes)| {
            let expected = if block.column == Column::Deleted {
                header.files.iter().map(|f| f.deleted_bytes).sum()
            } else {
                block.entries * width(block.column)
            };
            let raw = zstd::bulk::decompress(bytes, expected).map_err(|e| Unusable::Corrupt(e.to_string()))?;
            if raw.len() != expected {
                return Err(corrupt("a block holds fewer values than its header says"));
            }
            Ok((block, unshuffle(&raw, width(block.column))))
        })
        .collect::<Result<_, Unusable>>()?;

    let n = header.keys;
    let mut keys = Columns {
        conids: vec![0; n],
        rests: vec![0; if header.with_rests { n } else { 0 }],
        files: vec![0; n],
        rows: vec![0; n],
        timestamps: vec![0; n],
        offsets: vec![0; n],
        sources: vec![0; n],
    };
    let mut deleted = Vec::new();
    let mut filled = [0usize; 7];
    for (block, raw) in blocks {
        let range = block.first..block.first.saturating_add(block.entries);
        let fits = |len: usize| range.end <= len;
        let ok = match block.column {
            Column::Conids => fits(n) && fill(&mut keys.conids[range.clone()], &raw, i64::from_le_bytes),
            Column::Rests => fits(keys.rests.len()) && fill(&mut keys.rests[range.clone()], &raw, u32::from_le_bytes),
            Column::Files => fits(n) && fill(&mut keys.files[range.clone()], &raw, u32::from_le_bytes),
            Column::Rows => fits(n) && fill(&mut keys.rows[range.clone()], &raw, u32::from_le_bytes),
            Column::Timestamps => fits(n) && fill(&mut keys.timestamps[range.clone()], &raw, i64::from_le_bytes),
            Column::Offsets => fits(n) && fill(&mut keys.offsets[range.clone()], &raw, i64::from_le_bytes),
            Column::Sources => fits(n) && fill(&mut keys.sources[range.clone()], &raw, u32::from_le_bytes),
            Column::Deleted => {
                deleted = raw;
                true
            }
        };
        if !ok {
            return Err(corrupt("a block lies outside its column"));
        }
        if block.column != Column::Deleted {
            filled[block.column as usize] += block.entries;
        }
    }
    let expected = [n, keys.rests.len(), n, n, n, n, n];
    if filled != expected {
        return Err(corrupt("its blocks do not cover every key"));
    }
    let mut conid = 0i64;
    for c in &mut keys.conids {
        conid = conid.wrapping_add(*c);
        *c = conid;
    }

    let mut files = Vec::with_capacity(header.files.len());
    let mut bitmaps = deleted.as_slice();
    for file in header.files {
        let (bitmap, rest) =
            bitmaps.split_at_checked(file.deleted_bytes).ok_or_else(|| corrupt("bitmaps cut short"))?;
        bitmaps = rest;
        let hidden = if bitmap.is_empty() {
            RoaringTreemap::new()
        } else {
            RoaringTreemap::deserialize_from(bitmap).map_err(|e| Unusable::Corrupt(e.to_string()))?
        };
        let owner = file.owner.map(|(topic, partition)| TopicPartition::new(&topic, partition));
        let group = FileGroup { symbol: file.symbol, owner };
        let indexed = IndexedFile {
            path: file.path,
            group,
            rows: file.rows,
            deletion_vector: file.deletion_vector,
            deleted: hidden,
        };
        files.push((file.id, indexed));
    }
    let duplicates = header
        .duplicates
        .into_iter()
        .map(|(conid, rest, file, row, timestamp, offset, source)| {
            (Compact { conid, rest }, Slot { file, row, stamp: Stamp { timestamp, offset, source } })
        })
        .collect();
    let sources = header.sources.into_iter().map(|(topic, partition)| TopicPartition::new(&topic, partition)).collect();
    Ok(Parts { version: header.version, sources, rests: header.rests, files, keys, duplicates })
}

/// Saves `parts` as the table's index.
///
/// # Errors
/// The store's, or a compression failure; returns the object's size.
pub async fn save(store: Arc<dyn ObjectStore>, identity: Identity, parts: Parts) -> Result<usize, String> {
    let object = tokio::task::spawn_blocking(move || encode(&identity, &parts)).await.map_err(|e| e.to_string())??;
    let size = object.len();
    store.put(&object_store::path::Path::from(OBJECT), object.into()).await.map_err(|e| e.to_string())?;
    Ok(size)
}

/// Reads the table's saved index, checked ([`decode`] and [`KeyIndex::import`]).
///
/// # Errors
/// See [`Unusable`].
pub async fn load(store: Arc<dyn ObjectStore>, identity: Identity, table_version: u64) -> Result<KeyIndex, Unusable> {
    let object = match store.get(&object_store::path::Path::from(OBJECT)).await {
        Ok(found) => found.bytes().await.map_err(|e| Unusable::Unreadable(e.to_string()))?,
        Err(object_store::Error::NotFound { .. }) => return Err(Unusable::Missing),
        Err(error) => return Err(Unusable::Unreadable(error.to_string())),
    };
    tokio::task::spawn_blocking(move || {
        let parts = decode(&object, &identity, table_version)?;
        KeyIndex::import(parts).map_err(Unusable::Corrupt)
    })
    .await
    .map_err(|e| Unusable::Unreadable(e.to_string()))?
}

/// Bytes per value of `column` (1 for the bitmaps, which are not shuffled).
fn width(column: Column) -> usize {
    match column {
        Column::Conids | Column::Timestamps | Column::Offsets => 8,
        Column::Rests | Column::Files | Column::Rows | Column::Sources => 4,
        Column::Deleted => 1,
    }
}

/// `values` cut into blocks of [`BLOCK_KEYS`], as little-endian bytes.
fn split<T: Copy, const W: usize>(
    out: &mut Vec<(Column, usize, Vec<u8>)>,
    column: Column,
    values: &[T],
    bytes: impl Fn(T) -> [u8; W],
) {
    for (i, chunk) in values.chunks(BLOCK_KEYS).enumerate() {
        out.push((column, i * BLOCK_KEYS, chunk.iter().flat_map(|v| bytes(*v)).collect()));
    }
}

/// Sets `into` from `raw`'s little-endian values; false if the lengths differ.
fn fill<T, const W: usize>(into: &mut [T], raw: &[u8], value: impl Fn([u8; W]) -> T) -> bool {
    if raw.len() != into.len() * W {
        return false;
    }
    for (slot, bytes) in into.iter_mut().zip(raw.chunks_exact(W)) {
        *slot = value(bytes.try_into().unwrap_or([0; W]));
    }
    true
}

/// The values' bytes grouped by their place in a value (every first byte, then every
/// second, …): the high bytes of nearby numbers repeat, and zstd finds the runs.
fn shuffle(bytes: &[u8], width: usize) -> Vec<u8> {
    if width == 1 {
        return bytes.to_vec();
    }
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for (i, value) in bytes.chunks_exact(width).enumerate() {
        for (b, byte) in value.iter().enumerate() {
            out[b * n + i] = *byte;
        }
    }
    out
}

/// The inverse of [`shuffle`].
fn unshuffle(bytes: &[u8], width: usize) -> Vec<u8> {
    if width == 1 {
        return bytes.to_vec();
    }
    let n = bytes.len() / width;
    let mut out = vec![0u8; bytes.len()];
    for (i, value) in out.chunks_exact_mut(width).enumerate() {
        for (b, byte) in value.iter_mut().enumerate() {
            *byte = bytes[b * n + i];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::key_index::Row;
    use crate::update::RowKey;

    fn identity() -> Identity {
        Identity { table_id: "t1".into(), key_columns: vec![KeyColumn::Conid], layout: PartitionBy::None }
    }

    /// An index of `files` files of `per_file` keys each, the last file with a vector.
    fn index(files: usize, per_file: usize) -> KeyIndex {
        let mut index = KeyIndex::default();
        let source = index.source("positions", 3);
        let mut added = Vec::new();
        for f in 0..files {
            let rows: Vec<Row> = (0..per_file)
                .map(|r| Row {
                    row: r as u32,
                    key: RowKey { conid: (r * files + f) as i64 * 3 - 7, ..RowKey::default() },
                    stamp: Stamp { timestamp: 1_700_000_000_000_000 + r as i64, offset: r as i64 * 11, source },
                })
                .collect();
            let group = FileGroup { symbol: None, owner: Some(TopicPartition::new("positions", 3)) };
            let file = super::super::key_index::LiveFile { path: format!("part-{f}.parquet"), deletion_vector: None };
            added.push((file, group, per_file, RoaringTreemap::new(), rows));
        }
        let ids = index.add_files(added);
        let last = *ids.last().expect("a file");
        index.hide_rows(last, "uABC@1".into(), &[0u64, 2].into_iter().collect());
        index.brought_to(9);
        index
    }

    #[test]
    fn an_encoded_index_decodes_to_the_same_parts() {
        let parts = index(5, 300_000).export().expect("brought to a version");
        let object = encode(&identity(), &parts).expect("encoded");
        assert!(object.len() < parts.keys.len() * 12, "{} bytes for {} keys", object.len(), parts.keys.len());
        let decoded = decode(&object, &identity(), 9).expect("decoded");
        assert_eq!(decoded, parts);
    }

    #[test]
    fn a_damaged_foreign_or_future_index_is_refused() {
        let parts = index(2, 1000).export().expect("brought to a version");
        let object = encode(&identity(), &parts).expect("encoded");
        let other = Identity { table_id: "t2".into(), ..identity() };
        assert!(matches!(decode(&object, &other, 9), Err(Unusable::Foreign(_))));
        let keyed = Identity { key_columns: vec![KeyColumn::Conid, KeyColumn::Account], ..identity() };
        assert!(matches!(decode(&object, &keyed, 9), Err(Unusable::Foreign(_))));
        assert!(matches!(decode(&object, &identity(), 8), Err(Unusable::Ahead { saved: 9, table: 8 })));
        for at in [3, 20, object.len() / 2, object.len() - 3] {
            let mut damaged = object.clone();
            damaged[at] ^= 0x40;
            assert!(decode(&damaged, &identity(), 9).is_err(), "a flipped bit at byte {at}");
        }
        assert!(decode(&object[..object.len() - 1], &identity(), 9).is_err(), "cut short");
        assert!(decode(b"", &identity(), 9).is_err());
    }
}
