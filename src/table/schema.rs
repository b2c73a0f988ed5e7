//! The table's schema and the conversion of deduplicated updates into an Arrow
//! record batch. Pure: no I/O.
//!
//! Invariant kept here: [`schema`] is the single definition of the table's columns;
//! the Delta table, the merge and the readers all follow from it.

use std::sync::Arc;

use deltalake::arrow::array::{
    ArrayRef, Float64Builder, Int32Builder, Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;

use crate::config::PartitionBy;
use crate::offsets::{Coordinates, Offset, TopicPartition};
use crate::update::PositionUpdate;

/// The table's column names: the one place they are spelled.
pub mod columns {
    use crate::update::FIELDS;

    /// The contract id.
    pub const CONID: &str = FIELDS[0];
    /// The instrument's symbol (the partition column of the `symbol` layout).
    pub const SYMBOL: &str = FIELDS[1];
    /// The position.
    pub const POSITION: &str = FIELDS[2];
    /// The update's event time.
    pub const TIMESTAMP: &str = FIELDS[3];
    /// The account.
    pub const ACCOUNT: &str = FIELDS[4];
    /// The security type.
    pub const SEC_TYPE: &str = FIELDS[5];
    /// The currency.
    pub const CURRENCY: &str = FIELDS[6];
    /// The average cost.
    pub const AVG_COST: &str = FIELDS[7];
    /// The market price.
    pub const MARKET_PRICE: &str = FIELDS[8];
    /// The market value.
    pub const MARKET_VALUE: &str = FIELDS[9];
    /// The unrealized profit and loss.
    pub const UNREALIZED_PNL: &str = FIELDS[10];
    /// The realized profit and loss.
    pub const REALIZED_PNL: &str = FIELDS[11];
    /// The Kafka topic the row came from.
    pub const KAFKA_TOPIC: &str = "kafka_topic";
    /// The Kafka partition the row came from.
    pub const KAFKA_PARTITION: &str = "kafka_partition";
    /// The row's Kafka offset.
    pub const KAFKA_OFFSET: &str = "kafka_offset";
    /// When the worker committed the row.
    pub const INGESTED_AT: &str = "ingested_at";
}

/// The partition column.
pub const PARTITION_COLUMN: &str = columns::SYMBOL;

/// The partition columns of a layout.
pub fn partition_columns(layout: PartitionBy) -> &'static [&'static str] {
    match layout {
        PartitionBy::Symbol => &[PARTITION_COLUMN],
        PartitionBy::None => &[],
    }
}

/// Columns set from the message, in table order (`conid` .. `realized_pnl`), then lineage.
pub const PAYLOAD_COLUMNS: [&str; 12] = crate::update::FIELDS;

/// Lineage columns: where and when each row was ingested.
pub const LINEAGE_COLUMNS: [&str; 4] =
    [columns::KAFKA_TOPIC, columns::KAFKA_PARTITION, columns::KAFKA_OFFSET, columns::INGESTED_AT];

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The table's Arrow schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(columns::CONID, DataType::Int64, false),
        Field::new(columns::SYMBOL, DataType::Utf8, false),
        Field::new(columns::POSITION, DataType::Float64, false),
        Field::new(columns::TIMESTAMP, utc_micros(), false),
        Field::new(columns::ACCOUNT, DataType::Utf8, true),
        Field::new(columns::SEC_TYPE, DataType::Utf8, true),
        Field::new(columns::CURRENCY, DataType::Utf8, true),
        Field::new(columns::AVG_COST, DataType::Float64, true),
        Field::new(columns::MARKET_PRICE, DataType::Float64, true),
        Field::new(columns::MARKET_VALUE, DataType::Float64, true),
        Field::new(columns::UNREALIZED_PNL, DataType::Float64, true),
        Field::new(columns::REALIZED_PNL, DataType::Float64, true),
        Field::new(columns::KAFKA_TOPIC, DataType::Utf8, false),
        Field::new(columns::KAFKA_PARTITION, DataType::Int32, false),
        Field::new(columns::KAFKA_OFFSET, DataType::Int64, false),
        Field::new(columns::INGESTED_AT, utc_micros(), false),
    ]))
}

/// Converts updates to a record batch of [`schema`], stamping `ingested_at_micros`.
///
/// # Errors
/// Only if Arrow rejects the arrays, which would be a bug in this module.
pub fn to_record_batch<'a>(
    rows: impl ExactSizeIterator<Item = &'a PositionUpdate> + Clone,
    ingested_at_micros: i64,
) -> Result<RecordBatch, ArrowError> {
    let n = rows.len();
    let mut conid = Int64Builder::with_capacity(n);
    let mut symbol = StringBuilder::with_capacity(n, n * 8);
    let mut position = Float64Builder::with_capacity(n);
    let mut timestamp = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut account = StringBuilder::with_capacity(n, n * 8);
    let mut sec_type = StringBuilder::with_capacity(n, n * 3);
    let mut currency = StringBuilder::with_capacity(n, n * 3);
    let mut avg_cost = Float64Builder::with_capacity(n);
    let mut market_price = Float64Builder::with_capacity(n);
    let mut market_value = Float64Builder::with_capacity(n);
    let mut unrealized_pnl = Float64Builder::with_capacity(n);
    let mut realized_pnl = Float64Builder::with_capacity(n);
    let mut kafka_topic = StringBuilder::with_capacity(n, n * 16);
    let mut kafka_partition = Int32Builder::with_capacity(n);
    let mut kafka_offset = Int64Builder::with_capacity(n);
    let mut ingested_at = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    for row in rows {
        conid.append_value(row.conid);
        symbol.append_value(&row.symbol);
        position.append_value(row.position);
        timestamp.append_value(row.timestamp_micros);
        account.append_option(row.account.as_deref());
        sec_type.append_option(row.sec_type.as_deref());
        currency.append_option(row.currency.as_deref());
        avg_cost.append_option(row.avg_cost);
        market_price.append_option(row.market_price);
        market_value.append_option(row.market_value);
        unrealized_pnl.append_option(row.unrealized_pnl);
        realized_pnl.append_option(row.realized_pnl);
        kafka_topic.append_value(&row.source.tp.topic);
        kafka_partition.append_value(row.source.tp.partition.0);
        kafka_offset.append_value(row.source.offset.0);
        ingested_at.append_value(ingested_at_micros);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(conid.finish()),
        Arc::new(symbol.finish()),
        Arc::new(position.finish()),
        Arc::new(timestamp.finish()),
        Arc::new(account.finish()),
        Arc::new(sec_type.finish()),
        Arc::new(currency.finish()),
        Arc::new(avg_cost.finish()),
        Arc::new(market_price.finish()),
        Arc::new(market_value.finish()),
        Arc::new(unrealized_pnl.finish()),
        Arc::new(realized_pnl.finish()),
        Arc::new(kafka_topic.finish()),
        Arc::new(kafka_partition.finish()),
        Arc::new(kafka_offset.finish()),
        Arc::new(ingested_at.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// A row read back from the table: the update it holds and when it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// The update, with the Kafka coordinates it came from.
    pub update: PositionUpdate,
    /// When the row was written (`ingested_at`), microseconds since the Unix epoch.
    pub ingested_at_micros: i64,
}

/// Converts rows read from the table (any column order, string and timestamp columns in
/// any Arrow encoding a reader chose) back into updates: the inverse of
/// [`to_record_batch`].
///
/// # Errors
/// When a column of [`schema`] is missing or cannot be cast to its type.
pub fn from_record_batch(batch: &RecordBatch) -> Result<Vec<TableRow>, ArrowError> {
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
    let expected = schema();
    let column = |name: &str| -> Result<ArrayRef, ArrowError> {
        let found = batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("the table has no column `{name}`")))?;
        let field = expected.field_with_name(name)?;
        deltalake::arrow::compute::cast(found, field.data_type())
    };
    let columns: Vec<ArrayRef> =
        PAYLOAD_COLUMNS.iter().chain(LINEAGE_COLUMNS.iter()).map(|name| column(name)).collect::<Result<_, _>>()?;
    let Ok(
        [
            conid,
            symbol,
            position,
            timestamp,
            account,
            sec_type,
            currency,
            avg_cost,
            market_price,
            market_value,
            unrealized_pnl,
            realized_pnl,
            kafka_topic,
            kafka_partition,
            kafka_offset,
            ingested_at,
        ],
    ) = <[ArrayRef; 16]>::try_from(columns)
    else {
        unreachable!("the table has 16 columns");
    };
    let text = |a: &ArrayRef, r: usize| {
        let s = a.as_string::<i32>();
        (!s.is_null(r)).then(|| s.value(r).to_string())
    };
    let number = |a: &ArrayRef, r: usize| {
        let f = a.as_primitive::<Float64Type>();
        (!f.is_null(r)).then(|| f.value(r))
    };
    let micros = |a: &ArrayRef, r: usize| a.as_primitive::<TimestampMicrosecondType>().value(r);
    Ok((0..batch.num_rows())
        .map(|r| TableRow {
            update: PositionUpdate {
                conid: conid.as_primitive::<Int64Type>().value(r),
                symbol: text(&symbol, r).unwrap_or_default(),
                position: number(&position, r).unwrap_or_default(),
                timestamp_micros: micros(&timestamp, r),
                account: text(&account, r),
                sec_type: text(&sec_type, r),
                currency: text(&currency, r),
                avg_cost: number(&avg_cost, r),
                market_price: number(&market_price, r),
                market_value: number(&market_value, r),
                unrealized_pnl: number(&unrealized_pnl, r),
                realized_pnl: number(&realized_pnl, r),
                source: Coordinates {
                    tp: TopicPartition::new(
                        text(&kafka_topic, r).unwrap_or_default(),
                        kafka_partition.as_primitive::<Int32Type>().value(r),
                    ),
                    offset: Offset(kafka_offset.as_primitive::<Int64Type>().value(r)),
                },
            },
            ingested_at_micros: micros(&ingested_at, r),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};

    use crate::update::tests::update;

    #[test]
    fn schema_lists_payload_then_lineage_columns() {
        let names: Vec<String> = schema().fields().iter().map(|f| f.name().clone()).collect();
        let expected: Vec<&str> = PAYLOAD_COLUMNS.iter().chain(LINEAGE_COLUMNS.iter()).copied().collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn converts_values_and_nulls() {
        let mut a = update(5, "MSFT", 1_000_000, 2, 77);
        a.avg_cost = Some(12.5);
        a.account = Some("U9".into());
        let b = update(6, "IBM", 2_000_000, 0, 3);
        let batch = to_record_batch([a, b].iter(), 42).unwrap();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column_by_name("conid").unwrap().as_primitive::<Int64Type>().value(0), 5);
        assert_eq!(batch.column_by_name("symbol").unwrap().as_string::<i32>().value(1), "IBM");
        let avg = batch.column_by_name("avg_cost").unwrap().as_primitive::<Float64Type>();
        assert_eq!(avg.value(0), 12.5);
        assert!(avg.is_null(1));
        assert!(batch.column_by_name("account").unwrap().is_null(1));
        let ts = batch.column_by_name("timestamp").unwrap().as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(1), 2_000_000);
        assert_eq!(batch.column_by_name("kafka_offset").unwrap().as_primitive::<Int64Type>().value(0), 77);
        let ing = batch.column_by_name("ingested_at").unwrap().as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ing.value(1), 42);
    }

    #[test]
    fn rows_read_back_are_the_updates_written_whatever_the_column_order() {
        let mut a = update(5, "MSFT", 1_000_000, 2, 77);
        a.avg_cost = Some(12.5);
        a.account = Some("U9".into());
        let b = update(6, "IBM", 2_000_000, 0, 3);
        let batch = to_record_batch([a.clone(), b.clone()].iter(), 42).unwrap();
        let reversed: Vec<usize> = (0..batch.num_columns()).rev().collect();
        let back = from_record_batch(&batch.project(&reversed).unwrap()).unwrap();
        assert_eq!(
            back,
            [TableRow { update: a, ingested_at_micros: 42 }, TableRow { update: b, ingested_at_micros: 42 }]
        );
        let missing = batch.project(&[0, 1]).unwrap();
        assert!(from_record_batch(&missing).unwrap_err().to_string().contains("position"));
    }
}
