//! The history table's columns: the positions table's, then the message's Kafka
//! timestamp and the event date the table is partitioned by. Pure: no I/O.

use std::sync::Arc;

use deltalake::arrow::array::{ArrayRef, Date32Array, RecordBatch, TimestampMicrosecondArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::error::ArrowError;

use super::Entry;
use crate::table::schema as positions;

/// The message's Kafka timestamp (null when the producer set none).
pub const KAFKA_TIMESTAMP: &str = "kafka_timestamp";
/// The UTC day of the update's event time: the partition column.
pub const EVENT_DATE: &str = "event_date";

/// The partition columns.
pub const PARTITION_COLUMNS: &[&str] = &[EVENT_DATE];

/// The order of the rows in a compacted file: a read of one conid, or of a time range,
/// skips files and row groups by their statistics.
pub const SORTED_BY: &[&str] = &[positions::columns::CONID, positions::columns::TIMESTAMP];

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The table's Arrow schema: the positions table's columns, `kafka_timestamp`, `event_date`.
pub fn schema() -> SchemaRef {
    let mut fields: Vec<Field> = positions::schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(KAFKA_TIMESTAMP, DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true));
    fields.push(Field::new(EVENT_DATE, DataType::Date32, false));
    Arc::new(Schema::new(fields))
}

/// The UTC day (days since the epoch) of a time in microseconds since the epoch.
pub fn event_date(timestamp_micros: i64) -> i32 {
    i32::try_from(timestamp_micros.div_euclid(MICROS_PER_DAY)).unwrap_or(if timestamp_micros < 0 {
        i32::MIN
    } else {
        i32::MAX
    })
}

/// Converts entries to a record batch of [`schema`], each stamped `ingested_at(entry)`.
///
/// # Errors
/// Only if Arrow rejects the arrays, which would be a bug in this module.
pub fn to_record_batch(entries: &[&Entry], ingested_at: impl Fn(&Entry) -> i64) -> Result<RecordBatch, ArrowError> {
    let rows = positions::to_record_batch(entries.iter().map(|e| &e.update), 0)?;
    let stamps: TimestampMicrosecondArray =
        entries.iter().map(|e| Some(ingested_at(e))).collect::<TimestampMicrosecondArray>().with_timezone("UTC");
    let kafka_timestamp: TimestampMicrosecondArray = entries
        .iter()
        .map(|e| e.kafka_timestamp_millis.and_then(|ms| ms.checked_mul(1000)))
        .collect::<TimestampMicrosecondArray>()
        .with_timezone("UTC");
    let event_date: Date32Array = entries.iter().map(|e| Some(event_date(e.update.timestamp_micros))).collect();
    let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
    let stamped = rows.schema_ref().index_of(positions::columns::INGESTED_AT)?;
    columns[stamped] = Arc::new(stamps);
    columns.push(Arc::new(kafka_timestamp));
    columns.push(Arc::new(event_date));
    RecordBatch::try_new(schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::arrow::array::{Array, AsArray};
    use deltalake::arrow::datatypes::{Date32Type, TimestampMicrosecondType};

    use crate::update::tests::update;

    #[test]
    fn event_date_is_the_utc_day_of_the_event_time() {
        assert_eq!(event_date(0), 0);
        assert_eq!(event_date(MICROS_PER_DAY - 1), 0);
        assert_eq!(event_date(MICROS_PER_DAY), 1);
        assert_eq!(event_date(-1), -1, "a microsecond before the epoch is the day before");
        // 2025-11-25T23:59:59.999999Z and the next microsecond.
        let midnight = 1_764_115_200_000_000;
        assert_eq!(event_date(midnight - 1) + 1, event_date(midnight));
    }

    #[test]
    fn rows_carry_the_positions_columns_then_kafka_time_and_event_date() {
        let a = Entry { update: update(5, "MSFT", MICROS_PER_DAY + 7, 2, 77), kafka_timestamp_millis: Some(12) };
        let b = Entry { update: update(5, "MSFT", 3, 2, 78), kafka_timestamp_millis: None };
        let batch = to_record_batch(&[&a, &b], |e| 40 + e.update.source.offset.0 - 76).unwrap();
        let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(&names[..16], positions::schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>());
        assert_eq!(&names[16..], [KAFKA_TIMESTAMP, EVENT_DATE]);
        let kafka = batch.column_by_name(KAFKA_TIMESTAMP).unwrap().as_primitive::<TimestampMicrosecondType>();
        assert_eq!(kafka.value(0), 12_000);
        assert!(kafka.is_null(1));
        let days = batch.column_by_name(EVENT_DATE).unwrap().as_primitive::<Date32Type>();
        assert_eq!((days.value(0), days.value(1)), (1, 0));
        let back = positions::from_record_batch(&batch).unwrap();
        assert_eq!(back[1].update, b.update);
        assert_eq!((back[0].ingested_at_micros, back[1].ingested_at_micros), (41, 42));
    }
}
