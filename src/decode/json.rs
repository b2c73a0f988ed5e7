//! The JSON format: one object per message with the fields of the README's message
//! contract, parsed in place (strings borrow from the message unless escaped), unknown
//! fields ignored, each known field checked for its type and range.

use std::borrow::Cow;
use std::fmt;

use chrono::DateTime;
use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::{Rejection, check_symbol, is_supported_time, truncate};
use crate::offsets::Coordinates;
use crate::update::PositionUpdate;

/// The update a JSON value holds.
pub(super) fn decode(value: &[u8], source: Coordinates) -> Result<PositionUpdate, Rejection> {
    let text = std::str::from_utf8(value).map_err(|e| Rejection::NotUtf8(e.to_string()))?;
    parse_fields(text)?.into_update(source)
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
    if let Some(fields) = scan_flat(text) {
        return Ok(fields);
    }
    parse_fields_fully(text)
}

/// [`parse_fields`] by serde_json: every JSON text, and the reason for what is not JSON.
fn parse_fields_fully(text: &str) -> Result<Fields<'_>, Rejection> {
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Rejection::NotAnObject,
            Err(e) => json_error(text, &e),
        });
    }
    serde_json::from_str::<Fields>(text).map_err(|e| json_error(text, &e))
}

/// The fields of the JSON object `text` by a single pass over its bytes, for the texts
/// producers write: one flat object whose strings have no escapes and whose values are
/// strings, numbers, booleans or null. `None` for anything else (an escape, a nested
/// value, a control character, a large integer, a syntax error), which serde_json then
/// parses and explains ([`parse_fields_fully`]). What it returns is what serde_json
/// would: the same values, numbers of the same kind, the same duplicate rule
/// (`tests::the_fast_path_agrees_with_serde_json` compares both).
fn scan_flat(json: &str) -> Option<Fields<'_>> {
    let text = json.as_bytes();
    let mut at = skip_space(text, 0);
    if text.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(text, at + 1);
    let mut fields = Fields::default();
    if text.get(at) == Some(&b'}') {
        return (skip_space(text, at + 1) == text.len()).then_some(fields);
    }
    loop {
        let (key, next) = scan_string(json, at)?;
        at = skip_space(text, next);
        if text.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(text, at + 1);
        let (value, next) = scan_value(json, at)?;
        if let Some(index) = FIELD_NAMES.iter().position(|known| *known == key) {
            match &fields.slots[index] {
                Some(first) if *first != value => {
                    fields.duplicate.get_or_insert(FIELD_NAMES[index]);
                }
                Some(_) => {}
                None => fields.slots[index] = Some(value),
            }
        }
        at = skip_space(text, next);
        match text.get(at) {
            Some(b',') => at = skip_space(text, at + 1),
            Some(b'}') => return (skip_space(text, at + 1) == text.len()).then_some(fields),
            _ => return None,
        }
    }
}

/// The first byte at or after `at` that is not JSON whitespace.
fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// A string without escapes or control characters starting at `at` (its opening
/// quote), and the byte after its closing quote.
fn scan_string(json: &str, at: usize) -> Option<(&str, usize)> {
    let text = json.as_bytes();
    if text.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let length = text.get(start..)?.iter().position(|b| matches!(b, b'"' | b'\\') || *b < 0x20)?;
    let end = start + length;
    if text[end] != b'"' {
        return None;
    }
    // The quotes are ASCII, so both ends lie between characters.
    Some((json.get(start..end)?, end + 1))
}

/// A string, number, boolean or null starting at `at`, and the byte after it.
fn scan_value(json: &str, at: usize) -> Option<(Raw<'_>, usize)> {
    let text = json.as_bytes();
    let literal = |word: &[u8], value: Raw<'static>| {
        text.get(at..at + word.len()).filter(|found| *found == word).map(|_| (value, at + word.len()))
    };
    match text.get(at)? {
        b'"' => scan_string(json, at).map(|(s, next)| (Raw::Str(Cow::Borrowed(s)), next)),
        b't' => literal(b"true", Raw::Bool(true)),
        b'f' => literal(b"false", Raw::Bool(false)),
        b'n' => literal(b"null", Raw::Null),
        b'-' | b'0'..=b'9' => scan_number(text, at),
        _ => None,
    }
}

/// Significant digits at most in a number the fast path reads: their value fits a
/// `u64` with room, as serde_json accumulates it.
const MAX_DIGITS: usize = 18;

/// A JSON number starting at `at`, as serde_json reads it: an integer as an unsigned
/// (non-negative) or signed (negative) number; with a fraction or an exponent, all its
/// digits as one integer and a power of ten, the float being that integer times or
/// divided by the power of ten (serde_json's arithmetic without `float_roundtrip`, so
/// the same to the bit). Longer numbers, `-0`, and powers past 10^308 go to serde_json.
fn scan_number(text: &[u8], at: usize) -> Option<(Raw<'_>, usize)> {
    let digits =
        |from: usize| text.get(from..).map_or(0, |rest| rest.iter().take_while(|b| b.is_ascii_digit()).count());
    let value = |from: usize, n: usize| text[from..from + n].iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
    let negative = text[at] == b'-';
    let int_start = at + usize::from(negative);
    let int_digits = digits(int_start);
    if int_digits == 0 || (int_digits > 1 && text[int_start] == b'0') {
        return None;
    }
    let mut end = int_start + int_digits;
    let mut significand_digits = int_digits;
    let mut significand = if int_digits <= MAX_DIGITS { value(int_start, int_digits) } else { return None };
    let mut exponent: i32 = 0;
    let mut integral = true;
    if text.get(end) == Some(&b'.') {
        let fraction = digits(end + 1);
        significand_digits += fraction;
        if fraction == 0 || significand_digits > MAX_DIGITS {
            return None;
        }
        significand = significand * 10u64.pow(fraction as u32) + value(end + 1, fraction);
        exponent = -(fraction as i32);
        end += 1 + fraction;
        integral = false;
    }
    if matches!(text.get(end), Some(b'e' | b'E')) {
        end += 1;
        let sign = match text.get(end) {
            Some(b'-') => -1,
            Some(b'+') => 1,
            _ => 0,
        };
        end += usize::from(sign != 0);
        let written = digits(end);
        if written == 0 || written > 3 {
            return None;
        }
        exponent += if sign < 0 { -1 } else { 1 } * value(end, written) as i32;
        end += written;
        integral = false;
    }
    let number = if integral {
        match negative {
            // serde_json reads `-0` as the float -0.0.
            true if significand == 0 => return None,
            true => serde_json::Number::from(-(significand as i64)),
            false => serde_json::Number::from(significand),
        }
    } else {
        let power = *POWERS_OF_TEN.get(exponent.unsigned_abs() as usize)?;
        let magnitude = if exponent >= 0 { significand as f64 * power } else { significand as f64 / power };
        if magnitude.is_infinite() {
            return None;
        }
        serde_json::Number::from_f64(if negative { -magnitude } else { magnitude })?
    };
    Some((Raw::Number(number), end))
}

/// 10^0 ..= 10^308 as floats, each the nearest to its power, as serde_json's table holds them.
static POWERS_OF_TEN: std::sync::LazyLock<Vec<f64>> =
    std::sync::LazyLock::new(|| (0..=308).map(|n| format!("1e{n}").parse().unwrap_or(f64::INFINITY)).collect());

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
    /// The update these fields make, each checked; the key columns and the Kafka key
    /// are checked by the caller.
    fn into_update(mut self, source: Coordinates) -> Result<PositionUpdate, Rejection> {
        if let Some(field) = self.duplicate {
            return Err(Rejection::DuplicateField(field));
        }
        let conid = required_conid(self.take(0))?;
        let symbol = required(self.take(1)).and_then(|v| string(v, "symbol"))?;
        check_symbol(&symbol)?;
        let position = required(self.take(2)).and_then(|v| number(v, "position"))?;
        let timestamp_micros = required(self.take(3)).and_then(timestamp)?;
        Ok(PositionUpdate {
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
        })
    }

    fn take(&mut self, slot: usize) -> (Option<Raw<'a>>, &'static str) {
        (self.slots[slot].take(), FIELD_NAMES[slot])
    }
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
    if !is_supported_time(micros) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offsets::{Offset, TopicPartition};
    use crate::sample::{SampleSpec, generate};

    fn at() -> Coordinates {
        Coordinates { tp: TopicPartition::new("positions", 0), offset: Offset(1) }
    }

    /// What serde_json makes of `text`, and what the fast path makes of it if it takes it.
    fn both(text: &str) -> (Result<PositionUpdate, Rejection>, Option<Result<PositionUpdate, Rejection>>) {
        let full = parse_fields_fully(text).and_then(|f| f.into_update(at()));
        let fast = scan_flat(text).map(|f| f.into_update(at()));
        (full, fast)
    }

    #[test]
    fn the_fast_path_agrees_with_serde_json() {
        let mut texts: Vec<String> = generate(SampleSpec { count: 3000, bad_percent: 20, ..SampleSpec::default() })
            .into_iter()
            .filter_map(|m| String::from_utf8(m.value).ok())
            .collect();
        texts.extend(
            [
                r#"{}"#,
                r#" { "conid" : 1 , "symbol" : "A" , "position" : -0 , "timestamp" : 5 } "#,
                r#"{"conid":-0,"symbol":"A","position":1,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":1,"timestamp":-0}"#,
                r#"{"conid":1,"symbol":"A","position":-0.0,"timestamp":1e3}"#,
                r#"{"conid":1,"symbol":"A","position":1.5e400,"timestamp":1}"#,
                r#"{"conid":18446744073709551615,"symbol":"A","position":1,"timestamp":1}"#,
                r#"{"conid":999999999999999999,"symbol":"A","position":0.1,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","symbol":"A","position":1,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":1,"position":1.0,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A\u0042","position":1,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":01,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":1.,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":NaN,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":1,"timestamp":1,}"#,
                r#"{"conid":1,"symbol":"A","position":1,"timestamp":1}x"#,
                r#"{"conid":true,"symbol":null,"position":"1","timestamp":[1]}"#,
                "{\"conid\":1,\"symbol\":\"A\tB\",\"position\":1,\"timestamp\":1}",
                r#"{"conid":1,"symbol":"A","position":1.7976931348623157e308,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":2e308,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":4.9e-324,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":1e-400,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":12345678901234567.5,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":0.30000000000000004,"timestamp":1}"#,
                r#"{"conid":1,"symbol":"A","position":-123.456E+2,"timestamp":1.0}"#,
                r#"{"conid":1,"symbol":"A","position":9007199254740993.0,"timestamp":1}"#,
            ]
            .map(String::from),
        );
        // Every valid message, and each cut short and with one byte changed, here and there.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        };
        let bytes = b"{}[]\":,.-+eE0123456789 \\tnul";
        let mut mutated = Vec::new();
        for text in &texts {
            for _ in 0..6 {
                let mut b = text.clone().into_bytes();
                match random(3) {
                    0 => b.truncate(random(b.len())),
                    1 if !b.is_empty() => {
                        let i = random(b.len());
                        b[i] = bytes[random(bytes.len())];
                    }
                    _ => b.insert(random(b.len()), bytes[random(bytes.len())]),
                }
                if let Ok(t) = String::from_utf8(b) {
                    mutated.push(t);
                }
            }
        }
        texts.extend(mutated);
        // Numbers of every shape: sign, integer digits, fraction, exponent.
        for _ in 0..20_000 {
            let digits = |n: usize, random: &mut dyn FnMut(usize) -> usize| -> String {
                (0..n).map(|_| char::from(b'0' + random(10) as u8)).collect()
            };
            let mut number = String::new();
            if random(2) == 0 {
                number.push('-');
            }
            let int_digits = 1 + random(20);
            number += &digits(int_digits, &mut random);
            if random(2) == 0 {
                number.push('.');
                let n = 1 + random(20);
                number += &digits(n, &mut random);
            }
            if random(3) == 0 {
                number.push(['e', 'E'][random(2)]);
                number += ["", "+", "-"][random(3)];
                let n = 1 + random(4);
                number += &digits(n, &mut random);
            }
            texts.push(format!(r#"{{"conid":1,"symbol":"A","position":{number},"timestamp":1}}"#));
        }
        let mut taken = 0;
        for text in &texts {
            let (full, fast) = both(text);
            if let Some(fast) = fast {
                taken += 1;
                assert_eq!(fast, full, "{text}");
            }
        }
        assert!(taken > texts.len() / 3, "the fast path took {taken} of {} texts", texts.len());
    }
}
