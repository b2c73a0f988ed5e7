//! `position-sink show`: the table's rows, filtered, and without filters a summary of
//! the table and its dead letters first.

use comfy_table::Table;
use deltalake::datafusion::prelude::SessionContext;
use serde_json::json;

use super::{Format, OpsError, RowFilter, open_table, open_table_at, rfc3339, rows};
use crate::config::{Config, DeadLetterDestination};
use crate::table::schema::TableRow;

/// Prints the rows `filter` selects; with no filter, a summary of the table and of the
/// dead letters by reason before them.
///
/// # Errors
/// See [`OpsError`].
pub async fn show(config: &Config, filter: &RowFilter, format: Format) -> Result<(), OpsError> {
    let table = open_table(&config.delta).await?;
    let found = rows(&table, filter).await?;
    let unfiltered = filter.symbol.is_none() && filter.conid.is_none() && filter.account.is_none();
    match format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = found.iter().map(row_json).collect();
            println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        }
        Format::Table => {
            if unfiltered {
                print_summary(config, &table).await?;
            }
            println!("{}", rows_table(&found));
            println!("{} rows shown", found.len());
        }
    }
    Ok(())
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
