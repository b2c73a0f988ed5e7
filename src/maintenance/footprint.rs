//! What a table holds on storage against what its latest version uses: data files and
//! bytes on disk and live, the log's files and bytes, and how many commits a fresh
//! reader reads after the last checkpoint. One listing of the table's directory.

use std::collections::HashMap;

use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;

/// A table's storage against its latest version.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Footprint {
    /// The version measured.
    pub version: u64,
    /// Data files (and deletion-vector files) on storage, referenced or not.
    pub files_on_disk: u64,
    /// Their bytes.
    pub bytes_on_disk: u64,
    /// Data files the latest version references.
    pub live_files: u64,
    /// Their bytes.
    pub live_bytes: u64,
    /// Files under `_delta_log/`.
    pub log_files: u64,
    /// Their bytes.
    pub log_bytes: u64,
    /// The newest checkpoint's version.
    pub checkpoint_version: Option<u64>,
    /// Commit files a fresh reader reads after the newest checkpoint.
    pub commits_since_checkpoint: u64,
    /// Bytes of those commit files.
    pub bytes_since_checkpoint: u64,
}

/// A `_delta_log/` entry: its version and whether it is a commit or a checkpoint part.
pub(crate) fn log_entry(name: &str) -> Option<(u64, bool)> {
    let (stem, rest) = name.split_once('.')?;
    if stem.len() != 20 {
        return None;
    }
    let version = stem.parse().ok()?;
    if rest == "json" {
        Some((version, true))
    } else if rest.starts_with("checkpoint") && rest.ends_with(".parquet") {
        Some((version, false))
    } else {
        None
    }
}

/// Every object of the table's directory with its size, by path relative to the root.
pub(crate) async fn list_objects(table: &DeltaTable) -> Result<HashMap<String, (u64, i64)>, DeltaTableError> {
    let store = table.object_store();
    let objects: Vec<deltalake::ObjectMeta> = store.list(None).try_collect().await?;
    Ok(objects.into_iter().map(|o| (o.location.to_string(), (o.size, o.last_modified.timestamp_millis()))).collect())
}

/// Measures `table` at its latest version (the handle is read afresh).
///
/// # Errors
/// When the table or its directory cannot be read.
pub async fn measure(table: &DeltaTable) -> Result<Footprint, DeltaTableError> {
    let mut table = table.clone();
    table.update_state().await?;
    let objects = list_objects(&table).await?;
    of(&table, &objects)
}

/// The footprint of `table` (at the version it is loaded at) given its directory's `objects`.
pub(crate) fn of(table: &DeltaTable, objects: &HashMap<String, (u64, i64)>) -> Result<Footprint, DeltaTableError> {
    let snapshot = table.snapshot()?;
    let version = snapshot.version();
    let mut footprint = Footprint { version, ..Footprint::default() };
    for view in snapshot.log_data().iter() {
        footprint.live_files += 1;
        footprint.live_bytes += view.size().max(0) as u64;
    }
    let mut commits: Vec<(u64, u64)> = Vec::new();
    for (path, (size, _)) in objects {
        if let Some(name) = path.strip_prefix("_delta_log/") {
            footprint.log_files += 1;
            footprint.log_bytes += size;
            match log_entry(name) {
                Some((v, true)) => commits.push((v, *size)),
                Some((v, false)) if v <= version => {
                    footprint.checkpoint_version = footprint.checkpoint_version.max(Some(v));
                }
                _ => {}
            }
        } else if !is_hidden(path) {
            footprint.files_on_disk += 1;
            footprint.bytes_on_disk += size;
        }
    }
    for (v, size) in commits {
        if footprint.checkpoint_version.is_none_or(|c| v > c) && v <= version {
            footprint.commits_since_checkpoint += 1;
            footprint.bytes_since_checkpoint += size;
        }
    }
    Ok(footprint)
}

/// Whether a path is not table data: a file or directory whose name starts with `.`
/// or `_` (other than a partition directory such as `symbol=_X`).
fn is_hidden(path: &str) -> bool {
    path.split('/').any(|part| (part.starts_with('.') || part.starts_with('_')) && !part.contains('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_are_told_apart() {
        assert_eq!(log_entry("00000000000000000100.json"), Some((100, true)));
        assert_eq!(log_entry("00000000000000000099.checkpoint.parquet"), Some((99, false)));
        assert_eq!(log_entry("00000000000000000099.checkpoint.0000000001.0000000002.parquet"), Some((99, false)));
        assert_eq!(log_entry("_last_checkpoint"), None);
        assert_eq!(log_entry("00000000000000000100.crc"), None);
    }

    #[test]
    fn hidden_paths_are_not_data() {
        assert!(is_hidden("_delta_log/x.json") && is_hidden(".tmp/x") && is_hidden("symbol=A/.part.crc"));
        assert!(!is_hidden("symbol=_A/part-0.parquet") && !is_hidden("part-0.parquet"));
    }
}
