//! Sample position updates: a deterministic stream with the awkward parts of real
//! feeds (repeated messages, late updates with older timestamps, many symbols), used by
//! the demo, the tests and the benchmarks.

use serde_json::json;

/// One message to publish: the Kafka key and the JSON value.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleMessage {
    /// The conid as decimal text.
    pub key: String,
    /// The JSON value.
    pub value: String,
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
    /// Distinct instruments.
    pub instruments: usize,
    /// Seed; the same seed gives the same stream.
    pub seed: u64,
    /// Event time of the first message, epoch microseconds.
    pub start_micros: i64,
}

impl Default for SampleSpec {
    fn default() -> Self {
        Self { count: 5000, instruments: 200, seed: 1, start_micros: 1_764_057_600_000_000 }
    }
}

const TICKERS: [&str; 20] = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK B", "JPM", "V", "XOM", "UNH", "JNJ", "WMT",
    "MA", "PG", "HD", "CVX", "KO", "PEP",
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

/// Generates the stream described by `spec`: about 5% exact repeats of an earlier
/// message and 10% late updates whose timestamp is older than the previous one.
pub fn generate(spec: SampleSpec) -> Vec<SampleMessage> {
    let mut rng = SplitMix(spec.seed);
    let mut out: Vec<SampleMessage> = Vec::with_capacity(spec.count);
    for i in 0..spec.count {
        if i > 0 && rng.below(100) < 5 {
            let earlier = out[rng.below(i as u64) as usize].clone();
            out.push(earlier);
            continue;
        }
        let index = rng.below(spec.instruments as u64) as usize;
        let conid = conid_of(index);
        let symbol = symbol_of(index);
        let late = rng.below(100) < 10;
        let timestamp_micros =
            spec.start_micros + i as i64 * 1000 - if late { rng.below(5_000_000) as i64 } else { 0 };
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
        .to_string();
        out.push(SampleMessage { key: conid.to_string(), value, conid, symbol, position, timestamp_micros });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let u = decode(Some(m.key.as_bytes()), Some(m.value.as_bytes()), at, &DecodeOptions::default()).unwrap();
            assert_eq!((u.conid, u.timestamp_micros, u.position), (m.conid, m.timestamp_micros, m.position));
        }
    }
}
