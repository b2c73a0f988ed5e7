//! The table is readable by the tools users use: the Python `deltalake` and `polars`
//! packages read it back and see the expected rows and the `symbol` partitioning.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_deltalake_and_polars_read_the_expected_rows() {
    let topic = create_topic("readers", 3).await;
    let mut messages = sample_with_bad(2000, 120, 9, 3);
    // Symbols that need escaping in partition paths.
    messages.push(update_json(9001, "BRK/B", 3.0, "2026-03-01T10:00:00Z"));
    messages.push(update_json(9002, "ÄÖ ü=%", 4.0, "2026-03-01T10:00:00.5Z"));
    messages.push(update_json(9003, "a.b..c", 5.0, "2026-03-01T10:00:01+02:00"));
    // The longest symbols accepted, with every byte escaped in the partition path.
    messages.push(update_json(9004, &"Ü".repeat(40), 6.0, "2026-03-01T10:00:02Z"));
    messages.push(update_json(9005, &"=".repeat(80), 7.0, "2026-03-01T10:00:03Z"));
    messages.push(update_json(9006, "../../escape", 8.0, "2026-03-01T10:00:04Z"));
    let produced = produce(&topic, &messages, None).await;
    let (dir, table) = table_dir();
    run_to_end(config(&topic, &unique("g"), &table)).await.expect("worker");
    let expected = expected_document(&topic, &produced);
    assert!(!expected["dead_letters"].as_array().unwrap().is_empty());
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    check_with_python(&table, &expected_path, "symbol");
    // Nothing was written outside the two tables' directories.
    let mut entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    entries.sort();
    assert_eq!(entries, ["expected.json", "positions", "positions_dead_letters"], "unexpected files beside the tables");
}

/// Runs tests/readers/check_table.py on `table` against the expected rows.
fn check_with_python(table: &std::path::Path, expected_path: &std::path::Path, layout: &str) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers/check_table.py");
    run_python(&[script.as_os_str(), table.as_os_str(), expected_path.as_os_str(), layout.as_ref()]);
}

/// The expected-rows document check_table.py reads.
fn expected_document(topic: &str, produced: &[Produced]) -> serde_json::Value {
    let rows: Vec<_> = model(produced)
        .into_values()
        .map(|r| {
            serde_json::json!({
                "symbol": r.symbol, "conid": r.conid, "position": r.position,
                "timestamp_micros": r.timestamp_micros, "kafka_partition": r.kafka_partition,
                "kafka_offset": r.kafka_offset,
            })
        })
        .collect();
    let hex = |b: &Option<Vec<u8>>| b.as_ref().map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>());
    let dead_letters: Vec<_> = produced
        .iter()
        .filter(|m| m.rejection.is_some())
        .map(|m| {
            serde_json::json!({
                "topic": topic, "partition": m.partition, "offset": m.offset,
                "category": m.rejection, "key_hex": hex(&m.key), "value_hex": hex(&m.value),
            })
        })
        .collect();
    serde_json::json!({"rows": rows, "dead_letters": dead_letters})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unpartitioned_layout_with_symbol_changes_reads_back_one_row_per_conid() {
    let topic = create_topic("readers-none", 3).await;
    let mut messages = sample_with_bad(1500, 90, 11, 2);
    // Conids that change symbol, with late updates still under the old one.
    for conid in 9101..9111 {
        messages.push(update_json(conid, "OLDCO", 1.0, "2026-03-01T10:00:00Z"));
    }
    for conid in 9101..9111 {
        messages.push(update_json(conid, &format!("NEWCO{}", conid % 3), 2.0, "2026-03-01T10:00:05Z"));
        messages.push(update_json(conid, "OLDCO", 3.0, "2026-03-01T10:00:02Z"));
    }
    let produced = produce(&topic, &messages, None).await;
    let (dir, table) = table_dir();
    let mut config = config(&topic, &unique("g"), &table);
    config.delta.partition_by = position_sink::config::PartitionBy::None;
    config.flush.max_records = 400;
    run_to_end(config).await.expect("worker");
    let expected = expected_document(&topic, &produced);
    let renamed = expected["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["conid"].as_i64().is_some_and(|c| (9101..9111).contains(&c)))
        .count();
    assert_eq!(renamed, 10);
    assert!(
        expected["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["symbol"].as_str().is_some_and(|s| s.starts_with("NEWCO")))
            .count()
            == 10,
        "every renamed conid ends under its new symbol"
    );
    let expected_path = dir.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec(&expected).unwrap()).unwrap();
    check_with_python(&table, &expected_path, "none");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}
