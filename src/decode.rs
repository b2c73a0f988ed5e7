//! Decoding and validation: Kafka key and value bytes → [`PositionUpdate`], or a
//! [`Rejection`] that says exactly what is wrong with the message.
//!
//! Invariant kept here: every message either becomes a valid update or gets a reason;
//! nothing in the bytes can panic the decoder. Pure functions, no I/O.

use std::borrow::Cow;
use std::fmt;

use chrono::DateTime;
use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

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

/// What the decoder needs to know beyond the bytes.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Key columns besides `conid`: they must be present and non-empty.
    pub key_columns: Vec<KeyColumn>,
    /// Largest accepted message (key + value), in bytes.
    pub max_message_bytes: usize,
}

impl DecodeOptions {
    /// The options `config` sets: the one place they are built (worker, replay, review).
    pub fn of(config: &crate::config::Config) -> Self {
        Self { key_columns: config.delta.key_columns.clone(), max_message_bytes: config.decode.max_message_bytes }
    }
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { key_columns: vec![KeyColumn::Conid], max_message_bytes: 1024 * 1024 }
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
    let text = std::str::from_utf8(value).map_err(|e| Rejection::NotUtf8(e.to_string()))?;
    let fields = parse_fields(text)?;
    let update = fields.validate(source, options)?;
    check_key(key, update.conid)?;
    Ok(update)
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

/// The fields the table knows, in slot order.
const FIELD_NAMES: [&str; 12] = crate::update::FIELDS;

/// The raw JSON values of the known fields, before validation, borrowing from the
/// message's text.
#[derive(Default)]
struct Fields<'a> {
    slots: [Option<Raw<'a>>; FIELD_NAMES.len()],
    duplicate: Option<&'static str>,
}

/// One field's JSON value as the parser found it. Strings borrow from the message
/// unless they hold escapes; nothing is allocated for a number. Arrays and objects
/// are never a valid field: they are kept whole only to say what was found.
#[derive(Debug, PartialEq)]
enum Raw<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(Cow<'a, str>),
    Nested(Box<Value>),
}

impl fmt::Display for Raw<'_> {
    /// As JSON, the way the message wrote it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Null => f.write_str("null"),
            Raw::Bool(b) => write!(f, "{b}"),
            Raw::Number(n) => write!(f, "{n}"),
            Raw::Str(s) => write!(f, "{}", Value::String(s.to_string())),
            Raw::Nested(v) => write!(f, "{v}"),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Raw<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Raw<'de>, E> {
                Ok(Raw::Null)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Raw<'de>, E> {
                Ok(Raw::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Raw<'de>, E> {
                Ok(Raw::Number(n.into()))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Raw<'de>, E> {
                Ok(Raw::Number(n.into()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Raw<'de>, E> {
                // The parser rejects what overflows a float before it gets here.
                serde_json::Number::from_f64(x).map(Raw::Number).ok_or_else(|| E::custom("number out of range"))
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Raw<'de>, E> {
                Ok(Raw::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Raw<'de>, E> {
                Ok(Raw::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Raw<'de>, E> {
                Ok(Raw::Str(Cow::Owned(s)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Raw<'de>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(|v| Raw::Nested(Box::new(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Raw<'de>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(|v| Raw::Nested(Box::new(v)))
            }
        }
        deserializer.deserialize_any(RawVisitor)
    }
}

fn parse_fields(text: &str) -> Result<Fields<'_>, Rejection> {
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Rejection::NotAnObject,
            Err(e) => json_error(text, &e),
        });
    }
    serde_json::from_str::<Fields>(text).map_err(|e| json_error(text, &e))
}

/// Tokens producers write for non-finite floats; JSON has none of them.
const NON_FINITE_TOKENS: [&str; 7] = ["NaN", "-NaN", "Infinity", "-Infinity", "+Infinity", "inf", "-inf"];

/// Turns a parse error into a reason; a bare `NaN`/`Infinity` or an overflowing number
/// in a known field is reported as that field's problem.
fn json_error(text: &str, error: &serde_json::Error) -> Rejection {
    let (line, column) = (error.line(), error.column());
    let at = byte_position(text, line, column);
    let field = |start: usize| field_before(text, start).and_then(|f| FIELD_NAMES.iter().find(|known| **known == f));
    // The parser stops after a sign, before the word.
    let token = if at > 0 && text.as_bytes().get(at - 1).is_some_and(|b| b"+-".contains(b)) { at - 1 } else { at };
    let rest = text.get(token..).unwrap_or("");
    if NON_FINITE_TOKENS.iter().any(|t| rest.starts_with(t))
        && let Some(field) = field(token)
    {
        return Rejection::NotFinite(field);
    }
    let message = error.to_string();
    if message.starts_with("number out of range") {
        let start =
            text[..at.min(text.len())].trim_end_matches(|c: char| c.is_ascii_alphanumeric() || "+-.".contains(c)).len();
        if let Some(field) = field(start) {
            return Rejection::NotFinite(field);
        }
    }
    let problem = message.split(" at line ").next().unwrap_or(&message).to_string();
    Rejection::InvalidJson { line, column, problem }
}

/// The byte offset of serde_json's 1-based `line`/`column` in `text`.
fn byte_position(text: &str, line: usize, column: usize) -> usize {
    let line_start: usize = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    (line_start + column.saturating_sub(1)).min(text.len())
}

/// The object key whose value starts at byte `start`: `"key"` then `:` just before it.
fn field_before(text: &str, start: usize) -> Option<&str> {
    let before = text.get(..start)?.trim_end().strip_suffix(':')?.trim_end().strip_suffix('"')?;
    let open = before.rfind('"')?;
    Some(&before[open + 1..])
}

/// A known field's slot, or `None` for a field the table does not have.
struct Slot(Option<usize>);

impl<'de> Deserialize<'de> for Slot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SlotVisitor;
        impl Visitor<'_> for SlotVisitor {
            type Value = Slot;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Slot, E> {
                Ok(Slot(FIELD_NAMES.iter().position(|known| *known == name)))
            }
        }
        deserializer.deserialize_str(SlotVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields::default();
                while let Some(Slot(slot)) = map.next_key::<Slot>()? {
                    let Some(index) = slot else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    let value = map.next_value::<Raw<'de>>()?;
                    match &fields.slots[index] {
                        Some(first) if *first != value => {
                            fields.duplicate.get_or_insert(FIELD_NAMES[index]);
                        }
                        Some(_) => {}
                        None => fields.slots[index] = Some(value),
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

impl<'a> Fields<'a> {
    fn validate(mut self, source: Coordinates, options: &DecodeOptions) -> Result<PositionUpdate, Rejection> {
        if let Some(field) = self.duplicate {
            return Err(Rejection::DuplicateField(field));
        }
        let conid = required_conid(self.take(0))?;
        let symbol = required(self.take(1)).and_then(|v| string(v, "symbol"))?;
        check_symbol(&symbol)?;
        let position = required(self.take(2)).and_then(|v| number(v, "position"))?;
        let timestamp_micros = required(self.take(3)).and_then(timestamp)?;
        let update = PositionUpdate {
            conid,
            symbol,
            position,
            timestamp_micros,
            account: optional(self.take(4), string)?,
            sec_type: optional(self.take(5), string)?,
            currency: optional(self.take(6), string)?,
            avg_cost: optional(self.take(7), number)?,
            market_price: optional(self.take(8), number)?,
            market_value: optional(self.take(9), number)?,
            unrealized_pnl: optional(self.take(10), number)?,
            realized_pnl: optional(self.take(11), number)?,
            source,
        };
        for column in &options.key_columns {
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
        Ok(update)
    }

    fn take(&mut self, slot: usize) -> (Option<Raw<'a>>, &'static str) {
        (self.slots[slot].take(), FIELD_NAMES[slot])
    }
}

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

fn required<'a>((value, field): (Option<Raw<'a>>, &'static str)) -> Result<Raw<'a>, Rejection> {
    match value {
        None => Err(Rejection::MissingField(field)),
        Some(Raw::Null) => Err(Rejection::NullField(field)),
        Some(v) => Ok(v),
    }
}

fn optional<'a, T>(
    (value, field): (Option<Raw<'a>>, &'static str),
    convert: fn(Raw<'a>, &'static str) -> Result<T, Rejection>,
) -> Result<Option<T>, Rejection> {
    match value {
        None | Some(Raw::Null) => Ok(None),
        Some(v) => convert(v, field).map(Some),
    }
}

fn required_conid(slot: (Option<Raw<'_>>, &'static str)) -> Result<i64, Rejection> {
    let value = required(slot)?;
    let Raw::Number(n) = &value else { return Err(wrong_type("conid", "a positive integer", &value)) };
    match (n.as_i64(), n.as_u64()) {
        (Some(id), _) if id > 0 => Ok(id),
        (Some(id), _) => Err(Rejection::OutOfRange { field: "conid", detail: format!("{id} is not greater than 0") }),
        (None, Some(big)) => {
            Err(Rejection::OutOfRange { field: "conid", detail: format!("{big} does not fit a 64-bit signed integer") })
        }
        (None, None) if n.as_f64().is_some_and(|x| x.fract() == 0.0 && x.abs() >= 9.2e18) => {
            Err(Rejection::OutOfRange { field: "conid", detail: format!("{n} does not fit a 64-bit signed integer") })
        }
        (None, None) => Err(wrong_type("conid", "a positive integer", &value)),
    }
}

fn string(value: Raw<'_>, field: &'static str) -> Result<String, Rejection> {
    match value {
        Raw::Str(s) => Ok(s.into_owned()),
        other => Err(wrong_type(field, "a string", &other)),
    }
}

fn number(value: Raw<'_>, field: &'static str) -> Result<f64, Rejection> {
    match &value {
        Raw::Number(n) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(Rejection::NotFinite(field)),
        },
        Raw::Str(s) if is_non_finite_word(s) => Err(Rejection::NotFinite(field)),
        _ => Err(wrong_type(field, "a number", &value)),
    }
}

fn is_non_finite_word(s: &str) -> bool {
    let word = s.trim().trim_start_matches(['+', '-']);
    ["nan", "inf", "infinity"].iter().any(|w| word.eq_ignore_ascii_case(w))
}

fn timestamp(value: Raw<'_>) -> Result<i64, Rejection> {
    let micros = match &value {
        Raw::Str(text) => DateTime::parse_from_rfc3339(text)
            .map_err(|e| {
                use chrono::format::ParseErrorKind::{Impossible, OutOfRange};
                Rejection::InvalidTimestamp(match e.kind() {
                    OutOfRange | Impossible => format!("{text:?} is not a possible date and time ({e})"),
                    _ => format!("{text:?} is not RFC 3339 with an offset, e.g. \"2026-11-25T14:30:00Z\" ({e})"),
                })
            })?
            .timestamp_micros(),
        Raw::Number(n) => match n.as_i64() {
            Some(millis) => millis
                .checked_mul(1000)
                .ok_or_else(|| Rejection::InvalidTimestamp(format!("{millis} epoch milliseconds is out of range")))?,
            // Integral but beyond i64 (serde_json holds it as u64, or as f64 past u64).
            None if n.is_u64() || n.as_f64().is_some_and(|x| x.fract() == 0.0 && x.abs() >= 9.2e18) => {
                return Err(Rejection::InvalidTimestamp(format!("{n} epoch milliseconds is out of range")));
            }
            None => return Err(wrong_type("timestamp", "an RFC 3339 string or integer epoch milliseconds", &value)),
        },
        _ => return Err(wrong_type("timestamp", "an RFC 3339 string or integer epoch milliseconds", &value)),
    };
    if !(MIN_TIMESTAMP_MICROS..MAX_TIMESTAMP_MICROS).contains(&micros) {
        return Err(Rejection::InvalidTimestamp(format!(
            "{value} is outside 1900-01-01 .. 2262-01-01, the range every reader of the table supports"
        )));
    }
    Ok(micros)
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Raw<'_>) -> Rejection {
    let found = match found {
        Raw::Null => "null".to_string(),
        Raw::Bool(b) => format!("boolean {b}"),
        Raw::Number(n) => format!("number {n}"),
        Raw::Str(s) => format!("string {:?}", truncate(s, 40)),
        Raw::Nested(v) if v.is_array() => "an array".to_string(),
        Raw::Nested(_) => "an object".to_string(),
    };
    Rejection::WrongType { field, expected, found }
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
