//! The decoder's cost on the benchmark's messages, without Kafka: decodes the sample
//! stream on one thread and prints one JSON line with nanoseconds per message.
//!
//! Usage: decode_cost [MESSAGES]

use std::time::Instant;

use position_sink::decode::{DecodeOptions, decode};
use position_sink::offsets::{Coordinates, Offset, TopicPartition};
use position_sink::sample::{Generator, SampleSpec};

fn main() {
    let count: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(500_000);
    let messages: Vec<_> =
        Generator::new(SampleSpec { count, instruments: 100_000, symbols: 2_000, ..Default::default() })
            .map(|m| (m.key.into_bytes(), m.value))
            .collect();
    let options = DecodeOptions::default();
    let mut best = f64::MAX;
    let mut valid = 0;
    for _ in 0..5 {
        let started = Instant::now();
        valid = 0;
        for (offset, (key, value)) in messages.iter().enumerate() {
            let at = Coordinates { tp: TopicPartition::new("positions", 0), offset: Offset(offset as i64) };
            valid += usize::from(decode(Some(key), Some(value), at, &options).is_ok());
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    let bytes: usize = messages.iter().map(|(k, v)| k.len() + v.len()).sum();
    println!(
        "{{\"messages\":{count},\"valid\":{valid},\"mean_bytes\":{:.0},\"decode_ns_per_message\":{:.0}}}",
        bytes as f64 / count as f64,
        best * 1e9 / count as f64
    );
}
