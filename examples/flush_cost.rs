//! Benchmark B3: the time of one flush into tables of growing size, through the
//! worker's own write path (no Kafka): flushes of 10k random keys, then a sparse stream
//! of flushes of 100 random keys; then the memory the key index takes per key, and a
//! restart: a new handle's first flush of 200 updates, which builds the key index from
//! the table's files, and one that reads the saved key index instead. Prints one JSON
//! line per table size.
//!
//! Usage: flush_cost DIR LAYOUT(symbol|none) MODE(copy_on_write|deletion_vectors) SYMBOLS KEYS...
//! (DIR may be `s3://bucket/prefix`, with the `AWS_*` variables of the object store.)

use std::time::Instant;

use position_sink::config::{DeltaConfig, PartitionBy, WriteMode};
use position_sink::offsets::{Coordinates, Offset, TopicPartition};
use position_sink::table::PositionTable;
use position_sink::update::PositionUpdate;
use position_sink::worker::batch::Batch;

const PARTITIONS: i32 = 6;
const FLUSH: usize = 10_000;
const SPARSE_FLUSH: usize = 100;
const ROUNDS: usize = 3;
/// Updates in the first flush after a restart.
const RESTART_FLUSH: usize = 200;

fn row(conid: i64, symbols: i64, timestamp_micros: i64, offset: i64) -> PositionUpdate {
    PositionUpdate {
        conid,
        symbol: format!("SYM{:05}", conid % symbols),
        position: (conid % 1000) as f64,
        timestamp_micros,
        account: Some("DU1234567".into()),
        sec_type: Some("STK".into()),
        currency: Some("USD".into()),
        avg_cost: Some(101.5),
        market_price: Some(102.25),
        market_value: Some(1022.5),
        unrealized_pnl: Some(7.5),
        realized_pnl: None,
        source: Coordinates {
            tp: TopicPartition::new("bench", (conid % PARTITIONS as i64) as i32),
            offset: Offset(offset),
        },
    }
}

fn batch(rows: Vec<PositionUpdate>) -> Batch {
    Batch::of_rows(rows)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, layout, mode, symbols, sizes @ ..] = args.as_slice() else {
        return Err("usage: flush_cost DIR LAYOUT MODE SYMBOLS KEYS...".into());
    };
    let layout = match layout.as_str() {
        "symbol" => PartitionBy::Symbol,
        "none" => PartitionBy::None,
        other => return Err(format!("unknown layout {other}").into()),
    };
    let write_mode = match mode.as_str() {
        "copy_on_write" => WriteMode::CopyOnWrite,
        "deletion_vectors" => WriteMode::DeletionVectors,
        other => return Err(format!("unknown write mode {other}").into()),
    };
    let symbols: i64 = symbols.parse()?;
    for size in sizes {
        let keys: i64 = size.parse()?;
        if keys < FLUSH as i64 {
            return Err(format!("a table of {keys} keys cannot take a flush of {FLUSH} distinct keys").into());
        }
        let uri = format!("{dir}/flush-cost-{layout:?}-{mode}-{keys}").to_lowercase();
        // An object store's settings come from the AWS_* variables, as a user would give them.
        let storage_options =
            position_sink::config::Settings(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect());
        let config = DeltaConfig {
            table_uri: uri.clone(),
            partition_by: layout,
            write_mode,
            storage_options,
            ..DeltaConfig::default()
        };
        let mut table = PositionTable::open_or_create(&config, "bench").await?;
        let mut offset = 0;
        let built = Instant::now();
        // Copy-on-write fills each group's files up to the limit as keys arrive; merge-on-read
        // writes each flush's new keys into new files, so the table is built in larger flushes.
        let chunk_size = match write_mode {
            WriteMode::CopyOnWrite => 100_000,
            WriteMode::DeletionVectors => 600_000,
        };
        for chunk in (0..keys).collect::<Vec<_>>().chunks(chunk_size) {
            let rows = chunk.iter().map(|c| {
                offset += 1;
                row(*c, symbols, 1_000_000, offset)
            });
            table = table.write(&batch(rows.collect())).await?.0;
        }
        let build_seconds = built.elapsed().as_secs_f64();
        let row_bytes = live_bytes(&table) as f64 / keys as f64;
        let mut flushes = Vec::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (round, size) in
            std::iter::repeat_n(FLUSH, ROUNDS).chain(std::iter::repeat_n(SPARSE_FLUSH, ROUNDS)).enumerate()
        {
            let mut conids = std::collections::BTreeSet::new();
            while conids.len() < size {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                conids.insert((state % keys as u64) as i64);
            }
            let rows = conids.into_iter().map(|c| {
                offset += 1;
                row(c, symbols, 2_000_000 + round as i64, offset)
            });
            let started = Instant::now();
            let (written, report) = table.write(&batch(rows.collect())).await?;
            table = written;
            flushes.push(serde_json::json!({
                "sparse": size == SPARSE_FLUSH,
                "seconds": started.elapsed().as_secs_f64(),
                "rows_in": report.rows_offered,
                "updated": report.updated,
                "files_removed": report.files_removed,
                "files_added": report.files_added,
                "files_hidden_in": report.files_hidden_in,
                "rows_rewritten": report.rows_rewritten,
                "bytes_written": report.bytes_written,
                "bytes_over_batch": report.bytes_written as f64 / (report.rows_offered.max(1) as f64 * row_bytes),
            }));
        }
        let (index_bytes, index_keys) = table.key_index_footprint().await;
        drop(table);
        // Restarts, each a new handle (an empty key index) and its first flush of 200
        // updates, through FLUSH_COST_RESTART_ENDPOINT when set (the same object store
        // behind a proxy that delays each request): first with no saved key index (it
        // reads every live file's keys), then with the index that handle saved.
        let mut restart_config = config.clone();
        if let Ok(endpoint) = std::env::var("FLUSH_COST_RESTART_ENDPOINT") {
            restart_config.storage_options.0.insert("AWS_ENDPOINT_URL".into(), endpoint);
        }
        let restart = |offset: &mut i64| {
            let config = restart_config.clone();
            let rows: Vec<PositionUpdate> = (0..RESTART_FLUSH as i64)
                .map(|i| {
                    *offset += 1;
                    row((i * 7919) % keys, symbols, 3_000_000 + *offset, *offset)
                })
                .collect();
            async move {
                let started = Instant::now();
                let table = PositionTable::open_or_create(&config, "bench").await?;
                let (table, report) = table.write(&batch(rows)).await?;
                Ok::<_, Box<dyn std::error::Error>>((table, report.index_files_read, started.elapsed().as_secs_f64()))
            }
        };
        let (table, files_read_without, restart_first_flush_seconds) = restart(&mut offset).await?;
        let saving = Instant::now();
        let saved = table.save_key_index().await?.ok_or("no key index to save")?;
        let save_seconds = saving.elapsed().as_secs_f64();
        drop(table);
        let (table, files_read_with, restart_saved_index_first_flush_seconds) = restart(&mut offset).await?;
        let live_files = table.delta().snapshot()?.log_data().num_files();
        let median = |sparse: bool| {
            let mut seconds: Vec<f64> = flushes
                .iter()
                .filter(|f| f["sparse"].as_bool() == Some(sparse))
                .filter_map(|f| f["seconds"].as_f64())
                .collect();
            seconds.sort_by(f64::total_cmp);
            seconds[seconds.len() / 2]
        };
        println!(
            "{}",
            serde_json::json!({
                "layout": format!("{layout:?}").to_lowercase(), "mode": mode, "symbols": symbols, "keys": keys,
                "build_seconds": build_seconds, "median_flush_seconds": median(false),
                "median_sparse_flush_seconds": median(true), "row_bytes": row_bytes,
                "index_bytes_per_key": index_bytes as f64 / index_keys.max(1) as f64, "index_keys": index_keys,
                "restart_first_flush_seconds": restart_first_flush_seconds, "live_files": live_files,
                "restart_files_read": files_read_without,
                "restart_saved_index_first_flush_seconds": restart_saved_index_first_flush_seconds,
                "restart_saved_index_files_read": files_read_with, "saved_index_bytes": saved.bytes,
                "saved_index_seconds": save_seconds,
                "restart_latency_ms": std::env::var("FLUSH_COST_RESTART_LATENCY_MS").ok(),
                "flushes": flushes,
            })
        );
        drop(table);
        std::fs::remove_dir_all(&uri).ok();
    }
    Ok(())
}

/// Bytes of the table's live data files.
fn live_bytes(table: &PositionTable) -> u64 {
    table.delta().snapshot().map(|s| s.log_data().iter().map(|f| f.size().max(0) as u64).sum()).unwrap_or_default()
}
