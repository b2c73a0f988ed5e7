//! The table contract without Kafka: creation, partitioning, and refusal of an
//! incompatible existing table.

mod common;

use deltalake::kernel::{DataType, PrimitiveType, StructField};
use position_sink::config::DeltaConfig;
use position_sink::table::{PositionTable, TableError};

#[tokio::test]
async fn an_incompatible_existing_table_is_refused_with_what_differs() {
    let (_dir, path) = common::table_dir();
    let url = deltalake::ensure_table_uri(path.display().to_string()).unwrap();
    deltalake::DeltaTable::try_from_url(url)
        .await
        .unwrap()
        .create()
        .with_columns([
            StructField::new("conid", DataType::Primitive(PrimitiveType::String), false),
            StructField::new("symbol", DataType::Primitive(PrimitiveType::String), false),
        ])
        .await
        .unwrap();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let err = PositionTable::open_or_create(&config, "g").await.expect_err("must refuse");
    assert!(matches!(err, TableError::Incompatible { .. }));
    let message = err.to_string();
    assert!(message.contains("column `conid`"), "{message}");
    assert!(message.contains("column `position` is missing"), "{message}");
    assert!(message.contains("partitioned by"), "{message}");
    assert!(message.contains("delta.table_uri"), "{message}");
}

#[tokio::test]
async fn a_new_table_is_created_partitioned_by_symbol_and_reopens() {
    let (_dir, path) = common::table_dir();
    let config = DeltaConfig { table_uri: path.display().to_string(), ..DeltaConfig::default() };
    let created = PositionTable::open_or_create(&config, "g").await.unwrap();
    assert_eq!(created.version().map(|v| v.0), Some(0));
    PositionTable::open_or_create(&config, "g").await.expect("reopens its own table");
    assert!(path.join("_delta_log/00000000000000000000.json").exists());
}
