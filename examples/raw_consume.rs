//! The broker's limit for the benchmark: a plain librdkafka consumer that reads a topic
//! from the start and only counts messages, with the same client settings the worker
//! uses for fetching. Prints one JSON line.
//!
//! Usage: raw_consume BROKERS TOPIC MESSAGES

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, expected] = args.as_slice() else {
        return Err("usage: raw_consume BROKERS TOPIC MESSAGES".into());
    };
    let expected: u64 = expected.parse()?;
    let group = format!("raw-consume-{}", std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let (mut count, mut bytes) = (0u64, 0u64);
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < expected && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                started.get_or_insert_with(Instant::now);
                count += 1;
                bytes += message.payload_len() as u64;
            }
            Some(Err(error)) => return Err(error.into()),
            None => {}
        }
    }
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({"messages": count, "bytes": bytes, "seconds": seconds, "rate": count as f64 / seconds.max(1e-9)})
    );
    if count < expected {
        return Err(format!("read {count} of {expected} messages").into());
    }
    Ok(())
}
