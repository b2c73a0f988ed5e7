//! What a running worker reports about itself: live counters and health (broker
//! reachable, storage writable, stopped on an error). Tests, the HTTP probes and the
//! Prometheus metrics read the same values, and a run's [`RunSummary`] is taken from
//! it: there is one set of counters.
//!
//! Invariant kept here: every counter is a lock-free atomic (the per-reason dead-letter
//! counts sit behind a short lock), written by the worker and its Kafka callbacks,
//! readable from any thread at any time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::dead_letter::ReasonCounts;

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
    pub metrics: crate::metrics::Metrics,
    /// Where the HTTP listener listens, once it does.
    pub http_address: std::sync::OnceLock<std::net::SocketAddr>,
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

    /// Records that the worker stopped (cleanly or on an error).
    /// Sets (or with `None` clears) the batch that cannot be read, described.
    pub fn set_unreadable(&self, batch: Option<String>) {
        *self.unreadable.lock().unwrap_or_else(PoisonError::into_inner) = batch;
    }

    /// The batch that cannot be read, described, while it is read again.
    pub fn unreadable(&self) -> Option<String> {
        self.unreadable.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

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

    /// Whether the worker is running and can reach both Kafka and storage.
    pub fn is_ready(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed)
            && self.is_broker_reachable()
            && self.is_storage_ok()
            && self.unreadable().is_none()
    }

    /// Why the worker is not ready, if it is not.
    pub fn problems(&self) -> Vec<&'static str> {
        let mut problems = Vec::new();
        if self.stopped.load(Ordering::Relaxed) {
            problems.push("stopped");
        }
        if !self.is_broker_reachable() {
            problems.push("no Kafka broker reachable");
        }
        if !self.is_storage_ok() {
            problems.push("Delta writes failing");
        }
        if self.unreadable().is_some() {
            problems.push("a Kafka batch cannot be read");
        }
        problems
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_broker_and_storage_are_fine_and_running() {
        let h = Health::default();
        assert!(h.is_ready());
        h.set_broker_reachable(false);
        assert_eq!(h.problems(), ["no Kafka broker reachable"]);
        h.set_broker_reachable(true);
        h.set_storage_ok(false);
        assert!(!h.is_ready());
        h.set_storage_ok(true);
        h.set_stopped();
        assert!(!h.is_ready());
    }
}
