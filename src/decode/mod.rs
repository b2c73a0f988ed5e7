//! Decoding and validation: Kafka key and value bytes → [`PositionUpdate`], or a
//! [`Rejection`] that says exactly what is wrong with the message. The format of the
//! value is [`Format`] (`decode.format`); each format is one file here (JSON:
//! `json.rs`), and the checks every format shares (size, symbol, key columns, the
//! Kafka key) are this file's. The worker, `replay` and the dead-letter review all
//! decode through [`decode`].
//!
//! Invariant kept here: every message either becomes a valid update or gets a reason;
//! nothing in the bytes can panic the decoder. Pure functions, no I/O.

mod json;

use serde::{Deserialize, Serialize};

use crate::offsets::Coordinates;
use crate::update::{KeyColumn, PositionUpdate};

/// Earliest event time accepted: 1900-01-01T00:00:00Z, in microseconds.
const MIN_TIMESTAMP_MICROS: i64 = -2_208_988_800_000_000;
/// Latest event time accepted (exclusive): 2262-01-01T00:00:00Z, in microseconds.
/// Later instants overflow the nanosecond timestamps of pandas and Spark's legacy readers.
const MAX_TIMESTAMP_MICROS: i64 = 9_183_110_400_000_000;

/// Longest accepted symbol in UTF-8 bytes. The symbol names a partition directory,
/// where escaping can triple its length, and file names are limited to 255 bytes.
pub const MAX_SYMBOL_BYTES: usize = 80;

/// The format of message values (`decode.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per message (the README's message contract).
    #[default]
    Json,
}

/// What the decoder needs to know beyond the bytes.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// The values' format.
    pub format: Format,
    /// Key columns besides `conid`: they must be present and non-empty.
    pub key_columns: Vec<KeyColumn>,
    /// Largest accepted message (key + value), in bytes.
    pub max_message_bytes: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { format: Format::Json, key_columns: vec![KeyColumn::Conid], max_message_bytes: 1024 * 1024 }
    }
}

/// Why a message cannot become a position update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The message has no value (a tombstone or an empty record).
    #[error("message has no value")]
    EmptyValue,
    /// The message is larger than `decode.max_message_bytes`.
    #[error("message is {size} bytes, larger than the limit of {limit} bytes (decode.max_message_bytes)")]
    TooLarge {
        /// Key plus value size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value bytes are not UTF-8.
    #[error("value is not valid UTF-8 ({0})")]
    NotUtf8(String),
    /// The value does not parse as JSON.
    #[error("value is not valid JSON at line {line} column {column}: {problem}")]
    InvalidJson {
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column (byte) of the problem.
        column: usize,
        /// What the parser expected or found.
        problem: String,
    },
    /// A number is NaN or infinite (bare, which JSON does not allow, or as a string),
    /// or too large for a 64-bit float.
    #[error("\"{0}\" is not a finite number")]
    NotFinite(&'static str),
    /// The value is JSON but not an object.
    #[error("value is JSON but not an object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing required field \"{0}\"")]
    MissingField(&'static str),
    /// A required field is JSON `null`.
    #[error("required field \"{0}\" is null")]
    NullField(&'static str),
    /// A field has the wrong JSON type.
    #[error("\"{field}\" must be {expected}, got {found}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
        /// A short description of what was found.
        found: String,
    },
    /// A number is outside the range its column can hold.
    #[error("\"{field}\" is out of range: {detail}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// What is out of range.
        detail: String,
    },
    /// A string field that is part of the identity is empty or blank.
    #[error("\"{0}\" is empty or blank")]
    Blank(&'static str),
    /// The symbol cannot name a partition: too long, or with control characters.
    #[error("\"symbol\" {0}")]
    InvalidSymbol(String),
    /// The timestamp does not parse or is impossible.
    #[error("\"timestamp\" is invalid: {0}")]
    InvalidTimestamp(String),
    /// The same field appears twice with different values.
    #[error("field \"{0}\" appears twice with different values")]
    DuplicateField(&'static str),
    /// The Kafka key is not a decimal conid.
    #[error("key {0:?} is not a decimal conid")]
    InvalidKey(String),
    /// The Kafka key names another conid than the body.
    #[error("key \"{key}\" disagrees with conid {conid}")]
    KeyMismatch {
        /// The key as text.
        key: String,
        /// The body's conid.
        conid: i64,
    },
}

impl Rejection {
    /// A stable, low-cardinality name for counting rejections by reason.
    pub fn category(&self) -> &'static str {
        match self {
            Rejection::EmptyValue => "empty_value",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::NotUtf8(_) => "not_utf8",
            Rejection::InvalidJson { .. } => "invalid_json",
            Rejection::NotFinite(_) => "not_finite",
            Rejection::NotAnObject => "not_an_object",
            Rejection::MissingField(_) => "missing_field",
            Rejection::NullField(_) => "null_field",
            Rejection::WrongType { .. } => "wrong_type",
            Rejection::OutOfRange { .. } => "out_of_range",
            Rejection::Blank(_) => "blank_field",
            Rejection::InvalidSymbol(_) => "invalid_symbol",
            Rejection::InvalidTimestamp(_) => "invalid_timestamp",
            Rejection::DuplicateField(_) => "duplicate_field",
            Rejection::InvalidKey(_) => "invalid_key",
            Rejection::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

/// Decodes one Kafka message into a position update.
///
/// # Errors
/// A [`Rejection`] naming the first problem found.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    source: Coordinates,
    options: &DecodeOptions,
) -> Result<PositionUpdate, Rejection> {
    let value = value.filter(|v| !v.is_empty()).ok_or(Rejection::EmptyValue)?;
    let size = value.len() + key.map_or(0, <[u8]>::len);
    if size > options.max_message_bytes {
        return Err(Rejection::TooLarge { size, limit: options.max_message_bytes });
    }
    let update = match options.format {
        Format::Json => json::decode(value, source)?,
    };
    check_key_columns(&update, &options.key_columns)?;
    check_key(key, update.conid)?;
    Ok(update)
}

/// Key columns besides `conid` must be present and not blank.
fn check_key_columns(update: &PositionUpdate, key_columns: &[KeyColumn]) -> Result<(), Rejection> {
    for column in key_columns {
        let value = match column {
            KeyColumn::Conid => continue,
            KeyColumn::Account => &update.account,
            KeyColumn::SecType => &update.sec_type,
            KeyColumn::Currency => &update.currency,
        };
        match value {
            None => return Err(Rejection::MissingField(column.name())),
            Some(text) if text.trim().is_empty() => return Err(Rejection::Blank(column.name())),
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_key(key: Option<&[u8]>, conid: i64) -> Result<(), Rejection> {
    let Some(key) = key else { return Ok(()) };
    let digits = !key.is_empty() && key.iter().all(u8::is_ascii_digit);
    // Only ASCII digits get here, so the text is the bytes.
    let parsed = if digits { std::str::from_utf8(key).ok().and_then(|k| k.parse::<i64>().ok()) } else { None };
    let text = || String::from_utf8_lossy(key).into_owned();
    match parsed {
        None => Err(Rejection::InvalidKey(text())),
        Some(k) if k != conid => Err(Rejection::KeyMismatch { key: text(), conid }),
        Some(_) => Ok(()),
    }
}

/// A symbol must be able to name a partition directory.
fn check_symbol(symbol: &str) -> Result<(), Rejection> {
    if symbol.trim().is_empty() {
        return Err(Rejection::Blank("symbol"));
    }
    if symbol.len() > MAX_SYMBOL_BYTES {
        return Err(Rejection::InvalidSymbol(format!(
            "is {} bytes long, more than the {MAX_SYMBOL_BYTES} a partition name can hold",
            symbol.len()
        )));
    }
    if symbol.chars().any(char::is_control) {
        return Err(Rejection::InvalidSymbol(format!("{:?} contains control characters", truncate(symbol, 40))));
    }
    Ok(())
}

/// An event time every reader of the table supports.
fn is_supported_time(micros: i64) -> bool {
    (MIN_TIMESTAMP_MICROS..MAX_TIMESTAMP_MICROS).contains(&micros)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::{Offset, TopicPartition};

    fn at() -> Coordinates {
        Coordinates { tp: TopicPartition::new("positions", 0), offset: Offset(42) }
    }

    fn decode_str(key: Option<&str>, value: &str) -> Result<PositionUpdate, Rejection> {
        decode(key.map(str::as_bytes), Some(value.as_bytes()), at(), &DecodeOptions::default())
    }

    const GOOD: &str = r#"{"conid":265598,"symbol":"AAPL","position":100.5,"timestamp":"2026-11-25T14:30:00.123456Z"}"#;

    #[test]
    fn decodes_a_complete_update() {
        let u = decode_str(
            Some("265598"),
            r#"{"conid":265598,"symbol":"AAPL","position":-3,"timestamp":"2026-11-25T15:30:00.123456+01:00",
                "account":"U1","sec_type":"STK","currency":"USD","avg_cost":1.5,"market_price":2,
                "market_value":null,"unrealized_pnl":0.25,"realized_pnl":-1e3,"extra":{"x":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(u.conid, 265598);
        assert_eq!(u.symbol, "AAPL");
        assert_eq!(u.position, -3.0);
        assert_eq!(u.timestamp_micros, 1_795_617_000_123_456);
        assert_eq!(u.account.as_deref(), Some("U1"));
        assert_eq!(u.market_price, Some(2.0));
        assert_eq!(u.market_value, None);
        assert_eq!(u.realized_pnl, Some(-1000.0));
        assert_eq!(u.source, at());
    }

    #[test]
    fn epoch_milliseconds_are_accepted() {
        let u = decode_str(None, r#"{"conid":1,"symbol":"A","position":0,"timestamp":1764081000123}"#).unwrap();
        assert_eq!(u.timestamp_micros, 1_764_081_000_123_000);
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        let cases: &[(Option<&str>, &str, &str)] = &[
            (None, "not json", "invalid_json"),
            (None, "[1,2]", "not_an_object"),
            (None, r#"{"symbol":"A","position":1,"timestamp":1}"#, "missing_field"),
            (None, r#"{"conid":null,"symbol":"A","position":1,"timestamp":1}"#, "null_field"),
            (None, r#"{"conid":"1","symbol":"A","position":1,"timestamp":1}"#, "wrong_type"),
            (None, r#"{"conid":1.5,"symbol":"A","position":1,"timestamp":1}"#, "wrong_type"),
            (None, r#"{"conid":0,"symbol":"A","position":1,"timestamp":1}"#, "out_of_range"),
            (None, r#"{"conid":18446744073709551615,"symbol":"A","position":1,"timestamp":1}"#, "out_of_range"),
            (None, r#"{"conid":1,"symbol":"  ","position":1,"timestamp":1}"#, "blank_field"),
            (None, r#"{"conid":1,"symbol":"A\nB","position":1,"timestamp":1}"#, "invalid_symbol"),
            (None, r#"{"conid":1,"symbol":"A","position":"NaN","timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","position":"-Infinity","timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","position":"12","timestamp":1}"#, "wrong_type"),
            (None, r#"{"conid":1,"symbol":"A","position":NaN,"timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","position": Infinity,"timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","market_price":-Infinity,"position":1,"timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","position":1e999,"timestamp":1}"#, "not_finite"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":1,"x":NaN}"#, "invalid_json"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":99999999999999999999}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":9223372036854775807}"#, "invalid_timestamp"),
            (None, r#"{"conid":-5,"symbol":"A","position":1,"timestamp":1}"#, "out_of_range"),
            (None, r#"{"conid":99999999999999999999,"symbol":"A","position":1,"timestamp":1}"#, "out_of_range"),
            (None, r#"{"conid":1,"symbol":"","position":1,"timestamp":1}"#, "blank_field"),
            (None, r#"{"conid":1,"symbol":5,"position":1,"timestamp":1}"#, "wrong_type"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-02-30T00:00:00Z"}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"1800-01-01T00:00:00Z"}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":null}"#, "null_field"),
            (None, "\"just a string\"", "not_an_object"),
            (None, "null", "not_an_object"),
            (None, "{", "invalid_json"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-13-01T00:00:00Z"}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-11-25 10:00"}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":99999999999999999}"#, "invalid_timestamp"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":1.5}"#, "wrong_type"),
            (None, r#"{"conid":1,"symbol":"A","symbol":"B","position":1,"timestamp":1}"#, "duplicate_field"),
            (Some("2"), r#"{"conid":1,"symbol":"A","position":1,"timestamp":1}"#, "key_mismatch"),
            (Some("x1"), r#"{"conid":1,"symbol":"A","position":1,"timestamp":1}"#, "invalid_key"),
            (None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":1} trailing"#, "invalid_json"),
        ];
        for (key, value, category) in cases {
            let got = decode_str(*key, value).expect_err(value);
            assert_eq!(got.category(), *category, "{value}: {got}");
        }
    }

    #[test]
    fn symbols_longer_than_a_partition_name_allows_are_rejected() {
        let long = "S".repeat(MAX_SYMBOL_BYTES + 1);
        let value = format!(r#"{{"conid":1,"symbol":"{long}","position":1,"timestamp":1}}"#);
        assert_eq!(decode_str(None, &value).unwrap_err().category(), "invalid_symbol");
        let fits = "Ü".repeat(MAX_SYMBOL_BYTES / 2);
        let value = format!(r#"{{"conid":1,"symbol":"{fits}","position":1,"timestamp":1}}"#);
        assert_eq!(decode_str(None, &value).unwrap().symbol, fits);
    }

    #[test]
    fn duplicate_field_with_equal_values_is_accepted() {
        assert!(decode_str(None, r#"{"conid":1,"conid":1,"symbol":"A","position":1,"timestamp":1}"#).is_ok());
    }

    #[test]
    fn invalid_utf8_and_empty_values_are_rejected() {
        let opts = DecodeOptions::default();
        let bad = decode(None, Some(b"{\"conid\":\xff}"), at(), &opts).unwrap_err();
        assert_eq!(bad.category(), "not_utf8");
        assert_eq!(decode(None, None, at(), &opts).unwrap_err(), Rejection::EmptyValue);
        assert_eq!(decode(None, Some(b""), at(), &opts).unwrap_err(), Rejection::EmptyValue);
    }

    #[test]
    fn oversized_messages_are_rejected() {
        let opts = DecodeOptions { max_message_bytes: 10, ..DecodeOptions::default() };
        let got = decode(None, Some(GOOD.as_bytes()), at(), &opts).unwrap_err();
        assert_eq!(got.category(), "too_large");
    }

    #[test]
    fn key_columns_must_be_present() {
        let opts = DecodeOptions { key_columns: vec![KeyColumn::Account, KeyColumn::Conid], ..Default::default() };
        let got = decode(None, Some(GOOD.as_bytes()), at(), &opts).unwrap_err();
        assert_eq!(got, Rejection::MissingField("account"));
    }

    #[test]
    fn json_errors_give_line_and_column() {
        let got = decode_str(None, r#"{"conid":1,"symbol":}"#).unwrap_err();
        assert_eq!(got.to_string(), "value is not valid JSON at line 1 column 21: expected value");
        let got = decode_str(None, r#"{"conid":1,"symbol":"A","position":NaN,"timestamp":1}"#).unwrap_err();
        assert_eq!(got.to_string(), "\"position\" is not a finite number");
    }

    #[test]
    fn impossible_dates_are_told_apart_from_bad_formats() {
        let got = decode_str(None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-02-30T00:00:00Z"}"#);
        assert!(got.unwrap_err().to_string().contains("is not a possible date and time"));
        let got = decode_str(None, r#"{"conid":1,"symbol":"A","position":1,"timestamp":"2026-02-03 00:00"}"#);
        assert!(got.unwrap_err().to_string().contains("is not RFC 3339 with an offset"));
    }

    #[test]
    fn reasons_name_the_field() {
        let got = decode_str(None, r#"{"conid":1,"position":1,"timestamp":1}"#).unwrap_err();
        assert_eq!(got.to_string(), "missing required field \"symbol\"");
        let got = decode_str(Some("123"), r#"{"conid":456,"symbol":"A","position":1,"timestamp":1}"#).unwrap_err();
        assert_eq!(got.to_string(), "key \"123\" disagrees with conid 456");
    }
}
