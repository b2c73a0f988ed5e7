//! The position update: the validated form of one Kafka message, and the
//! last-write-wins order between two updates of the same key.
//!
//! Invariant kept here: [`PositionUpdate::supersedes`] is a strict total order on
//! distinct messages (event timestamp, then offset, then topic and partition), so
//! every worker, every replay and the merge ([`crate::table::merge`]) pick the same winner.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::offsets::Coordinates;

/// The message fields a position update has, in the table's column order.
pub const FIELDS: [&str; 12] = [
    "conid",
    "symbol",
    "position",
    "timestamp",
    "account",
    "sec_type",
    "currency",
    "avg_cost",
    "market_price",
    "market_value",
    "unrealized_pnl",
    "realized_pnl",
];

/// One validated position update, with the Kafka coordinates it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionUpdate {
    /// Contract id of the instrument (> 0).
    pub conid: i64,
    /// Ticker symbol; the table's partition column.
    pub symbol: String,
    /// Signed position size.
    pub position: f64,
    /// Event time, microseconds since the Unix epoch (UTC).
    pub timestamp_micros: i64,
    /// Account the position belongs to.
    pub account: Option<String>,
    /// Security type, e.g. `STK`, `OPT`, `FUT`.
    pub sec_type: Option<String>,
    /// Currency code.
    pub currency: Option<String>,
    /// Average cost per unit.
    pub avg_cost: Option<f64>,
    /// Last market price.
    pub market_price: Option<f64>,
    /// Market value of the position.
    pub market_value: Option<f64>,
    /// Unrealized profit and loss.
    pub unrealized_pnl: Option<f64>,
    /// Realized profit and loss.
    pub realized_pnl: Option<f64>,
    /// Where the message came from.
    pub source: Coordinates,
}

impl PositionUpdate {
    /// Last-write-wins precedence: `Ordering::Greater` means `self` wins over `other`.
    ///
    /// Later event timestamp wins; on equal timestamps the later Kafka offset wins; the
    /// topic and partition only break ties between different partitions, to stay total.
    pub fn precedence(&self, other: &PositionUpdate) -> Ordering {
        (self.timestamp_micros, self.source.offset, &self.source.tp.topic, self.source.tp.partition).cmp(&(
            other.timestamp_micros,
            other.source.offset,
            &other.source.tp.topic,
            other.source.tp.partition,
        ))
    }

    /// Whether `self` replaces `other` under last-write-wins.
    pub fn supersedes(&self, other: &PositionUpdate) -> bool {
        self.precedence(other) == Ordering::Greater
    }

    /// The identity of the row this update writes, under `keys`.
    pub fn key(&self, keys: &[KeyColumn]) -> RowKey {
        let mut key = RowKey { conid: self.conid, ..RowKey::default() };
        for column in keys {
            match column {
                KeyColumn::Conid => {}
                KeyColumn::Account => key.account = self.account.clone(),
                KeyColumn::SecType => key.sec_type = self.sec_type.clone(),
                KeyColumn::Currency => key.currency = self.currency.clone(),
            }
        }
        key
    }
}

/// A column that may be part of the row key. `conid` always is; `symbol` never is, so
/// that a conid whose symbol changes keeps one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyColumn {
    /// Contract id.
    Conid,
    /// Account.
    Account,
    /// Security type.
    SecType,
    /// Currency.
    Currency,
}

impl KeyColumn {
    /// The table column name.
    pub fn name(self) -> &'static str {
        match self {
            KeyColumn::Conid => "conid",
            KeyColumn::Account => "account",
            KeyColumn::SecType => "sec_type",
            KeyColumn::Currency => "currency",
        }
    }
}

/// The identity of one table row: `conid` plus the configured key columns. Columns
/// outside the key stay `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// Contract id.
    pub conid: i64,
    /// Account, when it is a key column.
    pub account: Option<String>,
    /// Security type, when it is a key column.
    pub sec_type: Option<String>,
    /// Currency, when it is a key column.
    pub currency: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::offsets::{Offset, TopicPartition};

    /// A minimal valid update for tests.
    pub fn update(conid: i64, symbol: &str, ts: i64, partition: i32, offset: i64) -> PositionUpdate {
        PositionUpdate {
            conid,
            symbol: symbol.to_string(),
            position: 1.0,
            timestamp_micros: ts,
            account: None,
            sec_type: None,
            currency: None,
            avg_cost: None,
            market_price: None,
            market_value: None,
            unrealized_pnl: None,
            realized_pnl: None,
            source: Coordinates { tp: TopicPartition::new("positions", partition), offset: Offset(offset) },
        }
    }

    #[test]
    fn later_timestamp_wins_even_from_an_earlier_offset() {
        let newer = update(1, "A", 200, 0, 1);
        let older = update(1, "A", 100, 0, 2);
        assert!(newer.supersedes(&older));
        assert!(!older.supersedes(&newer));
    }

    #[test]
    fn equal_timestamps_are_decided_by_offset() {
        let first = update(1, "A", 100, 0, 1);
        let second = update(1, "A", 100, 0, 2);
        assert!(second.supersedes(&first));
    }

    #[test]
    fn an_update_never_supersedes_itself() {
        let u = update(1, "A", 100, 0, 1);
        assert!(!u.supersedes(&u.clone()));
    }

    #[test]
    fn key_includes_only_configured_columns() {
        let mut u = update(7, "A", 1, 0, 0);
        u.account = Some("U1".into());
        u.currency = Some("USD".into());
        let key = u.key(&[KeyColumn::Account, KeyColumn::Conid]);
        assert_eq!(key.account.as_deref(), Some("U1"));
        assert_eq!(key.currency, None);
    }
}
