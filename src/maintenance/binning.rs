//! Binning the small files of an append-only table (the dead-letter table, a file per
//! flush that rejected something) into files of up to [`BIN_SIZE`].
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

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use deltalake::arrow::compute::concat_batches;
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
/// one file of at most about [`BIN_SIZE`], in a commit of its own; nothing when fewer
/// than two are small.
///
/// # Errors
/// When a file cannot be read or written, the deadline passes or the commit fails for
/// another reason than a concurrent run's.
pub async fn bin(table: &DeltaTable, deadline: Duration) -> Result<Binned, DeltaTableError> {
    let mut table = table.clone();
    table.update_state().await?;
    let snapshot = table.snapshot()?.clone();
    let mut small: Vec<(String, i64)> = snapshot
        .log_data()
        .iter()
        .filter(|f| f.deletion_vector_descriptor().is_none() && (f.size() as u64) < BIN_SIZE.get())
        .map(|f| (f.path().into_owned(), f.size()))
        .collect();
    small.sort_by_key(|(_, size)| *size);
    let mut total = 0;
    let picked: std::collections::BTreeSet<String> = small
        .into_iter()
        .take_while(|(_, size)| {
            total += *size as u64;
            total <= BIN_SIZE.get()
        })
        .map(|(path, _)| path)
        .collect();
    if picked.len() < 2 {
        return Ok(Binned::default());
    }

    let writing = Instant::now();
    let store = table.object_store();
    let mut batches = Vec::with_capacity(picked.len());
    for path in &picked {
        let location = deltalake::Path::parse(path).unwrap_or_else(|_| deltalake::Path::from(path.as_str()));
        let bytes = store.get(&location).await?.bytes().await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
        for batch in reader {
            batches.push(batch?);
        }
    }
    let arrow_schema = snapshot.snapshot().arrow_schema();
    let rows = concat_batches(&arrow_schema, batches.iter())?;
    let add = write_one(&table, arrow_schema, &rows).await?;
    let bytes = add.size.max(0) as u64;

    let mut actions: Vec<Action> = snapshot
        .log_data()
        .iter()
        .filter(|f| picked.contains(f.path().as_ref()))
        .map(|f| Action::Remove(deltalake::kernel::Remove { data_change: true, ..f.remove_action(true) }))
        .collect();
    actions.push(Action::Add(Add { data_change: false, ..add }));
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
    match tokio::time::timeout(remaining, commit).await {
        Ok(Ok(_)) => Ok(Binned { files: picked.len(), bytes, conflicted: false }),
        Ok(Err(
            DeltaTableError::VersionAlreadyExists(_)
            | DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_),
            },
        )) => Ok(Binned { files: picked.len(), bytes, conflicted: true }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(DeltaTableError::Generic(format!(
            "binning's commit did not finish within the {} a write may take; it runs again next time",
            humantime::format_duration(deadline)
        ))),
    }
}

/// Writes `rows` as one data file of `table`.
async fn write_one(
    table: &DeltaTable,
    schema: deltalake::arrow::datatypes::SchemaRef,
    rows: &deltalake::arrow::array::RecordBatch,
) -> Result<Add, DeltaTableError> {
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
