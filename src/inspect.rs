//! Reading the table back for people: a summary printed by `position-sink show`.

use deltalake::DeltaTableError;
use deltalake::datafusion::prelude::SessionContext;

use crate::config::{Config, DeadLetterDestination, DeltaConfig};

/// Failures while reading the table.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The table cannot be opened (it may not exist yet).
    #[error("cannot open the Delta table at {uri}: {source}. Check delta.table_uri")]
    Open {
        /// Table location.
        uri: String,
        /// Cause.
        source: DeltaTableError,
    },
    /// A query over the table failed.
    #[error("querying the Delta table failed: {0}")]
    Query(#[from] deltalake::datafusion::error::DataFusionError),
}

/// Prints a summary of the positions table and the dead letters by reason.
///
/// # Errors
/// See [`InspectError`].
pub async fn show(config: &Config) -> Result<(), InspectError> {
    show_positions(&config.delta).await?;
    if config.dead_letter.destination == DeadLetterDestination::Table {
        let uri = config.dead_letter.resolved_table_uri(&config.delta);
        let Ok(url) = deltalake::ensure_table_uri(&uri) else { return Ok(()) };
        let options = config.delta.storage_options.0.clone().into_iter().collect();
        // No dead-letter table yet is not an error: nothing was rejected.
        if let Ok(table) = deltalake::open_table_with_storage_options(url, options).await {
            let ctx = SessionContext::new();
            ctx.register_table("dead_letters", table.table_provider().await?)?;
            println!("dead letters at {uri}, by reason:");
            ctx.sql("SELECT category, count(*) AS messages, max(rejected_at) AS latest FROM dead_letters GROUP BY category ORDER BY messages DESC")
                .await?
                .show()
                .await?;
        }
    }
    Ok(())
}

/// Prints the table's version, row counts, the largest partitions and the newest rows.
async fn show_positions(config: &DeltaConfig) -> Result<(), InspectError> {
    let uri = config.table_uri.clone();
    let open_err = |source| InspectError::Open { uri: uri.clone(), source };
    let url = deltalake::ensure_table_uri(&uri).map_err(open_err)?;
    let options = config.storage_options.0.clone().into_iter().collect();
    let table = deltalake::open_table_with_storage_options(url, options).await.map_err(open_err)?;
    let ctx = SessionContext::new();
    let provider = table.table_provider().await?;
    ctx.register_table("positions", provider)?;
    println!("table    {uri}");
    println!("version  {}", table.version().map_or("none".to_string(), |v| v.to_string()));
    ctx.sql(
        "SELECT count(*) AS rows, count(DISTINCT conid) AS conids, count(DISTINCT symbol) AS symbols, \
         max(\"timestamp\") AS latest_event, max(ingested_at) AS latest_ingest FROM positions",
    )
    .await?
    .show()
    .await?;
    println!("largest symbol partitions:");
    ctx.sql("SELECT symbol, count(*) AS rows FROM positions GROUP BY symbol ORDER BY rows DESC, symbol LIMIT 10")
        .await?
        .show()
        .await?;
    println!("newest updates:");
    ctx.sql(
        "SELECT conid, symbol, position, \"timestamp\", kafka_partition, kafka_offset \
         FROM positions ORDER BY \"timestamp\" DESC, kafka_offset DESC LIMIT 5",
    )
    .await?
    .show()
    .await?;
    Ok(())
}
