//! Deletion-vector files a vacuum must keep although no live file references them:
//! the vectors of files removed within the retention window. delta-rs's vacuum plan
//! protects the data files of such `remove`s but not their vectors, so a version inside
//! the window (time travel, `RESTORE`, a reader in the middle of a read) would show the
//! rows its vectors hid. Found from the `remove`s (by their `deletionTimestamp`) in the
//! commit files written within the window, which the log keeps as long as
//! `delta.logRetentionDuration` (an hour by default, like the file retention).

use std::collections::{HashMap, HashSet};

use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;

/// Whether `path` (relative to the table root) is a deletion-vector file.
pub fn is_vector_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("deletion_vector_") && name.ends_with(".bin")
}

/// The vector files (relative paths) that `remove` actions made at or after
/// `since_millis` reference. `objects` is the table directory's listing (path → size,
/// modification time): a commit file written before `since_millis` holds no such remove.
///
/// # Errors
/// When a commit file cannot be read.
pub async fn of_recent_removes(
    table: &DeltaTable,
    objects: &HashMap<String, (u64, i64)>,
    since_millis: i64,
) -> Result<HashSet<String>, DeltaTableError> {
    let store = table.object_store();
    let mut kept = HashSet::new();
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
            if let Some(vector) = remove.get("deletionVector").filter(|_| removed_at >= since_millis) {
                kept.extend(relative_path(vector));
            }
        }
    }
    Ok(kept)
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
