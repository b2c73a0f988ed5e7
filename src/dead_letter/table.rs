//! The dead-letter Delta table: one row per rejected message, appended in the flush
//! that covers the message, before the positions table's commit.
//!
//! Invariant kept here: exactly once. Each append records, per source partition, the
//! last offset its batch covers (the same `txn` technique as the positions table); an
//! append re-reads those offsets first and drops dead letters at or below them, so a
//! flush retried after a crash or a conflict never writes a dead letter twice.

use std::sync::Arc;

use deltalake::DeltaTable;
use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{
    DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use deltalake::datafusion::prelude::SessionContext;

use super::{DeadLetter, ReasonCounts};
use crate::config::Settings;
use crate::delta::{self, OnceAppend, TableError, TableSpec};
use crate::maintenance::run::{Appending, Target};
use crate::offsets::{Coordinates, Offset, OffsetMap, TopicPartition};

/// The dead-letter table's columns.
pub fn schema() -> SchemaRef {
    let utc_micros = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("source_topic", DataType::Utf8, false),
        Field::new("source_partition", DataType::Int32, false),
        Field::new("source_offset", DataType::Int64, false),
        Field::new("kafka_timestamp", utc_micros.clone(), true),
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("category", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("rejected_at", utc_micros, false),
    ]))
}

fn spec() -> TableSpec {
    TableSpec {
        kind: "dead letters",
        config_key: "dead_letter.table_uri",
        name: "position_dead_letters",
        comment: "Messages position-sink rejected: original bytes, Kafka coordinates and the reason",
        schema: schema(),
        partition_columns: &[],
        layout_key: None,
    }
}

/// The dead-letter table, opened for one consumer group.
#[derive(Debug, Clone)]
pub struct DeadLetterTable {
    table: DeltaTable,
    uri: String,
    group_id: String,
    write_deadline: std::time::Duration,
}

impl DeadLetterTable {
    /// Opens the table at `uri`, creating it if missing.
    ///
    /// # Errors
    /// [`TableError::Open`] or [`TableError::Incompatible`].
    pub async fn open_or_create(
        uri: &str,
        storage_options: &Settings,
        properties: &Settings,
        group_id: &str,
    ) -> Result<Self, TableError> {
        let table = delta::open_or_create(uri, storage_options, &spec(), properties).await?;
        let write_deadline = crate::config::MaintenanceConfig::default().write_deadline();
        Ok(Self { table, uri: uri.to_string(), group_id: group_id.to_string(), write_deadline })
    }

    /// This handle with `deadline` as the longest an append may take from its first data
    /// file to the end of its commit (as [`crate::table::PositionTable::with_write_deadline`]).
    pub fn with_write_deadline(self, deadline: std::time::Duration) -> Self {
        Self { write_deadline: deadline, ..self }
    }

    /// The Delta table handle, at the version this handle last saw.
    pub fn delta(&self) -> &DeltaTable {
        &self.table
    }

    /// The table location.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The table as the table-wide maintenance run keeps it: small files binned.
    pub fn maintenance_target(&self) -> Target {
        Target::appended(&self.table, &self.uri, Appending::default())
    }

    /// Appends the dead letters not yet in the table, in one commit that also records
    /// `covered` offsets of their partitions. Returns the handle at the version written
    /// and the dead letters appended, by reason (none: no commit was needed).
    ///
    /// # Errors
    /// [`TableError::Read`] or [`TableError::Write`], both retryable: a retry re-reads
    /// the recorded offsets.
    pub async fn write(
        &self,
        dead_letters: &[DeadLetter],
        covered: &OffsetMap,
    ) -> Result<(Self, ReasonCounts), TableError> {
        let append = OnceAppend { uri: &self.uri, group_id: &self.group_id, deadline: self.write_deadline };
        let (table, new) = append.append(&self.table, dead_letters, |d| &d.source, covered, to_record_batch).await?;
        let mut counts = ReasonCounts::default();
        for d in &new {
            counts.add(&d.category, 1);
        }
        Ok((Self { table, ..self.clone() }, counts))
    }
}

fn to_record_batch(dead_letters: &[&DeadLetter]) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let n = dead_letters.len();
    let mut topic = StringBuilder::with_capacity(n, n * 16);
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut kafka_timestamp = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut key = BinaryBuilder::with_capacity(n, n * 8);
    let mut value = BinaryBuilder::with_capacity(n, n * 256);
    let mut category = StringBuilder::with_capacity(n, n * 16);
    let mut reason = StringBuilder::with_capacity(n, n * 64);
    let mut rejected_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    for d in dead_letters {
        topic.append_value(&d.source.tp.topic);
        partition.append_value(d.source.tp.partition.0);
        offset.append_value(d.source.offset.0);
        kafka_timestamp.append_option(d.kafka_timestamp_millis.and_then(|ms| ms.checked_mul(1000)));
        key.append_option(d.key.as_deref());
        value.append_option(d.value.as_deref());
        category.append_value(&d.category);
        reason.append_value(&d.reason);
        rejected_at.append_value(d.rejected_at_micros);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(topic.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(kafka_timestamp.finish()),
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(category.finish()),
        Arc::new(reason.finish()),
        Arc::new(rejected_at.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Reads the dead letters at `uri`, newest rejection first, optionally only those of
/// `category`, at most `limit`.
///
/// # Errors
/// When the table cannot be opened or read.
pub async fn read(
    uri: &str,
    storage_options: &Settings,
    category: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, TableError> {
    let read_err = TableError::on_read(uri);
    let url = deltalake::ensure_table_uri(uri).map_err(&read_err)?;
    let options = storage_options.0.clone().into_iter().collect();
    let table = deltalake::open_table_with_storage_options(url, options).await.map_err(&read_err)?;
    let query = |e: deltalake::datafusion::error::DataFusionError| read_err(e.into());
    let ctx = SessionContext::new();
    let provider = table.table_provider().await.map_err(query)?;
    ctx.register_table("dead_letters", provider).map_err(query)?;
    let filter = match category {
        Some(c) => format!("WHERE category = '{}'", c.replace('\'', "''")),
        None => String::new(),
    };
    let batches = ctx
        .sql(&format!(
            "SELECT * FROM dead_letters {filter} \
             ORDER BY rejected_at DESC, source_topic, source_partition, source_offset DESC LIMIT {limit}"
        ))
        .await
        .map_err(query)?
        .collect()
        .await
        .map_err(query)?;
    let mut found = Vec::new();
    for batch in &batches {
        found.extend(rows_of(batch).map_err(|e| read_err(e.into()))?);
    }
    Ok(found)
}

/// Converts query results to dead letters; the query engine may hand back other
/// physical types (string views, dictionaries), so every column is cast to the schema's.
fn rows_of(b: &RecordBatch) -> Result<Vec<DeadLetter>, deltalake::arrow::error::ArrowError> {
    let expected = schema();
    let mut columns = Vec::with_capacity(expected.fields().len());
    for field in expected.fields() {
        let column = b.column_by_name(field.name()).ok_or_else(|| {
            deltalake::arrow::error::ArrowError::SchemaError(format!("column `{}` is missing", field.name()))
        })?;
        columns.push(deltalake::arrow::compute::cast(column, field.data_type())?);
    }
    let [topic, partition, offset, ts, key, value, category, reason, at] = columns.as_slice() else {
        unreachable!("the schema has nine columns")
    };
    let (topic, category, reason) = (topic.as_string::<i32>(), category.as_string::<i32>(), reason.as_string::<i32>());
    let (key, value) = (key.as_binary::<i32>(), value.as_binary::<i32>());
    let (partition, offset) = (partition.as_primitive::<Int32Type>(), offset.as_primitive::<Int64Type>());
    let (ts, at) = (ts.as_primitive::<TimestampMicrosecondType>(), at.as_primitive::<TimestampMicrosecondType>());
    Ok((0..b.num_rows())
        .map(|r| DeadLetter {
            source: Coordinates {
                tp: TopicPartition::new(topic.value(r), partition.value(r)),
                offset: Offset(offset.value(r)),
            },
            key: (!key.is_null(r)).then(|| key.value(r).to_vec()),
            value: (!value.is_null(r)).then(|| value.value(r).to_vec()),
            kafka_timestamp_millis: (!ts.is_null(r)).then(|| ts.value(r).div_euclid(1000)),
            rejected_at_micros: at.value(r),
            category: category.value(r).to_string(),
            reason: reason.value(r).to_string(),
        })
        .collect())
}
