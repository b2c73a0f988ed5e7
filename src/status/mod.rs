//! What a running worker reports about itself: live counters, histograms and health
//! (broker reachable, storage writable, a batch that cannot be read, stopped on an
//! error), and from them readiness and liveness, each defined once here. Tests, the
//! HTTP probes ([`http`]) and the Prometheus metrics ([`metrics`]) read the same values,
//! and a run's [`RunSummary`] is taken from it: there is one set of counters.
//!
//! Invariant kept here: every counter is a lock-free atomic (the per-reason dead-letter
//! counts sit behind a short lock), written by the worker and its Kafka callbacks,
//! readable from any thread at any time. This module imports neither of its children.

pub mod http;
pub mod metrics;

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::offsets::TopicPartition;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Live counters and health of one worker.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages consumed so far (including skipped ones).
    pub messages: AtomicU64,
    /// Of those, messages skipped because the table already held them.
    pub skipped_already_written: AtomicU64,
    /// Rows inserted or updated in the positions table.
    pub rows_written: AtomicU64,
    /// Flushes finished (committed, or with nothing new to commit).
    pub flushes: AtomicU64,
    /// Positions-table commits so far.
    pub delta_commits: AtomicU64,
    /// Dead-letter writes so far (table commits, or topic transactions).
    pub dead_letter_commits: AtomicU64,
    /// History table commits so far.
    pub history_commits: AtomicU64,
    /// Updates appended to the history table.
    pub history_rows: AtomicU64,
    /// Bytes of the files appended to the history table.
    pub history_bytes: AtomicU64,
    /// Flushes whose dead-letter transaction was aborted, so their messages were read again.
    pub rewinds: AtomicU64,
    /// Delta write attempts that failed (storage errors and conflicts; each is retried
    /// up to `retry.max_retries`).
    pub write_failures: AtomicU64,
    /// Of those, commit conflicts with another writer.
    pub commit_conflicts: AtomicU64,
    /// Kafka offset commit attempts that failed (each is retried until one succeeds).
    pub kafka_commit_failures: AtomicU64,
    /// Largest number of message bytes the buffer held.
    pub buffered_bytes_peak: AtomicU64,
    /// Partitions assigned to the worker right now.
    pub assigned_partitions: AtomicU64,
    /// Offset gaps accepted (`recovery.on_offset_gap = "continue"`).
    pub offset_gaps: AtomicU64,
    /// Batches Kafka delivered that the client could not read (each is read again).
    pub unreadable_batches: AtomicU64,
    /// Messages held in the buffer now.
    pub buffered_messages: AtomicU64,
    /// Bytes of messages held in the buffer now.
    pub buffered_bytes: AtomicU64,
    /// 1 while reading is paused because the next buffer is full.
    pub reading_paused: AtomicU64,
    /// The latest positions-table version written or read.
    pub table_version: AtomicU64,
    /// Whether the worker has had its first assignment (it joined its group).
    pub joined: AtomicBool,
    /// When the worker's loop last turned, milliseconds since the Unix epoch.
    pub last_turn_millis: AtomicU64,
    /// Dead letters written, by reason category.
    pub dead_letters: Mutex<ReasonCounts>,
    /// Health, for readiness.
    pub health: Health,
    /// Histograms and per-partition gauges.
    pub metrics: Histograms,
    /// The worker's loop turns at least this often (its flush interval), in
    /// milliseconds; 0 until the worker says.
    pub loop_period_millis: AtomicU64,
    /// Where the HTTP listener listens, once it does.
    pub http_address: std::sync::OnceLock<std::net::SocketAddr>,
    /// Compactions committed by this worker.
    pub compactions: AtomicU64,
    /// Data and log files this worker's maintenance removed.
    pub files_removed_by_maintenance: AtomicU64,
    /// What the last maintenance runs found and when they ran.
    pub maintenance: Mutex<MaintenanceStatus>,
}

/// The table's storage as this worker's maintenance last measured it, and when each
/// kind of maintenance last ran here (absent: not yet, or not on this worker).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaintenanceStatus {
    /// Positions-table data files on storage, referenced or not.
    pub files_on_disk: Option<u64>,
    /// Their bytes.
    pub bytes_on_disk: Option<u64>,
    /// Data files the latest version references.
    pub live_files: Option<u64>,
    /// Their bytes.
    pub live_bytes: Option<u64>,
    /// Files under `_delta_log/`.
    pub log_files: Option<u64>,
    /// Their bytes.
    pub log_bytes: Option<u64>,
    /// Commit files after the newest checkpoint.
    pub commits_since_checkpoint: Option<u64>,
    /// The last table-wide run (log cleanup, vacuum): Unix seconds, and seconds taken.
    pub last_clean: Option<(f64, f64)>,
    /// The last compaction check of this worker's files: Unix seconds, and seconds taken.
    pub last_compaction: Option<(f64, f64)>,
}

impl Progress {
    /// Updates what maintenance last found.
    pub fn update_maintenance(&self, change: impl FnOnce(&mut MaintenanceStatus)) {
        change(&mut self.maintenance.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// What maintenance last found.
    pub fn maintenance(&self) -> MaintenanceStatus {
        self.maintenance.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Progress {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds one to a counter and returns the new value.
    pub fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records that the loop turned now.
    pub fn turned(&self) {
        self.last_turn_millis.store(now_millis(), Ordering::Relaxed);
    }

    /// Time since the loop last turned (zero before it first did).
    pub fn since_last_turn(&self) -> std::time::Duration {
        let last = self.last_turn_millis.load(Ordering::Relaxed);
        if last == 0 {
            return std::time::Duration::ZERO;
        }
        std::time::Duration::from_millis(now_millis().saturating_sub(last))
    }

    /// Records what the buffer holds now.
    pub fn set_buffered(&self, messages: usize, bytes: usize, paused: bool) {
        self.buffered_messages.store(messages as u64, Ordering::Relaxed);
        self.buffered_bytes.store(bytes as u64, Ordering::Relaxed);
        self.reading_paused.store(u64::from(paused), Ordering::Relaxed);
        self.observe_buffered_bytes(bytes);
    }

    /// Raises the buffer peak to `bytes` if larger.
    pub fn observe_buffered_bytes(&self, bytes: usize) {
        self.buffered_bytes_peak.fetch_max(bytes as u64, Ordering::Relaxed);
    }

    /// Counts dead letters written, by reason.
    pub fn add_dead_letters(&self, written: &ReasonCounts) {
        self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).merge(written);
    }

    /// Dead letters written so far, by reason.
    pub fn dead_letters(&self) -> ReasonCounts {
        self.dead_letters.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The totals so far.
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            messages: Self::get(&self.messages),
            skipped_already_written: Self::get(&self.skipped_already_written),
            delta_commits: Self::get(&self.delta_commits),
            commit_conflicts: Self::get(&self.commit_conflicts),
            rows_written: Self::get(&self.rows_written),
            dead_letters: self.dead_letters(),
        }
    }
}

/// Totals of one run, taken from its [`Progress`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Messages consumed (including skipped ones).
    pub messages: u64,
    /// Messages skipped because the table already had them.
    pub skipped_already_written: u64,
    /// Positions-table commits made.
    pub delta_commits: u64,
    /// Delta commits refused because another writer committed first (then retried).
    pub commit_conflicts: u64,
    /// Rows inserted or updated.
    pub rows_written: u64,
    /// Dead letters written, by reason.
    pub dead_letters: ReasonCounts,
}

/// Whether the worker can do its job right now.
#[derive(Debug)]
pub struct Health {
    broker_unreachable: AtomicBool,
    storage_failing: AtomicBool,
    stopped: AtomicBool,
    /// A batch the worker cannot read, while it is being read again.
    unreadable: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            broker_unreachable: AtomicBool::new(false),
            storage_failing: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            unreadable: Mutex::new(None),
        }
    }
}

impl Health {
    /// Records whether any broker is reachable (from librdkafka's statistics).
    pub fn set_broker_reachable(&self, reachable: bool) {
        self.broker_unreachable.store(!reachable, Ordering::Relaxed);
    }

    /// Records whether the last Delta write attempt succeeded.
    pub fn set_storage_ok(&self, ok: bool) {
        self.storage_failing.store(!ok, Ordering::Relaxed);
    }

    /// Sets (or with `None` clears) the batch that cannot be read, described.
    pub fn set_unreadable(&self, batch: Option<String>) {
        *self.unreadable.lock().unwrap_or_else(PoisonError::into_inner) = batch;
    }

    /// The batch that cannot be read, described, while it is read again.
    pub fn unreadable(&self) -> Option<String> {
        self.unreadable.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Records that the worker stopped (cleanly or on an error).
    pub fn set_stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether the worker stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Whether a broker is reachable.
    pub fn is_broker_reachable(&self) -> bool {
        !self.broker_unreachable.load(Ordering::Relaxed)
    }

    /// Whether storage accepts writes (false while a write is failing and being retried).
    pub fn is_storage_ok(&self) -> bool {
        !self.storage_failing.load(Ordering::Relaxed)
    }
}

/// A probe's answer: whether, and why in a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the probe passes.
    pub ok: bool,
    /// Why, for a person.
    pub reason: String,
}

impl Verdict {
    fn new(ok: bool, reason: impl Into<String>) -> Self {
        Self { ok, reason: reason.into() }
    }
}

/// A loop that has not turned for this long is stuck, unless its flush interval is
/// long: then three intervals.
pub const STUCK_AFTER_AT_LEAST: Duration = Duration::from_secs(60);

impl Progress {
    /// Whether the worker can do its job right now, and why: it runs, a broker is
    /// reachable, Delta writes succeed, no batch it cannot read holds it up, and it
    /// has joined its group. The one definition `/readyz`, the `position_sink_ready`
    /// gauge and the tests use.
    pub fn readiness(&self) -> Verdict {
        let health = &self.health;
        if health.is_stopped() {
            return Verdict::new(false, "the worker has stopped");
        }
        if !health.is_broker_reachable() {
            return Verdict::new(false, "no Kafka broker is reachable");
        }
        if !health.is_storage_ok() {
            return Verdict::new(false, "Delta writes are failing and being retried");
        }
        if let Some(batch) = health.unreadable() {
            return Verdict::new(false, format!("a Kafka batch cannot be read and is being read again: {batch}"));
        }
        if !self.joined.load(Ordering::Relaxed) {
            return Verdict::new(false, "joining the consumer group: no assignment yet");
        }
        let assigned = Self::get(&self.assigned_partitions);
        Verdict::new(true, format!("{assigned} partitions assigned; broker reachable; Delta writes succeed"))
    }

    /// Whether the process is alive and its loop turns, and why.
    pub fn liveness(&self) -> Verdict {
        if self.health.is_stopped() {
            return Verdict::new(false, "the worker has stopped");
        }
        let idle = self.since_last_turn();
        let limit = self.stuck_after();
        if idle > limit {
            return Verdict::new(
                false,
                format!("the worker's loop has not turned for {} s (limit {} s)", idle.as_secs(), limit.as_secs()),
            );
        }
        Verdict::new(true, format!("the worker's loop turned {} ms ago", idle.as_millis()))
    }

    /// Records that the worker's loop turns at least once per `period` (its flush
    /// interval), which sets how long it may be idle before it counts as stuck.
    pub fn set_loop_period(&self, period: Duration) {
        self.loop_period_millis.store(u64::try_from(period.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long the loop may not turn before it counts as stuck: three loop periods,
    /// and at least [`STUCK_AFTER_AT_LEAST`].
    pub fn stuck_after(&self) -> Duration {
        let period = Duration::from_millis(self.loop_period_millis.load(Ordering::Relaxed));
        (period.saturating_mul(3)).max(STUCK_AFTER_AT_LEAST)
    }
}

/// Histograms and per-partition gauges of one worker ([`metrics`] renders them).
#[derive(Debug, Clone)]
pub struct Histograms {
    /// Time from the start of a flush's Delta write to its commit, seconds.
    pub flush_seconds: Histogram,
    /// Messages per flushed batch (before dedup).
    pub batch_messages: Histogram,
    /// Delta commit time minus each written row's event `timestamp`, seconds.
    pub latency_from_event: Histogram,
    /// Delta commit time minus each consumed message's Kafka timestamp, seconds.
    pub latency_from_kafka: Histogram,
    /// Log end minus the group's committed offset, per assigned topic-partition.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
}

/// Labels of one topic-partition.
pub type PartitionLabels = Vec<(String, String)>;

impl Default for Histograms {
    fn default() -> Self {
        // 10 ms .. about 20 min: a flush, and an update waiting through an outage.
        let seconds = || Histogram::new(exponential_buckets(0.01, 2.0, 18));
        Self {
            flush_seconds: seconds(),
            batch_messages: Histogram::new(exponential_buckets(1.0, 4.0, 12)),
            latency_from_event: seconds(),
            latency_from_kafka: seconds(),
            consumer_lag: Family::default(),
        }
    }
}

impl Histograms {
    /// Sets the consumer lag of `tp`.
    pub fn set_lag(&self, tp: &TopicPartition, lag: i64) {
        self.consumer_lag.get_or_create(&labels(tp)).set(lag);
    }

    /// Forgets the lag of a partition no longer assigned.
    pub fn forget_lag(&self, tp: &TopicPartition) {
        self.consumer_lag.remove(&labels(tp));
    }
}

fn labels(tp: &TopicPartition) -> PartitionLabels {
    vec![("topic".to_string(), tp.topic.clone()), ("partition".to_string(), tp.partition.0.to_string())]
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Dead letters counted by reason category.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasonCounts(BTreeMap<String, u64>);

impl ReasonCounts {
    /// Counts one dead letter of `category`.
    pub fn add(&mut self, category: &str, n: u64) {
        *self.0.entry(category.to_string()).or_default() += n;
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &ReasonCounts) {
        for (category, n) in &other.0 {
            self.add(category, *n);
        }
    }

    /// The count of `category`.
    pub fn get(&self, category: &str) -> u64 {
        self.0.get(category).copied().unwrap_or(0)
    }

    /// The total over all categories.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Categories and counts, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(c, n)| (c.as_str(), *n))
    }
}

impl std::fmt::Display for ReasonCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(c, n)| format!("{c}={n}")).collect();
        f.write_str(&parts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_in_total() {
        let mut a = ReasonCounts::default();
        a.add("invalid_json", 2);
        let mut b = ReasonCounts::default();
        b.add("invalid_json", 1);
        b.add("missing_field", 4);
        a.merge(&b);
        assert_eq!((a.get("invalid_json"), a.get("missing_field"), a.total()), (3, 4, 7));
        assert_eq!(a.to_string(), "invalid_json=3 missing_field=4");
    }

    fn joined() -> Progress {
        let p = Progress::default();
        p.joined.store(true, Ordering::Relaxed);
        p
    }

    #[test]
    fn ready_only_when_running_joined_and_broker_storage_and_batches_are_fine() {
        assert_eq!(Progress::default().readiness().reason, "joining the consumer group: no assignment yet");
        let p = joined();
        assert!(p.readiness().ok, "{:?}", p.readiness());
        p.health.set_broker_reachable(false);
        assert_eq!(p.readiness(), Verdict::new(false, "no Kafka broker is reachable"));
        p.health.set_broker_reachable(true);
        p.health.set_storage_ok(false);
        assert_eq!(p.readiness(), Verdict::new(false, "Delta writes are failing and being retried"));
        p.health.set_storage_ok(true);
        p.health.set_unreadable(Some("partition t[0]: the batch at offset 7".into()));
        assert!(!p.readiness().ok && p.readiness().reason.contains("offset 7"), "{:?}", p.readiness());
        p.health.set_unreadable(None);
        assert!(p.readiness().ok);
        p.health.set_stopped();
        assert_eq!(p.readiness(), Verdict::new(false, "the worker has stopped"));
    }

    #[test]
    fn the_loop_counts_as_stuck_after_three_flush_intervals_and_at_least_a_minute() {
        let p = Progress::default();
        assert_eq!(p.stuck_after(), STUCK_AFTER_AT_LEAST);
        p.set_loop_period(Duration::from_secs(3));
        assert_eq!(p.stuck_after(), STUCK_AFTER_AT_LEAST);
        p.set_loop_period(Duration::from_secs(120));
        assert_eq!(p.stuck_after(), Duration::from_secs(360));
    }

    #[test]
    fn a_loop_idle_for_less_than_its_limit_is_alive() {
        let p = Progress::default();
        p.set_loop_period(Duration::from_secs(120));
        let two_minutes_ago = now_millis() - 120_000;
        p.last_turn_millis.store(two_minutes_ago, Ordering::Relaxed);
        assert!(p.liveness().ok, "a 2-minute flush interval: {:?}", p.liveness());
        p.last_turn_millis.store(now_millis() - 400_000, Ordering::Relaxed);
        assert!(!p.liveness().ok);
    }
}
