//! The operator's commands: `show`, `inspect`, `replay`, `reconcile`, `rebuild` and `maintain`. Each reads the
//! table (and Kafka) and prints a report, as an aligned table for people or as JSON
//! for scripts; none of them runs inside the worker.
//!
//! Exit codes, the same for every command: 0 when it ran (and, for the checks, found
//! nothing to report), 1 when a check found differences (`reconcile`, `replay
//! --dry-run`), 2 when it could not run (see [`Outcome`]).

pub mod dead_letters;
pub mod inspect;
pub mod maintain;
pub mod rebuild;
pub mod reconcile;
pub mod replay;
pub mod show;

use deltalake::datafusion::prelude::{SessionContext, col, lit};
use deltalake::{DeltaTable, DeltaTableError};
use futures::TryStreamExt;

use crate::config::DeltaConfig;
use crate::table::schema::{TableRow, columns, from_record_batch};

/// How a report is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table for people.
    #[default]
    Table,
    /// One JSON document, for scripts.
    Json,
}

/// How rows are printed (`show`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RowFormat {
    /// An aligned table for people.
    #[default]
    Table,
    /// One JSON array, for scripts.
    Json,
    /// CSV with a header line, for spreadsheets.
    Csv,
}

/// What a command found, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and found nothing to report: exit code 0.
    Clean,
    /// A check found differences: exit code 1.
    Differences,
}

/// Failures of the operator's commands (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The table cannot be opened (it may not exist yet).
    #[error("cannot open the Delta table at {uri}: {source}. Check delta.table_uri (or --table-uri)")]
    Open {
        /// Table location.
        uri: String,
        /// Cause.
        source: Box<DeltaTableError>,
    },
    /// A query over the table failed.
    #[error("reading the Delta table failed: {0}")]
    Query(#[from] deltalake::datafusion::error::DataFusionError),
    /// The table's rows do not have the positions table's columns.
    #[error("the table's rows cannot be read as positions: {0}")]
    Rows(#[from] deltalake::arrow::error::ArrowError),
    /// Kafka could not be asked.
    #[error("{0}")]
    Kafka(String),
    /// The command's input is wrong.
    #[error("{0}")]
    Input(String),
    /// Writing the table failed.
    #[error(transparent)]
    Table(#[from] crate::delta::TableError),
    /// Writing the table or the outputs written before it failed.
    #[error(transparent)]
    Write(#[from] crate::worker::flush::FlushError),
}

/// Which rows of the table (or of a book from the history) to read: one filter for both.
pub use crate::history::BookFilter as RowFilter;

/// Opens the table at `config.table_uri` at its latest version.
///
/// # Errors
/// [`OpsError::Open`] when it does not exist or storage fails.
pub async fn open_table(config: &DeltaConfig) -> Result<DeltaTable, OpsError> {
    open_table_at(&config.table_uri, config).await
}

/// Opens the table at `uri` with the storage options of `config`.
///
/// # Errors
/// [`OpsError::Open`] when it does not exist or storage fails.
pub async fn open_table_at(uri: &str, config: &DeltaConfig) -> Result<DeltaTable, OpsError> {
    let open_err = |source| OpsError::Open { uri: uri.to_string(), source: Box::new(source) };
    let url = deltalake::ensure_table_uri(uri).map_err(open_err)?;
    let options = config.storage_options.0.clone().into_iter().collect();
    deltalake::open_table_with_storage_options(url, options).await.map_err(open_err)
}

/// The rows of `table` that `filter` selects, in `symbol, conid` order.
///
/// # Errors
/// [`OpsError::Query`] or [`OpsError::Rows`].
pub async fn rows(table: &DeltaTable, filter: &RowFilter) -> Result<Vec<TableRow>, OpsError> {
    let ctx = SessionContext::new();
    let mut frame = ctx.read_table(table.table_provider().await?)?;
    if let Some(symbol) = &filter.symbol {
        frame = frame.filter(col(columns::SYMBOL).eq(lit(symbol.as_str())))?;
    }
    if let Some(conid) = filter.conid {
        frame = frame.filter(col(columns::CONID).eq(lit(conid)))?;
    }
    if let Some(account) = &filter.account {
        frame = frame.filter(col("account").eq(lit(account.as_str())))?;
    }
    frame = frame.sort(vec![col(columns::SYMBOL).sort(true, false), col(columns::CONID).sort(true, false)])?;
    if let Some(limit) = filter.limit {
        frame = frame.limit(0, Some(limit))?;
    }
    let mut stream = frame.execute_stream().await?;
    let mut found = Vec::new();
    while let Some(batch) = stream.try_next().await? {
        found.extend(from_record_batch(&batch)?);
    }
    Ok(found)
}

/// An RFC 3339 time of microseconds since the epoch.
pub fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or_else(|| micros.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}
