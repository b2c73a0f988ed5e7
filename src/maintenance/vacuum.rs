//! Which files a vacuum deletes: delta-rs plans it (files no live version references,
//! removed longer ago than `delta.deletedFileRetentionDuration`, and files never
//! committed), and this module takes out of that plan what a version inside the
//! retention window still reads, or what a writer may still commit:
//!
//! - **Data files removed again within the window.** In deletion-vector mode one path
//!   collects several `remove`s (a file revised at 10:00, compacted away at 10:40):
//!   delta-rs plans a path for deletion when *one* of its tombstones expired, without
//!   looking for a newer one, though every version from 10:00 to 10:40 reads the file.
//!   A path with any tombstone inside the window is kept.
//! - **Deletion-vector files of files removed within the window**, which delta-rs counts
//!   as unreferenced: found from the `remove`s (by their `deletionTimestamp`) in the
//!   commit files written within the window, which the log keeps as long as
//!   `delta.logRetentionDuration` (never shorter than the file retention: [`check`]).
//! - **Files no commit ever named** (a flush or compaction that has not committed yet,
//!   or crashed): kept until `maintenance.unreferenced_file_age` old by the store's
//!   clock, three times what a writer may take to commit its files
//!   ([`crate::config::MaintenanceConfig::write_deadline`]).

use std::collections::{HashMap, HashSet};

use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;

/// Whether `path` (relative to the table root) is a deletion-vector file.
pub fn is_vector_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("deletion_vector_") && name.ends_with(".bin")
}

/// What the `remove` actions made at or after a time reference.
#[derive(Debug, Default)]
pub struct RecentRemoves {
    /// The removed data files (relative paths, as the log writes them and decoded).
    pub data: HashSet<String>,
    /// The vector files of the removed files' deletion vectors.
    pub vectors: HashSet<String>,
}

/// The `remove` actions made at or after `since_millis`, from the commit files: `objects`
/// is the table directory's listing (path → size, modification time), and a commit file
/// written before `since_millis` holds no such remove.
///
/// # Errors
/// When a commit file cannot be read.
pub async fn recent_removes(
    table: &DeltaTable,
    objects: &HashMap<String, (u64, i64)>,
    since_millis: i64,
) -> Result<RecentRemoves, DeltaTableError> {
    let store = table.object_store();
    let mut recent = RecentRemoves::default();
    for (path, (_, modified)) in objects {
        let is_commit = path.starts_with("_delta_log/") && path.ends_with(".json") && !path.contains(".tmp");
        if !is_commit || *modified < since_millis {
            continue;
        }
        let bytes = match store.get(&deltalake::Path::from(path.as_str())).await {
            Ok(found) => found.bytes().await?,
            // Removed by a log cleanup meanwhile: its removes are older than the window.
            Err(deltalake::ObjectStoreError::NotFound { .. }) => continue,
            Err(other) => return Err(other.into()),
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(action) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            let Some(remove) = action.get("remove") else { continue };
            let removed_at = remove.get("deletionTimestamp").and_then(serde_json::Value::as_i64).unwrap_or(*modified);
            if removed_at < since_millis {
                continue;
            }
            if let Some(path) = remove.get("path").and_then(serde_json::Value::as_str) {
                recent.data.extend(both_spellings(path));
            }
            if let Some(vector) = remove.get("deletionVector") {
                recent.vectors.extend(relative_path(vector));
            }
        }
    }
    Ok(recent)
}

/// The data paths with a tombstone at or after `since_millis` in the table's snapshot
/// (its checkpoint and the commits after it), whatever older tombstones they have.
///
/// # Errors
/// When the log cannot be read.
pub async fn recently_tombstoned(table: &DeltaTable, since_millis: i64) -> Result<HashSet<String>, DeltaTableError> {
    use futures::TryStreamExt;
    let snapshot = table.snapshot()?;
    let log_store = table.log_store();
    let tombstones: Vec<_> = snapshot.all_tombstones(log_store.as_ref()).try_collect().await?;
    Ok(tombstones
        .iter()
        .filter(|t| t.deletion_timestamp().unwrap_or(0) >= since_millis)
        .flat_map(|t| both_spellings(&t.path()))
        .collect())
}

/// The paths that were ever tombstoned in the table's snapshot, as a vacuum's plan
/// spells them: a planned path outside this set was never committed, or its tombstone
/// expired before the last checkpoint.
///
/// # Errors
/// When the log cannot be read.
pub async fn tombstoned(table: &DeltaTable) -> Result<HashSet<String>, DeltaTableError> {
    recently_tombstoned(table, i64::MIN).await
}

/// Checks the table's retention settings before a vacuum: versions inside the file
/// retention must have their commit files, which also tell the vector files to keep.
///
/// # Errors
/// A [`DeltaTableError::Generic`] naming the properties and the fix.
pub fn check(settings: &super::RetentionSettings) -> Result<(), DeltaTableError> {
    if settings.log_retention >= settings.deleted_file_retention {
        return Ok(());
    }
    Err(DeltaTableError::Generic(format!(
        "the table's delta.logRetentionDuration ({}) is shorter than its delta.deletedFileRetentionDuration ({}): \
         versions inside the file retention would lose their log, and vacuum could not tell which removed files \
         they read; vacuum is skipped until it is set at least as long (ALTER TABLE ... SET TBLPROPERTIES \
         ('delta.logRetentionDuration' = ...))",
        humantime::format_duration(settings.log_retention),
        humantime::format_duration(settings.deleted_file_retention)
    )))
}

/// A log path in both spellings: as written (percent-encoded) and decoded, the way
/// vacuum's plan and the live file list spell it.
fn both_spellings(path: &str) -> [String; 2] {
    [path.to_string(), percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()]
}

/// The relative path of a vector stored beside the table (`storageType` `u`):
/// `<prefix>/deletion_vector_<uuid>.bin`, the UUID z85-encoded in the last 20
/// characters of `pathOrInlineDv`.
fn relative_path(descriptor: &serde_json::Value) -> Option<String> {
    if descriptor.get("storageType")?.as_str()? != "u" {
        return None;
    }
    let encoded = descriptor.get("pathOrInlineDv")?.as_str()?;
    let split = encoded.len().checked_sub(20)?;
    let (prefix, id) = encoded.split_at(split);
    let uuid = uuid::Uuid::from_slice(&z85::decode(id).ok()?).ok()?;
    Some(if prefix.is_empty() {
        format!("deletion_vector_{uuid}.bin")
    } else {
        format!("{prefix}/deletion_vector_{uuid}.bin")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_names_its_file_as_the_protocol_derives_it() {
        let uuid = uuid::Uuid::parse_str("d2c639aa-8816-431a-aaf6-d3fe2512ff61").expect("uuid");
        let encoded = z85::encode(uuid.as_bytes());
        let at_root = serde_json::json!({"storageType": "u", "pathOrInlineDv": encoded});
        assert_eq!(
            relative_path(&at_root).as_deref(),
            Some("deletion_vector_d2c639aa-8816-431a-aaf6-d3fe2512ff61.bin")
        );
        let prefixed = serde_json::json!({"storageType": "u", "pathOrInlineDv": format!("ab{encoded}")});
        assert_eq!(
            relative_path(&prefixed).as_deref(),
            Some("ab/deletion_vector_d2c639aa-8816-431a-aaf6-d3fe2512ff61.bin")
        );
        assert_eq!(relative_path(&serde_json::json!({"storageType": "i", "pathOrInlineDv": "x"})), None);
        assert!(is_vector_file("ab/deletion_vector_d2c639aa-8816-431a-aaf6-d3fe2512ff61.bin"));
        assert!(!is_vector_file("part-0001.parquet"));
    }
}
