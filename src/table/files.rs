//! The table's data files: parquet read (all columns, or only some) into the table's
//! Arrow types, written one file per planned group, on the runtime's threads a few at a
//! time (encoding and decoding are CPU work).

use std::sync::Arc;

use deltalake::arrow::array::{AsArray, BooleanArray, RecordBatch, RecordBatchReader};
use deltalake::arrow::compute::concat_batches;
use deltalake::arrow::datatypes::{Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::kernel::Add;
use deltalake::parquet::arrow::ProjectionMask;
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::{DeltaTableError, ObjectStore};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use roaring::RoaringTreemap;

use super::key_index::{KeyIndex, Row, SourceId, Stamp};
use super::merge::{self, NewFile};
use super::schema::{columns, partition_columns, schema};
use super::{PositionTable, TableError};
use crate::offsets::TopicPartition;
use crate::update::{KeyColumn, RowKey};

impl PositionTable {
    /// Writes the planned files, one data file each.
    pub(super) async fn write_files(&self, files: &[NewFile]) -> Result<Vec<Add>, TableError> {
        use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
        let rows = files.iter().map(|f| f.rows.num_rows()).sum();
        let write_err = TableError::on_write(&self.uri, rows);
        let snapshot = self.table.snapshot().map_err(&write_err)?;
        // The table's own choice of statistics (delta.dataSkippingStatsColumns or
        // delta.dataSkippingNumIndexedCols), whoever set it.
        let (indexed_columns, statistics_columns) = deltalake::operations::get_num_idx_cols_and_stats_columns(
            Some(snapshot.table_config()),
            Default::default(),
        );
        let config = WriterConfig::new(
            schema(),
            partition_columns(self.layout).iter().map(|c| c.to_string()).collect(),
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
        let largest = files.iter().map(|f| f.rows.get_array_memory_size() as u64).max().unwrap_or(0);
        on_threads_sized(writes, largest).await.map_err(&write_err)
    }
}

/// Runs `tasks` on the runtime's threads and returns their results in order, many at a
/// time: for tasks that mostly wait on storage (reading the keys of many small files
/// from an object store), so a restart's first read of thousands of files is not a
/// queue of round trips.
pub(super) async fn on_threads_io<T, F>(tasks: Vec<F>) -> Result<Vec<T>, DeltaTableError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DeltaTableError>> + Send + 'static,
{
    on_threads_by(tasks, IO_READS_AT_ONCE).await
}

/// Reads of key columns in flight at once (each holds one file's bytes).
pub(super) const IO_READS_AT_ONCE: usize = 32;

/// Bytes of the files read or written at once, at most (their parquet bytes when read,
/// their rows in memory when written), beyond one file at a time per thread.
const BYTES_AT_ONCE: u64 = 64 << 20;

/// [`on_threads_io`] for reads or writes of whole files of at most `largest` bytes: as many
/// at a time as [`BYTES_AT_ONCE`] allows, up to [`IO_READS_AT_ONCE`], so that small
/// files (the `symbol` layout at thousands of symbols) are not a queue of round trips
/// to a store tens of milliseconds away, and large ones do not hold much memory at once.
pub(super) async fn on_threads_sized<T, F>(tasks: Vec<F>, largest: u64) -> Result<Vec<T>, DeltaTableError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DeltaTableError>> + Send + 'static,
{
    let cpu = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let by_size = (BYTES_AT_ONCE / largest.max(1)) as usize;
    on_threads_by(tasks, by_size.clamp(cpu, IO_READS_AT_ONCE.max(cpu))).await
}

async fn on_threads_by<T, F>(tasks: Vec<F>, width: usize) -> Result<Vec<T>, DeltaTableError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, DeltaTableError>> + Send + 'static,
{
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

/// The live rows of a file (those `deleted` does not hide), with their keys and
/// precedence, and the Kafka partition all its rows come from (if one). `rows` holds at
/// least the key columns, `timestamp`, `kafka_topic`, `kafka_partition` and
/// `kafka_offset`, in the file's order.
pub(super) fn file_rows(
    rows: &RecordBatch,
    key_columns: &[KeyColumn],
    deleted: &RoaringTreemap,
    index: &mut KeyIndex,
) -> Result<(Option<TopicPartition>, Vec<Row>), deltalake::arrow::error::ArrowError> {
    let topics = merge::column(rows, columns::KAFKA_TOPIC)?.as_string::<i32>();
    let partitions = merge::column(rows, columns::KAFKA_PARTITION)?.as_primitive::<Int32Type>();
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
    let keys = merge::keys_of(rows, key_columns)?;
    Ok((owner, rows_with_keys(rows, keys, deleted, index)?))
}

/// The live rows of `rows` (those `deleted` does not hide) whose keys are `keys`, with
/// their precedence.
pub(super) fn rows_with_keys(
    rows: &RecordBatch,
    keys: Vec<RowKey>,
    deleted: &RoaringTreemap,
    index: &mut KeyIndex,
) -> Result<Vec<Row>, deltalake::arrow::error::ArrowError> {
    let topics = merge::column(rows, columns::KAFKA_TOPIC)?.as_string::<i32>();
    let partitions = merge::column(rows, columns::KAFKA_PARTITION)?.as_primitive::<Int32Type>();
    let offsets = merge::column(rows, columns::KAFKA_OFFSET)?.as_primitive::<Int64Type>().values();
    let timestamps = merge::column(rows, columns::TIMESTAMP)?.as_primitive::<TimestampMicrosecondType>().values();
    let mut last_source: Option<((&str, i32), SourceId)> = None;
    let mut live = Vec::with_capacity(keys.len().saturating_sub(deleted.len() as usize));
    for (row, key) in keys.into_iter().enumerate() {
        if deleted.contains(row as u64) {
            continue;
        }
        let tp = (topics.value(row), partitions.value(row));
        let source = match last_source {
            Some((last, id)) if last == tp => id,
            _ => {
                let id = index.source(tp.0, tp.1);
                last_source = Some((tp, id));
                id
            }
        };
        let stamp = Stamp { timestamp: timestamps[row], offset: offsets[row], source };
        live.push(Row { row: row as u32, key, stamp });
    }
    Ok(live)
}

/// `rows` without those `deleted` hides.
pub(super) fn without_hidden(
    rows: RecordBatch,
    deleted: &RoaringTreemap,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    if deleted.is_empty() {
        return Ok(rows);
    }
    let keep: BooleanArray = (0..rows.num_rows()).map(|row| Some(!deleted.contains(row as u64))).collect();
    deltalake::arrow::compute::filter_record_batch(&rows, &keep)
}

/// A path as the Delta log's file list shows it (percent-decoded).
pub(super) fn decoded_path(path: &str) -> String {
    percent_encoding::percent_decode_str(path).decode_utf8_lossy().into_owned()
}
