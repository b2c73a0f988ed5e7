//! What the positions table and the dead-letter table share: opening or creating a
//! Delta table with a given Arrow schema, checking an existing table against it, and
//! reading the Kafka offsets the table records.
//!
//! Invariant kept here: a table's recorded offset for a partition is the `txn` version
//! under [`TopicPartition::app_id`]; it is written only in the same commit as the data
//! it covers, so "recorded" means "durable in this table".

use std::collections::HashMap;

use deltalake::arrow::datatypes::{DataType as ArrowType, SchemaRef, TimeUnit};
use deltalake::kernel::{DataType, PrimitiveType, StructField};
use deltalake::{DeltaTable, DeltaTableError};

use crate::config::Settings;
use crate::offsets::{Offset, TopicPartition};

/// Failures of a Delta table, with its location.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The table could not be opened or created.
    #[error("cannot open or create the Delta table at {uri}: {source}")]
    Open {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// The table exists with columns or partitioning this program cannot write.
    #[error(
        "the Delta table at {uri} is not a {kind} table: {differences}. \
         Point {config_key} at a new location, or migrate the table"
    )]
    Incompatible {
        /// Table location.
        uri: String,
        /// What the table should hold (`positions`, `dead letters`).
        kind: &'static str,
        /// The configuration key naming the table.
        config_key: &'static str,
        /// What differs from the expected schema.
        differences: String,
    },
    /// Reading the table's state or recorded offsets failed.
    #[error("cannot read the state of the Delta table at {uri}: {source}")]
    Read {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// A write or its commit failed (conflict, storage error).
    #[error("writing {rows} rows to the Delta table at {uri} failed: {source}")]
    Write {
        /// Table location.
        uri: String,
        /// Rows in the failed write.
        rows: usize,
        /// Cause.
        source: Box<DeltaTableError>,
    },
}

impl TableError {
    /// Whether trying again can help: storage and commit-conflict failures can, a
    /// schema mismatch cannot.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TableError::Incompatible { .. })
    }

    /// Whether another writer committed first (the retry re-reads the table).
    pub fn is_conflict(&self) -> bool {
        use deltalake::kernel::transaction::TransactionError;
        let (TableError::Open { source, .. } | TableError::Read { source, .. } | TableError::Write { source, .. }) =
            self
        else {
            return false;
        };
        matches!(
            **source,
            DeltaTableError::VersionAlreadyExists(_)
                | DeltaTableError::Transaction { source: TransactionError::CommitConflict(_) }
                | DeltaTableError::Transaction { source: TransactionError::MaxCommitAttempts(_) }
        )
    }
}

/// What a table is, for creating it and checking an existing one.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// A short name of the contents, used in errors (`positions`, `dead letters`).
    pub kind: &'static str,
    /// The configuration key that names the table's location.
    pub config_key: &'static str,
    /// The Delta table name stored in its metadata.
    pub name: &'static str,
    /// The table comment.
    pub comment: &'static str,
    /// The columns.
    pub schema: SchemaRef,
    /// Partition columns.
    pub partition_columns: &'static [&'static str],
    /// The configuration key that chooses the partitioning, if one does.
    pub layout_key: Option<&'static str>,
}

/// Opens the table at `uri`, creating it from `spec` if missing, and checks that an
/// existing table can hold `spec`'s rows.
///
/// # Errors
/// [`TableError::Open`] when storage fails, [`TableError::Incompatible`] when the table
/// exists with other columns or partitioning.
pub async fn open_or_create(uri: &str, storage_options: &Settings, spec: &TableSpec) -> Result<DeltaTable, TableError> {
    let open_err = |source| TableError::Open { uri: uri.to_string(), source: Box::new(source) };
    let url = deltalake::ensure_table_uri(uri).map_err(open_err)?;
    let options: HashMap<String, String> = storage_options.0.clone().into_iter().collect();
    let mut table =
        DeltaTable::try_from_url_with_storage_options(url.clone(), options.clone()).await.map_err(open_err)?;
    if table.version().is_none() {
        let created = table
            .create()
            .with_columns(delta_columns(&spec.schema))
            .with_partition_columns(spec.partition_columns.iter().copied())
            .with_table_name(spec.name)
            .with_comment(spec.comment)
            .await;
        table = match created {
            Ok(t) => t,
            // Another worker created it first: use theirs.
            Err(_) => DeltaTable::try_from_url_with_storage_options(url, options).await.map_err(open_err)?,
        };
    }
    check_schema(&table, uri, spec)?;
    Ok(table)
}

fn check_schema(table: &DeltaTable, uri: &str, spec: &TableSpec) -> Result<(), TableError> {
    let incompatible = |differences| TableError::Incompatible {
        uri: uri.to_string(),
        kind: spec.kind,
        config_key: spec.config_key,
        differences,
    };
    let snapshot = table.snapshot().map_err(|e| incompatible(format!("no snapshot ({e})")))?;
    let actual = snapshot.schema();
    let mut differences = Vec::new();
    for expected in delta_columns(&spec.schema) {
        match actual.field(expected.name()) {
            None => differences.push(format!("column `{}` is missing", expected.name())),
            Some(found) if found.data_type() != expected.data_type() => differences.push(format!(
                "column `{}` is {:?}, expected {:?}",
                expected.name(),
                found.data_type(),
                expected.data_type()
            )),
            Some(found) if found.is_nullable() && !expected.is_nullable() => {
                differences.push(format!("column `{}` is nullable, expected NOT NULL", expected.name()))
            }
            Some(_) => {}
        }
    }
    for extra in actual.fields() {
        if !extra.is_nullable() && spec.schema.field_with_name(extra.name()).is_err() {
            differences.push(format!("extra column `{}` is NOT NULL, so rows cannot be inserted", extra.name()));
        }
    }
    let partitioning = snapshot.metadata().partition_columns();
    if partitioning.iter().map(String::as_str).ne(spec.partition_columns.iter().copied()) {
        let fix = spec.layout_key.map(|key| format!(" (set {key} to the table's layout)")).unwrap_or_default();
        differences.push(format!("it is partitioned by {partitioning:?}, expected {:?}{fix}", spec.partition_columns));
    }
    if differences.is_empty() { Ok(()) } else { Err(incompatible(differences.join("; "))) }
}

/// A handle at the latest version of `table`.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn refreshed(table: &DeltaTable, uri: &str) -> Result<DeltaTable, TableError> {
    let mut fresh = table.clone();
    fresh.update_state().await.map_err(|source| TableError::Read { uri: uri.to_string(), source: Box::new(source) })?;
    Ok(fresh)
}

/// The last offset `table` records for each of `partitions` written by `group_id`
/// (absent: none yet), as of the version the handle last saw.
///
/// # Errors
/// [`TableError::Read`] when the log cannot be read.
pub async fn recorded_offsets(
    table: &DeltaTable,
    uri: &str,
    group_id: &str,
    partitions: impl IntoIterator<Item = &TopicPartition>,
) -> Result<HashMap<TopicPartition, Offset>, TableError> {
    let read_err = |source| TableError::Read { uri: uri.to_string(), source: Box::new(source) };
    let snapshot = table.snapshot().map_err(read_err)?;
    let log_store = table.log_store();
    let mut recorded = HashMap::new();
    for tp in partitions {
        if let Some(version) =
            snapshot.transaction_version(log_store.as_ref(), tp.app_id(group_id)).await.map_err(read_err)?
        {
            recorded.insert(tp.clone(), Offset(version));
        }
    }
    Ok(recorded)
}

/// The Delta columns of an Arrow schema.
fn delta_columns(schema: &SchemaRef) -> Vec<StructField> {
    schema
        .fields()
        .iter()
        .map(|f| {
            let primitive = match f.data_type() {
                ArrowType::Int64 => PrimitiveType::Long,
                ArrowType::Int32 => PrimitiveType::Integer,
                ArrowType::Float64 => PrimitiveType::Double,
                ArrowType::Utf8 => PrimitiveType::String,
                ArrowType::Binary => PrimitiveType::Binary,
                ArrowType::Timestamp(TimeUnit::Microsecond, Some(_)) => PrimitiveType::Timestamp,
                other => unreachable!("no table of this program has a column of type {other}"),
            };
            StructField::new(f.name().clone(), DataType::Primitive(primitive), f.is_nullable())
        })
        .collect()
}
