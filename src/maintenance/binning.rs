//! Binning the small files of an append-only table (the dead-letter table, a file per
//! flush that rejected something; the history table, a file per flush and event day)
//! into one file per partition, of up to [`BIN_SIZE`] in all per run, its rows sorted
//! by the table's sort columns (the history's `conid, timestamp`, so a read of one
//! conid or one time range skips files by their statistics).
//!
//! delta-rs's `OPTIMIZE` commits its removes with `dataChange: false`, and delta-rs's
//! conflict check ignores such removes: two runs at once (a worker's table-wide run and
//! `position-sink maintain`) both commit, each adding a copy of the rows it packed, and
//! every dead letter they packed is then held twice (and four times after the next
//! pair). Here the removes say `dataChange: true` and the adds `false` (the rows are
//! the same), so of two runs that pack one file the second conflicts ("a file deleted
//! twice") and is dropped; appends committed meanwhile are blind appends (they read
//! nothing, and say so) and never conflict with it.
//!
//! Like a flush, the run commits within the write deadline of its first file
//! (`maintenance.unreferenced_file_age / 3`) or not at all.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deltalake::arrow::array::{ArrayRef, RecordBatch, StringArray};
use deltalake::arrow::compute::{SortColumn, cast, concat_batches, lexsort_to_indices, take};
use deltalake::arrow::datatypes::SchemaRef;
use deltalake::arrow::error::ArrowError;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add};
use deltalake::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake::protocol::DeltaOperation;
use deltalake::{DeltaTable, DeltaTableError};
use object_store::ObjectStoreExt;

/// The size small files are binned into.
pub const BIN_SIZE: NonZeroU64 = NonZeroU64::new(32 * 1024 * 1024).expect("not zero");

/// What one run packed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binned {
    /// Files removed.
    pub files: usize,
    /// Bytes of the file added in their place.
    pub bytes: u64,
    /// Whether the commit was dropped because another run packed one of the files first.
    pub conflicted: bool,
}

/// Packs the table's smallest files (below [`BIN_SIZE`], without deletion vectors) into
/// one file per partition of at most about [`BIN_SIZE`] in all, rows sorted by
/// `sort_by`, in a commit of its own; nothing when no partition has two small files.
///
/// # Errors
/// When a file cannot be read or written, the deadline passes or the commit fails for
/// another reason than a concurrent run's.
pub async fn bin(table: &DeltaTable, deadline: Duration, sort_by: &[&str]) -> Result<Binned, DeltaTableError> {
    let mut table = table.clone();
    table.update_state().await?;
    let snapshot = table.snapshot()?.clone();
    let picked = pick(
        snapshot
            .log_data()
            .iter()
            .filter(|f| f.deletion_vector_descriptor().is_none() && (f.size() as u64) < BIN_SIZE.get())
            .map(|f| SmallFile {
                path: f.path().into_owned(),
                size: f.size().max(0) as u64,
                partition: f.partition_values_map(),
            }),
    );
    if picked.is_empty() {
        return Ok(Binned::default());
    }

    let writing = Instant::now();
    let store = table.object_store();
    let arrow_schema = snapshot.snapshot().arrow_schema();
    let mut adds = Vec::with_capacity(picked.len());
    for (partition, paths) in &picked {
        let mut batches = Vec::with_capacity(paths.len());
        for path in paths {
            let location = deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path.as_str()));
            let bytes = store.get(&location).await?.bytes().await?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
            for batch in reader {
                batches.push(with_partition_values(&batch?, &arrow_schema, partition)?);
            }
        }
        let rows = sorted(&concat_batches(&arrow_schema, batches.iter())?, sort_by)?;
        adds.push(write_one(&table, arrow_schema.clone(), &rows).await?);
    }
    let bytes = adds.iter().map(|add| add.size.max(0) as u64).sum();
    let files: std::collections::BTreeSet<&String> = picked.values().flatten().collect();

    let mut actions: Vec<Action> = snapshot
        .log_data()
        .iter()
        .filter(|f| files.contains(&f.path().into_owned()))
        .map(|f| Action::Remove(deltalake::kernel::Remove { data_change: true, ..f.remove_action(true) }))
        .collect();
    actions.extend(adds.into_iter().map(|add| Action::Add(Add { data_change: false, ..add })));
    let Some(remaining) = deadline.checked_sub(writing.elapsed()).filter(|r| !r.is_zero()) else {
        return Err(DeltaTableError::Generic(format!(
            "binning small files took longer than the {} a write may take (a third of \
             maintenance.unreferenced_file_age); it is not committed and runs again next time",
            humantime::format_duration(deadline)
        )));
    };
    let operation = DeltaOperation::Optimize { predicate: None, target_size: BIN_SIZE.get() as i64 };
    // Log cleanup is maintenance's own step, not every commit's.
    let properties = CommitProperties::default().with_cleanup_expired_logs(Some(false));
    let commit =
        CommitBuilder::from(properties).with_actions(actions).build(Some(&snapshot), table.log_store(), operation);
    let files = files.len();
    match tokio::time::timeout(remaining, commit).await {
        Ok(Ok(_)) => Ok(Binned { files, bytes, conflicted: false }),
        Ok(Err(
            DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_),
            },
        )) => Ok(Binned { files, bytes, conflicted: true }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(DeltaTableError::Generic(format!(
            "binning's commit did not finish within the {} a write may take; it runs again next time",
            humantime::format_duration(deadline)
        ))),
    }
}

/// A small file binning may pack.
#[derive(Debug, Clone)]
struct SmallFile {
    path: String,
    size: u64,
    partition: HashMap<String, Option<String>>,
}

/// A partition's values, by column, in column order.
type Partition = Vec<(String, Option<String>)>;

/// The files one run packs, by partition: in each, the smallest first; partitions in
/// order of their values; [`BIN_SIZE`] bytes in all. A partition with fewer than two
/// small files is left alone.
fn pick(files: impl Iterator<Item = SmallFile>) -> BTreeMap<Partition, Vec<String>> {
    let mut by_partition: BTreeMap<Partition, Vec<(u64, String)>> = BTreeMap::new();
    for file in files {
        let mut partition: Partition = file.partition.into_iter().collect();
        partition.sort();
        by_partition.entry(partition).or_default().push((file.size, file.path));
    }
    let mut total = 0;
    let mut picked = BTreeMap::new();
    for (partition, mut files) in by_partition {
        files.sort();
        let mut taken = Vec::new();
        for (size, path) in files {
            if total + taken.iter().map(|(size, _)| size).sum::<u64>() + size > BIN_SIZE.get() {
                break;
            }
            taken.push((size, path));
        }
        if taken.len() >= 2 {
            total += taken.iter().map(|(size, _)| size).sum::<u64>();
            picked.insert(partition, taken.into_iter().map(|(_, path)| path).collect());
        }
    }
    picked
}

/// `batch` (a data file's rows, without the partition columns, which Delta keeps in
/// the log) with `schema`'s columns: the partition columns filled with `partition`'s
/// values, cast to their types.
fn with_partition_values(
    batch: &RecordBatch,
    schema: &SchemaRef,
    partition: &Partition,
) -> Result<RecordBatch, ArrowError> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Ok(column.clone()),
            Some(column) => cast(column, field.data_type()),
            None => {
                let value = partition.iter().find(|(name, _)| name == field.name()).and_then(|(_, v)| v.as_deref());
                let text: ArrayRef = Arc::new(StringArray::from(vec![value; batch.num_rows()]));
                cast(&text, field.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// `rows` sorted by the columns `sort_by` (ascending, nulls first); unchanged without any.
fn sorted(rows: &RecordBatch, sort_by: &[&str]) -> Result<RecordBatch, ArrowError> {
    if sort_by.is_empty() || rows.num_rows() < 2 {
        return Ok(rows.clone());
    }
    let keys = sort_by
        .iter()
        .map(|name| {
            let values = rows
                .column_by_name(name)
                .ok_or_else(|| ArrowError::SchemaError(format!("no column `{name}` to sort by")))?
                .clone();
            Ok(SortColumn { values, options: None })
        })
        .collect::<Result<Vec<_>, ArrowError>>()?;
    let order = lexsort_to_indices(&keys, None)?;
    let columns = rows.columns().iter().map(|c| take(c, &order, None)).collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(rows.schema(), columns)
}

/// Writes `rows` as one data file of `table`.
async fn write_one(table: &DeltaTable, schema: SchemaRef, rows: &RecordBatch) -> Result<Add, DeltaTableError> {
    use deltalake::datafile::writer::{DeltaWriter, WriterConfig};
    let snapshot = table.snapshot()?;
    let (indexed, stats) =
        deltalake::operations::get_num_idx_cols_and_stats_columns(Some(snapshot.table_config()), Default::default());
    let partitions = snapshot.metadata().partition_columns().to_vec();
    let config = WriterConfig::new(schema, partitions, None, None, None, indexed, stats);
    let mut writer = DeltaWriter::new(table.object_store(), config);
    writer.write(rows).await?;
    let adds = writer.close().await?;
    match <[Add; 1]>::try_from(adds) {
        Ok([add]) => Ok(add),
        Err(adds) => Err(DeltaTableError::Generic(format!("binning wrote {} files instead of one", adds.len()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{AsArray, Int64Array};
    use deltalake::arrow::datatypes::{DataType, Date32Type, Field, Int64Type, Schema};

    fn small(path: &str, size: u64, day: Option<&str>) -> SmallFile {
        let partition = day.map(|d| ("event_date".to_string(), Some(d.to_string()))).into_iter().collect();
        SmallFile { path: path.to_string(), size, partition }
    }

    #[test]
    fn files_are_packed_per_partition_smallest_first_and_a_lone_file_is_left() {
        let picked = pick(
            [
                small("a", 30, Some("2025-11-25")),
                small("b", 10, Some("2025-11-25")),
                small("c", 20, Some("2025-11-26")),
                small("d", 5, Some("2025-11-24")),
                small("e", 7, Some("2025-11-25")),
            ]
            .into_iter(),
        );
        let paths: Vec<&Vec<String>> = picked.values().collect();
        assert_eq!(
            paths,
            [&vec!["e".to_string(), "b".to_string(), "a".to_string()]],
            "the 24th and 26th hold one each"
        );
        let unpartitioned = pick([small("x", 1, None), small("y", 2, None)].into_iter());
        assert_eq!(unpartitioned.values().next().map(Vec::len), Some(2));
        let too_big = pick([small("x", BIN_SIZE.get() - 1, None), small("y", 2, None)].into_iter());
        assert!(too_big.is_empty(), "the two do not fit in one bin");
    }

    #[test]
    fn partition_values_come_back_as_columns_and_rows_are_sorted() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("conid", DataType::Int64, false),
            Field::new("ts", DataType::Int64, false),
            Field::new("event_date", DataType::Date32, false),
        ]));
        let file_schema = Arc::new(Schema::new(vec![schema.field(0).clone(), schema.field(1).clone()]));
        let file = RecordBatch::try_new(
            file_schema,
            vec![Arc::new(Int64Array::from(vec![2, 1, 2, 1])), Arc::new(Int64Array::from(vec![5, 9, 3, 4]))],
        )
        .unwrap();
        let partition = vec![("event_date".to_string(), Some("1970-01-03".to_string()))];
        let full = with_partition_values(&file, &schema, &partition).unwrap();
        let days = full.column(2).as_primitive::<Date32Type>();
        assert!((0..4).all(|r| days.value(r) == 2));
        let rows = sorted(&full, &["conid", "ts"]).unwrap();
        let pairs: Vec<(i64, i64)> = (0..4)
            .map(|r| {
                (
                    rows.column(0).as_primitive::<Int64Type>().value(r),
                    rows.column(1).as_primitive::<Int64Type>().value(r),
                )
            })
            .collect();
        assert_eq!(pairs, [(1, 4), (1, 9), (2, 3), (2, 5)]);
    }
}
