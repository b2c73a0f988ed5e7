//! `position-sink show`: the table's rows, filtered, and without filters a summary of
//! the table and its dead letters first; with `--as-of` or `--as-known-at`, the book of
//! a past time from the history table (docs/history.md).

use comfy_table::Table;
use deltalake::datafusion::prelude::SessionContext;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{OpsError, RowFilter, RowFormat, open_table, open_table_at, rfc3339, rows};
use crate::config::{Config, DeadLetterDestination};
use crate::history::{self, AsOf};
use crate::table::schema::{LINEAGE_COLUMNS, PAYLOAD_COLUMNS, TableRow};

/// Prints the rows `filter` selects: of the positions table now, or of the book at
/// `when` from the history table. With no filter and the table format, a summary of
/// the positions table and of the dead letters by reason comes first.
///
/// # Errors
/// See [`OpsError`].
pub async fn show(
    config: &Config,
    filter: &RowFilter,
    format: RowFormat,
    when: Option<AsOf>,
    progress_bar: bool,
) -> Result<(), OpsError> {
    let found = match when {
        None => {
            let table = open_table(&config.delta).await?;
            let unfiltered = filter.symbol.is_none() && filter.conid.is_none() && filter.account.is_none();
            if unfiltered && format == RowFormat::Table {
                print_summary(config, &table).await?;
            }
            rows(&table, filter).await?
        }
        Some(as_of) => {
            let found = book(config, filter, as_of, progress_bar).await?;
            if format == RowFormat::Table {
                let uri = config.history.resolved_table_uri(&config.delta);
                match as_of {
                    AsOf::Event(t) => println!("book as of {} (event time), from the history at {uri}", rfc3339(t)),
                    AsOf::Known(t) => println!("book as known at {}, from the history at {uri}", rfc3339(t)),
                }
            }
            found
        }
    };
    match format {
        RowFormat::Json => {
            let rows: Vec<serde_json::Value> = found.iter().map(row_json).collect();
            println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        }
        RowFormat::Csv => print_csv(&found)?,
        RowFormat::Table => {
            println!("{}", rows_table(&found));
            println!("{} rows shown", found.len());
        }
    }
    Ok(())
}

/// The book at `as_of` from the history table, filtered.
///
/// # Errors
/// [`OpsError::Open`] when there is no history table, [`OpsError::Query`] when it
/// cannot be read.
pub async fn book(
    config: &Config,
    filter: &RowFilter,
    as_of: AsOf,
    progress_bar: bool,
) -> Result<Vec<TableRow>, OpsError> {
    let uri = config.history.resolved_table_uri(&config.delta);
    let table = open_table_at(&uri, &config.delta).await.map_err(|error| match error {
        OpsError::Open { uri, source } => OpsError::Input(format!(
            "there is no history table at {uri} ({source}): a book of a past time is read from the history, \
             which workers keep with history.enabled = true (history.table_uri names where)"
        )),
        other => other,
    })?;
    let bar = if progress_bar { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} of history  {bytes_per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let found = history::book(&table, as_of, &config.delta.key_columns, filter, &Bar(bar.clone())).await?;
    bar.finish_and_clear();
    Ok(found)
}

/// A progress bar over the bytes of history scanned.
struct Bar(ProgressBar);

impl history::query::ScanProgress for Bar {
    fn start(&self, total_bytes: u64) {
        self.0.set_length(total_bytes);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// Rows as CSV with a header, the columns and values of [`row_json`].
fn print_csv(rows: &[TableRow]) -> Result<(), OpsError> {
    let csv_err = |e: csv::Error| OpsError::Input(format!("writing CSV to standard output failed: {e}"));
    let mut writer = csv::Writer::from_writer(std::io::stdout().lock());
    let columns: Vec<&str> = PAYLOAD_COLUMNS.iter().chain(LINEAGE_COLUMNS.iter()).copied().collect();
    writer.write_record(&columns).map_err(csv_err)?;
    for row in rows {
        let value = row_json(row);
        writer
            .write_record(columns.iter().map(|column| match &value[*column] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            }))
            .map_err(csv_err)?;
    }
    writer.flush().map_err(|e| csv_err(e.into()))
}

/// One row as JSON, with times in RFC 3339.
pub fn row_json(row: &TableRow) -> serde_json::Value {
    let u = &row.update;
    json!({
        "conid": u.conid,
        "symbol": u.symbol,
        "position": u.position,
        "timestamp": rfc3339(u.timestamp_micros),
        "account": u.account,
        "sec_type": u.sec_type,
        "currency": u.currency,
        "avg_cost": u.avg_cost,
        "market_price": u.market_price,
        "market_value": u.market_value,
        "unrealized_pnl": u.unrealized_pnl,
        "realized_pnl": u.realized_pnl,
        "kafka_topic": u.source.tp.topic,
        "kafka_partition": u.source.tp.partition.0,
        "kafka_offset": u.source.offset.0,
        "ingested_at": rfc3339(row.ingested_at_micros),
    })
}

/// Rows as an aligned table.
pub fn rows_table(rows: &[TableRow]) -> Table {
    let mut table =
        plain_table(["conid", "symbol", "position", "timestamp", "account", "avg_cost", "partition", "offset"]);
    for row in rows {
        let u = &row.update;
        table.add_row([
            u.conid.to_string(),
            u.symbol.clone(),
            u.position.to_string(),
            rfc3339(u.timestamp_micros),
            u.account.clone().unwrap_or_default(),
            u.avg_cost.map(|v| v.to_string()).unwrap_or_default(),
            u.source.tp.partition.0.to_string(),
            u.source.offset.0.to_string(),
        ]);
    }
    table
}

/// A borderless table with `header`, columns aligned.
pub fn plain_table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_style(comfy_table::presets::NOTHING).set_header(header);
    table
}

async fn print_summary(config: &Config, table: &deltalake::DeltaTable) -> Result<(), OpsError> {
    let ctx = SessionContext::new();
    ctx.register_table("positions", table.table_provider().await?)?;
    println!("table    {}", config.delta.table_uri);
    println!("version  {}", table.version().map_or("none".to_string(), |v| v.to_string()));
    ctx.sql(
        "SELECT count(*) AS rows, count(DISTINCT conid) AS conids, count(DISTINCT symbol) AS symbols, \
         max(\"timestamp\") AS latest_event, max(ingested_at) AS latest_ingest FROM positions",
    )
    .await?
    .show()
    .await?;
    if config.dead_letter.destination == DeadLetterDestination::Table {
        let uri = config.dead_letter.resolved_table_uri(&config.delta);
        // No dead-letter table yet is not an error: nothing was rejected.
        if let Ok(dead_letters) = open_table_at(&uri, &config.delta).await {
            ctx.register_table("dead_letters", dead_letters.table_provider().await?)?;
            println!("dead letters at {uri}, by reason:");
            ctx.sql(
                "SELECT category, count(*) AS messages, max(rejected_at) AS latest FROM dead_letters \
                 GROUP BY category ORDER BY messages DESC",
            )
            .await?
            .show()
            .await?;
        }
    }
    Ok(())
}
