//! The worker's Prometheus metrics, rendered from [`Progress`]: its counters and gauges
//! are read at scrape time, so there is one set of numbers for the run summary, the
//! logs and the scrape; its histograms and per-partition lag are registered as they are.
//! Rendering is `prometheus-client`'s text encoder (Prometheus exposition format 0.0.4).
//!
//! Invariant kept here: every metric a scrape shows is documented in the README's
//! metrics table, with the same name, type, unit and labels.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::Progress;

/// The metrics of `progress` in the Prometheus text format.
pub fn render(progress: &std::sync::Arc<Progress>) -> String {
    let mut registry = Registry::default();
    let m = &progress.metrics;
    registry.register_with_unit(
        "position_sink_flush_duration",
        "Time to write and commit one flush's batch to Delta",
        Unit::Seconds,
        m.flush_seconds.clone(),
    );
    registry.register(
        "position_sink_flush_batch_messages",
        "Messages per flushed batch, before dedup",
        m.batch_messages.clone(),
    );
    registry.register_with_unit(
        "position_sink_commit_latency_from_event",
        "Delta commit time minus the event timestamp of each row written",
        Unit::Seconds,
        m.latency_from_event.clone(),
    );
    registry.register_with_unit(
        "position_sink_commit_latency_from_kafka",
        "Delta commit time minus the Kafka timestamp of each message written",
        Unit::Seconds,
        m.latency_from_kafka.clone(),
    );
    registry.register(
        "position_sink_consumer_lag_messages",
        "Log end offset minus the group's committed offset, per assigned topic-partition",
        m.consumer_lag.clone(),
    );
    registry.register_collector(Box::new(Counters(progress.clone())));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The counters and gauges of [`Progress`], read at scrape time.
#[derive(Debug)]
struct Counters(std::sync::Arc<Progress>);

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = &self.0;
        let counters: [(&str, &str, u64); 17] = [
            (
                "position_sink_compactions",
                "Compactions of this worker's files committed",
                Progress::get(&p.compactions),
            ),
            (
                "position_sink_maintenance_files_removed",
                "Data files (vacuum) and log files (log cleanup) removed by this worker's maintenance",
                Progress::get(&p.files_removed_by_maintenance),
            ),
            ("position_sink_messages_consumed", "Messages read from Kafka, valid or not", Progress::get(&p.messages)),
            (
                "position_sink_messages_skipped",
                "Messages skipped because the table already held them",
                Progress::get(&p.skipped_already_written),
            ),
            (
                "position_sink_rows_written",
                "Rows inserted or updated in the positions table",
                Progress::get(&p.rows_written),
            ),
            ("position_sink_flushes", "Flushes finished", Progress::get(&p.flushes)),
            ("position_sink_delta_commits", "Commits to the positions table", Progress::get(&p.delta_commits)),
            (
                "position_sink_dead_letter_commits",
                "Dead-letter table commits or topic transactions",
                Progress::get(&p.dead_letter_commits),
            ),
            ("position_sink_history_commits", "Commits to the history table", Progress::get(&p.history_commits)),
            ("position_sink_history_rows", "Updates appended to the history table", Progress::get(&p.history_rows)),
            (
                "position_sink_history_appended_bytes",
                "Bytes of the data files appended to the history table",
                Progress::get(&p.history_bytes),
            ),
            (
                "position_sink_delta_write_failures",
                "Delta write attempts that failed and were retried (storage errors and conflicts)",
                Progress::get(&p.write_failures),
            ),
            (
                "position_sink_delta_commit_conflicts",
                "Delta commits refused because another writer committed first (retried)",
                Progress::get(&p.commit_conflicts),
            ),
            (
                "position_sink_kafka_commit_failures",
                "Kafka offset commits that failed (retried until one succeeds)",
                Progress::get(&p.kafka_commit_failures),
            ),
            (
                "position_sink_rewinds",
                "Flushes whose messages were read again after an aborted transaction",
                Progress::get(&p.rewinds),
            ),
            (
                "position_sink_unreadable_batches",
                "Batches Kafka delivered that the client could not read (corrupt, or an unknown codec); read again",
                Progress::get(&p.unreadable_batches),
            ),
            (
                "position_sink_offset_gaps",
                "Offset gaps accepted (recovery.on_offset_gap = \"continue\")",
                Progress::get(&p.offset_gaps),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let by_reason = p.dead_letters();
        let mut family = encoder.encode_descriptor(
            "position_sink_dead_letters",
            "Messages rejected and written to the dead-letter destination, by reason category",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (category, count) in by_reason.iter() {
            let labels = vec![("category".to_string(), category.to_string())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        let gauges: [(&str, &str, Option<&Unit>, i64); 7] = [
            ("position_sink_buffered_messages", "Messages held in the buffer", None, gauge(&p.buffered_messages)),
            (
                "position_sink_buffered",
                "Bytes of messages held in the buffer",
                Some(&Unit::Bytes),
                gauge(&p.buffered_bytes),
            ),
            (
                "position_sink_reading_paused",
                "1 while reading is paused because the next buffer is full",
                None,
                gauge(&p.reading_paused),
            ),
            (
                "position_sink_assigned_partitions",
                "Partitions assigned to this worker",
                None,
                gauge(&p.assigned_partitions),
            ),
            (
                "position_sink_table_version",
                "Latest positions-table version this worker wrote or read",
                None,
                gauge(&p.table_version),
            ),
            (
                "position_sink_broker_reachable",
                "1 while a Kafka broker is reachable",
                None,
                i64::from(p.health.is_broker_reachable()),
            ),
            ("position_sink_ready", "1 while /readyz answers ready", None, i64::from(p.readiness().ok)),
        ];
        for (name, help, unit, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)?;
        }
        encode_maintenance(&p.maintenance(), &mut encoder)
    }
}

/// The maintenance gauges, once this worker measured them.
fn encode_maintenance(m: &super::MaintenanceStatus, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let labelled: [(&str, &str, Option<&Unit>, [(&str, Option<u64>); 2]); 2] = [
        (
            "position_sink_table_files",
            "Positions-table data files on storage (state=on_disk) and referenced by the latest version (state=live)",
            None,
            [("on_disk", m.files_on_disk), ("live", m.live_files)],
        ),
        (
            "position_sink_table",
            "Bytes of positions-table data files on storage (state=on_disk) and live (state=live)",
            Some(&Unit::Bytes),
            [("on_disk", m.bytes_on_disk), ("live", m.live_bytes)],
        ),
    ];
    for (name, help, unit, values) in labelled {
        if values.iter().all(|(_, v)| v.is_none()) {
            continue;
        }
        let mut family = encoder.encode_descriptor(name, help, unit, prometheus_client::metrics::MetricType::Gauge)?;
        for (state, value) in values {
            if let Some(value) = value {
                let labels = vec![("state".to_string(), state.to_string())];
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let plain: [(&str, &str, Option<&Unit>, Option<u64>); 3] = [
        ("position_sink_table_log_files", "Files in the positions table's _delta_log", None, m.log_files),
        ("position_sink_table_log", "Bytes of the positions table's _delta_log", Some(&Unit::Bytes), m.log_bytes),
        (
            "position_sink_table_commits_since_checkpoint",
            "Commit files a fresh reader of the positions table reads after its newest checkpoint",
            None,
            m.commits_since_checkpoint,
        ),
    ];
    for (name, help, unit, value) in plain {
        if let Some(value) = value {
            let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, unit, g.metric_type())?)?;
        }
    }
    let runs: Vec<(&str, (f64, f64))> = [("clean", m.last_clean), ("compaction", m.last_compaction)]
        .into_iter()
        .filter_map(|(t, r)| Some((t, r?)))
        .collect();
    if runs.is_empty() {
        return Ok(());
    }
    let families: [(&str, &str, fn((f64, f64)) -> f64); 2] = [
        (
            "position_sink_maintenance_last_run_timestamp",
            "When this worker last ran maintenance (task=clean: log cleanup and vacuum; task=compaction)",
            |(at, _)| at,
        ),
        (
            "position_sink_maintenance_last_duration",
            "How long this worker's last maintenance run took, by task",
            |(_, took)| took,
        ),
    ];
    for (name, help, value) in families {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            Some(&Unit::Seconds),
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (task, run) in &runs {
            let labels = vec![("task".to_string(), task.to_string())];
            ConstGauge::new(value(*run)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

fn gauge(value: &std::sync::atomic::AtomicU64) -> i64 {
    i64::try_from(Progress::get(value)).unwrap_or(i64::MAX)
}
