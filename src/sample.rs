//! Sample position updates: a deterministic stream with the awkward parts of real
//! feeds (repeated messages, late updates with older timestamps, many symbols, and on
//! request invalid messages of every kind), used by the demo, the tests and the
//! benchmarks.

use serde_json::json;

/// One message to publish: the Kafka key and the value.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleMessage {
    /// The conid as decimal text.
    pub key: String,
    /// The value: JSON, except for some invalid messages.
    pub value: Vec<u8>,
    /// For an invalid message, the reason category the decoder must give it.
    pub rejection: Option<&'static str>,
    /// The conid.
    pub conid: i64,
    /// The symbol.
    pub symbol: String,
    /// The position.
    pub position: f64,
    /// The event time in epoch microseconds.
    pub timestamp_micros: i64,
}

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SampleSpec {
    /// Messages to generate.
    pub count: usize,
    /// Distinct instruments (conids).
    pub instruments: usize,
    /// Distinct symbols the instruments share (instrument `i` has symbol `i % symbols`);
    /// 0: one symbol per instrument.
    pub symbols: usize,
    /// Seed; the same seed gives the same stream.
    pub seed: u64,
    /// Event time of the first message, epoch microseconds.
    pub start_micros: i64,
    /// Percentage of invalid messages (0-100), of every kind in turn.
    pub bad_percent: u64,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self { count: 5000, instruments: 200, symbols: 0, seed: 1, start_micros: 1_764_057_600_000_000, bad_percent: 0 }
    }
}

const TICKERS: [&str; 20] = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK B", "JPM", "V", "XOM", "UNH", "JNJ", "WMT", "MA",
    "PG", "HD", "CVX", "KO", "PEP",
];

/// The symbol of the `index`-th instrument.
pub fn symbol_of(index: usize) -> String {
    match TICKERS.get(index) {
        Some(t) => (*t).to_string(),
        None => format!("SYM{index:05}"),
    }
}

/// The conid of the `index`-th instrument.
pub fn conid_of(index: usize) -> i64 {
    265_598 + index as i64 * 7
}

/// A small, fast, seedable generator (SplitMix64): the stream must be reproducible.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Invalid messages, one per kind: a JSON template (`{conid}`, `{symbol}`,
/// `{other}` are filled in) and the category the decoder must give it.
const BAD_KINDS: [(&str, &str); 13] = [
    (r#"{"conid":{conid},"symbol":"{symbol}","position":"#, "invalid_json"),
    (r#"[{conid},"{symbol}"]"#, "not_an_object"),
    (r#"{"conid":{conid},"position":1,"timestamp":"2026-11-25T10:00:00Z"}"#, "missing_field"),
    (r#"{"conid":{conid},"symbol":"{symbol}","position":null,"timestamp":"2026-11-25T10:00:00Z"}"#, "null_field"),
    (r#"{"conid":{conid},"symbol":"{symbol}","position":"ten","timestamp":"2026-11-25T10:00:00Z"}"#, "wrong_type"),
    (r#"{"conid":{conid},"symbol":"{symbol}","position":NaN,"timestamp":"2026-11-25T10:00:00Z"}"#, "not_finite"),
    (r#"{"conid":-{conid},"symbol":"{symbol}","position":1,"timestamp":"2026-11-25T10:00:00Z"}"#, "out_of_range"),
    (r#"{"conid":{conid},"symbol":"   ","position":1,"timestamp":"2026-11-25T10:00:00Z"}"#, "blank_field"),
    (r#"{"conid":{conid},"symbol":"{symbol}","position":1,"timestamp":"2026-02-30T10:00:00Z"}"#, "invalid_timestamp"),
    (r#"{"conid":{other},"symbol":"{symbol}","position":1,"timestamp":"2026-11-25T10:00:00Z"}"#, "key_mismatch"),
    (
        r#"{"conid":{conid},"symbol":"{symbol}","symbol":"X","position":1,"timestamp":"2026-11-25T10:00:00Z"}"#,
        "duplicate_field",
    ),
    ("", "empty_value"),
    ("", "not_utf8"),
];

fn bad_message(rng: &mut SplitMix, kind: usize, conid: i64, symbol: &str) -> SampleMessage {
    let (template, category) = BAD_KINDS[kind % BAD_KINDS.len()];
    let mut value = template
        .replace("{conid}", &conid.to_string())
        .replace("{other}", &(conid + 1 + rng.below(1000) as i64).to_string())
        .replace("{symbol}", symbol)
        .into_bytes();
    if category == "not_utf8" {
        // A Latin-1 "é" where UTF-8 is required.
        value = format!(r#"{{"conid":{conid},"symbol":"CAF"#).into_bytes();
        value.extend_from_slice(b"\xe9\",\"position\":1,\"timestamp\":1}");
    }
    SampleMessage {
        key: conid.to_string(),
        value,
        rejection: Some(category),
        conid,
        symbol: symbol.to_string(),
        position: 0.0,
        timestamp_micros: 0,
    }
}

/// Messages an exact repeat is drawn from: the last this many.
const REPEAT_WINDOW: usize = 1024;

/// Generates the stream described by `spec`: about 5% exact repeats of a recent
/// message, 10% late updates whose timestamp is older than the previous one, and
/// `bad_percent` invalid messages cycling through every kind.
pub fn generate(spec: SampleSpec) -> Vec<SampleMessage> {
    Generator::new(spec).collect()
}

/// The stream of [`generate`], one message at a time, in constant memory.
#[derive(Debug)]
pub struct Generator {
    spec: SampleSpec,
    rng: SplitMix,
    recent: std::collections::VecDeque<SampleMessage>,
    bad_kind: usize,
    i: usize,
}

impl Generator {
    /// The stream described by `spec`.
    pub fn new(spec: SampleSpec) -> Self {
        Self { spec, rng: SplitMix(spec.seed), recent: Default::default(), bad_kind: 0, i: 0 }
    }

    fn fresh(&mut self) -> SampleMessage {
        let (spec, rng, i) = (self.spec, &mut self.rng, self.i);
        let index = rng.below(spec.instruments as u64) as usize;
        let conid = conid_of(index);
        let symbol = symbol_of(if spec.symbols == 0 { index } else { index % spec.symbols });
        if rng.below(100) < spec.bad_percent {
            self.bad_kind += 1;
            return bad_message(rng, self.bad_kind - 1, conid, &symbol);
        }
        let late = rng.below(100) < 10;
        let timestamp_micros = spec.start_micros + i as i64 * 1000 - if late { rng.below(5_000_000) as i64 } else { 0 };
        let position = (rng.below(20_001) as f64 - 10_000.0) / 4.0;
        let price = 10.0 + rng.below(100_000) as f64 / 100.0;
        let value = json!({
            "conid": conid,
            "symbol": symbol,
            "position": position,
            "timestamp": chrono::DateTime::from_timestamp_micros(timestamp_micros)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            "account": "DU1234567",
            "sec_type": "STK",
            "currency": "USD",
            "avg_cost": price * 0.98,
            "market_price": price,
            "market_value": price * position,
            "unrealized_pnl": price * position * 0.02,
            "realized_pnl": null,
        })
        .to_string()
        .into_bytes();
        SampleMessage { key: conid.to_string(), value, rejection: None, conid, symbol, position, timestamp_micros }
    }
}

impl Iterator for Generator {
    type Item = SampleMessage;

    fn next(&mut self) -> Option<SampleMessage> {
        if self.i >= self.spec.count {
            return None;
        }
        let message = if self.i > 0 && self.rng.below(100) < 5 {
            let pick = self.rng.below(self.recent.len() as u64) as usize;
            self.recent[pick].clone()
        } else {
            self.fresh()
        };
        self.i += 1;
        if self.recent.len() == REPEAT_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(message.clone());
        Some(message)
    }
}

/// Publishes the sample stream `spec` to `topic`, in chunks so that memory stays flat,
/// at most `rate` messages per second when `rate` is set; returns how many were sent.
///
/// # Errors
/// When no producer can be made or connected, or a message is not acknowledged.
pub async fn publish(
    config: &crate::config::KafkaConfig,
    topic: &str,
    spec: SampleSpec,
    rate: usize,
) -> anyhow::Result<usize> {
    const TICK: std::time::Duration = std::time::Duration::from_millis(100);
    let chunk = if rate == 0 { 50_000 } else { (rate / 10).max(1) };
    let mut stream = crate::sample::Generator::new(spec).peekable();
    let mut ticks = tokio::time::interval(TICK);
    let owned = config.clone();
    let (producer, _) = tokio::task::spawn_blocking(move || crate::kafka::producer(&owned)).await??;
    let mut sent = 0;
    while stream.peek().is_some() {
        if rate > 0 {
            ticks.tick().await;
        }
        let messages: Vec<_> = stream.by_ref().take(chunk).collect();
        sent += crate::kafka::send_all(
            &producer,
            messages.iter().map(|m| crate::kafka::Outgoing {
                topic,
                key: Some(m.key.as_bytes()),
                value: Some(m.value.as_slice()),
                headers: None,
            }),
        )
        .await?;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_messages_get_the_category_they_were_made_for() {
        use crate::decode::{DecodeOptions, decode};
        use crate::offsets::{Coordinates, Offset, TopicPartition};
        let stream = generate(SampleSpec { count: 3000, bad_percent: 10, ..SampleSpec::default() });
        let mut seen = std::collections::BTreeSet::new();
        for m in &stream {
            let at = Coordinates { tp: TopicPartition::new("t", 0), offset: Offset(0) };
            let got = decode(Some(m.key.as_bytes()), Some(&m.value), at, &DecodeOptions::default());
            match m.rejection {
                Some(category) => {
                    assert_eq!(
                        got.map_err(|r| r.category()).unwrap_err(),
                        category,
                        "{:?}",
                        String::from_utf8_lossy(&m.value)
                    );
                    seen.insert(category);
                }
                None => assert!(got.is_ok()),
            }
        }
        assert_eq!(seen.len(), BAD_KINDS.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let spec = SampleSpec { count: 100, ..SampleSpec::default() };
        assert_eq!(generate(spec), generate(spec));
    }

    #[test]
    fn the_stream_has_repeats_and_late_updates() {
        let stream = generate(SampleSpec { count: 2000, instruments: 10, ..SampleSpec::default() });
        let repeats = stream.windows(1).enumerate().filter(|(i, w)| stream[..*i].contains(&w[0])).count();
        assert!(repeats > 20, "{repeats}");
        let late = stream.windows(2).filter(|w| w[1].timestamp_micros < w[0].timestamp_micros).count();
        assert!(late > 20, "{late}");
    }

    #[test]
    fn every_message_decodes() {
        use crate::decode::{DecodeOptions, decode};
        use crate::offsets::{Coordinates, Offset, TopicPartition};
        for m in generate(SampleSpec { count: 300, ..SampleSpec::default() }) {
            let at = Coordinates { tp: TopicPartition::new("t", 0), offset: Offset(0) };
            let u = decode(Some(m.key.as_bytes()), Some(&m.value), at, &DecodeOptions::default()).unwrap();
            assert_eq!((u.conid, u.timestamp_micros, u.position), (m.conid, m.timestamp_micros, m.position));
        }
    }
}
