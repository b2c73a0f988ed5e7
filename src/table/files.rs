//! The table's data files: parquet read (all columns, or only some) into the table's
//! Arrow types, written one file per planned group, on the runtime's threads a few at a
//! time (encoding and decoding are CPU work).

use std::sync::Arc;

use deltalake::arrow::array::{AsArray, RecordBatch, RecordBatchReader};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::Int32Type;
use deltalake::kernel::Add;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::{DeltaTableError, ObjectStore};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use super::merge::{self, NewFile};
use super::schema::schema;
use super::{PositionTable, TableError};
use crate::offsets::TopicPartition;
use crate::update::{KeyColumn, RowKey};

impl PositionTable {
    /// Writes the planned files, one data file each.
    pub(super) async fn write_files(&self, files: &[NewFile]) -> Result<Vec<Add>, TableError> {
        use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
        let rows = files.iter().map(|f| f.rows.num_rows()).sum();
        let write_err = |source| TableError::Write { uri: self.uri.clone(), rows, source: Box::new(source) };
        let snapshot = self.table.snapshot().map_err(write_err)?;
        // The table's own choice of statistics (delta.dataSkippingStatsColumns or
        // delta.dataSkippingNumIndexedCols), whoever set it.
        let (indexed_columns, statistics_columns) = deltalake::operations::get_num_idx_cols_and_stats_columns(
            Some(snapshot.table_config()),
            Default::default(),
        );
        let config = WriterConfig::new(
            schema(),
            self.layout.columns().iter().map(|c| c.to_string()).collect(),
            None,
            None,
            None,
            indexed_columns,
            statistics_columns,
        );
        let store = self.table.object_store();
        let writes: Vec<_> = files
            .iter()
            .map(|file| {
                let mut writer = DeltaWriter::new(store.clone(), config.clone());
                let rows = file.rows.clone();
                async move {
                    writer.write(&rows).await?;
                    let adds = writer.close().await?;
                    match <[Add; 1]>::try_from(adds) {
                        Ok([add]) => Ok(add),
                        Err(adds) => Err(DeltaTableError::Generic(format!(
                            "expected one data file for one group, the writer made {}",
                            adds.len()
                        ))),
                    }
                }
            })
            .collect();
        on_threads(writes).await.map_err(write_err)
    }
}

/// Runs `tasks` on the runtime's threads, a few at a time (parquet encoding and
/// decoding are CPU work), and returns their results in order.
pub(super) async fn on_threads<T, F>(tasks: Vec<F>) -> Result<Vec<T>, DeltaTableError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DeltaTableError>> + Send + 'static,
{
    let width = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    futures::stream::iter(tasks)
        .map(tokio::spawn)
        .buffered(width)
        .map(|joined| joined.map_err(|e| DeltaTableError::Generic(format!("a data file task failed: {e}")))?)
        .try_collect()
        .await
}

/// A data file's rows, or only the `columns` named.
pub(super) async fn read_file(
    store: Arc<dyn ObjectStore>,
    path: &str,
    columns: Option<&[&str]>,
) -> Result<RecordBatch, DeltaTableError> {
    let location = deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path));
    let bytes = store.get(&location).await?.bytes().await?;
    let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    if let Some(columns) = columns {
        let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
        builder = builder.with_projection(mask);
    }
    let reader = builder.build()?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(as_table_types(concat_batches(&schema, &batches)?)?)
}

/// `rows` with each column of the table's schema in the Arrow type this program
/// writes: files written by other engines (Spark, Python `deltalake`, polars) may hold
/// strings as views or large strings, and timestamps in other units.
fn as_table_types(rows: RecordBatch) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    use deltalake::arrow::datatypes::{Field, Schema};
    let table = schema();
    if rows
        .schema()
        .fields()
        .iter()
        .all(|f| table.field_with_name(f.name()).is_ok_and(|t| t.data_type() == f.data_type()))
    {
        return Ok(rows);
    }
    let mut fields = Vec::with_capacity(rows.num_columns());
    let mut columns = Vec::with_capacity(rows.num_columns());
    for (field, column) in rows.schema().fields().iter().zip(rows.columns()) {
        match table.field_with_name(field.name()) {
            Ok(wanted) if wanted.data_type() != field.data_type() => {
                columns.push(deltalake::arrow::compute::cast(column, wanted.data_type())?);
                fields.push(Field::new(field.name(), wanted.data_type().clone(), field.is_nullable()));
            }
            _ => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// The keys of a file's rows, and the Kafka partition they all come from (if one).
pub(super) fn file_keys(
    rows: &RecordBatch,
    key_columns: &[KeyColumn],
) -> Result<(Option<TopicPartition>, Vec<RowKey>), deltalake::arrow::error::ArrowError> {
    let topics = merge::column(rows, "kafka_topic")?.as_string::<i32>();
    let partitions = merge::column(rows, "kafka_partition")?.as_primitive::<Int32Type>();
    let mut owner = None;
    let mut mixed = false;
    for row in 0..rows.num_rows() {
        let this = (topics.value(row), partitions.value(row));
        match owner {
            None => owner = Some(this),
            Some(first) if first != this => mixed = true,
            Some(_) => {}
        }
    }
    let owner = owner.filter(|_| !mixed).map(|(topic, partition)| TopicPartition::new(topic, partition));
    Ok((owner, merge::keys_of(rows, key_columns)?))
}

/// A path as the Delta log's file list shows it (percent-decoded).
pub(super) fn decoded_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()
}
