//! The HTTP listener of a running worker, on 127.0.0.1: `/metrics` scraped during an
//! end-to-end run and checked against what was produced, and the probes' answers.
//! (`/readyz` through a broker outage is in `tests/faults.rs`.)

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// The samples of a Prometheus text exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn sum_of(samples: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    samples.iter().filter(|(name, _)| name.starts_with(prefix)).map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_a_run_match_what_was_produced() {
    let topic = create_topic("http-metrics", 3).await;
    let (_dir, table) = table_dir();
    let group = unique("g");
    let worker = spawn_worker(config(&topic, &group, &table));
    let progress = worker.progress.clone();
    wait_until(Duration::from_secs(60), "the listener and the group", async || {
        progress.http_address.get().is_some() && http_get(&progress, "/readyz").0 == 200
    })
    .await;
    let (status, body) = http_get(&progress, "/healthz");
    assert!(status == 200 && body.contains("\"ok\":true"), "/healthz: {status} {body}");

    let produced = produce(&topic, &sample_with_bad(4000, 200, 71, 5), None).await;
    let bad = produced.iter().filter(|m| m.rejection.is_some()).count();
    let end = end_offsets(&produced, 3);
    wait_until(Duration::from_secs(90), "offsets committed to the end", async || {
        committed_offsets(&group, &topic, 3) == end
    })
    .await;
    // The lag gauges follow the commits at the next flush tick.
    wait_until(Duration::from_secs(30), "every partition's lag at 0", async || {
        let s = samples(&http_get(&progress, "/metrics").1);
        (0..3).all(|p| {
            s.get(&format!("position_sink_consumer_lag_messages{{topic=\"{topic}\",partition=\"{p}\"}}")) == Some(&0.0)
        })
    })
    .await;

    let (status, text) = http_get(&progress, "/metrics");
    assert_eq!(status, 200);
    let s = samples(&text);
    let value = |name: &str| *s.get(name).unwrap_or_else(|| panic!("no sample {name} in\n{text}"));
    assert_eq!(value("position_sink_messages_consumed_total"), produced.len() as f64);
    assert_eq!(sum_of(&s, "position_sink_dead_letters_total{"), bad as f64, "dead letters by category add up");
    let valid = (produced.len() - bad) as f64;
    let rows = model(&produced).len() as f64;
    let written = value("position_sink_rows_written_total");
    assert!((rows..=valid).contains(&written), "rows written {written}: at least one per key, at most one per update");
    let commits = value("position_sink_delta_commits_total");
    let flushes = value("position_sink_flushes_total");
    assert!(commits >= 1.0 && commits <= flushes, "{commits} commits in {flushes} flushes");
    assert_eq!(value("position_sink_flush_duration_seconds_count"), commits, "one flush duration per commit");
    assert_eq!(value("position_sink_commit_latency_from_kafka_seconds_count"), valid);
    let from_event = value("position_sink_commit_latency_from_event_seconds_count");
    assert!((rows..=valid).contains(&from_event), "one event latency per row of a committed batch: {from_event}");
    assert_eq!(value("position_sink_delta_write_failures_total"), 0.0);
    assert_eq!(value("position_sink_unreadable_batches_total"), 0.0);
    assert_eq!(value("position_sink_assigned_partitions"), 3.0);
    assert_eq!(value("position_sink_table_version"), table_version(&table).await as f64);
    assert_eq!((value("position_sink_ready"), value("position_sink_broker_reachable")), (1.0, 1.0));
    assert_eq!(value("position_sink_buffered_messages"), 0.0);

    let summary = worker.stop().await.expect("worker");
    assert_eq!(summary.messages, produced.len() as u64, "the scrape and the run summary agree");
    assert_table_matches(&read_table(&table).await, &model(&produced));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_the_worker_at_start_naming_http_bind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let topic = create_topic("http-taken", 1).await;
    let (_dir, table) = table_dir();
    let mut c = config(&topic, &unique("g"), &table);
    c.http.bind = taken.local_addr().expect("address").to_string();
    let error = position_sink::run(c, Default::default()).await.expect_err("the port is taken");
    assert!(error.to_string().contains("http.bind"), "{error}");
}
