//! Fuzzes the decoder with arbitrary key and value bytes: it must never panic, and
//! every update it accepts must satisfy what the table and its readers rely on.
//!
//! Input layout: byte 0 chooses the key (bit 7 set: a key of the next `byte 0 & 0x3f`
//! bytes) and the size limit (bit 6 set: a small limit); the rest is the value.

#![no_main]

// Only part of each module is used here.
#[allow(dead_code)]
#[path = "../../src/decode/mod.rs"]
mod decode;
#[allow(dead_code)]
#[path = "../../src/offsets.rs"]
mod offsets;
#[allow(dead_code)]
#[path = "../../src/update.rs"]
mod update;

use decode::{DecodeOptions, MAX_SYMBOL_BYTES, decode};
use libfuzzer_sys::fuzz_target;
use offsets::{Coordinates, Offset, TopicPartition};
use update::KeyColumn;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let key_len = usize::from(control & 0x3f).min(rest.len());
    let (key, value) = if control & 0x80 != 0 { (Some(&rest[..key_len]), &rest[key_len..]) } else { (None, rest) };
    let options = DecodeOptions {
        format: decode::Format::Json,
        key_columns: if control & 0x20 != 0 { vec![KeyColumn::Conid, KeyColumn::Account] } else { vec![KeyColumn::Conid] },
        max_message_bytes: if control & 0x40 != 0 { 64 } else { 1024 * 1024 },
    };
    let at = Coordinates { tp: TopicPartition::new("fuzz", 0), offset: Offset(7) };
    match decode(key, Some(value), at.clone(), &options) {
        Ok(u) => {
            assert!(u.conid > 0);
            assert!(!u.symbol.trim().is_empty() && u.symbol.len() <= MAX_SYMBOL_BYTES);
            assert!(!u.symbol.chars().any(char::is_control));
            assert!(u.position.is_finite());
            for x in [u.avg_cost, u.market_price, u.market_value, u.unrealized_pnl, u.realized_pnl].into_iter().flatten() {
                assert!(x.is_finite());
            }
            assert!(chrono::DateTime::from_timestamp_micros(u.timestamp_micros).is_some());
            assert!(value.len() + key.map_or(0, <[u8]>::len) <= options.max_message_bytes);
            if let Some(key) = key {
                assert_eq!(std::str::from_utf8(key).ok().and_then(|k| k.parse::<i64>().ok()), Some(u.conid));
            }
            if options.key_columns.contains(&KeyColumn::Account) {
                assert!(u.account.as_deref().is_some_and(|a| !a.trim().is_empty()));
            }
            assert_eq!(u.source, at);
        }
        Err(reason) => {
            // Every reason names itself and has a stable category.
            assert!(!reason.to_string().is_empty());
            assert!(!reason.category().is_empty());
        }
    }
});
